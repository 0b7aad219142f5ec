"""ACME certificates (issue 21): what asks for one (translate/acme.py), and orders against Let's Encrypt's test
CA (Debian's pebble, started here) over HTTP-01, served by tidegate once issued."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.acme_ca import CHALLTESTSRV, EAB_KEYS, PEBBLE, pebble
from tests.harness import children, echo_servers, free_port, tidegate_run, wait_until
from tests.manifests import gateway, route, service
from tidegate.resources.loader import load_text
from tidegate.translate import translate

CURL = shutil.which("curl")
needs_pebble = pytest.mark.skipif(PEBBLE is None or CHALLTESTSRV is None or CURL is None,
                                  reason="pebble and curl are not installed (scripts/test does)")


def _issuer(server: str = "https://localhost:14000/dir", ca_bundle: str = "", name: str = "pebble",
            kind: str = "AcmeIssuer", extra: dict | None = None) -> str:
    issuer = {"apiVersion": "tidegate.io/v1alpha1", "kind": kind,
              "metadata": {"name": name, **({"namespace": "default"} if kind == "AcmeIssuer" else {})},
              "spec": {"server": server, "email": "ops@example.com", **({"caBundle": ca_bundle} if ca_bundle else {}),
                       **(extra or {})}}
    return "---\n" + yaml.safe_dump(issuer)


def _listeners(http_port: int, https_port: int, hostname: str = "app.test", issuer: str = "pebble") -> str:
    return (f"[{{name: http, port: {http_port}, protocol: HTTP}}, {{name: https, port: {https_port}, protocol: HTTPS, "
            f"hostname: '{hostname}', tls: {{mode: Terminate, options: {{tidegate.io/acme-issuer: {issuer}}}}}}}]")


def _translated(text: str):
    loaded = load_text(text, "acme")
    assert not loaded.errors, loaded.errors
    return translate(loaded.resources)


def _listener_conditions(translation, name: str = "https") -> dict[str, tuple[str, str]]:
    status = next(s for k, s in translation.statuses.items() if k.kind == "Gateway")
    found = next(listener for listener in status["listeners"] if listener["name"] == name)
    return {c["type"]: (c["status"], c["reason"]) for c in found["conditions"]}


def test_a_listener_with_the_acme_option_waits_for_its_certificate_then_serves_it():
    config = gateway("127.0.0.1", _listeners(80, 443)) + _issuer()
    waiting = _translated(config)
    assert [(w.names, w.namespace, w.secret, w.issuer.key) for w in waiting.acme] == [
        (("app.test",), "default", "acme-gw-https", "AcmeIssuer default/pebble")]
    assert _listener_conditions(waiting)["Programmed"] == ("False", "CertificatePending")
    assert _listener_conditions(waiting)["ResolvedRefs"] == ("True", "ResolvedRefs")
    # opened without a certificate (a TLS-ALPN-01 validation is answered there; no other handshake succeeds)
    [pending] = [listener for listener in waiting.ir.listeners if listener.port == 443]
    assert pending.tls is not None and pending.tls.certificates == ()
    from tests.certs import tls_secret_yaml

    issued = _translated(config + "---\n" + tls_secret_yaml("default", "acme-gw-https", ["app.test"]))
    assert _listener_conditions(issued)["Programmed"] == ("True", "Programmed")
    [https] = [listener for listener in issued.ir.listeners if listener.port == 443]
    assert https.tls is not None and https.tls.certificates[0].hostnames == ("app.test",)
    assert len(issued.acme) == 1  # still kept: renewed when due


@pytest.mark.parametrize("hostname, issuer, message", [
    ("*.app.test", "pebble", "must be set and not a wildcard"),
    ("app.test", "nobody", "no AcmeIssuer default/nobody or ClusterAcmeIssuer nobody"),
])
def test_a_listener_that_cannot_be_given_a_certificate_says_why(hostname, issuer, message):
    translation = _translated(gateway("127.0.0.1", _listeners(80, 443, hostname, issuer)) + _issuer())
    assert _listener_conditions(translation)["ResolvedRefs"] == ("False", "InvalidCertificateRef")
    status = next(s for k, s in translation.statuses.items() if k.kind == "Gateway")
    assert message in str(status)
    assert not translation.acme


def test_a_cluster_issuer_serves_any_namespace_and_the_ingress_annotations_ask_too():
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": "shop", "namespace": "default",
                            "annotations": {"kubernetes.io/tls-acme": "true"}},
               "spec": {"ingressClassName": "tidegate",
                        "tls": [{"hosts": ["shop.test", "www.shop.test"], "secretName": "shop-tls"}],
                        "rules": [{"host": "shop.test", "http": {"paths": [{
                            "path": "/", "pathType": "Prefix",
                            "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}
    default = {"apiVersion": "tidegate.io/v1alpha1", "kind": "ClusterAcmeIssuer",
               "metadata": {"name": "letsencrypt", "annotations": {"tidegate.io/default-acme-issuer": "true"}},
               "spec": {"server": "https://acme.example/dir", "solvers": [{"http01": {}}, {"tlsAlpn01": {}}]}}
    text = ("apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: tidegate}\n"
            "spec: {controller: tidegate.io/ingress-controller}\n---\n" + yaml.safe_dump(ingress)
            + "---\n" + yaml.safe_dump(default))
    translation = _translated(text)
    [wanted] = translation.acme
    assert (wanted.names, wanted.secret, wanted.issuer.key, wanted.issuer.solvers) == (
        ("shop.test", "www.shop.test"), "shop-tls", "ClusterAcmeIssuer letsencrypt", ("http-01", "tls-alpn-01"))
    assert any("waiting for its certificate from ClusterAcmeIssuer letsencrypt" in n.message
               for n in translation.notes)


def test_external_account_binding_is_read_from_its_secret():
    secret = ("---\napiVersion: v1\nkind: Secret\nmetadata: {name: eab, namespace: default}\n"
              f"stringData: {{secret: {EAB_KEYS['kid-1']}}}\n")
    binding = {"externalAccountBinding": {"keyID": "kid-1", "keySecretRef": {"name": "eab"}}}
    [wanted] = _translated(gateway("127.0.0.1", _listeners(80, 443)) + _issuer(extra=binding) + secret).acme
    assert (wanted.issuer.eab_key_id, wanted.issuer.eab_hmac_key) == ("kid-1", EAB_KEYS["kid-1"])
    missing = _translated(gateway("127.0.0.1", _listeners(80, 443)) + _issuer(extra=binding))
    assert "externalAccountBinding Secret eab (key secret) not found" in str(missing.statuses)
    garbled = _translated(gateway("127.0.0.1", _listeners(80, 443)) + _issuer(extra=binding)
                          + secret.replace(EAB_KEYS["kid-1"], "not/base64+url!"))
    assert "the externalAccountBinding key is not base64url" in str(garbled.statuses) and not garbled.acme


@needs_pebble
@pytest.mark.parametrize("binding, nonces", [(False, 0), (True, 0), (False, 40)],
                         ids=["plain", "external-account-binding", "bad-nonces"])
def test_a_listener_gets_a_certificate_from_pebble_over_http01(tmp_path, binding, nonces):
    """pebble validates HTTP-01 on tidegate's HTTP listener; the HTTPS listener then serves a certificate that
    curl verifies against pebble's root. With external account binding, the account is bound with pebble's
    EAB key. With pebble refusing 40 % of the nonces (PEBBLE_WFE_NONCEREJECT), the refused requests are sent
    again and the order still succeeds at its first try, as one order."""
    http_port, https_port, pod_port = free_port(), free_port(), free_port("127.0.20.1")
    with pebble(tmp_path, http_port, https_port, env={"PEBBLE_WFE_NONCEREJECT": str(nonces)}) as ca:
        config = tmp_path / "config"
        config.mkdir()
        extra = {"externalAccountBinding": {"keyID": "kid-1", "keySecretRef": {"name": "eab"}}} if binding else None
        (config / "all.yaml").write_text(
            gateway("127.0.0.1", _listeners(http_port, https_port)) + _issuer(ca.directory, ca.api_ca, extra=extra)
            + ("---\napiVersion: v1\nkind: Secret\nmetadata: {name: eab, namespace: default}\n"
               f"stringData: {{secret: {EAB_KEYS['kid-1']}}}\n" if binding else "")
            + service("web", [("127.0.20.1", pod_port, "web-1")])
            + route("web", "app.test", "- backendRefs: [{name: web, port: 80}]"))
        (tmp_path / "root.pem").write_text(ca.root())
        with echo_servers({("127.0.20.1", pod_port): "default/web-1"}, tmp_path / "echo.log"):
            with tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                              "--acme-dir", str(tmp_path / "acme")) as proxy:
                started = time.monotonic()  # the configuration, with the listener that asks, is applied

                def verified() -> bool:
                    done = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                                           str(tmp_path / "root.pem"), "--resolve", f"app.test:{https_port}:127.0.0.1",
                                           f"https://app.test:{https_port}/"], capture_output=True, text=True,
                                          timeout=10)
                    return done.stdout == "200"

                wait_until(verified, timeout=30, what="a certificate from pebble, served and verified")
                took = time.monotonic() - started
                print(f"first certificate served {took:.2f} s after the listener appeared")
                log = (tmp_path / "tidegate.log").read_text()
                assert "ACME: certificate for app.test issued by AcmeIssuer default/pebble" in log
                [certificate] = _admin(proxy, "/api/v1/certificates")["certificates"]
                assert (certificate["names"], certificate["state"], certificate["failures"]) == (
                    ["app.test"], "valid", 0)
                assert certificate["daysLeft"] > 1  # pebble's default lifetime is 5 years
                metrics = _admin(proxy, "/metrics", raw=True)
                assert 'tidegate_acme_orders_total{result="issued"} 1.0' in metrics
                assert float(metrics.split('tidegate_acme_challenges_served_total{type="http-01"} ')[1].split()[0]) >= 1
                assert "ACME account" in log and "registered" in log
        secret = yaml.safe_load((tmp_path / "acme" / "secrets" / "default" / "acme-gw-https.yaml").read_text())
        assert secret["type"] == "kubernetes.io/tls" and secret["metadata"]["annotations"][
            "tidegate.io/acme-names"] == "app.test"
        assert not list((tmp_path / "acme" / "challenges" / "http-01").iterdir())  # answered, then removed
        pebble_log = (tmp_path / "pebble.log").read_text()
        assert pebble_log.count("Issued certificate serial") == 1, pebble_log[-3000:]
        assert pebble_log.count("Added order") == 1  # (a POST /order-plz whose nonce is refused adds none)
        assert f"Configured to reject {nonces}% of good nonces" in pebble_log


def _admin(proxy, path: str, raw: bool = False):
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}{path}", timeout=10) as answer:
        body = answer.read().decode()
    return body if raw else json.loads(body)


def _gateway_on_bind(listeners: str) -> str:
    """The Gateway with no spec.addresses: each replica listens on its own --bind address."""
    return gateway("127.0.0.1", listeners).replace("  addresses: [{value: 127.0.0.1}]\n", "")


def _served_certificate(address: str, port: int, host: str) -> bytes:
    """The certificate a listener presents for `host` (DER), not checked."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((address, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        return tls.getpeercert(binary_form=True) or b""


