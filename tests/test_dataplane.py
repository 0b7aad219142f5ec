"""The HTTP/1.1 data plane end to end: tidegate and echo backends as real processes on loopback."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import (
    echo_servers,
    free_port,
    raw_exchange,
    request,
    reset_rss_high_water,
    rss_high_water_kb,
    rss_kb,
    tidegate_run,
    wait_until,
    worker_pid,
)
from tests.manifests import DEFAULT_INGRESS_CLASS, gateway, http_gateway, route, service

GW_ADDR = "127.0.0.1"
POD_A, POD_B, POD_M = "127.0.0.2", "127.0.0.3", "127.0.0.4"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dataplane")
    echo_port, gw_port, dead_port = free_port(POD_A), free_port(GW_ADDR), free_port(POD_A)
    config = tmp / "config"
    config.mkdir()
    base = http_gateway(GW_ADDR, gw_port)
    base += service("both", [(POD_A, echo_port, "pod-a"), (POD_B, echo_port, "pod-b")])
    base += service("a", [(POD_A, echo_port, "pod-a")]) + service("b", [(POD_B, echo_port, "pod-b")])
    base += service("mirror", [(POD_M, echo_port, "pod-m")])
    base += service("empty", []) + service("dead", [(POD_A, dead_port, "dead")])
    base += route("echo", "echo.test", "- backendRefs: [{name: both, port: 80}]")
    base += route("slow", "slow.test", """
        - backendRefs: [{name: a, port: 80}]
          timeouts: {request: 1s, backendRequest: 500ms}""")
    base += route("redirect", "redirect.test", """
        - filters:
            - type: RequestRedirect
              requestRedirect: {scheme: https, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}""")
    base += route("headers", "headers.test", """
        - filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: X-Env, value: prod}], add: [{name: X-Add, value: two}], remove: [X-Debug]}
            - type: ResponseHeaderModifier
              responseHeaderModifier: {add: [{name: X-Served-By, value: tidegate}], remove: [X-Content-Type-Options]}
          backendRefs: [{name: a, port: 80}]""")
    base += route("rewrite", "rewrite.test", """
        - matches: [{path: {type: PathPrefix, value: /api}}]
          filters:
            - type: URLRewrite
              urlRewrite: {hostname: backend.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
          backendRefs: [{name: a, port: 80}]""")
    base += route("weights", "weights.test", """
        - backendRefs: [{name: a, port: 80, weight: 3}, {name: b, port: 80, weight: 1}]""")
    base += route("mirror", "mirror.test", """
        - filters:
            - type: RequestMirror
              requestMirror: {backendRef: {name: mirror, port: 80}}
          backendRefs: [{name: a, port: 80}]""")
    base += route("invalid", "invalid.test", "- backendRefs: [{name: ghost, port: 80}]")
    base += route("empty", "empty.test", "- backendRefs: [{name: empty, port: 80}]")
    base += route("dead", "dead.test", "- backendRefs: [{name: dead, port: 80}]")
    base += route("nobackend", "nobackend.test", "- matches: [{path: {type: PathPrefix, value: /}}]")
    (config / "config.yaml").write_text(base)
    pods = {(POD_A, echo_port): "default/pod-a", (POD_B, echo_port): "default/pod-b",
            (POD_M, echo_port): "default/pod-m"}
    with echo_servers(pods, tmp / "echo.log"), \
            tidegate_run(config, (GW_ADDR, gw_port), tmp / "tidegate.log") as proxy:
        yield {"port": gw_port, "config": config, "echo_log": tmp / "echo.log", "proxy": proxy,
               "echo_port": echo_port, "tmp": tmp}


def get(stack, host: str, path: str = "/", **kw):
    headers = {"Host": host, **kw.pop("headers", {})}
    return request(GW_ADDR, stack["port"], path, headers=headers, **kw)


def test_request_reaches_a_pod_with_forwarding_headers(stack):
    status, headers, body = get(stack, "echo.test", "/hello?x=1", headers={"X-Forwarded-For": "10.9.9.9"})
    assert status == 200
    echoed = json.loads(body)
    assert echoed["path"] == "/hello?x=1" and echoed["host"] == "echo.test" and echoed["method"] == "GET"
    assert echoed["pod"] in ("pod-a", "pod-b") and echoed["namespace"] == "default"
    assert echoed["headers"]["X-Forwarded-For"] == ["10.9.9.9, 127.0.0.1"]
    assert echoed["headers"]["X-Forwarded-Proto"] == ["http"]
    assert echoed["headers"]["Via"] == ["1.1 tidegate"]
    assert echoed["headers"]["Forwarded"] == ["for=127.0.0.1;proto=http;host=echo.test"]


def test_round_robin_reaches_both_pods_directly(stack):
    pods = {json.loads(get(stack, "echo.test")[2])["pod"] for _ in range(6)}
    assert pods == {"pod-a", "pod-b"}


def test_errors_follow_the_spec(stack):
    assert get(stack, "unknown.test")[0] == 404
    assert get(stack, "invalid.test")[0] == 500
    assert get(stack, "nobackend.test")[0] == 500
    assert get(stack, "empty.test")[0] == 503
    assert get(stack, "dead.test")[0] == 502
    status, _, body = get(stack, "slow.test", "/?delay=3s")
    assert status == 504


def test_redirect_and_header_filters(stack):
    status, headers, _ = get(stack, "redirect.test", "/old/page?q=1")
    assert status == 301 and headers["location"] == "https://redirect.test/new/old/page?q=1"
    status, headers, body = get(stack, "headers.test", "/", headers={"X-Debug": "1", "X-Add": "one", "X-Env": "dev"})
    echoed = json.loads(body)
    assert echoed["headers"]["X-Env"] == ["prod"] and "X-Debug" not in echoed["headers"]
    assert echoed["headers"]["X-Add"] == ["one,two"]
    assert headers["x-served-by"] == "tidegate" and "x-content-type-options" not in headers


def test_url_rewrite_changes_host_and_path_prefix(stack):
    echoed = json.loads(get(stack, "rewrite.test", "/api/users?id=7")[2])
    assert echoed["host"] == "backend.internal" and echoed["path"] == "/v2/users?id=7"


def test_weights_split_traffic(stack):
    pods = [json.loads(get(stack, "weights.test")[2])["pod"] for _ in range(40)]
    assert pods.count("pod-a") == 30 and pods.count("pod-b") == 10


def test_mirror_sends_a_copy_and_ignores_its_answer(stack):
    marker = f"/mirrored-{time.monotonic_ns()}"
    status, _, body = get(stack, "mirror.test", marker)
    assert status == 200 and json.loads(body)["pod"] == "pod-a"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if f"default/pod-m GET {marker}" in stack["echo_log"].read_text():
            break
        time.sleep(0.05)
    assert f"default/pod-m GET {marker}" in stack["echo_log"].read_text()


def test_keep_alive_connection_serves_many_requests(stack):
    import http.client

    conn = http.client.HTTPConnection(GW_ADDR, stack["port"], timeout=5)
    try:
        for i in range(5):
            conn.request("GET", f"/k{i}", headers={"Host": "echo.test"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["path"] == f"/k{i}"
        conn.request("HEAD", "/head", headers={"Host": "echo.test"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
        conn.request("POST", "/post", body=b"x" * 1000, headers={"Host": "echo.test"})
        resp = conn.getresponse()
        assert json.loads(resp.read())["bodySize"] == 1000
    finally:
        conn.close()


def test_chunked_upload_and_expect_continue(stack):
    def chunks():
        for _ in range(10):
            yield b"y" * 10000

    status, _, body = get(stack, "echo.test", "/up", method="POST", body=chunks(), chunked=True,
                          headers={"Transfer-Encoding": "chunked"})
    assert status == 200 and json.loads(body)["bodySize"] == 100000
    import socket

    with socket.create_connection((GW_ADDR, stack["port"]), timeout=5) as s:
        s.sendall(b"POST /e HTTP/1.1\r\nHost: echo.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n"
                  b"Connection: close\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"  # sent before any body byte
        s.sendall(b"abc")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b'"bodySize": 3' in reply


@pytest.mark.parametrize("probe,status", [
    (b"POST / HTTP/1.1\r\nHost: echo.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: echo.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
    (b"POST / HTTP/1.1\r\nHost: echo.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: echo.test\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: echo.test\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: echo.test\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nUser-Agent: no-host\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: echo.test\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: echo.test\r\n\r\n", 414),
    (b"GET / HTTP/9.9\r\nHost: echo.test\r\n\r\n", 400),
])
def test_malformed_requests_are_refused_and_never_forwarded(stack, probe, status):
    marker = f"/probe-{time.monotonic_ns()}"
    probe = probe.replace(b" / HTTP", f" {marker} HTTP".encode(), 1)
    reply = raw_exchange(GW_ADDR, stack["port"], probe)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    time.sleep(0.1)
    assert marker not in stack["echo_log"].read_text()


def test_large_bodies_stream_without_growing_memory(stack):
    pid = worker_pid(stack["proxy"])
    get(stack, "echo.test", "/warm")
    before = rss_kb(pid)
    reset_rss_high_water(pid)
    size = 200 * 1024 * 1024

    def upload():
        block = b"z" * (1024 * 1024)
        for _ in range(size // len(block)):
            yield block

    status, _, body = get(stack, "echo.test", "/upload", method="POST", body=upload(),
                          headers={"Content-Length": str(size)}, timeout=60)
    assert status == 200 and json.loads(body)["bodySize"] == size
    import http.client

    conn = http.client.HTTPConnection(GW_ADDR, stack["port"], timeout=60)
    conn.request("GET", f"/stream/{size}", headers={"Host": "echo.test"})
    resp = conn.getresponse()
    received = 0
    while chunk := resp.read(1024 * 1024):
        received += len(chunk)
    conn.close()
    assert received == size
    growth_mb = (rss_high_water_kb(pid) - before) / 1024
    assert growth_mb < 50, f"peak RSS grew by {growth_mb:.1f} MB while streaming 2 x 200 MB"


def test_reload_swaps_routes_without_failing_a_request(stack):
    config: Path = stack["config"] / "extra.yaml"
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def load() -> None:
        import http.client

        conn = http.client.HTTPConnection(GW_ADDR, stack["port"], timeout=5)
        deadline = time.monotonic() + 20
        while not stop.is_set() and done[0] < 3000 and time.monotonic() < deadline:
            try:
                conn.request("GET", "/during-reload", headers={"Host": "echo.test"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    failures.append(str(resp.status))
            except Exception as exc:  # any failure counts
                failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(GW_ADDR, stack["port"], timeout=5)
            done[0] += 1
        conn.close()

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(0.3)
    config.write_text(route("late", "late.test", "- backendRefs: [{name: b, port: 80}]"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and get(stack, "late.test")[0] != 200:
        time.sleep(0.1)
    late = get(stack, "late.test")
    config.write_text("this: is: not: valid: yaml\n")  # a broken edit changes nothing that serves
    time.sleep(0.5)
    still = get(stack, "late.test")
    stop.set()
    worker.join(30)
    config.unlink()
    assert late[0] == 200 and json.loads(late[2])["pod"] == "pod-b"
    assert still[0] == 200
    assert done[0] > 20 and failures == []


def test_sigterm_lets_requests_in_flight_finish(tmp_path):
    import signal

    echo_port, gw_port = free_port(POD_A), free_port(GW_ADDR)
    config = tmp_path / "config"
    config.mkdir()
    (config / "c.yaml").write_text(http_gateway(GW_ADDR, gw_port) + service("a", [(POD_A, echo_port, "pod-a")]) + route("r", "slow.test", "- backendRefs: [{name: a, port: 80}]"))
    result: list = []
    with echo_servers({(POD_A, echo_port): "default/pod-a"}, tmp_path / "echo.log"):
        with tidegate_run(config, (GW_ADDR, gw_port), tmp_path / "tidegate.log") as proxy:
            worker = threading.Thread(target=lambda: result.append(
                request(GW_ADDR, gw_port, "/?delay=1s", headers={"Host": "slow.test"})))
            worker.start()
            time.sleep(0.3)
            proxy.send_signal(signal.SIGTERM)
            worker.join(10)
            assert proxy.wait(10) == 0
    assert result and result[0][0] == 200
    assert "in-flight requests get" in (tmp_path / "tidegate.log").read_text()


def test_a_taken_port_is_reported_and_the_other_listeners_serve(tmp_path):
    import socket as socketlib

    echo_port, free, taken = free_port(POD_A), free_port(GW_ADDR), free_port(GW_ADDR)
    blocker = socketlib.socket()
    blocker.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEADDR, 1)
    blocker.bind((GW_ADDR, taken))
    blocker.listen()
    config = tmp_path / "config"
    config.mkdir()
    listeners = f"[{{name: free, port: {free}, protocol: HTTP}}, {{name: taken, port: {taken}, protocol: HTTP}}]"
    (config / "c.yaml").write_text(gateway(GW_ADDR, listeners) + service("a", [(POD_A, echo_port, "pod-a")]) + route("r", "any.test", "- backendRefs: [{name: a, port: 80}]"))
    def taken_listener(proxy) -> dict:
        statuses = json.loads(request("127.0.0.1", proxy.admin_port, "/api/v1/status")[2])
        [gw] = [s for s in statuses if s["kind"] == "Gateway"]
        [entry] = [entry for entry in gw["status"]["listeners"] if entry["name"] == "taken"]
        return {c["type"]: c["reason"] for c in entry["conditions"]}

    def listener_open(proxy) -> str:
        metrics = request("127.0.0.1", proxy.admin_port, "/metrics")[2].decode()
        return next(line.rsplit(" ", 1)[1] for line in metrics.splitlines()
                    if line.startswith('tidegate_listener_open{listener="default/gw/taken"}'))

    try:
        with echo_servers({(POD_A, echo_port): "default/pod-a"}, tmp_path / "echo.log"):
            with tidegate_run(config, (GW_ADDR, free), tmp_path / "tidegate.log") as proxy:
                assert request(GW_ADDR, free, "/", headers={"Host": "any.test"})[0] == 200
                log = (tmp_path / "tidegate.log").read_text()
                # Readiness is per Gateway listener, not per process: the replica serves what it can.
                assert request("127.0.0.1", proxy.admin_port, "/readyz")[0] == 200
                assert taken_listener(proxy)["Accepted"] == "PortUnavailable" and listener_open(proxy) == "0.0"
                # Once the port is free, a retry opens it, and status and metrics follow.
                blocker.close()
                wait_until(lambda: request(GW_ADDR, taken, "/", headers={"Host": "any.test"})[0] == 200,
                           timeout=10, what="the freed port served")
                wait_until(lambda: taken_listener(proxy)["Accepted"] == "Accepted", what="the status mended")
                assert listener_open(proxy) == "1.0"
    finally:
        blocker.close()
    assert f"cannot listen on {GW_ADDR}:{taken}" in log
    assert "Gateway default/gw: Accepted=False PortUnavailable" in log


def test_ingress_is_served_through_the_same_data_plane(tmp_path):
    echo_port, http_port = free_port(POD_A), free_port(GW_ADDR)
    config = tmp_path / "config"
    config.mkdir()
    (config / "c.yaml").write_text(DEFAULT_INGRESS_CLASS + textwrap.dedent("""
    ---
    apiVersion: networking.k8s.io/v1
    kind: Ingress
    metadata: {name: site, namespace: default}
    spec:
      defaultBackend: {service: {name: b, port: {number: 80}}}
      rules:
        - host: "*.shop.test"
          http:
            paths:
              - {path: /cart, pathType: Exact, backend: {service: {name: a, port: {number: 80}}}}
              - {path: /api, pathType: Prefix, backend: {service: {name: a, port: {name: http}}}}
    """) + service("a", [(POD_A, echo_port, "pod-a")]) + service("b", [(POD_B, echo_port, "pod-b")]))
    pods = {(POD_A, echo_port): "default/pod-a", (POD_B, echo_port): "default/pod-b"}
    with echo_servers(pods, tmp_path / "echo.log"):
        with tidegate_run(config, (GW_ADDR, http_port), tmp_path / "tidegate.log", "--bind", GW_ADDR,
                          "--ingress-http-port", str(http_port)):
            def pod(host: str, path: str) -> str:
                status, _, body = request(GW_ADDR, http_port, path, headers={"Host": host})
                assert status == 200, (host, path, status)
                return json.loads(body)["pod"]

            assert pod("www.shop.test", "/cart") == "pod-a"
            assert pod("www.shop.test", "/cart/x") == "pod-b"  # Exact: only /cart itself
            assert pod("www.shop.test", "/api/v1") == "pod-a"
            assert pod("a.b.shop.test", "/api") == "pod-b"  # an Ingress wildcard covers one label only
            assert pod("other.test", "/") == "pod-b"  # the default backend


def test_websocket_upgrade_is_tunnelled_to_the_pod(stack):
    import socket as socketlib

    from websockets.sync.client import connect

    sock = socketlib.create_connection((GW_ADDR, stack["port"]), timeout=5)
    with connect("ws://echo.test/ws", sock=sock, open_timeout=5) as ws:
        ws.send("Websocket Support!")
        assert ws.recv(timeout=5) == "Websocket Support!"
        ws.send(bytes([1, 2, 3, 4, 5, 6, 7]))
        assert ws.recv(timeout=5) == bytes([1, 2, 3, 4, 5, 6, 7])
        big = "x" * 200_000
        ws.send(big)
        assert ws.recv(timeout=5) == big


def test_http2_with_prior_knowledge_is_served(stack):
    from tests.harness import h2_request

    status, headers, body = h2_request(GW_ADDR, stack["port"], "echo.test", "/h2?q=1")
    assert status == 200 and json.loads(body)["path"] == "/h2?q=1"
    assert json.loads(body)["host"] == "echo.test"
    status, _, body = h2_request(GW_ADDR, stack["port"], "echo.test", "/upload", method="POST", body=b"b" * 300_000)
    assert status == 200 and json.loads(body)["bodySize"] == 300_000
    size = 5 * 1024 * 1024  # more than the default flow-control windows: the proxy must wait for updates
    status, _, body = h2_request(GW_ADDR, stack["port"], "echo.test", f"/stream/{size}")
    assert status == 200 and len(body) == size
    assert h2_request(GW_ADDR, stack["port"], "unknown.test", "/")[0] == 404
    status, headers, _ = h2_request(GW_ADDR, stack["port"], "redirect.test", "/old/x")
    assert status == 301 and headers["location"] == "https://redirect.test/new/old/x"


def test_once_serving_the_startup_heap_is_frozen_and_young_collections_are_rarer():
    """freeze_startup_heap, in a process of its own: the objects of starting up leave the collector's sight,
    and the young generation is collected after 10,000 net allocations instead of Python's 700."""
    import subprocess
    import sys

    script = ("import gc, json; from tidegate.dataplane.server import freeze_startup_heap; "
              "before = gc.get_threshold(); freeze_startup_heap(); "
              "print(json.dumps([gc.get_freeze_count(), before, gc.get_threshold()]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    frozen, before, after = json.loads(out.stdout)
    assert frozen > 1000
    assert after == [10_000, before[1], before[2]] and before[0] < 10_000


@dataclass
class H2Answer:
    status: int = 0  # 0: no answer (the connection was closed)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    reset: int | None = None  # RST_STREAM's error code
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    head_ended: bool = False  # the response's HEADERS frame ended the stream


def _h2_streams(port: int, blocks: list[list[tuple[bytes, bytes]]]) -> list[H2Answer]:
    """Each header block as a request on its own stream of one h2c connection, one after another, with the
    client's own header checks off. Once the connection is closed, the blocks left get an empty answer."""
    import socket as socketlib

    import h2.config
    import h2.connection
    import h2.events

    config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                       normalize_outbound_headers=False, validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    results: list[H2Answer] = []
    with socketlib.create_connection((GW_ADDR, port), timeout=5) as sock:
        sock.sendall(conn.data_to_send())
        open_ = True
        for block in blocks:
            stream_id = conn.get_next_available_stream_id()
            answer, body = H2Answer(), bytearray()
            if open_:
                conn.send_headers(stream_id, block, end_stream=True)
                sock.sendall(conn.data_to_send())
            done = not open_
            while not done:
                chunk = sock.recv(65536)
                if not chunk:
                    open_ = False
                    break
                for event in conn.receive_data(chunk):
                    if getattr(event, "stream_id", None) != stream_id:
                        continue
                    if isinstance(event, h2.events.ResponseReceived):
                        answer.headers = dict(event.headers)
                        answer.status = int(answer.headers[b":status"])
                        answer.head_ended = event.stream_ended is not None
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                    elif isinstance(event, h2.events.TrailersReceived):
                        answer.trailers = dict(event.headers)
                    elif isinstance(event, h2.events.StreamReset):
                        answer.reset, done = int(event.error_code), True
                    elif isinstance(event, h2.events.StreamEnded):
                        done = True
                sock.sendall(conn.data_to_send())
            answer.body = bytes(body)
            results.append(answer)
    return results


def _h2_connection(port: int):
    """An h2c client connection to the gateway: (socket, h2 connection), the preface sent."""
    import socket as socketlib

    import h2.config
    import h2.connection

    sock = socketlib.create_connection((GW_ADDR, port), timeout=5)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def _h2_answers(sock, conn, wanted: set[int]) -> dict[int, H2Answer]:
    """Read until every stream in `wanted` has ended or been reset."""
    import h2.events

    answers = {stream_id: H2Answer() for stream_id in wanted}
    bodies = {stream_id: bytearray() for stream_id in wanted}
    left = set(wanted)
    while left:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed with streams {sorted(left)} unanswered"
        for event in conn.receive_data(chunk):
            stream_id = getattr(event, "stream_id", None)
            if stream_id not in answers:
                continue
            answer = answers[stream_id]
            if isinstance(event, h2.events.ResponseReceived):
                answer.headers = dict(event.headers)
                answer.status = int(answer.headers[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                bodies[stream_id] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
            elif isinstance(event, h2.events.StreamReset):
                answer.reset = int(event.error_code)
                left.discard(stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                left.discard(stream_id)
        sock.sendall(conn.data_to_send())
    for stream_id, answer in answers.items():
        answer.body = bytes(bodies[stream_id])
    return answers


def test_http2_streams_in_flight_together_each_get_their_own_answer(stack):
    """Streams that HTTP/1.1's fast lane would take (no body, a plain rule, an idle kept connection to the
    pod) are served by callbacks with no task (http2.H2FastExchange); many at once on one connection, each
    gets its own answer, with the pod's headers, and the next round reuses the pods' kept connections."""
    sock, conn = _h2_connection(stack["port"])
    with sock:
        for round_ in range(3):
            wanted = set()
            for i in range(20):
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"http"),
                                              (b":path", b"/r%d/s%d" % (round_, i)), (b":authority", b"echo.test"),
                                              (b"x-echo-set-header", b"x-stream:%d" % stream_id)],
                                  end_stream=True)
                wanted.add(stream_id)
            sock.sendall(conn.data_to_send())
            answers = _h2_answers(sock, conn, wanted)
            for stream_id, answer in answers.items():
                assert answer.status == 200 and answer.reset is None, (stream_id, answer)
                assert answer.headers[b"x-stream"] == str(stream_id).encode()
                assert answer.headers[b"content-type"].startswith(b"application/json")
                assert b"connection" not in answer.headers and b"keep-alive" not in answer.headers
                echoed = json.loads(answer.body)
                assert echoed["path"].startswith(f"/r{round_}/s")
                assert answer.headers[b"content-length"] == str(len(answer.body)).encode()
            assert len({json.loads(a.body)["path"] for a in answers.values()}) == 20


def test_an_http2_stream_reset_while_its_pod_answers_leaves_no_answer_behind(stack):
    """The client resets a stream while the pod is still answering: the pod's connection is closed, not put
    back for reuse (the late answer would come first on it), and the requests after it get their own
    answers. (It fails when the connection is put back.)"""
    import h2.errors

    sock, conn = _h2_connection(stack["port"])
    with sock:
        for _ in range(3):  # the first request of a connection to an endpoint may go the full way
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/warm"),
                                          (b":authority", b"echo.test")], end_stream=True)
            sock.sendall(conn.data_to_send())
            assert _h2_answers(sock, conn, {stream_id})[stream_id].status == 200
        slow = conn.get_next_available_stream_id()
        conn.send_headers(slow, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/slow?delay=300ms"),
                                 (b":authority", b"echo.test")], end_stream=True)
        sock.sendall(conn.data_to_send())
        time.sleep(0.1)  # the request is with the pod
        conn.reset_stream(slow, h2.errors.ErrorCodes.CANCEL)
        # At once, one to each pod (round robin), answered after the reset stream's late answer would come
        # (the echo pod answers requests on one connection as each is done).
        after = {}
        for i in range(2):
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"http"),
                                          (b":path", b"/after/%d?delay=400ms" % i), (b":authority", b"echo.test")],
                              end_stream=True)
            after[stream_id] = f"/after/{i}"
        sock.sendall(conn.data_to_send())
        answers = _h2_answers(sock, conn, set(after))
        assert {stream_id: json.loads(a.body)["path"].split("?")[0] for stream_id, a in answers.items()} == after


