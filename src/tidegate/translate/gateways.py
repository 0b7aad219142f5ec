"""GatewayClasses and Gateways: which are tidegate's, and which listeners are valid, conflicted or resolved."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tidegate import ir
from tidegate.resources.cel import is_ip
from tidegate.resources.model import Resource
from tidegate.translate.acme import ISSUER_OPTION, Wanted, find_issuer, listener_secret
from tidegate.translate.backends import decode_secret_field
from tidegate.translate.certificates import CertificateError, ca_bundle_is_valid, certificate_from_secret
from tidegate.translate.conditions import CONTROLLER_NAME, condition
from tidegate.translate.index import Index

GATEWAY_GROUP = "gateway.networking.k8s.io"

# Route kinds each listener protocol can carry.
PROTOCOL_KINDS: dict[str, tuple[str, ...]] = {
    "HTTP": ("HTTPRoute", "GRPCRoute"),
    "HTTPS": ("HTTPRoute", "GRPCRoute"),
    "TLS": ("TLSRoute",),
    "TCP": ("TCPRoute",),
    "UDP": ("UDPRoute",),
}
# Listeners on one port must share a family: HTTPS and TLS can share (SNI tells them apart), the rest not.
_FAMILY = {"HTTP": "http", "HTTPS": "tls", "TLS": "tls", "TCP": "tcp", "UDP": "udp"}


@dataclass
class ListenerState:
    gateway: GatewayState
    spec: dict[str, Any]
    name: str
    port: int
    protocol: str
    hostname: str
    supported_kinds: list[str]
    tls: ir.ListenerTLS | None = None
    accepted: tuple[bool, str, str] = (True, "Accepted", "Listener is valid")
    resolved: tuple[bool, str, str] = (True, "ResolvedRefs", "All references are resolved")
    conflicted: tuple[bool, str, str] = (False, "NoConflicts", "No conflicts")
    programmable: bool = True  # certificates resolved: the data plane can serve it
    acme: Wanted | None = None  # the certificate it asks tidegate to order (tls.options tidegate.io/acme-issuer)
    pending: str = ""  # why it waits (for that certificate): Programmed=False, reason CertificatePending
    attached: int = 0
    http_routes: list[ir.HTTPRoute] = field(default_factory=list)
    l4_routes: list[ir.L4Route] = field(default_factory=list)

    @property
    def attachable(self) -> bool:
        """Routes attach to listeners that are accepted, whether or not their references resolve."""
        return self.accepted[0]

    @property
    def section(self) -> str:
        return self.name


@dataclass
class GatewayState:
    resource: Resource
    listeners: list[ListenerState] = field(default_factory=list)
    conditions: list[dict[str, Any]] = field(default_factory=list)
    addresses: list[dict[str, str]] = field(default_factory=list)
    # Every listener binds to each of these (the Gateway API says: all listeners on every address); none
    # means the run's --bind address.
    bind_addresses: list[str] = field(default_factory=list)
    backend_client_certificate: ir.Certificate | None = None
    accepted: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.resource.namespace, self.resource.name)


def translate_gateway_classes(index: Index, statuses: dict) -> set[str]:
    """Our GatewayClasses get Accepted; the names of accepted ones are returned."""
    ours: set[str] = set()
    for gc in index.all("GatewayClass"):
        if gc.spec.get("controllerName") != CONTROLLER_NAME:
            continue
        gen = gc.generation
        if gc.spec.get("parametersRef"):
            ok, reason, msg = False, "InvalidParameters", "tidegate's GatewayClass takes no parametersRef"
        else:
            ok, reason, msg = True, "Accepted", "GatewayClass is accepted by tidegate"
            ours.add(gc.name)
        statuses[gc.key] = {"conditions": [
            condition("Accepted", ok, reason, msg, gen),
            condition("SupportedVersion", True, "SupportedVersion", "Gateway API v1.6.1 CRDs", gen),
        ]}
    return ours


def translate_gateways(index: Index, classes: set[str], default_address: str) -> list[GatewayState]:
    states = []
    for gw in index.all("Gateway"):
        if gw.spec.get("gatewayClassName") not in classes:
            continue
        states.append(_gateway_state(index, gw, default_address))
    return states


def _gateway_state(index: Index, gw: Resource, default_address: str) -> GatewayState:
    state = GatewayState(gw)
    gen = gw.generation
    for spec in gw.spec.get("listeners", []):
        state.listeners.append(_listener_state(index, state, spec))
    _mark_conflicts(state.listeners)

    accepted, reason, msg = True, "Accepted", "Gateway is accepted"
    programmed, p_reason, p_msg = True, "Programmed", "Gateway is programmed"
    unsupported = [a for a in gw.spec.get("addresses", []) if a.get("type", "IPAddress") != "IPAddress"]
    bad_ips = [a for a in gw.spec.get("addresses", []) if a.get("type", "IPAddress") == "IPAddress"
               and a.get("value") and not is_ip(a["value"])]
    infra = gw.spec.get("infrastructure") or {}
    valid_listeners = [listener for listener in state.listeners if listener.accepted[0]]
    if infra.get("parametersRef"):
        accepted, reason, msg = False, "InvalidParameters", "tidegate's Gateways take no infrastructure.parametersRef"
    elif unsupported:
        accepted, reason = False, "UnsupportedAddress"
        msg = f"address type {unsupported[0].get('type')!r} is not supported; use IPAddress"
    elif not valid_listeners:
        accepted, reason, msg = False, "ListenersNotValid", "no listener is valid"
    elif len(valid_listeners) < len(state.listeners):
        reason, msg = "ListenersNotValid", "some listeners are not valid"
    if bad_ips:
        programmed, p_reason, p_msg = False, "AddressNotUsable", f"{bad_ips[0].get('value')!r} is not an IP address"
    if not accepted:
        programmed, p_reason, p_msg = False, "Invalid", "Gateway is not accepted"
    state.accepted = accepted

    ips = [a["value"] for a in gw.spec.get("addresses", []) if a.get("type", "IPAddress") == "IPAddress"
           and a.get("value") and is_ip(a["value"])]
    state.bind_addresses = list(dict.fromkeys(ips))
    shown = ips or ([default_address] if default_address else [])
    state.addresses = [{"type": "IPAddress", "value": ip} for ip in shown]
    state.conditions = [
        condition("Accepted", accepted, reason, msg, gen),
        condition("Programmed", programmed, p_reason, p_msg, gen),
    ]
    backend_tls = (gw.spec.get("tls") or {}).get("backend") or {}
    if backend_tls.get("clientCertificateRef"):
        ok, ref_reason, ref_msg = _resolve_backend_client_certificate(index, gw, state,
                                                                      backend_tls["clientCertificateRef"])
        state.conditions.append(condition("ResolvedRefs", ok, ref_reason, ref_msg, gen))
    return state


def _resolve_backend_client_certificate(index: Index, gw: Resource, state: GatewayState,
                                        ref: dict) -> tuple[bool, str, str]:
    """spec.tls.backend.clientCertificateRef: the certificate presented to backends reached over TLS. A
    problem is the Gateway's ResolvedRefs condition; the Gateway stays Accepted."""
    group, kind, name = ref.get("group", ""), ref.get("kind", "Secret"), ref["name"]
    namespace = ref.get("namespace") or gw.namespace
    if group != "" or kind != "Secret":
        return False, "InvalidClientCertificateRef", f"clientCertificateRef {kind} {name} is not a Secret"
    if not index.grant_allows(GATEWAY_GROUP, "Gateway", gw.namespace, "", "Secret", namespace, name):
        return False, "RefNotPermitted", (f"clientCertificateRef to Secret {namespace}/{name} is not permitted by "
                                          f"any ReferenceGrant in namespace {namespace}")
    secret = index.get("Secret", namespace, name)
    if secret is None:
        return False, "InvalidClientCertificateRef", f"Secret {namespace}/{name} not found"
    try:
        state.backend_client_certificate = certificate_from_secret(secret)
    except CertificateError as exc:
        return False, "InvalidClientCertificateRef", str(exc)
    return True, "ResolvedRefs", "All references are resolved"


