"""The official Gateway API conformance cases (profile GATEWAY-HTTP), ported to run without a cluster.

For every case the harness loads the suite's base manifests and the case's manifests through tidegate's file
source (one running `tidegate run`, the case file swapped in turn: each case is also a hot reload), points
EndpointSlices of every Service at echo "pods" on 127.0.2.x, gives each Gateway its own 127.0.1.x address, and
sends the requests written in the case's Go file, comparing as the suite's CompareRoundTrip does. Cases that
need what tidegate does not have yet are listed in NOT_YET with the reason. The run writes a report in the
shape of the official ConformanceReport (test-artifacts/conformance-report.yaml; with TIDEGATE_UPDATE_REPORT=1
also conformance/REPORT.yaml in the repo).
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.certs import ca_and_leaf, ca_and_leaves, tls_secret_pem_yaml, tls_secret_yaml
from tests.conformance.golit import INFRA, WEB, Expectation, GoCase, read_cases
from tests.conformance.mutations import MUTATION_CASES
from tests.harness import echo_servers, h2_request, tidegate_run

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT.parent / "shared" / "gateway-api" / "conformance"
pytestmark = pytest.mark.skipif(not SUITE.exists(), reason=f"conformance suite not found at {SUITE}")

CLASS = "tidegate-conformance"
CASE_FILES = ["httproute-*.go", "gateway-*.go", "gatewayclass-*.go", "backendtlspolicy*.go"]
CONSECUTIVE = 3  # RequiredConsecutiveSuccesses in the suite's default timeouts
MAX_WAIT = 15.0

# Cases whose Go test needs something tidegate does not have yet, or that are not about HTTP traffic.
NOT_YET = {
    "GatewayInfrastructure": "a cluster feature tidegate does not have: it checks labels and annotations on the "
                             "per-Gateway objects (Deployment, Service) a provisioning controller creates; tidegate "
                             "serves every Gateway from its own processes and creates none",
}


def _gateway_status_checks() -> dict[str, Callable[[], None]]:
    """Status-only Gateway cases: the checks of tests/test_conformance_status.py, by ShortName."""
    import tests.test_conformance_status as status

    tls_names = ["gateway-certificate-nonexistent-secret", "gateway-certificate-unsupported-group",
                 "gateway-certificate-unsupported-kind", "gateway-certificate-malformed-secret"]
    grants = {"GatewaySecretMissingReferenceGrant": ("gateway-secret-missing-reference-grant.yaml", False),
              "GatewaySecretInvalidReferenceGrant": ("gateway-secret-invalid-reference-grant.yaml", False),
              "GatewaySecretReferenceGrantAllInNamespace": ("gateway-secret-reference-grant-all-in-namespace.yaml",
                                                            True),
              "GatewaySecretReferenceGrantSpecific": ("gateway-secret-reference-grant-specific.yaml", True)}
    checks: dict[str, Callable[[], None]] = {
        "GatewayInvalidRouteKind": status.test_gateway_invalid_route_kind,
        "GatewayListenerUnsupportedProtocol": status.test_gateway_listener_unsupported_protocol,
        "GatewayInvalidTLSConfiguration": lambda: [status.test_gateway_invalid_tls_configuration(n) for n in tls_names],
        "GatewayWithAttachedRoutes": status.test_gateway_with_attached_routes,
        "GatewayWithAttachedRoutesWithPort8080": status.test_gateway_with_attached_routes_with_port_8080,
        "GatewayInvalidParametersRef": status.test_gateway_invalid_parameters_ref,
    }
    for name, (manifest, ok) in grants.items():
        checks[name] = lambda manifest=manifest, ok=ok: status.test_gateway_secret_reference_grants(manifest, ok)
    return checks
def _misdirected_table() -> list[Expectation]:
    """HTTPRouteHTTPSListenerDetectMisdirectedRequests builds its requests from a table: read it from the Go
    file. Every request goes over HTTP/2 (ALPN h2) with the row's TLS server name."""
    text = (SUITE / "tests" / "httproute-https-listener-detect-misdirected-requests.go").read_text() \
        if SUITE.exists() else ""
    rows = []
    for m in re.finditer(r'\{serverName:\s*"([^"]+)",\s*host:\s*"([^"]+)",\s*statusCode:\s*(\d+)'
                         r'(?:,\s*backend:\s*confsuite\.InfraBackendServiceName(V\d))?\}', text):
        sni, host, code, version = m.groups()
        rows.append(Expectation(
            {"Request": {"Host": host, "Path": "/detect-misdirected-requests", "Protocol": "HTTP/2"},
             "Response": {"StatusCodes": [int(code)]},
             "Backend": f"infra-backend-{version.lower()}" if version else "", "Namespace": INFRA},
            "same-namespace-with-https-listener", "tls.Make", sni))
    return rows


