"""Backends whose behaviour a test changes while traffic flows: answer, answer 503, hang, answer slowly, fail
health checks. Each runs an asyncio server on its own loopback address in a thread of the test process and
counts what it saw, so a test can assert how many requests an endpoint really received."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from tests.threaded import ThreadedServer


class ScriptedBackend(ThreadedServer):
    def __init__(self, address: str, port: int, name: str):
        super().__init__(address, port)
        self.address, self.name = address, name
        # ok | 503 | hang | slow | early (a POST gets 401 before its body is read) | drop-reused (a connection's
        # second request is read and the connection closed, unanswered: a keep-alive timeout that struck just
        # as the connection was reused) | trickle (a chunked answer, a chunk every 50 ms for slow_seconds) |
        # close-delimited (a reused connection's answer has no length: its body ends when the connection closes) |
        # garbage-reused (a reused connection's answer is not HTTP) | early-hints (a 103 first, in a write of
        # its own, then the answer)
        self.mode = "ok"
        self.slow_seconds = 0.5
        self.first_chunk_delay = 0.0  # trickle: the head goes out alone, this long before the body
        self.healthy = True  # what /healthz answers
        self.requests = 0  # requests seen, health checks excluded
        self.health_checks = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        answered = 0  # on this connection
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                path = line.split(" ")[1] if " " in line else "/"
                if self.mode == "early" and line.startswith("POST"):
                    # Answer before reading the body (an auth failure on an upload), then read and drop
                    # the body before hanging up, as nginx's lingering close does (closing with unread data
                    # would reset the connection and lose the answer).
                    self.requests += 1
                    writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\nConnection: close\r\n\r\nno\r\n")
                    await writer.drain()
                    length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                                   if h.lower().startswith(b"content-length:")), 0)
                    while length > 0:
                        chunk = await reader.read(min(length, 65536))
                        if not chunk:
                            break
                        length -= len(chunk)
                    break
                if self.mode in ("drop-reused", "garbage-reused") and answered:
                    self.requests += 1
                    if self.mode == "garbage-reused":
                        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
                        await writer.drain()
                    break
                answered += 1
                if path == "/healthz":
                    self.health_checks += 1
                    status = 200 if self.healthy else 500
                else:
                    self.requests += 1
                    if self.mode == "hang":
                        await asyncio.sleep(3600)
                    if self.mode == "slow":
                        await asyncio.sleep(self.slow_seconds)
                    if self.mode == "trickle":
                        writer.write(b"HTTP/1.1 200 X\r\nTransfer-Encoding: chunked\r\n\r\n")
                        await writer.drain()
                        await asyncio.sleep(self.first_chunk_delay)
                        for _ in range(int(self.slow_seconds / 0.05)):
                            writer.write(b"5\r\nchunk\r\n")
                            await writer.drain()
                            await asyncio.sleep(0.05)
                        writer.write(b"0\r\n\r\n")
                        await writer.drain()
                        continue
                    if self.mode == "early-hints":
                        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
                        await writer.drain()
                        await asyncio.sleep(0.02)
                    status = 503 if self.mode == "503" else 200
                body = json.dumps({"pod": self.name, "path": path}).encode()
                if self.mode == "close-delimited" and answered > 1:
                    writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nX-Hop: drop me\r\n"
                                 b"Connection: close, X-Hop\r\n\r\n%b" % (status, body))
                    await writer.drain()
                    break
                writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                             % (status, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()


@contextmanager
def scripted_backends(*specs: tuple[str, int, str]) -> Iterator[list[ScriptedBackend]]:
    """(address, port, pod name) each; all stopped on exit."""
    with ExitStack() as stack:
        backends = []
        for address, port, name in specs:
            backend = ScriptedBackend(address, port, name).start()
            stack.callback(backend.stop)
            backends.append(backend)
        yield backends
