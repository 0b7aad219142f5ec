"""A listening socket whose connections from trusted proxies start with a PROXY header (ClientPolicy
`clientIP.proxyProtocol`), for the listeners where that header comes before anything the connection's protocol
reads: HTTPS and TLS (before the TLS handshake), TCP and TLS passthrough (before the relayed bytes). An HTTPS
socket with TLS passthrough names (an Ingress's ssl-passthrough) is accepted here too: the ClientHello's name,
peeked, decides whether the connection is relayed to a pod as it is or terminated; and so is every HTTPS socket
of a run with ACME, whose ClientHello may be a TLS-ALPN-01 validation (acme_challenge.py).

tidegate accepts on such a socket itself. From a trusted peer it reads the header off the socket and not one
byte further (it peeks, and takes only what the header is made of), so the TLS handshake or the relay then
starts on the client's first byte as if the proxy were not there; the header's source is the connection's
client from then on. A trusted peer that sends no header, or sends a bad one, or not all of it within the
header timeout, is closed and counted. Other peers' connections are served at once, as by an ordinary server.
Plain HTTP listeners read the header in the connection's protocol instead (http1.ClientConnection).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from tidegate.dataplane import proxy_protocol
from tidegate.dataplane.acme_challenge import ALPN, AnsweredChallenge
from tidegate.dataplane.guard import AddressSet
from tidegate.observe.metrics import METRICS

log = logging.getLogger("tidegate.dataplane")

ACCEPTS_PER_TURN = 64  # connections taken off the backlog each time the socket is readable
PEEK_BYTES = 16 + 65535  # the longest version 2 header


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:  # at once, also when cancelled: the descriptor may be closed and taken by another socket next
        loop.remove_reader(fd)


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket, what: str) -> bytes:
    """What the peer has sent and nobody has read yet, once there is some (ConnectionError: it closed before
    `what`)."""
    while True:
        await _readable(loop, sock.fileno())
        try:
            seen = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not seen:
            raise ConnectionError(f"closed before {what}")
        return seen


async def read_header(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> str:
    """Take a PROXY header (v1 or v2) off `sock`, leaving what follows it unread. Returns its source address
    ("" for LOCAL and UNKNOWN: the peer's own). Raises proxy_protocol.BadHeader, or ConnectionError when the peer
    closes first."""
    held = b""
    while True:
        seen = await _peek(loop, sock, "its PROXY header ended")
        parsed = proxy_protocol.parse(held + seen)
        if parsed is None:  # all of it is header so far: taken, so that the socket is not readable at once again
            held += sock.recv(len(seen))
            continue
        length, source = parsed
        rest = length - len(held)
        if rest > 0:
            sock.recv(rest)  # peeked already: all of it is there
        return source


async def peek_client_hello(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[str, tuple[str, ...]]:
    """The server name and the ALPN protocols of the ClientHello that `sock` starts with, read without taking
    it off the socket ("" and () when it names none, or the bytes are not a ClientHello: TLS itself then says
    what is wrong)."""
    from tidegate.dataplane.l4 import NotTLS, client_hello_offer  # (l4 imports this module)

    while True:
        seen = await _peek(loop, sock, "its ClientHello")
        try:
            complete, name, alpn = client_hello_offer(seen)
        except NotTLS:
            return "", ()
        if complete:
            return name, alpn
        if len(seen) >= PEEK_BYTES:
            return "", ()
        await asyncio.sleep(0.005)  # the rest of it is on its way: peeking again at once would spin


class ProxiedServer:
    """Accepts on `sock` (bound, not yet listening). `protocol(source)` makes a connection's protocol ("": the
    peer is the client); `trusted()` is the current configuration's set of proxies (guard.AddressSet or None)."""

    def __init__(self, sock: socket.socket, protocol: Callable[[str], asyncio.BaseProtocol],
                 trusted: Callable[[], Any], tls: ssl.SSLContext | None = None, handshake_timeout: float = 10.0,
                 header_timeout: float = 10.0, limit_label: str = "proxy-protocol",
                 passthrough: Callable[[str], Callable[[str], asyncio.BaseProtocol] | None] | None = None,
                 challenge: Callable[[str], ssl.SSLContext | None] | None = None):
        self.passthrough = passthrough  # TLS: a server name's relay protocol, when that name is passed through
        self.challenge = challenge  # TLS: a name's ACME TLS-ALPN-01 answer (acme_challenge.tls_alpn_context)
        self.sock = sock
        self.protocol = protocol
        self.trusted = trusted
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.header_timeout = header_timeout
        self.limit_label = limit_label
        self.tasks: set[asyncio.Task] = set()
        self.loop = asyncio.get_running_loop()
        sock.setblocking(False)
        sock.listen(1024)
        self.loop.add_reader(sock.fileno(), self._accept)
        self.sockets = [sock]
        self.closed = False

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, most likely: the backlog waits
                log.warning("accepting on %s: %s", self.sock.getsockname(), exc)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._serve(conn, peer[0]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket, peer: str) -> None:
        source = ""
        trusted = self.trusted()
        if trusted is not None and peer in trusted:
            try:
                source = await asyncio.wait_for(read_header(self.loop, conn), self.header_timeout)
            except (proxy_protocol.BadHeader, ConnectionError, OSError, asyncio.TimeoutError) as exc:
                METRICS.limits.labels(self.limit_label).inc()
                log.info("closing the connection from %s: a trusted proxy's connection without a PROXY header "
                         "(%s)", peer, str(exc) or f"none within {self.header_timeout:g} s")
                conn.close()
                return
            except asyncio.CancelledError:
                conn.close()
                raise
        try:
            if self.passthrough is not None or self.challenge is not None:
                name, alpn = await asyncio.wait_for(peek_client_hello(self.loop, conn), self.handshake_timeout)
                answer = self.challenge(name) if self.challenge is not None and alpn == (ALPN,) else None
                if answer is not None:  # an ACME validation: the challenge certificate is the whole answer
                    METRICS.acme_challenges.labels("tls-alpn-01").inc()
                    await self.loop.connect_accepted_socket(AnsweredChallenge, conn, ssl=answer,
                                                            ssl_handshake_timeout=self.handshake_timeout)
                    return
                relay = self.passthrough(name) if self.passthrough is not None else None
                if relay is not None:  # the relay reads the ClientHello itself: it is still unread
                    await self.loop.connect_accepted_socket(lambda: relay(source), conn)  # type: ignore[misc]
                    return
            if self.tls is not None:
                await self.loop.connect_accepted_socket(lambda: self.protocol(source), conn, ssl=self.tls,
                                                        ssl_handshake_timeout=self.handshake_timeout)
            else:
                await self.loop.connect_accepted_socket(lambda: self.protocol(source), conn)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("connection from %s ended before it was served: %s", source or peer, exc)
            conn.close()
        except asyncio.CancelledError:  # (closing: a connection still on its ClientHello or handshake)
            conn.close()
            raise

    def close(self) -> None:
        """Stop accepting (connections already served go on)."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in list(self.tasks):  # still reading a header or shaking hands
            task.cancel()


def proxy_peers(listeners: list[Any]) -> Any:
    """The peers trusted to send PROXY headers to one socket, by the ClientPolicy of its listeners (ir.Listener):
    a guard.AddressSet, or None when no listener on it has any."""
    trusted = sorted({c for listener in listeners if listener.client_ip is not None
                      for c in listener.client_ip.proxy_protocol})
    return AddressSet(trusted) if trusted else None


def listening_socket(address: str, port: int, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to (address, port) as loop.create_server binds one."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock
