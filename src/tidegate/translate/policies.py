"""BackendTLSPolicy: upstream TLS settings attached to Services, with conflict resolution and status."""

from __future__ import annotations

import dataclasses
from typing import Any

from tidegate import ir
from tidegate.resources.model import Key
from tidegate.translate.backends import decode_secret_field
from tidegate.translate.certificates import ca_bundle_is_valid
from tidegate.translate.conditions import CONTROLLER_NAME, condition
from tidegate.translate.index import Index

GATEWAY_GROUP = "gateway.networking.k8s.io"


class PolicyOutcome:
    def __init__(self) -> None:
        self.by_target: dict[tuple[str, str, str], ir.BackendTLS] = {}
        self.conditions: dict[Key, list[tuple[str, bool, str, str]]] = {}


def resolve_backend_tls_policies(index: Index) -> PolicyOutcome:
    """Map (namespace, service, port name or "") → BackendTLS. The oldest policy wins a target; later ones
    are reported Conflicted, as the Gateway API policy attachment rules say."""
    outcome = PolicyOutcome()
    policies = sorted(index.all("BackendTLSPolicy"), key=lambda p: (p.creation_timestamp, p.namespace, p.name))
    for policy in policies:
        validation = policy.spec.get("validation") or {}
        accepted = ("Accepted", True, "Accepted", "Policy is accepted")
        resolved = ("ResolvedRefs", True, "ResolvedRefs", "All references are resolved")
        ca_pem = ""
        for ref in validation.get("caCertificateRefs", []):
            group, kind, name = ref.get("group", ""), ref.get("kind", ""), ref["name"]
            if group != "" or kind not in ("ConfigMap", "Secret"):
                resolved = ("ResolvedRefs", False, "InvalidKind", f"caCertificateRef {kind} {name} is not a ConfigMap")
                break
            holder = index.get(kind, policy.namespace, name)
            pem = b""
            if holder is not None:
                pem = (decode_secret_field(holder.obj, "ca.crt") if kind == "Secret"
                       else (holder.obj.get("data") or {}).get("ca.crt", "").encode()) or b""
            if not pem or not ca_bundle_is_valid(pem):
                resolved = ("ResolvedRefs", False, "InvalidCACertificateRef",
                            f"{kind} {policy.namespace}/{name} has no valid PEM certificate under ca.crt")
                break
            ca_pem += pem.decode()
        if not resolved[1]:
            accepted = ("Accepted", False, "NoValidCACertificate", resolved[3])
        sans = tuple(s.get("hostname") or s.get("uri", "") for s in validation.get("subjectAltNames", []))
        tls = ir.BackendTLS(hostname=validation.get("hostname", ""), ca_pem=ca_pem,
                            well_known_ca=validation.get("wellKnownCACertificates", ""),
                            subject_alt_names=sans, policy=f"{policy.namespace}/{policy.name}")
        for target in policy.spec.get("targetRefs", []):
            if target.get("group", "") != "" or target.get("kind") != "Service":
                accepted = ("Accepted", False, "Invalid", f"targetRef {target.get('kind')} is not a Service")
                continue
            key = (policy.namespace, target["name"], target.get("sectionName", ""))
            existing = outcome.by_target.get(key)
            if existing is not None and not existing.problem:
                accepted = ("Accepted", False, "Conflicted",
                            f"Service {key[0]}/{key[1]} already has policy {existing.policy}")
                continue
            if accepted[1]:
                outcome.by_target[key] = tls
            elif existing is None:
                # Fail closed: a Service meant to be reached over TLS is not reached in clear text.
                outcome.by_target[key] = dataclasses.replace(tls, problem=f"BackendTLSPolicy {policy.namespace}/"
                                                                          f"{policy.name} is invalid: {accepted[3]}")
        outcome.conditions[policy.key] = [accepted, resolved]
    return outcome


def policy_statuses(index: Index, outcome: PolicyOutcome, listeners: list[ir.Listener]) -> dict[Key, Any]:
    """Status per policy, one ancestor entry per Gateway whose routes use a targeted Service."""
    gateways_by_service: dict[tuple[str, str], set[str]] = {}
    for listener in listeners:
        for route in (*listener.http_routes, *listener.l4_routes):
            for backend in route.backends:
                service = tuple(backend.name.split(":")[0].split("/", 1))
                gateways_by_service.setdefault(service, set()).add(listener.gateway)  # type: ignore[arg-type]
    statuses: dict[Key, Any] = {}
    for key, conds in outcome.conditions.items():
        policy = index.get("BackendTLSPolicy", key.namespace, key.name)
        assert policy is not None
        ancestors = []
        gateways: set[str] = set()
        for target in policy.spec.get("targetRefs", []):
            gateways |= gateways_by_service.get((key.namespace, target.get("name", "")), set())
        for gateway in sorted(gateways):
            namespace, _, name = gateway.partition("/")
            if not name:
                continue  # the Ingress front door is not a Gateway
            ancestors.append({
                "ancestorRef": {"group": GATEWAY_GROUP, "kind": "Gateway", "namespace": namespace, "name": name},
                "controllerName": CONTROLLER_NAME,
                "conditions": [condition(t, ok, reason, msg, policy.generation) for t, ok, reason, msg in conds],
            })
        statuses[key] = {"ancestors": ancestors}
    return statuses
