"""The status-only cases of the official Gateway API conformance suite (v1.6.1), ported.

Each case loads the suite's base manifests and the case's own manifests through the same loader as
`tidegate status`, translates them, and compares with the expectations written in the case's Go file, using
the suite's own comparison rules (conditions: type and status, reason when given; listeners: same names and
count, expected supportedKinds present, attachedRoutes equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.certs import tls_secret_yaml
from tidegate.resources.loader import load_text
from tidegate.resources.model import Key
from tidegate.translate import translate

SUITE = Path(__file__).resolve().parent.parent.parent / "shared" / "gateway-api" / "conformance"
INFRA, WEB, APP = "gateway-conformance-infra", "gateway-conformance-web-backend", "gateway-conformance-app-backend"

pytestmark = pytest.mark.skipif(not SUITE.exists(), reason=f"conformance suite not found at {SUITE}")

GATEWAY_CLASS = """apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: tidegate-conformance}
spec: {controllerName: tidegate.io/gateway-controller}
"""


def load_case(manifest: str, extra: str = "") -> dict[Key, dict[str, Any]]:
    """`extra`: objects a case's Go code applies after its manifests."""
    # The Secrets the suite creates before any case runs (suite.go).
    secrets = [tls_secret_yaml(WEB, "certificate", ["*"]),
               tls_secret_yaml(INFRA, "tls-validity-checks-certificate", ["*", "*.org", "*.wildcard.org"]),
               tls_secret_yaml(INFRA, "tls-checks-certificate", ["abc.example.com", "other.example.com"]),
               tls_secret_yaml(INFRA, "tls-passthrough-checks-certificate", ["abc.example.com"]),
               tls_secret_yaml(APP, "tls-passthrough-checks-certificate", ["abc.example.com"]),
               tls_secret_yaml(INFRA, "tls-terminate-checks-certificate", ["tls.example.com"])]
    texts = [GATEWAY_CLASS, (SUITE / "base" / "manifests.yaml").read_text(),
             (SUITE / "tests" / manifest).read_text(), *secrets, *([extra] if extra else [])]
    resources, errors = [], []
    for i, text in enumerate(texts):
        loaded = load_text(text.replace("{GATEWAY_CLASS_NAME}", "tidegate-conformance"), f"part{i}")
        errors += loaded.errors
        known = {r.key for r in resources}
        resources += [r for r in loaded.resources if r.key not in known]
    assert not errors, [str(e) for e in errors]
    return translate(resources).statuses


def has_condition(conditions: list[dict], type_: str, status: str, reason: str = "") -> bool:
    return any(c["type"] == type_ and c["status"] == status and (not reason or c["reason"] == reason)
               for c in conditions)


def listeners_match(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected), [a["name"] for a in actual]
    by_name = {a["name"]: a for a in actual}
    for exp in expected:
        got = by_name[exp["name"]]
        kinds = {k["kind"] for k in got["supportedKinds"]}
        if "kinds" in exp:
            if not exp["kinds"]:
                assert not kinds, (exp["name"], kinds)
            assert set(exp["kinds"]) <= kinds, (exp["name"], kinds)
        assert got["attachedRoutes"] == exp["attached"], (exp["name"], got["attachedRoutes"])
        for cond in exp["conditions"]:
            assert has_condition(got["conditions"], *cond), (exp["name"], cond, got["conditions"])


def route_parent(statuses: dict, kind: str, ns: str, name: str, gw_ns: str, gw_name: str) -> list[dict]:
    status = statuses[Key(kind, ns, name)]
    for parent in status["parents"]:
        ref = parent["parentRef"]
        if ref["name"] == gw_name and (ref.get("namespace") or ns) == gw_ns:
            return parent["conditions"]
    raise AssertionError(f"{kind} {ns}/{name} has no status for Gateway {gw_ns}/{gw_name}")


def gateway(statuses: dict, name: str, ns: str = INFRA) -> dict:
    return statuses[Key("Gateway", ns, name)]


