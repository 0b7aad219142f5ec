"""HTTP/1.1 at the edge: parse strictly (httptools/llhttp), route, apply filters, proxy to a pod endpoint.

One `ClientConnection` per accepted socket. Requests on a connection are served one at a time (pipelined
ones wait their turn); bodies stream both ways with backpressure, so a large upload or download is never
held in memory. Malformed requests get 400/414/431 and are never forwarded.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import os
import random
import secrets
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

import httptools

from tidegate import ir
from tidegate.balancing.outlier import record_outcome
from tidegate.balancing.retry import (
    DEFAULT_RETRY,
    DEFAULT_RULES,
    IDEMPOTENT,
    NO_RETRY,
    RetryRules,
    backoff,
    policy_rules,
    route_rules,
)
from tidegate.balancing.state import BackendState, EndpointState
from tidegate.dataplane.filters import (
    cors,
    get_header,
    modify_headers,
    redirect_location,
    replace_path,
    set_headers,
    with_query,
)
from tidegate.dataplane import acme_challenge, basic_auth, external_auth, fastlane, guard, proxy_protocol
from tidegate.dataplane.deadlines import DEADLINES, Deadlines, Watch, slow_body_message
from tidegate.dataplane.tls import take_server_name
from tidegate.dataplane.upstream import (
    ClosedUnanswered,
    ConnectError,
    EndpointPool,
    ResponseHead,
    UpstreamConnection,
    UpstreamError,
    UpstreamTimeout,
)
from tidegate.dataplane.upstream_h2 import H2UpstreamStream
from tidegate.observe import accesslog
from tidegate.observe.metrics import METRICS, RouteCounts
from tidegate.router import Candidate, Request, normal_path, normalize_host

if TYPE_CHECKING:
    from tidegate.dataplane.server import Site

log = logging.getLogger("tidegate.http")

MAX_HEADER_COUNT: Final = 100
MAX_HEADER_BYTES: Final = 64 * 1024
MAX_URL_BYTES: Final = 8 * 1024
# A request head (request line and fields) is refused once this many of its bytes have arrived, before the
# parser holds more of it: the limits above are checked only when a field is complete, and a 64 MiB field
# value would otherwise be read whole (4 s of CPU, +120 MiB) before its 431.
MAX_HEAD_BYTES: Final = MAX_HEADER_BYTES + MAX_URL_BYTES + 1024
BODY_BUFFER_LIMIT: Final = 256 * 1024  # bytes of request body held before the client is paused
MAX_PIPELINED: Final = 8  # requests read ahead of the one being answered
# An endpoint that answers before the request body is in (a 401 or 413 to an upload) leaves the rest of the
# body on the wire. Like nginx, read and drop it, up to these limits, to keep the connection: a client
# still writing its upload when the connection closed might never read the answer.
DRAIN_LIMIT: Final = 8 * 1024 * 1024
DRAIN_SECONDS: Final = 5.0
# A TrafficPolicy's maxBodySize up to this: a body of no declared length is held whole before it goes to a pod
# (larger limits: the body streams, and is cut where it passes the limit).
HELD_BODY_LIMIT: Final = 8 * 1024 * 1024
SHED_HEADERS: Final = [("Retry-After", "1"), ("X-Tidegate-Overloaded", "loop")]  # ClientPolicy overload
CONNECT_TIMEOUT: Final = 5.0
HOP_BY_HOP: Final = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                               "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization"})
VIA: Final = "1.1 tidegate"
# Request headers never passed on as they are: hop-by-hop ones, those tidegate writes itself, and the three it
# extends (X-Forwarded-For, Forwarded, Via).
NOT_FORWARDED: Final = HOP_BY_HOP | {"host", "content-length", "expect", "x-forwarded-for", "forwarded", "via"}

REASONS: Final = {status.value: status.phrase for status in HTTPStatus}  # reason phrases the clients see
REASON_BYTES: Final = {status: phrase.encode() for status, phrase in REASONS.items()}
_PROTOCOLS: Final = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2"}  # access-log names, made once


class InFlight:
    """Requests being served right now, in this process, on any protocol (a graceful stop waits for them). An
    instance, not a class attribute: setting a class attribute on each request would invalidate the
    interpreter's caches of the class."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


IN_FLIGHT: Final = InFlight()


