"""Everything the translator looks up, indexed once per snapshot (as Envoy Gateway's translator does)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from tidegate.resources.model import Resource
from tidegate.resources.selectors import selector_matches  # noqa: F401 (translators import it from here)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class Index:
    def __init__(self, resources: Iterable[Resource]):
        self.by_kind: dict[str, dict[tuple[str, str], Resource]] = defaultdict(dict)
        self.slices_by_service: dict[tuple[str, str], list[Resource]] = defaultdict(list)
        self.grants_by_namespace: dict[str, list[Resource]] = defaultdict(list)
        self.endpoints_cache: dict[tuple[str, str, int, str], tuple] = {}  # translate/backends.py fills it
        for res in resources:
            self.by_kind[res.kind][(res.namespace, res.name)] = res
            if res.kind == "EndpointSlice":
                service = res.labels.get(SERVICE_NAME_LABEL)
                if service:
                    self.slices_by_service[(res.namespace, service)].append(res)
            elif res.kind == "ReferenceGrant":
                self.grants_by_namespace[res.namespace].append(res)
        for slices in self.slices_by_service.values():
            slices.sort(key=lambda r: r.name)

    def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        return self.by_kind.get(kind, {}).get((namespace, name))

    def all(self, kind: str) -> list[Resource]:
        return [self.by_kind[kind][k] for k in sorted(self.by_kind.get(kind, {}))]

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        # The API server labels every namespace with its own name; undeclared namespaces get just that.
        labels = {"kubernetes.io/metadata.name": namespace}
        ns = self.get("Namespace", "", namespace)
        if ns is not None:
            labels.update(ns.labels)
        return labels

    def grant_allows(self, from_group: str, from_kind: str, from_namespace: str,
                     to_group: str, to_kind: str, to_namespace: str, to_name: str) -> bool:
        """Does a ReferenceGrant in the target namespace permit this cross-namespace reference?"""
        if from_namespace == to_namespace:
            return True
        for grant in self.grants_by_namespace.get(to_namespace, []):
            spec = grant.spec
            if not any(f.get("group", "") == from_group and f.get("kind") == from_kind
                       and f.get("namespace") == from_namespace for f in spec.get("from", [])):
                continue
            for to in spec.get("to", []):
                if to.get("group", "") == to_group and to.get("kind") == to_kind and to.get("name") in (None, "", to_name):
                    return True
        return False