# Cases whose requests the Go file builds in a loop over a table of its own: written out here, unchanged.
HANDPORTED = {
    "HTTPRouteHTTPSListenerDetectMisdirectedRequests": _misdirected_table(),
    "HTTPRouteHTTPSListener": [
        Expectation({"Request": {"Host": host, "Path": "/"}, "Response": {"StatusCode": code}, "Backend": backend,
                     "Namespace": INFRA}, "same-namespace-with-https-listener", "tls.Make", "@host")
        for host, code, backend in [("example.org", 200, "infra-backend-v1"), ("unknown-example.org", 404, ""),
                                    ("second-example.org", 200, "infra-backend-v2")]],
    # gateway-with-clientcertificate-validation*.go: requests to the listeners on 443 (default CA) and 8443
    # (per-port CA) with one client certificate or the other, or none.
    "GatewayFrontendClientCertificateValidation": [
        Expectation({"Request": {"Host": host, "Path": "/"}, "Response": {"StatusCode": 200}, "Namespace": INFRA,
                     "Backend": "infra-backend-v1" if port == 443 else "infra-backend-v2"},
                    "client-validation-default", "tls.Make", host, client_cert=cert, port=port, expect_failure=not ok)
        for host, port, cert, ok in [("example.org", 443, "default", True), ("example.org", 443, "per-port", False),
                                     ("second-example.org", 8443, "per-port", True),
                                     ("second-example.org", 8443, "default", False)]],
    "GatewayFrontendClientCertificateValidationInsecureFallback": [
        Expectation({"Request": {"Host": host, "Path": "/"}, "Response": {"StatusCode": 200}, "Namespace": INFRA,
                     "Backend": "infra-backend-v1" if port == 443 else "infra-backend-v2"},
                    "client-validation-insecure-fallback", "tls.Make", host, client_cert=cert,
                    port=port)
        for host, port, cert in [("example.org", 443, "default"), ("example.org", 443, "per-port"),
                                 ("example.org", 443, ""), ("second-example.org", 8443, "per-port"),
                                 ("second-example.org", 8443, "default"), ("second-example.org", 8443, "")]],
    "GatewayFrontendInvalidDefaultClientCertificateValidation": [
        Expectation({"Request": {"Host": "example.org", "Path": "/"}, "Response": {"StatusCode": 200},
                     "Backend": "infra-backend-v1", "Namespace": INFRA},
                    "invalid-default-client-validation-config", "http.Make", port=80),
        Expectation({"Request": {"Host": "example.org", "Path": "/"}, "Namespace": INFRA},
                    "invalid-default-client-validation-config", "tls.Make", "example.org", port=443,
                    expect_failure=True)],
    # backendtlspolicy-invalid-*.go loop over their policies: a request to each policy's path fails.
    **{case: [Expectation({"Request": {"Host": "abc.example.com", "Path": f"/backendtlspolicy-{policy}"},
                           "Response": {"StatusCodes": [500, 502, 503]}, "Namespace": INFRA},
                          "same-namespace", "http.Make") for policy in policies]
       for case, policies in (("BackendTLSPolicyInvalidCACertificateRef",
                               ("nonexistent-ca-certificate-ref", "malformed-ca-certificate-ref")),
                              ("BackendTLSPolicyInvalidKind", ("invalid-kind",)))},
    "HTTPRouteServiceTypes": [
        Expectation({"Request": {"Path": f"/{path}"}, "Response": {"StatusCode": 200},
                     "Backend": "infra-backend-v1", "Namespace": INFRA}, "same-namespace", "http.Make")
        for path in ("manual-endpointslices", "headless-manual-endpointslices", "headless")],
}

# Cases whose Go test checks a traffic split with weight.TestWeightedDistribution: the weights it expects.
WEIGHTS = {
    "HTTPRouteWeight": {"infra-backend-v1": 0.7, "infra-backend-v2": 0.3, "infra-backend-v3": 0.0},
}
def _websocket_case(stack) -> list[str]:
    """HTTPRouteBackendProtocolWebSocket: a text and a binary message echoed through the gateway, three times
    in a row."""
    from websockets.sync.client import connect

    ip = stack["layout"].gateway_ips[(INFRA, "same-namespace")]
    streak, last, deadline = 0, "", time.monotonic() + MAX_WAIT
    while streak < CONSECUTIVE and time.monotonic() < deadline:
        try:
            with connect(f"ws://{ip}/ws", open_timeout=5, origin="ws://gateway/HTTPRouteBackendProtocolWebSocket") as ws:
                ws.send("Websocket Support!")
                text = ws.recv(timeout=5)
                ws.send(bytes([1, 2, 3, 4, 5, 6, 7]))
                binary = ws.recv(timeout=5)
            last = "" if (text, binary) == ("Websocket Support!", bytes([1, 2, 3, 4, 5, 6, 7])) else \
                f"unexpected replies {text!r}, {binary!r}"
        except Exception as exc:  # any failure to dial or exchange counts, as in the Go case
            last = f"websocket: {exc}"
        streak = 0 if last else streak + 1
        if last:
            time.sleep(0.2)
    return [last] if last else []


def _retry_table() -> list[tuple[str, dict[str, str], int]]:
    """HTTPRouteRetry's table (path, retry-simulation query, expected status), read from its Go file."""
    text = (SUITE / "tests" / "httproute-retry.go").read_text() if SUITE.exists() else ""
    rows = []
    for m in re.finditer(r'path:\s*"([^"]+)",\s*retrySimulationConfig:\s*url\.Values\{(.*?)\},\s*\},\s*'
                         r'want:\s*http\.Response\{StatusCode:\s*(\d+)\}', text, re.DOTALL):
        values = dict(re.findall(r'"(\w+)":\s*\[\]string\{"([^"]*)"\}', m.group(2)))
        rows.append((m.group(1), values, int(m.group(3))))
    return rows