class _RequestIds:
    """32 hex digits, like a UUID's, unique without the cost of uuid4() per request: 16 random ones for the
    process, then a decimal counter that starts at 10**15, so that it always has 16 digits (str() of an int is
    a C call compiled; hex() and a slice cost two more objects)."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.count = 10**15

    def next(self) -> str:
        self.count += 1
        return self.prefix + str(self.count)


_REQUEST_IDS: Final = _RequestIds()


def new_request_id() -> str:
    return _REQUEST_IDS.next()


class RequestRejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Exchange:
    """One request as it arrives, and its body stream."""

    __slots__ = (
        "answer_headers",
        "body_done",
        "body_limit",
        "buffer",
        "buffered",
        "bytes_received",
        "bytes_sent",
        "chunked",
        "client",
        "content_length",
        "counts",
        "deferred",
        "endpoint",
        "error_pages",
        "expect_continue",
        "header_bytes",
        "headers",
        "held",
        "keep_alive",
        "listener",
        "lnames",
        "lower",
        "method",
        "policy",
        "request_id",
        "retries",
        "route",
        "sink",
        "started",
        "target",
        "upgrade",
        "upstream_time",
        "version",
    )

    def __init__(self, started: float = 0.0) -> None:
        """`started`: when its first bytes came, if the caller has read the clock already."""
        self.method = "GET"
        self.target = b""
        self.version = "1.1"
        self.headers: list[tuple[str, str]] = []
        # Filled as HTTP/1.1 headers are parsed (HTTP/2: on first use, by `lowered`): each header's name in
        # lower case, and the headers by lower-case name (repeated ones joined by ","). Names are lowered once.
        self.lnames: list[str] = []
        self.lower: dict[str, str] = {}
        self.keep_alive = True
        self.chunked = False
        self.content_length: int | None = None
        self.body_done = False
        self.buffered = 0
        self.buffer: list[bytes] = []
        self.sink: Callable[[bytes | None], None] | None = None  # None marks the end of the body
        self.expect_continue = False
        self.header_bytes = 0
        self.upgrade = False  # an Upgrade request (WebSocket): after a 101 the connection becomes a tunnel
        self.error_pages: ir.Filter | None = None  # the route's ErrorPages filter (ingress-nginx's custom-http-errors)
        self.route = ""  # the rule that served it, and its listener (for metrics and access logs)
        self.listener = ""
        self.started = started or time.monotonic()
        self.counts: RouteCounts | None = None  # its rule's metrics (served_by), once routed
        self.bytes_sent = 0  # response body bytes, for access logs
        self.bytes_received = 0  # request body bytes, for metrics
        self.endpoint = ""
        self.retries = 0
        self.request_id = ""
        self.upstream_time = 0.0
        # TrafficPolicy: the largest body allowed, the client address counted in flight (released when the
        # exchange ends), the rule that refused it (access log), and RateLimit headers for its answer.
        self.body_limit = -1
        self.held = ""
        self.policy = ""
        self.answer_headers: list[tuple[str, str]] | None = None
        self.deferred: Any = None  # (its guard, the Global rate-limit rules and keys to ask Redis about)
        self.client = ""  # the client's address by its listener's ClientPolicy ("": the connection's peer)

    def receive(self, data: bytes) -> bool:
        """Request body bytes (HTTP/1.1 or an HTTP/2 stream): to the endpoint when one is connected (True),
        else held until it is (False; `buffered` counts them)."""
        self.bytes_received += len(data)
        if self.sink is not None:
            self.sink(data)
            return True
        self.buffer.append(data)
        self.buffered += len(data)
        return False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def lowered(self) -> dict[str, str]:
        """The headers by lower-case name."""
        if len(self.lnames) != len(self.headers):  # set as a whole (HTTP/2, a filter): lower them now
            self.lnames = [name.lower() for name, _ in self.headers]
            lower: dict[str, str] = {}
            for lname, (_, value) in zip(self.lnames, self.headers, strict=True):
                lower[lname] = f"{lower[lname]},{value}" if lname in lower else value
            self.lower = lower
        return self.lower

    def add_header(self, name: str, value: str) -> None:
        """Before routing (nothing holds the list yet): one more request header."""
        self.lowered()
        lname = name.lower()
        self.headers.append((name, value))
        self.lnames.append(lname)
        self.lower[lname] = value


# The client side of an exchange: a ClientConnection, or an HTTP/2 stream (http2.H2Stream) that offers the same
# attributes and methods. The two share no base class, and compiled code (setup.py) checks a declared class at
# run time, so what serves both says Any.
ClientSide = Any


class ClientConnection(asyncio.Protocol):
    def __init__(self, site_getter: Callable[[], Site], listener_port: int, scheme: str = "http", client: str = ""):
        """`client`: the client's address from a PROXY header read before TLS (proxied.py); "" = the peer's."""
        self.site_getter = site_getter
        self.listener_port = listener_port
        self.scheme = scheme
        self.transport: asyncio.Transport | None = None
        self.parser: Any = httptools.HttpRequestParser(self)  # None once the connection is gone
        self.peer = client
        self.current: Exchange | None = None
        # Requests read and waiting (MAX_PIPELINED at most): a list, whose append and pop(0) are C calls
        # compiled, where a deque's methods go through Python's generic method lookup.
        self.queue: list[Exchange] = []
        # The exchange being served: the full path's task, or a fastlane.FastExchange (done() and cancel() alike).
        self.serving: Any = None
        self.closed = False
        self.read_paused = False
        self.write_paused = False
        # The endpoint connection of the exchange being served: an UpstreamConnection, or an HTTP/2 stream to an
        # h2c endpoint (upstream_h2.H2UpstreamStream).
        self.upstream: Any = None
        self.server_name = ""  # TLS SNI
        self.tunnel: UpstreamConnection | None = None  # set once an upgrade succeeded
        self.tunnel_pending = b""  # bytes that followed an upgrade request's head
        self.upgrading = False  # the parser has read an upgrade request's head: what follows is not HTTP
        self.tunnel_closed: asyncio.Future[None] | None = None
        self._out_chunked = False
        self._held: bytes | None = None  # a response head held back to go out with the first body bytes
        self.forwarding: tuple[str, str] | None = None  # the fast lane's forwarding headers, by Host (fastlane.py)
        self.seen_bytes = False
        self.in_head = True  # between requests, or reading one's head: its bytes count towards MAX_HEAD_BYTES
        self.head_bytes = 0
        self.http2 = False
        self.last_status = 0  # of the response being written, for metrics
        self.bytes_out = 0  # response body bytes of the exchange being served
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_active = time.monotonic()
        # What the deadline check (deadlines.py) compares with at its next look.
        self.head_started = 0.0  # when the first byte of the request head being read came
        self.write_paused_at = 0.0
        self.watch: Watch | None = None  # the pod's silence and the body's pace, from one look to the next
        self._drain: asyncio.Event | None = None  # made when writing first pauses: most connections never do
        self.capped: Any = None  # the socket whose ClientPolicy counts this connection (released on close)
        self.proxy_header: bytes | None = None  # a PROXY header's bytes so far, while one is awaited
        self.deadlines: Deadlines = DEADLINES  # its socket's (ClientPolicy timeouts), read when it connects

    # -- transport events --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        connections = METRICS.connections
        connections.open += 1  # decremented by whichever protocol sees the connection close
        connections.accepted += 1
        if not self.peer:
            peer = transport.get_extra_info("peername")
            self.peer = peer[0] if peer else ""
        site = self.site_getter()
        self.deadlines = site.deadlines
        if site.limits is not None:
            over = guard.CONNECTIONS.admit(site.key, self.peer, site.limits)
            if over:
                METRICS.limits.labels(over).inc()
                self.closed = True
                reset(transport)  # type: ignore[arg-type]
                return
            self.capped = site.key
        ssl_object = transport.get_extra_info("ssl_object")
        if site.proxy_from is not None and ssl_object is None and self.peer in site.proxy_from:
            self.proxy_header = b""  # a PROXY header comes first: read before anything else
        self.server_name = take_server_name(ssl_object) if ssl_object is not None else ""
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            self._switch_to_http2(b"")
            return
        self._arm_idle()

    def _switch_to_http2(self, data: bytes) -> None:
        """HTTP/2 from here on (ALPN h2, or the h2c preface): hand the socket to an H2ServerConnection."""
        from tidegate.dataplane.http2 import H2ServerConnection

        if self.idle_handle:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.http2 = True
        h2conn = H2ServerConnection(self.site_getter, self.listener_port, self.scheme, self.peer, self.server_name)
        h2conn.capped, self.capped = self.capped, None  # its close gives the connection back now
        assert self.transport is not None
        self.transport.set_protocol(h2conn)
        h2conn.connection_made(self.transport)
        if data:
            h2conn.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        METRICS.connections.open -= 1
        self.closed = True
        if self.capped is not None:
            guard.CONNECTIONS.release(self.capped, self.peer)
            self.capped = None
        if self._drain is not None:
            self._drain.set()
        if self.tunnel_closed is not None and not self.tunnel_closed.done():
            self.tunnel_closed.set_result(None)
        if self.idle_handle:
            self.idle_handle.cancel()
            self.idle_handle = None
        # The parser holds this connection as its callbacks: without it, what is left of the connection is freed
        # when the last reference goes, not by the cyclic garbage collector.
        self.parser = None
        if self.serving is not None and not self.serving.done():
            self.serving.cancel()
        if self.upstream is not None:
            self.upstream.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = time.monotonic()
        if self._drain is None:
            self._drain = asyncio.Event()
        self._drain.clear()
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None:
            self._drain.set()
        if self.upstream is not None:
            self.upstream.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.proxy_header is not None:
            data = self._read_proxy_header(data)
            if not data:
                return
        if not self.seen_bytes:
            self.seen_bytes = True
            if data[:3] == b"PRI":  # the HTTP/2 connection preface: h2c with prior knowledge
                self._switch_to_http2(data)
                return
        self.last_active = time.monotonic()
        if self.in_head:
            if not self.head_bytes:
                self.head_started = self.last_active
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._feed_head_within_limit(data)
                return
        self._feed(data)

    def _read_proxy_header(self, data: bytes) -> bytes:
        """ClientPolicy proxyProtocol: the header a trusted proxy sends first; its source becomes the peer.
        Returns what follows it (b"" while it is incomplete, or when the connection was closed)."""
        held = (self.proxy_header or b"") + data
        try:
            parsed = proxy_protocol.parse(held)
        except proxy_protocol.BadHeader as exc:
            METRICS.limits.labels("proxy-protocol").inc()
            log.info("closing the connection from %s: a trusted proxy's connection without a PROXY header (%s)",
                     self.peer, exc)
            self.closed = True
            reset(self.transport)  # type: ignore[arg-type]
            return b""
        if parsed is None:
            self.proxy_header = held
            return b""
        length, source = parsed
        self.proxy_header = None
        if source:
            key = self.capped
            if key is not None:  # counted as the proxy's so far: the client's from now on
                guard.CONNECTIONS.release(key, self.peer)
                self.capped = None
                limits = self.site_getter().limits
                over = guard.CONNECTIONS.admit(key, source, limits) if limits is not None else ""
                if over:
                    METRICS.limits.labels(over).inc()
                    self.closed = True
                    reset(self.transport)  # type: ignore[arg-type]
                    return b""
                self.capped = key
            self.peer = source
        return held[length:]

    def _feed_head_within_limit(self, data: bytes) -> None:
        """Feed no more of a request head than the limit allows; what follows a head that ends in time (its body,
        the next request) is fed as usual."""
        room = MAX_HEAD_BYTES - (self.head_bytes - len(data))
        if room > 0:
            self._feed(data[:room])
        if self.closed:
            return
        if self.in_head:
            METRICS.limits.labels("request-head").inc()
            self._reject(431, "request head too large")
            return
        self._feed(data[room:])

    def _feed(self, data: bytes) -> None:
        if self.upgrading:  # an upgrade request's head ended in an earlier piece: the rest is the tunnel's
            self.tunnel_pending += data
            return
        try:
            self.parser.feed_data(data)
        except RequestRejected as rejected:
            self._reject(rejected.status, str(rejected))
        except httptools.HttpParserUpgrade as upgrade:
            # The upgrade request is queued; what follows its head belongs to the upgraded protocol.
            self.upgrading = True
            self.tunnel_pending += data[upgrade.args[0]:]
            self.pause_reading()
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, RequestRejected):
                self._reject(cause.status, str(cause))
            elif cause is not None:  # a bug in a callback, not a bad request: say so, and log it
                log.error("internal error while parsing a request", exc_info=cause)
                self._reject(500, "internal error")
            else:
                self._reject(400, f"malformed request: {exc}")

    # -- parser callbacks --------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.current = Exchange(self.last_active)  # set by data_received, which is feeding the parser

    def on_url(self, url: bytes) -> None:
        ex = self.current
        assert ex is not None
        ex.target += url
        if len(ex.target) > MAX_URL_BYTES:
            raise RequestRejected(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.current
        assert ex is not None
        ex.header_bytes += len(name) + len(value) + 4
        if len(ex.headers) >= MAX_HEADER_COUNT or ex.header_bytes > MAX_HEADER_BYTES:
            raise RequestRejected(431, "request headers too large")
        text = name.decode("latin-1")
        lname = text.lower()
        value_text = value.decode("latin-1")
        ex.headers.append((text, value_text))
        ex.lnames.append(lname)
        lower = ex.lower
        lower[lname] = f"{lower[lname]},{value_text}" if lname in lower else value_text

    def on_headers_complete(self) -> None:
        ex = self.current
        assert ex is not None
        self.in_head = False
        parser = self.parser
        ex.method = parser.get_method().decode("ascii")
        ex.keep_alive = keep_alive = parser.should_keep_alive()
        ex.upgrade = parser.should_upgrade()
        lower = ex.lower
        # llhttp takes the versions 0.9, 1.0, 1.1 and 2.0 only, and of these it keeps only 1.1 alive without a
        # Connection header: the usual request's version is known without asking (get_http_version formats
        # a string, 0.13 µs). tests/test_request_parsing.py checks the two agree.
        ex.version = "1.1" if keep_alive and "connection" not in lower else parser.get_http_version()
        if "transfer-encoding" in lower:
            ex.chunked = True  # llhttp has already refused anything but a final "chunked"
        length = lower.get("content-length")
        if length is not None:
            ex.content_length = int(length)
        expect = lower.get("expect")
        if expect is not None and expect.lower() == "100-continue":
            ex.expect_continue = True
        if ex.version == "1.1" and "host" not in lower:
            raise RequestRejected(400, "HTTP/1.1 request without a Host header")
        self.queue.append(ex)
        if self.serving is None:
            self._serve_next()

    def on_body(self, body: bytes) -> None:
        ex = self.current
        assert ex is not None
        if not ex.receive(body) and ex.buffered > BODY_BUFFER_LIMIT:
            self.pause_reading()
        if ex.body_limit >= 0 and ex.bytes_received > ex.body_limit:
            ex.policy = "requestLimits.maxBodySize"
            METRICS.traffic_policy.labels(ex.route, ex.policy, "too-large").inc()
            raise RequestRejected(413, f"request body larger than {ex.body_limit} bytes")

    def on_message_complete(self) -> None:
        ex = self.current
        assert ex is not None
        self.in_head = True
        self.head_bytes = 0
        ex.body_done = True
        if ex.sink is not None:
            ex.sink(None)
        if len(self.queue) >= MAX_PIPELINED:
            # Requests are answered one at a time; those that a client pipelines wait, a few at most: then
            # reading stops until they are answered. (Pausing after every request would cost two system
            # calls per request on a keep-alive connection.)
            self.pause_reading()

    # -- flow control ---------------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def _arm_idle(self) -> None:
        """One timer per connection, re-armed when it fires: cheaper than a timer per request."""
        self.idle_handle = asyncio.get_running_loop().call_later(self.deadlines.check_interval, self._check_deadlines)

    def _check_deadlines(self) -> None:
        """What the client or the pod has left hanging for too long (deadlines.py) is ended."""
        transport = self.transport
        if self.closed or transport is None or self.tunnel is not None:
            return
        now = time.monotonic()
        limits = self.deadlines
        watch = self.watch
        if watch is None:
            watch = self.watch = Watch()
        if self.write_paused:
            if now - self.write_paused_at >= limits.send:
                self._cut_off("send-timeout", f"the client read nothing of its answer for {limits.send:g} s")
                return
        if self.in_head:
            if self.head_bytes:
                if now - self.head_started >= limits.request_head:
                    METRICS.limits.labels("request-head-timeout").inc()
                    self._reject(408, f"request head not complete within {limits.request_head:g} s")
                    return
            elif self.serving is None and now - self.last_active >= limits.idle:
                transport.close()
                return
            watch.body_since = 0.0
            upstream = self.upstream
            # The request is in: the pod owes its answer, and must send something now and then.
            if upstream is not None and type(upstream) is UpstreamConnection and \
                    watch.pod_silent(upstream, now, upstream.read_timeout or limits.upstream_read):
                METRICS.limits.labels("upstream-read-timeout").inc()
                upstream.time_out(upstream.read_timeout or limits.upstream_read)
        else:
            ex = self.current
            if ex is not None and not ex.body_done and watch.body_too_slow(ex.bytes_received, self.read_paused,
                                                                           now, limits):
                if self.last_status:  # an answer is under way: it cannot become a 408
                    self._cut_off("request-body-rate", slow_body_message(limits))
                else:
                    METRICS.limits.labels("request-body-rate").inc()
                    self._reject(408, slow_body_message(limits))
                return
        self._arm_idle()

    def _cut_off(self, limit: str, why: str) -> None:
        """Reset the connection: a deadline ran out where no answer can say so (`limit`: its metric label)."""
        METRICS.limits.labels(limit).inc()
        log.info("closing the connection from %s: %s", self.peer, why)
        self.closed = True
        if self.serving is not None and not self.serving.done():
            self.serving.cancel()
        assert self.transport is not None
        reset(self.transport)


    # -- serving ------------------------------------------------------------------------------------
    def _serve_next(self) -> None:
        fastlane.serve(self, self.queue.pop(0))

    def serve_slowly(self, ex: Exchange, routed: Routed | None = None) -> None:
        """The full path, as a task: everything the fast lane does not take."""
        self.serving = asyncio.get_running_loop().create_task(self._serve(ex, routed))

    async def _serve(self, ex: Exchange, routed: Routed | None) -> None:
        keep = False
        IN_FLIGHT.count += 1
        self.last_status = self.bytes_out = 0
        try:
            keep = await serve_exchange(self, ex, routed)
        except asyncio.CancelledError:
            return
        except Exception:  # never let one request take the listener down
            log.exception("internal error serving %s %s", ex.method, ex.target[:200])
            if not self.closed:
                self.send_simple(500, "internal error", close=True)
        finally:
            IN_FLIGHT.count -= 1
            ex.bytes_sent = self.bytes_out
            finished(self, ex, self.last_status)
        if keep and ex.has_body and not ex.body_done and not self.closed:
            keep = await self._drain_body(ex)
        self.serving = None
        self.served(ex, keep)

    def served(self, ex: Exchange, keep: bool, now: float = 0.0) -> None:
        """An exchange is over (`now`, if the caller has read the clock): close, or go on with the next
        request."""
        if self.closed:
            return
        if not keep or not ex.keep_alive:
            self.transport.close()  # type: ignore[union-attr]
            return
        self.last_active = now or time.monotonic()
        if self.queue:
            self._serve_next()
        else:
            self.resume_reading()

    async def _drain_body(self, ex: Exchange) -> bool:
        """The response is out but the client is still sending its body: drop the rest (within limits)
        and say whether the connection can carry the next request."""
        start = ex.bytes_received
        done = asyncio.get_running_loop().create_future()

        def discard(chunk: bytes | None) -> None:
            if done.done():
                return
            if chunk is None:
                done.set_result(True)
            elif ex.bytes_received - start > DRAIN_LIMIT:
                done.set_result(False)

        ex.sink = discard
        ex.buffer.clear()
        self.resume_reading()
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                return await done
        except TimeoutError:
            return False

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def flush_held(self) -> None:
        """Write a held response head now (no body bytes came with it)."""
        if self._held is not None:
            self.write(b"")

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain.wait()

    # -- the response side, as serve_exchange uses it (HTTP/2 streams offer the same methods) --------------
    def send_continue(self) -> None:
        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def begin_response(self, ex: Exchange, status: int, headers: list[tuple[str, str]], content_length: int | None,
                       head_only: bool, hold: bool = False) -> bool:
        """Write the response head; returns whether the connection can be kept open afterwards. With `hold`,
        the head waits for the first body bytes, end_response or flush_held: one write instead of two."""
        keep, framing = self._framing(ex, status, content_length, head_only)
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        lines += [f"{n}: {v}" for n, v in headers]
        head = ("\r\n".join(lines) + framing).encode("latin-1")
        if hold:
            self._held = head
        else:
            self.write(head)
        return keep

    def begin_raw_response(self, ex: Exchange, status: int, header_lines: list[bytes], content_length: int | None,
                           head_only: bool) -> bool:
        """begin_response with the endpoint's header lines as they came (hop-by-hop ones taken out), held
        for the first body bytes: nothing decoded or formatted again."""
        keep, framing = self._framing(ex, status, content_length, head_only)
        self._held = b"HTTP/1.1 %d %b%b%b%b" % (status, REASON_BYTES.get(status, b"Status"),
                                                b"\r\n" if header_lines else b"", b"\r\n".join(header_lines),
                                                framing.encode("latin-1"))
        return keep

    def _framing(self, ex: Exchange, status: int, content_length: int | None, head_only: bool) -> tuple[bool, str]:
        """Whether the connection stays open after this response, and the end of its head: how the body is
        delimited, and Connection when it must be said."""
        self.last_status = status
        keep = ex.keep_alive and (ex.body_done or not ex.has_body or _drainable(ex))
        self._out_chunked = not head_only and content_length is None
        if self._out_chunked and ex.version == "1.0":
            self._out_chunked, keep = False, False  # an HTTP/1.0 client reads until the connection closes
        tail = "\r\nTransfer-Encoding: chunked" if self._out_chunked else ""
        if not keep:
            tail += "\r\nConnection: close"
        elif ex.version == "1.0":
            tail += "\r\nConnection: keep-alive"
        return keep, tail + "\r\n\r\n"

    def body(self, data: bytes) -> None:
        if not data:
            return
        self.bytes_out += len(data)
        self.write(b"%x\r\n%b\r\n" % (len(data), data) if self._out_chunked else data)

    def send_trailers(self, trailers: list[tuple[str, str]]) -> None:
        """Trailers from an HTTP/2 endpoint: not passed on to HTTP/1.1 clients (few read chunked trailers)."""

    def end_response(self) -> None:
        if self._out_chunked:
            self.write(b"0\r\n\r\n")
            self._out_chunked = False
        elif self._held is not None:
            self.write(b"")

    def send_simple(self, status: int, message: str, headers: list[tuple[str, str]] | None = None,
                    close: bool = False, head_only: bool = False) -> None:
        self.last_status = status
        body = (message + "\n").encode() if message else b""
        self.bytes_out = 0 if head_only else len(body)
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        for name, value in headers or []:
            lines.append(f"{name}: {value}")
        if body:
            lines.append("Content-Type: text/plain; charset=utf-8")
        lines.append(f"Content-Length: {len(body)}")
        if close:
            lines.append("Connection: close")
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))

    def _reject(self, status: int, message: str) -> None:
        """A request that must not be forwarded: answer it (when nothing was sent yet) and close."""
        if self.closed:
            return
        if self.serving is not None and not self.serving.done():
            self.serving.cancel()
        self.send_simple(status, message, close=True)
        self.transport.close()  # type: ignore[union-attr]
        self.closed = True


def reset(transport: asyncio.WriteTransport) -> None:
    """Close with a TCP reset: what the kernel still holds for a client that does not read is dropped, not
    trickled out for minutes after the connection is given up."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


