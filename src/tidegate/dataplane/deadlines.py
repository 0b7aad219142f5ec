"""Deadlines by default: what a client or a pod may leave hanging, and for how long.

Each client connection checks its deadlines every `check_interval` seconds with one timer (no timer per
request): a request head that is not complete in time (slowloris) gets 408; a request body that brings less
than `request_body_min_bytes` in a `request_body_window` (while tidegate is not holding it back) gets 408; a
kept-alive HTTP/1.1 connection or an HTTP/2 connection with no stream is closed after `idle`; a client that
reads nothing of its answer for `send` is cut off; and a pod that sends nothing for `upstream_read` while its
answer is awaited gets the request a 504 (HTTP/1.1 pods; h2c pods carry gRPC streams that may rightly stay
quiet). The README's "Limits and defaults" table sets these next to nginx's and HAProxy's.

`tidegate run` sets them from its command line (`--request-head-timeout` ...), in every worker, before serving.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Deadlines:
    request_head: float = 30.0
    request_body_window: float = 30.0
    request_body_min_bytes: int = 1024
    idle: float = 60.0
    send: float = 60.0
    upstream_read: float = 60.0

    @property
    def check_interval(self) -> float:
        """How often a connection looks: a fifth of the shortest deadline, 5 s at most."""
        shortest = min(self.request_head, self.request_body_window, self.idle, self.send, self.upstream_read)
        return max(0.05, min(5.0, shortest / 5))


DEADLINES = Deadlines()
