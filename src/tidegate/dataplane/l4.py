"""TCP, UDP and TLS listeners: TCPRoute, UDPRoute and TLSRoute relay bytes to pod endpoints.

- A TCP listener serves its oldest attached TCPRoute (the one the Gateway API attaches when several ask).
- A TLS listener in Terminate mode completes the handshake with the listener's certificate (chosen by SNI,
  as for HTTPS), picks the TLSRoute by the server name the same way as below, and relays the decrypted
  bytes to the pod in clear.
- A TLS listener in Passthrough mode reads the client's ClientHello, picks the TLSRoute whose hostname
  matches the SNI (exact, then the longest wildcard, then a route with no hostname), and relays the
  encrypted bytes untouched: the pod holds the certificate.
- A UDP listener keeps a session per client address. Each session has its own socket connected to one
  endpoint, so the replies find their way back, and it closes when it has been idle.

Endpoints are chosen as for HTTP: the route's backends by weight, then the backend's algorithm, with health
checks, outlier ejection and `SourceIP` hashing. A connect failure is tried on another endpoint. Connections
in flight keep the configuration they started with; a reload swaps the table a new connection reads.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tidegate import ir
from tidegate.balancing.balancer import RouteBalancer
from tidegate.balancing.outlier import record_outcome
from tidegate.dataplane.deadlines import DEADLINES
from tidegate.dataplane.proxied import ProxiedServer, listening_socket, proxy_peers
from tidegate.dataplane.proxy_protocol import header as proxy_header
from tidegate.dataplane.tls import TLSSite, server_context, take_server_name
from tidegate.dataplane.upstream import ConnectError, UpstreamError, connect
from tidegate.observe import accesslog
from tidegate.observe.metrics import (
    L4_BYTES_IN,
    L4_BYTES_OUT,
    L4_DATAGRAMS_IN,
    L4_DATAGRAMS_OUT,
    L4_OPEN,
    L4_OPENED,
    METRICS,
)

log = logging.getLogger("tidegate.l4")

CONNECT_TIMEOUT = 5.0  # without a policy's timeouts.connect
CONNECT_ATTEMPTS = 3  # endpoints tried before the client's connection is closed
TCP_IDLE_TIMEOUT = 3600.0  # without a policy's timeouts.idle: no byte either way for this long closes both
UDP_IDLE_TIMEOUT = 60.0  # likewise for a UDP session
HELLO_TIMEOUT = 10.0  # for a TLS passthrough client to send its ClientHello
HELLO_LIMIT = 64 * 1024  # ClientHello bytes read before giving up on finding the SNI
BUFFER_LIMIT = 256 * 1024  # bytes held for a side that cannot take them yet, before reading pauses
UDP_SESSIONS_MAX = 10_000  # per listener; datagrams from further clients are dropped
UDP_QUEUE_MAX = 64  # datagrams held for a session while its socket opens
SWEEP_INTERVAL = 1.0  # how often idle TCP connections and UDP sessions are looked for


# -- TLS ClientHello --------------------------------------------------------------------------------------

class NotTLS(ValueError):
    """The first bytes are not a TLS ClientHello (or a malformed one)."""


def client_hello_server_name(data: bytes) -> tuple[bool, str]:
    """(complete, server name) from the first bytes a TLS client sends. `complete` is False while more bytes
    are needed; the name is "" when the ClientHello has none. Raises NotTLS when the bytes are not a TLS
    handshake that starts with a ClientHello. The ClientHello may span several records."""
    hello = _client_hello(data)
    return (True, _server_name(hello)) if hello is not None else (False, "")


def client_hello_offer(data: bytes) -> tuple[bool, str, tuple[str, ...]]:
    """(complete, server name, the ALPN protocols offered) from the first bytes a TLS client sends, as
    client_hello_server_name reads them (an ACME TLS-ALPN-01 validation offers acme-tls/1 alone)."""
    hello = _client_hello(data)
    return (True, _server_name(hello), _alpn(hello)) if hello is not None else (False, "", ())


def _client_hello(data: bytes) -> bytes | None:
    """The body of the ClientHello the bytes start with (None: more bytes are needed)."""
    handshake = bytearray()
    offset = 0
    while offset + 5 <= len(data):
        if data[offset] != 22:
            raise NotTLS("not a TLS handshake record")
        if data[offset + 1] != 3:
            raise NotTLS("not a TLS record version")
        length = int.from_bytes(data[offset + 3:offset + 5], "big")
        if length == 0 or length > 16384:
            raise NotTLS("a TLS record of a length TLS does not allow")
        if offset + 5 + length > len(data):
            break
        handshake += data[offset + 5:offset + 5 + length]
        offset += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise NotTLS("the first handshake message is not a ClientHello")
            body_length = int.from_bytes(handshake[1:4], "big")
            if len(handshake) >= 4 + body_length:
                return bytes(handshake[4:4 + body_length])
    if offset == 0 and data[:1] not in (b"", b"\x16"):
        raise NotTLS("not a TLS handshake record")
    return None


def _extensions(hello: bytes) -> _Reader | None:
    """A ClientHello body's extensions (None: it has none)."""
    reader = _Reader(hello)
    reader.take(2 + 32)  # legacy version, random
    reader.take(reader.number(1))  # session id
    reader.take(reader.number(2))  # cipher suites
    reader.take(reader.number(1))  # compression methods
    if reader.left() == 0:
        return None
    return _Reader(reader.take(reader.number(2)))


