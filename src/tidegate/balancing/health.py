"""Active health checks: one task per (endpoint, check), however many routes and backends share it.

An endpoint is healthy until `unhealthyThreshold` checks in a row fail, then unhealthy until
`healthyThreshold` checks in a row pass (HAProxy's fall/rise). New endpoints start healthy: Kubernetes
readiness already kept them out until they were ready, and the first check runs at once. Checks start at a
random point of their interval and each wait varies by ±jitter, so checks of many endpoints do not line up.
"""

from __future__ import annotations

import asyncio
import logging
import random

from tidegate import ir
from tidegate.balancing.state import EndpointState, Registry
from tidegate.observe.metrics import METRICS

log = logging.getLogger("tidegate.health")

USER_AGENT = "tidegate-health-check"
CLOSE_TIMEOUT = 5.0


def parse_status_line(line: bytes) -> int | None:
    """The status code of an HTTP/1.x status line, or None when it is not one."""
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def status_is_healthy(check: ir.HealthCheck, status: int | None) -> bool:
    if status is None:
        return False
    if check.expected_statuses:
        return status in check.expected_statuses
    return 200 <= status < 400


async def probe(check: ir.HealthCheck, address: str, port: int) -> bool:
    """One check: a TCP connect, or an HTTP/1.1 request whose status must be an expected one."""
    writer = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(address, port)
        if check.type == "TCP":
            return True
        host = check.host or (f"[{address}]" if ":" in address else address)
        writer.write(f"{check.method} {check.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
                     "Connection: close\r\n\r\n".encode("latin-1"))
        async with asyncio.timeout(check.timeout):
            line = await reader.readline()
        return status_is_healthy(check, parse_status_line(line.rstrip(b"\r\n")))
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


class HealthChecker:
    """Keeps one checking task per (endpoint, check) that the configuration asks for."""

    def __init__(self, registry: Registry, on_change=None):
        self.registry = registry
        self._tasks: dict[tuple[str, int, ir.HealthCheck], asyncio.Task] = {}
        # Called with (address, port, check, healthy) when a verdict flips (worker processes learn them so).
        self.on_change = on_change

    def apply(self, config: ir.IR) -> None:
        wanted: dict[tuple[str, int, ir.HealthCheck], str] = {}
        for listener in config.listeners:
            for route in (*listener.http_routes, *listener.l4_routes):
                for backend in route.backends:
                    check = backend.policy.health_check if backend.policy is not None else None
                    if check is None:
                        continue
                    for e in backend.endpoints:
                        wanted.setdefault((e.address, e.port, check), backend.name)
        for key in [k for k in self._tasks if k not in wanted]:
            self._tasks.pop(key).cancel()
            state = self.registry.endpoints.get(key[:2])
            if state is not None:
                state.check_results.pop(key[2], None)
        loop = asyncio.get_running_loop()
        for key, backend_name in wanted.items():
            if key not in self._tasks:
                state = self.registry.endpoint(key[0], key[1])
                state.check_results.setdefault(key[2], True)
                self._tasks[key] = loop.create_task(self._run(state, key[2], backend_name))

    async def _run(self, state: EndpointState, check: ir.HealthCheck, backend_name: str) -> None:
        address, port = state.key
        passes = failures = 0
        await asyncio.sleep(random.uniform(0, check.interval * check.jitter))
        while True:
            ok = await probe(check, address, port)
            METRICS.health_checks.labels(backend_name, "pass" if ok else "fail").inc()
            healthy = state.check_results.get(check, True)
            if ok:
                passes, failures = passes + 1, 0
                if not healthy and passes >= check.healthy_threshold:
                    state.set_check(check, True)
                    if self.on_change is not None:
                        self.on_change(address, port, check, True)
                    log.warning("endpoint %s:%d of %s is healthy again", address, port, backend_name)
            else:
                passes, failures = 0, failures + 1
                if healthy and failures >= check.unhealthy_threshold:
                    state.set_check(check, False)
                    if self.on_change is not None:
                        self.on_change(address, port, check, False)
                    log.warning("endpoint %s:%d of %s failed %d health checks in a row: out of rotation",
                                address, port, backend_name, failures)
            await asyncio.sleep(check.interval * (1 + random.uniform(-check.jitter, check.jitter)))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            # A check that ignored its cancellation must not hold the stop up: it is left behind, and said so.
            _, left = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            if left:
                log.warning("%d health check(s) did not stop within %.0f s", len(left), CLOSE_TIMEOUT)
