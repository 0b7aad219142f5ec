"""Upstream HTTP/1.1 connections to pod endpoints, pooled per endpoint with keep-alive.

An `UpstreamConnection` carries one exchange at a time: the proxy writes the request head and streams the
body; the response head resolves a future; body chunks go to a sink the proxy sets (the client connection),
with backpressure both ways through pause_reading/resume_reading.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any, Final

import httptools

from tidegate import ir
from tidegate.dataplane.tls import load_certificate


class UpstreamError(Exception):
    """The endpoint refused, reset or broke the exchange (the client sees 502)."""


class UpstreamTimeout(UpstreamError):
    """The endpoint sent nothing for too long while its answer was awaited (the client sees 504, as for any
    timeout of tidegate's)."""


class ConnectError(UpstreamError):
    """No connection could be made: nothing of the request was sent, so any request may go elsewhere."""


class ClosedUnanswered(UpstreamError):
    """The endpoint closed the connection before a byte of the response came. On a kept connection reused
    just as the endpoint's idle timeout closed it, the request was most likely never read."""


class ResponseHead:
    __slots__ = ("chunked", "content_length", "headers", "keep_alive", "lnames", "reason", "status", "version")

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[str, str]] = []
        self.lnames: list[str] = []  # each header's name in lower case
        self.version = "1.1"
        self.keep_alive = True
        self.chunked = False
        self.content_length: int | None = None


# Response headers never passed on (RFC 9110 §7.6.1), as the bytes split_head compares.
HOP_BY_HOP_BYTES: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                                     b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                                     b"proxy-authorization"})


def _name_to_look_at(line: bytes) -> int:
    """The length of a header line's name when the name may be hop-by-hop or Content-Length, else 0: read from
    the first letter and where a colon could be (llhttp allows no space before it), so that most lines are
    passed on without a search, a copy or a hash. Compiled, each step is a C comparison."""
    size = len(line)
    if not size:
        return 0
    first = line[0] | 0x20  # lower case
    if first == 0x63:  # c: connection, content-length
        if size > 10 and line[10] == 0x3A:
            return 10
        if size > 14 and line[14] == 0x3A:
            return 14
    elif first == 0x6B:  # k: keep-alive
        if size > 10 and line[10] == 0x3A:
            return 10
    elif first == 0x70:  # p: proxy-connection, proxy-authenticate, proxy-authorization
        for length in (16, 18, 19):
            if size > length and line[length] == 0x3A:
                return length
    elif first == 0x74:  # t: te, trailer, transfer-encoding
        for length in (2, 7, 17):
            if size > length and line[length] == 0x3A:
                return length
    elif first == 0x75:  # u: upgrade
        if size > 7 and line[7] == 0x3A:
            return 7
    return 0


def split_head(raw: bytes) -> tuple[list[bytes], int | None, bool]:
    """A response head as the endpoint sent it (status line first, no final CRLF CRLF; llhttp has checked
    it): the header lines to pass on as they are, the Content-Length, and whether the body is chunked."""
    lines = raw.split(b"\r\n")
    kept: list[bytes] = []
    content_length: int | None = None
    chunked = False
    tokens: list[bytes] = []  # header names the Connection header makes hop-by-hop too
    for i in range(1, len(lines)):
        line = lines[i]
        colon = _name_to_look_at(line)
        if not colon:
            kept.append(line)
            continue
        lname = line[:colon].lower()
        if lname in HOP_BY_HOP_BYTES:
            value = line[colon + 1:].strip(b" \t").lower()
            if lname == b"transfer-encoding":
                chunked = value.find(b"chunked") >= 0  # `in` would raise and clear a TypeError first
            elif lname == b"connection" and value != b"keep-alive" and value != b"close":
                for token in value.split(b","):
                    token = token.strip(b" \t")
                    if token and token != b"keep-alive" and token != b"close":
                        tokens.append(token)
            continue
        if lname == b"content-length":
            content_length = int(line[colon + 1:])
        kept.append(line)
    if tokens:
        kept = [line for line in kept if line.partition(b":")[0].lower() not in tokens]
    return kept, content_length, chunked