def test_http2_header_bytes_reach_the_pod_and_the_client_unchanged(stack):
    """Field values are bytes: a UTF-8 request header reaches the pod as the client sent it, and a response
    header set by the pod reaches the client as the pod sent it."""
    block = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/bytes"), (b":authority", b"echo.test"),
             (b"x-word", b"caf\xc3\xa9 \xe6\x97\xa5"), (b"x-echo-set-header", b"x-back:caf\xc3\xa9")]
    [answer] = _h2_streams(stack["port"], [block])
    assert answer.status == 200 and answer.reset is None
    echoed = json.loads(answer.body)["headers"]  # the pod reads header bytes as Latin-1
    assert echoed["X-Word"] == ["caf\xc3\xa9 \xe6\x97\xa5"]
    assert answer.headers[b"x-back"] == b"caf\xc3\xa9"


def test_a_malformed_http2_request_resets_its_stream_and_the_connection_serves_on(stack):
    """RFC 9113 8.1.1: a malformed request is a stream error (RST_STREAM, PROTOCOL_ERROR); the requests after
    it on the same connection are served."""
    good = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/after"), (b":authority", b"echo.test")]
    malformed = [
        good + [(b"X-Upper", b"1")],
        good + [(b"connection", b"close")],
        good + [(b"x-split", b"a\r\nx-injected: 1")],
        good + [(b"te", b"gzip")],
        good + [(b"host", b"elsewhere.test")],
        [(b":method", b"GET"), (b"x-early", b"1"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"echo.test")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"echo.test")],
    ]
    results = _h2_streams(stack["port"], malformed + [good])
    protocol_error = 1
    assert [answer.reset for answer in results[:-1]] == [protocol_error] * len(malformed)
    last = results[-1]
    assert last.status == 200 and last.reset is None and json.loads(last.body)["path"] == "/after"


