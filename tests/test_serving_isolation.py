"""Serving never waits on the control plane: while a large file is read and while thousands of routes are
added, requests keep being answered without a gap (the rule in the README's "Limits and defaults")."""

from __future__ import annotations

import gc
import http.client
import time
from pathlib import Path

from tests.harness import free_port, tidegate_run, wait_until
from tests.manifests import http_gateway, route, service
from tests.scripted import scripted_backends

GW = "127.0.0.1"
MAX_GAP = 0.1  # seconds between two answers, at most


def _services(count: int) -> str:
    return "".join(f"""---
apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: default, labels: {{app: app-{i}, tier: web}}}}
spec: {{ports: [{{name: http, port: 80, targetPort: 8080}}], selector: {{app: app-{i}}}}}
""" for i in range(count))


def _routes(first: int, count: int) -> str:
    return "".join(route(f"r{i}", f"r{i}.test", "- backendRefs: [{name: app, port: 80}]")
                   for i in range(first, first + count))


def _serve_while(port: int, done, seconds: float) -> tuple[list[int], float, int]:
    """Requests one after another on a keep-alive connection (a new one when it closes) until `done()` or
    `seconds` have passed: the statuses, the longest gap between two answers, and how many were answered."""
    statuses: list[int] = []
    gc.disable()  # this process's own collections would count as gaps
    longest, last = 0.0, time.monotonic()
    deadline = last + seconds
    conn = http.client.HTTPConnection(GW, port, timeout=5)
    try:
        while time.monotonic() < deadline and len(statuses) < 200_000:  # bounded in count and time
            conn.request("GET", "/", headers={"Host": "r0.test"})
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            now = time.monotonic()
            longest, last = max(longest, now - last), now
            if len(statuses) % 50 == 0 and done():
                break
    finally:
        gc.enable()
        conn.close()
    return statuses, longest, len(statuses)


def _start(tmp_path: Path):
    port, pod_port = free_port(GW), free_port("127.0.11.5")
    pods = [("127.0.11.5", pod_port, "pod-e")]
    config = tmp_path / "config"
    config.mkdir()
    (config / "app.yaml").write_text(http_gateway(GW, port) + service("app", pods) + _routes(0, 10))
    return port, pods, config, tmp_path / "tidegate.log"


def _applied(log: Path, version: int):
    return lambda: f"serving config version {version}\n" in log.read_text()


def test_a_large_file_is_read_while_requests_flow_without_a_gap(tmp_path):
    port, pods, config, log = _start(tmp_path)
    big = _services(40_000)  # about 9 MB: some ten seconds of reading and validating
    with scripted_backends(*pods), tidegate_run(config, (GW, port), log):
        (config / "big.yaml").write_text(big)
        statuses, longest, count = _serve_while(port, _applied(log, 2), seconds=120)
        assert _applied(log, 2)(), "the large file was applied"
    assert set(statuses) == {200} and count > 100
    assert longest < MAX_GAP, f"{longest * 1000:.0f} ms without an answer"


def test_ten_thousand_routes_are_added_while_requests_flow_without_a_gap(tmp_path):
    port, pods, config, log = _start(tmp_path)
    more = _routes(10, 10_000)
    with scripted_backends(*pods), tidegate_run(config, (GW, port), log):
        (config / "more.yaml").write_text(more)
        statuses, longest, count = _serve_while(port, _applied(log, 2), seconds=120)
        assert _applied(log, 2)(), "the routes were applied"
        wait_until(lambda: http_status(port, "r10009.test") == 200, what="the last new route served")
    assert set(statuses) == {200} and count > 100
    assert longest < MAX_GAP, f"{longest * 1000:.0f} ms without an answer"


def http_status(port: int, host: str) -> int:
    conn = http.client.HTTPConnection(GW, port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        return conn.getresponse().status
    finally:
        conn.close()