def _retry_case(stack, case: GoCase) -> list[str]:
    """assertConsistentRetryBehaviour: each probe has a fresh uuid, so the echo server's retry simulation
    counts its attempts afresh; three probes in a row must give the expected status."""
    import uuid
    from urllib.parse import urlencode

    ip = stack["layout"].gateway_ips[(INFRA, "same-namespace")]
    failures = []
    rows = _retry_table()
    if len(rows) < 10:
        return [f"read only {len(rows)} rows from httproute-retry.go"]
    for path, values, want in rows:
        streak, last, deadline = 0, "", time.monotonic() + MAX_WAIT
        while streak < CONSECUTIVE and time.monotonic() < deadline:
            query = urlencode({**values, "uuid": str(uuid.uuid4())})
            literal = {"Request": {"Path": f"{path}?{query}"}, "Response": {"StatusCode": want},
                       "Backend": "infra-backend-v3", "Namespace": INFRA}
            try:
                status, headers, body = _send(ip, 80, literal)
                last = compare(literal, status, headers, body, literal["Request"]["Path"])
            except OSError as exc:
                last = str(exc)
            streak = 0 if last else streak + 1
        if last:
            failures.append(f"{path} {values}: {last}")
    return failures


PERCENT_MIRROR_CASES = {"HTTPRouteRequestPercentageMirror"}