# -- one exchange ----------------------------------------------------------------------------------------

def _drainable(ex: Exchange) -> bool:
    """Can the rest of this request's body be read and dropped after an early answer (see DRAIN_LIMIT)?"""
    if ex.upgrade or ex.version == "1.0":
        return False
    return ex.content_length is None or ex.content_length - ex.bytes_received <= DRAIN_LIMIT


def served_by(ex: Exchange, candidate: Candidate) -> None:
    """The rule that serves the exchange, for metrics and the access log. Its metrics are kept with the rule,
    so recording the request costs no lookup."""
    ex.route, ex.listener = candidate.route_name, candidate.listener
    counts = candidate.counts
    if counts is None:
        counts = candidate.counts = METRICS.route_counts(candidate.listener, candidate.route_name)
    ex.counts = counts


def release_held(ex: Exchange) -> None:
    """The exchange no longer counts in its client's requests in flight (maxInFlightPerClient)."""
    guard.IN_FLIGHT.release(ex.held)
    ex.held = ""


def finished(conn: ClientSide, ex: Exchange, status: int, now: float = 0.0) -> None:
    """Account for a finished exchange (`now`, if the caller has read the clock): metrics always, an access
    log line when logging is on."""
    if ex.held:
        release_held(ex)
    if not now:
        now = time.monotonic()
    elapsed = now - ex.started
    counts = ex.counts
    if counts is None:
        counts = METRICS.route_counts(ex.listener, ex.route)
    counts.observe(ex.method, status, elapsed, ex.upstream_time if ex.endpoint else -1.0, ex.bytes_received,
                   ex.bytes_sent)
    log_sink = accesslog.ACCESS_LOG
    if log_sink is None:
        return
    fmt = log_sink.wants(status, ex.listener, ex.route)
    if fmt:
        headers = ex.lowered()
        combined = fmt == "combined"  # the only format that writes the referer and the user agent
        log_sink.record(accesslog.Entry(
            log_sink.wall_time(now), ex.client or conn.peer, ex.method, headers.get("host", ""),
            ex.target.decode("latin-1"), _PROTOCOLS.get(ex.version) or f"HTTP/{ex.version}", status,
            ex.bytes_sent, elapsed, ex.upstream_time,
            ex.route, ex.listener, ex.endpoint, ex.retries, conn.server_name, ex.request_id,
            headers.get("referer", "") if combined else "", headers.get("user-agent", "") if combined else "",
            ex.policy), fmt)


