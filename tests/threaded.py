"""A stream server on its own event loop in a thread of the test process, for test peers the tests steer
while they run (tests/scripted.py, tests/apiserver.py). Subclasses write `_serve` and may add state made on
the server's loop in `_on_loop`."""

from __future__ import annotations

import asyncio
import threading


class ThreadedServer:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()  # subclasses add and discard their connections

    def _on_loop(self) -> None:
        """Runs on the server's loop before it listens (asyncio objects must be made there)."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._on_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def start(self):
        self._thread.start()
        self._ready.wait(5)
        return self

    def call(self, fn, *args):
        """Run a coroutine function on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(5)

    def stop(self) -> None:
        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._clients):
                writer.close()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]  # hanging answers, watches
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(shut)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