def _verified(root: Path, address: str, port: int, host: str = "app.test") -> bool:
    done = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(root), "--resolve",
                           f"{host}:{port}:{address}", f"https://{host}:{port}/"], capture_output=True, text=True,
                          timeout=10)
    return done.stdout == "200"


@needs_pebble
def test_replicas_sharing_the_acme_dir_order_once_and_answer_each_others_challenges(tmp_path):
    """Two `tidegate run` processes share --acme-dir. pebble-challtestsrv points the name at replica B, which
    does not order (its configuration does not ask yet): replica A orders, and every validation is answered
    by B from the shared store. Once B's configuration asks too, B serves the certificate A wrote, without an
    order of its own: one certificate issued, the same one served by both."""
    http_port, https_port, pod_port = free_port(), free_port(), free_port("127.0.20.1")
    with pebble(tmp_path, http_port, https_port) as ca:
        ca.point("app.test", "127.0.0.3")  # B's address: A (127.0.0.2) never sees a validation request
        (tmp_path / "root.pem").write_text(ca.root())
        common = (_issuer(ca.directory, ca.api_ca) + service("web", [("127.0.20.1", pod_port, "web-1")])
                  + route("web", "app.test", "- backendRefs: [{name: web, port: 80}]"))
        plain = _gateway_on_bind(f"[{{name: http, port: {http_port}, protocol: HTTP}}]") + common
        ordering = _gateway_on_bind(_listeners(http_port, https_port)) + common
        for name, text in (("a", ordering), ("b", plain)):
            (tmp_path / name).mkdir()
            (tmp_path / name / "all.yaml").write_text(text)
        acme = str(tmp_path / "acme")
        with echo_servers({("127.0.20.1", pod_port): "default/web-1"}, tmp_path / "echo.log"), \
                tidegate_run(tmp_path / "b", ("127.0.0.3", http_port), tmp_path / "tidegate-b.log",
                             "--bind", "127.0.0.3", "--acme-dir", acme), \
                tidegate_run(tmp_path / "a", ("127.0.0.2", http_port), tmp_path / "tidegate-a.log",
                             "--bind", "127.0.0.2", "--acme-dir", acme):
            wait_until(lambda: _verified(tmp_path / "root.pem", "127.0.0.2", https_port), timeout=30,
                       what="replica A serving the certificate it ordered")
            (tmp_path / "b" / "all.yaml").write_text(ordering)
            wait_until(lambda: _verified(tmp_path / "root.pem", "127.0.0.3", https_port), timeout=30,
                       what="replica B serving the certificate A ordered")
            assert _served_certificate("127.0.0.2", https_port, "app.test") == \
                _served_certificate("127.0.0.3", https_port, "app.test")
        assert "issued by" in (tmp_path / "tidegate-a.log").read_text()
        assert "issued by" not in (tmp_path / "tidegate-b.log").read_text()
        assert (tmp_path / "pebble.log").read_text().count("Issued certificate serial") == 1