def _split_target(target: bytes) -> tuple[str, str, str]:
    """(host from an absolute-form target or "", path, query), still percent-encoded."""
    # Bytes compared as ints: `b"#" in target` first tries "#" as an int, and that costs a formatted
    # TypeError per request before the search.
    if target and target[0] == 0x2F and (len(target) == 1 or target[1] != 0x2F) and 0x23 not in target:
        # The usual origin form ("/path?query"), which llhttp has checked already: split here, as parse_url
        # would (tests/test_request_parsing.py compares the two).
        raw_path, _, raw_query = target.partition(b"?")
        return "", raw_path.decode("latin-1"), raw_query.decode("latin-1")
    try:
        url: Any = httptools.parse_url(target)  # its stubs say bytes where it gives None
    except httptools.HttpParserInvalidURLError as exc:
        raise RequestRejected(400, f"invalid request target: {exc}") from exc
    host = url.host.decode("latin-1") if url.host else ""
    if host and url.port:
        host = f"{host}:{url.port}"
    path = url.path.decode("latin-1") if url.path else "/"
    query = url.query.decode("latin-1") if url.query else ""
    return host, path, query


# What routing found for a request: its site (configuration), the matched rule, host, path, query, the
# headers by lower-case name, and - when the fast lane chose them already - the backend and endpoint to try first.
Routed = tuple  # (Site, Candidate, str, str, str, dict[str, str], tuple[ir.Backend, ir.Endpoint] | None)


def route_request(conn: ClientSide, ex: Exchange, site: Site) -> Routed | bool:
    """Find the rule for a request. When the request is answered here instead (a bad target, 421, 404), the
    answer is sent and the result says whether the connection may be kept."""
    try:
        abs_host, path, query = _split_target(ex.target)
    except RequestRejected as exc:
        conn.send_simple(exc.status, str(exc), close=True)
        return False
    path = normal_path(path)  # matched and sent on in this form
    headers_lower = ex.lowered()
    host = abs_host or headers_lower.get("host") or ""
    if accesslog.ACCESS_LOG is not None and accesslog.ACCESS_LOG.is_active:
        # Keep the client's X-Request-Id, or make one; the pod sees it too, so logs can be joined.
        ex.request_id = headers_lower.get("x-request-id") or new_request_id()
        if "x-request-id" not in headers_lower:
            ex.add_header("X-Request-Id", ex.request_id)
    # Answering before the body was read: the connection cannot be reused unless the body is done.
    can_keep = not ex.has_body or ex.body_done
    head_only = ex.method == "HEAD"
    if acme_challenge.DIR is not None and path.startswith(acme_challenge.PREFIX):
        key_authorization = acme_challenge.answer(path)
        if key_authorization is not None:
            METRICS.acme_challenges.labels("http-01").inc()
            conn.send_simple(200, key_authorization, close=not can_keep, head_only=head_only)
            return can_keep
    limits = site.limits
    if limits is not None and guard.LAG.over(limits):  # ClientPolicy overload: shed until the loop keeps time
        METRICS.limits.labels("overload").inc()
        conn.send_simple(503, "overloaded: try again shortly", SHED_HEADERS, close=not can_keep, head_only=head_only)
        return can_keep
    if conn.server_name and site.router is not None:
        # A connection set up for one listener (by SNI) must not carry requests for another: 421.
        by_sni = site.router.listener_for(conn.server_name)
        by_host = site.router.listener_for(normalize_host(host))
        if by_sni is not by_host:
            conn.send_simple(421, "misdirected request: the TLS server name and Host select different listeners",
                             close=not can_keep, head_only=head_only)
            return can_keep
    router = site.router
    if router is None:
        candidate = None
    elif router.request_line_only:
        candidate = router.lookup_line(host, path, ex.method)
    else:
        candidate = router.lookup(Request(host=host, path=path, method=ex.method, headers=headers_lower,
                                          query=parse_qs(query, keep_blank_values=True) if query else {}))
    if candidate is None:
        conn.send_simple(404, "no route matches", close=not can_keep, head_only=head_only)
        return can_keep
    client_ip = candidate.route.client_ip
    if client_ip is not None:
        ex.client = guard.client_address_for(client_ip).of(conn.peer, headers_lower)
    spec = candidate.route.guard
    if spec is not None and not candidate.route.direct_status:
        refusal = _guarded(conn, ex, candidate, spec, host, path, headers_lower)
        if refusal is not None:
            return refuse(conn, ex, candidate, refusal, can_keep, head_only)
    return site, candidate, host, path, query, headers_lower, None


