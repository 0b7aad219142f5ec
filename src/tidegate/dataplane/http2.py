"""HTTP/2 at the edge (h2c with prior knowledge, and h2 chosen by ALPN on TLS), with the `h2` library.

Each stream becomes an `Exchange` served by the same `serve_exchange` as HTTP/1.1 (routing, filters,
retries, upstream pools); `H2Stream` offers the response methods it calls. A stream that HTTP/1.1's fast lane
would take (a request without a body on a plain rule, to an endpoint with an idle kept connection) is served
by `H2FastExchange` instead: callbacks from the endpoint's connection, with no task. Response bodies respect
HTTP/2 flow control: what the peer's window cannot take yet waits in the stream, and the endpoint's
connection stops being read while too much waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from tidegate.dataplane import fastlane, guard
from tidegate.dataplane.filters import get_header
from tidegate.dataplane.h2limits import ControlFrameBudget, H2Limits, ServerConnection
from tidegate.dataplane.deadlines import Deadlines, Watch, slow_body_message
from tidegate.dataplane.h2request import read_request
from tidegate.dataplane.upstream import UpstreamConnection, UpstreamTimeout
from tidegate.dataplane.http1 import (
    BODY_BUFFER_LIMIT,
    IN_FLIGHT,
    REASONS,
    Exchange,
    Routed,
    finished,
    may_send_again,
    release_held,
    request_head,
    reset,
    response_headers,
    route_request,
    serve_exchange,
    served_by,
)
from tidegate.observe.metrics import METRICS

if TYPE_CHECKING:
    from tidegate import ir
    from tidegate.balancing.state import BackendState
    from tidegate.dataplane.server import Site
    from tidegate.dataplane.upstream import ResponseHead, UpstreamError
    from tidegate.router import Candidate

log = logging.getLogger("tidegate.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PENDING_LIMIT = 256 * 1024  # response bytes held for a stream before its endpoint is paused
# Response bytes held for all of a connection's streams before each of them pauses its endpoint: what a client
# that reads nothing (or opens every stream with a window of 0) can make tidegate hold.
CONNECTION_PENDING_LIMIT = 1024 * 1024
# Body bytes framed in one turn of the event loop for one connection; the rest goes in the next turns, so that
# a client with wide-open windows does not get its streams' whole buffers in one write.
TURN_BYTES = 512 * 1024
# Output queued for a client that does not read it is capped (h2limits.MAX_UNREAD_BYTES): with DATA framed only
# while the socket takes it, what piles up is answers to the client's own frames (PING, SETTINGS, HEADERS).
# "Rapid reset" (CVE-2023-44487): a client that opens streams and resets them at once has requests started
# that nobody waits for, with no limit from SETTINGS_MAX_CONCURRENT_STREAMS. Once EARLY_RESET_FLOOR streams of
# a connection were reset before their answer ended, and they are at least half of its requests, the
# connection is closed with GOAWAY ENHANCE_YOUR_CALM. A client that gives up on some requests is not.
EARLY_RESET_FLOOR = 100
# Connection-specific fields are forbidden in HTTP/2 (RFC 9113 8.2.2), and TE is a request field.
# Frames that carry no request and cost work (ControlFrameBudget); empty DATA frames are counted where they
# arrive. Window updates are not: a large download brings them by the thousand.
CONTROL_EVENTS: Final = (h2.events.PingReceived, h2.events.PingAckReceived, h2.events.RemoteSettingsChanged,
                         h2.events.PriorityUpdated)
_CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                                  "te"})


def _fields_to_send(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Response fields (or trailers) as HTTP/2 sends them: names in lower case, connection-specific ones left
    out, values without surrounding white space, bytes as Latin-1. h2's own normalisation is off."""
    out = []
    for name, value in headers:
        lname = name.lower()
        if lname not in _CONNECTION_SPECIFIC:
            out.append((lname.encode("latin-1"), value.strip(" \t").encode("latin-1")))
    return out