def _listener_state(index: Index, gateway: GatewayState, spec: dict[str, Any]) -> ListenerState:
    protocol = spec["protocol"]
    listener = ListenerState(gateway=gateway, spec=spec, name=spec["name"], port=int(spec["port"]),
                             protocol=protocol, hostname=spec.get("hostname", ""), supported_kinds=[])
    if protocol not in PROTOCOL_KINDS:
        listener.accepted = (False, "UnsupportedProtocol", f"protocol {protocol!r} is not supported")
        listener.programmable = False
        return listener

    allowed = PROTOCOL_KINDS[protocol]
    tls_spec = spec.get("tls") or {}
    if protocol == "TLS" and tls_spec.get("mode", "Terminate") == "Terminate":
        allowed = ("TLSRoute", "TCPRoute")
    asked = (spec.get("allowedRoutes") or {}).get("kinds")
    if asked:
        valid: list[str] = []
        invalid: list[str] = []
        for k in asked:
            ok = k.get("group", GATEWAY_GROUP) == GATEWAY_GROUP and k["kind"] in allowed
            (valid if ok else invalid).append(k["kind"])
        listener.supported_kinds = list(dict.fromkeys(valid))
        if invalid:
            listener.resolved = (False, "InvalidRouteKinds",
                                 f"route kinds {', '.join(invalid)} are not supported on a {protocol} listener")
    else:
        listener.supported_kinds = list(allowed)

    if protocol == "HTTPS" or (protocol == "TLS" and tls_spec.get("mode", "Terminate") == "Terminate"):
        _resolve_certificates(index, gateway.resource, listener, tls_spec)
        _resolve_client_validation(index, gateway.resource, listener)
    elif protocol == "TLS":
        listener.tls = ir.ListenerTLS(mode="Passthrough")
    return listener


