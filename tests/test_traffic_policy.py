"""TrafficPolicy on a running tidegate: IP lists, request limits and local rate limits, driven by curl and by
clients bound to chosen loopback addresses (127.0.0.x), HTTP/1.1 and HTTP/2.

A 413 for a declared body reaches the client before the pod sees a byte; a body with no declared length is
cut where it passes the limit (HTTP/1.1 chunked, HTTP/2 DATA); a rate limit admits burst + rate × time
within 2 % over 10 s per client address; refusals name their rule in the access log and the metrics.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.harness import free_port, h2_request, process, tidegate_run, wait_until
from tests.certs import tls_secret_yaml
from tests.manifests import DEFAULT_INGRESS_CLASS, gateway, http_gateway, route, service
from tests.scripted import scripted_backends

GW = "127.0.0.1"
CURL = shutil.which("curl")


def _policy(name: str, target: str, spec: str, section: str = "") -> str:
    kind, _, target_name = target.partition("/")
    section_ref = f", sectionName: {section}" if section else ""
    return f"""
---
apiVersion: tidegate.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: {kind}, name: {target_name}{section_ref}}}]
{spec}"""


def _client_policy(name: str, spec: str) -> str:
    """A ClientPolicy on Gateway gw; `spec` is the YAML of its settings besides targetRefs."""
    return f"""