def _percentage_mirror(stack, exp: Expectation) -> str:
    """testMirroredRequestsDistribution: 500 requests (10 at a time) with a fresh request id; the mirror must
    see a share within 3 standard deviations of its percent; up to 5 rounds."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    total, rounds = 500, 5
    ip = stack["layout"].gateway_ips[(INFRA, exp.gateway or "same-namespace")]
    problem = ""
    for _ in range(rounds):
        path = f"{exp.literal['Request']['Path']}?gateway-api-conformance-request-id={uuid.uuid4()}"
        literal = json.loads(json.dumps(exp.literal))
        literal["Request"]["Path"] = path
        if literal.get("ExpectedRequest"):
            literal["ExpectedRequest"]["Request"]["Path"] = path

        def one(_: int) -> str:
            status, headers, body = _send(ip, 80, literal)
            return compare(literal, status, headers, body, path)

        with ThreadPoolExecutor(10) as pool:
            bad = [p for p in pool.map(one, range(total)) if p]
        if bad:
            return bad[0]
        time.sleep(0.5)  # mirrors are fire and forget: let the last ones land
        problems = []
        for mirror in literal["MirroredTo"]:
            ref = mirror.get("BackendRef") or mirror
            prefix = f"request {ref.get('Namespace') or INFRA}/{ref['Name']}-pod-"
            seen = sum(1 for line in stack["echo_log"].read_text().splitlines()
                       if line.startswith(prefix) and line.endswith(f" {path}"))
            p = float(mirror["Percent"]) / 100
            margin = 3.0 * (total * p * (1 - p)) ** 0.5
            if not total * p - margin <= seen <= total * p + margin:
                problems.append(f"{ref['Name']} saw {seen} of {total} mirrored, expected {total * p:.0f} ±{margin:.0f}")
        problem = "; ".join(problems)
        if not problem:
            return ""
    return problem


# Cases whose Go test sends 100 requests and checks that the per-backend filter's "Backend" header names
# the pod that answered.
BACKEND_HEADER_CASES = {"HTTPRouteRequestHeaderModifierBackendWeights"}
WEIGHT_REQUESTS, WEIGHT_TOLERANCE, WEIGHT_RETRIES, WEIGHT_CONCURRENCY = 500, 0.05, 3, 10


# Changes a case's Go test makes to the cluster between its requests: before request N, drop documents
# (kind, name) from the case's manifests.
MUTATIONS = {
    "HTTPRouteReferenceGrant": {1: [("ReferenceGrant", "reference-grant")]},
}


def _cases() -> list[GoCase]:
    cases: list[GoCase] = []
    if not SUITE.exists():
        return cases
    for pattern in CASE_FILES:
        for path in sorted((SUITE / "tests").glob(pattern)):
            cases += read_cases(path)
    return cases


CASES = _cases()


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text.replace("{GATEWAY_CLASS_NAME}", CLASS)) if d]


class Layout:
    """Addresses for every Gateway and every Service pod the base and case manifests mention."""

    def __init__(self) -> None:
        self.gateway_ips: dict[tuple[str, str], str] = {}
        self.pods: dict[tuple[str, str], tuple[str, int]] = {}  # (ns, service) → (pod ip, unused)
        self.listen: set[tuple[str, int]] = set()  # every (pod ip, targetPort) an echo server must answer on
        self.tls_ips: set[str] = set()  # pods of the suite's tls-backend Deployments: they serve TLS
        texts = [(SUITE / "base" / "manifests.yaml").read_text()]
        texts += [(SUITE / m).read_text() for c in CASES for m in c.manifests if (SUITE / m).exists()]
        for text in texts:
            for doc in _docs(text):
                meta = doc.get("metadata") or {}
                key = (meta.get("namespace", "default"), meta.get("name", ""))
                if doc.get("kind") == "Gateway" and key not in self.gateway_ips:
                    n = len(self.gateway_ips) + 1
                    self.gateway_ips[key] = f"127.0.1.{n}"
                elif doc.get("kind") == "Service" and key not in self.pods:
                    if not (doc.get("spec") or {}).get("selector"):
                        continue  # EndpointSlices written by hand (or by the case's Go test), not a Deployment
                    app = doc["spec"]["selector"].get("app", key[1])
                    if app != key[1] and (key[0], app) in self.pods:
                        self.pods[key] = self.pods[(key[0], app)]  # another Service over the same pods
                        continue
                    n = len(self.pods) + 1
                    self.pods[key] = (f"127.0.2.{n}", 0)
                    if app.startswith("tls-backend") and key[0] == INFRA:
                        self.tls_ips.add(f"127.0.2.{n}")
                    for port in (doc.get("spec") or {}).get("ports") or [{}]:
                        target = port.get("targetPort", port.get("port", 3000))
                        self.listen.add((f"127.0.2.{n}", int(target) if str(target).isdigit() else 3000))

    def rewrite(self, text: str) -> str:
        """Give Gateways their addresses and Services their EndpointSlices."""
        out = []
        for doc in _docs(text):
            kind, meta = doc.get("kind"), doc.get("metadata") or {}
            key = (meta.get("namespace", "default"), meta.get("name", ""))
            if kind in ("Deployment", "ConfigMap"):
                continue  # the pods are the echo servers
            if kind == "Gateway" and key in self.gateway_ips and not doc["spec"].get("addresses"):
                doc["spec"]["addresses"] = [{"type": "IPAddress", "value": self.gateway_ips[key]}]
            out.append(doc)
            if kind == "EndpointSlice" and not doc.get("endpoints") and doc.get("addressType") == "IPv4":
                # What setupEndpointSlices in HTTPRouteServiceTypes does: fill hand-written slices with the
                # pods of infra-backend-v1.
                ip, _ = self.pods[(INFRA, "infra-backend-v1")]
                doc["endpoints"] = [{"addresses": [ip], "conditions": {"ready": True},
                                     "targetRef": {"kind": "Pod", "name": "infra-backend-v1-pod-0"}}]
            if kind == "Service" and key in self.pods:
                ip, _ = self.pods[key]
                ports = (doc.get("spec") or {}).get("ports") or []
                owner = doc["spec"]["selector"].get("app", key[1])
                out.append({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": f"{key[1]}-pods", "namespace": key[0],
                                 "labels": {"kubernetes.io/service-name": key[1]}},
                    "addressType": "IPv4",
                    "ports": [{"name": p.get("name", ""), "protocol": p.get("protocol", "TCP"),
                               "port": int(p.get("targetPort", p.get("port", 3000)))
                               if str(p.get("targetPort", p.get("port", 3000))).isdigit() else 3000}
                              for p in ports] or [{"port": 3000}],
                    "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                                   "targetRef": {"kind": "Pod", "name": f"{owner}-pod-0", "namespace": key[0]}}],
                })
        return yaml.safe_dump_all(out, sort_keys=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conformance")
    layout = Layout()
    config = tmp / "config"
    config.mkdir()
    (config / "00-class.yaml").write_text(
        f"apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {CLASS}}}\n"
        "spec: {controllerName: tidegate.io/gateway-controller}\n")
    (config / "01-base.yaml").write_text(layout.rewrite((SUITE / "base" / "manifests.yaml").read_text()))
    secrets = [tls_secret_yaml(WEB, "certificate", ["*"]),
               tls_secret_yaml(INFRA, "tls-validity-checks-certificate", ["*", "*.org", "*.wildcard.org"])]
    # The CAs (ConfigMaps) and client certificates the suite makes for frontend client validation.
    client_certs: dict[str, tuple[Path, Path]] = {}
    for configmap, client in (("tls-validity-checks-ca-certificate", "default"),
                              ("tls-validity-checks-per-port-ca-certificate", "per-port")):
        ca, cert, key = ca_and_leaf([f"{client}.client.example"])
        (tmp / f"{client}.pem").write_bytes(cert)
        (tmp / f"{client}.key").write_bytes(key)
        client_certs[client] = (tmp / f"{client}.pem", tmp / f"{client}.key")
        secrets.append(f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {configmap}, namespace: {INFRA}}}\n"
                       "data:\n  ca.crt: |\n" + "".join(f"    {line}\n" for line in ca.decode().splitlines()))
    # The suite's tls-backend pods serve "tls-checks-certificate", signed by the CA in the ConfigMap
    # "tls-checks-ca-certificate"; "mismatch-ca-certificate" holds an unrelated CA.
    tls_ca, ((tls_cert, tls_key), (client_cert, client_key)) = ca_and_leaves(
        [["abc.example.com", "spiffe://abc.example.com/test-identity", "other.example.com"], ["gateway.client"]])
    (tmp / "tls-backend.pem").write_bytes(tls_cert)
    (tmp / "tls-backend.key").write_bytes(tls_key)
    (tmp / "tls-ca.pem").write_bytes(tls_ca)
    # The client certificate Gateways present to those pods (spec.tls.backend), signed by the same CA.
    secrets.append(tls_secret_pem_yaml(INFRA, "tls-checks-client-certificate", client_cert, client_key))
    for configmap, pem in (("tls-checks-ca-certificate", tls_ca), ("mismatch-ca-certificate", ca_and_leaf(["x"])[0])):
        secrets.append(f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {configmap}, namespace: {INFRA}}}\n"
                       "data:\n  ca.crt: |\n" + "".join(f"    {line}\n" for line in pem.decode().splitlines()))
    (config / "02-secrets.yaml").write_text("---\n".join(secrets))
    owners = {ip: f"{ns}/{svc}-pod-0" for (ns, svc), (ip, _) in reversed(list(layout.pods.items()))}
    pods = {(ip, port): owners[ip] for ip, port in sorted(layout.listen) if ip not in layout.tls_ips}
    tls_pods = {(ip, port): owners[ip] + "+tls" for ip, port in sorted(layout.listen) if ip in layout.tls_ips}
    first_gateway = layout.gateway_ips[(INFRA, "same-namespace")]
    tls_args = ("--tls-cert", str(tmp / "tls-backend.pem"), "--tls-key", str(tmp / "tls-backend.key"),
                "--tls-client-ca", str(tmp / "tls-ca.pem"))
    with echo_servers(pods, tmp / "echo.log") as _echo, \
            echo_servers(tls_pods, tmp / "echo-tls.log", *tls_args) as _tls_echo, \
            tidegate_run(config, (first_gateway, 80), tmp / "tidegate.log"):
        yield {"layout": layout, "config": config, "echo_log": tmp / "echo.log", "tmp": tmp,
               "tidegate_log": tmp / "tidegate.log", "client_certs": client_certs,
               "pems": {"@tls-checks-client-certificate": client_cert.decode()}}
    _write_report(RESULTS)


RESULTS: dict[str, tuple[str, str]] = {}  # ShortName → (result, note)


def _listener_ports(config: Path, gateway: str, protocol: str) -> list[int]:
    for path in sorted(config.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Gateway" and doc["metadata"]["name"] == gateway:
                return [int(l["port"]) for l in doc["spec"]["listeners"] if l["protocol"] == protocol]
    return [443 if protocol == "HTTPS" else 80]


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS to an IP address with a chosen SNI; the certificate is the suite's self-signed one."""

    def __init__(self, ip: str, port: int, server_name: str, client_cert: tuple[Path, Path] | None = None):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if client_cert:
            ctx.load_cert_chain(*client_cert)
        super().__init__(ip, port, timeout=10, context=ctx)
        self.server_name = server_name

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.server_name)  # type: ignore[attr-defined]


