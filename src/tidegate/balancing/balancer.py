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
        # Backend → (EndpointState.changes, valid until, candidates, their states, their weights): kept while
        # no endpoint's usability changed and no ejection of the backend's has run out.
        self._kept: dict[int, tuple[int, float, list[ir.Endpoint], list[EndpointState], list | None]] = {}

    def backend_for(self, route: ir.HTTPRoute | ir.L4Route) -> ir.Backend | None:
        key = id(route)
        if key in self._backends:
            choice = self._backends[key]
        else:
            live = [b for b in route.backends if b.weight > 0]
            choice = WeightedChoice(live, [b.weight for b in live]) if live else None
            self._backends[key] = choice
        return choice.pick() if choice is not None else None

    def _candidates_kept(self, backend: ir.Backend, now: float
                         ) -> tuple[list[ir.Endpoint], list[EndpointState], list | None]:
        """`candidates` with nothing excluded, and their weights (None: all equal), as kept from last time
        when that is still right. Not with zones: those weigh the load of each moment."""
        kept = self._kept.get(id(backend))
        if kept is not None and kept[0] == EndpointState.changes and now < kept[1]:
            return kept[2], kept[3], kept[4]
        changes = EndpointState.changes
        candidates, states = self.candidates(backend)
        weights: list | None = None
        if any(e.weight != 1 for e in candidates) and any(e.weight for e in candidates):
            weights = [e.weight for e in candidates]
        if not self.registry.zone:
            endpoint_state = self.registry.endpoint
            returns = [s.ejected_until for s in (endpoint_state(e.address, e.port) for e in backend.endpoints)
                       if s.ejected_until > now]
            self._kept[id(backend)] = (changes, min(returns, default=float("inf")), candidates, states, weights)
        return candidates, states, weights

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
        if not usable:
            if not ready:
                ready = [e for e in backend.endpoints if e.serving and e not in exclude]
                if not ready and exclude:
                    return self.candidates(backend)  # every endpoint was tried: any may be tried again
            usable, usable_states = ready, [endpoint_state(e.address, e.port) for e in ready]
        if len(usable) > 1:
            if self.registry.zone:
                usable, usable_states = self._prefer_zone(backend, usable, usable_states)
            if any(e.weight == 0 for e in usable) and any(e.weight for e in usable):
                kept = [i for i, e in enumerate(usable) if e.weight]
                usable, usable_states = [usable[i] for i in kept], [usable_states[i] for i in kept]
        return usable, usable_states

    def _prefer_zone(self, backend: ir.Backend, candidates: list[ir.Endpoint], states: list[EndpointState]
                     ) -> tuple[list[ir.Endpoint], list[EndpointState]]:
        """Topology hints (as kube-proxy uses them: only when every endpoint has some), else with
        zoneAware, the endpoints in tidegate's own zone while there are enough and they are not overloaded."""
        zone = self.registry.zone
        if all(e.hints is not None for e in candidates):
            keep = [i for i, e in enumerate(candidates) if zone in e.hints]  # type: ignore[operator]
        elif backend.policy is not None and backend.policy.zone_aware is not None:
            min_endpoints, overload_factor = backend.policy.zone_aware
            keep = [i for i, e in enumerate(candidates) if e.zone == zone]
            others = len(candidates) - len(keep)
            if len(keep) < min_endpoints or not others:
                return candidates, states
            local_load = sum(states[i].active for i in keep) / len(keep)
            other_load = (sum(s.active for s in states) - local_load * len(keep)) / others
            if local_load >= overload_factor * (other_load + 1):
                return candidates, states  # the zone is overloaded: spill over to the others
        else:
            return candidates, states
        if not keep:
            return candidates, states
        return [candidates[i] for i in keep], [states[i] for i in keep]

    def endpoint_for(self, backend: ir.Backend, key: str | None = None,
                     exclude: tuple[ir.Endpoint, ...] = (), now: float = 0.0) -> ir.Endpoint | None:
        """`key` feeds a consistent hash; `exclude` holds endpoints that already failed this request; `now`,
        if the caller has read the clock."""
        if exclude:
            candidates, states = self.candidates(backend, exclude)
            weights: list | None = None
            if any(e.weight != 1 for e in candidates) and any(e.weight for e in candidates):
                weights = [e.weight for e in candidates]
        else:
            candidates, states, weights = self._candidates_kept(backend, now or time.monotonic())
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        picker = self._pickers.get(id(backend))
        if picker is None:
            picker = self._pickers[id(backend)] = picker_for(backend.policy)
        policy = backend.policy
        if policy is not None and policy.slow_start:
            ramp = _slow_start_factors(states, policy.slow_start, now or time.monotonic())
            if ramp is not None:
                weights = [r * w for r, w in zip(ramp, weights, strict=True)] if weights else ramp
        return picker.pick(candidates, states, weights, key)


def _slow_start_factors(states: list[EndpointState], window: float, now: float) -> list[float] | None:
    """Factors that ramp a new endpoint from a tenth to its full share over `window` seconds; None when no
    endpoint is new (the pickers' fast paths)."""
    factors = [min(1.0, max(SLOW_START_MIN_WEIGHT, (now - s.first_seen) / window)) for s in states]
    return factors if any(f < 1.0 for f in factors) else None