def refuse(conn: ClientSide, ex: Exchange, candidate: Candidate, refusal: guard.Refusal, can_keep: bool,
           head_only: bool) -> bool:
    """Answer a request its TrafficPolicy refused; whether the connection may be kept."""
    served_by(ex, candidate)
    ex.policy = refusal.rule
    METRICS.traffic_policy.labels(candidate.route_name, refusal.rule, refusal.result).inc()
    conn.send_simple(refusal.status, refusal.message, refusal.headers, close=not can_keep, head_only=head_only)
    return can_keep


def _guarded(conn: ClientSide, ex: Exchange, candidate: Candidate, spec: ir.RequestGuard, host: str, path: str,
             headers_lower: dict[str, str]) -> guard.Refusal | None:
    """The route's TrafficPolicy: a refusal, or None with the exchange marked (body limit, in-flight count,
    RateLimit headers for its answer)."""
    ready = guard.guard_for(spec)
    client = ex.client or conn.peer
    refusal, answer_headers, deferred = ready.check(client, ex.method, host, path, headers_lower,
                                                    candidate.route_name, ex.content_length, time.monotonic())
    if refusal is not None:
        return refusal
    if deferred is not None:
        ex.deferred = (ready, deferred)
    if ready.max_body is not None:
        if ex.bytes_received > ready.max_body:  # a body that came ahead of its routing (pipelined)
            return guard.Refusal(413, f"request body larger than {ready.max_body} bytes", [],
                                 "requestLimits.maxBodySize", "too-large")
        ex.body_limit = ready.max_body
    if ready.max_in_flight is not None:
        if not guard.IN_FLIGHT.acquire(client, ready.max_in_flight):
            return guard.Refusal(429, "too many requests in flight from this client", [],
                                 "requestLimits.maxInFlightPerClient", "limited")
        ex.held = client
    ex.answer_headers = answer_headers
    return None


async def serve_exchange(conn: ClientSide, ex: Exchange, routed: Routed | None = None) -> bool:
    """Serve one request; returns whether the connection may be kept open."""
    if routed is None:
        found = route_request(conn, ex, conn.site_getter())
        if found is True or found is False:
            return found
        routed = found
    site, candidate, host, path, query, headers_lower, first = routed
    can_keep = not ex.has_body or ex.body_done
    head_only = ex.method == "HEAD"
    route = candidate.route
    served_by(ex, candidate)
    if ex.deferred is not None:  # Global rate limits: Redis's answer (or the policy's failMode)
        ready, deferred = ex.deferred
        ex.deferred = None
        refusal = await ready.decide_global(deferred)
        if refusal is not None:
            return refuse(conn, ex, candidate, refusal, can_keep, head_only)
    matched_prefix = candidate.match.path.value if candidate.match.path.type == "PathPrefix" else None

    headers = ex.headers
    response_mods: list[dict] = []
    if ex.answer_headers is not None:
        response_mods.append({"set": [{"name": n, "value": v} for n, v in ex.answer_headers]})
    mirrors: list[ir.Filter] = []
    upstream_host = host
    upstream_path = path
    for f in route.filters:
        if f.type == "RequestRedirect":
            location = redirect_location(f.config, conn.scheme, host, conn.listener_port, path, query,
                                         matched_prefix)
            conn.send_simple(int(f.config.get("statusCode", 302)), "", [("Location", location)],
                             close=not can_keep, head_only=head_only)
            return can_keep
        if f.type == "RequestMirror":
            mirrors.append(f)
        elif f.type == "CORS":
            answer_now, cors_headers = cors(f.config, ex.method, headers_lower)
            if answer_now:
                conn.send_simple(204, "", cors_headers, close=not can_keep)
                return can_keep
            if cors_headers:
                response_mods.append({"set": [{"name": n, "value": v} for n, v in cors_headers]})
        elif f.type == "BasicAuth":
            refusal = await basic_auth.check(f.config, headers_lower.get("authorization"))
            if refusal is not None:
                conn.send_simple(refusal[0], refusal[1], [*refusal[2], *set_headers(response_mods)],
                                 close=not can_keep, head_only=head_only)
                return can_keep
        elif f.type == "ErrorPages":
            ex.error_pages = f
        elif f.type == "ExternalAuth":
            status, changes, cookies = await external_auth.check(
                f.config, ex.method, headers, headers_lower.get("host") or host, with_query(path, query),
                conn.scheme, ex.client or conn.peer)
            if status:
                conn.send_simple(status, "" if status == 302 else f"external authentication: {status}",
                                 [*changes, *set_headers(response_mods)], close=not can_keep, head_only=head_only)
                return can_keep
            headers = modify_headers(headers, {"set": [{"name": n, "value": v} for n, v in changes if v],
                                               "remove": [n for n, v in changes if not v]})
            if cookies:
                response_mods.append({"append": [("Set-Cookie", c) for c in cookies]})
        else:
            headers, upstream_host, upstream_path = _modify(f, headers, response_mods, upstream_host,
                                                            upstream_path, matched_prefix)
    if upstream_path != path and not upstream_path.startswith("/"):  # a rewrite-target's "$1" of "http://x"
        conn.send_simple(400, "the rewritten path is not an absolute path", close=not can_keep, head_only=head_only)
        return can_keep
    if route.direct_status:
        why = route.guard.problem if route.guard is not None else "route has no backend"
        conn.send_simple(route.direct_status, why, close=not can_keep, head_only=head_only)
        return can_keep

    if 0 <= ex.body_limit <= HELD_BODY_LIMIT and ex.content_length is None and ex.has_body and not ex.body_done:
        await _hold_body(conn, ex)
    return await _forward(conn, ex, site, route, candidate.client_certificate, headers, headers_lower, response_mods,
                          mirrors, upstream_host, upstream_path, query, matched_prefix, can_keep, head_only, first)