def _send(ip: str, port: int, expected: dict, server_name: str = "",
          client_cert: tuple[Path, Path] | None = None) -> tuple[int, dict[str, list[str]], bytes]:
    req = expected.get("Request") or {}
    method = req.get("Method") or "GET"
    path = req.get("Path") or "/"
    default_port = 443 if server_name else 80
    host = req.get("Host") or (ip if port == default_port else f"{ip}:{port}")
    headers = dict(req.get("Headers") or {})
    backend_set = expected.get("BackendSetResponseHeaders") or {}
    headers["X-Echo-Set-Header"] = ",".join(f"{k}:{v}" for k, v in backend_set.items())
    if req.get("Protocol") in ("HTTP/2", "H2C"):
        status, h2_headers, body = h2_request(ip, port, host, path, method, (req.get("Body") or "").encode(),
                                              tls_server_name=server_name or None)
        return status, {k: [v] for k, v in h2_headers.items()}, body
    conn = _TLSConnection(ip, port, server_name, client_cert) if server_name else \
        http.client.HTTPConnection(ip, port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for name, value in headers.items():
            conn.putheader(name, value)
        body = (req.get("Body") or "").encode()
        if body:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        got: dict[str, list[str]] = {}
        for name, value in resp.getheaders():
            got.setdefault(name.lower(), []).append(value)
        return resp.status, got, resp.read()
    finally:
        conn.close()


def compare(expected: dict, status: int, headers: dict[str, list[str]], body: bytes, path_sent: str,
            scheme: str = "http") -> str:
    """The suite's CompareRoundTrip, returning "" on success or what differed."""
    response = expected.get("Response") or {}
    codes = list(response.get("StatusCodes") or [])
    if response.get("StatusCode") and response["StatusCode"] not in codes:
        codes.append(response["StatusCode"])
    codes = codes or [200]
    if status not in codes:
        return f"expected status {codes}, got {status}"
    request = expected.get("Request") or {}
    if status in (200, 204):
        exp_req = dict((expected.get("ExpectedRequest") or {}).get("Request") or request)
        exp_req_full = expected.get("ExpectedRequest") or {}
        # A response the gateway made itself (a CORS preflight, say) has no echoed request: the suite's
        # roundtripper then compares against empty values, and so does this.
        # (its roundtripper assumes the request method was the one sent)
        empty = {"host": "", "path": "", "method": request.get("Method") or "GET", "namespace": "", "headers": {},
                 "pod": ""}
        try:
            echoed = json.loads(body) if body else empty
        except ValueError:
            return f"response is not the echo server's JSON: {body[:200]!r}"
        if exp_req.get("Host") and exp_req["Host"] != echoed["host"]:
            return f"expected host {exp_req['Host']}, got {echoed['host']}"
        if (exp_req.get("Path") or "") != echoed["path"]:
            return f"expected path {exp_req.get('Path')!r}, got {echoed['path']!r}"
        if (exp_req.get("Method") or "GET") != echoed["method"]:
            return f"expected method {exp_req.get('Method') or 'GET'}, got {echoed['method']}"
        if (expected.get("Namespace") or "") != echoed["namespace"]:
            return f"expected namespace {expected.get('Namespace')!r}, got {echoed['namespace']!r}"
        got_headers = {k.lower(): v for k, v in echoed["headers"].items()}
        for name, value in (exp_req.get("Headers") or {}).items():
            if name.lower() not in got_headers:
                return f"expected request header {name} at the backend"
            if ",".join(got_headers[name.lower()]) != value:
                return f"expected request header {name}={value!r}, got {','.join(got_headers[name.lower()])!r}"
        want_cert = exp_req.get("ClientCert")
        if want_cert:
            seen = [c.split() for c in (echoed.get("tls") or {}).get("peerCertificates", [])]
            if want_cert.split() not in seen:
                return "the backend did not see the expected client certificate"
        want_sni = exp_req.get("SNI")
        if want_sni and (echoed.get("tls") or {}).get("serverName") != want_sni:
            return f"expected the backend to see TLS server name {want_sni!r}, got {(echoed.get('tls') or {})!r}"
        for name in exp_req_full.get("AbsentHeaders") or []:
            if name.lower() in got_headers:
                return f"expected request header {name} to be absent"
        ws = response.get("IgnoreWhitespace")
        for name, values in (response.get("ValidHeaderValues") or {}).items():
            actual = ",".join(headers.get(name.lower(), []))
            if name.lower() not in headers:
                return f"expected response header {name}"
            if (actual.replace(" ", "") if ws else actual) not in [v.replace(" ", "") if ws else v for v in values]:
                return f"expected response header {name} in {values}, got {actual!r}"
        for name, value in (response.get("Headers") or {}).items():
            if name.lower() not in headers:
                return f"expected response header {name}"
            actual = ",".join(headers[name.lower()])
            if (actual.replace(" ", "") if ws else actual) != (value.replace(" ", "") if ws else value):
                return f"expected response header {name}={value!r}, got {actual!r}"
        for name in response.get("AbsentHeaders") or []:
            if name.lower() in headers:
                return f"expected response header {name} to be absent"
        if not echoed["pod"].startswith(expected.get("Backend") or ""):
            return f"expected a pod of {expected.get('Backend')}, got {echoed['pod']}"
    elif status in (301, 302, 303, 307, 308):
        redirect = expected.get("RedirectRequest")
        if not redirect:
            return ""
        location = (headers.get("location") or [""])[0]
        parts = urlsplit(location)
        got_host, got_port = parts.hostname or "", str(parts.port or "")
        want_host = redirect.get("Host") or got_host
        if want_host != got_host:
            return f"expected redirect host {want_host!r}, got {got_host!r} ({location})"
        want_scheme = redirect.get("Scheme") or scheme
        if redirect.get("Port"):
            if redirect["Port"] != got_port:
                return f"expected redirect port {redirect['Port']!r}, got {got_port!r} ({location})"
        elif parts.scheme == "http" and got_port not in ("", "80"):
            return f"for http, expected redirect port 80 or none, got {got_port!r}"
        elif parts.scheme == "https" and got_port not in ("", "443"):
            return f"for https, expected redirect port 443 or none, got {got_port!r}"
        if want_scheme != parts.scheme:
            return f"expected redirect scheme {want_scheme!r}, got {parts.scheme!r}"
        want_path = redirect.get("Path") or path_sent.split("?")[0]
        if want_path != parts.path:
            return f"expected redirect path {want_path!r}, got {parts.path!r} ({location})"
    return ""


def _mirror_seen(log: Path, mirrors: list[dict], path: str) -> str:
    text = log.read_text()
    for mirror in mirrors:
        ref = mirror.get("BackendRef") or mirror
        pattern = re.compile(rf"request {re.escape(ref.get('Namespace') or INFRA)}/"
                             rf"{re.escape(ref['Name'])}-pod-\d+ \w+ {re.escape(path)}(\?| |$)", re.MULTILINE)
        if not pattern.search(text):
            return f"no mirrored request for {path} at {ref['Name']}"
    return ""


def _run_expectation(stack, case: GoCase, exp) -> str:
    layout: Layout = stack["layout"]
    gateway = exp.gateway or (case.gateways[0] if case.gateways else "same-namespace")
    ip = layout.gateway_ips.get((INFRA, gateway))
    if ip is None:
        return f"unknown Gateway {gateway}"
    host = (exp.literal.get("Request") or {}).get("Host") or ""
    server_name = host.split(":")[0] if exp.server_name == "@host" else exp.server_name
    ports = _listener_ports(stack["config"], gateway, "HTTPS" if server_name else "HTTP")
    port = exp.port or (ports[0] if ports else 80)
    client_cert = stack["client_certs"].get(exp.client_cert) if exp.client_cert else None
    if not exp.gateway and ":" in host:
        port = int(host.rsplit(":", 1)[1])
    path_sent = (exp.literal.get("Request") or {}).get("Path") or "/"
    literal = json.loads(json.dumps(exp.literal))
    for part in (literal.get("Request") or {}, (literal.get("ExpectedRequest") or {}).get("Request") or {}):
        if part.get("ClientCert") in stack["pems"]:
            part["ClientCert"] = stack["pems"][part["ClientCert"]]
    exp = Expectation(literal, exp.gateway, exp.helper, exp.server_name, exp.client_cert, exp.port,
                      exp.expect_failure)
    deadline = time.monotonic() + MAX_WAIT
    streak, last = 0, "no request sent"
    while time.monotonic() < deadline:
        try:
            status, headers, body = _send(ip, port, exp.literal, server_name, client_cert)
            last = compare(exp.literal, status, headers, body, path_sent, "https" if server_name else "http")
            if exp.expect_failure:
                last = "" if status != 200 else "expected the request to fail, it got 200"
        except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected) as exc:
            last = "" if exp.expect_failure else f"request failed: {exc}"
        except OSError as exc:
            last = f"request failed: {exc}"
        streak = streak + 1 if not last else 0
        if streak >= CONSECUTIVE:
            break
        time.sleep(0.05 if not last else 0.2)
    if last:
        return last
    mirrors = exp.literal.get("MirroredTo")
    if mirrors and "ExpectMirroredRequest" in case.helpers:
        end = time.monotonic() + 5
        while time.monotonic() < end and _mirror_seen(stack["echo_log"], mirrors, path_sent):
            time.sleep(0.1)
        return _mirror_seen(stack["echo_log"], mirrors, path_sent)
    return ""