@needs_pebble
def test_a_name_that_cannot_validate_is_ordered_again_after_growing_waits(tmp_path):
    """Validation goes to an address where nothing listens: each order fails, and the next one waits twice
    as long as the last (--acme-backoff 1: about 1, 2, 4 s), counted at pebble; the failure is logged with
    pebble's reason."""
    http_port, https_port = free_port(), free_port()
    with pebble(tmp_path, http_port, https_port) as ca:
        ca.point("app.test", "127.0.0.9")
        config = tmp_path / "config"
        config.mkdir()
        (config / "all.yaml").write_text(gateway("127.0.0.1", _listeners(http_port, https_port))
                                         + _issuer(ca.directory, ca.api_ca))
        with tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log", "--acme-dir",
                          str(tmp_path / "acme"), "--acme-backoff", "1") as proxy:
            orders = lambda: (tmp_path / "pebble.log").read_text().count("Added order")  # noqa: E731
            wait_until(lambda: orders() >= 3, timeout=20, what="three orders")
            started = time.monotonic()
            wait_until(lambda: orders() >= 4, timeout=20, what="a fourth order")
            fourth = time.monotonic() - started  # the wait before it: about 4 s (1 s doubled twice, ±20 %)
            log = (tmp_path / "tidegate.log").read_text()
            # visible: the listener's condition, the admin API, the metrics (once the fourth order has failed)
            [certificate] = wait_until(lambda: [c for c in _admin(proxy, "/api/v1/certificates")["certificates"]
                                                if c["state"] == "failed" and c["failures"] == 4],
                                       what="the fourth failure")
            assert (certificate["secret"], certificate["state"]) == ("default/acme-gw-https", "failed")
            assert certificate["failures"] >= 3 and "validation failed" in certificate["message"]
            gateway_status = next(s for s in _admin(proxy, "/api/v1/status") if s["kind"] == "Gateway")
            [https] = [s for s in gateway_status["status"]["listeners"] if s["name"] == "https"]
            [programmed] = [c for c in https["conditions"] if c["type"] == "Programmed"]
            assert (programmed["status"], programmed["reason"]) == ("False", "CertificateFailed")
            assert "the last order failed: validation failed" in programmed["message"]
            metrics = _admin(proxy, "/metrics", raw=True)
            assert 'tidegate_acme_certificate_failures{secret="default/acme-gw-https"}' in metrics
            assert float(metrics.split('tidegate_acme_orders_total{result="failed"} ')[1].split()[0]) >= 3
        assert 2.0 < fourth < 7.0, fourth
        assert orders() == 4
        assert "ACME: no certificate for app.test from AcmeIssuer default/pebble: validation failed" in log
        assert "next try in" in log


