"""Which nodes are up, from a heartbeat that crosses the data path.

Each node's workers answer heartbeat datagrams on `--heartbeat-port` (a data-plane process answering, not the
control process: a node whose serving loop is stuck stops answering); the control process probes from the
port above it, where answers and other nodes' goodbyes arrive. Each node's control process sends one
to every node, itself included, every `interval` seconds, to the node's InternalIP over the network that
carries the traffic; a node that has not answered for `timeout` seconds is down. Every node computes the same
set from what it hears, so no API write is needed; a node cut off from the others thinks them down and
announces everything, on a link that reaches no one.

Until `timeout` has passed since start, nodes not yet heard from count as up: a restarting node does not
grab every address for the moment before the first answers arrive. A node that stops cleanly says goodbye
(with the incarnation of its run, which its workers' answers carry): the others take its addresses at once,
and ignore that run's workers while they drain.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

log = logging.getLogger("tidegate.members")

MAGIC = b"TGHB1 "
BYE = b"TGBYE1 "


def probe(sender: str, sequence: int) -> bytes:
    return MAGIC + f"{sender} {sequence}".encode()


def answer(request: bytes, node: str, incarnation: str = "") -> bytes | None:
    """A worker's answer to a probe: the probe with the answering node's name (and the incarnation of the run
    it belongs to) added; None for anything else."""
    if not request.startswith(MAGIC) or len(request) > 512:
        return None
    return request + b" " + f"{node}@{incarnation}".encode()


def parse_answer(data: bytes) -> tuple[str, int, str, str] | None:
    """(sender, sequence, answering node, its incarnation) of an answer."""
    if not data.startswith(MAGIC):
        return None
    parts = data[len(MAGIC):].decode(errors="replace").split(" ")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    node, _, incarnation = parts[2].partition("@")
    return parts[0], int(parts[1]), node, incarnation


def goodbye(node: str, incarnation: str) -> bytes:
    """What a node stopping cleanly tells the others: its addresses move at once, not after a timeout."""
    return BYE + f"{node}@{incarnation}".encode()


def parse_goodbye(data: bytes) -> tuple[str, str] | None:
    if not data.startswith(BYE) or len(data) > 512:
        return None
    node, _, incarnation = data[len(BYE):].decode(errors="replace").partition("@")
    return (node, incarnation) if node and incarnation else None


class HeartbeatResponder(asyncio.DatagramProtocol):
    """In each worker: answer probes."""

    def __init__(self, node: str, incarnation: str):
        self.node = node
        self.incarnation = incarnation
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        reply = answer(data, self.node, self.incarnation)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def start_responder(node: str, port: int, incarnation: str) -> asyncio.DatagramTransport:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("::", port))
    sock.setblocking(False)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: HeartbeatResponder(node, incarnation), sock=sock)
    return transport


class Membership(asyncio.DatagramProtocol):
    """In the control process: probe every node, keep who answered lately, call `on_change` when that changes."""

    def __init__(self, node: str, port: int, interval: float = 0.2, timeout: float = 2.0,
                 on_change: Callable[[], None] | None = None, incarnation: str = ""):
        self.node = node
        self.incarnation = incarnation  # this run's, as its workers answer with it
        self.departed: dict[str, str] = {}  # node -> the incarnation that said goodbye
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self.on_change = on_change or (lambda: None)
        self.peers: dict[str, str] = {}  # node -> address
        self.last_heard: dict[str, float] = {}
        self.since: dict[str, float] = {}  # node -> when its current state (up or down) began (time.time())
        self._sequence = 0
        self._started = time.monotonic()
        self._live: set[str] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None

    def set_peers(self, peers: dict[str, str]) -> None:
        """Node name -> address (InternalIP) of every node that may announce, this one included."""
        self.peers = dict(peers)
        self._evaluate()

    async def start(self) -> None:
        # Probes leave from port+1, where answers come back and where other nodes' goodbyes arrive.
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", self.port + 1))
        sock.setblocking(False)
        self._transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None:
            self._transport.close()

    def live(self) -> set[str]:
        return set(self._live)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        leaving = parse_goodbye(data)
        if leaving is not None:
            node, incarnation = leaving
            if node in self.peers and node != self.node:
                self.departed[node] = incarnation
                self.last_heard.pop(node, None)
                log.info("node %s is stopping", node)
                self._evaluate()
            return
        parsed = parse_answer(data)
        if parsed is None or parsed[0] != self.node or parsed[2] not in self.peers:
            return
        _, _, node, incarnation = parsed
        if self.departed.get(node) == incarnation:
            return  # its workers still drain connections; its addresses have moved
        self.last_heard[node] = time.monotonic()
        if node not in self._live:
            self._evaluate()

    def leave(self) -> None:
        """Stopping cleanly: tell every node, so that this node's addresses move now (three times: UDP)."""
        if self._transport is None:
            return
        message = goodbye(self.node, self.incarnation)
        for _ in range(3):
            for node, address in self.peers.items():
                if address and node != self.node:
                    try:
                        self._transport.sendto(message, (address if ":" in address else f"::ffff:{address}",
                                                         self.port + 1))
                    except OSError:
                        pass

    def error_received(self, exc: Exception) -> None:
        pass  # an unreachable node: its silence says so

    async def _run(self) -> None:
        while True:
            self._sequence += 1
            payload = probe(self.node, self._sequence)
            for address in self.peers.values():
                if address and self._transport is not None:
                    target = address if ":" in address else f"::ffff:{address}"
                    try:
                        self._transport.sendto(payload, (target, self.port))
                    except OSError:
                        pass
            self._evaluate()
            await asyncio.sleep(self.interval)

    def _evaluate(self) -> None:
        now = time.monotonic()
        starting = now - self._started < self.timeout
        live = {n for n in self.peers if now - self.last_heard.get(n, -1e9) <= self.timeout
                or (starting and n not in self.last_heard and n != self.node and n not in self.departed)}
        if live != self._live:
            for node in live ^ self._live:
                self.since[node] = time.time()
                log.info("node %s is %s", node, "up" if node in live else
                         f"down (no heartbeat for {self.timeout:.1f} s)")
            self._live = live
            self.on_change()