# (case file, route name, route namespace, gateway name, condition)
ROUTE_CASES = [
    ("httproute-invalid-parentref-not-matching-section-name.yaml",
     "httproute-listener-not-matching-section-name", INFRA, "same-namespace", ("Accepted", "False", "NoMatchingParent")),
    ("httproute-invalid-parentref-not-matching-listener-port.yaml",
     "httproute-listener-not-matching-route-port", INFRA, "same-namespace", ("Accepted", "False", "NoMatchingParent")),
    ("httproute-invalid-parentref-section-name-not-matching-port.yaml",
     "httproute-listener-section-name-not-matching-port", INFRA,
     "gateway-with-one-not-matching-port-and-section-name-route", ("Accepted", "False", "NoMatchingParent")),
    ("httproute-invalid-cross-namespace-parent-ref.yaml",
     "invalid-cross-namespace-parent-ref", WEB, "same-namespace", ("Accepted", "False", "NotAllowedByListeners")),
    ("httproute-invalid-cross-namespace-backend-ref.yaml",
     "invalid-cross-namespace-backend-ref", INFRA, "same-namespace", ("ResolvedRefs", "False", "RefNotPermitted")),
    ("httproute-invalid-nonexistent-backendref.yaml",
     "invalid-nonexistent-backend-ref", INFRA, "same-namespace", ("ResolvedRefs", "False", "BackendNotFound")),
    ("httproute-invalid-backendref-unknown-kind.yaml",
     "invalid-backend-ref-unknown-kind", INFRA, "same-namespace", ("ResolvedRefs", "False", "InvalidKind")),
    ("httproute-disallowed-kind.yaml",
     "disallowed-kind", INFRA, "tlsroutes-only", ("Accepted", "False", "NotAllowedByListeners")),
    ("httproute-invalid-reference-grant.yaml",
     "reference-grant", INFRA, "same-namespace", ("ResolvedRefs", "False", "RefNotPermitted")),
    ("httproute-partially-invalid-via-invalid-reference-grant.yaml",
     "invalid-reference-grant", INFRA, "same-namespace", ("ResolvedRefs", "False", "RefNotPermitted")),
    ("httproute-reference-grant.yaml",
     "reference-grant", INFRA, "same-namespace", ("ResolvedRefs", "True", "ResolvedRefs")),
    ("httproute-simple-same-namespace.yaml",
     "gateway-conformance-infra-test", INFRA, "same-namespace", ("Accepted", "True", "Accepted")),
]


@pytest.mark.parametrize("case,route,namespace,gw,cond", ROUTE_CASES, ids=[c[0][:-5] for c in ROUTE_CASES])
def test_route_condition(case: str, route: str, namespace: str, gw: str, cond: tuple) -> None:
    statuses = load_case(case)
    assert has_condition(route_parent(statuses, "HTTPRoute", namespace, route, INFRA, gw), *cond)


def test_gateway_invalid_route_kind() -> None:
    statuses = load_case("gateway-invalid-route-kind.yaml")
    listeners_match(gateway(statuses, "gateway-only-invalid-route-kind")["listeners"], [
        {"name": "http", "kinds": [], "attached": 0,
         "conditions": [("ResolvedRefs", "False", "InvalidRouteKinds")]}])
    listeners_match(gateway(statuses, "gateway-supported-and-invalid-route-kind")["listeners"], [
        {"name": "http", "kinds": ["HTTPRoute"], "attached": 0,
         "conditions": [("ResolvedRefs", "False", "InvalidRouteKinds")]}])