@needs_pebble
def test_a_short_certificate_is_renewed_under_load_with_no_failed_request(tmp_path):
    """pebble issues certificates of 60 s: with a third of that left, the certificate is ordered again, and
    both replicas serve the new one while clients keep sending requests over kept-alive and new connections,
    every one of them answered 200 and verified against pebble's root."""
    import urllib3

    http_port, https_port, pod_port = free_port(), free_port(), free_port("127.0.20.1")
    with pebble(tmp_path, http_port, https_port, validity=60) as ca:
        ca.point("app.test", "127.0.0.2")
        root = tmp_path / "root.pem"
        root.write_text(ca.root())
        config = tmp_path / "config"
        config.mkdir()
        (config / "all.yaml").write_text(
            _gateway_on_bind(_listeners(http_port, https_port)) + _issuer(ca.directory, ca.api_ca)
            + service("web", [("127.0.20.1", pod_port, "web-1")])
            + route("web", "app.test", "- backendRefs: [{name: web, port: 80}]"))
        acme = str(tmp_path / "acme")
        replicas = ("127.0.0.2", "127.0.0.3")
        with echo_servers({("127.0.20.1", pod_port): "default/web-1"}, tmp_path / "echo.log"), \
                tidegate_run(config, (replicas[0], http_port), tmp_path / "tidegate-a.log", "--bind", replicas[0],
                             "--acme-dir", acme), \
                tidegate_run(config, (replicas[1], http_port), tmp_path / "tidegate-b.log", "--bind", replicas[1],
                             "--acme-dir", acme):
            for address in replicas:
                wait_until(lambda: _verified(root, address, https_port), timeout=30, what=f"{address}'s first "
                           "certificate")
            first = _served_certificate(replicas[0], https_port, "app.test")
            stop = threading.Event()
            outcomes: list[str] = []

            def load(address: str) -> None:
                sent = 0
                while not stop.is_set() and sent < 20000:  # bounded in count, and by the deadline below
                    pool = urllib3.HTTPSConnectionPool(address, https_port, server_hostname="app.test",
                                                       assert_hostname="app.test", ca_certs=str(root), maxsize=1,
                                                       retries=False, timeout=5)
                    for _ in range(20):  # 20 requests per connection, then a new one (a new handshake)
                        try:
                            status = pool.request("GET", "/", headers={"Host": "app.test"}).status
                            outcomes.append("ok" if status == 200 else f"status {status}")
                        except urllib3.exceptions.HTTPError as exc:
                            outcomes.append(f"{type(exc).__name__}: {exc}")
                        sent += 1
                        time.sleep(0.01)
                    pool.close()

            threads = [threading.Thread(target=load, args=(address,)) for address in replicas]
            for thread in threads:
                thread.start()
            try:
                wait_until(lambda: all(_served_certificate(a, https_port, "app.test") != first for a in replicas),
                           timeout=75, what="the renewed certificate served by both replicas")
                time.sleep(1)  # requests on the new certificate too
            finally:
                stop.set()
                for thread in threads:
                    thread.join(30)
        failures = [o for o in outcomes if o != "ok"]
        assert not failures and len(outcomes) > 200, (len(outcomes), failures[:5])
        assert (tmp_path / "pebble.log").read_text().count("Issued certificate serial") == 2