def _alpn(hello: bytes) -> tuple[str, ...]:
    """The protocols of a ClientHello body's application_layer_protocol_negotiation extension (RFC 7301)."""
    extensions = _extensions(hello)
    while extensions is not None and extensions.left():
        kind, body = extensions.number(2), extensions.take(extensions.number(2))
        if kind == 16:
            protocols = _Reader(body)
            protocols = _Reader(protocols.take(protocols.number(2)))
            offered = []
            while protocols.left():
                offered.append(protocols.take(protocols.number(1)).decode("latin-1"))
            return tuple(offered)
    return ()


def _server_name(hello: bytes) -> str:
    """The host_name of a ClientHello body's server_name extension (RFC 6066), or ""."""
    extensions = _extensions(hello)
    if extensions is None:
        return ""
    while extensions.left():
        kind, body = extensions.number(2), extensions.take(extensions.number(2))
        if kind != 0:
            continue
        names = _Reader(body)
        names = _Reader(names.take(names.number(2)))
        while names.left():
            name_type, name = names.number(1), names.take(names.number(2))
            if name_type == 0:
                try:
                    return name.decode("ascii").lower().rstrip(".")
                except UnicodeDecodeError as exc:
                    raise NotTLS("a server name that is not ASCII") from exc
    return ""


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, count: int) -> bytes:
        if count > self.left():
            raise NotTLS("a ClientHello cut short")
        self.at += count
        return self.data[self.at - count:self.at]

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")


# -- routes of a listening socket -------------------------------------------------------------------------

class L4Table:
    """The routes of the listeners on one socket, ready to choose from."""

    def __init__(self, routes: list[ir.L4Route]):
        ordered = sorted(routes, key=lambda r: (r.created or "~", r.name))  # oldest first; undated last
        self.first = ordered[0] if ordered else None
        self._exact: dict[str, ir.L4Route] = {}
        self._wildcards: dict[str, ir.L4Route] = {}  # ".example.com" for "*.example.com"
        self._any: ir.L4Route | None = None
        for route in ordered:
            if not route.hostnames and self._any is None:
                self._any = route
            for name in route.hostnames:
                if name.startswith("*."):
                    self._wildcards.setdefault(name[1:], route)
                else:
                    self._exact.setdefault(name, route)

    def for_server_name(self, name: str) -> ir.L4Route | None:
        """Exact hostname, then the longest wildcard that covers it, then a route for any name."""
        if name:
            found = self._exact.get(name)
            if found is not None:
                return found
            dot = name.find(".")
            while dot != -1:
                found = self._wildcards.get(name[dot:])
                if found is not None:
                    return found
                dot = name.find(".", dot + 1)
        return self._any


@dataclass
class L4Site:
    kind: str  # tcp | tls (passthrough) | terminate (TLS) | udp
    table: L4Table
    balancer: RouteBalancer
    listener: str = ""  # the socket's first listener: what refusals are counted under
    listener_of: dict[int, str] = field(default_factory=dict)  # id(route) → its listener's name
    # ClientPolicy proxyProtocol: peers whose connections start with a PROXY header (proxied.py reads it)
    proxy_from: Any = None  # guard.AddressSet

    def counts(self, route: ir.L4Route) -> list[int]:
        """The metrics of connections or sessions of `route` on this socket."""
        return METRICS.l4.route(self.listener_of.get(id(route), self.listener), route.name, _PROTOCOLS[self.kind])

    def refuse(self, reason: str) -> None:
        METRICS.l4.refuse(self.listener, reason)


_PROTOCOLS = {"tcp": "tcp", "tls": "tls-passthrough", "terminate": "tls", "udp": "udp"}


def _hash_key(backend: ir.Backend, client: str) -> str | None:
    policy = backend.policy
    return client if policy is not None and policy.hash is not None and policy.hash.type == "SourceIP" else None


def _pick(site: L4Site, route: ir.L4Route, client: str, tried: tuple[ir.Endpoint, ...]
          ) -> tuple[ir.Backend, ir.Endpoint] | None:
    backend = site.balancer.backend_for(route)
    if backend is None or backend.invalid:
        return None
    endpoint = site.balancer.endpoint_for(backend, _hash_key(backend, client), exclude=tried)
    if endpoint is None or endpoint in tried:
        return None
    return backend, endpoint


