"""TLS termination end to end: certificates chosen by SNI, routes behind HTTPS listeners, reload of a cert."""

from __future__ import annotations

import json
import socket
import ssl
import textwrap
import time

import pytest
from cryptography import x509

from tests.certs import tls_secret_yaml
from tests.harness import echo_servers, free_port, request, tidegate_run
from tests.manifests import gateway, http_gateway, route, service

GW, POD = "127.0.0.1", "127.0.0.5"


def config(port: int, echo_port: int) -> str:
    listeners = (f'[{{name: a, port: {port}, protocol: HTTPS, hostname: a.test, '
                 f'tls: {{certificateRefs: [{{name: cert-a}}]}}}}, '
                 f'{{name: wild, port: {port}, protocol: HTTPS, hostname: "*.b.test", '
                 f'tls: {{certificateRefs: [{{name: cert-b}}]}}}}]')
    return (gateway(GW, listeners) + service("echo", [(POD, echo_port, "echo-0")])
            + route("r", "", "- backendRefs: [{name: echo, port: 80}]"))


def handshake(port: int, sni: str, host: str = "") -> tuple[list[str], bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((GW, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=sni) as s:
        cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        s.sendall(f"GET /tls HTTP/1.1\r\nHost: {host or sni}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return names, data


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    port, echo_port = free_port(GW), free_port(POD)
    cfg = tmp / "config"
    cfg.mkdir()
    (cfg / "gw.yaml").write_text(config(port, echo_port))
    (cfg / "certs.yaml").write_text(tls_secret_yaml("default", "cert-a", ["a.test"]) + "---\n"
                                    + tls_secret_yaml("default", "cert-b", ["*.b.test"]))
    with echo_servers({(POD, echo_port): "default/echo-0"}, tmp / "echo.log"), \
            tidegate_run(cfg, (GW, port), tmp / "tidegate.log"):
        yield {"port": port, "config": cfg}


def test_certificate_is_chosen_by_sni_and_requests_are_proxied(tls_stack):
    names, reply = handshake(tls_stack["port"], "a.test")
    assert names == ["a.test"]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    echoed = json.loads(body)
    assert echoed["host"] == "a.test" and echoed["headers"]["X-Forwarded-Proto"] == ["https"]
    names, reply = handshake(tls_stack["port"], "x.y.b.test")
    assert names == ["*.b.test"] and reply.startswith(b"HTTP/1.1 200")


def test_an_unknown_name_gets_the_default_certificate_and_no_route(tls_stack):
    # As nginx and HAProxy do (and the conformance HTTPS case expects): finish the handshake, then 404.
    names, reply = handshake(tls_stack["port"], "nobody.example")
    assert names == ["a.test"] and reply.startswith(b"HTTP/1.1 404")


def test_a_new_certificate_is_served_after_reload_without_rebinding(tls_stack):
    certs = tls_stack["config"] / "certs.yaml"
    certs.write_text(tls_secret_yaml("default", "cert-a", ["a.test", "renewed.a.test"]) + "---\n"
                     + tls_secret_yaml("default", "cert-b", ["*.b.test"]))
    deadline = time.monotonic() + 10
    names: list[str] = []
    while time.monotonic() < deadline:
        names, _ = handshake(tls_stack["port"], "a.test")
        if "renewed.a.test" in names:
            break
        time.sleep(0.1)
    assert "renewed.a.test" in names


def test_a_host_of_another_listener_than_the_sni_is_misdirected(tls_stack):
    _, reply = handshake(tls_stack["port"], "a.test", host="x.b.test")
    assert reply.startswith(b"HTTP/1.1 421")
    _, reply = handshake(tls_stack["port"], "x.b.test", host="y.b.test")  # same listener: fine
    assert reply.startswith(b"HTTP/1.1 200")


def test_http2_is_negotiated_by_alpn_and_misdirected_requests_get_421(tls_stack):
    from tests.harness import h2_request

    status, _, body = h2_request(GW, tls_stack["port"], "a.test", "/h2", tls_server_name="a.test")
    assert status == 200 and json.loads(body)["headers"]["X-Forwarded-Proto"] == ["https"]
    assert h2_request(GW, tls_stack["port"], "x.b.test", "/h2", tls_server_name="a.test")[0] == 421


def test_backend_tls_policy_reencrypts_to_the_pod_and_verifies_it(tmp_path):
    from tests.certs import ca_and_leaf

    ca, leaf, key = ca_and_leaf(["backend.internal", "spiffe://cluster.local/ns/default/sa/secure"])
    (tmp_path / "leaf.pem").write_bytes(leaf)
    (tmp_path / "leaf.key").write_bytes(key)
    echo_port, gw_port = free_port(POD), free_port(GW)
    config = tmp_path / "config"
    config.mkdir()
    ca_text = textwrap.indent(ca.decode(), "        ")
    policies = [("by-hostname", "secure-a", "backend.internal", ""),
                ("wrong-hostname", "secure-b", "other.internal", ""),
                ("by-san", "secure-c", "not-in-the-cert.internal",
                 "    subjectAltNames: [{type: URI, uri: 'spiffe://cluster.local/ns/default/sa/secure'}]\n")]
    docs = [http_gateway(GW, gw_port) + textwrap.dedent("""
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: ca, namespace: default}
        data:
          ca.crt: |
        """) + ca_text]
    for name, svc, hostname, extra in policies:
        docs.append(textwrap.dedent(f"""
        apiVersion: v1
        kind: Service
        metadata: {{name: {svc}, namespace: default}}
        spec: {{ports: [{{port: 443, targetPort: {echo_port}}}]}}
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {{name: {svc}-1, namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}
        addressType: IPv4
        endpoints: [{{addresses: [{POD}], targetRef: {{kind: Pod, name: secure-0}}}}]
        ports: [{{port: {echo_port}}}]
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {{name: {svc}, namespace: default}}
        spec:
          parentRefs: [{{name: gw}}]
          hostnames: [{svc}.test]
          rules: [{{backendRefs: [{{name: {svc}, port: 443}}]}}]
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: BackendTLSPolicy
        metadata: {{name: {name}, namespace: default}}
        spec:
          targetRefs: [{{group: "", kind: Service, name: {svc}}}]
          validation:
            hostname: {hostname}
            caCertificateRefs: [{{group: "", kind: ConfigMap, name: ca}}]
        """) + extra)
    (config / "c.yaml").write_text("---".join(docs))
    tls_args = ("--tls-cert", str(tmp_path / "leaf.pem"), "--tls-key", str(tmp_path / "leaf.key"))
    with echo_servers({(POD, echo_port): "default/secure-0+tls"}, tmp_path / "echo.log", *tls_args):
        with tidegate_run(config, (GW, gw_port), tmp_path / "tidegate.log"):
            status, _, body = request(GW, gw_port, "/", headers={"Host": "secure-a.test"})
            assert status == 200
            assert json.loads(body)["tls"]["serverName"] == "backend.internal"
            status, _, body = request(GW, gw_port, "/", headers={"Host": "secure-b.test"})
            assert status == 502 and b"TLS" in body  # the certificate does not cover other.internal
            status, _, body = request(GW, gw_port, "/", headers={"Host": "secure-c.test"})
            assert status == 200 and json.loads(body)["tls"]["serverName"] == "not-in-the-cert.internal"


def test_client_certificates_are_required_when_the_gateway_validates_them(tmp_path):
    from tests.certs import ca_and_leaf

    ca, client_cert, client_key = ca_and_leaf(["client.example"])
    _, stranger_cert, stranger_key = ca_and_leaf(["stranger.example"])  # signed by another CA
    for name, data in {"client.pem": client_cert, "client.key": client_key, "stranger.pem": stranger_cert,
                       "stranger.key": stranger_key}.items():
        (tmp_path / name).write_bytes(data)
    echo_port, strict_port, open_port = free_port(POD), free_port(GW), free_port(GW)
    config = tmp_path / "config"
    config.mkdir()
    listeners = (f"[{{name: strict, port: {strict_port}, protocol: HTTPS, tls: {{certificateRefs: [{{name: cert-a}}]}}}},"
                 f" {{name: open, port: {open_port}, protocol: HTTPS, tls: {{certificateRefs: [{{name: cert-a}}]}}}}]")
    frontend = textwrap.indent(textwrap.dedent(f"""
        tls:
          frontend:
            default:
              validation: {{caCertificateRefs: [{{group: "", kind: ConfigMap, name: client-ca}}]}}
            perPort:
              - port: {open_port}
                tls:
                  validation:
                    mode: AllowInsecureFallback
                    caCertificateRefs: [{{group: "", kind: ConfigMap, name: client-ca}}]
        """), "  ")
    manifest = gateway(GW, listeners).replace("  listeners:", frontend.rstrip("\n") + "\n  listeners:")
    manifest += service("echo", [(POD, echo_port, "echo-0")]) + route("r", "", "- backendRefs: [{name: echo, port: 80}]")
    manifest += "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: client-ca, namespace: default}\ndata:\n"
    manifest += "  ca.crt: |\n" + textwrap.indent(ca.decode(), "    ") + "---\n"
    manifest += tls_secret_yaml("default", "cert-a", ["a.test"])
    (config / "c.yaml").write_text(manifest)

    def get(port: int, cert: str | None) -> int:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if cert:
            ctx.load_cert_chain(tmp_path / f"{cert}.pem", tmp_path / f"{cert}.key")
        with socket.create_connection((GW, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="a.test") as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            try:
                reply = s.recv(100)
            except (ssl.SSLError, ConnectionError):
                return 0  # with TLS 1.3 the refusal of a client certificate arrives after the handshake
        return int(reply.split()[1]) if reply else 0

    with echo_servers({(POD, echo_port): "default/echo-0"}, tmp_path / "echo.log"):
        with tidegate_run(config, (GW, strict_port), tmp_path / "tidegate.log"):
            assert get(strict_port, "client") == 200
            for cert in (None, "stranger"):
                try:
                    status = get(strict_port, cert)
                except (ssl.SSLError, ConnectionError):
                    status = 0
                assert status == 0, f"a client with {cert or 'no'} certificate was let in"
            assert [get(open_port, cert) for cert in ("client", "stranger", None)] == [200, 200, 200]
