"""The kinds tidegate reads: their API groups, served versions, scope and schema.

Gateway API schemas come from the official CRDs bundled in `crds/` (the experimental channel, a superset of
standard that also serves the alpha versions); tidegate's own CRDs and MetalLB's sit beside them; built-in kinds from `builtin_schemas.yaml`. Schemas load
lazily, once per kind, because the CRD files are large and most inputs use a few kinds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources as importlib_resources
from typing import Any

import yaml

from tidegate.resources.schema import Schema

GATEWAY_GROUP = "gateway.networking.k8s.io"
TIDEGATE_GROUP = "tidegate.io"
METALLB_GROUP = "metallb.io"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class KindInfo:
    group: str
    kind: str
    namespaced: bool
    crd_file: str = ""  # set for Gateway API kinds

    def api_versions(self) -> list[str]:
        return [f"{self.group}/{v}" if self.group else v for v in served_versions(self)]


def _gw(kind: str, plural: str, namespaced: bool = True) -> KindInfo:
    return KindInfo(GATEWAY_GROUP, kind, namespaced, f"{GATEWAY_GROUP}_{plural}.yaml")


def _metallb(kind: str, plural: str) -> KindInfo:
    return KindInfo(METALLB_GROUP, kind, True, f"{METALLB_GROUP}_{plural}.yaml")


KINDS: dict[tuple[str, str], KindInfo] = {
    (k.group, k.kind): k
    for k in [
        _gw("GatewayClass", "gatewayclasses", namespaced=False),
        _gw("Gateway", "gateways"),
        _gw("HTTPRoute", "httproutes"),
        _gw("GRPCRoute", "grpcroutes"),
        _gw("TLSRoute", "tlsroutes"),
        _gw("TCPRoute", "tcproutes"),
        _gw("UDPRoute", "udproutes"),
        _gw("ReferenceGrant", "referencegrants"),
        _gw("BackendTLSPolicy", "backendtlspolicies"),
        KindInfo(TIDEGATE_GROUP, "BackendPolicy", True, f"{TIDEGATE_GROUP}_backendpolicies.yaml"),
        KindInfo(TIDEGATE_GROUP, "TrafficPolicy", True, f"{TIDEGATE_GROUP}_trafficpolicies.yaml"),
        KindInfo(TIDEGATE_GROUP, "ClientPolicy", True, f"{TIDEGATE_GROUP}_clientpolicies.yaml"),
        KindInfo(TIDEGATE_GROUP, "HTTPRouteFilter", True, f"{TIDEGATE_GROUP}_httproutefilters.yaml"),
        KindInfo(TIDEGATE_GROUP, "AcmeIssuer", True, f"{TIDEGATE_GROUP}_acmeissuers.yaml"),
        KindInfo(TIDEGATE_GROUP, "ClusterAcmeIssuer", False, f"{TIDEGATE_GROUP}_clusteracmeissuers.yaml"),
        # MetalLB's objects, read as MetalLB defines them (its CRDs, Apache-2.0, bundled with their notice)
        _metallb("IPAddressPool", "ipaddresspools"),
        _metallb("L2Advertisement", "l2advertisements"),
        _metallb("BGPAdvertisement", "bgpadvertisements"),
        _metallb("BGPPeer", "bgppeers"),
        _metallb("Community", "communities"),
        _metallb("BFDProfile", "bfdprofiles"),
        KindInfo("", "Node", namespaced=False),
        KindInfo("", "Namespace", namespaced=False),
        KindInfo("", "Service", namespaced=True),
        KindInfo("", "Secret", namespaced=True),
        KindInfo("", "ConfigMap", namespaced=True),
        KindInfo("discovery.k8s.io", "EndpointSlice", namespaced=True),
        KindInfo("networking.k8s.io", "Ingress", namespaced=True),
        KindInfo("networking.k8s.io", "IngressClass", namespaced=False),
    ]
}

KIND_NAMES = {k.kind for k in KINDS.values()}
_BY_NAME = {k.kind: k for k in KINDS.values()}


def split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def by_name(kind: str) -> KindInfo:
    """The kind tidegate reads under this name (kind names are unique across its groups)."""
    return _BY_NAME[kind]


def lookup(api_version: str, kind: str) -> KindInfo | None:
    group, _ = split_api_version(api_version)
    return KINDS.get((group, kind))


@functools.cache
def _crd(filename: str) -> dict[str, Any]:
    text = importlib_resources.files("tidegate.resources").joinpath("crds", filename).read_text()
    for doc in yaml.load_all(text, Loader=_Loader):
        if doc and doc.get("kind") == "CustomResourceDefinition":
            return doc
    raise RuntimeError(f"no CustomResourceDefinition in bundled {filename}")


@functools.cache
def _builtin_schemas() -> dict[str, Any]:
    text = importlib_resources.files("tidegate.resources").joinpath("builtin_schemas.yaml").read_text()
    return yaml.load(text, Loader=_Loader)


_BUILTIN_PLURALS = {"Namespace": "namespaces", "Node": "nodes", "Service": "services", "Secret": "secrets",
                    "ConfigMap": "configmaps", "EndpointSlice": "endpointslices", "Ingress": "ingresses",
                    "IngressClass": "ingressclasses"}


def plural(info: KindInfo) -> str:
    """The resource name in API paths (gateways, endpointslices, ...)."""
    if info.crd_file:
        return _crd(info.crd_file)["spec"]["names"]["plural"]
    return _BUILTIN_PLURALS[info.kind]


@functools.cache
def served_versions(info: KindInfo) -> tuple[str, ...]:
    if info.crd_file:
        return tuple(v["name"] for v in _crd(info.crd_file)["spec"]["versions"] if v.get("served"))
    prefix = f"{info.group}/" if info.group else ""
    return tuple(
        key[len(prefix) :].split("/")[0]
        for key in _builtin_schemas()
        if key.startswith(prefix) and key.endswith("/" + info.kind) and key.count("/") == prefix.count("/") + 1
    )


def storage_version(info: KindInfo) -> str:
    """The version a CRD stores (the newest it knows); "" for built-in kinds."""
    if info.crd_file:
        return next((v["name"] for v in _crd(info.crd_file)["spec"]["versions"] if v.get("storage")), "")
    return ""


@functools.cache
def schema_for(info: KindInfo, version: str) -> Schema:
    """The compiled schema of one served version of a kind (root: the whole object)."""
    if info.crd_file:
        for v in _crd(info.crd_file)["spec"]["versions"]:
            if v["name"] == version:
                return Schema(v["schema"]["openAPIV3Schema"])
        raise KeyError(f"{info.kind} has no version {version}")
    prefix = f"{info.group}/" if info.group else ""
    node = dict(_builtin_schemas()[f"{prefix}{version}/{info.kind}"])
    # Like a CRD's root: the envelope fields are known (metadata itself is checked by the loader).
    node["properties"] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        **node.get("properties", {}),
    }
    return Schema(node)