def _weighted_distribution(stack, case: GoCase, weights: dict[str, float]) -> str:
    """weight.TestWeightedDistribution: 500 requests, 10 at a time; each share within ±5% of its weight and
    weight-0 backends unused; up to three attempts, as the suite allows."""
    from concurrent.futures import ThreadPoolExecutor

    exp = case.expectations[0]
    ip = stack["layout"].gateway_ips[(INFRA, exp.gateway or case.gateways[0])]

    def one(i: int) -> str:
        literal = dict(exp.literal)
        literal["Request"] = {**(literal.get("Request") or {}), "Headers": {"X-Jitter": str(i)}}
        status, headers, body = _send(ip, 80, literal)
        problem = compare(literal, status, headers, body, "/")
        if problem:
            raise AssertionError(problem)
        return re.sub(r"-pod-\d+$", "", json.loads(body)["pod"])

    problem = ""
    for _ in range(WEIGHT_RETRIES):
        with ThreadPoolExecutor(WEIGHT_CONCURRENCY) as pool:
            try:
                backends = list(pool.map(one, range(WEIGHT_REQUESTS)))
            except AssertionError as exc:
                return str(exc)
        problems = [f"unexpected backend {b}" for b in set(backends) if b not in weights]
        for backend, want in weights.items():
            got = backends.count(backend) / len(backends)
            if abs(got - want) > WEIGHT_TOLERANCE or (want == 0 and got > 0):
                problems.append(f"{backend} got {got:.3f} of the traffic, expected {want} ±{WEIGHT_TOLERANCE}")
        problem = "; ".join(problems)
        if not problem:
            return ""
    return problem