@needs_pebble
def test_a_listener_gets_a_certificate_from_pebble_over_tls_alpn01_alone(tmp_path):
    """An issuer with the TLS-ALPN-01 solver only, and a Gateway with no HTTP listener at all: pebble's
    validation (a ClientHello offering acme-tls/1 alone) is answered on the HTTPS listener itself, before TLS,
    with the challenge certificate, and the listener then serves the certificate issued."""
    https_port, pod_port = free_port(), free_port("127.0.20.1")
    with pebble(tmp_path, free_port(), https_port) as ca:
        config = tmp_path / "config"
        config.mkdir()
        https_only = (f"[{{name: https, port: {https_port}, protocol: HTTPS, hostname: app.test, "
                      "tls: {mode: Terminate, options: {tidegate.io/acme-issuer: pebble}}}]")
        (config / "all.yaml").write_text(
            gateway("127.0.0.1", https_only) + _issuer(ca.directory, ca.api_ca, extra={"solvers": [{"tlsAlpn01": {}}]})
            + service("web", [("127.0.20.1", pod_port, "web-1")])
            + route("web", "app.test", "- backendRefs: [{name: web, port: 80}]"))
        (tmp_path / "root.pem").write_text(ca.root())
        with echo_servers({("127.0.20.1", pod_port): "default/web-1"}, tmp_path / "echo.log"), \
                tidegate_run(config, ("127.0.0.1", https_port), tmp_path / "tidegate.log",
                             "--acme-dir", str(tmp_path / "acme")) as proxy:
            wait_until(lambda: _verified(tmp_path / "root.pem", "127.0.0.1", https_port), timeout=30,
                       what="a certificate from pebble over TLS-ALPN-01, served and verified")
            assert "ACME: answering tls-alpn-01 for app.test" in (tmp_path / "tidegate.log").read_text()
            served = _admin(proxy, "/metrics", raw=True)
            assert float(served.split('tidegate_acme_challenges_served_total{type="tls-alpn-01"} ')[1].split()[0]) >= 1
        assert not list((tmp_path / "acme" / "challenges" / "tls-alpn-01").iterdir())


