"""The floor for a Python proxy on this machine: uvloop and httptools, and nothing else.

Each client connection gets its own keep-alive connection to one backend (round robin over the backends by
connection); request and response bytes are passed through as they are, and the parsers only find where each
message ends. No routing, header rewriting, balancing per request, metrics or logs. benchmarks/proxies.py runs
it next to tidegate so the report shows how much of the gap to HAProxy is Python itself.

    python benchmarks/minimal_proxy.py LISTEN_PORT BACKEND_PORT [BACKEND_PORT ...]
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client):
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.client.answered()

    def connection_lost(self, exc) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    backends: itertools.cycle

    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport
        loop = asyncio.get_running_loop()
        loop.create_task(self._connect(loop))

    async def _connect(self, loop) -> None:
        _, self.upstream = await loop.create_connection(lambda: Upstream(self), "127.0.0.1", next(Client.backends))
        for chunk in self.pending:
            self.upstream.transport.write(chunk)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def answered(self) -> None:
        pass

    def connection_lost(self, exc) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self.transport = None


async def main(port: int, backends: list[int]) -> None:
    Client.backends = itertools.cycle(backends)
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), [int(p) for p in sys.argv[2:]]))