def test_gateway_listener_unsupported_protocol() -> None:
    statuses = load_case("gateway-invalid-listeners-unsupported-protocol.yaml")
    only = gateway(statuses, "gateway-only-unsupported-protocols")
    assert has_condition(only["conditions"], "Accepted", "False", "ListenersNotValid")
    listeners_match(only["listeners"], [
        {"name": "invalid", "kinds": [], "attached": 0,
         "conditions": [("Accepted", "False", "UnsupportedProtocol")]}])
    mixed = gateway(statuses, "gateway-supported-and-unsupported-protocols")
    assert has_condition(mixed["conditions"], "Accepted", "True", "ListenersNotValid")
    listeners_match(mixed["listeners"], [
        {"name": "http", "kinds": ["HTTPRoute"], "attached": 0, "conditions": [("Accepted", "True", "Accepted")]},
        {"name": "invalid", "kinds": [], "attached": 0, "conditions": [("Accepted", "False", "UnsupportedProtocol")]},
    ])


@pytest.mark.parametrize("name", ["gateway-certificate-nonexistent-secret", "gateway-certificate-unsupported-group",
                                  "gateway-certificate-unsupported-kind", "gateway-certificate-malformed-secret"])
def test_gateway_invalid_tls_configuration(name: str) -> None:
    statuses = load_case("gateway-invalid-tls-configuration.yaml")
    listeners_match(gateway(statuses, name)["listeners"], [
        {"name": "https", "kinds": ["HTTPRoute"], "attached": 0,
         "conditions": [("ResolvedRefs", "False", "InvalidCertificateRef")]}])


@pytest.mark.parametrize("case,ok", [("gateway-secret-missing-reference-grant.yaml", False),
                                     ("gateway-secret-invalid-reference-grant.yaml", False),
                                     ("gateway-secret-reference-grant-all-in-namespace.yaml", True),
                                     ("gateway-secret-reference-grant-specific.yaml", True)])
def test_gateway_secret_reference_grants(case: str, ok: bool) -> None:
    statuses = load_case(case)
    name = case[: -len(".yaml")]
    conditions = ([("Programmed", "True", "Programmed"), ("ResolvedRefs", "True")] if ok
                  else [("ResolvedRefs", "False", "RefNotPermitted")])
    listeners_match(gateway(statuses, name)["listeners"], [
        {"name": "https", "kinds": ["HTTPRoute"], "attached": 0, "conditions": conditions}])


def test_gateway_with_attached_routes() -> None:
    statuses = load_case("gateway-with-attached-routes.yaml")
    ok = [("Accepted", "True"), ("ResolvedRefs", "True")]
    listeners_match(gateway(statuses, "gateway-with-one-attached-route")["listeners"], [
        {"name": "http", "kinds": ["HTTPRoute"], "attached": 1, "conditions": ok}])
    listeners_match(gateway(statuses, "gateway-with-two-attached-routes")["listeners"], [
        {"name": "http", "kinds": ["HTTPRoute"], "attached": 2, "conditions": ok}])
    assert has_condition(route_parent(statuses, "HTTPRoute", INFRA, "http-route-not-accepted", INFRA,
                                      "gateway-with-two-attached-routes"),
                         "Accepted", "False", "NoMatchingListenerHostname")
    unresolved = "unresolved-gateway-with-one-attached-unresolved-route"
    listeners_match(gateway(statuses, unresolved)["listeners"], [
        {"name": "tls", "kinds": ["HTTPRoute"], "attached": 1,
         "conditions": [("Programmed", "False"), ("ResolvedRefs", "False")]}])
    assert has_condition(route_parent(statuses, "HTTPRoute", INFRA, "http-route-4", INFRA, unresolved),
                         "ResolvedRefs", "False")


def test_gateway_with_attached_routes_with_port_8080() -> None:
    statuses = load_case("gateway-with-attached-routes-with-port-8080.yaml")
    ok = [("Accepted", "True"), ("ResolvedRefs", "True")]
    listeners_match(gateway(statuses, "gateway-with-two-listeners-and-one-attached-route")["listeners"], [
        {"name": "http-unattached", "kinds": ["HTTPRoute"], "attached": 0, "conditions": ok},
        {"name": "http", "kinds": ["HTTPRoute"], "attached": 1, "conditions": ok}])


