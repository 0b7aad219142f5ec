"""Per configuration: which backend of a route (smooth weighted round robin over backendRef weights) and
which endpoint of a backend (the algorithm of its BackendPolicy, round robin by default).

Candidates, best first: ready endpoints that are neither ejected nor failing active checks; if there is none,
all ready endpoints (a balancer that refuses every endpoint helps nobody, as Envoy's panic mode reasons);
if none is ready, serving endpoints that are terminating (kube-proxy's rule: a draining pod gets new
requests only when nothing else is left).
"""

from __future__ import annotations

import time

from tidegate import ir
from tidegate.balancing.algorithms import Picker, WeightedChoice, picker_for
from tidegate.balancing.state import EndpointState, Registry

SLOW_START_MIN_WEIGHT = 0.1  # a new endpoint starts at a tenth of its share


class RouteBalancer:
    """Rebuilt with each IR; endpoint and backend state lives in the shared `Registry`."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()
        self._backends: dict[int, WeightedChoice | None] = {}
        self._pickers: dict[int, Picker] = {}

    def backend_for(self, route: ir.HTTPRoute | ir.L4Route) -> ir.Backend | None:
        key = id(route)
        choice = self._backends.get(key, False)
        if choice is False:
            live = [b for b in route.backends if b.weight > 0]
            choice = WeightedChoice(live, [b.weight for b in live]) if live else None
            self._backends[key] = choice
        return choice.pick() if choice is not None else None

    def candidates(self, backend: ir.Backend, exclude: tuple[ir.Endpoint, ...] = ()
                   ) -> tuple[list[ir.Endpoint], list[EndpointState]]:
        endpoint_state = self.registry.endpoint
        now = time.monotonic()
        ready: list[ir.Endpoint] = []
        usable: list[ir.Endpoint] = []
        usable_states: list[EndpointState] = []
        for e in backend.endpoints:
            if e.ready and e not in exclude:
                ready.append(e)
                state = endpoint_state(e.address, e.port)
                if state.usable(now):
                    usable.append(e)
                    usable_states.append(state)
        if usable:
            return usable, usable_states
        if not ready:
            ready = [e for e in backend.endpoints if e.serving and e not in exclude]
            if not ready and exclude:
                return self.candidates(backend)  # every endpoint was tried: any may be tried again
        return ready, [endpoint_state(e.address, e.port) for e in ready]

    def endpoint_for(self, backend: ir.Backend, key: str | None = None,
                     exclude: tuple[ir.Endpoint, ...] = ()) -> ir.Endpoint | None:
        """`key` feeds a consistent hash; `exclude` holds endpoints that already failed this request."""
        candidates, states = self.candidates(backend, exclude)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        picker = self._pickers.get(id(backend))
        if picker is None:
            picker = self._pickers[id(backend)] = picker_for(backend.policy)
        weights = None
        policy = backend.policy
        if policy is not None and policy.slow_start:
            weights = _slow_start_weights(states, policy.slow_start, time.monotonic())
        return picker.pick(candidates, states, weights, key)


def _slow_start_weights(states: list[EndpointState], window: float, now: float) -> list[float] | None:
    """Weights that ramp a new endpoint from a tenth to its full share over `window` seconds; None when no
    endpoint is new (the pickers' fast paths)."""
    weights = [min(1.0, max(SLOW_START_MIN_WEIGHT, (now - s.first_seen) / window)) for s in states]
    return weights if any(w < 1.0 for w in weights) else None