class H2Stream:
    """One request/response on an HTTP/2 connection, seen by serve_exchange as its client connection."""

    def __init__(self, conn: H2ServerConnection, stream_id: int, ex: Exchange):
        self.conn = conn
        self.site_getter = conn.site_getter
        self.stream_id = stream_id
        self.ex = ex
        self.scheme = conn.scheme
        self.listener_port = conn.listener_port
        self.peer = conn.peer
        self.server_name = conn.server_name
        # The endpoint side: an UpstreamConnection, or an upstream_h2.H2UpstreamStream for an h2c endpoint. Any:
        # this class is compiled, and compiled code checks a declared class on every assignment.
        self.upstream: Any = None
        self.pending = bytearray()
        self.ending = False
        self.closed = False
        # What serves it: the full path's task, or an H2FastExchange (done() and cancel() alike).
        self.task: Any = None
        self.last_status = 0
        self.paused = False  # request body: window updates held back while the endpoint is slow
        self.unacked = 0  # flow-controlled bytes received but not yet granted back
        self.queued = False  # in the connection's list of streams with body bytes or an end to send
        self.trailers: list[tuple[bytes, bytes]] = []  # sent after the body, ending the stream (gRPC's status)
        self.watch: Watch | None = None  # the pod's silence and the body's pace (deadlines.py)

    # -- what serve_exchange calls -------------------------------------------------------------------
    @property
    def write_paused(self) -> bool:
        held = len(self.pending)
        # The connection's total is added up only for a stream that holds a frame's worth: the usual small
        # answer, framed within its turn, costs no sum over the connection's streams.
        return held > PENDING_LIMIT or (held >= 16384 and self.conn.pending_bytes() > CONNECTION_PENDING_LIMIT)

    def pause_reading(self) -> None:
        """The endpoint is not keeping up: stop granting the client window for this stream's body."""
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.unacked and not self.closed:
            self.conn.acknowledge(self.stream_id, self.unacked)
            self.unacked = 0

    def send_continue(self) -> None:
        self.conn.send_headers(self.stream_id, [(b":status", b"100")], end_stream=False)

    def begin_response(self, ex: Exchange, status: int, headers: list[tuple[str, str]], content_length: int | None,
                       head_only: bool) -> bool:
        self.last_status = status
        out = [(b":status", str(status).encode()), *_fields_to_send(headers)]
        self.conn.send_headers(self.stream_id, out, end_stream=head_only)
        self.ending = head_only
        return True

    def body(self, data: bytes) -> None:
        if data:
            self.ex.bytes_sent += len(data)
            self.pending += data
            self.conn.queue(self)
            if self.write_paused and self.upstream is not None:
                self.upstream.pause_reading()
                if len(self.pending) <= PENDING_LIMIT and not self.conn.holding:
                    self.conn.hold_all()  # paused for the connection's total: so are the others, at once

    def begin_raw_response(self, status: int, header_lines: list[bytes], head_only: bool) -> None:
        """begin_response with the endpoint's header lines as they came (UpstreamConnection.lean_head has
        taken the hop-by-hop ones out, and llhttp has checked them): names lowered, nothing decoded."""
        self.last_status = status
        out = [(b":status", str(status).encode())]
        for line in header_lines:
            colon = line.find(b":")
            if colon > 0:
                out.append((line[:colon].lower(), line[colon + 1:].strip(b" \t")))
        self.conn.send_headers(self.stream_id, out, end_stream=head_only)
        self.ending = head_only

    def send_trailers(self, trailers: list[tuple[str, str]]) -> None:
        """Fields to send after the body, in a HEADERS frame that ends the stream (end_response follows)."""
        self.trailers = _fields_to_send(trailers)

    def end_response(self) -> None:
        if not self.ending:
            self.ending = True
            self.conn.queue(self)

    def send_simple(self, status: int, message: str, headers: list[tuple[str, str]] | None = None,
                    close: bool = False, head_only: bool = False) -> None:
        if is_grpc(self.ex):
            self._send_grpc_status(status, message, headers)
            return
        body = (message + "\n").encode() if message else b""
        out = [(n, v) for n, v in headers or []]
        if body:
            out.append(("content-type", "text/plain; charset=utf-8"))
        out.append(("content-length", str(len(body))))
        self.begin_response(self.ex, status, out, len(body), head_only or not body)
        if body and not head_only:
            self.body(body)
            self.end_response()


    def _send_grpc_status(self, status: int, message: str, headers: list[tuple[str, str]] | None) -> None:
        """What tidegate answers itself to a gRPC call, as gRPC clients read it: HTTP 200 and a gRPC status
        with its message, in one HEADERS frame (a Trailers-Only response), as Envoy-based gateways answer."""
        out = [(n, v) for n, v in headers or [] if n.lower() not in ("content-type", "content-length")]
        out += [("content-type", "application/grpc"), ("grpc-status", str(GRPC_STATUS.get(status, GRPC_UNKNOWN))),
                ("grpc-message", quote(message or REASONS.get(status, ""), safe=GRPC_MESSAGE_SAFE))]
        self.begin_response(self.ex, status, out, 0, True)
        self.last_status = status  # the access log and metrics keep the HTTP status tidegate meant