def _resolve_certificates(index: Index, gw: Resource, listener: ListenerState, tls_spec: dict) -> None:
    issuer = (tls_spec.get("options") or {}).get(ISSUER_OPTION)
    if issuer and not tls_spec.get("certificateRefs"):
        _resolve_acme(index, gw, listener, str(issuer))
        return
    certs: list[ir.Certificate] = []
    problem: tuple[str, str] | None = None
    for ref in tls_spec.get("certificateRefs", []):
        group, kind = ref.get("group", ""), ref.get("kind", "Secret")
        namespace = ref.get("namespace") or gw.namespace
        name = ref["name"]
        if group != "" or kind != "Secret":
            problem = problem or ("InvalidCertificateRef", f"certificateRef {group or 'core'}/{kind} {name} "
                                                           "is not a Secret")
            continue
        if not index.grant_allows(GATEWAY_GROUP, "Gateway", gw.namespace, "", "Secret", namespace, name):
            problem = problem or ("RefNotPermitted", f"certificateRef to Secret {namespace}/{name} is not "
                                                     f"permitted by any ReferenceGrant in namespace {namespace}")
            continue
        secret = index.get("Secret", namespace, name)
        if secret is None:
            problem = problem or ("InvalidCertificateRef", f"Secret {namespace}/{name} not found")
            continue
        try:
            certs.append(certificate_from_secret(secret))
        except CertificateError as exc:
            problem = problem or ("InvalidCertificateRef", str(exc))
    if not tls_spec.get("certificateRefs"):
        problem = ("InvalidCertificateRef", "a TLS-terminating listener needs tls.certificateRefs")
    if problem:
        listener.resolved = (False, problem[0], problem[1])
        if not certs:
            listener.programmable = False
    listener.tls = ir.ListenerTLS(mode="Terminate", certificates=tuple(certs))


def _resolve_acme(index: Index, gw: Resource, listener: ListenerState, issuer_name: str) -> None:
    """A listener whose certificate tidegate orders (translate/acme.py): served once its Secret exists."""
    listener.tls = ir.ListenerTLS(mode="Terminate")
    if not listener.hostname or listener.hostname.startswith("*"):
        listener.resolved = (False, "InvalidCertificateRef", f"{ISSUER_OPTION}: an ACME certificate is ordered for "
                             "the listener's hostname, which must be set and not a wildcard (HTTP-01 and "
                             "TLS-ALPN-01 cannot validate one)")
        listener.programmable = False
        return
    issuer = find_issuer(index, gw.namespace, issuer_name)
    if isinstance(issuer, str):
        listener.resolved = (False, "InvalidCertificateRef", f"{ISSUER_OPTION}: {issuer}")
        listener.programmable = False
        return
    name = listener_secret(gw.name, listener.name)
    listener.acme = Wanted(issuer, (listener.hostname,), gw.namespace, name,
                           f"Gateway {gw.namespace}/{gw.name} listener {listener.name}",
                           (gw.namespace, gw.name, listener.name))
    secret = index.get("Secret", gw.namespace, name)
    try:
        cert = certificate_from_secret(secret) if secret is not None else None
    except CertificateError:
        cert = None
    if cert is None:
        listener.programmable = False
        listener.pending = f"waiting for its certificate from {issuer.key} (Secret {gw.namespace}/{name})"
        return
    listener.tls = ir.ListenerTLS(mode="Terminate", certificates=(cert,))