def _over_connection_limit(site: L4Site, backend: ir.Backend) -> bool:
    breaker = backend.policy.circuit_breaker if backend.policy is not None else None
    if breaker is None or breaker.max_connections is None:
        return False
    return site.balancer.registry.backend(backend.name).active >= breaker.max_connections


# -- TCP and TLS passthrough ------------------------------------------------------------------------------

class _Side(asyncio.Protocol):
    """One socket of a relayed pair: what it reads goes to the other one; when the other cannot take more,
    this one stops reading."""

    def __init__(self, relay: TCPRelay):
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.eof = False  # the peer will send no more

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.relay.last_active = time.monotonic()
        if self.other is not None:
            self.other.write(data)
            relay = self.relay
            if self is relay.client:
                relay.bytes_in += len(data)
            else:
                relay.bytes_out += len(data)
            if relay.counts is not None:
                relay.counts[L4_BYTES_IN if self is relay.client else L4_BYTES_OUT] += len(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is not None and other.transport is not None and other.transport.can_write_eof():
            other.transport.write_eof()
        if other is None or other.eof:
            self.relay.close()
            return False
        # Half-closed: the other way may still carry bytes. A TLS connection cannot stay half-open in
        # asyncio: it closes, and the relay with it.
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.relay.close(abort=exc is not None)


class _ClientSide(_Side):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.relay.started(self)

    def data_received(self, data: bytes) -> None:
        if self.other is None:
            self.relay.early(data)
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.other is None:
            self.eof = True
            self.relay.early_eof()
            return self.transport is None or self.transport.get_extra_info("sslcontext") is None
        return super().eof_received()


class _EndpointSide(_Side):
    def __init__(self, relay: TCPRelay):
        super().__init__(relay)
        # From the start: a server that speaks first (SMTP, MySQL) may send before the relay is joined.
        self.other = relay.client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


class TCPRelay:
    """A client connection and, once a route and an endpoint are found, the connection to the endpoint."""

    def __init__(self, listener: L4Listener, client: str = ""):
        """`client`: the client's address from a PROXY header (proxied.py); "" = the peer's."""
        self.listener = listener
        self.site = listener.site()  # the configuration this connection keeps
        self.client = _ClientSide(self)
        self.endpoint_side: _EndpointSide | None = None
        self.peer = client
        self.held: list[bytes] = []  # client bytes read before the endpoint connection is made
        self.held_size = 0
        self.closed = False
        self.last_active = time.monotonic()
        self.idle_timeout = TCP_IDLE_TIMEOUT
        self.counts: list[int] | None = None  # the route's metrics, once an endpoint is reached
        self.started_at = self.last_active
        self.bytes_in = self.bytes_out = 0  # from the client, to it (for the access log)
        self.server_name = ""  # TLS: the SNI
        self.endpoint = ""  # "address:port" once connected
        self.outcome = ""  # why it ended, for the access log: set by a refusal, else by close()
        self.route: ir.L4Route | None = None
        self.counted: tuple | None = None  # (endpoint state, backend state) while this counts as active
        self._task: asyncio.Task | None = None
        self._hello_timer: Any = None  # a TimerHandle (uvloop has its own class)
        self.peer_port = 0

    def started(self, client: _ClientSide) -> None:
        assert client.transport is not None
        peer = client.transport.get_extra_info("peername")
        if not self.peer:
            self.peer = peer[0] if peer else ""
        self.peer_port = peer[1] if peer else 0  # the proxy's, behind a PROXY header (it brings no port here)
        self.listener.relays.add(self)
        if self.site is None:
            self.close()
        elif self.site.kind == "terminate":
            # The handshake is done (asyncio calls connection_made after it): route by its server name.
            name = self.server_name = take_server_name(client.transport.get_extra_info("ssl_object"))
            route = self.site.table.for_server_name(name)
            if route is None:
                log.info("%s: no TLSRoute for server name %r (from %s)", self.listener.name, name, self.peer)
            self._route(route)
        elif self.site.kind == "tls":
            self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._no_hello)
        else:
            self._route(self.site.table.first)

    def _no_hello(self) -> None:
        log.debug("%s: no ClientHello from %s within %.0f s", self.listener.name, self.peer, HELLO_TIMEOUT)
        self._refuse("no-client-hello")
        self.close(abort=True)

    def _refuse(self, reason: str) -> None:
        self.outcome = reason
        if self.site is not None:
            self.site.refuse(reason)

    def early(self, data: bytes) -> None:
        """Client bytes before the endpoint connection is there: held; for TLS, searched for the SNI."""
        self.last_active = time.monotonic()
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size > BUFFER_LIMIT and self.client.transport is not None:
            self.client.transport.pause_reading()
        if self.route is not None or self.site is None or self.site.kind != "tls":
            return
        try:
            complete, name = client_hello_server_name(b"".join(self.held))
        except NotTLS as exc:
            log.info("%s: closing a connection from %s: %s", self.listener.name, self.peer, exc)
            self._refuse("not-tls")
            self.close()
            return
        if not complete:
            if self.held_size > HELLO_LIMIT:
                log.info("%s: closing a connection from %s: its ClientHello is over %d bytes",
                         self.listener.name, self.peer, HELLO_LIMIT)
                self._refuse("client-hello-too-large")
                self.close(abort=True)
            return
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.server_name = name
        route = self.site.table.for_server_name(name)
        if route is None:
            log.info("%s: no TLSRoute for server name %r (from %s)", self.listener.name, name, self.peer)
        self._route(route)

    def early_eof(self) -> None:
        if self.route is None and (self.site is None or self.site.kind == "tls"):
            self.close()  # the client left before saying where to

    def _route(self, route: ir.L4Route | None) -> None:
        if route is None:
            self._refuse("no-route")
            self.close()
            return
        self.route = route
        self._task = asyncio.get_running_loop().create_task(self._connect(route))

    async def _connect(self, route: ir.L4Route) -> None:
        assert self.site is not None
        tried: tuple[ir.Endpoint, ...] = ()
        registry = self.site.balancer.registry
        for _ in range(CONNECT_ATTEMPTS):
            picked = _pick(self.site, route, self.peer, tried)
            if picked is None:
                break
            backend, endpoint = picked
            if _over_connection_limit(self.site, backend):
                log.info("%s: %s is at its maxConnections: closing a connection from %s", self.listener.name,
                         backend.name, self.peer)
                self._refuse("max-connections")
                self.close()
                return
            tried += (endpoint,)
            policy = backend.policy
            timeout = policy.connect_timeout if policy is not None and policy.connect_timeout else CONNECT_TIMEOUT
            state = registry.endpoint(endpoint.address, endpoint.port)
            side = _EndpointSide(self)
            try:
                if backend.keep_client_address and TRANSPARENCY.enabled \
                        and (":" in self.peer) == (":" in endpoint.address):
                    await connect_as_client(lambda side=side: side, self.peer, endpoint.address,  # type: ignore[misc]
                                            endpoint.port, timeout)
                else:
                    await connect(lambda side=side: side, endpoint.address, endpoint.port,  # type: ignore[misc]
                                  timeout)
            except asyncio.CancelledError:
                if side.transport is not None:  # made just as the client left
                    side.transport.close()
                raise
            except UpstreamError as exc:
                state.requests += 1
                state.failures += 1
                record_outcome(registry, backend, state, None, time.monotonic())
                log.warning("%s: %s", route.name, exc)
                continue
            if self.closed:  # the client left while connecting
                if side.transport is not None:
                    side.transport.close()
                return
            # A connection made counts as an answer for outlier detection.
            record_outcome(registry, backend, state, 200, time.monotonic())
            state.requests += 1
            state.active += 1
            backend_state = registry.backend(backend.name)
            backend_state.active += 1
            self.counted = (state, backend_state)
            self.counts = self.site.counts(route)
            self.counts[L4_OPENED] += 1
            self.counts[L4_OPEN] += 1
            if policy is not None and policy.idle_timeout:
                self.idle_timeout = policy.idle_timeout
            self.endpoint = f"{endpoint.address}:{endpoint.port}"
            self._joined(side, backend.proxy_protocol)
            return
        log.info("%s: no endpoint could be reached for a connection from %s", route.name, self.peer)
        self._refuse("no-endpoint")
        self.close()

    def _joined(self, side: _EndpointSide, proxy_protocol: str = "") -> None:
        self.endpoint_side = side
        side.other, self.client.other = self.client, side
        if proxy_protocol and self.peer and self.client.transport is not None:
            # Asked for only here: getsockname is a system call, and most relays send no PROXY header.
            reached = self.client.transport.get_extra_info("sockname")
            if reached:
                side.write(proxy_header(proxy_protocol, (self.peer, self.peer_port), (reached[0], reached[1])))
        for chunk in self.held:
            side.write(chunk)
            self.bytes_in += len(chunk)
            if self.counts is not None:
                self.counts[L4_BYTES_IN] += len(chunk)
        self.held, self.held_size = [], 0
        if self.client.transport is not None:
            self.client.transport.resume_reading()
        if self.client.eof and side.transport is not None and side.transport.can_write_eof():
            side.transport.write_eof()
        if self.client.transport is None:
            self.close()

    def close(self, abort: bool = False, outcome: str = "") -> None:
        """`outcome`: why, for the access log, when no refusal said so (default: reset when aborting, else
        closed)."""
        if self.closed:
            return
        self.closed = True
        self.outcome = self.outcome or outcome or ("reset" if abort else "closed")
        self.listener.relays.discard(self)
        self._log()
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self._task is not None and not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()
        if self.counted is not None:
            state, backend_state = self.counted
            state.active -= 1
            backend_state.active -= 1
            self.counted = None
        if self.counts is not None:
            self.counts[L4_OPEN] -= 1
        for side in (self.client, self.endpoint_side):
            if side is not None and side.transport is not None:
                if abort:
                    _reset(side.transport)
                else:
                    side.transport.close()  # what is buffered is written first


    def _log(self) -> None:
        log_to = accesslog.ACCESS_LOG
        site = self.site
        if log_to is None or not log_to.is_active or site is None:
            return
        route = self.route
        listener = site.listener_of.get(id(route), site.listener) if route is not None else site.listener
        log_to.record_connection(self.started_at, self.peer, _PROTOCOLS[site.kind], listener,
                                 route.name if route is not None else "", self.endpoint, self.server_name,
                                 self.bytes_in, self.bytes_out, time.monotonic() - self.started_at, self.outcome)