async def _hold_body(conn: ClientSide, ex: Exchange) -> None:
    """A body of no declared length under a maxBodySize: held whole before anything goes to a pod (it is at
    most that size), so that one past the limit is refused (413) before the pod sees a byte. Past the limit,
    the body's reader cancels this wait and answers."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def hold(chunk: bytes | None) -> None:
        if chunk is None:
            if not done.done():
                done.set_result(None)
        else:
            ex.buffer.append(chunk)
            ex.buffered += len(chunk)

    ex.sink = hold
    conn.resume_reading()  # held back while nothing took the body
    try:
        await done
    finally:
        ex.sink = None


async def _forward(conn: ClientSide, ex: Exchange, site: Site, route: ir.HTTPRoute,
                   client_certificate: ir.Certificate | None, headers: list[tuple[str, str]],
                   headers_lower: dict[str, str], response_mods: list[dict], mirrors: list[ir.Filter],
                   upstream_host: str, upstream_path: str, query: str, matched_prefix: str | None, can_keep: bool,
                   head_only: bool, first: tuple[ir.Backend, ir.Endpoint] | None = None) -> bool:
    """Choose a backend and an endpoint (`first` when the fast lane chose them), try, and try again
    elsewhere while the retry rules allow."""
    balancer = site.balancer
    registry = balancer.registry
    tried: list[ir.Endpoint] = []  # endpoints that failed this request: a retry goes elsewhere
    retries_done = 0
    retry_policy: ir.RetryPolicy | None = None
    attempts = 0
    while True:
        chosen: ir.Endpoint | None = None
        backend: ir.Backend | None
        if first is not None:
            (backend, chosen), first = first, None
        else:
            backend = balancer.backend_for(route)
        if backend is None or backend.invalid:
            conn.send_simple(500, f"invalid backend: {backend.invalid}" if backend else "no backend with weight",
                             close=not can_keep, head_only=head_only)
            return can_keep
        policy = backend.policy
        backend_state = registry.backend(backend.name)
        now = time.monotonic()
        if retry_policy is None:
            # The first backend chosen decides the retry policy of the whole request.
            retry_policy = policy.retry if policy is not None and policy.retry is not None else DEFAULT_RETRY
            if retry_policy is not DEFAULT_RETRY:
                backend_state.budget.deposit(retry_policy, now)
            if route.retry is not None:
                attempts = route.retry.attempts
            else:
                attempts = retry_policy.attempts
        key = cookie = None
        if policy is not None and policy.hash is not None:
            key, cookie = hash_key(policy.hash, upstream_path, headers_lower, ex.client or conn.peer)
        endpoint = chosen or balancer.endpoint_for(backend, key, tuple(tried))
        if endpoint is None:
            if attempts > retries_done and route.retry is not None and 503 in route.retry.codes:
                retries_done += 1  # no endpoint is a 503, which this route retries (on another backend, maybe)
                continue
            conn.send_simple(503, f"no ready endpoint for {backend.name}", close=not can_keep, head_only=head_only)
            return can_keep
        breaker = policy.circuit_breaker if policy is not None else None
        if breaker is not None:
            limit = _circuit_limit(breaker, backend_state, site, backend, endpoint, client_certificate)
            if limit:
                METRICS.circuit_rejections.labels(backend.name, limit).inc()
                conn.send_simple(503, f"backend {backend.name} is at its {limit} limit",
                                 [("X-Tidegate-Overloaded", limit)], close=not can_keep, head_only=head_only)
                return can_keep
        rules = NO_RETRY
        if attempts > retries_done and (breaker is None or breaker.max_retries is None
                                        or backend_state.retries < breaker.max_retries):
            if route.retry is not None:
                rules = route_rules(route.retry, ex.has_body)
            elif retry_policy is DEFAULT_RETRY:
                # One retry on a refused connection, nothing else: it cannot more than double the load, so
                # it needs no budget (and costs none per request).
                rules = DEFAULT_RULES
            elif backend_state.budget.available(retry_policy, now):
                rules = policy_rules(retry_policy, not ex.has_body and ex.method in IDEMPOTENT)
            else:
                METRICS.retry_budget_exhausted.labels(backend.name).inc()
        mods = response_mods
        if cookie is not None:
            mods = [*response_mods, {"append": [("Set-Cookie", cookie)]}]
        endpoint_state = registry.endpoint(endpoint.address, endpoint.port)
        endpoint_state.active += 1
        backend_state.active += 1
        if retries_done:
            backend_state.retries += 1
        try:
            outcome = await _attempt(conn, ex, site, route, backend, endpoint, endpoint_state, headers, mods, mirrors,
                                     upstream_host, upstream_path, query, matched_prefix, head_only, rules,
                                     client_certificate)
        finally:
            endpoint_state.active -= 1
            backend_state.active -= 1
            if retries_done:
                backend_state.retries -= 1
        if isinstance(outcome, _Intercepted):
            return await _error_page(conn, ex, site, route, outcome.status, headers, upstream_host, head_only)
        if not isinstance(outcome, _Retry):
            return outcome
        tried.append(endpoint)
        retries_done += 1
        ex.retries += 1
        if route.retry is None and retry_policy is not DEFAULT_RETRY:
            backend_state.budget.withdraw()
        METRICS.retries.labels(route.name).inc()
        mirrors = []  # a mirror gets one copy, not one per attempt
        log.debug("retrying %s %s after %s (%d left)", ex.method, upstream_path, outcome.reason,
                  attempts - retries_done)
        if outcome.reason == "connect":
            continue  # nothing reached the endpoint: no need to wait before the next one
        if route.retry is not None:
            if route.retry.backoff:
                await asyncio.sleep(route.retry.backoff)
        elif retry_policy is not None:
            await asyncio.sleep(backoff(retry_policy, retries_done - 1))


def _circuit_limit(breaker: ir.CircuitBreaker, state: BackendState, site: Site, backend: ir.Backend,
                   endpoint: ir.Endpoint, client_certificate: ir.Certificate | None) -> str:
    """The circuit-breaker limit this request would cross, or ""."""
    if breaker.max_requests is not None and state.active >= breaker.max_requests:
        return "max-requests"
    if breaker.max_connections is None and breaker.max_pending_requests is None:
        return ""
    pools = site.pools
    if pools.pool(endpoint.address, endpoint.port, backend.tls, client_certificate).idle:
        return ""  # an idle connection is there: no new connection, nothing pending
    if breaker.max_pending_requests is not None and state.pending >= breaker.max_pending_requests:
        return "max-pending-requests"
    if breaker.max_connections is not None:
        open_now = sum(pools.pool(e.address, e.port, backend.tls, client_certificate).open for e in backend.endpoints)
        if open_now >= breaker.max_connections:
            return "max-connections"
    return ""


def hash_key(key: ir.HashKey, path: str, headers_lower: dict[str, str], peer: str) -> tuple[str | None, str | None]:
    """The consistent-hash key of a request, and a Set-Cookie value when a sticky cookie has to be made."""
    if key.type == "Path":
        return path, None
    if key.type == "SourceIP":
        return peer, None
    if key.type == "Header":
        return headers_lower.get(key.name.lower()), None
    value = cookie_value(headers_lower.get("cookie", ""), key.name)
    if value is not None or key.cookie_ttl is None:
        return value, None
    value = secrets.token_hex(12)
    cookie = f"{key.name}={value}; Path={key.cookie_path}"
    if key.cookie_ttl > 0:
        cookie += f"; Max-Age={int(key.cookie_ttl)}"
    if key.cookie_expires > 0:
        cookie += f"; Expires={formatdate(time.time() + key.cookie_expires, usegmt=True)}"
    return value, f"{cookie}{key.cookie_attributes}; HttpOnly"


def cookie_value(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip('"')
    return None


class _Retry:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


async def _attempt(conn: ClientSide, ex: Exchange, site: Site, route: ir.HTTPRoute, backend: ir.Backend,
                   endpoint: ir.Endpoint, endpoint_state: EndpointState, headers: list[tuple[str, str]],
                   response_mods: list[dict],
                   mirrors: list[ir.Filter], upstream_host: str, upstream_path: str, query: str,
                   matched_prefix: str | None, head_only: bool, rules: RetryRules,
                   client_certificate: ir.Certificate | None = None) -> bool | _Retry | _Intercepted:
    """One try at an endpoint: the connection's keep-alive verdict, _Retry when another try is allowed, or
    _Intercepted when the route's error page answers instead."""
    response_mods = list(response_mods)
    for f in backend.filters:
        headers, upstream_host, upstream_path = _modify(f, headers, response_mods, upstream_host, upstream_path,
                                                        matched_prefix)
    target = with_query(upstream_path, query)
    ex.endpoint = f"{endpoint.address}:{endpoint.port}"
    for mirror in mirrors:
        _start_mirror(site, mirror, ex, headers, upstream_host, target, conn.peer)

    policy = backend.policy
    timeout = route.timeouts.request
    if timeout is None and policy is not None:
        timeout = policy.request_timeout
    for limit in (route.timeouts.backend_request, policy.retry.per_try_timeout if policy and policy.retry else None):
        if limit is not None and (timeout is None or limit < timeout):
            timeout = limit
    connect_timeout = policy.connect_timeout if policy is not None and policy.connect_timeout else CONNECT_TIMEOUT
    state = _ProxyState()
    if policy is not None and policy.read_timeout:
        state.read_timeout = policy.read_timeout
    if ex.error_pages is not None:
        state.intercept = frozenset(ex.error_pages.config["codes"])
    upstream_started = time.monotonic()
    registry = site.balancer.registry
    status: int | None = None
    client_left = False
    try:
        proxy = _proxy_h2 if backend.protocol == "kubernetes.io/h2c" else _proxy
        proxied = proxy(conn, ex, site, endpoint, headers, upstream_host, target, response_mods, state, rules.codes,
                        backend.tls, client_certificate, connect_timeout, registry.backend(backend.name))
        if timeout:
            async with asyncio.timeout(timeout):
                keep = await proxied
        else:
            keep = await proxied
        status = state.status or 200
        return keep
    except (TimeoutError, UpstreamTimeout):
        METRICS.upstream_errors.labels(backend.name, "timeout").inc()
        if not state.head_sent:
            if rules.timeout:
                return _Retry("timeout")
            conn.send_simple(504, "upstream timed out", close=True, head_only=head_only)
        return False
    except UpstreamError as exc:
        METRICS.upstream_errors.labels(backend.name, "error").inc()
        if not state.head_sent:
            if isinstance(exc, ConnectError) and rules.connect:
                return _Retry("connect")
            if rules.reset and not isinstance(exc, ConnectError):
                return _Retry(str(exc))
            conn.send_simple(502, str(exc), close=True, head_only=head_only)
        return False
    except _RetryStatus as retry_status:
        status = retry_status.status
        return _Retry(f"status {retry_status.status}")
    except _Intercepted as intercepted:
        status = intercepted.status
        return intercepted
    except asyncio.CancelledError:
        client_left = True  # not the endpoint's doing: nothing to record against it
        raise
    finally:
        now = time.monotonic()
        ex.upstream_time += now - upstream_started
        if state.upstream is not None and not state.released:
            state.upstream.close()
        conn.upstream = None
        if not client_left:
            endpoint_state.record(status, now - upstream_started)
            if policy is not None and policy.outlier is not None:
                record_outcome(registry, backend, endpoint_state, status, now)