# gRPC status codes for the answers tidegate makes itself (gRPC's HTTP-to-gRPC mapping; a timeout of
# tidegate's, its only 504, is DEADLINE_EXCEEDED, and limits it enforces are RESOURCE_EXHAUSTED).
GRPC_UNKNOWN: Final = 2
GRPC_STATUS: Final = {400: 13, 401: 16, 403: 7, 404: 12, 413: 8, 429: 14, 431: 8, 500: 13, 502: 14, 503: 14,
                      504: 4}
# grpc-message is percent-encoded: printable ASCII but "%" stays as it is.
GRPC_MESSAGE_SAFE: Final = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def is_grpc(ex: Exchange) -> bool:
    return (get_header(ex.headers, "content-type") or "").startswith("application/grpc")


class H2ServerConnection(asyncio.Protocol):
    def __init__(self, site_getter: Callable[[], Site], listener_port: int, scheme: str, peer: str,
                 server_name: str = ""):
        self.site_getter = site_getter
        self.listener_port = listener_port
        self.scheme = scheme
        self.peer = peer
        self.server_name = server_name
        self.capped: Any = None  # the socket whose ClientPolicy counts this connection (released on close)
        self.transport: asyncio.Transport | None = None
        # Request header blocks are checked by h2request.read_request, in one pass, instead of by h2's chain of
        # generators; response header blocks are built ready to send by H2Stream.begin_response.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                                           normalize_inbound_headers=False, validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        site = site_getter()
        # The socket's ClientPolicy timeouts and HTTP/2 limits (or the defaults), as they were when it connected.
        self.deadlines: Deadlines = site.deadlines
        self.limits: H2Limits = site.h2
        self.h2 = ServerConnection(config, self.limits.max_concurrent_streams)
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.control_frames = ControlFrameBudget(self.limits)
        self.write_blocked = False  # the socket's buffer is full (pause_writing): DATA waits
        self.turn_bytes = 0  # body bytes framed in this turn (TURN_BYTES)
        self.held: set[H2Stream] = set()  # streams whose endpoint is paused for the connection's total alone
        self.holding = False  # every stream's endpoint is paused until the connection's bytes are sent
        self.write_blocked_at = 0.0
        self.idle_since = 0.0  # when the connection was last seen with no stream (0: it has some)
        self.deadline_check: asyncio.TimerHandle | None = None
        # Frames are written once per turn of the event loop, not once per call: a stream's head, body and
        # end, and the responses of all streams that finish in the same turn, leave in one write.
        self.queued: list[H2Stream] = []  # streams with body bytes or an end not yet framed
        self.write_scheduled = False
        self.receiving = False  # inside data_received, which writes once at its end
        self.requests = 0
        self.early_resets = 0  # streams the client reset before their answer ended
        # What serves a stream's exchange. An attribute, so that tests can stand in for it: this module is
        # compiled, and compiled code calls a function of another module directly, not through its name.
        self.serve: Callable[[Any, Exchange], Awaitable[object]] = serve_exchange

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self._write_now()
        self._arm_deadlines()

    def _arm_deadlines(self) -> None:
        self.deadline_check = asyncio.get_running_loop().call_later(self.deadlines.check_interval,
                                                                    self._check_deadlines)

    def _check_deadlines(self) -> None:
        """An idle connection (no stream: a bare h2c preface too) is closed after deadlines.idle, a client that
        reads nothing is cut off after deadlines.send, and a pod silent for deadlines.upstream_read while its
        answer is awaited gets its stream a 504 (deadlines.py)."""
        transport = self.transport
        if self.closed or transport is None:
            return
        now = time.monotonic()
        limits = self.deadlines
        if self.write_blocked and now - self.write_blocked_at >= limits.send:
            METRICS.limits.labels("send-timeout").inc()
            log.info("closing the HTTP/2 connection from %s: it read nothing for %g s", self.peer, limits.send)
            self.closed = True
            reset(transport)
            return
        if not self.streams:
            if not self.idle_since:
                self.idle_since = now
            elif now - self.idle_since >= limits.idle:
                try:
                    self.h2.close_connection()
                except h2.exceptions.ProtocolError:
                    pass
                self._write_now()
                self.closed = True
                transport.close()
                return
        else:
            self.idle_since = 0.0
            for stream in list(self.streams.values()):
                watch = stream.watch
                if watch is None:
                    watch = stream.watch = Watch()
                if not stream.ex.body_done:
                    if watch.body_too_slow(stream.ex.bytes_received, stream.paused, now, limits):
                        self._cut_off_slow_body(stream)
                    continue
                upstream = stream.upstream
                if upstream is not None and type(upstream) is UpstreamConnection and \
                        watch.pod_silent(upstream, now, upstream.read_timeout or limits.upstream_read):
                    METRICS.limits.labels("upstream-read-timeout").inc()
                    upstream.time_out(upstream.read_timeout or limits.upstream_read)
        self._arm_deadlines()

    def connection_lost(self, exc: Exception | None) -> None:
        METRICS.connections.open -= 1
        self.closed = True
        if self.capped is not None:
            guard.CONNECTIONS.release(self.capped, self.peer)
            self.capped = None
        if self.deadline_check is not None:
            self.deadline_check.cancel()
        for stream in self.streams.values():
            stream.closed = True
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()

    def _cut_off_slow_body(self, stream: H2Stream) -> None:
        """A request body slower than the minimum pace (its window was open: tidegate did not hold it back):
        408, or a reset when the answer has begun."""
        METRICS.limits.labels("request-body-rate").inc()
        if stream.task is not None:
            stream.task.cancel()
        if stream.last_status:
            self.reset(stream)
        else:
            stream.send_simple(408, slow_body_message(self.deadlines))

    def pause_writing(self) -> None:
        self.write_blocked = True
        self.write_blocked_at = time.monotonic()

    def resume_writing(self) -> None:
        self.write_blocked = False
        for stream in self.streams.values():
            if stream.pending or stream.ending:
                self.queue(stream)

    def hold_all(self) -> None:
        """The connection holds CONNECTION_PENDING_LIMIT for its client: every stream's endpoint pauses now,
        before each sends one more read's worth, and all resume once the bytes held are sent (_write_now)."""
        self.holding = True
        for stream in self.streams.values():
            if stream.upstream is not None:
                stream.upstream.pause_reading()
                self.held.add(stream)

    def pending_bytes(self) -> int:
        return sum(len(stream.pending) for stream in self.streams.values())

    def data_received(self, data: bytes) -> None:
        self.receiving = True
        try:
            self._receive(data)
        finally:
            self.receiving = False
        self._write_now()

    def _receive(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("HTTP/2 protocol error from %s: %s", self.peer, exc)
            self._write_now()
            if self.transport is not None:
                self.transport.close()
            return
        control = 0
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                if event.stream_id in self.h2.refused:
                    self._refuse(event.stream_id)
                else:
                    self._on_request(event.stream_id, event.headers, event.stream_ended is not None)
            elif isinstance(event, h2.events.DataReceived):
                if not event.data and event.stream_ended is None:
                    control += 1  # an empty DATA frame carries nothing but work
                self._on_data(event.stream_id, event.data, event.flow_controlled_length)
                if event.stream_ended is not None:
                    self._on_end(event.stream_id)
            elif isinstance(event, CONTROL_EVENTS):
                control += 1
            elif isinstance(event, h2.events.StreamEnded):
                self._on_end(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    if stream.task is not None:
                        stream.task.cancel()
                    self.early_resets += 1
                    if self.early_resets >= EARLY_RESET_FLOOR and 2 * self.early_resets >= self.requests:
                        self._calm_down()
                        return
            elif isinstance(event, h2.events.WindowUpdated):
                targets = list(self.streams.values()) if event.stream_id == 0 else \
                    [s for s in [self.streams.get(event.stream_id)] if s is not None]
                for stream in targets:
                    self.flush_stream(stream)
            elif isinstance(event, h2.events.ConnectionTerminated):
                if self.transport is not None:
                    self.transport.close()
        if control and not self.control_frames.spend(control):
            METRICS.limits.labels("http2-control-frames").inc()
            self._calm_down(f"sent over {self.limits.control_frame_burst} control frames (PING, SETTINGS, PRIORITY, "
                            f"empty DATA) at over {self.limits.control_frames_per_second:g} a second")

    # -- requests ---------------------------------------------------------------------------------------
    def _refuse(self, stream_id: int) -> None:
        """A stream over SETTINGS_MAX_CONCURRENT_STREAMS: refused alone, and the client may send it again."""
        self.h2.refused.discard(stream_id)
        METRICS.limits.labels("http2-concurrent-streams").inc()
        try:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        except h2.exceptions.ProtocolError:
            pass

    def _calm_down(self, why: str = "") -> None:
        if not why:
            why = f"reset {self.early_resets} of its {self.requests} requests before their answers (rapid reset)"
        log.warning("HTTP/2 client %s %s: closing the connection", self.peer, why)
        try:
            self.h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        except h2.exceptions.ProtocolError:
            pass
        self._write_now()
        if self.transport is not None:
            self.transport.close()  # after what is written: the GOAWAY goes first
        self.closed = True  # nothing more is written; streams under way end with the connection

    def _on_request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.requests += 1
        ex = Exchange()
        malformed = read_request(ex, headers, ended)
        if malformed:
            log.info("malformed HTTP/2 request from %s on stream %d: %s", self.peer, stream_id, malformed)
            try:
                self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            return
        stream = H2Stream(self, stream_id, ex)
        self.streams[stream_id] = stream
        if ended and ex.method != "HEAD" and self.serve is serve_exchange:  # tests stand in for serve_exchange
            try:
                serve_fast(stream)
            except Exception:  # a bug of tidegate's own: this stream fails, the connection's others go on
                log.exception("internal error serving an HTTP/2 stream")
                self.reset(stream)
        else:
            self.serve_slowly(stream)

    def serve_slowly(self, stream: H2Stream, routed: Routed | None = None) -> None:
        """The full path, as a task: what the fast lane does not take (`routed`: what it found already)."""
        stream.task = asyncio.get_running_loop().create_task(self._serve(stream, routed))

    async def _serve(self, stream: H2Stream, routed: Routed | None = None) -> None:
        IN_FLIGHT.count += 1
        try:
            if routed is None:
                await self.serve(stream, stream.ex)
            else:
                await serve_exchange(stream, stream.ex, routed)
            finished(stream, stream.ex, stream.last_status)
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("internal error serving an HTTP/2 stream")
            self.reset(stream)
        finally:
            IN_FLIGHT.count -= 1
            if stream.ex.held:  # a stream ended without finished(): its client's in-flight count goes back
                release_held(stream.ex)

    def reset(self, stream: H2Stream) -> None:
        """End a stream with RST_STREAM INTERNAL_ERROR: an answer tidegate began cannot be finished."""
        if stream.closed or self.streams.pop(stream.stream_id, None) is None:
            return
        try:
            self.h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def _on_data(self, stream_id: int, data: bytes, flow_length: int) -> None:
        """Request body bytes. The client's window is granted back only once they are on their way to the
        endpoint: while the endpoint's socket is full (or nothing is connected yet and a buffer's worth is
        held), the window stays closed and the client waits: HTTP/2's own backpressure."""
        stream = self.streams.get(stream_id)
        if stream is None:
            self.acknowledge(stream_id, flow_length)
            return
        ex = stream.ex
        sent = ex.receive(data)
        if stream.paused or (not sent and ex.buffered > BODY_BUFFER_LIMIT):
            stream.unacked += flow_length
        else:
            self.acknowledge(stream_id, flow_length)
        if ex.body_limit >= 0 and ex.bytes_received > ex.body_limit:
            self._too_large(stream)

    def _too_large(self, stream: H2Stream) -> None:
        """A body past its TrafficPolicy's maxBodySize: what serves it stops (the pod's request is cut), and
        the client gets 413 when no answer has begun, else a reset stream."""
        ex = stream.ex
        ex.policy = "requestLimits.maxBodySize"
        METRICS.traffic_policy.labels(ex.route, ex.policy, "too-large").inc()
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()
        if stream.last_status == 0 and not stream.closed:
            stream.send_simple(413, f"request body larger than {ex.body_limit} bytes")
            finished(stream, ex, 413)
        else:
            self.reset(stream)
        ex.body_limit = -1  # said once

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        try:
            self.h2.acknowledge_received_data(flow_length, stream_id)
        except h2.exceptions.ProtocolError:
            return  # the stream is gone; nothing to grant
        self._flush()

    def _on_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.ex.body_done:
            return
        stream.ex.body_done = True
        if stream.ex.sink is not None:
            stream.ex.sink(None)

    # -- responses --------------------------------------------------------------------------------------
    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        if self.closed or stream_id not in self.streams:
            return
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            log.debug("cannot send headers on stream %d: %s", stream_id, exc)
        if end_stream:
            self.streams.pop(stream_id, None)
        self._flush()

    def queue(self, stream: H2Stream) -> None:
        """The stream has body bytes or its end to send: framed with the others at this turn's write."""
        if not stream.queued:
            stream.queued = True
            self.queued.append(stream)
        self._flush()

    def flush_stream(self, stream: H2Stream) -> None:
        """Frame as much of the stream's pending body as the flow-control windows allow (and the socket takes,
        TURN_BYTES a turn at most); once the response has ended, the last frame carries END_STREAM: the last
        DATA frame, or the trailers after it."""
        if self.closed or stream.stream_id not in self.streams:
            return
        try:
            while stream.pending:
                if self.write_blocked:
                    break  # resume_writing queues it again
                if self.turn_bytes >= TURN_BYTES:
                    self.queue(stream)  # the next turn's write
                    break
                window = min(self.h2.local_flow_control_window(stream.stream_id),
                             self.h2.max_outbound_frame_size)
                if window <= 0:
                    break
                if window >= len(stream.pending):
                    chunk = bytes(stream.pending)
                    stream.pending.clear()
                else:
                    chunk = bytes(stream.pending[:window])
                    del stream.pending[:window]
                self.turn_bytes += len(chunk)
                last = stream.ending and not stream.pending and not stream.trailers
                self.h2.send_data(stream.stream_id, chunk, end_stream=last)
                if last:
                    self.streams.pop(stream.stream_id, None)
                    return
            if stream.ending and not stream.pending:
                if stream.trailers:
                    self.h2.send_headers(stream.stream_id, stream.trailers, end_stream=True)
                else:
                    self.h2.end_stream(stream.stream_id)
                self.streams.pop(stream.stream_id, None)
        except h2.exceptions.ProtocolError as exc:
            log.debug("cannot send data on stream %d: %s", stream.stream_id, exc)
        finally:
            self._flush()
            if stream.upstream is not None:
                if not stream.write_paused:
                    stream.upstream.resume_reading()
                elif len(stream.pending) <= PENDING_LIMIT:
                    self.held.add(stream)  # paused for the others' bytes: resumed when they are sent

    def _flush(self) -> None:
        """Write what h2 has framed at the end of this turn of the event loop (at once inside data_received,
        which writes when it returns)."""
        if self.receiving or self.write_scheduled or self.closed:
            return
        self.write_scheduled = True
        asyncio.get_running_loop().call_soon(self._write_now)

    def _write_now(self) -> None:
        self.write_scheduled = True  # what flush_stream frames now leaves in this write
        self.turn_bytes = 0
        queued = self.queued
        if queued:
            self.queued = []
            for stream in queued:
                stream.queued = False
                self.flush_stream(stream)
        self.write_scheduled = False
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not self.closed:
            transport.write(data)
            if transport.get_write_buffer_size() > self.limits.max_unread_bytes:
                METRICS.limits.labels("http2-unread-output").inc()
                self._calm_down(f"does not read what it asks for ({self.limits.max_unread_bytes} bytes queued)")
                reset(transport)
                return
        if self.queued and not self.write_blocked and not self.closed:
            self._flush()  # streams over this turn's TURN_BYTES: the next turn
        if self.held and self.pending_bytes() <= CONNECTION_PENDING_LIMIT:
            self.holding = False
            held, self.held = self.held, set()
            for stream in held:
                if stream.upstream is not None and not stream.closed:
                    stream.upstream.resume_reading()


# -- the fast lane --------------------------------------------------------------------------------------------

NO_MODS: Final[list[dict]] = []  # response header changes: none on the fast lane


def serve_fast(stream: H2Stream) -> None:
    """A request without a body: on the fast lane when its rule and endpoint allow, else the full way (which
    is handed what was found here, so a request is routed and balanced once). As fastlane.serve for HTTP/1.1."""
    conn, ex = stream.conn, stream.ex
    routed = route_request(stream, ex, conn.site_getter())
    if routed is True or routed is False:  # answered here (404, 421, a bad target)
        finished(stream, ex, stream.last_status)
        return
    site: Site
    candidate: Candidate
    headers_lower: dict[str, str]
    site, candidate, host, path, query, headers_lower, _ = routed
    if not fastlane.is_plain(candidate) or ex.deferred is not None:  # (Global rate limits: awaited there)
        conn.serve_slowly(stream, routed)
        return
    balancer = site.balancer
    backend = balancer.backend_for(candidate.route)
    if backend is None:
        conn.serve_slowly(stream, routed)  # it answers
        return
    now = time.monotonic()
    key = fastlane.hash_key_of(backend, path, headers_lower, ex.client or stream.peer)
    endpoint = balancer.endpoint_for(backend, key, (), now)
    if endpoint is None:
        conn.serve_slowly(stream, routed)  # it answers 503
        return
    slot = fastlane.slot_for(site, endpoint)
    upstream = slot.pool.take_idle(now)
    if upstream is None:  # a connection has to be opened: the full way does that, with its retry on refusal
        conn.serve_slowly(stream, (site, candidate, host, path, query, headers_lower, (backend, endpoint)))
        return
    H2FastExchange(stream, routed, backend, slot, balancer.registry.backend(backend.name), upstream
                   ).start(host, path, query, now)


class H2FastExchange:
    """One HTTP/2 stream on the fast lane. It stands in the stream's `task` slot: `done()` and `cancel()`
    (the client reset the stream, or the connection went away) are what the connection asks of it."""

    __slots__ = ("backend", "backend_state", "over", "routed", "slot", "started", "status", "stream", "upstream")

    def __init__(self, stream: H2Stream, routed: Routed, backend: ir.Backend, slot: fastlane.EndpointSlot,
                 backend_state: BackendState, upstream: UpstreamConnection):
        self.stream = stream
        self.routed = routed
        self.backend = backend
        self.slot = slot
        self.backend_state = backend_state
        self.upstream = upstream
        self.over = False
        self.status = 0  # the endpoint's, once its head came (and went on to the client)
        self.started = 0.0

    def start(self, host: str, path: str, query: str, now: float) -> None:
        stream = self.stream
        ex = stream.ex
        IN_FLIGHT.count += 1
        served_by(ex, self.routed[1])
        ex.endpoint = self.slot.name
        self.slot.state.active += 1
        self.backend_state.active += 1
        head = request_head(ex, ex.headers, host, f"{path}?{query}" if query else path, stream.peer, stream.scheme,
                            ex.lower.get("host") or host)
        stream.task = self
        stream.upstream = self.upstream
        self.started = now
        self.upstream.start_fast(self, head, stream.body)

    # -- what the connection asks of its stream's `task` -------------------------------------------------
    def done(self) -> bool:
        return self.over

    def cancel(self) -> None:
        """The client reset the stream or left: the endpoint's answer is of no use, and its connection
        cannot be reused (the rest of the answer would come first on it)."""
        if self.over:
            return
        self._drop_upstream()
        self._end(None, endpoint_outcome=False)

    # -- the endpoint's answer (UpstreamConnection calls these) ------------------------------------------
    def upstream_head(self, head: ResponseHead) -> None:
        self.status = head.status
        stream = self.stream
        try:
            stream.begin_response(stream.ex, head.status, response_headers(head, NO_MODS), head.content_length,
                                  head.status in (204, 304))
        except Exception:  # never let a bug take the endpoint connection's reader down
            log.exception("internal error writing an HTTP/2 response head")
            self.upstream_failed(None)

    def upstream_raw_head(self, status: int, header_lines: list[bytes], content_length: int | None) -> None:
        self.status = status
        try:
            self.stream.begin_raw_response(status, header_lines, status in (204, 304))
        except Exception:
            log.exception("internal error writing an HTTP/2 response head")
            self.upstream_failed(None)

    def upstream_read(self) -> None:
        """The end of one read from the endpoint: the stream's frames go out at this turn's write anyway."""

    def upstream_done(self) -> None:
        stream, upstream = self.stream, self.upstream
        stream.end_response()
        stream.upstream = None
        fastlane.put_back(upstream, self._end(self.status))

    def upstream_failed(self, error: UpstreamError | None) -> None:
        """The endpoint closed or reset the connection, or sent something that is not HTTP (`error`; None for
        a bug of tidegate's own)."""
        if self.over:
            return
        stream = self.stream
        ex = stream.ex
        self._drop_upstream()
        METRICS.upstream_errors.labels(self.backend.name, "error").inc()
        if error is not None and may_send_again(ex, error):
            # A kept connection the endpoint closed unanswered just as it was reused: the full way sends the
            # request once more.
            self._end(None, endpoint_outcome=False, account=False)
            ex.retries += 1
            stream.conn.serve_slowly(stream, self.routed)
            return
        if not self.status:
            # The endpoint's silence past the deadline (UpstreamTimeout) is a 504, as a timeout of the full way.
            stream.send_simple(504 if isinstance(error, UpstreamTimeout) else 502, str(error) if error else
                               "internal error")
        else:  # the head went out already: the stream cannot end well
            stream.conn.reset(stream)
        self._end(None)

    # -- helpers -----------------------------------------------------------------------------------------
    def _drop_upstream(self) -> None:
        upstream = self.upstream
        upstream.handler = None
        upstream.close()
        self.stream.upstream = None

    def _end(self, status: int | None, endpoint_outcome: bool = True, account: bool = True) -> float:
        """Count the exchange out, as fastlane.FastExchange._end does. Returns the time it read."""
        self.over = True
        ex = self.stream.ex
        now = fastlane.count_out(ex, self.routed, self.backend, self.backend_state, self.slot, self.started, status,
                                 endpoint_outcome)
        if account:
            finished(self.stream, ex, self.stream.last_status, now)
        return now


__all__ = ["PREFACE", "REASONS", "H2ServerConnection"]
