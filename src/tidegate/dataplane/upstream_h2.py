"""HTTP/2 to endpoints (h2c with prior knowledge), for Service ports with appProtocol kubernetes.io/h2c.

One connection per endpoint carries many streams; a new one is opened when it closes or runs out of stream
ids or concurrency. Streams present the same surface as `UpstreamConnection` to the proxy: a head future, a
done future and a body sink; and what only HTTP/2 has, which gRPC lives on: trailers, and a response that
ends with its head (gRPC's "Trailers-Only").
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from tidegate.dataplane.upstream import ResponseHead, UpstreamError, connect


class H2UpstreamStream:
    def __init__(self, conn: H2UpstreamConnection, stream_id: int):
        loop = asyncio.get_running_loop()
        self.conn = conn
        self.stream_id = stream_id
        self.head_future: asyncio.Future[ResponseHead] = loop.create_future()
        self.done_future: asyncio.Future[None] = loop.create_future()
        self.sink: Callable[[bytes], None] | None = None
        self.received: list[bytes] = []
        self.outbound = bytearray()
        self.outbound_end = False
        self.trailers: list[tuple[str, str]] = []  # the fields of a HEADERS frame after the body
        self.ended_with_head = False  # the response's HEADERS frame ended the stream: no body, no trailers

    def set_sink(self, sink: Callable[[bytes], None]) -> None:
        self.sink = sink
        for chunk in self.received:
            sink(chunk)
        self.received.clear()

    def send(self, data: bytes | None) -> None:
        """Request body bytes; None ends the request."""
        if data is None:
            self.outbound_end = True
        else:
            self.outbound += data
        self.conn.flush_stream(self)

    def pause_reading(self) -> None:
        self.conn.pause_reading()

    def resume_reading(self) -> None:
        self.conn.resume_reading()

    def cancel(self) -> None:
        """The exchange ended early (the client reset its stream or went away, a timeout struck): reset the
        stream at the endpoint with CANCEL, so that the pod stops working on it. Nothing when it has ended."""
        self.conn.reset_stream(self)

    def fail(self, error: Exception) -> None:
        for future in (self.head_future, self.done_future):
            if not future.done():
                future.set_exception(error)
                future.exception()  # mark retrieved: the other future carries it to the proxy


class H2UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: H2EndpointPool):
        self.pool = pool
        # Field bytes are read and written as Latin-1, as in HTTP/1.1 and at the edge (http2.py): whatever
        # bytes the client or the pod sent pass through unchanged.
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2UpstreamStream] = {}
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for stream in self.streams.values():
            stream.fail(UpstreamError("endpoint closed the HTTP/2 connection"))
        self.streams.clear()
        self.pool.forget(self)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            for stream in self.streams.values():
                stream.fail(UpstreamError(f"HTTP/2 protocol error from endpoint: {exc}"))
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived) and stream is not None:
                head = ResponseHead()
                for raw_name, raw_value in event.headers:
                    name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
                    if name == ":status":
                        head.status = int(value)
                    elif not name.startswith(":"):
                        head.headers.append((name, value))
                        head.lnames.append(name)  # HTTP/2 names are lower case already
                        if name == "content-length" and value.isdigit():
                            head.content_length = int(value)
                if head.status >= 200 and not stream.head_future.done():
                    stream.ended_with_head = event.stream_ended is not None
                    stream.head_future.set_result(head)
            elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
                stream.trailers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers
                                   if not name.startswith(b":")]
            elif isinstance(event, h2.events.DataReceived) and stream is not None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if stream.sink is not None:
                    stream.sink(event.data)
                else:
                    stream.received.append(event.data)
            elif isinstance(event, h2.events.StreamEnded) and stream is not None:
                if not stream.done_future.done():
                    stream.done_future.set_result(None)
                self.streams.pop(event.stream_id, None)
            elif isinstance(event, h2.events.StreamReset) and stream is not None:
                stream.fail(UpstreamError(f"endpoint reset the stream ({event.error_code!r})"))
                self.streams.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                for waiting in list(self.streams.values()):
                    self.flush_stream(waiting)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True
                if self.transport is not None:
                    self.transport.close()
        self._flush()

    def open_stream(self, headers: list[tuple[str, str]], end_stream: bool) -> H2UpstreamStream:
        stream_id = self.h2.get_next_available_stream_id()
        stream = H2UpstreamStream(self, stream_id)
        self.streams[stream_id] = stream
        fields = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        self.h2.send_headers(stream_id, fields, end_stream=end_stream)
        self._flush()
        return stream

    def flush_stream(self, stream: H2UpstreamStream) -> None:
        if self.closed or stream.stream_id not in self.streams:
            return
        try:
            while stream.outbound:
                window = min(self.h2.local_flow_control_window(stream.stream_id), self.h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = bytes(stream.outbound[:window])
                del stream.outbound[:window]
                self.h2.send_data(stream.stream_id, chunk)
            if stream.outbound_end and not stream.outbound:
                stream.outbound_end = False
                self.h2.end_stream(stream.stream_id)
        except h2.exceptions.ProtocolError as exc:
            stream.fail(UpstreamError(f"cannot send to endpoint: {exc}"))
        self._flush()

    def reset_stream(self, stream: H2UpstreamStream) -> None:
        if self.closed or self.streams.pop(stream.stream_id, None) is None:
            return
        try:
            self.h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:  # it closed in the meantime
            return
        self._flush()

    def has_capacity(self) -> bool:
        if self.closed or self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams:
            return False
        return (self.h2.highest_outbound_stream_id or 0) < 2**30

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)


class H2EndpointPool:
    """One HTTP/2 connection to an endpoint: in clear (h2c), or over TLS (`tls`, negotiating h2 by ALPN: a
    BackendTLSPolicy, or an Ingress's backend-protocol GRPCS)."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None, server_hostname: str = ""):
        self.host = host
        self.port = port
        self.tls = tls
        self.server_hostname = server_hostname
        self.conn: H2UpstreamConnection | None = None
        self._connecting: asyncio.Future | None = None

    async def acquire(self, connect_timeout: float) -> H2UpstreamConnection:
        if self.conn is not None and not self.conn.closed and self.conn.has_capacity():
            return self.conn
        extra = {"ssl": self.tls, "server_hostname": self.server_hostname or None} if self.tls is not None else {}
        transport, protocol = await connect(lambda: H2UpstreamConnection(self), self.host, self.port,
                                            connect_timeout, **extra)
        if self.tls is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                transport.close()
                raise UpstreamError(f"TLS to {self.host}:{self.port}: the endpoint did not agree to HTTP/2 (ALPN h2)")
        self.conn = protocol
        return protocol

    def forget(self, conn: H2UpstreamConnection) -> None:
        if self.conn is conn:
            self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