class _HeldRelay:
    """Relays each connection to (address, port) after holding it `hold` seconds: a slow network between
    pebble's validation and the replicas."""

    def __init__(self, listen: tuple[str, int], to: tuple[str, int], hold: float):
        self.to, self.hold = to, hold
        self.sock = socket.create_server(listen)
        self.sock.settimeout(0.2)
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            try:
                with client:
                    time.sleep(self.hold)
                    with socket.create_connection(self.to, timeout=5) as server:
                        client.settimeout(5)
                        server.sendall(client.recv(65536))
                        while data := server.recv(65536):
                            client.sendall(data)
            except OSError:
                pass  # a peer that went away: the next connection is relayed as well

    def close(self) -> None:
        self.closing.set()
        self.thread.join(10)
        self.sock.close()


@needs_pebble
def test_the_replica_left_resumes_the_order_of_a_replica_killed_mid_order(tmp_path):
    """Two replicas on one address and port (SO_REUSEPORT: the kernel spreads connections over both), one
    --acme-dir. pebble's validation reaches them through a relay that holds it 2 s, so that the replica that
    orders is surely mid-order when it is killed (SIGKILL, workers too) as it answers its challenge: the other
    takes the lock within seconds, resumes that very order (pebble saw one order, no second) and serves the
    certificate."""
    http_port, https_port, pod_port = free_port(), free_port(), free_port("127.0.20.1")
    relay = _HeldRelay(("127.0.0.2", http_port), ("127.0.0.1", http_port), 2.0)
    try:
        with pebble(tmp_path, http_port, https_port) as ca:
            ca.point("app.test", "127.0.0.2")  # through the relay
            (tmp_path / "root.pem").write_text(ca.root())
            config = tmp_path / "config"
            config.mkdir()
            (config / "all.yaml").write_text(
                gateway("127.0.0.1", _listeners(http_port, https_port)) + _issuer(ca.directory, ca.api_ca)
                + service("web", [("127.0.20.1", pod_port, "web-1")])
                + route("web", "app.test", "- backendRefs: [{name: web, port: 80}]"))
            acme = str(tmp_path / "acme")
            logs = [tmp_path / "tidegate-a.log", tmp_path / "tidegate-b.log"]

            def answering() -> int | None:
                return next((n for n, log in enumerate(logs) if "ACME: answering http-01" in log.read_text()), None)

            with echo_servers({("127.0.20.1", pod_port): "default/web-1"}, tmp_path / "echo.log"), \
                    tidegate_run(config, ("127.0.0.1", http_port), logs[0], "--acme-dir", acme) as a, \
                    tidegate_run(config, ("127.0.0.1", http_port), logs[1], "--acme-dir", acme) as b:
                wait_until(lambda: answering() is not None, timeout=30, what="a replica answering its challenge")
                ordering = answering()
                assert ordering is not None
                killed, left = (a, b) if ordering == 0 else (b, a)
                for pid in [*children(killed.pid, workers_only=False), killed.pid]:
                    os.kill(pid, signal.SIGKILL)
                killed.wait(10)
                started = time.monotonic()
                wait_until(lambda: _verified(tmp_path / "root.pem", "127.0.0.1", https_port), timeout=30,
                           what="the replica left serving the certificate")
                print(f"served {time.monotonic() - started:.2f} s after the ordering replica was killed")
                assert "resuming the order for app.test placed before" in logs[1 - ordering].read_text()
                assert left.poll() is None
            pebble_log = (tmp_path / "pebble.log").read_text()
            assert pebble_log.count("Added order") == 1 and pebble_log.count("Issued certificate serial") == 1
    finally:
        relay.close()