class _LeanCallbacks:
    """The fast lane's response parser calls these: no callback per header (split_head reads the head)."""

    __slots__ = ("conn",)

    def __init__(self, conn: UpstreamConnection):
        self.conn = conn

    def on_headers_complete(self) -> None:
        self.conn.lean_head()

    def on_body(self, body: bytes) -> None:
        self.conn.sink(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        self.conn.lean_done()


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: EndpointPool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: ResponseHead | None = None
        self.head_future: asyncio.Future[ResponseHead] | None = None
        self.done_future: asyncio.Future[None] | None = None
        self.sink: Callable[[bytes], None] | None = None  # receives response body bytes
        self.closed = False
        self.idle_since = 0.0
        self.reusable = True
        self._pending_body: list[bytes] = []
        self._can_write = asyncio.Event()
        self._can_write.set()
        # Called when the endpoint's socket buffer fills and drains: the proxy pauses the client's reading.
        self.on_backpressure: Callable[[bool], None] | None = None
        # After a 101 the connection carries raw bytes (WebSocket): they go here, unparsed.
        self.raw_sink: Callable[[bytes], None] | None = None
        self.leftover = b""  # bytes that followed the 101 response head in the same read
        self.on_closed: Callable[[], object] | None = None
        # The fast lane's exchange (dataplane/fastlane.py) takes the response by callbacks instead of futures.
        self.handler: Any = None
        self.reading_paused = False
        # The parser of the response under way (None between responses): the full one, or for the fast lane
        # when the whole head came in one read, a lean one that reads the head from `_raw_head` at once.
        self._feeding: Any = None
        self._lean: Any = None
        self._raw_head = b""
        self.close_delimited = False  # the response under way ends when the endpoint closes
        self.reads = 0
        self.read_timeout = 0.0  # this exchange's own limit on the pod's silence (deadlines.py); 0: the run's

    # -- transport events --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.open -= 1
        self._can_write.set()
        if self.on_closed is not None:
            self.on_closed()
        unanswered = self._feeding is None and self.head is None  # not a byte of a response yet
        error = (ClosedUnanswered if unanswered else UpstreamError)(
            f"endpoint closed the connection{': ' + str(exc) if exc else ''}")
        if self.handler is not None:
            self.pool.forget(self)
            if self.close_delimited:
                self.handler.upstream_done()  # the close is the end of this body
            else:
                self.handler.upstream_failed(error)
            return
        if self.head_future is not None and not self.head_future.done():
            self.head_future.set_exception(error)
        if self.done_future is not None and not self.done_future.done():
            # a close-delimited body ends here; otherwise the response was cut short
            if self.head is not None and self.head.content_length is None and not self.head.chunked:
                self.done_future.set_result(None)
            else:
                self.done_future.set_exception(error)
                head_future = self.head_future
                if head_future is not None and (head_future.cancelled() or head_future.exception() is not None):
                    self.done_future.exception()  # nobody waits for the body of a response that never came
        self.pool.forget(self)

    def time_out(self, seconds: float) -> None:
        """The endpoint sent nothing for `seconds` while its answer was awaited: the exchange fails with
        UpstreamTimeout (a 504 when nothing of the answer has reached the client), and the connection closes."""
        error = UpstreamTimeout(f"the endpoint sent nothing for {seconds:g} s")
        self.reusable = False
        handler = self.handler
        if handler is not None:
            handler.upstream_failed(error)  # the fast lane closes the connection
            return
        for future in (self.head_future, self.done_future):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # whichever the proxy awaits carries it
        self.close()

    def pause_writing(self) -> None:
        self._can_write.clear()
        if self.on_backpressure is not None:
            self.on_backpressure(True)

    def resume_writing(self) -> None:
        self._can_write.set()
        if self.on_backpressure is not None:
            self.on_backpressure(False)

    def data_received(self, data: bytes) -> None:
        self.reads += 1  # the deadline check's sign of life (deadlines.py)
        if self.raw_sink is not None:
            self.raw_sink(data)
            return
        try:
            parser = self._feeding
            if parser is None:  # these bytes begin a response
                parser = self.parser
                if self.handler is not None:
                    end = data.find(b"\r\n\r\n")
                    if end > 0 and data[9:10] != b"1":  # the whole head, and not an interim 1xx one
                        self._raw_head = data[:end]
                        parser = self._lean
                        if parser is None:
                            parser = self._lean = httptools.HttpResponseParser(_LeanCallbacks(self))
                self._feeding = parser
            parser.feed_data(data)
            if self.handler is not None:
                self.handler.upstream_read()
        except httptools.HttpParserUpgrade as upgrade:
            self.leftover += data[upgrade.args[0]:]
            self.reusable = False
        except httptools.HttpParserError as exc:
            self.reusable = False
            error = UpstreamError(f"invalid response from endpoint: {exc}")
            if self.handler is not None:
                self.handler.upstream_failed(error)
            elif self.head_future is not None and not self.head_future.done():
                self.head_future.set_exception(error)
            elif self.done_future is not None and not self.done_future.done():
                self.done_future.set_exception(error)
            if self.transport is not None:
                self.transport.close()

    # -- parser callbacks --------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.head = ResponseHead()

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self.head
        assert head is not None
        text = name.decode("latin-1")
        value_text = value.decode("latin-1")
        head.headers.append((text, value_text))
        lname = text.lower()
        head.lnames.append(lname)
        if lname == "transfer-encoding":
            if "chunked" in value_text.lower():
                head.chunked = True
        elif lname == "content-length":
            try:
                head.content_length = int(value_text)
            except ValueError:
                pass

    def on_headers_complete(self) -> None:
        head = self.head
        assert head is not None
        head.status = self.parser.get_status_code()
        head.version = self.parser.get_http_version()
        head.keep_alive = self.parser.should_keep_alive()
        if 100 <= head.status < 200 and head.status != 101:
            self.head = None  # an interim response: wait for the real one
            return
        self.close_delimited = (head.content_length is None and not head.chunked and head.status not in (204, 304)
                                and head.status != 101)
        if self.handler is not None:
            self.handler.upstream_head(head)
        elif self.head_future is not None and not self.head_future.done():
            self.head_future.set_result(head)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink(body)
        else:
            self._pending_body.append(body)

    def lean_head(self) -> None:
        parser = self._lean
        lines, content_length, chunked = split_head(self._raw_head)
        self._raw_head = b""
        status = parser.get_status_code()
        self.close_delimited = content_length is None and not chunked and status not in (204, 304)
        if not parser.should_keep_alive():
            self.reusable = False
        self.handler.upstream_raw_head(status, lines, content_length)

    def lean_done(self) -> None:
        self._feeding = None
        self.close_delimited = False
        self.handler.upstream_done()

    def on_message_complete(self) -> None:
        self._feeding = None
        self.close_delimited = False
        if self.head is None:
            return  # end of an interim response
        if not self.head.keep_alive:
            self.reusable = False
        if self.handler is not None:
            self.handler.upstream_done()
        elif self.done_future is not None and not self.done_future.done():
            self.done_future.set_result(None)

    # -- used by the proxy ---------------------------------------------------------------------------
    def start_fast(self, handler: Any, head: bytes, sink: Callable[[bytes], None]) -> None:
        """An exchange whose response goes to `handler` (upstream_head, upstream_done, upstream_failed) and
        whose body bytes go to `sink`: no futures."""
        self.handler = handler
        self.head = None
        self.head_future = self.done_future = None
        self.sink = sink
        self.read_timeout = 0.0  # (the fast lane takes no rule whose backend sets one)
        self.on_backpressure = None
        assert self.transport is not None
        self.transport.write(head)

    def start_exchange(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.head = None
        self.head_future = loop.create_future()
        self.done_future = loop.create_future()
        self.sink = None
        self.on_backpressure = None
        self._pending_body = []
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        await self._can_write.wait()

    def start_tunnel(self, sink: Callable[[bytes], None]) -> None:
        """From now on pass every byte from the endpoint to `sink` unparsed (after an upgrade)."""
        self.raw_sink = sink
        self.reusable = False
        if self.leftover:
            sink(self.leftover)
            self.leftover = b""

    def set_sink(self, sink: Callable[[bytes], None]) -> None:
        self.sink = sink
        for chunk in self._pending_body:
            sink(chunk)
        self._pending_body = []

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


def _check_subject_alt_names(ssl_object: ssl.SSLObject | None, wanted: tuple[str, ...]) -> str:
    """BackendTLSPolicy subjectAltNames: the endpoint's certificate must carry one of them (DNS or URI)."""
    cert: Any = ssl_object.getpeercert() if ssl_object is not None else None
    names = {value for kind, value in (cert or {}).get("subjectAltName", ()) if kind in ("DNS", "URI")}
    return "" if names & set(wanted) else f"certificate names {sorted(names)} include none of {list(wanted)}"


def backend_tls_context(ca_pem: str, well_known: str, check_hostname: bool,
                        client_certificate: ir.Certificate | None = None, verify: bool = True,
                        alpn: str = "http/1.1") -> ssl.SSLContext:
    """A client context for TLS to endpoints: trust the policy's CA certificates (or the system's), and present
    the Gateway's client certificate when it has one. `verify` False: encryption without checking the pod's
    certificate (an Ingress's backend-protocol HTTPS, as ingress-nginx does by default). `alpn`: "h2" for
    HTTP/2 pods."""
    # wellKnownCACertificates "System" and a policy with CA certificates are the two forms the API allows.
    ctx = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    ctx.check_hostname = check_hostname and verify
    if not verify:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    if client_certificate is not None:
        load_certificate(ctx, client_certificate)
    return ctx


async def connect(factory: Callable[[], asyncio.Protocol], host: str, port: int, timeout: float,
                  **extra) -> tuple[asyncio.BaseTransport, Any]:
    """Open a connection to an endpoint. Failures say what went wrong: ConnectError when nothing was sent
    (refused, unreachable, timed out: any request may go elsewhere), UpstreamError for a failed TLS
    handshake."""
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.get_running_loop().create_connection(factory, host, port, **extra)
    except TimeoutError as timeout_error:
        raise ConnectError(f"connect to {host}:{port} timed out") from timeout_error
    except ssl.SSLError as tls_error:
        raise UpstreamError(f"TLS to {host}:{port} failed: {tls_error.reason or tls_error}") from tls_error
    except OSError as exc:
        raise ConnectError(f"connect to {host}:{port} failed: {exc.strerror or exc}") from exc


class EndpointPool:
    """Idle keep-alive connections to one endpoint. A request takes an idle one when there is one, and
    opens a new connection otherwise: it never waits on a busy connection."""

    def __init__(self, host: str, port: int, max_idle: int = 1024, idle_timeout: float = 60.0,
                 tls: ssl.SSLContext | None = None, server_hostname: str = "",
                 subject_alt_names: tuple[str, ...] = ()):
        self.host = host
        self.port = port
        self.tls = tls  # TLS to the endpoint (BackendTLSPolicy), verified against server_hostname or the SANs
        self.server_hostname = server_hostname
        self.subject_alt_names = subject_alt_names
        self.idle: list[UpstreamConnection] = []  # the last released is taken first; a list: see http1's queue
        self.open = 0  # connections open now, idle or busy (for the circuit breaker's maxConnections)
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout

    async def acquire(self, connect_timeout: float) -> UpstreamConnection:
        conn = self.take_idle()
        if conn is not None:
            return conn
        extra = {"ssl": self.tls, "server_hostname": self.server_hostname} if self.tls is not None else {}
        transport, protocol = await connect(lambda: UpstreamConnection(self), self.host, self.port, connect_timeout,
                                            **extra)
        if self.tls is not None and self.subject_alt_names:
            problem = _check_subject_alt_names(transport.get_extra_info("ssl_object"), self.subject_alt_names)
            if problem:
                transport.close()
                raise UpstreamError(f"TLS to {self.host}:{self.port}: {problem}")
        return protocol

    def take_idle(self, now: float = 0.0) -> UpstreamConnection | None:
        """An idle keep-alive connection, or None when a new one has to be opened (`now`, if the caller has
        read the clock)."""
        idle = self.idle
        if idle:
            if not now:
                now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self.idle_timeout:
                    return conn
                conn.close()
        return None

    def release(self, conn: UpstreamConnection, now: float = 0.0) -> None:
        conn.handler = None
        if conn.closed or not conn.reusable or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.sink = None
        conn.on_backpressure = None
        if conn.reading_paused:  # the last client could not keep up: the next one may
            conn.resume_reading()
        conn.idle_since = now or time.monotonic()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()