def test_gateway_invalid_parameters_ref() -> None:
    statuses = load_case("gateway-invalid-parameters-ref.yaml")
    (status,) = [s for k, s in statuses.items() if k.kind == "Gateway" and "parameters" in k.name]
    assert has_condition(status["conditions"], "Accepted", "False", "InvalidParameters")


def test_httproute_hostname_intersection() -> None:
    statuses = load_case("httproute-hostname-intersection.yaml")
    ns = INFRA
    gw = "httproute-hostname-intersection"
    for route in ["specific-host-matches-listener-specific-host", "specific-host-matches-listener-wildcard-host",
                  "wildcard-host-matches-listener-specific-host", "wildcard-host-matches-listener-wildcard-host"]:
        assert has_condition(route_parent(statuses, "HTTPRoute", ns, route, ns, gw), "Accepted", "True"), route
    assert has_condition(route_parent(statuses, "HTTPRoute", ns, "no-intersecting-hosts", ns, gw),
                         "Accepted", "False", "NoMatchingListenerHostname")
    ok = [("Accepted", "True"), ("ResolvedRefs", "True")]
    listeners = gateway(statuses, gw, ns)["listeners"]
    expected = {"listener-1": 2, "listener-2": 1, "listener-3": 1}  # the counts in the Go case
    for listener in listeners:
        if listener["name"] in expected:
            assert listener["attachedRoutes"] == expected[listener["name"]], listener["name"]
            for cond in ok:
                assert has_condition(listener["conditions"], *cond)


def test_gateway_static_addresses_with_an_unsupported_type_is_not_accepted() -> None:
    text = (SUITE / "tests" / "gateway-static-addresses.yaml").read_text()
    # The suite replaces these placeholders with addresses the implementation can and cannot use.
    text = text.replace('value: "PLACEHOLDER_UNUSABLE_ADDRS"', 'value: "192.0.2.77"')
    text = text.replace('value: "PLACEHOLDER_USABLE_ADDRS"', 'value: "127.0.0.1"')
    loaded = load_text(GATEWAY_CLASS + "---\n" + text.replace("{GATEWAY_CLASS_NAME}", "tidegate-conformance"), "x")
    assert not loaded.errors, [str(e) for e in loaded.errors]
    status = translate(loaded.resources).statuses[Key("Gateway", INFRA, "gateway-static-addresses")]
    assert has_condition(status["conditions"], "Accepted", "False", "UnsupportedAddress")


