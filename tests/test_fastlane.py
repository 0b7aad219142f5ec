"""The fast lane (dataplane/fastlane.py) through real sockets: what it must do as the full path does, and the
cases only it has (a reused keep-alive connection the endpoint dropped, a client leaving mid-exchange, answers
made synchronously between pipelined requests)."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.harness import free_port, request, tidegate_run, wait_until
from tests.manifests import http_gateway, route, service
from tests.scripted import ScriptedBackend, scripted_backends

GW = "127.0.0.1"


def _config(tmp: Path, port: int, pods: list[tuple[str, int, str]]) -> Path:
    """A plain rule (no filters, no policy: the fast lane's kind) on host app.test."""
    config = tmp / "config"
    config.mkdir(exist_ok=True)
    (config / "all.yaml").write_text(http_gateway(GW, port) + service("app", pods)
                                     + route("app", "app.test", "- backendRefs: [{name: app, port: 80}]"))
    return config


@contextmanager
def _one_pod(tmp: Path, address: str) -> Iterator[tuple[ScriptedBackend, int, subprocess.Popen]]:
    """A scripted pod on `address` behind tidegate's plain rule: (the pod, tidegate's port, tidegate)."""
    port, pod_port = free_port(GW), free_port(address)
    pods = [(address, pod_port, "pod-a")]
    with scripted_backends(*pods) as (pod,), tidegate_run(_config(tmp, port, pods), (GW, port),
                                                          tmp / "tidegate.log") as proxy:
        yield pod, port, proxy


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in a byte stream of Content-Length delimited responses."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
        if len(rest) < length:
            raise ValueError("the last response is not all in yet")
        out.append((int(lines[0].split()[1]), rest[:length]))
        data = rest[length:]
    return out


def _read_until(sock: socket.socket, count: int, timeout: float = 10.0) -> bytes:
    """Read until `count` whole responses are in."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            if len(_responses(data)) >= count:
                return data
        except (StopIteration, ValueError, IndexError):
            pass  # a response is still partial
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_a_reused_connection_the_endpoint_dropped_is_tried_again_on_a_new_one(tmp_path):
    """The endpoint closes a kept-alive connection just as tidegate reuses it (it read the request and
    answered nothing). A GET may be sent again: the client sees 200, not 502."""
    with _one_pod(tmp_path, "127.0.9.1") as (pod, port, proxy):
        pod.mode = "drop-reused"
        statuses = [request(GW, port, "/", headers={"Host": "app.test"})[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    # 1: a new connection, answered and kept. 2 and 3: the kept one is reused and dropped (seen, unanswered),
    # then a new connection answers.
    assert pod.requests == 5


def test_over_http2_a_reused_connection_the_endpoint_dropped_is_tried_again_on_a_new_one(tmp_path):
    """HTTP/2's fast lane (http2.H2FastExchange) hands the stream to the full way, which sends it again."""
    from tests.harness import h2_request

    with _one_pod(tmp_path, "127.0.9.7") as (pod, port, proxy):
        pod.mode = "drop-reused"
        statuses = [h2_request(GW, port, "app.test", "/")[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert pod.requests == 5  # as over HTTP/1.1


def test_an_answer_that_is_not_http_is_a_502_and_the_request_is_not_sent_again(tmp_path):
    """Unlike a connection closed unanswered, a reply that is not HTTP came from an endpoint that got the
    request: as with nginx's default proxy_next_upstream, it is not sent again."""
    with _one_pod(tmp_path, "127.0.9.5") as (pod, port, proxy):
        pod.mode = "garbage-reused"
        statuses = [request(GW, port, "/", headers={"Host": "app.test"})[0] for _ in range(2)]
    assert statuses == [200, 502]
    assert pod.requests == 2


def test_over_http2_an_answer_that_is_not_http_is_a_502(tmp_path):
    from tests.harness import h2_request

    with _one_pod(tmp_path, "127.0.9.8") as (pod, port, proxy):
        pod.mode = "garbage-reused"
        statuses = [h2_request(GW, port, "app.test", "/")[0] for _ in range(2)]
    assert statuses == [200, 502]
    assert pod.requests == 2


def test_pipelined_requests_are_answered_in_order(tmp_path):
    """Four requests in one write: two go to the pod, one gets a 404 made on the spot, one goes to the pod
    again. Answers come back in request order."""
    with _one_pod(tmp_path, "127.0.9.2") as (pod, port, proxy):
        request(GW, port, "/warm", headers={"Host": "app.test"})  # a kept connection: later ones take the fast lane
        burst = b"".join(f"GET /{name} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
                         for name, host in (("one", "app.test"), ("two", "app.test"), ("none", "other.test"),
                                            ("three", "app.test")))
        with socket.create_connection((GW, port), timeout=10) as sock:
            sock.sendall(burst)
            answers = _responses(_read_until(sock, 4))
            # A 404 alone (answered before its parse is over), then more: the connection still reads.
            sock.sendall(b"GET /none HTTP/1.1\r\nHost: other.test\r\n\r\n")
            answers += _responses(_read_until(sock, 1))
            sock.sendall(b"GET /four HTTP/1.1\r\nHost: app.test\r\n\r\n")
            answers += _responses(_read_until(sock, 1, timeout=3))
    assert [status for status, _ in answers] == [200, 200, 404, 200, 404, 200]
    paths = [json.loads(body)["path"] for status, body in answers if status == 200]
    assert paths == ["/one", "/two", "/three", "/four"]


def test_a_client_that_leaves_mid_exchange_costs_the_endpoint_nothing(tmp_path):
    """The client hangs up (a reset) while the pod is still sending its answer: the pod's requests in flight
    go back to zero, no failure is counted against it, and the next request is served. And before that: the
    answer's head reaches the client before its body exists."""
    with _one_pod(tmp_path, "127.0.9.3") as (pod, port, proxy):
        assert request(GW, port, "/", headers={"Host": "app.test"})[0] == 200
        pod.mode, pod.slow_seconds, pod.first_chunk_delay = "trickle", 3.0, 1.5
        with socket.create_connection((GW, port), timeout=1.0) as sock:
            sock.sendall(b"GET /long HTTP/1.1\r\nHost: app.test\r\n\r\n")
            # The head comes at once, though its body is not there yet: a streamed answer is not held back.
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset

        def endpoint() -> dict:
            view = json.loads(request("127.0.0.1", proxy.admin_port, "/api/v1/backends")[2])
            return view["backends"][0]["endpoints"][0]

        settled = wait_until(lambda: (lambda e: e if e["active"] == 0 else None)(endpoint()), timeout=2.5,
                             what="no request in flight, well before the pod's answer ends")
        pod.mode = "ok"
        assert request(GW, port, "/", headers={"Host": "app.test"})[0] == 200
    assert settled["failures"] == 0, settled


def test_an_answer_that_ends_with_the_connection_is_passed_on_whole(tmp_path):
    """On a reused connection the pod answers without a length and closes to end the body (HTTP/1.0 style),
    naming a header hop-by-hop in Connection: the client gets the whole body, delimited its own way, and
    not the hop-by-hop header."""
    with _one_pod(tmp_path, "127.0.9.4") as (pod, port, proxy):
        pod.mode = "close-delimited"
        first = request(GW, port, "/one", headers={"Host": "app.test"})
        second = request(GW, port, "/two", headers={"Host": "app.test"})
        third = request(GW, port, "/three", headers={"Host": "app.test"})  # a new connection: the last one closed
    assert [first[0], second[0], third[0]] == [200, 200, 200]
    assert json.loads(second[2]) == {"pod": "pod-a", "path": "/two"}
    assert "x-hop" not in second[1] and "connection" not in second[1]
    assert json.loads(third[2])["path"] == "/three"


def test_an_interim_103_from_the_pod_is_not_taken_for_its_answer(tmp_path):
    """The pod sends 103 Early Hints, then its answer: over HTTP/1.1 and HTTP/2, on fresh and reused
    endpoint connections, each client gets its own 200 (the 103 is not passed on), and the endpoint
    connection is not put back before the real answer has ended."""
    from tests.harness import h2_request

    with _one_pod(tmp_path, "127.0.9.6") as (pod, port, proxy):
        pod.mode = "early-hints"
        with socket.create_connection((GW, port), timeout=10) as sock:
            for i in range(4):
                sock.sendall(b"GET /h1/%d HTTP/1.1\r\nHost: app.test\r\n\r\n" % i)
                [(status, body)] = _responses(_read_until(sock, 1))
                assert status == 200 and json.loads(body)["path"] == f"/h1/{i}"
        for i in range(4):
            status, _, body = h2_request(GW, port, "app.test", f"/h2/{i}")
            assert status == 200 and json.loads(body)["path"] == f"/h2/{i}"


def test_split_head_keeps_end_to_end_headers_as_they_came():
    from tidegate.dataplane.upstream import split_head

    lines, length, chunked = split_head(b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5\r\n"
                                        b"Keep-Alive: timeout=5\r\nConnection: keep-alive, X-Private\r\n"
                                        b"X-Private: secret\r\nSet-Cookie: a=b;  Path=/")
    assert lines == [b"Server: x", b"Content-Length: 5", b"Set-Cookie: a=b;  Path=/"]
    assert (length, chunked) == (5, False)
    assert split_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked") == ([], None, True)


def test_the_fast_request_head_is_the_full_ones():
    """plain_request_head (forwarding headers made once per connection and host) writes exactly what
    http1.request_head writes, whatever forwarding headers the client sent."""
    from tidegate.dataplane.fastlane import plain_request_head
    from tidegate.dataplane.http1 import ClientConnection, Exchange, request_head

    cases = [
        [("Host", "app.test"), ("User-Agent", "curl"), ("Accept", "*/*")],
        [("Host", "app.test:8080"), ("X-Forwarded-For", "10.1.1.1"), ("Via", "1.0 edge")],
        [("Host", "app.test"), ("Connection", "keep-alive, X-Private"), ("X-Private", "1"), ("Keep-Alive", "5")],
        [("Host", "other.test"), ("Forwarded", "for=10.0.0.9"), ("X-Forwarded-Proto", "https")],
    ]
    for peer in ("127.0.0.1", "::1"):
        conn = ClientConnection(lambda: None, 80)
        conn.peer = peer
        for headers in cases * 2:  # the second time with the connection's kept forwarding headers
            ex = Exchange()
            ex.method, ex.headers = "GET", list(headers)
            lower = ex.lowered()
            host = lower["host"]
            assert plain_request_head(conn, ex, host, "/p?q=1") == request_head(
                ex, ex.headers, host, "/p?q=1", peer, "http", host)
