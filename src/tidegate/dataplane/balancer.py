"""Choosing a backend (smooth weighted round robin, as nginx does) and an endpoint (round robin)."""

from __future__ import annotations

from tidegate import ir


class WeightedChoice:
    """Smooth weighted round robin: over any window of sum(weights) picks, each item appears weight times,
    interleaved rather than in runs."""

    __slots__ = ("current", "items", "weights")

    def __init__(self, items: list, weights: list[int]):
        self.items = items
        self.weights = weights
        self.current = [0] * len(items)

    def pick(self):
        total = 0
        best = -1
        for i, weight in enumerate(self.weights):
            self.current[i] += weight
            total += weight
            if best < 0 or self.current[i] > self.current[best]:
                best = i
        self.current[best] -= total
        return self.items[best]


class RouteBalancer:
    """Per route rule: which backend; per backend: which endpoint. Rebuilt with each IR."""

    def __init__(self) -> None:
        self._backends: dict[int, WeightedChoice | None] = {}
        self._endpoints: dict[int, int] = {}

    def backend_for(self, route: ir.HTTPRoute | ir.L4Route) -> ir.Backend | None:
        key = id(route)
        choice = self._backends.get(key, False)
        if choice is False:
            live = [b for b in route.backends if b.weight > 0]
            choice = WeightedChoice(live, [b.weight for b in live]) if live else None
            self._backends[key] = choice
        return choice.pick() if choice is not None else None

    def endpoint_for(self, backend: ir.Backend) -> ir.Endpoint | None:
        candidates = [e for e in backend.endpoints if e.ready] or [e for e in backend.endpoints if e.serving]
        if not candidates:
            return None
        key = id(backend)
        i = self._endpoints.get(key, 0)
        self._endpoints[key] = i + 1
        return candidates[i % len(candidates)]