class _RetryStatus(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class _Intercepted(Exception):
    """The pod answered with a status its route's ErrorPages takes over (nothing was sent to the client)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


async def _error_page(conn: ClientSide, ex: Exchange, site: Site, route: ir.HTTPRoute, status: int,
                      headers: list[tuple[str, str]], host: str, head_only: bool) -> bool:
    """ingress-nginx's custom-http-errors: the default-backend answers in the pod's place, asked GET / with
    X-Code, X-Format (the Accept), X-Original-URI, X-Namespace, X-Ingress-Name, X-Service-Name and
    X-Service-Port. Its answer, whatever the status, goes to the client."""
    pages = ex.error_pages
    assert pages is not None and pages.mirror is not None
    ex.error_pages = None  # (its own answer is not intercepted)
    backend = pages.mirror
    endpoint = site.balancer.endpoint_for(backend) if not backend.invalid else None
    body_pending = ex.has_body and not ex.body_done  # the rest of the request's body goes nowhere: close after
    if endpoint is None:
        conn.send_simple(status, f"error page backend {backend.name} has no ready endpoint", close=True,
                         head_only=head_only)
        return False
    config = pages.config
    target = ex.target.decode("latin-1") if isinstance(ex.target, bytes) else str(ex.target)
    headers = modify_headers(headers, {"set": [{"name": name, "value": value} for name, value in (
        ("X-Code", str(status)), ("X-Format", get_header(headers, "accept") or ""), ("X-Original-URI", target),
        ("X-Namespace", config["namespace"]), ("X-Ingress-Name", config["ingress"]),
        ("X-Service-Name", config["service"]), ("X-Service-Port", config["port"]))],
        "remove": ["content-length", "transfer-encoding"]})
    method = ex.method
    ex.method = "HEAD" if method == "HEAD" else "GET"
    ex.chunked, ex.content_length = False, None  # (the page is asked without the request's body)
    if body_pending:
        ex.keep_alive = False  # the rest of that body is never read: the answer says Connection: close
    try:
        outcome = await _attempt(conn, ex, site, route, backend, endpoint,
                                 site.balancer.registry.endpoint(endpoint.address, endpoint.port), headers, [], [],
                                 host, "/", "", None, head_only, NO_RETRY)
    finally:
        ex.method = method
    if not isinstance(outcome, bool):  # (a retry of the error page is not tried: the pod's status it is)
        conn.send_simple(status, f"error page backend {backend.name} failed", close=True, head_only=head_only)
        return False
    return outcome and not body_pending


def _modify(f: ir.Filter, headers: list[tuple[str, str]], response_mods: list[dict], host: str, path: str,
            matched_prefix: str | None) -> tuple[list[tuple[str, str]], str, str]:
    """The filters that change the request or queue a response change (route or backend level)."""
    if f.type == "RequestHeaderModifier":
        headers = modify_headers(headers, f.config)
    elif f.type == "ResponseHeaderModifier":
        response_mods.append(f.config)
    elif f.type == "URLRewrite":
        host, path = _rewrite(f.config, host, path, matched_prefix)
    return headers, host, path


def _rewrite(config: dict, host: str, path: str, matched_prefix: str | None) -> tuple[str, str]:
    if config.get("hostname"):
        host = config["hostname"]
    if config.get("path"):
        path = replace_path(path, config["path"], matched_prefix)
    return host, path


class _ProxyState:
    __slots__ = ("head_sent", "intercept", "read_timeout", "released", "status", "upstream")

    def __init__(self) -> None:
        self.head_sent = False
        self.intercept: frozenset[int] | None = None  # statuses an ErrorPages filter answers in the pod's place
        self.read_timeout = 0.0  # the backend's BackendPolicy (proxy-read-timeout); 0: the run's
        self.status = 0
        self.upstream: UpstreamConnection | None = None
        self.released = False


def _forward_headers(ex: Exchange, headers: list[tuple[str, str]], peer: str, scheme: str,
                     original_host: str) -> list[tuple[str, str]]:
    """The request headers to send upstream: hop-by-hop ones and Host removed; X-Forwarded-For/-Proto/-Host,
    Forwarded and Via added (existing values extended)."""
    # The names in lower case: the parser's when no filter changed the headers.
    lnames = ex.lnames if headers is ex.headers and len(ex.lnames) == len(headers) else [n.lower() for n, _ in headers]
    skip = NOT_FORWARDED
    if "connection" in lnames:
        skip = NOT_FORWARDED | {t.strip().lower() for (_, value), lname in zip(headers, lnames, strict=True)
                                if lname == "connection" for t in value.split(",")}
    out: list[tuple[str, str]] = []
    forwarded_for = forwarded = via = None
    has_proto = has_host = False
    for (name, value), lname in zip(headers, lnames, strict=True):
        if lname in skip:
            if lname == "x-forwarded-for":
                forwarded_for = value
            elif lname == "forwarded":
                forwarded = value
            elif lname == "via":
                via = value
            continue
        if lname == "x-forwarded-proto":
            has_proto = True
        elif lname == "x-forwarded-host":
            has_host = True
        out.append((name, value))
    out.append(("X-Forwarded-For", f"{forwarded_for}, {peer}" if forwarded_for else peer))
    if not has_proto:
        out.append(("X-Forwarded-Proto", scheme))
    if not has_host:
        out.append(("X-Forwarded-Host", original_host))
    element = forwarded_element(peer, scheme, original_host)
    out.append(("Forwarded", f"{forwarded}, {element}" if forwarded else element))
    out.append(("Via", f"{via}, {VIA}" if via else VIA))
    return out


def forwarded_element(peer: str, scheme: str, host: str) -> str:
    """This hop's element of a Forwarded header (RFC 7239): an IPv6 address is quoted and bracketed."""
    peer_token = f'"[{peer}]"' if ":" in peer else peer
    return f"for={peer_token};proto={scheme}" + (f";host={host}" if host else "")


def request_head(ex: Exchange, headers: list[tuple[str, str]], host: str, target: str, peer: str,
                  scheme: str, original_host: str) -> bytes:
    lines = [f"{ex.method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{n}: {v}" for n, v in _forward_headers(ex, headers, peer, scheme, original_host)]
    if ex.upgrade:
        upgrade = get_header(headers, "upgrade")
        if upgrade:
            lines += ["Connection: Upgrade", f"Upgrade: {upgrade}"]
    if ex.chunked:
        lines.append("Transfer-Encoding: chunked")
    elif ex.content_length is not None:
        lines.append(f"Content-Length: {ex.content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _proxy_h2(conn: ClientSide, ex: Exchange, site: Site, endpoint: ir.Endpoint,
                    headers: list[tuple[str, str]], host: str, target: str, response_mods: list[dict],
                    state: _ProxyState, retry_codes: frozenset[int] = frozenset(),
                    tls: ir.BackendTLS | None = None, client_certificate: ir.Certificate | None = None,
                    connect_timeout: float = CONNECT_TIMEOUT, backend_state: BackendState | None = None) -> bool:
    """The exchange over HTTP/2 to an h2c endpoint (appProtocol kubernetes.io/h2c), or h2 over TLS when the
    backend has TLS (a BackendTLSPolicy; an Ingress's backend-protocol GRPCS)."""
    h2conn = await site.pools.h2_pool(endpoint.address, endpoint.port, tls, client_certificate).acquire(
        connect_timeout)
    original_host = get_header(ex.headers, "host") or host
    fields = [(":method", ex.method), (":scheme", "https" if tls is not None else "http"), (":authority", host),
              (":path", target)]
    fields += [(n.lower(), v) for n, v in _forward_headers(ex, headers, conn.peer, conn.scheme, original_host)
               if n.lower() not in ("te", "connection")]
    # The one TE value HTTP/2 allows (RFC 9113 8.2.2), and one gRPC servers require: without it grpcio
    # refuses every call.
    if "trailers" in (get_header(ex.headers, "te") or "").lower():
        fields.append(("te", "trailers"))
    if ex.content_length is not None:
        fields.append(("content-length", str(ex.content_length)))
    stream = h2conn.open_stream(fields, end_stream=not ex.has_body)
    try:
        return await _exchange_h2(conn, ex, stream, response_mods, state, retry_codes)
    except BaseException:
        stream.cancel()  # the client left, or the exchange failed: the pod stops working on it (RST_STREAM)
        raise


async def _exchange_h2(conn: ClientSide, ex: Exchange, stream: H2UpstreamStream, response_mods: list[dict],
                       state: _ProxyState, retry_codes: frozenset[int]) -> bool:
    if ex.has_body:
        for chunk in ex.buffer:
            stream.send(chunk)
        ex.buffer.clear()
        ex.sink = stream.send
        if ex.body_done:
            stream.send(None)
        else:
            conn.resume_reading()
    head = await stream.head_future
    state.status = head.status
    if head.status in retry_codes:
        raise _RetryStatus(head.status)
    # An HTTP/2 client gets a response that ended with its head the same way (gRPC's Trailers-Only).
    head_only = ex.method == "HEAD" or head.status in (204, 304) or (stream.ended_with_head and ex.version == "2")
    keep = conn.begin_response(ex, head.status, response_headers(head, response_mods), head.content_length,
                               head_only)
    state.head_sent = True
    conn.upstream = stream
    stream.set_sink(conn.body)
    await stream.done_future
    if stream.trailers:
        conn.send_trailers(stream.trailers)  # before the end: HTTP/2 ends the stream with them
    conn.end_response()
    state.released = True  # the connection is shared by streams: never closed for one of them
    return keep


def may_send_again(ex: Exchange, error: BaseException) -> bool:
    """After a kept connection failed as it was reused: may the request go again on another one? Only when the
    endpoint closed it before a byte of an answer (its idle timeout and ours met, so the request was most
    likely never read) and the request has no body and an idempotent method. The fast lane and the full path
    both ask this."""
    return isinstance(error, ClosedUnanswered) and not ex.has_body and ex.method in IDEMPOTENT


async def _acquire(pool: EndpointPool, connect_timeout: float, backend_state: BackendState | None
                   ) -> UpstreamConnection:
    """A connection from the pool: an idle kept one, or a new one (counted as pending for the circuit
    breaker's maxPendingRequests while it opens)."""
    if pool.idle or backend_state is None:
        return await pool.acquire(connect_timeout)
    backend_state.pending += 1
    try:
        return await pool.acquire(connect_timeout)
    finally:
        backend_state.pending -= 1


async def _proxy(conn: ClientSide, ex: Exchange, site: Site, endpoint: ir.Endpoint,
                 headers: list[tuple[str, str]], host: str, target: str, response_mods: list[dict],
                 state: _ProxyState, retry_codes: frozenset[int] = frozenset(),
                 tls: ir.BackendTLS | None = None, client_certificate: ir.Certificate | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, backend_state: BackendState | None = None) -> bool:
    pool = site.pools.pool(endpoint.address, endpoint.port, tls, client_certificate)
    upstream = await _acquire(pool, connect_timeout, backend_state)
    reused = upstream.idle_since > 0.0  # it served an exchange before, and waited in the pool since
    upstream.read_timeout = state.read_timeout
    state.upstream = upstream
    conn.upstream = upstream
    original_host = get_header(ex.headers, "host") or host
    request_bytes = request_head(ex, headers, host, target, conn.peer, conn.scheme, original_host)
    upstream.start_exchange(request_bytes)
    if ex.expect_continue and not ex.body_done:
        conn.send_continue()

    # Request body: what arrived already, then the rest as it comes.
    if ex.has_body:
        chunked = ex.chunked

        def send_body(chunk: bytes | None) -> None:
            if chunk is None:
                if chunked:
                    upstream.write(b"0\r\n\r\n")
            elif chunk:
                upstream.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)

        upstream.on_backpressure = lambda paused: conn.pause_reading() if paused else (
            None if ex.body_done else conn.resume_reading())
        for chunk in ex.buffer:
            send_body(chunk)
        ex.buffer.clear()
        ex.sink = send_body
        if ex.body_done:
            send_body(None)
        else:
            conn.resume_reading()

    assert upstream.head_future is not None
    try:
        head = await upstream.head_future
    except ClosedUnanswered as unanswered:
        # Once, on another connection to the same endpoint: not a retry of the route's or the backend's policy.
        if not reused or not may_send_again(ex, unanswered):
            raise
        upstream.close()
        ex.retries += 1
        upstream = await _acquire(pool, connect_timeout, backend_state)
        upstream.read_timeout = state.read_timeout
        state.upstream = upstream
        conn.upstream = upstream
        upstream.start_exchange(request_bytes)
        assert upstream.head_future is not None
        head = await upstream.head_future
    assert upstream.done_future is not None
    state.status = head.status
    if head.status in retry_codes:
        raise _RetryStatus(head.status)  # nothing was sent to the client yet: another try is possible
    if state.intercept is not None and head.status in state.intercept:
        raise _Intercepted(head.status)  # the route's error page answers instead
    if head.status == 101 and ex.upgrade:
        await _tunnel(conn, upstream, head, response_mods, state)
        return False
    head_only = ex.method == "HEAD" or head.status in (204, 304)
    client_keep = conn.begin_response(ex, head.status, response_headers(head, response_mods), head.content_length,
                                      head_only)
    state.head_sent = True
    if head_only:
        upstream.reusable = upstream.reusable and ex.method != "HEAD"  # llhttp would wait for a HEAD "body"
        if ex.method == "HEAD":
            upstream.close()
        else:
            await upstream.done_future
        conn.end_response()
    else:
        upstream.set_sink(conn.body)
        if conn.write_paused:
            upstream.pause_reading()
        await upstream.done_future
        conn.end_response()
    if not upstream.closed and upstream.reusable and ex.body_done:
        state.released = True
        upstream.pool.release(upstream)
    return client_keep


