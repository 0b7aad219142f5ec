"""HTTP/2 connections without sockets: an H2ServerConnection fed by an h2 client in memory. Request bodies
are paced by flow control (the client's window is granted back only as the body moves on to the endpoint),
and a client that resets its streams as fast as it opens them is sent away."""

from __future__ import annotations

import asyncio
from collections import deque

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings

from tidegate.dataplane.http2 import H2ServerConnection
from tidegate.dataplane.server import DataPlane


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name: str) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return 0  # what is written is taken at once (`out`); tests of a full socket call pause_writing

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def _connected(serve) -> tuple[H2ServerConnection, _Transport, h2.connection.H2Connection]:
    """A server whose streams `serve` answers, and an h2 client that has sent its preface."""
    site = DataPlane()._empty_site()  # no routes: the streams here are served by `serve`
    server = H2ServerConnection(lambda: site, 80, "http", "127.0.0.1")
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


def _request(client: h2.connection.H2Connection, end_stream: bool = True) -> int:
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a")],
                        end_stream=end_stream)
    return stream_id


def test_streams_over_the_advertised_concurrency_are_refused_one_by_one():
    """RFC 9113 5.1.2: the client is told 128; the extra streams are refused alone (REFUSED_STREAM, which a
    client may send again), and the first 128 are answered on the same connection."""
    async def scenario() -> tuple[list, int]:
        release = asyncio.Event()

        async def held_then_answered(stream, ex):
            await release.wait()
            stream.begin_response(ex, 204, [], 0, True)

        server, transport, client = _connected(held_then_answered)
        server.data_received(client.data_to_send())
        events = client.receive_data(bytes(transport.out))
        transport.out.clear()
        advertised = client.remote_settings.max_concurrent_streams
        # A client that pays no heed to it (h2's own client would refuse to open the 129th stream).
        client.remote_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = deque([1000])
        for _ in range(150):
            _request(client)
        server.data_received(client.data_to_send())
        release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        events += client.receive_data(bytes(transport.out))
        return events, advertised

    events, advertised = asyncio.run(scenario())
    assert advertised == 128
    refused = [e for e in events if isinstance(e, h2.events.StreamReset)]
    answered = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert len(answered) == 128 and len(refused) == 22
    assert {e.error_code for e in refused} == {h2.errors.ErrorCodes.REFUSED_STREAM}
    assert not [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]


def test_a_ping_flood_is_sent_away_and_a_few_pings_are_not():
    def pings(count: int) -> tuple[list, bool]:
        async def scenario() -> tuple[list, bool]:
            server, transport, client = _connected(None)
            for n in range(count):
                client.ping(n.to_bytes(8, "big"))
                server.data_received(client.data_to_send())
                if transport.closed:
                    break
            server.connection_lost(None)
            return client.receive_data(bytes(transport.out)), transport.closed

        return asyncio.run(scenario())

    events, closed = pings(5000)
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert closed and goaway and goaway[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    events, closed = pings(50)
    assert not closed and len([e for e in events if isinstance(e, h2.events.PingAckReceived)]) == 50


def test_a_client_that_does_not_read_holds_a_bounded_number_of_bytes():
    """A client opens its windows to the maximum and stops reading: once the socket is full, DATA waits in
    the streams, and the endpoints are paused at the per-connection limit, whatever the windows allow."""
    from tidegate.dataplane.http2 import CONNECTION_PENDING_LIMIT, PENDING_LIMIT

    class Endpoint:
        paused = False

        def pause_reading(self) -> None:
            self.paused = True

        def resume_reading(self) -> None:
            self.paused = False

    async def scenario() -> tuple[list[Endpoint], int, int]:
        endpoints: list[Endpoint] = []

        async def streams_forever(stream, ex):
            endpoint = Endpoint()
            endpoints.append(endpoint)
            stream.upstream = endpoint
            stream.begin_response(ex, 200, [], None, False)
            while not endpoint.paused:  # an endpoint with an endless answer, as fast as it is let
                stream.body(b"y" * 65536)
                await asyncio.sleep(0)
            await asyncio.sleep(10)

        server, transport, client = _connected(streams_forever)
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        client.increment_flow_control_window(2**31 - 1 - 65535)
        for _ in range(8):
            _request(client)
        server.data_received(client.data_to_send())
        for _ in range(3):
            await asyncio.sleep(0)
        server.pause_writing()  # the client reads no more: the socket's buffer is full
        written_before = len(transport.out)
        for _ in range(200):
            await asyncio.sleep(0)
        held = server.pending_bytes()
        written_after = len(transport.out)
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        return endpoints, held, written_after - written_before

    endpoints, held, written = asyncio.run(scenario())
    assert len(endpoints) == 8 and all(e.paused for e in endpoints)
    assert held <= CONNECTION_PENDING_LIMIT + 8 * 65536 + PENDING_LIMIT
    assert written < 64 * 1024  # no DATA went to the full socket
