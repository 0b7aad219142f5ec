"""What the balancer knows about endpoints and backends, kept across configuration swaps.

An endpoint's active requests, health and ejection outlive any one IR (a reload must not forget that a pod is
failing); so do a backend's circuit-breaker counts and retry budget. `Registry.retain` drops what the new
configuration no longer names.
"""

from __future__ import annotations

import time
from typing import ClassVar, Final

from tidegate import ir
from tidegate.observe.metrics import bucket_index

EndpointKey = tuple[str, int]


LATENCY_BOUNDS: Final = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class EndpointState:
    __slots__ = ("_ejected_until", "active", "check_results", "consecutive_5xx", "consecutive_gateway_errors",
                 "ejections", "failures", "first_seen", "key", "last_ejection", "latency", "requests")

    def __init__(self, key: EndpointKey, first_seen: float):
        self.key = key
        self.active = 0  # requests in flight
        self.first_seen = first_seen  # for slow start; -inf for endpoints there when tidegate started
        self.consecutive_5xx = 0
        self.consecutive_gateway_errors = 0
        self._ejected_until = 0.0  # monotonic time; in the past = not ejected
        self.ejections = 0  # how many times in a row: the next ejection lasts longer
        self.last_ejection = 0.0
        # Active health: one verdict per check that covers this endpoint (several policies may check it).
        self.check_results: dict[ir.HealthCheck, bool] = {}
        # What the dashboard shows: tries sent here, those that failed (5xx or no answer), and upstream
        # latency counts per LATENCY_BOUNDS bucket (the last one: above them all).
        self.requests = 0
        self.failures = 0
        self.latency = [0] * (len(LATENCY_BOUNDS) + 1)

    # Bumped whenever some endpoint's usability may have changed (an ejection, an active-check verdict): the
    # balancer keeps each backend's candidates until it moves.
    changes: ClassVar[int] = 0

    @property
    def ejected_until(self) -> float:
        return self._ejected_until

    @ejected_until.setter
    def ejected_until(self, value: float) -> None:
        self._ejected_until = value
        EndpointState.changes += 1

    def set_check(self, check: ir.HealthCheck, healthy: bool) -> None:
        """An active check's verdict on this endpoint."""
        self.check_results[check] = healthy
        EndpointState.changes += 1

    def record(self, status: int | None, seconds: float) -> None:
        self.requests += 1
        if status is None or status >= 500:
            self.failures += 1
        self.latency[bucket_index(LATENCY_BOUNDS, seconds)] += 1

    @property
    def healthy(self) -> bool:
        return all(self.check_results.values())

    def usable(self, now: float) -> bool:
        return self._ejected_until <= now and (not self.check_results or all(self.check_results.values()))


class RetryBudget:
    """Retries may add `percent` of the requests plus `min_per_second`: a token bucket that each first attempt
    fills by percent/100 and time fills at min_per_second; a retry takes one token. Capped at ten seconds'
    worth, so a quiet spell does not save up a storm."""

    __slots__ = ("tokens", "updated")

    def __init__(self) -> None:
        self.tokens = -1.0  # unset until the first request says how fast to fill
        self.updated = time.monotonic()

    def _fill(self, policy: ir.RetryPolicy, now: float, requests: int) -> None:
        cap = max(1.0, policy.budget_min_per_second * 10.0 + policy.budget_percent / 10.0)
        if self.tokens < 0:
            self.tokens = float(policy.budget_min_per_second)
        self.tokens = min(cap, self.tokens + (now - self.updated) * policy.budget_min_per_second
                          + requests * policy.budget_percent / 100.0)
        self.updated = now

    def deposit(self, policy: ir.RetryPolicy, now: float) -> None:
        self._fill(policy, now, 1)

    def available(self, policy: ir.RetryPolicy, now: float) -> bool:
        self._fill(policy, now, 0)
        return self.tokens >= 1.0

    def withdraw(self) -> None:
        self.tokens -= 1.0


class BackendState:
    """Circuit-breaker counts and the retry budget of one backend (a Service port)."""

    __slots__ = ("active", "budget", "pending", "retries")

    def __init__(self) -> None:
        self.active = 0  # requests in flight
        self.pending = 0  # requests waiting for a new connection
        self.retries = 0  # retries in flight
        self.budget = RetryBudget()


class Registry:
    def __init__(self) -> None:
        self.endpoints: dict[EndpointKey, EndpointState] = {}
        self.backends: dict[str, BackendState] = {}
        self._started = False
        self.zone = ""  # tidegate's own zone (run --zone), for topology hints and zoneAware

    def endpoint(self, address: str, port: int) -> EndpointState:
        key = (address, port)
        state = self.endpoints.get(key)
        if state is None:
            state = self.endpoints[key] = EndpointState(key, time.monotonic() if self._started else float("-inf"))
        return state

    def backend(self, name: str) -> BackendState:
        state = self.backends.get(name)
        if state is None:
            state = self.backends[name] = BackendState()
        return state

    def retain(self, config: ir.IR) -> None:
        """Forget what `config` no longer uses; know the endpoints it adds (endpoints of the first
        configuration are not "new": no slow start for them)."""
        endpoints: set[EndpointKey] = set()
        backends: set[str] = set()
        for listener in config.listeners:
            routes: list[ir.HTTPRoute | ir.L4Route] = [*listener.http_routes, *listener.l4_routes]
            for route in routes:
                for backend in route.backends:
                    backends.add(backend.name)
                    for e in backend.endpoints:
                        endpoints.add((e.address, e.port))
                        self.endpoint(e.address, e.port)
        self._started = True
        for key in [k for k in self.endpoints if k not in endpoints]:
            del self.endpoints[key]
        for name in [n for n in self.backends if n not in backends]:
            del self.backends[name]