# TCPRoute, UDPRoute and TLSRoute: (case file, route kind, route name, gateway name, condition). Every route
# and Gateway of these cases is in the infra namespace.
L4_ROUTE_CASES = [
    ("tcproute-invalid-backendref-nonexistent.yaml", "TCPRoute", "tcp-route-invalid-backend-ref-nonexistent",
     "tcp-gateway-invalid-backend", ("ResolvedRefs", "False", "BackendNotFound")),
    ("tcproute-invalid-cross-namespace-backend-ref.yaml", "TCPRoute", "tcp-invalid-cross-namespace-backend-ref",
     "tcp-invalid-cross-namespace-backend-ref-gateway", ("ResolvedRefs", "False", "RefNotPermitted")),
    ("tcproute-invalid-cross-namespace-backend-ref.yaml", "TCPRoute", "tcp-invalid-cross-namespace-backend-ref",
     "tcp-invalid-cross-namespace-backend-ref-gateway", ("Accepted", "True", "Accepted")),
    ("tcproute-invalid-non-tcp-listener.yaml", "TCPRoute", "tcp-route", "tcp-mixed-protocol-gateway",
     ("Accepted", "False", "NotAllowedByListeners")),
    ("tcproute-parentref-attach-all.yaml", "TCPRoute", "tcp-route-attach-all", "tcp-attach-all-gateway",
     ("Accepted", "True", "Accepted")),
    ("tcproute-reference-grant.yaml", "TCPRoute", "tcp-reference-grant", "tcp-reference-grant-gateway",
     ("ResolvedRefs", "True", "ResolvedRefs")),
    ("tcproute-weighted-routing.yaml", "TCPRoute", "tcp-weighted-route", "tcp-weighted-gateway",
     ("Accepted", "True", "Accepted")),
    ("udproute-invalid-backendref-nonexistent.yaml", "UDPRoute", "udp-route-invalid-backend-ref-nonexistent",
     "udp-gateway-invalid-backend", ("ResolvedRefs", "False", "BackendNotFound")),
    ("udproute-invalid-cross-namespace-backend-ref.yaml", "UDPRoute", "udp-route-invalid-cross-namespace-backend-ref",
     "udp-gateway-invalid-cross-namespace-backend-ref", ("ResolvedRefs", "False", "RefNotPermitted")),
    ("udproute-not-allowed-by-listeners.yaml", "UDPRoute", "udproute-not-allowed-by-listeners",
     "udproute-tls-only-gateway", ("Accepted", "False", "NotAllowedByListeners")),
    ("udproute-reference-grant.yaml", "UDPRoute", "udp-route-reference-grant", "udp-gateway-reference-grant",
     ("ResolvedRefs", "True", "ResolvedRefs")),
    ("udproute-simple.yaml", "UDPRoute", "udp-coredns", "udp-gateway", ("Accepted", "True", "Accepted")),
    ("tlsroute-invalid-backendref-nonexistent.yaml", "TLSRoute", "invalid-backend-ref-nonexistent",
     "gateway-tlsroute-invalid-backend-ref-nonexistent", ("ResolvedRefs", "False", "BackendNotFound")),
    ("tlsroute-invalid-backendref-unknown-kind.yaml", "TLSRoute", "invalid-backend-ref-unknown-kind",
     "gateway-tlsroute-invalid-backend-ref-unknown-kind", ("ResolvedRefs", "False", "InvalidKind")),
    ("tlsroute-invalid-no-matching-listener-hostname.yaml", "TLSRoute", "tlsroute-hostname-mismatch-1",
     "gateway-tls-exact-hostname", ("Accepted", "False", "NoMatchingListenerHostname")),
    ("tlsroute-invalid-no-matching-listener-hostname.yaml", "TLSRoute", "tlsroute-hostname-mismatch-2",
     "gateway-tls-wildcard-hostname", ("Accepted", "False", "NoMatchingListenerHostname")),
    ("tlsroute-invalid-no-matching-listener.yaml", "TLSRoute", "tlsroute-not-allowed-protocol-http",
     "gateway-tlsroute-http-only", ("Accepted", "False", "NotAllowedByListeners")),
    ("tlsroute-invalid-no-matching-listener.yaml", "TLSRoute", "tlsroute-not-allowed-protocol-https",
     "gateway-tlsroute-https-only", ("Accepted", "False", "NotAllowedByListeners")),
    ("tlsroute-invalid-no-matching-listener.yaml", "TLSRoute", "tlsroute-no-matching-section-name",
     "gateway-tlsroute-tls-passthrough-only", ("Accepted", "False", "NoMatchingParent")),
    ("tlsroute-invalid-reference-grant.yaml", "TLSRoute", "gateway-conformance-infra-test",
     "gateway-tlsroute-referencegrant", ("ResolvedRefs", "False", "RefNotPermitted")),
    ("tlsroute-simple-same-namespace.yaml", "TLSRoute", "gateway-conformance-infra-test", "gateway-tlsroute",
     ("Accepted", "True", "Accepted")),
    ("tlsroute-terminate-simple-same-namespace.yaml", "TLSRoute", "tlsroute-terminated-test",
     "gateway-tlsroute-terminate", ("Accepted", "True", "Accepted")),
]


@pytest.mark.parametrize("case,kind,route,gw,cond", L4_ROUTE_CASES,
                         ids=[f"{c[0][:-5]}-{c[4][0]}" for c in L4_ROUTE_CASES])
