"""Which failures of one try may become another try, and how long to wait before it.

Only what is safe is retried. A connection that could not be made sent nothing, so any request may go
elsewhere. After bytes were sent (a reset, a timeout, a bad status), only a request without a body and with
an idempotent method is sent again: a body is streamed, not kept. Without a BackendPolicy, tidegate retries
once on a failed connect (nginx's `proxy_next_upstream error` does the same).
"""

from __future__ import annotations

import functools
import random

from tidegate import ir

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
DEFAULT_RETRY = ir.RetryPolicy(attempts=1, retry_on=("connect-failure",))
GATEWAY_ERRORS = frozenset({502, 503, 504})
ALL_5XX = frozenset(range(500, 600))


class RetryRules:
    """What may turn this try's failure into another try."""

    __slots__ = ("codes", "connect", "reset", "timeout")

    def __init__(self, codes: frozenset[int] = frozenset(), connect: bool = False, reset: bool = False,
                 timeout: bool = False):
        self.codes = codes  # endpoint answers that are not passed on, but retried
        self.connect = connect
        self.reset = reset
        self.timeout = timeout


NO_RETRY = RetryRules()
DEFAULT_RULES = RetryRules(connect=True)  # DEFAULT_RETRY's, for any request: nothing was sent


@functools.lru_cache(maxsize=256)
def policy_rules(policy: ir.RetryPolicy, safe: bool) -> RetryRules:
    """`safe`: the request has no body and an idempotent method."""
    on = policy.retry_on
    codes: set[int] = set()
    if safe:
        if "5xx" in on:
            codes |= ALL_5XX
        if "gateway-error" in on:
            codes |= GATEWAY_ERRORS
        if "retriable-status-codes" in on or policy.status_codes:
            codes |= set(policy.status_codes)
    return RetryRules(frozenset(codes), connect="connect-failure" in on, reset=safe and "reset" in on,
                      timeout=safe and ("gateway-error" in on or "5xx" in on))


@functools.lru_cache(maxsize=256)
def route_rules(retry: ir.Retry, has_body: bool) -> RetryRules:
    """An HTTPRoute rule's own `retry` (Gateway API): its codes, plus broken connections (a 502 otherwise)."""
    codes = frozenset(retry.codes) if not has_body else frozenset()
    return RetryRules(codes, connect=True, reset=not has_body, timeout=504 in codes)


def backoff(policy: ir.RetryPolicy, retries_done: int) -> float:
    """Exponential backoff with full jitter: up to base × 2^n, never above max."""
    ceiling = min(policy.backoff_max, policy.backoff_base * (2 ** retries_done))
    return random.uniform(0, ceiling)