def _issued_certificate(names: list[str], days: int = 90) -> tuple[str, str]:
    """A certificate as an ACME CA issues one (signed by a CA, with its authorityKeyIdentifier, which ACME
    Renewal Information names it by): (chain PEM, key PEM)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (leaf.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def test_renewal_follows_the_window_the_ca_suggests(tmp_path):
    """ACME Renewal Information (RFC 9773): a 90-day certificate whose CA suggests renewing it now is ordered
    again at once (not at day 60); the new one, for which the CA suggests nothing, is kept. The CA is stood
    in for (the orders and the renewal information); the manager's own loop runs."""
    import asyncio

    from tidegate.acme.client import Issued
    from tidegate.acme.manager import AcmeManager
    from tidegate.acme.store import FileStore
    from tidegate.translate.acme import Issuer, Wanted

    orders: list[float] = []
    asked: list[str] = []

    def order(issuer, names, store, journal=""):
        orders.append(time.time())
        return Issued(*reversed(_issued_certificate(list(names))))

    def renewal_window(issuer, chain, store):
        asked.append(chain)
        return (time.time() - 1 if len(asked) == 1 else None), time.time() + 3600

    async def run() -> None:
        manager = AcmeManager(FileStore(tmp_path / "acme"), order=order, renewal_window=renewal_window)
        manager.update([Wanted(Issuer("AcmeIssuer default/ca", "https://ca.test/dir"), ("app.test",), "default",
                               "acme-gw-https", "Gateway default/gw listener https")])
        deadline = time.monotonic() + 10
        while (len(orders) < 2 or len(asked) < 2) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # nothing more
        [view] = manager.view()
        await manager.close()
        assert view["state"] == "valid" and view["daysLeft"] > 89

    asyncio.run(run())
    assert len(orders) == 2 and len(asked) == 2 and asked[0] != asked[1]