def test_l4_route_condition(case: str, kind: str, route: str, gw: str, cond: tuple) -> None:
    statuses = load_case(case)
    assert has_condition(route_parent(statuses, kind, INFRA, route, INFRA, gw), *cond)


def newer_route(kind: str, name: str, gw: str, backend: str, port: int) -> str:
    """The route the multiple-routes-attachment cases apply after their manifests (a second later)."""
    version = "v1alpha2" if kind in ("TCPRoute", "UDPRoute") else "v1"
    return (f"apiVersion: gateway.networking.k8s.io/{version}\nkind: {kind}\n"
            f"metadata: {{name: {name}, namespace: {INFRA}, creationTimestamp: '2099-01-01T00:00:00Z'}}\n"
            f"spec:\n  parentRefs: [{{name: {gw}, sectionName: {kind[:3].lower()}}}]\n"
            f"  rules: [{{backendRefs: [{{name: {backend}, port: {port}}}]}}]\n")


@pytest.mark.parametrize("kind", ["TCPRoute", "UDPRoute"])
def test_two_routes_on_one_l4_listener_are_both_accepted_and_both_counted(kind: str) -> None:
    """Both routes are Accepted and the listener counts 2; only the oldest gets traffic (the data plane's
    part: tests/test_l4.py)."""
    prefix = kind[:3].lower()
    gw = f"{prefix}-multi-route-attach-gateway"
    statuses = load_case(f"{prefix}route-multiple-routes-attachment.yaml",
                         newer_route(kind, f"{prefix}route-attach-newer", gw, f"{prefix}-attach-backend-2", 3000))
    for route in (f"{prefix}route-attach-older", f"{prefix}route-attach-newer"):
        assert has_condition(route_parent(statuses, kind, INFRA, route, INFRA, gw), "Accepted", "True", "Accepted")
    listeners_match(gateway(statuses, gw)["listeners"], [
        {"name": prefix, "kinds": [kind], "attached": 2, "conditions": [("Accepted", "True", "Accepted")]}])


def test_udproute_attaches_to_every_listener() -> None:
    statuses = load_case("udproute-parentref-attach-all-listeners.yaml")
    ok = [("Accepted", "True"), ("ResolvedRefs", "True")]
    listeners_match(gateway(statuses, "udp-attach-all-listeners-gateway")["listeners"], [
        {"name": name, "kinds": ["UDPRoute"], "attached": 1, "conditions": ok} for name in ("udp-1", "udp-2", "udp-3")])


def test_tls_listeners_terminate_or_pass_through_but_not_both_on_one_port() -> None:
    statuses = load_case("tlsroute-listener-mixed-termination-not-supported.yaml")
    conflict = [("Accepted", "False", "ProtocolConflict")]
    listeners_match(gateway(statuses, "gateway-tlsroute-mixed-termination-not-supported")["listeners"], [
        {"name": "tls-terminate", "kinds": ["TLSRoute"], "attached": 0, "conditions": conflict},
        {"name": "tls-passthrough", "kinds": ["TLSRoute"], "attached": 0, "conditions": conflict}])
    # TLS Terminate is served (TLSRouteModeTerminate): accepted, with TLSRoute its kind.
    statuses = load_case("tlsroute-listener-terminate-supported-kinds.yaml")
    listeners_match(gateway(statuses, "gateway-tlsroute-terminate-supported")["listeners"], [
        {"name": "tls-terminate", "kinds": ["TLSRoute"], "attached": 0, "conditions": [("Accepted", "True", "Accepted")]}])
    statuses = load_case("tlsroute-listener-passthrough-supported-kinds.yaml")
    listeners_match(gateway(statuses, "gateway-tlsroute-passthrough-supported-kind")["listeners"], [
        {"name": "tls-passthrough", "kinds": ["TLSRoute"], "attached": 0,
         "conditions": [("ResolvedRefs", "False", "InvalidRouteKinds")]}])
