"""BackendPolicy through real sockets: a pod killed under load, ejection and return, per-try timeouts, the
retry budget, active health checks, circuit breaking and sticky cookies. tidegate runs as a process; the
backends are scripted servers (tests/scripted.py) or echo processes on loopback addresses."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.harness import echo_servers, free_port, request, tidegate_run, wait_until
from tests.manifests import backend_policy, http_gateway, route, service
from tests.scripted import scripted_backends

GW = "127.0.0.1"


def _config(tmp: Path, port: int, pods: list[tuple[str, int, str]], policy: str, name: str = "app") -> Path:
    config = tmp / "config"
    config.mkdir(exist_ok=True)
    text = http_gateway(GW, port) + service(name, pods)
    text += route(name, "", f"- backendRefs: [{{name: {name}, port: 80}}]")
    text += backend_policy(f"{name}-policy", name, policy) if policy else ""
    (config / "all.yaml").write_text(text)
    return config


def _pod(reply: bytes) -> str:
    return json.loads(reply)["pod"]


def test_a_pod_killed_mid_load_costs_no_request(tmp_path):
    """Three echo pods, each its own process; one is killed a third of the way through 4 × 75 GETs that
    are in flight when it dies (each waits 20 ms at the pod). Retries on reset and refused connections, and
    ejection, hide it from every client."""
    port, pod_port = free_port(GW), free_port("127.0.2.1")
    pods = [("127.0.2.1", pod_port, "pod-a"), ("127.0.2.2", pod_port, "pod-b"), ("127.0.2.3", pod_port, "pod-c")]
    config = _config(tmp_path, port, pods, """
        retry: {attempts: 2, retryOn: [connect-failure, reset, gateway-error]}
        healthCheck: {passive: {consecutiveGatewayErrors: 2, baseEjectionTime: 30s}}""")
    failures: list[str] = []
    seen: dict[str, int] = {}
    with echo_servers({pods[0][:2]: "default/pod-a"}, tmp_path / "a.log"), \
            echo_servers({pods[2][:2]: "default/pod-c"}, tmp_path / "c.log"), \
            tidegate_run(config, (GW, port), tmp_path / "tidegate.log"):
        with echo_servers({pods[1][:2]: "default/pod-b"}, tmp_path / "b.log") as victim:

            def client(n: int) -> None:
                deadline = time.monotonic() + 60
                for i in range(75):
                    if time.monotonic() > deadline:
                        failures.append("time out of the load loop")
                        return
                    if n == 0 and i == 25:
                        victim.kill()
                    status, _, body = request(GW, port, "/?delay=20ms")
                    if status != 200:
                        failures.append(f"{status} {body[:80]!r}")
                    else:
                        pod = _pod(body)
                        seen[pod] = seen.get(pod, 0) + 1

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(client, range(4)))
    assert failures == []
    assert sum(seen.values()) == 300
    assert 0 < seen.get("pod-b", 0) < 100  # it served until it died, and not after
    assert seen["pod-a"] > 100 and seen["pod-c"] > 100


def test_a_pod_answering_503_is_ejected_and_comes_back(tmp_path):
    port, pod_port = free_port(GW), free_port("127.0.3.1")
    pods = [("127.0.3.1", pod_port, "pod-a"), ("127.0.3.2", pod_port, "pod-b"), ("127.0.3.3", pod_port, "pod-c")]
    config = _config(tmp_path, port, pods, """
        retry: {attempts: 0}
        healthCheck: {passive: {consecutiveGatewayErrors: 3, baseEjectionTime: 1s, maxEjectionPercent: 50}}""")
    with scripted_backends(*pods) as (a, b, c), tidegate_run(config, (GW, port), tmp_path / "tidegate.log"):
        b.mode = "503"
        statuses = [request(GW, port, "/")[0] for _ in range(60)]
        assert statuses.count(503) == 3  # three in a row, then out of rotation
        assert b.requests == 3
        assert a.requests + c.requests == 57
        b.mode = "ok"
        time.sleep(1.3)  # the ejection (1 s) is over
        before = b.requests
        statuses = [request(GW, port, "/")[0] for _ in range(30)]
        assert statuses == [200] * 30
        assert b.requests - before == 10  # round robin gives it its third again


def test_a_hanging_pod_trips_the_per_try_timeout_and_the_request_succeeds_elsewhere(tmp_path):
    port, pod_port = free_port(GW), free_port("127.0.4.1")
    pods = [("127.0.4.1", pod_port, "pod-a"), ("127.0.4.2", pod_port, "pod-b")]
    config = _config(tmp_path, port, pods, """
        retry: {attempts: 2, perTryTimeout: 300ms, backoff: {base: 1ms, max: 1ms}}""")
    with scripted_backends(*pods) as (a, b), tidegate_run(config, (GW, port), tmp_path / "tidegate.log"):
        b.mode = "hang"
        results = []
        for _ in range(8):
            started = time.monotonic()
            status, _, body = request(GW, port, "/")
            results.append((status, _pod(body), time.monotonic() - started))
        assert [(s, p) for s, p, _ in results] == [(200, "pod-a")] * 8
        assert b.requests >= 3  # the hanging pod was tried ...
        assert max(t for _, _, t in results) >= 0.3  # ... and given up after the per-try timeout


def test_the_retry_budget_caps_amplification_when_every_pod_fails(tmp_path):
    port, pod_port = free_port(GW), free_port("127.0.5.1")
    pods = [("127.0.5.1", pod_port, "pod-a"), ("127.0.5.2", pod_port, "pod-b"), ("127.0.5.3", pod_port, "pod-c")]
    config = _config(tmp_path, port, pods, """
        retry:
          attempts: 3
          retryOn: [gateway-error]
          backoff: {base: 1ms, max: 1ms}
          budget: {percent: 20, minRetriesPerSecond: 0}""")
    with scripted_backends(*pods) as backends, tidegate_run(config, (GW, port), tmp_path / "tidegate.log"):
        for b in backends:
            b.mode = "503"
        statuses = [request(GW, port, "/")[0] for _ in range(100)]
        seen = sum(b.requests for b in backends)
    assert statuses == [503] * 100
    # Without a budget, 3 retries each: 400. With 20 %: 100 first tries and about 20 retries.
    assert 110 <= seen <= 125, seen


def test_active_health_checks_take_a_failing_pod_out_and_bring_it_back(tmp_path):
    port, pod_port = free_port(GW), free_port("127.0.6.1")
    pods = [("127.0.6.1", pod_port, "pod-a"), ("127.0.6.2", pod_port, "pod-b")]
    config = _config(tmp_path, port, pods, """
        healthCheck:
          active: {type: HTTP, http: {path: /healthz}, interval: 100ms, timeout: 500ms,
                   healthyThreshold: 2, unhealthyThreshold: 2, jitterPercent: 0}""")
    with scripted_backends(*pods) as (a, b), tidegate_run(config, (GW, port), tmp_path / "tidegate.log") as proxy:
        b.healthy = False
        deadline = time.monotonic() + 5
        while b.health_checks < 3 and time.monotonic() < deadline:
            time.sleep(0.05)

        def only_pod_a() -> bool:
            """20 requests, none to pod-b (once the verdict has gone from the control process to the worker)."""
            before = b.requests
            return {_pod(request(GW, port, "/")[2]) for _ in range(20)} == {"pod-a"} and b.requests == before

        assert wait_until(only_pod_a, timeout=2, what="the failing pod out of rotation")
        metrics = request("127.0.0.1", proxy.admin_port, "/metrics")[2].decode()
        assert f'tidegate_endpoint_healthy{{backend="default/app:80",endpoint="127.0.6.2:{pod_port}"}} 0.0' in metrics
        assert f'tidegate_endpoint_healthy{{backend="default/app:80",endpoint="127.0.6.1:{pod_port}"}} 1.0' in metrics
        assert (f'tidegate_endpoint_requests_total{{backend="default/app:80",endpoint="127.0.6.1:{pod_port}"}} '
                f"{float(a.requests)}") in metrics
        b.healthy = True
        wait_until(lambda: {_pod(request(GW, port, "/")[2]) for _ in range(20)} == {"pod-a", "pod-b"}, timeout=3,
                   what="two passing checks bring pod-b back")
    assert a.health_checks >= 3  # the healthy pod is checked too


def test_the_circuit_breaker_refuses_what_is_over_max_requests(tmp_path):
    port, pod_port = free_port(GW), free_port("127.0.7.1")
    pods = [("127.0.7.1", pod_port, "pod-a")]
    config = _config(tmp_path, port, pods, "circuitBreaker: {maxRequests: 2}")
    with scripted_backends(*pods) as (a,), tidegate_run(config, (GW, port), tmp_path / "tidegate.log") as proxy:
        a.mode, a.slow_seconds = "slow", 1.0
        with ThreadPoolExecutor(6) as pool:
            futures = []
            for _ in range(6):
                futures.append(pool.submit(request, GW, port, "/"))
                time.sleep(0.05)
            results = [f.result() for f in futures]
        metrics = request("127.0.0.1", proxy.admin_port, "/metrics")[2].decode()
    assert sorted(s for s, _, _ in results) == [200, 200, 503, 503, 503, 503]
    refused = [h for s, h, _ in results if s == 503]
    assert all(h.get("x-tidegate-overloaded") == "max-requests" for h in refused)
    assert a.requests == 2
    assert ('tidegate_circuit_breaker_rejections_total{backend="default/app:80",limit="max-requests"} 4.0'
            in metrics)


def test_a_sticky_cookie_pins_a_client_to_its_pod(tmp_path):
    port, pod_port = free_port(GW), free_port("127.0.8.1")
    pods = [(f"127.0.8.{i}", pod_port, f"pod-{i}") for i in range(1, 5)]
    config = _config(tmp_path, port, pods, """
        loadBalancer:
          type: ConsistentHash
          consistentHash: {type: Cookie, cookie: {name: tg-session, ttl: 1h, path: /}}""")
    log = tmp_path / "tidegate.log"
    with scripted_backends(*pods), tidegate_run(config, (GW, port), log):
        pinned = set()
        for _ in range(12):  # twelve new clients
            status, headers, body = request(GW, port, "/")
            assert status == 200 and "set-cookie" in headers, (status, headers, body, log.read_text()[-2000:])
            cookie = headers["set-cookie"]
            assert cookie.startswith("tg-session=") and "Max-Age=3600" in cookie and "Path=/" in cookie
            value = cookie.split(";")[0]
            first = _pod(body)
            for _ in range(10):
                status, headers, body = request(GW, port, "/", headers={"Cookie": f"other=1; {value}"})
                assert status == 200 and "set-cookie" not in headers
                assert _pod(body) == first
            pinned.add(first)
        assert len(pinned) > 1  # clients are spread, each one stays put


def test_a_reused_connection_the_pod_dropped_is_tried_again_on_the_full_path(tmp_path):
    """As on the fast lane (test_fastlane.py), but for a rule the full path serves (it has a filter) and with
    no retry policy at all: a kept connection the pod closes unanswered as it is reused costs the client
    nothing for a GET; the request goes again on a new connection to the same pod."""
    port, pod_port = free_port(GW), free_port("127.0.2.40")
    pods = [("127.0.2.40", pod_port, "pod-a")]
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(http_gateway(GW, port) + service("app", pods) + route("app", "", """
        - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Path, value: full}]}}]
          backendRefs: [{name: app, port: 80}]"""))
    with scripted_backends(*pods) as (pod,), tidegate_run(config, (GW, port), tmp_path / "tidegate.log"):
        pod.mode = "drop-reused"
        statuses = [request(GW, port, "/")[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert pod.requests == 5  # 1 answered; then twice: dropped on the kept connection, answered on a new one
