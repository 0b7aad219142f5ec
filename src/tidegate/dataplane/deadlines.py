"""Deadlines by default: what a client or a pod may leave hanging, and for how long.

Each client connection checks its deadlines every `check_interval` seconds with one timer (no timer per
request): a request head that is not complete in time (slowloris) gets 408; a request body that brings less
than `request_body_min_bytes` in a `request_body_window` (while tidegate is not holding it back) gets 408; a
kept-alive HTTP/1.1 connection or an HTTP/2 connection with no stream is closed after `idle`; a client that
reads nothing of its answer for `send` is cut off; and a pod that sends nothing for `upstream_read` while its
answer is awaited gets the request a 504 (HTTP/1.1 pods; h2c pods carry gRPC streams that may rightly stay
quiet). The README's "Limits and defaults" table sets these next to nginx's and HAProxy's.

`tidegate run` sets them from its command line (`--request-head-timeout` ...), in every worker, before serving;
a listener's ClientPolicy `timeouts` replace them on its socket (`for_socket`), and a connection reads its
socket's at its start. An HTTPS client's TLS handshake must be done within `tls_handshake`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class Deadlines:
    request_head: float = 30.0
    request_body_window: float = 30.0
    request_body_min_bytes: int = 1024
    idle: float = 60.0
    send: float = 60.0
    upstream_read: float = 60.0
    tls_handshake: float = 10.0
    # The shortest read timeout a backend on this socket sets for itself (BackendPolicy timeouts.read,
    # proxy-read-timeout), so that the connections look often enough for it; 0: none.
    backend_read: float = 0.0

    @property
    def check_interval(self) -> float:
        """How often a connection looks: a fifth of the shortest deadline, 5 s at most."""
        shortest = min(self.request_head, self.request_body_window, self.idle, self.send, self.upstream_read,
                       self.backend_read or self.upstream_read)
        return max(0.05, min(5.0, shortest / 5))


DEADLINES = Deadlines()

_FIELDS = ("request_head", "request_body_min_bytes", "request_body_window", "idle", "send", "tls_handshake")


def backend_reads(listeners: list[Any]) -> float:
    """The shortest read timeout the backends of these listeners' routes set for themselves, or 0."""
    found = [b.policy.read_timeout for listener in listeners for route in listener.http_routes for b in route.backends
             if b.policy is not None and b.policy.read_timeout]
    return min(found) if found else 0.0


def for_socket(policies: list[Any], backend_read: float = 0.0) -> Deadlines:
    """The deadlines of one listening socket: DEADLINES, with the ClientPolicy timeouts (ir.ClientTimeouts) of
    the listeners on it; where they differ, the strictest (the connection's host is not known yet). A backend's
    own read timeout (`backend_read`, the shortest) makes the connections look often enough for it."""
    if not policies and not backend_read:
        return DEADLINES
    changed: dict[str, Any] = {"backend_read": backend_read} if backend_read else {}
    for name in _FIELDS:
        values = [getattr(p, name) for p in policies if getattr(p, name) is not None]
        if values:
            changed[name] = max(values) if name == "request_body_min_bytes" else min(values)
    return dataclasses.replace(DEADLINES, **changed) if changed else DEADLINES


class Watch:
    """What the deadline check of one connection (HTTP/1.1) or stream (HTTP/2) measures from one look to the
    next: how long its pod has sent nothing, and how fast its request body comes. Made at the first check that
    needs it, so that a request costs nothing for it."""

    __slots__ = ("body_mark", "body_since", "pod", "pod_reads", "pod_since")

    def __init__(self) -> None:
        self.pod: object = None  # the endpoint connection last looked at, its reads then, and since when
        self.pod_reads = 0
        self.pod_since = 0.0
        self.body_since = 0.0  # when the body's current window began (0: none under way), and its bytes then
        self.body_mark = 0

    def pod_silent(self, upstream: Any, now: float, limit: float) -> bool:
        """True once `upstream` (an UpstreamConnection: its `reads` count) has read nothing for `limit`
        seconds (upstream_read, or its backend's own)."""
        if upstream is not self.pod or upstream.reads != self.pod_reads:
            self.pod, self.pod_reads, self.pod_since = upstream, upstream.reads, now
            return False
        return now - self.pod_since >= limit

    def body_too_slow(self, received: int, held_back: bool, now: float, limits: Deadlines) -> bool:
        """True when a request body brought less than request_body_min_bytes in a whole request_body_window;
        a window in which tidegate held the body back (a slow pod) starts over."""
        if held_back or not self.body_since:
            self.body_since, self.body_mark = now, received
            return False
        if now - self.body_since < limits.request_body_window:
            return False
        if received - self.body_mark < limits.request_body_min_bytes:
            return True
        self.body_since, self.body_mark = now, received
        return False


def slow_body_message(limits: Deadlines) -> str:
    return f"request body slower than {limits.request_body_min_bytes} bytes in {limits.request_body_window:g} s"