async def _tunnel(conn: ClientSide, upstream: UpstreamConnection, head: ResponseHead,
                  response_mods: list[dict], state: _ProxyState) -> None:
    """After a 101: pass bytes both ways until either side closes (WebSocket and other upgrades)."""
    headers = [(n, v) for n, v in head.headers if n.lower() not in HOP_BY_HOP]
    for config in response_mods:
        headers = modify_headers(headers, config)
    upgrade = get_header(head.headers, "upgrade") or "websocket"
    lines = ["HTTP/1.1 101 Switching Protocols", "Connection: Upgrade", f"Upgrade: {upgrade}"]
    lines += [f"{n}: {v}" for n, v in headers]
    conn.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    state.head_sent = True
    loop = asyncio.get_running_loop()
    conn.tunnel_closed = loop.create_future()
    upstream.start_tunnel(conn.write)
    if conn.tunnel_pending:
        upstream.write(conn.tunnel_pending)
        conn.tunnel_pending = b""
    conn.tunnel = upstream
    upstream.on_backpressure = lambda paused: conn.pause_reading() if paused else conn.resume_reading()
    conn.resume_reading()
    upstream_closed = loop.create_future()

    def closed() -> None:
        if not upstream_closed.done():
            upstream_closed.set_result(None)

    upstream.on_closed = closed
    if upstream.closed:
        upstream_closed.set_result(None)
    await asyncio.wait([conn.tunnel_closed, upstream_closed], return_when=asyncio.FIRST_COMPLETED)
    upstream.close()
    if conn.transport is not None:
        conn.transport.close()


def response_headers(head: ResponseHead, mods: list[dict]) -> list[tuple[str, str]]:
    """The endpoint's response headers without hop-by-hop ones, after ResponseHeaderModifiers."""
    skip = HOP_BY_HOP
    if "connection" in head.lnames:
        skip = HOP_BY_HOP | {t.strip().lower() for (_, value), lname in zip(head.headers, head.lnames, strict=True)
                             if lname == "connection" for t in value.split(",")}
    headers = [h for h, lname in zip(head.headers, head.lnames, strict=True) if lname not in skip]
    for config in mods:
        headers = modify_headers(headers, config)
    return headers


def _start_mirror(site: Site, mirror: ir.Filter, ex: Exchange, headers: list[tuple[str, str]], host: str,
                  target: str, peer: str) -> None:
    """Fire and forget: send a copy of the request head (bodies are not mirrored) to the mirror backend."""
    config = mirror.config
    if "percent" in config and random.random() * 100 >= float(config["percent"]):
        return
    if "fraction" in config:
        fraction = config["fraction"]
        if random.random() * float(fraction.get("denominator", 100)) >= float(fraction["numerator"]):
            return
    backend = mirror.mirror
    if backend is None or backend.invalid:
        return
    endpoint = site.balancer.endpoint_for(backend)
    if endpoint is None:
        return
    copy = Exchange()
    copy.method, copy.version = ex.method, "1.1"
    head = request_head(copy, headers, host, target, peer, "http", host)

    async def send() -> None:
        pool = site.pools.pool(endpoint.address, endpoint.port, backend.tls)
        try:
            upstream = await pool.acquire(CONNECT_TIMEOUT)
        except UpstreamError:
            return
        try:
            upstream.start_exchange(head)
            async with asyncio.timeout(10):
                await upstream.head_future  # type: ignore[misc]
            if copy.method == "HEAD":
                upstream.close()
                return
            upstream.set_sink(lambda _data: None)
            async with asyncio.timeout(10):
                await upstream.done_future  # type: ignore[misc]
            pool.release(upstream)
        except (TimeoutError, UpstreamError):
            upstream.close()

    task = asyncio.get_running_loop().create_task(send())
    site.background.add(task)
    task.add_done_callback(site.background.discard)


__all__ = ["ClientConnection", "normalize_host"]
