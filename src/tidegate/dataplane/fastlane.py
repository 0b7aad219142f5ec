"""The fast lane of HTTP/1.1: callbacks from the client's parser to the endpoint's and back, with no task,
future or coroutine per request.

It takes a request without a body or an upgrade, on a rule that needs routing and balancing and nothing else
(no filters, retries, timeouts or circuit breaker: `plain_rule`), to an endpoint with an idle keep-alive
connection. Everything else goes the full way (`ClientConnection.serve_slowly` → `http1.serve_exchange`),
which is handed what the fast lane found already, so a request is routed and balanced once. The first request
to an endpoint goes the full way and leaves its connection in the pool for the fast lane.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

from tidegate.balancing.outlier import record_outcome
from tidegate.dataplane import guard, http1
from tidegate.dataplane.upstream import UpstreamTimeout
from tidegate.observe.metrics import METRICS

if TYPE_CHECKING:
    from tidegate import ir
    from tidegate.balancing.state import BackendState
    from tidegate.dataplane.server import Site
    from tidegate.dataplane.upstream import UpstreamConnection, UpstreamError
    from tidegate.router import Candidate

log = logging.getLogger("tidegate.http")
NO_MODS: Final[list[dict]] = []  # response header changes: none on the fast lane


def plain_rule(candidate: Candidate) -> bool:
    """Can the fast lane serve this rule: nothing to do but pick a backend and an endpoint, and pass the
    exchange through?"""
    route = candidate.route
    if route.filters or route.direct_status or route.retry is not None:
        return False
    spec = route.guard
    if spec is not None and (spec.rate_limit_headers or spec.max_in_flight_per_client is not None):
        return False  # headers to add to the answer, a count to give back however the exchange ends
    if route.timeouts.request is not None or route.timeouts.backend_request is not None:
        return False
    for backend in route.backends:
        if backend.filters or backend.tls is not None or backend.invalid or backend.protocol == "kubernetes.io/h2c":
            return False
        policy = backend.policy
        if policy is not None and (policy.retry is not None or policy.request_timeout is not None
                                   or policy.read_timeout is not None or policy.circuit_breaker is not None
                                   or (policy.hash is not None and policy.hash.cookie_ttl is not None)):
            return False
    return True


def serve(conn: http1.ClientConnection, ex: http1.Exchange) -> None:
    """Serve the next request of a connection: on the fast lane when it can, else the full way."""
    if ex.has_body or ex.upgrade or ex.method == "HEAD":
        conn.serve_slowly(ex)
        return
    conn.last_status = conn.bytes_out = 0
    routed = http1.route_request(conn, ex, conn.site_getter())
    if routed is True or routed is False:  # answered here (404, 421, a bad target)
        ex.bytes_sent = conn.bytes_out
        http1.finished(conn, ex, conn.last_status)
        conn.served(ex, routed)
        return
    # Declared, because a tuple's items are untyped: compiled, each attribute read and method call on them
    # would otherwise go through Python's generic lookup (about 0.3 µs per request in all).
    site: Site
    candidate: Candidate
    headers_lower: dict[str, str]
    site, candidate, host, path, query, headers_lower, _ = routed
    if not is_plain(candidate):
        conn.serve_slowly(ex, routed)
        return
    if ex.deferred is not None:  # Global rate limits: Redis first (a callback, no task), then on as below
        RedisWait(conn, ex, routed).start()
        return
    serve_plain(conn, ex, routed)


def serve_plain(conn: http1.ClientConnection, ex: http1.Exchange, routed: http1.Routed) -> None:
    """A routed request on a plain rule: to an endpoint with an idle connection, else the full way."""
    site: Site
    candidate: Candidate
    headers_lower: dict[str, str]
    site, candidate, host, path, query, headers_lower, _ = routed
    balancer = site.balancer
    backend = balancer.backend_for(candidate.route)
    if backend is None:
        conn.serve_slowly(ex, routed)  # it answers
        return
    key = hash_key_of(backend, path, headers_lower, ex.client or conn.peer)
    # The clock as last read for this connection: when these bytes came, or when the exchange before a
    # pipelined request ended (served()): recent either way, and one read fewer.
    now = conn.last_active
    endpoint = balancer.endpoint_for(backend, key, (), now)
    if endpoint is None:
        conn.serve_slowly(ex, routed)  # it answers 503
        return
    slot = slot_for(site, endpoint)
    upstream = slot.pool.take_idle(now)
    if upstream is None:  # a connection has to be opened: the full way does that, with its retry on refusal
        conn.serve_slowly(ex, (site, candidate, host, path, query, headers_lower, (backend, endpoint)))
        return
    FastExchange(conn, ex, routed, backend, slot, balancer.registry.backend(backend.name), upstream
                 ).start(host, path, query)


class RedisWait:
    """A plain request waiting for Redis's word on its Global rate limits. It stands in the connection's
    `serving` slot meanwhile (pipelined requests wait their turn; `cancel()`: the client went away)."""

    __slots__ = ("conn", "ex", "over", "routed")

    def __init__(self, conn: http1.ClientConnection, ex: http1.Exchange, routed: http1.Routed):
        self.conn = conn
        self.ex = ex
        self.routed = routed
        self.over = False

    def start(self) -> None:
        ready, deferred = self.ex.deferred
        self.ex.deferred = None
        self.conn.serving = self
        ready.when_decided(deferred, self.decided)

    def done(self) -> bool:
        return self.over

    def cancel(self) -> None:
        self.over = True

    def decided(self, refusal: guard.Refusal | None) -> None:
        if self.over:  # the connection is gone
            return
        self.over = True
        conn, ex = self.conn, self.ex
        conn.serving = None
        if refusal is None:
            serve_plain(conn, ex, self.routed)
            return
        keep = http1.refuse(conn, ex, self.routed[1], refusal, True, False)
        ex.bytes_sent = conn.bytes_out
        http1.finished(conn, ex, conn.last_status)
        conn.served(ex, keep)


def hash_key_of(backend: ir.Backend, path: str, headers_lower: dict[str, str], peer: str) -> str | None:
    """The consistent-hash key of a request to this backend (None: its balancing uses none)."""
    policy = backend.policy
    if policy is None or policy.hash is None:
        return None
    return http1.hash_key(policy.hash, path, headers_lower, peer)[0]


def is_plain(candidate: Candidate) -> bool:
    """plain_rule, worked out once per rule and kept with it."""
    plain = candidate.plan
    if plain is None:
        plain = candidate.plan = plain_rule(candidate)
    return bool(plain)


def slot_for(site: Site, endpoint: ir.Endpoint) -> EndpointSlot:
    """What the fast lane needs of an endpoint, made once per configuration."""
    slot: EndpointSlot | None = site.endpoint_slots.get(id(endpoint))  # declared: the dict holds Any
    if slot is None:
        slot = site.endpoint_slots[id(endpoint)] = EndpointSlot(site, endpoint)
    return slot


class EndpointSlot:
    """What the fast lane needs of an endpoint, looked up once per configuration (Site.endpoint_slots, by the
    id of the IR's endpoint): its connection pool, its balancing state and its name."""

    __slots__ = ("endpoint", "name", "pool", "state")

    def __init__(self, site: Site, endpoint: ir.Endpoint):
        self.endpoint = endpoint  # held, so that the id it is kept by cannot be reused while the slot exists
        self.pool = site.pools.pool(endpoint.address, endpoint.port)
        self.state = site.balancer.registry.endpoint(endpoint.address, endpoint.port)
        self.name = f"{endpoint.address}:{endpoint.port}"


def plain_request_head(conn: http1.ClientConnection, ex: http1.Exchange, host: str, target: str) -> bytes:
    """http1.request_head for a body-less request no filter changed. When the client sent no forwarding
    headers (the usual case), the ones tidegate adds are the same for every request of the connection to a
    host, so they are made once per connection and host."""
    lower = ex.lower
    original_host = lower.get("host") or host
    # Headers that leave the work to http1.request_head: forwarding headers to extend, or a Connection header
    # that may name more hop-by-hop ones. Tested one by one: compiled, a loop over a tuple of them costs twice.
    if ("connection" in lower or "x-forwarded-for" in lower or "x-forwarded-proto" in lower
            or "x-forwarded-host" in lower or "forwarded" in lower or "via" in lower):
        return http1.request_head(ex, ex.headers, host, target, conn.peer, conn.scheme, original_host)
    suffix = conn.forwarding
    if suffix is None or suffix[0] != original_host:
        text = (f"X-Forwarded-For: {conn.peer}\r\nX-Forwarded-Proto: {conn.scheme}\r\n"
                f"X-Forwarded-Host: {original_host}\r\n"
                f"Forwarded: {http1.forwarded_element(conn.peer, conn.scheme, original_host)}\r\n"
                f"Via: {http1.VIA}\r\n\r\n")
        suffix = conn.forwarding = (original_host, text)
    parts = [ex.method, " ", target, " HTTP/1.1\r\nHost: ", host, "\r\n"]
    headers, lnames, skip = ex.headers, ex.lnames, http1.NOT_FORWARDED
    for i in range(len(headers)):
        if lnames[i] not in skip:
            name, value = headers[i]
            parts.append(name)  # four appends: compiled, cheaper than extending by a tuple
            parts.append(": ")
            parts.append(value)
            parts.append("\r\n")
    parts.append(suffix[1])
    return "".join(parts).encode("latin-1")


class FastExchange:
    """One request on the fast lane. It stands in the connection's `serving` slot, where the full way keeps
    its task: `done()` and `cancel()` (the client went away) are what the connection asks of it."""

    __slots__ = ("backend", "backend_state", "conn", "ex", "keep", "over", "routed", "slot", "started", "status",
                 "upstream")

    def __init__(self, conn: http1.ClientConnection, ex: http1.Exchange, routed: http1.Routed,
                 backend: ir.Backend, slot: EndpointSlot, backend_state: BackendState, upstream: UpstreamConnection):
        self.conn = conn
        self.ex = ex
        self.routed = routed
        self.backend = backend
        self.slot = slot
        self.upstream = upstream
        self.backend_state = backend_state
        self.keep = False
        self.over = False
        self.status = 0  # the endpoint's, once its head came (and went on to the client)
        self.started = 0.0

    def start(self, host: str, path: str, query: str) -> None:
        conn, ex, candidate = self.conn, self.ex, self.routed[1]
        http1.IN_FLIGHT.count += 1
        http1.served_by(ex, candidate)
        ex.endpoint = self.slot.name
        self.slot.state.active += 1
        self.backend_state.active += 1
        head = plain_request_head(conn, ex, host, f"{path}?{query}" if query else path)
        conn.serving = self
        conn.upstream = self.upstream
        self.started = time.monotonic()
        self.upstream.start_fast(self, head, conn.body)

    # -- what the connection asks of its `serving` -----------------------------------------------------
    def done(self) -> bool:
        return self.over

    def cancel(self) -> None:
        """The client went away: the endpoint's answer is of no use, and its connection cannot be reused."""
        if self.over:
            return
        self._drop_upstream()
        self._end(None, endpoint_outcome=False)

    # -- the endpoint's answer (UpstreamConnection calls these) ------------------------------------------
    def upstream_head(self, head) -> None:
        self.status = head.status
        try:
            self.keep = self.conn.begin_response(self.ex, head.status, http1.response_headers(head, NO_MODS),
                                                 head.content_length, head.status in (204, 304), hold=True)
        except Exception:  # never let a bug take the endpoint connection's reader down
            log.exception("internal error writing a response head")
            self.upstream_failed(None)

    def upstream_raw_head(self, status: int, header_lines: list[bytes], content_length: int | None) -> None:
        """The head as the endpoint sent it (UpstreamConnection.lean_head): passed on without decoding."""
        self.status = status
        try:
            self.keep = self.conn.begin_raw_response(self.ex, status, header_lines, content_length,
                                                     status in (204, 304))
        except Exception:
            log.exception("internal error writing a response head")
            self.upstream_failed(None)

    def upstream_read(self) -> None:
        """The end of one read from the endpoint: a head held for body bytes that did not come with it goes
        out now (an answer that streams must not wait for its body to be seen)."""
        self.conn.flush_held()

    def upstream_done(self) -> None:
        conn, upstream = self.conn, self.upstream
        conn.end_response()
        conn.upstream = None
        now = self._end(self.status)
        put_back(upstream, now)
        conn.serving = None
        conn.served(self.ex, self.keep, now)

    def upstream_failed(self, error: UpstreamError | None) -> None:
        """The endpoint closed or reset the connection, or sent something that is not HTTP (`error`; None for
        a bug of tidegate's own)."""
        if self.over:
            return
        conn, ex = self.conn, self.ex
        self._drop_upstream()
        METRICS.upstream_errors.labels(self.backend.name, "error").inc()
        if error is not None and http1.may_send_again(ex, error):
            # A kept connection the endpoint closed unanswered just as it was reused is not worth an error: the
            # full way sends the request once more.
            self._end(None, endpoint_outcome=False, account=False)
            ex.retries += 1
            conn.serve_slowly(ex, self.routed)
            return
        if not self.status:
            # The endpoint's silence past the deadline (UpstreamTimeout) is a 504, as a timeout of the full way.
            conn.send_simple(504 if isinstance(error, UpstreamTimeout) else 502, str(error) if error else
                             "internal error", close=True)
        self._end(None)
        conn.serving = None
        conn.served(ex, False)

    # -- helpers -----------------------------------------------------------------------------------------
    def _drop_upstream(self) -> None:
        upstream = self.upstream
        upstream.handler = None
        upstream.close()
        self.conn.upstream = None

    def _end(self, status: int | None, endpoint_outcome: bool = True, account: bool = True) -> float:
        """Count the exchange out: the endpoint's state and what it did (`endpoint_outcome`: not when the
        client went away), and metrics and the access log (`account`: not when the full way takes over).
        Returns the time it read."""
        self.over = True
        ex, conn = self.ex, self.conn
        now = count_out(ex, self.routed, self.backend, self.backend_state, self.slot, self.started, status,
                        endpoint_outcome)
        if account:
            ex.bytes_sent = conn.bytes_out
            http1.finished(conn, ex, conn.last_status, now)
        return now


def count_out(ex: http1.Exchange, routed: http1.Routed, backend: ir.Backend, backend_state: BackendState,
              slot: EndpointSlot, started: float, status: int | None, endpoint_outcome: bool) -> float:
    """An exchange of a fast lane (HTTP/1.1's or HTTP/2's) is over: its endpoint and backend count it out, and
    the endpoint's state records what it did (`endpoint_outcome`: not when the client went away). Returns
    the time it read."""
    now = time.monotonic()
    seconds = now - started
    ex.upstream_time += seconds
    state = slot.state
    state.active -= 1
    backend_state.active -= 1
    http1.IN_FLIGHT.count -= 1
    if endpoint_outcome:
        state.record(status, seconds)
        policy = backend.policy
        if policy is not None and policy.outlier is not None:
            record_outcome(routed[0].balancer.registry, backend, state, status, now)
    return now


def put_back(upstream: UpstreamConnection, now: float) -> None:
    """An endpoint connection whose answer has ended: back to its pool while it can serve again."""
    if not upstream.closed and upstream.reusable:
        upstream.pool.release(upstream, now)
    else:
        upstream.handler = None
        upstream.close()
