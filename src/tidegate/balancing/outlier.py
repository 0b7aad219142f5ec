"""Passive health (outlier detection): consecutive failures seen in live traffic eject an endpoint.

A 5xx answer counts towards `consecutive5xx`; a 502, 503 or 504, a refused or reset connection and a timeout
count towards `consecutiveGatewayErrors` (and towards 5xx, as Envoy counts them). Any other answer resets
both. An ejection lasts baseEjectionTime × the number of ejections in a row (up to maxEjectionTime); after
it, the endpoint is back. No more than maxEjectionPercent of a backend's endpoints are out at once, but one
always may be.
"""

from __future__ import annotations

import logging

from tidegate import ir
from tidegate.balancing.state import EndpointState, Registry
from tidegate.observe.metrics import METRICS

log = logging.getLogger("tidegate.balancing")

GATEWAY_ERRORS = frozenset({502, 503, 504})


def record_outcome(registry: Registry, backend: ir.Backend, state: EndpointState, status: int | None,
                   now: float) -> None:
    """`status` is the endpoint's answer, or None when it gave none (connect failure, reset, timeout)."""
    policy = backend.policy.outlier if backend.policy is not None else None
    if policy is None:
        return
    if status is not None and status < 500:
        state.consecutive_5xx = state.consecutive_gateway_errors = 0
        if state.ejections and now - state.last_ejection > policy.max_ejection_time:
            state.ejections = 0  # well for long enough: the next ejection is short again
        return
    state.consecutive_5xx += 1
    if status is None or status in GATEWAY_ERRORS:
        state.consecutive_gateway_errors += 1
    tripped = ((policy.consecutive_5xx and state.consecutive_5xx >= policy.consecutive_5xx)
               or (policy.consecutive_gateway_errors
                   and state.consecutive_gateway_errors >= policy.consecutive_gateway_errors))
    if not tripped or state.ejected_until > now:
        return
    states = [registry.endpoint(e.address, e.port) for e in backend.endpoints]
    out = sum(1 for s in states if s.ejected_until > now)
    if out >= max(1, len(states) * policy.max_ejection_percent // 100):
        return
    state.ejections += 1
    state.last_ejection = now
    duration = min(policy.base_ejection_time * state.ejections, max(policy.max_ejection_time,
                                                                     policy.base_ejection_time))
    state.ejected_until = now + duration
    state.consecutive_5xx = state.consecutive_gateway_errors = 0
    METRICS.ejections.labels(backend.name).inc()
    log.warning("endpoint %s:%d of %s ejected for %.1fs after consecutive failures (ejection %d)",
                state.key[0], state.key[1], backend.name, duration, state.ejections)
