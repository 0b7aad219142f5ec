"""Messages between the control process and the workers: pickled, framed by their length, over a socket pair,
read and written by the event loop on both sides.

A configuration of 100,000 routes is tens of megabytes: it must arrive whole however the kernel cuts it up,
without a blocking write or read on an event loop, and without one process's slowness breaking the other's
reads. (multiprocessing's Connection reads a message with blocking calls; on a descriptor the event loop had
made non-blocking, a large message failed half-read and the worker took it for the end of the pipe.)

Large messages are pickled and unpickled in a thread, so that an event loop with traffic to serve is held up
for at most the interpreter's switch interval at a time, not for the whole message.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("tidegate.channel")

_HEADER = struct.Struct("!Q")
# Messages larger than this are (un)pickled off the event loop's thread; smaller ones cost less than a hop.
IN_THREAD_BYTES = 256 * 1024


class _FrameReader:
    """The pickle as a file whose reads are Python calls: the C unpickler reads a large pickle one frame
    (about 64 KiB) at a time, and each read gives the event loop's thread its chance at the interpreter lock.
    (pickle.loads holds it from start to end: 80 ms for 10,000 routes, and the loop waits all that time.)"""

    def __init__(self, payload: bytes):
        self._view = memoryview(payload)
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._at + size
        chunk = bytes(self._view[self._at:end])
        self._at += len(chunk)
        return chunk

    def readline(self) -> bytes:
        end = bytes(self._view[self._at:]).find(b"\n")
        return self.read(-1 if end < 0 else end + 1)


def _unpickle_in_frames(payload: bytes) -> Any:
    return pickle.Unpickler(_FrameReader(payload)).load()  # type: ignore[arg-type]


class Channel(asyncio.Protocol):
    """One end of a framed message stream. Messages are handed to `on_message` one at a time, in order: the
    next one waits until the handler's coroutine has finished."""

    def __init__(self, on_message: Callable[[Any], Awaitable[None]], on_close: Callable[[], None]):
        self._on_message = on_message
        self._on_close = on_close
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._writable = asyncio.Event()
        self._writable.set()
        self._order = asyncio.Lock()  # messages leave in the order `send` was called
        self._reader: asyncio.Task | None = None
        self.closed = False

    @classmethod
    async def open(cls, sock: socket.socket, on_message: Callable[[Any], Awaitable[None]],
                   on_close: Callable[[], None]) -> Channel:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        _, channel = await loop.create_unix_connection(lambda: cls(on_message, on_close), sock=sock)
        return channel

    # -- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        # A large message is written in one piece; below this the writer carries on without waiting.
        self._transport.set_write_buffer_limits(high=4 * 1024 * 1024)  # type: ignore[union-attr]
        self._reader = asyncio.get_running_loop().create_task(self._deliver())

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + size
            if len(self._buffer) < end:
                return
            self._inbox.put_nowait(bytes(memoryview(self._buffer)[_HEADER.size:end]))
            del self._buffer[:end]

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self._inbox.put_nowait(None)

    # -- use -------------------------------------------------------------------------------------------
    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            payload = await self._inbox.get()
            if payload is None:
                self._on_close()
                return
            try:
                if len(payload) > IN_THREAD_BYTES:
                    message = await loop.run_in_executor(None, _unpickle_in_frames, payload)
                else:
                    message = pickle.loads(payload)
                await self._on_message(message)
            except Exception:  # one bad message must not end the channel: the next ones still count
                log.exception("a message from the other process could not be handled")

    async def send(self, message: Any, large: bool = False) -> None:
        """Send a message, after those sent before it; wait while the other side is behind (flow control).
        `large`: it may be large (a configuration), so it is pickled in a thread. Raises ConnectionError once
        the channel is closed."""
        async with self._order:
            if large:
                self._check_open()
                payload = await asyncio.get_running_loop().run_in_executor(
                    None, pickle.dumps, message, pickle.HIGHEST_PROTOCOL)
            else:
                payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            self._check_open()
            self._transport.write(_HEADER.pack(len(payload)))  # type: ignore[union-attr]
            self._transport.write(payload)  # type: ignore[union-attr]
            await self._writable.wait()

    def _check_open(self) -> None:
        if self.closed or self._transport is None or self._transport.is_closing():
            raise ConnectionError("the channel is closed")

    async def flush(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until what was sent has left this process."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (self._transport is not None and not self.closed and self._transport.get_write_buffer_size()
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(0.01)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._reader is not None:
            self._reader.cancel()