---
apiVersion: tidegate.io/v1alpha1
kind: ClientPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw}}]
{spec}"""


def _config(tmp_path: Path, port: int, pod_port: int) -> Path:
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        http_gateway(GW, port) + service("web", [("127.0.10.1", pod_port, "web-1")])
        + route("shop", "shop.test", """
            - name: admin
              matches: [{path: {type: PathPrefix, value: /admin}}]
              backendRefs: [{name: web, port: 80}]
            - name: upload
              matches: [{path: {type: PathPrefix, value: /upload}}]
              backendRefs: [{name: web, port: 80}]
            - name: slow
              matches: [{path: {type: PathPrefix, value: /slow}}]
              backendRefs: [{name: web, port: 80}]
            - name: pages
              backendRefs: [{name: web, port: 80}]
            """)
        + route("broken", "broken.test", "- backendRefs: [{name: web, port: 80}]")
        + _policy("edge", "Gateway/gw", "  ipAccess: {deny: [127.0.0.66]}")
        + _policy("admin", "HTTPRoute/shop", "  ipAccess: {allow: [127.0.0.1/32], deny: [127.0.0.2]}", "admin")
        + _policy("uploads", "HTTPRoute/shop", "  requestLimits: {maxBodySize: 1k}", "upload")
        + _policy("one-at-a-time", "HTTPRoute/shop", "  requestLimits: {maxInFlightPerClient: 1}", "slow")
        + _policy("pages", "HTTPRoute/shop", """  rateLimit:
    responseHeaders: Draft10
    rules:
      - {name: health, match: {path: {type: Exact, value: /healthz}}, exempt: true}
      - {name: per-client, limit: {requests: 5, period: 60s}}""", "pages")
        + _policy("typo", "HTTPRoute/broken", "  ipAccess: {allow: [10.0.0.0/33]}"))
    return config


def _get(path: str, port: int, source: str = "127.0.0.1", host: str = "shop.test", method: str = "GET",
         body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(GW, port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.mark.skipif(CURL is None, reason="curl is not installed (scripts/test installs it)")
def test_ip_lists_body_limits_in_flight_and_rate_limits_with_real_clients(tmp_path):
    port, pod_port = free_port(GW), free_port("127.0.10.1")
    config = _config(tmp_path, port, pod_port)
    access = tmp_path / "access.log"
    with scripted_backends(("127.0.10.1", pod_port, "web-1")) as (pod,), tidegate_run(
            config, (GW, port), tmp_path / "tidegate.log", "--access-log", "json", "--access-log-file",
            str(access)) as proxy:
        # IP lists: the rule's own list replaces the Gateway's (section by section); deny wins over allow.
        assert _get("/admin", port)[0] == 200
        status, _, body = _get("/admin", port, source="127.0.0.2")
        assert status == 403 and b"denied" in body
        assert _get("/admin", port, source="127.0.0.3")[0] == 403  # not in allow
        assert _get("/upload", port, source="127.0.0.66")[0] == 403  # the Gateway's deny list
        assert _get("/upload", port, source="127.0.0.3")[0] == 200

        # A declared body over maxBodySize: 413 from curl's own upload, and the pod saw nothing.
        seen = pod.requests
        (tmp_path / "2k").write_bytes(b"x" * 2048)
        out = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary",
                              f"@{tmp_path / '2k'}", "-H", "Host: shop.test", f"http://{GW}:{port}/upload"],
                             capture_output=True, text=True, timeout=30)
        assert out.stdout == "413", out
        assert pod.requests == seen
        small = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "small",
                                "-H", "Host: shop.test", f"http://{GW}:{port}/upload"],
                               capture_output=True, text=True, timeout=30)
        assert small.stdout == "200" and pod.requests == seen + 1
        # No declared length (chunked): cut with 413 where it passes the limit.
        with socket.create_connection((GW, port), timeout=10) as raw:
            # One write: tidegate answers as the body passes the limit and may close before a later write came,
            # which would fail here (EPIPE) without saying anything about tidegate.
            raw.sendall(b"POST /upload HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n"
                        b"Connection: close\r\n\r\n" + (b"200\r\n" + b"y" * 512 + b"\r\n") * 4 + b"0\r\n\r\n")
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # HTTP/2 DATA frames with no content-length: the stream gets 413.
        status, _, _ = h2_request(GW, port, "shop.test", "/upload", "POST", b"z" * 4096)
        assert status == 413

        # maxInFlightPerClient 1: a second request while the first is served gets 429; then it is free again.
        pod.mode, pod.slow_seconds = "slow", 1.0
        first: list[int] = []
        slow = threading.Thread(target=lambda: first.append(_get("/slow", port)[0]))
        slow.start()
        wait_until(lambda: pod.requests > seen + 1, what="the first slow request at the pod")
        assert _get("/slow", port)[0] == 429
        assert _get("/slow", port, source="127.0.0.5")[0] == 200  # another client is not held back
        slow.join(10)
        assert first == [200]
        pod.mode = "ok"
        assert _get("/slow", port)[0] == 200

        # Rate limit: 5 a minute per client, with the draft's RateLimit headers; /healthz is exempt.
        remaining = []
        for _ in range(5):
            status, headers, _ = _get("/page", port, source="127.0.0.7")
            assert status == 200 and headers["RateLimit-Policy"] == '"per-client";q=5;w=60'
            remaining.append(headers["RateLimit"])
        assert [r.split(";")[1] for r in remaining] == ["r=4", "r=3", "r=2", "r=1", "r=0"]
        status, headers, _ = _get("/page", port, source="127.0.0.7")
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 12, headers
        assert headers["RateLimit"].startswith('"per-client";r=0;t=')
        assert _get("/healthz", port, source="127.0.0.7")[0] == 200
        curl_limited = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface",
                                       "127.0.0.7", "-H", "Host: shop.test", f"http://{GW}:{port}/page"],
                                      capture_output=True, text=True, timeout=30)
        assert curl_limited.stdout == "429"
        assert _get("/page", port, source="127.0.0.8")[0] == 200  # its own count

        # An invalid policy: its route answers 500 saying why (fail closed).
        status, _, body = _get("/", port, host="broken.test")
        assert status == 500 and b"TrafficPolicy default/typo is invalid" in body

        # Refusals are in the metrics and in the access log, with the rule that refused.
        refusals = [line for line in _get_metrics(proxy.admin_port).splitlines()
                    if line.startswith("tidegate_traffic_policy_refusals_total{")]
        for rule, result in (("ipAccess.deny", "denied"), ("ipAccess.allow", "denied"),
                             ("requestLimits.maxBodySize", "too-large"),
                             ("requestLimits.maxInFlightPerClient", "limited"),
                             ("TrafficPolicy default/pages: per-client", "limited")):
            assert any(f'rule="{rule}"' in line and f'result="{result}"' in line for line in refusals), (rule, refusals)
        lines = wait_until(lambda: [json.loads(line) for line in access.read_text().splitlines()
                                    if '"status":429' in line and "per-client" in line],
                           what="the 429 in the access log")
        assert lines[0]["policy"] == "TrafficPolicy default/pages: per-client" and lines[0]["client"] == "127.0.0.7"


def _get_metrics(admin_port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    conn.request("GET", "/metrics")
    return conn.getresponse().read().decode()


def test_a_local_rate_limit_admits_burst_plus_rate_times_time_within_2_percent(tmp_path):
    """Three client addresses each offering twice the limit for 10 s (bounded: 2,100 requests each at most):
    each is admitted burst + rate × its time, within 2 %."""
    port, pod_port = free_port(GW), free_port("127.0.10.1")
    config = tmp_path / "config"
    config.mkdir()
    rate, burst, seconds = 50, 10, 10.0
    (config / "all.yaml").write_text(
        http_gateway(GW, port) + service("web", [("127.0.10.1", pod_port, "web-1")])
        + route("shop", "", "- backendRefs: [{name: web, port: 80}]")
        + _policy("limit", "Gateway/gw", f"""  rateLimit:
    rules: [{{name: per-client, limit: {{requests: {rate}, period: 1s}}, burst: {burst}}}]"""))
    results: dict[str, tuple[int, int, float]] = {}

    def load(source: str) -> None:
        conn = http.client.HTTPConnection(GW, port, timeout=10, source_address=(source, 0))
        admitted = refused = 0
        start = time.monotonic()
        first = last = 0.0
        for n in range(int(seconds * rate * 2.1)):
            due = start + n / (rate * 2)  # twice the rate, evenly
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() - start > seconds:
                break
            conn.request("GET", "/", headers={"Host": "shop.test"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                admitted += 1
                last = time.monotonic()
                first = first or last
            else:
                assert resp.status == 429, resp.status
                refused += 1
        conn.close()
        results[source] = (admitted, refused, last - first)

    with scripted_backends(("127.0.10.1", pod_port, "web-1")), \
            tidegate_run(config, (GW, port), tmp_path / "tidegate.log"):
        threads = [threading.Thread(target=load, args=(f"127.0.0.{n}",)) for n in (11, 12, 13)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 20)
    for source, (admitted, refused, span) in results.items():
        expected = burst + rate * span
        print(f"{source}: admitted {admitted}, refused {refused} over {span:.2f} s; expected {expected:.0f}")
        assert refused > 0.3 * (admitted + refused), (source, admitted, refused)  # it was over the limit
        assert abs(admitted - expected) <= 0.02 * expected, (source, admitted, expected)
    assert len(results) == 3


def test_explain_says_what_the_policy_would_decide_for_a_client(tmp_path):
    from tests.test_cli import tidegate

    config = _config(tmp_path, 8080, 9090)
    denied = tidegate("explain", str(config), "--url", "http://shop.test:8080/admin", "--client-ip", "127.0.0.2")
    assert "guard     ipAccess: allow 127.0.0.1/32; deny 127.0.0.2/32; → 127.0.0.2: 403 (denied)  <- " \
           "TrafficPolicy default/admin on HTTPRoute default/shop section admin" in denied.stdout, denied.stdout
    counted = tidegate("explain", str(config), "--url", "http://shop.test:8080/page", "--client-ip", "10.0.0.1")
    assert "health: exempt [does not match]; per-client: 5 per 60s, burst 5, by ClientIP [counts this request], " \
           "RateLimit headers" in counted.stdout, counted.stdout
    assert "ipAccess: deny 127.0.0.66/32; → 10.0.0.1: let in  <- TrafficPolicy default/edge on Gateway default/gw" \
        in counted.stdout


def test_a_bad_redis_url_or_timeout_is_a_usage_error(tmp_path):
    from tests.test_cli import tidegate

    config = _config(tmp_path, 8080, 9090)
    for flags, said in ((["--rate-limit-redis", "http://127.0.0.1:6379"], "a Redis URL is"),
                        (["--rate-limit-redis", "redis://127.0.0.1:6379/zero"], "a Redis URL is"),
                        (["--rate-limit-redis-timeout", "0"], "--rate-limit-redis-timeout must be"),
                        (["--rate-limit-replicas", "0"], "--rate-limit-replicas must be")):
        result = tidegate("run", "-f", str(config), *flags)
        assert result.returncode == 2 and said in result.stderr, (flags, result.stderr)


def test_ingress_nginx_annotations_protect_an_ingress(tmp_path):
    """An Ingress written for ingress-nginx: whitelist-source-range, limit-rps with its burst multiplier,
    limit-whitelist (exempt), proxy-body-size; tidegate.io/ twins win."""
    port, pod_port = free_port(GW), free_port("127.0.10.1")
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(service("web", [("127.0.10.1", pod_port, "web-1")]) + DEFAULT_INGRESS_CLASS + """
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: shop
  namespace: default
  annotations:
    nginx.ingress.kubernetes.io/whitelist-source-range: "127.0.0.0/24"
    nginx.ingress.kubernetes.io/limit-rps: "1"
    nginx.ingress.kubernetes.io/limit-burst-multiplier: "1"
    nginx.ingress.kubernetes.io/limit-whitelist: "127.0.0.9"
    nginx.ingress.kubernetes.io/proxy-body-size: 8m
    tidegate.io/proxy-body-size: 1k