def _resolve_client_validation(index: Index, gw: Resource, listener: ListenerState) -> None:
    """Gateway spec.tls.frontend: the validation for this listener's port (perPort), else the default."""
    frontend = ((gw.spec.get("tls") or {}).get("frontend")) or {}
    validation = (frontend.get("default") or {}).get("validation")
    for entry in frontend.get("perPort", []):
        if entry.get("port") == listener.port:
            validation = (entry.get("tls") or {}).get("validation")
    if not validation or listener.tls is None:
        return
    pems: list[str] = []
    problem: tuple[str, str] | None = None
    for ref in validation.get("caCertificateRefs", []):
        group, kind, name = ref.get("group", ""), ref.get("kind", "ConfigMap"), ref["name"]
        namespace = ref.get("namespace") or gw.namespace
        if group != "" or kind not in ("ConfigMap", "Secret"):
            problem = problem or ("InvalidCACertificateKind", f"caCertificateRef {kind} {name} is not a ConfigMap")
            continue
        if not index.grant_allows(GATEWAY_GROUP, "Gateway", gw.namespace, "", kind, namespace, name):
            problem = problem or ("RefNotPermitted", f"caCertificateRef to {kind} {namespace}/{name} is not "
                                                     "permitted by any ReferenceGrant")
            continue
        holder = index.get(kind, namespace, name)
        pem = b""
        if holder is not None:
            pem = (decode_secret_field(holder.obj, "ca.crt") if kind == "Secret"
                   else (holder.obj.get("data") or {}).get("ca.crt", "").encode()) or b""
        if not pem or not ca_bundle_is_valid(pem):
            problem = problem or ("InvalidCACertificateRef", f"{kind} {namespace}/{name} has no valid PEM "
                                                             "certificate under ca.crt")
            continue
        pems.append(pem.decode())
    if problem:
        listener.resolved = (False, problem[0], problem[1])
    if not pems:
        # Without a CA no client can be verified: the listener must not serve as if validation were off.
        listener.accepted = (False, "NoValidCACertificate", problem[1] if problem else "no CA certificate")
        listener.programmable = False
        return
    listener.tls = ir.ListenerTLS(mode=listener.tls.mode, certificates=listener.tls.certificates,
                                  client_ca_pem="".join(pems),
                                  client_validation=validation.get("mode", "AllowValidOnly"))


def _mark_conflicts(listeners: list[ListenerState]) -> None:
    """Listeners on one port must be distinct: one protocol family, and distinct hostnames within it.
    The first listener in the list keeps the port or hostname; later ones are Conflicted."""
    by_port: dict[tuple[int, str], list[ListenerState]] = {}
    for listener in listeners:
        if listener.protocol not in PROTOCOL_KINDS:
            continue
        transport = "udp" if listener.protocol == "UDP" else "tcp"
        by_port.setdefault((listener.port, transport), []).append(listener)
    for group in by_port.values():
        family = _FAMILY[group[0].protocol]
        seen_hosts: set[tuple[str, str]] = set()
        for listener in group:
            if _FAMILY[listener.protocol] != family:
                listener.conflicted = (True, "ProtocolConflict",
                                       f"port {listener.port} is already used by a {group[0].protocol} listener")
            else:
                host_key = (listener.protocol if family in ("tcp", "udp") else family, listener.hostname)
                if host_key in seen_hosts:
                    listener.conflicted = (True, "HostnameConflict",
                                           f"another listener on port {listener.port} has hostname "
                                           f"{listener.hostname or '(none)'!r}")
                seen_hosts.add(host_key)
            if listener.conflicted[0]:
                listener.accepted = (False, listener.conflicted[1], listener.conflicted[2])
                listener.programmable = False
        if family == "tls":
            _mark_mixed_tls(group)