def test_h2c_backends_are_spoken_to_over_http2(tmp_path):
    echo_port, gw_port = free_port(POD_A), free_port(GW_ADDR)
    config = tmp_path / "config"
    config.mkdir()
    # A GRPCRoute's Service needs no appProtocol: gRPC is HTTP/2 only, so its pods are reached with h2c.
    grpc_route = route("g", "grpc.test", "- backendRefs: [{name: plain, port: 80}]").replace("kind: HTTPRoute",
                                                                                          "kind: GRPCRoute")
    (config / "c.yaml").write_text(http_gateway(GW_ADDR, gw_port)
                                   + service("grpcish", [(POD_A, echo_port, "pod-a")], "kubernetes.io/h2c")
                                   + route("r", "h2c.test", "- backendRefs: [{name: grpcish, port: 80}]")
                                   + service("plain", [(POD_A, echo_port, "pod-a")]) + grpc_route)
    with echo_servers({(POD_A, echo_port): "default/pod-a"}, tmp_path / "echo.log"):
        with tidegate_run(config, (GW_ADDR, gw_port), tmp_path / "tidegate.log"):
            for _ in range(3):  # several requests share one HTTP/2 connection to the pod
                status, _, body = request(GW_ADDR, gw_port, "/over-h2?x=1", headers={"Host": "h2c.test"})
                echoed = json.loads(body)
                assert status == 200 and echoed["proto"] == "HTTP/2.0" and echoed["path"] == "/over-h2?x=1"
            status, _, body = request(GW_ADDR, gw_port, "/post", method="POST", body=b"p" * 200_000,
                                      headers={"Host": "h2c.test"})
            assert status == 200 and json.loads(body)["bodySize"] == 200_000
            from tests.harness import h2_request

            status, _, body = h2_request(GW_ADDR, gw_port, "h2c.test", "/h2-both-ways")  # HTTP/2 on both sides
            assert status == 200 and json.loads(body)["path"] == "/h2-both-ways"
            # What gRPC lives on: trailers after the body, and an answer that is its head alone.
            request_block = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/pkg.Svc/Call"),
                             (b":authority", b"h2c.test"), (b"content-type", b"application/grpc")]
            with_trailers, trailers_only = _h2_streams(gw_port, [
                request_block + [(b"x-echo-trailer", b"grpc-status:0,grpc-message:fine")],
                request_block + [(b"x-echo-trailers-only", b"grpc-status:5,grpc-message:not found")]])
            assert with_trailers.status == 200 and with_trailers.reset is None
            assert json.loads(with_trailers.body)["path"] == "/pkg.Svc/Call"
            assert with_trailers.trailers == {b"grpc-status": b"0", b"grpc-message": b"fine"}
            assert trailers_only.status == 200 and trailers_only.reset is None and trailers_only.head_ended
            assert trailers_only.headers[b"grpc-status"] == b"5"
            assert trailers_only.headers[b"grpc-message"] == b"not found"
            # Field bytes pass through the h2c leg unchanged, both ways (the echo pod reads them as UTF-8).
            status, _, body = request(GW_ADDR, gw_port, "/bytes", headers={"Host": "h2c.test",
                                                                          "X-Word": "caf\xc3\xa9"})  # Latin-1 text
            assert status == 200 and json.loads(body)["headers"]["X-Word"] == ["café"]
            [utf8] = _h2_streams(gw_port, [request_block + [(b"x-echo-trailer", "word:café".encode())]])
            assert utf8.trailers == {b"word": "café".encode()}
            [grpc] = _h2_streams(gw_port, [[(name, b"grpc.test" if name == b":authority" else value)
                                            for name, value in request_block]
                                           + [(b"x-echo-trailer", b"grpc-status:0")]])
            assert grpc.status == 200 and json.loads(grpc.body)["proto"] == "HTTP/2.0"
            assert grpc.trailers == {b"grpc-status": b"0"}


