"""Clients that try to make tidegate work or hold memory without bound: each is cut off at a limit, memory
stays flat, and other clients are answered meanwhile."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest

from tests.harness import (
    echo_servers,
    free_port,
    h2_request,
    request,
    reset_rss_high_water,
    rss_high_water_kb,
    rss_kb,
    tidegate_run,
    wait_until,
    worker_pid,
)
from tests.manifests import http_gateway, route, service
from tests.scripted import scripted_backends

GW = "127.0.0.1"
POD = "127.0.15.1"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("hostile")
    port, pod_port = free_port(GW), free_port(POD)
    config = tmp / "config"
    config.mkdir()
    (config / "all.yaml").write_text(http_gateway(GW, port) + service("echo", [(POD, pod_port, "pod")])
                                     + route("echo", "echo.test", "- backendRefs: [{name: echo, port: 80}]"))
    with echo_servers({(POD, pod_port): "default/pod"}, tmp / "echo.log"), \
            tidegate_run(config, (GW, port), tmp / "tidegate.log") as proxy:
        yield {"port": port, "worker": worker_pid(proxy), "log": tmp / "tidegate.log", "admin": proxy.admin_port}


def _ok(stack: dict) -> bool:
    return request(GW, stack["port"], "/", headers={"Host": "echo.test"}, timeout=5)[0] == 200


def _flood(port: int, head: bytes, filler: bytes, total: int) -> tuple[int, bytes]:
    """Send `head`, then `filler` bytes up to `total` or until tidegate stops reading or closes; the bytes
    sent, and what came back."""
    sent = 0
    with socket.create_connection((GW, port), timeout=5) as sock:
        sock.sendall(head)
        block = filler * (64 * 1024 // len(filler))
        try:
            while sent < total:
                sent += sock.send(block)
        except OSError:  # reset, or the send timed out on a full window: tidegate stopped reading
            pass
        try:
            answer = sock.recv(65536)
        except OSError:
            answer = b""
    return sent, answer


@pytest.mark.parametrize("what", ["a field value", "a field name", "the request target"])
def test_a_huge_request_head_is_refused_as_it_arrives(stack, what: str):
    worker = stack["worker"]
    assert _ok(stack)
    before = rss_kb(worker)
    reset_rss_high_water(worker)
    head = {"a field value": b"GET / HTTP/1.1\r\nHost: echo.test\r\nX-Big: ",
            "a field name": b"GET / HTTP/1.1\r\nHost: echo.test\r\nX-",
            "the request target": b"GET /"}[what]
    answers: list[bool] = []
    other = threading.Thread(target=lambda: answers.extend(_ok(stack) for _ in range(20)))
    started = time.monotonic()
    other.start()
    sent, answer = _flood(stack["port"], head, b"a", 64 * MIB)
    other.join(10)
    assert answer.startswith(b"HTTP/1.1 431 ") or answer.startswith(b"HTTP/1.1 414 "), answer[:100]
    assert time.monotonic() - started < 5
    assert sent < 16 * MIB  # tidegate stopped reading long before 64 MiB (the rest is socket buffers)
    growth_kb = rss_high_water_kb(worker) - before
    assert growth_kb < 1024, f"the worker grew by {growth_kb} KiB"
    assert answers == [True] * 20  # another client was answered meanwhile


def _h2_client(port: int, window: int = 65535) -> tuple[socket.socket, h2.connection.H2Connection]:
    sock = socket.create_connection((GW, port), timeout=5)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    if window > 65535:
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        client.increment_flow_control_window(window - 65535)
    sock.sendall(client.data_to_send())
    return sock, client


def test_an_http2_client_that_opens_its_window_and_never_reads_costs_a_few_mib(stack):
    worker = stack["worker"]
    assert _ok(stack)
    before = rss_kb(worker)
    reset_rss_high_water(worker)
    sock, client = _h2_client(stack["port"], window=2**31 - 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        for _ in range(10):  # ten streams, each asking the pod for 200 MB
            stream_id = client.get_next_available_stream_id()
            client.send_headers(stream_id, [(":method", "GET"), (":path", f"/stream/{200 * MIB}"),
                                            (":scheme", "http"), (":authority", "echo.test")], end_stream=True)
        sock.sendall(client.data_to_send())
        time.sleep(3)  # and read nothing
        assert all(_ok(stack) for _ in range(10))  # others are served meanwhile
        growth_kb = rss_high_water_kb(worker) - before
    finally:
        sock.close()
    assert growth_kb < 8 * 1024, f"the worker grew by {growth_kb} KiB for one client that reads nothing"


def test_an_http2_ping_flood_from_a_client_that_does_not_read_is_cut_off(stack):
    worker = stack["worker"]
    before = rss_kb(worker)
    reset_rss_high_water(worker)
    sock, client = _h2_client(stack["port"])
    closed = False
    try:
        for n in range(200_000):  # bounded: the connection is closed long before
            client.ping(n.to_bytes(8, "big"))
            try:
                sock.sendall(client.data_to_send())
            except OSError:
                closed = True
                break
    finally:
        sock.close()
    assert closed, "tidegate kept reading a flood of PINGs"
    assert rss_high_water_kb(worker) - before < 4 * 1024
    assert _ok(stack)


def _raw_h2(port: int) -> socket.socket:
    """A connection that has sent the preface and an empty SETTINGS: frames are written by hand from here."""
    sock = socket.create_connection((GW, port), timeout=5)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(0x4, 0, 0, b""))
    return sock


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _flood_frames(sock: socket.socket, frame: bytes, count: int) -> bool:
    """Send `frame` up to `count` times (in batches); whether tidegate closed the connection (during the
    flood, or within 2 s of its end)."""
    per_batch = max(1, 65536 // len(frame))
    batch = frame * per_batch
    try:
        for _ in range(0, count, per_batch):
            sock.sendall(batch)
    except OSError:
        return True
    sock.settimeout(2)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def test_endless_continuation_frames_are_cut_off_with_flat_memory(stack):
    """HEADERS without END_HEADERS, then CONTINUATION frames that never end (CVE-2024-27316's shape): h2 keeps
    64 at most, the connection is closed, the worker's memory stays flat, other clients are answered."""
    worker = stack["worker"]
    before = rss_kb(worker)
    reset_rss_high_water(worker)
    sock = _raw_h2(stack["port"])
    encoder = hpack.Encoder()
    head = encoder.encode([(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "echo.test")])
    field = hpack.Encoder().encode([("x-a", "a" * 8000)], huffman=False)  # one field, 8 KB, in each frame
    try:
        sock.sendall(_frame(0x1, 0, 1, head))  # HEADERS without END_HEADERS
        closed = _flood_frames(sock, _frame(0x9, 0, 1, field), 40_000)  # 320 MB if all were kept
    finally:
        sock.close()
    assert closed
    assert rss_high_water_kb(worker) - before < 8 * 1024, "CONTINUATION frames were kept"
    assert _ok(stack)


def test_a_settings_flood_is_cut_off(stack):
    worker = stack["worker"]
    before = rss_kb(worker)
    reset_rss_high_water(worker)
    sock = _raw_h2(stack["port"])
    received = b""
    try:
        frame = _frame(0x4, 0, 0, b"\x00\x03\x00\x00\x00\x64")  # SETTINGS_MAX_CONCURRENT_STREAMS = 100
        try:
            for _ in range(100):  # bounded: 100,000 frames, sent at once
                sock.sendall(frame * 1000)
        except OSError:
            pass
        sock.settimeout(3)
        try:  # what tidegate answered: SETTINGS ACKs, then a GOAWAY, then the end
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
    finally:
        sock.close()
    frames, at = [], 0
    while at + 9 <= len(received):
        length, kind = int.from_bytes(received[at:at + 3], "big"), received[at + 3]
        frames.append((kind, received[at + 9:at + 9 + length]))
        at += 9 + length
    goaway = [payload for kind, payload in frames if kind == 0x7]
    assert goaway and int.from_bytes(goaway[0][4:8], "big") == 0xB, "no GOAWAY ENHANCE_YOUR_CALM"  # 11
    # Frames are counted a read at a time (h2 has answered a whole read's SETTINGS before the count is
    # looked at): the burst of 1,000, plus what a few reads hold; not the 100,000 sent.
    acks = sum(1 for kind, _ in frames if kind == 0x4)
    assert acks < 20_000, f"{acks} SETTINGS answered before the connection was closed"
    assert rss_high_water_kb(worker) - before < 4 * 1024
    assert _ok(stack)


def test_a_thousand_slowloris_connections_are_closed_at_the_head_deadline_while_others_are_served(short):
    """1,000 connections each trickling a request head: all are closed at the 1 s deadline (--request-head-timeout),
    and a normal client is answered meanwhile, each request in well under the deadline."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    socks = []
    try:
        for _ in range(1000):
            sock = socket.create_connection((GW, short["port"]), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: echo.test\r\n")
            socks.append(sock)
        started = time.monotonic()
        slowest = 0.0
        for n in range(12):  # 1.2 s of bytes, a byte per connection every 0.1 s, and a normal request each time
            for sock in socks:
                try:
                    sock.send(b"X")
                except OSError:
                    pass
            asked = time.monotonic()
            assert request(GW, short["port"], "/", headers={"Host": "echo.test"}, timeout=5)[0] == 200
            slowest = max(slowest, time.monotonic() - asked)
            time.sleep(max(0.0, started + (n + 1) * 0.1 - time.monotonic()))
        closed = 0
        deadline = time.monotonic() + 5
        for sock in socks:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                answer = sock.recv(65536)
                closed += answer == b"" or answer.startswith(b"HTTP/1.1 408 ")
            except OSError:
                closed += 1
        assert closed == 1000, closed
        assert slowest < 0.5, slowest
    finally:
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- deadlines ------------------------------------------------------------------------------------------
# A tidegate of its own with short deadlines, so that each runs out within the test.
SHORT = ["--request-head-timeout", "1", "--request-body-timeout", "1", "--idle-timeout", "2", "--send-timeout", "1",
         "--upstream-read-timeout", "1"]


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("deadlines")
    port, pod_port, hang_port = free_port(GW), free_port(POD), free_port("127.0.15.2")
    config = tmp / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        http_gateway(GW, port) + service("echo", [(POD, pod_port, "pod")])
        + service("hang", [("127.0.15.2", hang_port, "hang")])
        + route("echo", "echo.test", "- backendRefs: [{name: echo, port: 80}]")
        + route("hang", "hang.test", "- backendRefs: [{name: hang, port: 80}]"))
    with echo_servers({(POD, pod_port): "default/pod"}, tmp / "echo.log"), \
            scripted_backends(("127.0.15.2", hang_port, "hang")) as (hang,), \
            tidegate_run(config, (GW, port), tmp / "tidegate.log", *SHORT):
        hang.mode = "hang"
        yield {"port": port}


def _drip(port: int, head: bytes, drip: bytes, seconds: float) -> tuple[bytes, float]:
    """Send `head`, then one byte of `drip` every 0.2 s: what comes back, and after how long it closed."""
    started = time.monotonic()
    with socket.create_connection((GW, port), timeout=seconds) as sock:
        sock.sendall(head)
        answer = b""
        for byte in drip * 100:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.2)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            answer += chunk
            if not chunk:
                break
            if time.monotonic() - started > seconds:
                break
    return answer, time.monotonic() - started


def test_a_request_head_sent_a_byte_at_a_time_gets_408(short):
    answer, took = _drip(short["port"], b"GET / HTTP/1.1\r\nHost: echo.test\r\n", b"X-Slow: lorisss\r\n", 10)
    assert answer.startswith(b"HTTP/1.1 408 ") and took < 4, (answer[:80], took)


def test_a_request_body_sent_a_byte_at_a_time_gets_408(short):
    head = b"POST / HTTP/1.1\r\nHost: echo.test\r\nContent-Length: 100000\r\n\r\n"
    answer, took = _drip(short["port"], head, b"abcdefgh", 10)
    assert answer.startswith(b"HTTP/1.1 408 ") and took < 5, (answer[:80], took)


def test_an_idle_kept_alive_connection_is_closed(short):
    with socket.create_connection((GW, short["port"]), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed by tidegate
        assert 1.5 < time.monotonic() - started < 6


def test_a_pod_that_never_answers_gets_the_request_a_504(short):
    started = time.monotonic()
    status, _, body = request(GW, short["port"], "/", headers={"Host": "hang.test"}, timeout=10)
    assert status == 504 and time.monotonic() - started < 4, body
    h2_status = h2_request(GW, short["port"], "hang.test", "/", timeout=10)[0]
    assert h2_status == 504


def test_a_client_that_stops_reading_its_answer_is_cut_off(short):
    with socket.create_connection((GW, short["port"]), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /stream/%d HTTP/1.1\r\nHost: echo.test\r\n\r\n" % (500 * MIB))
        time.sleep(4)  # read nothing: tidegate's socket fills, then the send deadline runs out
        received, started = 0, time.monotonic()
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except OSError:  # reset
            pass
    assert received < 100 * MIB and time.monotonic() - started < 5


def test_an_http2_connection_that_opens_no_stream_is_closed(short):
    sock, client = _h2_client(short["port"])
    with sock:
        sock.settimeout(10)
        started = time.monotonic()
        events = []
        while chunk := sock.recv(65536):
            events += client.receive_data(chunk)
        assert 1.5 < time.monotonic() - started < 6
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


def test_at_the_file_descriptor_limit_tidegate_says_so_and_accepts_again_when_they_free_up(stack):
    import subprocess

    worker = stack["worker"]
    assert _ok(stack)
    in_use = len(os.listdir(f"/proc/{worker}/fd"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    subprocess.run(["prlimit", f"--pid={worker}", f"--nofile={in_use + 40}:{hard}"], check=True, timeout=10)
    clients = []
    try:
        for _ in range(80):  # bounded: twice what the worker has left
            sock = socket.create_connection((GW, stack["port"]), timeout=5)
            clients.append(sock)
        wait_until(lambda: "file descriptors nearly exhausted" in stack["log"].read_text(), timeout=5,
                   what=f"a warning in the log ({len(os.listdir(f'/proc/{worker}/fd'))} open of {in_use + 40})")
        metrics = request("127.0.0.1", stack["admin"], "/metrics")[2].decode()
        assert 'tidegate_limit_hits_total{limit="file-descriptors"}' in metrics
    finally:
        for sock in clients:
            sock.close()
        try:
            wait_until(lambda: _ok(stack), timeout=10, what="accepting again once descriptors freed up")
        finally:
            subprocess.run(["prlimit", f"--pid={worker}", f"--nofile={hard}:{hard}"], check=False, timeout=10)


def test_http2_streams_with_a_window_of_zero_cost_a_few_mib(stack):
    worker = stack["worker"]
    assert _ok(stack)
    before = rss_kb(worker)
    reset_rss_high_water(worker)
    sock, client = _h2_client(stack["port"])
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    try:
        for _ in range(100):  # each asks the pod for 50 MB, and may receive none of it
            stream_id = client.get_next_available_stream_id()
            client.send_headers(stream_id, [(":method", "GET"), (":path", f"/stream/{50 * MIB}"),
                                            (":scheme", "http"), (":authority", "echo.test")], end_stream=True)
        sock.sendall(client.data_to_send())
        time.sleep(3)
        assert all(_ok(stack) for _ in range(10))
        growth_kb = rss_high_water_kb(worker) - before
    finally:
        sock.close()
    assert growth_kb < 8 * 1024, f"the worker grew by {growth_kb} KiB for 100 streams with a window of 0"


def test_an_http2_request_body_sent_a_byte_at_a_time_gets_408(short):
    sock, client = _h2_client(short["port"])
    started = time.monotonic()
    events: list = []
    with sock:
        client.send_headers(1, [(":method", "POST"), (":path", "/"), (":scheme", "http"), (":authority", "echo.test"),
                                ("content-length", "100000")])
        sock.sendall(client.data_to_send())
        sock.settimeout(0.3)
        while time.monotonic() - started < 10 and not any(isinstance(e, h2.events.ResponseReceived) for e in events):
            try:
                client.send_data(1, b"x")
                sock.sendall(client.data_to_send())
                events += client.receive_data(sock.recv(65536))
            except TimeoutError:
                continue
            except Exception:  # the stream was reset or closed
                break
    [response] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(response.headers)[b":status"] == b"408" and time.monotonic() - started < 5