def _tls_handling(listener: ListenerState) -> str:
    if listener.protocol == "HTTPS":
        return "HTTPS"
    return "TLS " + (listener.spec.get("tls") or {}).get("mode", "Terminate")


def _mark_mixed_tls(group: list[ListenerState]) -> None:
    """One port serves HTTPS, TLS Terminate or TLS Passthrough listeners, not a mix: the data plane would
    have to choose by SNI before deciding whether to terminate. Every listener of a mixed port is
    Conflicted (as the conformance suite expects of an implementation without mixed termination)."""
    live = [listener for listener in group if not listener.conflicted[0]]
    kinds = sorted({_tls_handling(listener) for listener in live})
    if len(kinds) < 2:
        return
    message = f"port {group[0].port} mixes {' and '.join(kinds)} listeners; tidegate serves one of them per port"
    for listener in live:
        listener.conflicted = (True, "ProtocolConflict", message)
        listener.accepted = (False, "ProtocolConflict", message)
        listener.programmable = False


def listener_status(listener: ListenerState) -> dict[str, Any]:
    gen = listener.gateway.resource.generation
    accepted, resolved, conflicted = listener.accepted, listener.resolved, listener.conflicted
    programmed = accepted[0] and listener.programmable and listener.gateway.accepted
    if programmed:
        p_reason, p_msg = "Programmed", "Listener is programmed"
    elif listener.pending and accepted[0] and resolved[0]:
        p_reason, p_msg = "CertificatePending", "Listener " + listener.pending
    else:
        p_reason = "Invalid"
        p_msg = "Listener cannot be served: " + (accepted[2] if not accepted[0] else resolved[2])
    return {
        "name": listener.name,
        "supportedKinds": [{"group": GATEWAY_GROUP, "kind": k} for k in listener.supported_kinds],
        "attachedRoutes": listener.attached,
        "conditions": [
            condition("Accepted", accepted[0], accepted[1], accepted[2], gen),
            condition("ResolvedRefs", resolved[0], resolved[1], resolved[2], gen),
            condition("Programmed", programmed, p_reason, p_msg, gen),
            condition("Conflicted", conflicted[0], conflicted[1], conflicted[2], gen),
        ],
    }


def gateway_status(state: GatewayState) -> dict[str, Any]:
    return {
        "addresses": state.addresses,
        "conditions": state.conditions,
        "listeners": [listener_status(listener) for listener in state.listeners],
    }


def mark_unbindable(statuses: dict, listeners: list[ir.Listener], errors: dict[tuple[str, int], tuple[str, str]],
                    bind: str) -> dict:
    """A copy of `statuses` with what only the data plane can find out: a listener whose port is taken is
    Accepted=False (PortUnavailable); a Gateway address that cannot be bound here makes the Gateway
    Programmed=False (AddressNotUsable) and is left out of its status addresses."""
    if not errors:
        return statuses
    out = dict(statuses)
    gateway_keys = {(k.namespace, k.name): k for k in out if k.kind == "Gateway"}
    for listener in listeners:
        error = errors.get((listener.address or bind, listener.port))
        if error is None or listener.gateway.count("/") != 1:
            continue
        key = gateway_keys.get(tuple(listener.gateway.split("/")))  # type: ignore[arg-type]
        if key is None:
            continue
        reason, message = error
        status = dict(out[key])
        if reason == "AddressNotUsable":
            status["conditions"] = [
                {**c, "status": "False", "reason": "AddressNotUsable", "message": message}
                if c["type"] == "Programmed" else c for c in status["conditions"]]
            status["addresses"] = [a for a in status.get("addresses", []) if a["value"] != listener.address]
        else:
            section = listener.name.rsplit("/", 1)[1]
            status["listeners"] = [_unbound_listener(entry, message) if entry["name"] == section else entry
                                   for entry in status["listeners"]]
        out[key] = status
    return out


def _unbound_listener(entry: dict, message: str) -> dict:
    conditions = [{**c, "status": "False", "message": message,
                   "reason": "PortUnavailable" if c["type"] == "Accepted" else "Invalid"}
                  if c["type"] in ("Accepted", "Programmed") else c for c in entry["conditions"]]
    return {**entry, "conditions": conditions}