@pytest.mark.parametrize("case", CASES, ids=[c.short_name for c in CASES])
def test_conformance_case(stack, case: GoCase) -> None:
    if case.short_name in NOT_YET:
        RESULTS[case.short_name] = ("skipped", NOT_YET[case.short_name])
        pytest.skip(NOT_YET[case.short_name])
    if case.short_name in MUTATION_CASES:
        # Status checks (and edits) through the file source, which numbers generations as the API server does;
        # a case that also sends requests goes on below.
        failures = MUTATION_CASES[case.short_name](stack["tmp"] / case.short_name, SUITE, CLASS)
        if failures or not (case.short_name in HANDPORTED or case.expectations):
            RESULTS[case.short_name] = ("failed", "; ".join(failures)) if failures else ("passed", "")
            assert not failures, "\n".join(failures)
            return
    if case.short_name in ("HTTPRouteRetry", "HTTPRouteBackendProtocolWebSocket"):
        case.expectations, case.unportable = [], ""
        layout: Layout = stack["layout"]
        text = "---\n".join((SUITE / m).read_text() for m in case.manifests)
        (stack["config"] / "50-case.yaml").write_text(layout.rewrite(text))
        failures = _retry_case(stack, case) if case.short_name == "HTTPRouteRetry" else _websocket_case(stack)
        (stack["config"] / "50-case.yaml").unlink()
        RESULTS[case.short_name] = ("failed", "; ".join(failures)) if failures else ("passed", "")
        assert not failures, "\n".join(failures)
        return
    if case.short_name in HANDPORTED:
        case.expectations, case.unportable = HANDPORTED[case.short_name], ""
    if case.unportable:
        RESULTS[case.short_name] = ("skipped", f"not portable: {case.unportable}")
        pytest.fail(f"the harness cannot read this case: {case.unportable}")
    if not case.expectations:
        # A case that only checks status: run the same check as tests/test_conformance_status.py.
        from tests.test_conformance_status import ROUTE_CASES, test_route_condition

        checks = [lambda c=c: test_route_condition(*c) for c in ROUTE_CASES if f"tests/{c[0]}" in case.manifests]
        gateway_check = _gateway_status_checks().get(case.short_name)
        if gateway_check is not None:
            checks.append(gateway_check)
        if not checks:
            RESULTS[case.short_name] = ("skipped", "status-only case without a ported status check")
            pytest.fail("status-only case without a ported status check")
        try:
            for check in checks:
                check()
        except AssertionError as exc:
            RESULTS[case.short_name] = ("failed", f"status: {exc}")
            raise
        RESULTS[case.short_name] = ("passed", "status-only case: conditions checked")
        return
    layout: Layout = stack["layout"]
    text = "---\n".join((SUITE / m).read_text() for m in case.manifests)
    (stack["config"] / "50-case.yaml").write_text(layout.rewrite(text))
    failures = []
    for i, exp in enumerate(case.expectations):
        dropped = MUTATIONS.get(case.short_name, {}).get(i)
        if dropped:
            docs = [d for d in _docs(text) if (d.get("kind"), d["metadata"]["name"]) not in dropped]
            text = yaml.safe_dump_all(docs, sort_keys=False)
            (stack["config"] / "50-case.yaml").write_text(layout.rewrite(text))
        problem = _run_expectation(stack, case, exp)
        if problem:
            req = exp.literal.get("Request") or {}
            failures.append(f"#{i} {req.get('Method') or 'GET'} {req.get('Host', '')}{req.get('Path', '/')}: {problem}")
    if not failures and case.short_name in PERCENT_MIRROR_CASES:
        for exp in case.expectations:
            problem = _percentage_mirror(stack, exp)
            if problem:
                failures.append(f"mirror distribution: {problem}")
    if not failures and case.short_name in BACKEND_HEADER_CASES:
        ip = layout.gateway_ips[(INFRA, case.expectations[0].gateway or "same-namespace")]
        for _ in range(100):
            _, _, body = _send(ip, 80, case.expectations[0].literal)
            echoed = json.loads(body)
            named = echoed["headers"].get("Backend", [])
            if len(named) != 1 or not echoed["pod"].startswith(named[0]):
                failures.append(f"Backend header {named} but the pod was {echoed['pod']}")
                break
    if not failures and case.short_name in WEIGHTS:
        problem = _weighted_distribution(stack, case, WEIGHTS[case.short_name])
        if problem:
            failures.append(f"weighted distribution: {problem}")
    (stack["config"] / "50-case.yaml").unlink()
    RESULTS[case.short_name] = ("failed", "; ".join(failures)) if failures else ("passed", "")
    assert not failures, "\n".join(failures)