spec:
  rules:
    - host: shop.test
      http:
        paths:
          - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}
""")
    with scripted_backends(("127.0.10.1", pod_port, "web-1")), tidegate_run(
            config, (GW, port), tmp_path / "tidegate.log", "--ingress-http-port", str(port), "--bind", GW):
        assert _get("/", port, source="127.0.0.1")[0] == 200
        assert _get("/", port, source="127.0.0.1")[0] == 429  # 1 a second, burst 1 × 1
        assert _get("/", port, source="127.0.0.2")[0] == 200  # its own count
        assert [_get("/", port, source="127.0.0.9")[0] for _ in range(3)] == [200, 200, 200]  # exempt
        assert _get("/", port, source="127.0.1.1")[0] == 403  # not in the whitelist
        assert _get("/", port, source="127.0.0.3", method="POST", body=b"x" * 2000)[0] == 413  # the twin: 1k


def test_client_policy_client_address_from_trusted_proxies_and_connection_caps(tmp_path):
    """ClientPolicy: X-Forwarded-For is believed from 127.0.0.1 only (a TrafficPolicy deny list then sees the
    real client; an untrusted peer's header changes nothing; the access log writes the client); two
    connections per client at most, the third closed at once, others unaffected."""
    port, pod_port = free_port(GW), free_port("127.0.10.1")
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        http_gateway(GW, port) + service("web", [("127.0.10.1", pod_port, "web-1")])
        + route("shop", "", "- backendRefs: [{name: web, port: 80}]")
        + _policy("deny", "Gateway/gw", "  ipAccess: {deny: [203.0.113.66]}") + _client_policy(
            "edge", "  clientIP: {xForwardedFor: {trustedCIDRs: [127.0.0.1/32]}}\n  connections: {maxPerClient: 2}"))
    access = tmp_path / "access.log"

    def get(source: str, forwarded: str) -> int:
        conn = http.client.HTTPConnection(GW, port, timeout=10, source_address=(source, 0))
        conn.request("GET", "/", headers={"Host": "shop.test", "X-Forwarded-For": forwarded})
        status = conn.getresponse().status
        conn.close()
        return status

    with scripted_backends(("127.0.10.1", pod_port, "web-1")), tidegate_run(
            config, (GW, port), tmp_path / "tidegate.log", "--access-log", "json", "--access-log-file",
            str(access)) as proxy:
        assert get("127.0.0.1", "203.0.113.66") == 403  # a trusted proxy says who the client is
        assert get("127.0.0.1", "203.0.113.66, 127.0.0.1") == 403  # itself trusted: skipped
        assert get("127.0.0.1", "203.0.113.7") == 200
        assert get("127.0.0.2", "203.0.113.66") == 200  # an untrusted peer: its own address counts
        entries = wait_until(lambda: [json.loads(line) for line in access.read_text().splitlines()],
                             what="access log lines")
        assert [e["client"] for e in entries][:4] == ["203.0.113.66", "203.0.113.66", "203.0.113.7", "127.0.0.2"]

        held = [socket.create_connection((GW, port), timeout=5, source_address=("127.0.0.4", 0)) for _ in range(2)]
        try:
            third = socket.create_connection((GW, port), timeout=5, source_address=("127.0.0.4", 0))
            try:
                third.sendall(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
                answer = third.recv(100)
            except ConnectionError:
                answer = b""
            third.close()
            assert answer == b""  # closed at once, unanswered
            assert get("127.0.0.5", "") == 200  # another client is not held back
            held[0].sendall(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            assert held[0].recv(100).startswith(b"HTTP/1.1 200")  # the two held ones are served
            held.pop(0).close()
            wait_until(lambda: get("127.0.0.4", "") == 200, what="a connection freed for 127.0.0.4")
        finally:
            for sock in held:
                sock.close()
        hits = [line for line in _get_metrics(proxy.admin_port).splitlines()
                if line.startswith('tidegate_limit_hits_total{limit="connections-per-client"}')]
        assert hits and float(hits[0].split()[-1]) >= 1, hits


def test_an_event_loop_that_runs_late_sheds_new_requests_until_it_keeps_time(tmp_path):
    """ClientPolicy overload (maxEventLoopLag 100ms): the worker stopped for 0.4 s (SIGSTOP) runs late when it
    resumes; requests then get 503 with Retry-After and X-Tidegate-Overloaded: loop, and 200 again once it
    keeps time (bounded: 400 requests or 20 s)."""
    import os
    import signal

    from tests.harness import worker_pid

    port, pod_port = free_port(GW), free_port("127.0.10.1")
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        http_gateway(GW, port) + service("web", [("127.0.10.1", pod_port, "web-1")])
        + route("shop", "", "- backendRefs: [{name: web, port: 80}]")
        + _client_policy("shed", "  overload: {maxEventLoopLag: 100ms}"))
    answers: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client() -> None:  # one keep-alive connection (new ones are closed at once while it sheds)
        deadline = time.monotonic() + 20
        conn = http.client.HTTPConnection(GW, port, timeout=10)
        for _ in range(400):
            if stop.is_set() or time.monotonic() > deadline:
                break
            try:
                conn.request("GET", "/", headers={"Host": "shop.test"})
                resp = conn.getresponse()
                resp.read()
                answers.append((time.monotonic(), resp.status, resp.getheader("X-Tidegate-Overloaded") or ""))
            except (ConnectionError, http.client.HTTPException):
                answers.append((time.monotonic(), 0, "closed"))
                conn.close()
                conn = http.client.HTTPConnection(GW, port, timeout=10)
            time.sleep(0.01)
        conn.close()

    with scripted_backends(("127.0.10.1", pod_port, "web-1")), tidegate_run(
            config, (GW, port), tmp_path / "tidegate.log") as proxy:
        worker = worker_pid(proxy)
        loader = threading.Thread(target=client)
        loader.start()
        try:
            wait_until(lambda: len(answers) > 10, what="answers before the stall")
            assert {status for _, status, _ in answers} == {200}
            os.kill(worker, signal.SIGSTOP)
            time.sleep(0.4)
            resumed = time.monotonic()
            os.kill(worker, signal.SIGCONT)
            wait_until(lambda: any(t > resumed + 0.3 and s == 200 for t, s, _ in answers), timeout=10,
                       what="200s again after the stall")
        finally:
            stop.set()
            loader.join(30)
        after = [(t - resumed, s, why) for t, s, why in answers if t > resumed]
        shed = [a for a in after if a[1] != 200]
        assert any(s == 503 and why == "loop" for _, s, why in shed), after[:10]
        assert all(s == 0 or why == "loop" for _, s, why in shed), after[:10]  # 503 with the header, or closed
        assert max(t for t, _, _ in shed) < 0.3, after[:20]  # once it keeps time, it serves again
        limits = [line for line in _get_metrics(proxy.admin_port).splitlines()
                  if line.startswith('tidegate_limit_hits_total{limit="overload"}')]
        assert limits and float(limits[0].split()[-1]) >= 1


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/test installs it)")
def test_the_proxy_protocol_from_a_trusted_haproxy_gives_the_client_address(tmp_path):
    """Debian's HAProxy in front (send-proxy-v2), trusted by a ClientPolicy: the TrafficPolicy deny list and the
    access log see the clients behind it; a version 1 header works too; a trusted peer that sends no header
    is cut off; an untrusted peer is served as it is."""
    port, pod_port, front = free_port(GW), free_port("127.0.10.1"), free_port("127.0.0.20")
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        http_gateway(GW, port) + service("web", [("127.0.10.1", pod_port, "web-1")])
        + route("shop", "", "- backendRefs: [{name: web, port: 80}]")
        + _policy("deny", "Gateway/gw", "  ipAccess: {deny: [127.0.0.66]}") + _client_policy(
            "behind-haproxy", "  clientIP: {proxyProtocol: {trustedCIDRs: [127.0.0.20/32]}}"))
    haproxy_cfg = tmp_path / "haproxy.cfg"
    haproxy_cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.20:{front}
    default_backend tidegate
backend tidegate
    source 127.0.0.20
    server t {GW}:{port} send-proxy-v2
""")
    access = tmp_path / "access.log"
    with scripted_backends(("127.0.10.1", pod_port, "web-1")), tidegate_run(
            config, (GW, port), tmp_path / "tidegate.log", "--access-log", "json", "--access-log-file",
            str(access)), process([shutil.which("haproxy"), "-db", "-f", str(haproxy_cfg)], tmp_path / "haproxy.log",
                                  ready=("127.0.0.20", front)):
        def through(source: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.20", front, timeout=10, source_address=(source, 0))
            conn.request("GET", "/", headers={"Host": "shop.test"})
            status = conn.getresponse().status
            conn.close()
            return status

        assert through("127.0.0.9") == 200
        assert through("127.0.0.66") == 403  # the client behind HAProxy is the one denied
        entries = wait_until(lambda: [json.loads(line) for line in access.read_text().splitlines()][:2] or None,
                             what="access log lines")
        assert [e["client"] for e in entries[:2]] == ["127.0.0.9", "127.0.0.66"]
        # Version 1, by hand, from the trusted address.
        with socket.create_connection((GW, port), timeout=5, source_address=("127.0.0.20", 0)) as raw:
            raw.sendall(b"PROXY TCP4 127.0.0.66 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: shop.test\r\n"
                        b"Connection: close\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 403")
        # The trusted address without a header: cut off, unanswered.
        with socket.create_connection((GW, port), timeout=5, source_address=("127.0.0.20", 0)) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            try:
                answer = raw.recv(100)
            except ConnectionError:
                answer = b""
            assert answer == b""
        assert _get("/", port, source="127.0.0.2")[0] == 200  # an untrusted peer: served as it is


@pytest.mark.skipif(shutil.which("haproxy") is None or CURL is None,
                    reason="haproxy and curl are not installed (scripts/test installs them)")
def test_the_proxy_protocol_before_tls_and_on_tcp_listeners_with_haproxy_in_front(tmp_path):
    """HAProxy in TCP mode in front of an HTTPS listener (send-proxy-v2) and a TCP listener (send-proxy, version
    1): tidegate reads the header before the TLS handshake (curl's HTTP/2 by ALPN through it) and before the
    relayed bytes; the deny list and the access log see the clients behind HAProxy. A trusted peer that sends no
    header is closed at the policy's tlsHandshake time; an untrusted one is served as it is, and one that stalls
    its handshake is closed at that time too."""
    https_port, tcp_port = free_port(GW), free_port(GW)
    pod_port, front_https, front_tcp = free_port("127.0.10.1"), free_port("127.0.0.20"), free_port("127.0.0.20")
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        gateway(GW, f"""
          - {{name: https, port: {https_port}, protocol: HTTPS, hostname: shop.test,
             tls: {{certificateRefs: [{{name: shop-cert}}]}}}}
          - {{name: tcp, port: {tcp_port}, protocol: TCP}}""")
        + "---\n" + tls_secret_yaml("default", "shop-cert", ["shop.test"])
        + service("web", [("127.0.10.1", pod_port, "web-1")])
        + route("shop", "shop.test", "- backendRefs: [{name: web, port: 80}]")
        + """
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: raw, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: tcp}]
  rules: [{backendRefs: [{name: web, port: 80}]}]"""
        + _policy("deny", "Gateway/gw", "  ipAccess: {deny: [127.0.0.66]}") + _client_policy(
            "behind-haproxy", "  clientIP: {proxyProtocol: {trustedCIDRs: [127.0.0.20/32]}}\n"
                              "  timeouts: {tlsHandshake: 1s}"))
    haproxy_cfg = tmp_path / "haproxy.cfg"
    haproxy_cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend https
    bind 127.0.0.20:{front_https}
    default_backend https