def test_renewal_information_is_read_from_the_directory(tmp_path):
    """client.renewal_window against a directory with a renewalInfo URL (a stand-in CA over HTTPS): the
    suggested window and Retry-After; a directory without one (Debian's pebble 2.4 has none) gives no
    suggestion and a look again in 6 hours."""
    import http.server
    import json
    import threading

    from tests.certs import ca_and_leaf
    from tidegate.acme.client import renewal_window
    from tidegate.acme.store import FileStore
    from tidegate.translate.acme import Issuer

    ca, leaf, key = ca_and_leaf(["localhost"])
    (tmp_path / "server.pem").write_bytes(leaf + key)
    seen: list[str] = []
    offers = [True]

    class Directory(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)
            base = f"https://localhost:{self.server.server_address[1]}"
            if self.path == "/dir":
                body = {"newNonce": f"{base}/nonce", "newAccount": f"{base}/account", "newOrder": f"{base}/order",
                        **({"renewalInfo": f"{base}/renewal-info"} if offers[0] else {})}
                headers = {}
            else:
                body = {"suggestedWindow": {"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"}}
                headers = {"Retry-After": "120"}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        issuer = Issuer("AcmeIssuer default/ca", f"https://localhost:{server.server_address[1]}/dir",
                        ca_bundle=ca.decode())
        chain, _ = _issued_certificate(["app.test"])
        store = FileStore(tmp_path / "acme")
        start = time.time()
        at, check = renewal_window(issuer, chain, store)
        assert at is not None and 1767225600 <= at <= 1767312000  # within 2026-01-01 .. 2026-01-02
        assert start + 100 < check < time.time() + 140  # Retry-After: 120
        assert any(p.startswith("/renewal-info/") for p in seen)
        offers[0] = False
        at, check = renewal_window(issuer, chain, store)
        assert at is None and check > time.time() + 5 * 3600
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


@pytest.mark.skipif(CURL is None, reason="curl is not installed (scripts/test does)")
def test_a_listener_waiting_for_its_certificate_completes_no_handshake(tmp_path):
    """While its certificate cannot be had (the CA is unreachable), the HTTPS listener is open (for a
    TLS-ALPN-01 validation) but completes no ordinary handshake: nothing is served on the name, not even with
    another listener's certificate; the Gateway's HTTP listener serves meanwhile."""
    http_port, https_port, pod_port = free_port(), free_port(), free_port("127.0.20.1")
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        gateway("127.0.0.1", _listeners(http_port, https_port)) + _issuer("https://127.0.0.1:1/dir")
        + service("web", [("127.0.20.1", pod_port, "web-1")])
        + route("web", "app.test", "- backendRefs: [{name: web, port: 80}]"))
    with echo_servers({("127.0.20.1", pod_port): "default/web-1"}, tmp_path / "echo.log"), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log", "--acme-dir",
                         str(tmp_path / "acme")) as proxy:
        wait_until(lambda: "ACME: no certificate for app.test" in (tmp_path / "tidegate.log").read_text(),
                   what="the failed order")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        for name in ("app.test", "other.test", None):
            with socket.create_connection(("127.0.0.1", https_port), timeout=5) as raw:
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    context.wrap_socket(raw, server_hostname=name).close()
        done = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: app.test",
                               f"http://127.0.0.1:{http_port}/"], capture_output=True, text=True, timeout=10)
        assert done.stdout == "200"
        [certificate] = _admin(proxy, "/api/v1/certificates")["certificates"]
        assert certificate["state"] == "failed"