def _write_report(results: dict[str, tuple[str, str]]) -> None:
    core_features = {"Gateway", "HTTPRoute", "ReferenceGrant"}
    other_profiles = {"TLSRoute"}  # HTTPRouteDisallowedKind names it, but it belongs to GATEWAY-TLS
    core, extended = {"passed": [], "failed": [], "skipped": []}, {}
    for case in CASES:
        if case.short_name not in results:
            continue
        result, note = results[case.short_name]
        bucket = "passed" if result.startswith("passed") else result
        extra = [f for f in case.features if f not in core_features and f not in other_profiles]
        if not extra:
            core[bucket].append(case.short_name)
        for feature in extra:
            extended.setdefault(feature, {"passed": [], "failed": [], "skipped": []})[bucket].append(case.short_name)
    report = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "ConformanceReport",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gatewayAPIVersion": "v1.6.1",
        "gatewayAPIChannel": "experimental",
        "implementation": {"organization": "tidegate", "project": "tidegate", "url": "", "version": "0.1.0",
                           "contact": []},
        "mode": "default",
        "profiles": [{
            "name": "GATEWAY-HTTP",
            "core": {"result": "success" if not core["failed"] and not core["skipped"] else "partial",
                     "statistics": {k: len(v) for k, v in core.items()},
                     "failedTests": sorted(core["failed"]), "skippedTests": sorted(core["skipped"])},
            "extended": {
                "result": "partial",
                "statistics": {k: sum(len(f[k]) for f in extended.values()) for k in ("passed", "failed", "skipped")},
                "supportedFeatures": sorted(f for f, r in extended.items() if r["passed"] and not r["failed"]
                                            and not r["skipped"]),
                "unsupportedFeatures": sorted(f for f, r in extended.items() if r["failed"] or r["skipped"]),
            },
        }],
        "notes": {name: note for name, (result, note) in sorted(results.items()) if note},
    }
    text = yaml.safe_dump(report, sort_keys=False, width=120)
    print("\n" + text)
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "conformance-report.yaml").write_text(text)
    if os.environ.get("TIDEGATE_UPDATE_REPORT"):
        (ROOT / "conformance").mkdir(exist_ok=True)
        (ROOT / "conformance" / "REPORT.yaml").write_text(text)