backend https
    source 127.0.0.20
    server t {GW}:{https_port} send-proxy-v2
frontend tcp
    bind 127.0.0.20:{front_tcp}
    default_backend tcp
backend tcp
    source 127.0.0.20
    server t {GW}:{tcp_port} send-proxy
""")
    access = tmp_path / "access.log"
    with scripted_backends(("127.0.10.1", pod_port, "web-1")), tidegate_run(
            config, (GW, https_port), tmp_path / "tidegate.log", "--access-log", "json", "--access-log-file",
            str(access)) as proxy, process([shutil.which("haproxy"), "-db", "-f", str(haproxy_cfg)],
                                           tmp_path / "haproxy.log", ready=("127.0.0.20", front_tcp)):
        def curl(port: int, source: str, address: str = "127.0.0.20") -> tuple[str, str]:
            done = subprocess.run([CURL, "-sk", "--interface", source, "--resolve", f"shop.test:{port}:{address}",
                                   "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                                   f"https://shop.test:{port}/"], capture_output=True, text=True, timeout=20)
            code, _, version = done.stdout.partition(" ")
            return code, version

        assert curl(front_https, "127.0.0.9") == ("200", "2")  # HTTP/2 by ALPN, through the PROXY header
        assert curl(front_https, "127.0.0.66")[0] == "403"  # the client behind HAProxy is the one denied
        assert curl(https_port, "127.0.0.66", GW)[0] == "403"  # straight in: its own address
        assert curl(https_port, "127.0.0.2", GW) == ("200", "2")  # an untrusted peer: served as it is

        with socket.create_connection(("127.0.0.20", front_tcp), timeout=10, source_address=("127.0.0.9", 0)) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := raw.recv(65536)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]

        def entries() -> list[dict] | None:
            lines = [json.loads(line) for line in access.read_text().splitlines()] if access.exists() else []
            return lines if len([e for e in lines if e.get("client") == "127.0.0.9"]) == 2 else None

        logged = wait_until(entries, what="access log lines for every request and the TCP connection")
        https = [e["client"] for e in logged if e.get("protocol") != "tcp"]
        assert https == ["127.0.0.9", "127.0.0.66", "127.0.0.66", "127.0.0.2"], logged
        tcp = [e["client"] for e in logged if e.get("protocol") == "tcp"]  # HAProxy's readiness probe's first
        assert "127.0.0.9" in tcp and "127.0.0.20" not in tcp, logged

        # The trusted address with no header, and an untrusted client that stalls its handshake: both closed
        # at the policy's tlsHandshake (1 s), not asyncio's 60 s; the trusted address sending TLS at once.
        for source, sent, within in (("127.0.0.20", b"", (0.8, 5)), ("127.0.0.3", b"\x16\x03\x01", (0.8, 5)),
                                     ("127.0.0.20", b"\x16\x03\x01", (0, 0.5))):
            with socket.create_connection((GW, https_port), timeout=10, source_address=(source, 0)) as raw:
                began = time.monotonic()
                raw.sendall(sent)  # the start of a TLS record, and then nothing
                try:
                    assert raw.recv(100) == b""
                except ConnectionError:
                    pass
                took = time.monotonic() - began
                assert within[0] <= took < within[1], (source, sent, took)
        hits = [line for line in _get_metrics(proxy.admin_port).splitlines()
                if line.startswith('tidegate_limit_hits_total{limit="proxy-protocol"}')]
        assert hits and float(hits[0].split()[-1]) == 2


def _h2_settings_and_calm(port: int, pings: int) -> tuple[int | None, int | None]:
    """An h2c client on `port`: the server's SETTINGS_MAX_CONCURRENT_STREAMS, and the GOAWAY error code after
    `pings` PINGs (None: no GOAWAY)."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    streams, calm = None, None
    with socket.create_connection((GW, port), timeout=5) as sock:
        sock.sendall(client.data_to_send())
        for n in range(pings):
            client.ping(n.to_bytes(8, "big"))
        sock.sendall(client.data_to_send())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and calm is None:
            try:
                data = sock.recv(65536)
            except (ConnectionError, TimeoutError):
                break
            if not data:
                break
            for event in client.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                    streams = changed.new_value if changed is not None else streams
                elif isinstance(event, h2.events.ConnectionTerminated):
                    calm = int(event.error_code)
            if pings == 0 and streams is not None:
                break
    return streams, calm


