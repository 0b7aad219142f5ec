"""HTTP/2 connections without sockets: an H2ServerConnection fed by an h2 client in memory. Request bodies
are paced by flow control (the client's window is granted back only as the body moves on to the endpoint),
and a client that resets its streams as fast as it opens them is sent away."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.errors
import h2.events

from tidegate.dataplane.http2 import H2ServerConnection


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name: str) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def _connected(serve) -> tuple[H2ServerConnection, _Transport, h2.connection.H2Connection]:
    """A server whose streams `serve` answers, and an h2 client that has sent its preface."""
    server = H2ServerConnection(lambda: None, 80, "http", "127.0.0.1")
    server.serve = serve
    transport = _Transport()
    server.connection_made(transport)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    return server, transport, client


def test_window_updates_wait_while_the_endpoint_is_slow():
    async def scenario() -> tuple[int, int]:
        async def never_served(stream, ex):  # keep the stream open; the test plays the endpoint's part
            await asyncio.sleep(10)

        server, transport, client = _connected(never_served)
        client.send_headers(1, [(":method", "POST"), (":path", "/"), (":scheme", "http"), (":authority", "a")])
        server.data_received(client.data_to_send())
        client.receive_data(bytes(transport.out))
        transport.out.clear()
        stream = server.streams[1]
        sunk: list[bytes] = []
        stream.ex.sink = lambda chunk: sunk.append(chunk or b"")
        stream.pause_reading()  # the endpoint's socket is full

        def push(size: int) -> None:
            for start in range(0, size, 16_000):
                client.send_data(1, b"x" * min(16_000, size - start))
            server.data_received(client.data_to_send())
            client.receive_data(bytes(transport.out))
            transport.out.clear()

        push(60_000)
        window_while_paused = client.local_flow_control_window(1)
        stream.resume_reading()  # the endpoint drained
        await asyncio.sleep(0)  # frames leave at the end of the event loop's turn
        client.receive_data(bytes(transport.out))
        window_after_resume = client.local_flow_control_window(1)
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        assert b"".join(sunk) == b"x" * 60_000  # the bytes themselves moved on
        return window_while_paused, window_after_resume

    paused, resumed = asyncio.run(scenario())
    assert paused < 10_000  # nothing granted back while the endpoint was slow
    assert resumed > 60_000  # granted once it drained


def _resets(requests: int, reset_every: int) -> tuple[list, bool]:
    """`requests` GET streams, each reset by the client right after it was sent when its number is a multiple
    of `reset_every`; the others are answered at once (204). Returns the client's events and whether the
    server closed the connection."""

    async def scenario() -> tuple[list, bool]:
        async def answered(stream, ex):
            stream.begin_response(ex, 204, [], 0, True)

        server, transport, client = _connected(answered)
        events = []
        for n in range(requests):
            stream_id = client.get_next_available_stream_id()
            client.send_headers(stream_id, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                            (":authority", "a")], end_stream=True)
            if n % reset_every == 0:
                client.reset_stream(stream_id)
            server.data_received(client.data_to_send())
            for _ in range(3):  # the answer, and the turn that writes it
                await asyncio.sleep(0)
            events += client.receive_data(bytes(transport.out))
            transport.out.clear()
            if transport.closed:
                break
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        return events, transport.closed

    return asyncio.run(scenario())


def test_a_client_that_resets_what_it_opens_is_sent_away():
    events, closed = _resets(requests=300, reset_every=1)
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert closed and len(goaway) == 1
    assert goaway[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_a_client_that_gives_up_on_some_requests_is_not():
    events, closed = _resets(requests=330, reset_every=3)  # 110 resets: a third of the requests
    assert not closed and not [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    answered = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert len(answered) == 220
