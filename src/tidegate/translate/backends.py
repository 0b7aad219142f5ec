"""backendRefs → Services → EndpointSlices → pod endpoints (traffic goes straight to pods)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from tidegate import ir
from tidegate.resources.model import Resource
from tidegate.translate.index import Index

GATEWAY_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True)
class RefProblem:
    reason: str  # BackendNotFound | InvalidKind | RefNotPermitted | UnsupportedProtocol
    message: str


def resolve_backend(
    index: Index,
    ref: dict,
    from_kind: str,
    from_namespace: str,
    backend_tls: dict[tuple[str, str, str], ir.BackendTLS],
    filters: tuple[ir.Filter, ...] = (),
) -> tuple[ir.Backend, RefProblem | None]:
    """Resolve one backendRef. A backend that cannot be used is still returned, marked `invalid`, so that its
    share of the traffic gets the 500 that the Gateway API asks for."""
    group = ref.get("group", "")
    kind = ref.get("kind", "Service")
    name = ref["name"]
    namespace = ref.get("namespace") or from_namespace
    port = ref.get("port")
    weight = int(ref.get("weight", 1))
    label = f"{namespace}/{name}" + (f":{port}" if port is not None else "")

    def invalid(problem: RefProblem) -> tuple[ir.Backend, RefProblem]:
        return ir.Backend(name=label, weight=weight, filters=filters, invalid=problem.message), problem

    if group != "" or kind != "Service":
        return invalid(RefProblem("InvalidKind", f"backendRef {group or 'core'}/{kind} {name} is not a kind tidegate "
                                                 "can route to (Service)"))
    if not index.grant_allows(GATEWAY_GROUP, from_kind, from_namespace, "", "Service", namespace, name):
        return invalid(RefProblem("RefNotPermitted", f"backendRef to Service {namespace}/{name} is not permitted "
                                                     f"by any ReferenceGrant in namespace {namespace}"))
    service = index.get("Service", namespace, name)
    if service is None:
        return invalid(RefProblem("BackendNotFound", f"Service {namespace}/{name} not found"))
    if port is None:
        return invalid(RefProblem("BackendNotFound", f"backendRef to Service {namespace}/{name} needs a port"))
    service_port = service_port_by_number(service.spec, int(port), "UDP" if from_kind == "UDPRoute" else "TCP")
    if service_port is None and service.spec.get("type") != "ExternalName":
        return invalid(RefProblem("BackendNotFound", f"Service {namespace}/{name} has no port {port}"))
    tls = backend_tls.get((namespace, name, (service_port or {}).get("name", ""))) or backend_tls.get(
        (namespace, name, ""))
    if from_kind in ("TLSRoute", "TCPRoute", "UDPRoute"):
        tls = None  # the gateway originates no TLS for these: passthrough and plain streams
    if tls is not None and tls.problem:
        return ir.Backend(name=label, weight=weight, filters=filters, invalid=tls.problem), None
    protocol = (service_port or {}).get("appProtocol", "")
    if tls is None and (protocol.lower() in H2C_APP_PROTOCOLS or (from_kind == "GRPCRoute" and not protocol)):
        # gRPC servers speak HTTP/2 only: a GRPCRoute's Service port that names no protocol is reached with
        # h2c, as Envoy Gateway does, and so is a port whose appProtocol says gRPC or HTTP/2 in the words
        # Helm charts and meshes use. (With a BackendTLSPolicy the pod is reached over TLS with HTTP/1.1.)
        protocol = "kubernetes.io/h2c"
    return ir.Backend(
        name=label,
        weight=weight,
        endpoints=service_endpoints(index, namespace, name, service.spec, service_port, int(port)),
        protocol=protocol,
        filters=filters,
        tls=tls,
        # TCPRoute and TLSRoute (passthrough) relays send it; HTTP proxying does not.
        proxy_protocol=proxy_protocol_of(service)[0] if from_kind in ("TCPRoute", "TLSRoute") else "",
    ), None


PROXY_PROTOCOL_ANNOTATION = "tidegate.io/proxy-protocol"


def proxy_protocol_of(service: Resource) -> tuple[str, str]:
    """The PROXY protocol version a Service's pods expect from L4 relays ("" for none), and a problem with the
    annotation ("" when it is fine or absent)."""
    value = service.annotations.get(PROXY_PROTOCOL_ANNOTATION, "")
    if value in ("", "v1", "v2"):
        return value, ""
    return "", f"annotation {PROXY_PROTOCOL_ANNOTATION}: {value!r} is not v1 or v2; no PROXY header is sent"


# appProtocol values that mean cleartext HTTP/2: the Kubernetes standard one, and gRPC's and Istio's names.
H2C_APP_PROTOCOLS = frozenset({"kubernetes.io/h2c", "h2c", "grpc", "http2"})


def service_port_by_number(spec: dict, number: int, protocol: str = "") -> dict | None:
    """The Service port with this number, of this protocol when there is one (DNS Services have TCP and UDP
    53), else the first."""
    ports = [p for p in spec.get("ports", []) if p.get("port") == number]
    return next((p for p in ports if p.get("protocol", "TCP") == protocol), ports[0] if ports else None)


def service_port_by_name(spec: dict, name: str) -> dict | None:
    return next((p for p in spec.get("ports", []) if p.get("name", "") == name), None)


def service_endpoints(index: Index, namespace: str, name: str, spec: dict, service_port: dict | None,
                      port: int) -> tuple[ir.Endpoint, ...]:
    """Ready (or serving) endpoints of one Service port, from its EndpointSlices, deduplicated. Computed once
    per snapshot and Service port, however many routes point at it."""
    key = (namespace, name, port, (service_port or {}).get("protocol", "TCP"))
    found = index.endpoints_cache.get(key)
    if found is None:
        found = index.endpoints_cache[key] = _service_endpoints(index, namespace, name, spec, service_port, port)
    return found


def _service_endpoints(index: Index, namespace: str, name: str, spec: dict, service_port: dict | None,
                       port: int) -> tuple[ir.Endpoint, ...]:
    if spec.get("type") == "ExternalName":
        return (ir.Endpoint(address=spec["externalName"], port=port),)
    assert service_port is not None
    port_name = service_port.get("name", "")
    target = service_port.get("targetPort", service_port["port"])
    protocol = service_port.get("protocol", "TCP")
    found: dict[tuple[str, int], ir.Endpoint] = {}
    for slice_ in index.slices_by_service.get((namespace, name), []):
        obj = slice_.obj
        if obj.get("addressType") == "FQDN":
            continue
        slice_port = next((p for p in obj.get("ports") or [] if p.get("name", "") == port_name
                           and p.get("protocol", "TCP") == protocol), None)
        if slice_port is not None and slice_port.get("port"):
            endpoint_port = int(slice_port["port"])
        elif isinstance(target, int):
            endpoint_port = target
        else:
            continue  # a named targetPort is only known through the slice
        for ep in obj.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            ready = cond.get("ready") is not False  # nil means ready
            serving = cond.get("serving", ready) is not False
            terminating = bool(cond.get("terminating", False))
            if not ready and not serving:
                continue
            target_ref = ep.get("targetRef") or {}
            hints = (ep.get("hints") or {}).get("forZones")
            zones_hint = tuple(z["name"] for z in hints) if hints is not None else None
            for address in ep["addresses"]:
                key = (address, endpoint_port)
                if key in found:
                    continue
                found[key] = ir.Endpoint(
                    address=address, port=endpoint_port, ready=ready, serving=serving, terminating=terminating,
                    zone=ep.get("zone", ""), node=ep.get("nodeName", ""), pod=target_ref.get("name", ""),
                    hints=zones_hint)
    return tuple(found.values())


def decode_secret_field(secret_obj: dict, key: str) -> bytes | None:
    data = secret_obj.get("data") or {}
    if key in data:
        try:
            return base64.b64decode(data[key], validate=False)
        except (ValueError, TypeError):
            return None
    string_data = secret_obj.get("stringData") or {}
    if key in string_data:
        return string_data[key].encode()
    return None