def test_client_policy_timeouts_and_http2_limits_apply_to_their_listener_only(tmp_path):
    """A ClientPolicy on one listener (sectionName): its requestHead, idle and HTTP/2 limits hold there, while
    a listener of the same Gateway without one keeps the defaults; a reload that drops the policy gives the
    defaults back to new connections."""
    strict, plain, pod_port = free_port(GW), free_port(GW), free_port("127.0.10.1")
    config = tmp_path / "config"
    config.mkdir()
    policy = """
---
apiVersion: tidegate.io/v1alpha1
kind: ClientPolicy
metadata: {name: strict, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw, sectionName: strict}]
  timeouts: {requestHead: 1s, idle: 1s}
  http2: {maxConcurrentStreams: 5, controlFrames: {burst: 10, perSecond: 1}}"""
    base = (gateway(GW, f"""
          - {{name: strict, port: {strict}, protocol: HTTP}}
          - {{name: plain, port: {plain}, protocol: HTTP}}""")
            + service("web", [("127.0.10.1", pod_port, "web-1")])
            + route("shop", "", "- backendRefs: [{name: web, port: 80}]"))
    (config / "all.yaml").write_text(base + policy)

    def slow_head(port: int, wait: float) -> tuple[bytes, float]:
        with socket.create_connection((GW, port), timeout=wait, source_address=("127.0.0.1", 0)) as raw:
            began = time.monotonic()
            raw.sendall(b"GET / HTTP/1.1\r\nHost: shop.test\r\n")  # and the head never ends
            try:
                return raw.recv(100), time.monotonic() - began
            except TimeoutError:
                return b"", time.monotonic() - began

    def idle_closed(port: int, wait: float) -> bool:
        with socket.create_connection((GW, port), timeout=wait) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += raw.recv(65536)
            try:
                return raw.recv(100) == b""  # kept alive: closed when idle
            except TimeoutError:
                return False

    with scripted_backends(("127.0.10.1", pod_port, "web-1")), tidegate_run(
            config, (GW, strict), tmp_path / "tidegate.log") as proxy:
        answer, took = slow_head(strict, 5)
        assert answer.startswith(b"HTTP/1.1 408") and 0.9 <= took < 3, (answer, took)
        assert slow_head(plain, 2.5)[0] == b""  # the default: 30 s
        assert idle_closed(strict, 5) and not idle_closed(plain, 2.5)
        assert _h2_settings_and_calm(strict, 0)[0] == 5
        assert _h2_settings_and_calm(plain, 0)[0] == 128
        assert _h2_settings_and_calm(strict, 50)[1] == 11  # ENHANCE_YOUR_CALM, past a burst of 10
        assert _h2_settings_and_calm(plain, 50)[1] is None  # the default burst: 1,000

        (config / "all.yaml").write_text(base)
        wait_until(lambda: _h2_settings_and_calm(strict, 0)[0] == 128, what="the defaults back after the reload")
        assert slow_head(strict, 2.5)[0] == b""
        hits = [line for line in _get_metrics(proxy.admin_port).splitlines()
                if line.startswith('tidegate_limit_hits_total{limit="request-head-timeout"}')]
        assert hits and float(hits[0].split()[-1]) == 1