def _reset(transport: Any) -> None:
    """Close with a TCP reset, not a FIN (a transport's abort() sends a FIN): a peer that reset, or a
    refusal, is passed on as a reset."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
        except OSError:
            pass
    transport.abort()


_NO_LINGER = struct.pack("ii", 1, 0)


# -- UDP --------------------------------------------------------------------------------------------------

class _UDPSession(asyncio.DatagramProtocol):
    """One client address and its own socket to an endpoint."""

    def __init__(self, listener: UDPListener, client: tuple, site: L4Site, route: ir.L4Route,
                 endpoint: ir.Endpoint, idle_timeout: float, counted: tuple):
        self.listener = listener
        self.client = client
        self.site = site
        self.route = route
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        self.counted = counted  # (endpoint state, backend state)
        self.counts = counts = site.counts(route)  # the route's metrics
        counts[L4_OPENED] += 1
        counts[L4_OPEN] += 1
        # For the access log: bytes and datagrams from the client and to it
        self.bytes_in = self.bytes_out = self.datagrams_in = self.datagrams_out = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: list[bytes] = []
        self.last_active = self.started_at = time.monotonic()
        self.closed = False
        self.as_client = False  # sent from the client's own address (IP_TRANSPARENT)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.closed:
            transport.close()
            return
        for data in self.queue:
            self.transport.sendto(data)  # type: ignore[union-attr]
        self.queue = []

    def send(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self.counts[L4_DATAGRAMS_IN] += 1
        self.counts[L4_BYTES_IN] += len(data)
        self.datagrams_in += 1
        self.bytes_in += len(data)
        if self.transport is not None:
            self.transport.sendto(data)
        elif len(self.queue) < UDP_QUEUE_MAX:
            self.queue.append(data)

    def datagram_received(self, data: bytes, _addr: tuple) -> None:
        self.last_active = time.monotonic()
        self.counts[L4_DATAGRAMS_OUT] += 1
        self.counts[L4_BYTES_OUT] += len(data)
        self.datagrams_out += 1
        self.bytes_out += len(data)
        self.listener.reply(data, self.client)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the endpoint is not listening. The session ends; the
        # client's next datagram opens a new one, which may go to another endpoint.
        log.debug("UDP session %s → %s:%d: %s", self.client, self.endpoint.address, self.endpoint.port, exc)
        self.counted[0].failures += 1
        self.close("unreachable")

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("reset" if exc is not None else "closed")

    def close(self, outcome: str = "closed") -> None:
        """`outcome`: why, for the access log."""
        if self.closed:
            return
        self.closed = True
        log_to = accesslog.ACCESS_LOG
        if log_to is not None and log_to.is_active:
            log_to.record_connection(self.started_at, self.client[0], "udp",
                                     self.site.listener_of.get(id(self.route), self.site.listener), self.route.name,
                                     f"{self.endpoint.address}:{self.endpoint.port}", "", self.bytes_in,
                                     self.bytes_out, time.monotonic() - self.started_at, outcome,
                                     self.datagrams_in, self.datagrams_out)
        self.listener.sessions.pop(self.client, None)
        state, backend_state = self.counted
        state.active -= 1
        backend_state.active -= 1
        self.counts[L4_OPEN] -= 1
        if self.transport is not None:
            self.transport.close()


class UDPListener(asyncio.DatagramProtocol):
    def __init__(self, name: str, site: Callable[[], L4Site | None]):
        self.name = name
        self.site = site
        self.sessions: dict[tuple, _UDPSession] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        session = self.sessions.get(addr)
        if session is None or session.closed:
            session = self._open(addr)
            if session is None:
                return
        session.send(data)

    def _open(self, client: tuple) -> _UDPSession | None:
        """A new session for a client's first datagram; None when the datagram is dropped (counted)."""
        site = self.site()
        if site is None:
            return None
        route = site.table.first
        if route is None:
            site.refuse("no-route")
            return None
        if len(self.sessions) >= UDP_SESSIONS_MAX:
            site.refuse("sessions-full")
            return None
        picked = _pick(site, route, client[0], ())
        if picked is None:
            site.refuse("no-endpoint")
            return None
        backend, endpoint = picked
        if _over_connection_limit(site, backend):
            site.refuse("max-connections")
            return None
        registry = site.balancer.registry
        state, backend_state = registry.endpoint(endpoint.address, endpoint.port), registry.backend(backend.name)
        state.requests += 1
        state.active += 1
        backend_state.active += 1
        policy = backend.policy
        idle = policy.idle_timeout if policy is not None and policy.idle_timeout else UDP_IDLE_TIMEOUT
        session = self.sessions[client] = _UDPSession(self, client, site, route, endpoint, idle,
                                                      (state, backend_state))
        session.as_client = backend.keep_client_address and TRANSPARENCY.enabled \
            and (":" in client[0]) == (":" in endpoint.address)
        task = asyncio.get_running_loop().create_task(self._connect(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return session

    async def _connect(self, session: _UDPSession) -> None:
        loop = asyncio.get_running_loop()
        remote = (session.endpoint.address, session.endpoint.port)
        try:
            sock = None
            if session.as_client:
                sock = client_socket(session.client[0], datagram=True)
                if sock is not None:
                    try:
                        sock.connect(remote)  # at once for UDP: no packet is sent
                    except OSError:
                        sock.close()
                        raise
            if sock is not None:
                await loop.create_datagram_endpoint(lambda: session, sock=sock)
            else:
                await loop.create_datagram_endpoint(lambda: session, remote_addr=remote)
        except OSError as exc:
            log.warning("%s: UDP to %s:%d: %s", self.name, session.endpoint.address, session.endpoint.port, exc)
            session.counted[0].failures += 1
            session.close("unreachable")

    def reply(self, data: bytes, client: tuple) -> None:
        if self.transport is not None:
            self.transport.sendto(data, client)

    def error_received(self, exc: Exception) -> None:
        log.debug("%s: %s", self.name, exc)

    def sweep(self, now: float) -> None:
        for session in [s for s in self.sessions.values() if now - s.last_active > s.idle_timeout]:
            session.close("idle-timeout")

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for session in list(self.sessions.values()):
            session.close("shutdown")
        if self.transport is not None:
            self.transport.close()


# -- the listeners ----------------------------------------------------------------------------------------

class L4Listener:
    """A listening TCP socket (TCP, or TLS either way) and its relays."""

    def __init__(self, name: str, site: Callable[[], L4Site | None]):
        self.name = name
        self.site = site
        self.relays: set[TCPRelay] = set()
        self.server: Any = None  # an asyncio.Server (uvloop has its own class)

    def protocol(self, client: str = "") -> _ClientSide:
        return TCPRelay(self, client).client

    def sweep(self, now: float) -> None:
        for relay in [r for r in self.relays if r.endpoint_side is not None and now - r.last_active > r.idle_timeout]:
            relay.close(outcome="idle-timeout")


_KIND_NAMES = {"tcp": "TCP", "tls": "TLS passthrough", "terminate": "TLS", "udp": "UDP"}


IP_FREEBIND = 15  # Linux, <linux/in.h>
IPV6_FREEBIND = 78  # Linux 4.15+, <linux/in6.h>


def free_socket(address: str, port: int, datagram: bool, reuse_port: bool) -> socket.socket:
    """A socket bound to `address` whether or not the address is this host's now (IP_FREEBIND): packets reach
    it once the address is local (a route, an announcement taken over)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


IP_TRANSPARENT = 19  # <linux/in.h>
IPV6_TRANSPARENT = 75  # <linux/in6.h>
IP_BIND_ADDRESS_NO_PORT = 24  # the port is chosen at connect, by the whole 4-tuple


@dataclass
class Transparency:
    """Whether relays may connect to pods from the clients' own addresses: set in each worker when the node's
    return path is in place (announce/return_path.py), without which the pods' replies would not come back."""

    enabled: bool = False


TRANSPARENCY = Transparency()


def client_socket(client: str, datagram: bool) -> socket.socket | None:
    """A socket bound to the client's address (IP_TRANSPARENT), to connect to a pod on this node; None, with
    transparency turned off for this process and an error logged, when the kernel refuses it (no
    CAP_NET_ADMIN)."""
    family = socket.AF_INET6 if ":" in client else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        if not datagram:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((client, 0))
        sock.setblocking(False)
    except PermissionError as exc:
        sock.close()
        TRANSPARENCY.enabled = False
        log.error("cannot connect to pods from the clients' addresses (IP_TRANSPARENT): %s; under "
                  "externalTrafficPolicy: Local they see this node's address from now on", exc)
        return None
    except OSError:
        sock.close()
        raise
    return sock


async def connect_as_client(factory: Callable[[], asyncio.Protocol], client: str, host: str, port: int,
                            timeout: float) -> tuple[asyncio.BaseTransport, Any]:
    """`connect`, from the client's address (see client_socket): the pod is on this node, and its replies
    come back to this socket through the return path."""
    try:
        sock = client_socket(client, datagram=False)
    except OSError as exc:
        raise ConnectError(f"connect to {host}:{port} from {client} failed: {exc.strerror or exc}") from exc
    if sock is None:
        return await connect(factory, host, port, timeout)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
        return await loop.create_connection(factory, sock=sock)
    except TimeoutError as timeout_error:
        sock.close()
        raise ConnectError(f"connect to {host}:{port} timed out") from timeout_error
    except OSError as exc:
        sock.close()
        raise ConnectError(f"connect to {host}:{port} failed: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise


def l4_kind(listener: ir.Listener) -> str:
    """tcp, tls (passthrough), terminate (TLS) or udp; "" for a listener this module does not serve."""
    if listener.protocol == "TCP":
        return "tcp"
    if listener.protocol == "UDP":
        return "udp"
    if listener.protocol == "TLS" and listener.tls is not None:
        return "tls" if listener.tls.mode == "Passthrough" else "terminate"
    return ""


class L4DataPlane:
    """Every TCP, UDP and TLS socket of the configuration in force, and the connections still open on
    sockets that a reload closed."""

    def __init__(self, reuse_port: bool = False):
        self.reuse_port = reuse_port
        self.sites: dict[tuple[str, int, str], L4Site] = {}
        self.tcp: dict[tuple[str, int, str], L4Listener] = {}
        self.udp: dict[tuple[str, int, str], tuple[UDPListener, asyncio.DatagramTransport]] = {}
        self._sweeper: asyncio.Task | None = None
        # TLS Terminate: the certificates each socket serves now (its SNI callback reads them on each
        # handshake, so a renewed certificate needs no new socket), contexts reused across reloads, and the
        # client-certificate settings each socket was opened with (a change of them opens it again).
        self.tls_sites: dict[tuple[str, int, str], TLSSite] = {}
        self._contexts: dict[tuple[str, str, str, str], object] = {}
        self._client_checks: dict[tuple[str, int, str], tuple[str, str]] = {}
        # Listeners a reload removed, while connections they accepted are still open: those keep their
        # configuration, idle timeout, and place in a graceful stop.
        self._draining: list[L4Listener] = []
        # Sockets that could not be opened (a port taken, say), by address: DataPlane tries them again.
        self.unbound: dict[tuple[str, int], tuple[tuple[str, int, str], str]] = {}
        self.freebind: set[tuple[str, int, str]] = set()  # sockets bound with IP_FREEBIND (LoadBalancer addresses)
        self.adopted: dict[str, L4Listener] = {}  # relays of sockets DataPlane accepts on (adopt)

    async def apply(self, config: ir.IR, bind: str, balancer: RouteBalancer, taken: set[tuple[str, int]]
                    ) -> dict[tuple[str, int], tuple[str, str]]:
        """Serve the L4 listeners of `config`; `taken` holds the HTTP sockets' addresses. Returns the sockets
        that could not be opened, with the reason and a message."""
        groups: dict[tuple[str, int, str], list[ir.Listener]] = {}
        for listener in config.listeners:
            kind = l4_kind(listener)
            if kind:
                groups.setdefault((listener.address or bind, listener.port, kind), []).append(listener)
        errors: dict[tuple[str, int], tuple[str, str]] = {}
        self.unbound = {}
        self.freebind = {key for key, group in groups.items() if any(listener.freebind for listener in group)}
        sites = {key: L4Site(key[2], L4Table([r for l in group for r in l.l4_routes]), balancer, group[0].name,
                             {id(r): l.name for l in group for r in l.l4_routes},
                             proxy_peers(group) if key[2] != "udp" else None)
                 for key, group in groups.items()}
        used = {(c.cert_pem, c.key_pem) for key, group in groups.items() if key[2] == "terminate"
                for listener in group for c in (listener.tls.certificates if listener.tls else ())}
        self._contexts = {k: v for k, v in self._contexts.items() if k[:2] in used}
        self.tls_sites = {key: TLSSite(group, self._contexts, alpn=())  # type: ignore[arg-type]
                          for key, group in groups.items() if key[2] == "terminate"}
        self.sites = sites  # the swap: new connections and sessions see the new routes
        stream_keys = {key[:2]: key for key in groups if key[2] != "udp"}
        for key, group in groups.items():
            address, port, kind = key
            name = ", ".join(l.name for l in group)
            if kind != "udp" and ((address, port) in taken or stream_keys[(address, port)] != key):
                errors[(address, port)] = ("PortUnavailable",
                                           f"{address}:{port} is used by another listener of another protocol")
                log.error("%s: %s", name, errors[(address, port)][1])
                continue
            if key in self.tls_sites and key in self.tcp \
                    and self._client_checks.get(key) != self.tls_sites[key].client_validation:
                self._close_tcp(key)
            proxied = sites[key].proxy_from is not None
            if key in self.tcp and isinstance(self.tcp[key].server, ProxiedServer) != proxied:
                self._close_tcp(key)  # PROXY headers now come first, or no longer: accepted another way
            if key in self.tcp or key in self.udp:
                continue
            try:
                await self._open(key, name)
            except OSError as exc:
                reason = "AddressNotUsable" if exc.errno == errno.EADDRNOTAVAIL else "PortUnavailable"
                errors[(address, port)] = (reason, f"cannot listen on {address}:{port}: {exc.strerror or exc}")
                log.error("%s", errors[(address, port)][1])
                self.unbound[(address, port)] = (key, name)
        for key in [k for k in self.tcp if k not in sites or k[:2] in errors]:
            self._close_tcp(key)
        for key in [k for k in self.udp if k not in sites or k[:2] in errors]:
            self._close_udp(key)
        if (self.tcp or self.udp) and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return errors

    async def retry(self, address: tuple[str, int]) -> None:
        """Try again to open a socket that could not be opened; raises OSError while it still cannot."""
        key, name = self.unbound[address]
        await self._open(key, name)
        del self.unbound[address]

    async def _open(self, key: tuple[str, int, str], name: str) -> None:
        address, port, kind = key
        loop = asyncio.get_running_loop()

        def site(key: tuple[str, int, str] = key) -> L4Site | None:
            return self.sites.get(key)

        sock = free_socket(address, port, kind == "udp", self.reuse_port) if key in self.freebind else None
        if kind == "udp":
            udp = UDPListener(name, site)
            if sock is not None:
                transport, _ = await loop.create_datagram_endpoint(lambda: udp, sock=sock)
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: udp, local_addr=(address, port), reuse_port=self.reuse_port or None)
            self.udp[key] = (udp, transport)  # type: ignore[assignment]
        else:
            ssl_ctx = None
            if kind == "terminate":
                checks = self.tls_sites[key].client_validation
                ssl_ctx = server_context(lambda: self.tls_sites.get(key), *checks, alpn=())
                self._client_checks[key] = checks
            tcp = L4Listener(name, site)
            handshake = DEADLINES.tls_handshake if ssl_ctx is not None else None
            if self.sites[key].proxy_from is not None:
                bound = sock if sock is not None else listening_socket(address, port, self.reuse_port)
                tcp.server = ProxiedServer(bound, tcp.protocol, lambda: getattr(site(), "proxy_from", None), ssl_ctx,
                                           DEADLINES.tls_handshake, HELLO_TIMEOUT)
            elif sock is not None:
                tcp.server = await loop.create_server(tcp.protocol, sock=sock, backlog=1024, ssl=ssl_ctx,
                                                      ssl_handshake_timeout=handshake)
            else:
                tcp.server = await loop.create_server(tcp.protocol, host=address, port=port, reuse_address=True,
                                                      reuse_port=self.reuse_port or None, backlog=1024, ssl=ssl_ctx,
                                                      ssl_handshake_timeout=handshake)
            self.tcp[key] = tcp
        log.info("listening on %s:%d (%s)", address, port, _KIND_NAMES[kind])

    def _close_tcp(self, key: tuple[str, int, str]) -> None:
        listener = self.tcp.pop(key)
        if listener.server is not None:
            listener.server.close()
        if listener.relays:
            self._draining.append(listener)
        log.info("stopped listening on %s:%d (%s)", key[0], key[1], _KIND_NAMES[key[2]])

    def _close_udp(self, key: tuple[str, int, str]) -> None:
        listener, _ = self.udp.pop(key)
        listener.close()
        log.info("stopped listening on %s:%d (%s)", key[0], key[1], _KIND_NAMES[key[2]])

    def adopt(self, listener: L4Listener) -> None:
        """Relays of a socket another part of the data plane accepts on (TLS passthrough names of an HTTPS
        socket): swept, counted and closed with these. One of the same name before it drains."""
        old = self.adopted.pop(listener.name, None)
        if old is not None and old.relays:
            self._draining.append(old)
        self.adopted[listener.name] = listener
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def connections(self) -> int:
        return sum(len(l.relays) for l in (*self.tcp.values(), *self.adopted.values(), *self._draining))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for tcp in (*self.tcp.values(), *self.adopted.values(), *self._draining):
                tcp.sweep(now)
            self._draining = [listener for listener in self._draining if listener.relays]
            for udp, _ in self.udp.values():
                udp.sweep(now)

    def stop_accepting(self) -> None:
        for listener in self.tcp.values():
            if listener.server is not None:
                listener.server.close()

    def close(self) -> None:
        """Close every socket and connection now (after the grace period)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for key in list(self.tcp):
            self._close_tcp(key)
        self._draining += self.adopted.values()
        self.adopted = {}
        for listener in self._draining:
            for relay in list(listener.relays):
                relay.close(abort=True, outcome="shutdown")
        self._draining = []
        for key in list(self.udp):
            self._close_udp(key)
