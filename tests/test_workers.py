"""`tidegate run --workers 2`: two data-plane processes share the ports; the control process adds up their
metrics, runs health checks once for both, reloads both, restarts a worker that dies, and stops them all."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from tests.harness import children as _children
from tests.harness import free_port, request, tidegate_run, wait_until
from tests.manifests import actively_checked_app, http_gateway, route, service
from tests.scripted import scripted_backends

GW = "127.0.0.1"


def _metric(text: str, pattern: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(pattern + r" ([0-9.e+]+)$", text, re.MULTILINE))


def test_two_workers_share_the_traffic_and_the_metrics_add_up(tmp_path):
    port, pod_port = free_port(GW), free_port("127.0.11.1")
    pods = [("127.0.11.1", pod_port, "pod-a"), ("127.0.11.2", pod_port, "pod-b")]
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(actively_checked_app(GW, port, pods))
    with scripted_backends(*pods) as (a, b), \
            tidegate_run(config, (GW, port), tmp_path / "tidegate.log", "--workers", "2", "--grace", "2") as proxy:
        workers = wait_until(lambda: len(_children(proxy.pid)) >= 2 and _children(proxy.pid), what="two workers")
        assert len(workers) == 2
        wait_until(lambda: request("127.0.0.1", proxy.admin_port, "/readyz")[0] == 200, what="every worker applied")
        statuses = [request(GW, port, "/", headers={"Host": "app.test"})[0] for _ in range(100)]
        assert statuses == [200] * 100

        def scraped() -> str:
            return request("127.0.0.1", proxy.admin_port, "/metrics")[2].decode()

        wait_until(lambda: _metric(scraped(), r'tidegate_http_requests_total\{[^}]*route="httproute/default/app/rule/0"\}')
              == 100, what="the request counter to reach 100 across workers")
        text = scraped()
        per_worker = [_metric(text, f'tidegate_worker_requests_total{{worker="{i}"}}') for i in (0, 1)]
        assert sum(per_worker) == 100 and min(per_worker) > 0, per_worker  # the kernel spread the connections
        assert _metric(text, r'tidegate_http_request_duration_seconds_count\{[^}]*\}') == 100

        # Health checks run once, in the control process, and both workers follow the verdict.
        checks_before, started = a.health_checks, time.monotonic()
        time.sleep(1.0)
        rate = (a.health_checks - checks_before) / (time.monotonic() - started)
        assert 0 < rate <= 14, rate  # every 100 ms: about 10/s (less on a busy machine), never 20/s
        b.healthy = False

        def only_pod_a() -> bool:
            """40 requests, and the unhealthy pod saw none of them (once the verdict reached both workers:
            within a check interval and a message, or longer on a busy machine)."""
            before = b.requests
            pods_seen = {request(GW, port, "/", headers={"Host": "app.test"})[2] for _ in range(40)}
            return b.requests == before and all(b"pod-a" in body for body in pods_seen)

        wait_until(only_pod_a, what="both workers to keep traffic off the unhealthy pod")
        wait_until(lambda: 'tidegate_endpoint_healthy{backend="default/app:80",endpoint="127.0.11.2:%d"} 0.0' % pod_port
              in scraped(), what="the unhealthy endpoint in /metrics")

        # A reload reaches both workers.
        (config / "more.yaml").write_text(route("more", "more.test", "- backendRefs: [{name: app, port: 80}]"))
        wait_until(lambda: all(request(GW, port, "/", headers={"Host": "more.test"})[0] == 200 for _ in range(20)),
              what="the new route on every worker")

        # A worker that dies is replaced and gets the configuration in force. What it had reported stays
        # counted (a SIGKILL loses at most its last second).
        time.sleep(1.5)
        counted_before = _metric(scraped(), r'tidegate_http_requests_total\{[^}]*\}')
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: len(_children(proxy.pid)) == 2 and workers[0] not in _children(proxy.pid),
              what="a new worker")
        wait_until(lambda: all(request(GW, port, "/", headers={"Host": "more.test"})[0] == 200 for _ in range(20)),
              what="the new worker serves the configuration in force")
        wait_until(lambda: _metric(scraped(), r'tidegate_http_requests_total\{[^}]*\}') >= counted_before + 20,
              what="counts that never go down")

        everyone = [proxy.pid, *_children(proxy.pid, workers_only=False)]
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(30) == 0
    def gone(pid: int) -> bool:
        try:
            return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        except FileNotFoundError:
            return True

    # Workers are stopped before the control process exits; multiprocessing's resource tracker follows it
    # out a moment later (it leaves when its pipe closes).
    wait_until(lambda: all(gone(pid) for pid in everyone), timeout=10, what="no process left behind")


def _routes(first: int, count: int) -> str:
    return "".join(route(f"r{i}", f"r{i}.test", "- backendRefs: [{name: app, port: 80}]")
                   for i in range(first, first + count))


def _serve_routes_then_add_more(tmp_path, pod_address: str, initial: int, added: int, timeout: float) -> None:
    """`--workers 2` on `initial` routes (files of 10,000); then `added` more while requests flow: every
    request answered, the new routes served, no worker restarted."""
    port, pod_port = free_port(GW), free_port(pod_address)
    pods = [(pod_address, pod_port, "pod")]
    config = tmp_path / "config"
    config.mkdir()
    (config / "app.yaml").write_text(http_gateway(GW, port) + service("app", pods))
    for first in range(0, initial, 10_000):
        (config / f"routes-{first}.yaml").write_text(_routes(first, min(10_000, initial - first)))
    log = tmp_path / "tidegate.log"
    with scripted_backends(*pods), tidegate_run(config, (GW, port), log, "--workers", "2", timeout=timeout) as proxy:
        wait_until(lambda: request("127.0.0.1", proxy.admin_port, "/readyz")[0] == 200, timeout=60,
                   what=f"both workers serve {initial} routes")
        workers = sorted(_children(proxy.pid))
        assert len(workers) == 2
        hosts = [f"r{i}.test" for i in (0, initial // 2, initial - 1)]
        assert [request(GW, port, "/", headers={"Host": host})[0] for host in hosts] == [200] * 3

        (config / "more.yaml").write_text(_routes(initial, added))
        statuses: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(statuses) < 100_000:  # bounded in count and time
            statuses.append(request(GW, port, "/", headers={"Host": "r7.test"}, timeout=5)[0])
            if len(statuses) % 50 == 0 and "serving config version 2\n" in log.read_text():
                break
        last = f"r{initial + added - 1}.test"
        assert request(GW, port, "/", headers={"Host": last})[0] == 200, "the new routes are served"
        assert set(statuses) == {200}, statuses
        assert sorted(_children(proxy.pid)) == workers, "no worker was restarted"
        assert "exited with" not in log.read_text()


def test_workers_serve_thousands_of_routes_and_take_more_without_a_restart(tmp_path):
    """A configuration of thousands of routes reaches both workers whole (it once failed half-read and the
    workers restarted in a loop), and adding thousands more while requests flow loses none of them."""
    _serve_routes_then_add_more(tmp_path, "127.0.11.3", initial=2000, added=2000, timeout=15)


def test_workers_serve_a_hundred_thousand_routes_and_keep_serving_while_more_arrive(tmp_path):
    _serve_routes_then_add_more(tmp_path, "127.0.11.4", initial=100_000, added=1000, timeout=240)