def test_an_early_answer_to_an_upload_keeps_the_client_connection(tmp_path):
    """The pod answers 401 before reading a 2 MB upload. tidegate passes the 401 on, reads and drops the
    rest of the body, and the same client connection then carries the next request."""
    import socket

    from tests.scripted import scripted_backends

    port, pod_port = free_port(GW_ADDR), free_port("127.0.12.1")
    config = tmp_path / "config"
    config.mkdir()
    (config / "c.yaml").write_text(http_gateway(GW_ADDR, port) + service("up", [("127.0.12.1", pod_port, "pod-u")])
                                   + route("up", "up.test", "- backendRefs: [{name: up, port: 80}]"))
    with scripted_backends(("127.0.12.1", pod_port, "pod-u")) as (pod,), \
            tidegate_run(config, (GW_ADDR, port), tmp_path / "tidegate.log"):
        pod.mode = "early"
        body = b"u" * (2 * 1024 * 1024)
        with socket.create_connection((GW_ADDR, port), timeout=10) as s:
            s.sendall(b"POST /upload HTTP/1.1\r\nHost: up.test\r\nContent-Length: %d\r\n\r\n" % len(body))
            s.sendall(body[:65536])
            first = _read_response(s)  # the answer comes while most of the body is still to be sent
            assert first.startswith(b"HTTP/1.1 401") and b"connection: close" not in first.lower(), first[:300]
            s.sendall(body[65536:])
            pod.mode = "ok"
            s.sendall(b"GET /after HTTP/1.1\r\nHost: up.test\r\n\r\n")
            second = _read_response(s)
            assert second.startswith(b"HTTP/1.1 200"), second[:200]


def _read_response(s) -> bytes:
    """One response with a Content-Length body, from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(
        b"content-length")))
    while len(rest) < length:
        rest += s.recv(65536)
    return head + b"\r\n\r\n" + rest
