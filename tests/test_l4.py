"""TCP, UDP and TLS passthrough: TCPRoute, UDPRoute and TLSRoute end to end, with `tidegate run` as a real
process and pods that are sockets of the test's own on loopback; and the ClientHello reader on its own."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.certs import ca_and_leaves, tls_secret_pem_yaml
from tests.harness import free_port, request, tidegate_run, wait_until
from tests.manifests import backend_policy, gateway
from tidegate import ir
from tidegate.dataplane.l4 import L4Table, NotTLS, client_hello_server_name

GW = "127.0.0.1"
POD_A, POD_B, POD_C = "127.0.13.1", "127.0.13.2", "127.0.13.3"


# -- the ClientHello reader -------------------------------------------------------------------------------

def client_hello(server_name: str | None) -> bytes:
    """The first bytes Python's TLS client sends (OpenSSL's ClientHello)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def in_records(hello: bytes, size: int) -> bytes:
    """The same handshake message cut into records of at most `size` bytes (TLS allows it)."""
    body = hello[5:]
    out = b""
    for at in range(0, len(body), size):
        piece = body[at:at + size]
        out += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
    return out


def test_the_server_name_is_read_from_a_client_hello():
    assert client_hello_server_name(client_hello("DB.Example.com")) == (True, "db.example.com")
    assert client_hello_server_name(client_hello(None)) == (True, "")
    hello = client_hello("db.example.com")
    assert client_hello_server_name(in_records(hello, 50)) == (True, "db.example.com")
    for cut in (0, 3, 5, 40, len(hello) - 1):
        assert client_hello_server_name(hello[:cut]) == (False, "")
    for cut in (5, 60, len(in_records(hello, 50)) - 1):
        assert client_hello_server_name(in_records(hello, 50)[:cut]) == (False, "")


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n\r\n", b"SSH-2.0-OpenSSH_9.6\r\n",
                                  b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
                                  b"\x16\x03\x01\x00\x00"])  # an empty record
def test_what_is_not_a_client_hello_is_refused(data):
    with pytest.raises(NotTLS):
        client_hello_server_name(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_the_client_hello_reader_takes_any_bytes(noise, at):
    """Garbage, or a real ClientHello with bytes overwritten: an answer or NotTLS, never another error."""
    hello = bytearray(client_hello("db.example.com"))
    at = min(at, len(hello))
    hello[at:at + len(noise)] = noise
    for data in (noise, bytes(hello)):
        try:
            complete, name = client_hello_server_name(data)
        except NotTLS:
            continue
        assert isinstance(complete, bool) and isinstance(name, str)


def test_a_server_name_picks_the_exact_then_the_longest_wildcard_then_the_catch_all():
    def r(name: str, *hosts: str, created: str = "") -> ir.L4Route:
        return ir.L4Route(name=name, source=name, hostnames=hosts, created=created)

    table = L4Table([r("wide", "*.example.com"), r("narrow", "*.db.example.com"), r("exact", "db.example.com"),
                     r("any-new", created="2026-02-01T00:00:00Z"), r("any-old", created="2026-01-01T00:00:00Z")])
    assert table.for_server_name("db.example.com").name == "exact"
    assert table.for_server_name("a.db.example.com").name == "narrow"
    assert table.for_server_name("x.y.example.com").name == "wide"
    assert table.for_server_name("example.com").name == "any-old"
    assert table.for_server_name("").name == "any-old"
    assert table.first.name == "any-old"
    assert L4Table([r("only", "a.test")]).for_server_name("b.test") is None


# -- pods ------------------------------------------------------------------------------------------------

class TCPPod:
    """A TCP server on its own thread. It greets each connection with its name, then answers each line
    with `name: line` (but resets the connection on "RESET"); when the client half-closes, it says how many
    bytes it read and closes."""

    def __init__(self, address: str, name: str, tls: ssl.SSLContext | None = None):
        self.name, self.tls = name, tls
        self.sock = socket.create_server((address, 0))
        self.address, self.port = address, self.sock.getsockname()[1]
        self.connections = 0
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            conn.settimeout(10)
            conn.sendall(f"hello from {self.name}\n".encode())
            read, pending = 0, b""
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                read += len(data)
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line == b"RESET":  # go away with a reset, not a close
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    conn.sendall(self.name.encode() + b": " + line + b"\n")
            conn.sendall(f"{self.name} read {read} bytes\n".encode())
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping = True
        self.sock.close()


class UDPPod:
    """Answers each datagram with `name: datagram`."""

    def __init__(self, address: str, name: str):
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.address, self.port = address, self.sock.getsockname()[1]
        self.peers: set[tuple] = set()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65536)
            except OSError:
                return
            self.peers.add(peer)
            self.sock.sendto(self.name.encode() + b": " + data, peer)

    def stop(self) -> None:
        self.sock.close()


@contextmanager
def pods(*made) -> Iterator[tuple]:
    try:
        yield made
    finally:
        for pod in made:
            pod.stop()


def l4_service(name: str, pods: list, protocol: str = "TCP", port: int = 9000) -> str:
    """A Service of one port and its EndpointSlice. Every pod listens on its own port, so each gets a slice."""
    out = textwrap.dedent(f"""
    ---
    apiVersion: v1
    kind: Service
    metadata: {{name: {name}, namespace: default}}
    spec: {{ports: [{{name: main, port: {port}, protocol: {protocol}}}]}}
    """)
    for i, pod in enumerate(pods):
        out += textwrap.dedent(f"""
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {{name: {name}-{i}, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
        addressType: IPv4
        ports: [{{name: main, port: {pod.port}, protocol: {protocol}}}]
        endpoints: [{{addresses: [{pod.address}], targetRef: {{kind: Pod, name: {pod.name}}}}}]
        """)
    return out


def l4_route(kind: str, name: str, section: str, backends: str, hostnames: str = "",
             created: str = "") -> str:
    version = "v1alpha2" if kind in ("TCPRoute", "UDPRoute") else "v1"
    stamp = f", creationTimestamp: '{created}'" if created else ""
    return textwrap.dedent(f"""
    ---
    apiVersion: gateway.networking.k8s.io/{version}
    kind: {kind}
    metadata: {{name: {name}, namespace: default{stamp}}}
    spec:
      parentRefs: [{{name: gw, sectionName: {section}}}]
      {f"hostnames: {hostnames}" if hostnames else ""}
      rules:
        - backendRefs: {backends}
    """)


class Client:
    """A TCP client of the gateway that reads line by line."""

    def __init__(self, port: int):
        self.sock = socket.create_connection((GW, port), timeout=5)
        self.file = self.sock.makefile("rb")

    def line(self) -> str:
        return self.file.readline().decode().rstrip("\n")

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def scraped(proxy) -> dict[tuple[str, frozenset], float]:
    """The L4 samples of /metrics: (sample name, its labels) → value."""
    text = request("127.0.0.1", proxy.admin_port, "/metrics")[2].decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) if family.name.startswith("tidegate_l4")
            for sample in family.samples}


def l4_metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scraped_at(proxy, name: str, value: float, **labels: str) -> dict[tuple[str, frozenset], float]:
    """The L4 samples once `name{labels}` reads `value`: workers report their counts every second."""
    def reached() -> dict | None:
        samples = scraped(proxy)
        return samples if l4_metric(samples, name, **labels) == value else None

    return wait_until(reached, what=f"{name} {labels} at {value}")


def write_config(tmp_path, text: str):
    """The test's config folder for `tidegate run -f`, holding `text` as all.yaml."""
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    (config / "all.yaml").write_text(text)
    return config


def json_log(tmp_path) -> tuple[str, ...]:
    """`tidegate run` arguments for a JSON access log in the test's folder."""
    return ("--access-log", "json", "--access-log-file", str(tmp_path / "access.log"))


def access_lines(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]


def greeted_by(port: int, pod: str) -> bool:
    """Does a new connection through the gateway get `pod`'s greeting?"""
    client = Client(port)
    try:
        return client.line() == f"hello from {pod}"
    finally:
        client.close()


# -- TCP -------------------------------------------------------------------------------------------------

def test_tcp_relays_both_ways_spreads_connections_and_half_closes(tmp_path):
    port = free_port(GW)
    with pods(TCPPod(POD_A, "pod-a"), TCPPod(POD_B, "pod-b"), TCPPod(POD_C, "pod-c")) as (a, b, c):
        dead = free_port(POD_C)  # nothing listens there: each connection sent to it goes to another pod
        config = write_config(tmp_path,
            gateway(GW, f"[{{name: db, port: {port}, protocol: TCP}}]")
            + l4_service("db", [a, b]) + l4_service("other", [c])
            + textwrap.dedent(f"""
            ---
            apiVersion: discovery.k8s.io/v1
            kind: EndpointSlice
            metadata: {{name: db-dead, namespace: default, labels: {{kubernetes.io/service-name: db}}}}
            addressType: IPv4
            ports: [{{name: main, port: {dead}, protocol: TCP}}]
            endpoints: [{{addresses: [{POD_C}]}}]
            """)
            + l4_route("TCPRoute", "db", "db", "[{name: db, port: 9000}]", created="2026-01-01T00:00:00Z")
            # Attached to the same listener but newer: the Gateway API gives the listener to the oldest.
            + l4_route("TCPRoute", "newer", "db", "[{name: other, port: 9000}]", created="2026-02-01T00:00:00Z"))
        with tidegate_run(config, (GW, port), tmp_path / "tidegate.log", *json_log(tmp_path)) as proxy:
            greetings = []
            for _ in range(6):
                client = Client(port)
                greetings.append(client.line())  # the pod speaks first: nothing was sent yet
                client.send("one\ntwo\n")
                assert [client.line(), client.line()] == [greetings[-1][11:] + ": one", greetings[-1][11:] + ": two"]
                client.send("three")
                client.sock.shutdown(socket.SHUT_WR)  # half-closed: the answer still comes back
                assert client.line() == greetings[-1][11:] + " read 13 bytes"
                assert client.line() == ""  # and then the pod's close reaches the client
                client.close()
            assert sorted(set(greetings)) == ["hello from pod-a", "hello from pod-b"]
            assert c.connections == 0

            # A large transfer both ways (flow control on both sides).
            client = Client(port)
            client.line()
            payload = ("x" * 1000 + "\n") * 3000
            sender = threading.Thread(target=client.send, args=(payload,))
            sender.start()
            answers = [client.line() for _ in range(3000)]
            sender.join(10)
            assert len(answers) == 3000 and all(line.endswith("x" * 1000) for line in answers)
            client.close()

            route = {"listener": "default/gw/db", "route": "tcproute/default/db/rule/0", "protocol": "tcp"}
            scraped_at(proxy, "tidegate_l4_connections_total", 8, **route)
            samples = scraped_at(proxy, "tidegate_l4_open_connections", 0, **route)
            # 7, and the harness's check that the port is open
            assert l4_metric(samples, "tidegate_l4_connections_total", **route) == 8
            assert l4_metric(samples, "tidegate_l4_bytes_total", **route, direction="in") == 6 * 13 + 3000 * 1001
            assert l4_metric(samples, "tidegate_l4_bytes_total", **route, direction="out") > 3000 * 1008
            assert not [k for k in samples if k[0] == "tidegate_l4_refused_total"]
        # One access log line per connection, when it ends.
        lines = access_lines(tmp_path)
        assert len(lines) == 8
        small = [line for line in lines if line["bytes_in"] == 13]
        # (the 3 MB client closes with the pod's last line unread: its kernel answers that with a reset)
        assert len(small) == 6 and all(line["outcome"] == "closed" and line["bytes_out"] > 30 and line["protocol"] == "tcp"
                                       and line["route"] == "tcproute/default/db/rule/0"
                                       and line["listener"] == "default/gw/db" and line["client"] == "127.0.0.1"
                                       and line["endpoint"] in (f"{POD_A}:{a.port}", f"{POD_B}:{b.port}")
                                       for line in small)


def test_resets_on_either_side_are_passed_on_and_cleaned_up(tmp_path):
    port = free_port(GW)
    with pods(TCPPod(POD_A, "pod-a")) as (a,):
        config = write_config(tmp_path,
            gateway(GW, f"[{{name: db, port: {port}, protocol: TCP}}]") + l4_service("db", [a])
            + l4_route("TCPRoute", "db", "db", "[{name: db, port: 9000}]"))
        with tidegate_run(config, (GW, port), tmp_path / "tidegate.log", *json_log(tmp_path)) as proxy:
            # The pod resets: so does tidegate, to the client.
            client = Client(port)
            assert client.line() == "hello from pod-a"
            client.send("RESET\n")
            with pytest.raises(ConnectionResetError):
                while client.sock.recv(100):
                    pass
            client.close()
            # The client resets in the middle: the pod's side is let go too.
            for _ in range(3):
                client = Client(port)
                assert client.line() == "hello from pod-a"
                client.send("half a line")
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
            route = {"listener": "default/gw/db", "route": "tcproute/default/db/rule/0", "protocol": "tcp"}
            wait_until(lambda: l4_metric(scraped(proxy), "tidegate_l4_open_connections", **route) == 0,
                       what="every relay let go")
            assert greeted_by(port, "pod-a") and proxy.poll() is None
        lines = access_lines(tmp_path)
        assert [line["outcome"] for line in lines if line["bytes_in"] == len("RESET\n")] == ["reset"], lines
        # A client's reset reaches tidegate as an error, or (when the kernel has handed the error out
        # already) as the end of its bytes; either way the relay ends and the pod's side is let go.
        client_resets = [line["outcome"] for line in lines if line["bytes_in"] == len("half a line")]
        assert len(client_resets) == 3 and set(client_resets) <= {"reset", "closed"}, lines


def test_a_tcp_route_change_applies_to_new_connections_and_spares_open_ones(tmp_path):
    port = free_port(GW)
    with pods(TCPPod(POD_A, "pod-a"), TCPPod(POD_B, "pod-b")) as (a, b):
        base = (gateway(GW, f"[{{name: db, port: {port}, protocol: TCP}}]") + l4_service("a", [a])
                + l4_service("b", [b]))
        config = write_config(tmp_path, base + l4_route("TCPRoute", "db", "db", "[{name: a, port: 9000}]"))
        with tidegate_run(config, (GW, port), tmp_path / "tidegate.log"):
            before = Client(port)
            assert before.line() == "hello from pod-a"
            (config / "all.yaml").write_text(base + l4_route("TCPRoute", "db", "db", "[{name: b, port: 9000}]"))
            wait_until(lambda: greeted_by(port, "pod-b"), what="new connections to go to pod-b")
            before.send("still here\n")
            assert before.line() == "pod-a: still here"
            before.close()


def test_idle_connections_close_source_ip_sticks_and_a_removed_listener_drains(tmp_path):
    port, http_port = free_port(GW), free_port(GW)
    with pods(TCPPod(POD_A, "pod-a"), TCPPod(POD_B, "pod-b")) as (a, b):
        rest = (l4_service("db", [a, b]) + l4_route("TCPRoute", "db", "db", "[{name: db, port: 9000}]")
                + backend_policy("db", "db", """
                    loadBalancer: {type: ConsistentHash, consistentHash: {type: SourceIP}}
                    timeouts: {idle: 1s}"""))
        http = f"{{name: http, port: {http_port}, protocol: HTTP}}"
        config = write_config(tmp_path, gateway(GW, f"[{{name: db, port: {port}, protocol: TCP}}, {http}]") + rest)
        with tidegate_run(config, (GW, http_port), tmp_path / "tidegate.log", *json_log(tmp_path)):
            wait_until(lambda: greeted_by(port, "pod-a") or greeted_by(port, "pod-b"), what="the TCP listener")
            # SourceIP: every connection from this address reaches the same pod.
            greetings = set()
            for _ in range(8):
                client = Client(port)
                greetings.add(client.line())
                client.close()
            assert len(greetings) == 1, greetings
            # No byte either way for longer than timeouts.idle: both sides are closed.
            idle = Client(port)
            assert idle.line() in greetings
            assert idle.line() == ""  # within the client's 5 s read timeout
            idle.close()
            # A reload removes the listener: new connections are refused, an open one goes on, on its old
            # configuration, idle timeout included.
            kept = Client(port)
            assert kept.line() in greetings
            (config / "all.yaml").write_text(gateway(GW, f"[{http}]") + rest)

            def refused() -> bool:
                try:
                    socket.create_connection((GW, port), timeout=1).close()
                except ConnectionRefusedError:
                    return True
                return False

            wait_until(refused, what="the removed listener to close")
            kept.send("still\n")
            assert kept.line().endswith(": still")
            assert kept.line() == ""  # idle again: closed, though its listener is gone
            kept.close()
        idle_closed = [line for line in access_lines(tmp_path) if line["outcome"] == "idle-timeout"]
        assert len(idle_closed) == 2, idle_closed


def test_tcp_connections_over_a_services_max_connections_are_closed(tmp_path):
    port = free_port(GW)
    with pods(TCPPod(POD_A, "pod-a")) as (a,):
        config = write_config(tmp_path,
            gateway(GW, f"[{{name: db, port: {port}, protocol: TCP}}]") + l4_service("db", [a])
            + l4_route("TCPRoute", "db", "db", "[{name: db, port: 9000}]")
            + backend_policy("cap", "db", "circuitBreaker: {maxConnections: 2}"))
        with tidegate_run(config, (GW, port), tmp_path / "tidegate.log") as proxy:
            first, second = Client(port), Client(port)
            assert first.line() == second.line() == "hello from pod-a"
            third = Client(port)
            assert third.line() == ""  # closed without a byte from the pod
            third.close()
            first.close()
            wait_until(lambda: greeted_by(port, "pod-a"), what="a connection to be let in once one has closed")
            second.close()
            # The third, and any the wait above made before the first close was seen
            wait_until(lambda: l4_metric(scraped(proxy), "tidegate_l4_refused_total", listener="default/gw/db",
                                         reason="max-connections") >= 1, what="the refusal counted")


# -- TLS passthrough --------------------------------------------------------------------------------------

def test_tls_passthrough_routes_by_sni_and_the_pod_terminates(tmp_path):
    port = free_port(GW)
    ca, ((cert_a, key_a), (cert_b, key_b)) = ca_and_leaves([["db.example.com"], ["*.example.com", "a.b.example.com"]])

    def server_context(cert: bytes, key: bytes) -> ssl.SSLContext:
        (tmp_path / "pem").write_bytes(cert + key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "pem")
        return ctx

    with pods(TCPPod(POD_A, "pod-a", server_context(cert_a, key_a)),
              TCPPod(POD_B, "pod-b", server_context(cert_b, key_b))) as (a, b):
        config = write_config(tmp_path,
            gateway(GW, f"[{{name: tls, port: {port}, protocol: TLS, tls: {{mode: Passthrough}}}}]")
            + l4_service("a", [a]) + l4_service("b", [b])
            + l4_route("TLSRoute", "exact", "tls", "[{name: a, port: 9000}]", "[db.example.com]")
            + l4_route("TLSRoute", "wild", "tls", "[{name: b, port: 9000}]", "['*.example.com']"))
        client_ctx = ssl.create_default_context(cadata=ca.decode())
        with tidegate_run(config, (GW, port), tmp_path / "tidegate.log", *json_log(tmp_path)) as proxy:
            for name, pod in (("db.example.com", "pod-a"), ("www.example.com", "pod-b"),
                              ("a.b.example.com", "pod-b")):
                with socket.create_connection((GW, port), timeout=5) as raw, \
                        client_ctx.wrap_socket(raw, server_hostname=name) as tls:
                    # The certificate checked is the pod's: tidegate holds none and decrypts nothing.
                    tls_file = tls.makefile("rb")
                    assert tls_file.readline() == f"hello from {pod}\n".encode()
                    tls.sendall(b"ping\n")
                    assert tls_file.readline() == f"{pod}: ping\n".encode()
                    tls_file.close()
            # No route for the name, no name at all, or no TLS: the connection is closed.
            for name in ("other.org", None):
                with socket.create_connection((GW, port), timeout=5) as raw:
                    ctx = ssl.create_default_context()
                    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                    with pytest.raises((ssl.SSLError, OSError)):
                        ctx.wrap_socket(raw, server_hostname=name)
            with socket.create_connection((GW, port), timeout=5) as raw:
                raw.sendall(b"GET / HTTP/1.1\r\nHost: db.example.com\r\n\r\n")
                assert raw.recv(100) == b""
            assert proxy.poll() is None
            log = (tmp_path / "tidegate.log").read_text()
            assert "no TLSRoute for server name 'other.org'" in log and "not a TLS handshake" in log
            samples = scraped_at(proxy, "tidegate_l4_refused_total", 1, listener="default/gw/tls", reason="not-tls")
            for reason, count in (("no-route", 2), ("not-tls", 1)):
                assert l4_metric(samples, "tidegate_l4_refused_total", listener="default/gw/tls", reason=reason) == count
            assert l4_metric(samples, "tidegate_l4_connections_total", listener="default/gw/tls",
                             route="tlsroute/default/wild/rule/0", protocol="tls-passthrough") == 2
        outcomes = sorted((line["sni"], line["route"], line["outcome"]) for line in access_lines(tmp_path))
        assert outcomes == [
            ("", "", "closed"),  # the harness's check that the port is open: gone before a ClientHello
            ("", "", "no-route"),  # no server name, and no route for any name
            ("", "", "not-tls"),
            ("a.b.example.com", "tlsroute/default/wild/rule/0", "closed"),
            ("db.example.com", "tlsroute/default/exact/rule/0", "closed"),
            ("other.org", "", "no-route"),
            ("www.example.com", "tlsroute/default/wild/rule/0", "closed")], outcomes


def test_tls_terminate_routes_by_sni_and_relays_in_clear(tmp_path):
    port = free_port(GW)
    ca, ((cert, key),) = ca_and_leaves([["term.example.com", "other.example.com"]])
    with pods(TCPPod(POD_A, "pod-a"), TCPPod(POD_B, "pod-b")) as (a, b):
        config = write_config(tmp_path,
            gateway(GW, f"[{{name: tls, port: {port}, protocol: TLS, "
                        f"tls: {{mode: Terminate, certificateRefs: [{{name: cert}}]}}}}]")
            + "---\n" + tls_secret_pem_yaml("default", "cert", cert, key)
            + l4_service("a", [a]) + l4_service("b", [b])
            + l4_route("TLSRoute", "term", "tls", "[{name: a, port: 9000}]", "[term.example.com]")
            + l4_route("TLSRoute", "other", "tls", "[{name: b, port: 9000}]", "[other.example.com]"))
        client_ctx = ssl.create_default_context(cadata=ca.decode())
        with tidegate_run(config, (GW, port), tmp_path / "tidegate.log") as proxy:
            for name, pod in (("term.example.com", "pod-a"), ("other.example.com", "pod-b")):
                with socket.create_connection((GW, port), timeout=5) as raw, \
                        client_ctx.wrap_socket(raw, server_hostname=name) as tls:
                    assert tls.selected_alpn_protocol() is None  # bytes, not HTTP: no h2 offered
                    tls_file = tls.makefile("rb")
                    # The pod speaks plain TCP: tidegate holds the certificate and decrypts.
                    assert tls_file.readline() == f"hello from {pod}\n".encode()
                    tls.sendall(b"ping\n")
                    assert tls_file.readline() == f"{pod}: ping\n".encode()
                    tls_file.close()
            # A name the certificate covers but no route does: the handshake completes, then the close.
            ctx = ssl.create_default_context(cadata=ca.decode())
            ctx.check_hostname = False
            with socket.create_connection((GW, port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="nothing.example.com") as tls:
                assert tls.recv(100) == b""
            assert proxy.poll() is None
            assert "no TLSRoute for server name 'nothing.example.com'" in (tmp_path / "tidegate.log").read_text()


# -- UDP -------------------------------------------------------------------------------------------------

def test_udp_sessions_keep_to_one_pod_and_end_when_idle(tmp_path):
    port, http_port = free_port(GW), free_port(GW)
    with pods(UDPPod(POD_A, "pod-a"), UDPPod(POD_B, "pod-b")) as (a, b):
        config = write_config(tmp_path,
            gateway(GW, f"[{{name: dns, port: {port}, protocol: UDP}}, {{name: http, port: {http_port}, "
                        f"protocol: HTTP}}]")
            + l4_service("dns", [a, b], protocol="UDP")
            + l4_route("UDPRoute", "dns", "dns", "[{name: dns, port: 9000}]")
            + backend_policy("idle", "dns", "timeouts: {idle: 1s}"))
        with tidegate_run(config, (GW, http_port), tmp_path / "tidegate.log", *json_log(tmp_path)) as proxy:
            wait_until(lambda: f"listening on {GW}:{port} (UDP)" in (tmp_path / "tidegate.log").read_text(),
                       what="the UDP listener")
            clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
            try:
                answered_by = []
                for i, client in enumerate(clients):
                    client.settimeout(5)
                    replies = set()
                    for n in range(3):
                        client.sendto(f"q{i}.{n}".encode(), (GW, port))
                        data, source = client.recvfrom(1000)
                        assert source == (GW, port)  # from the listener's address, as a client expects
                        who, _, text = data.decode().partition(": ")
                        assert text == f"q{i}.{n}"
                        replies.add(who)
                    assert len(replies) == 1  # one client, one session, one pod
                    answered_by.append(replies.pop())
                assert set(answered_by) == {"pod-a", "pod-b"}
                # A session has its own socket: a pod sees one peer per client, none of them the client.
                assert len(a.peers) + len(b.peers) == 4
                # After the idle timeout the session is gone; the next datagram opens a new one.
                time.sleep(3)
                clients[0].sendto(b"again", (GW, port))
                assert clients[0].recvfrom(1000)[0].endswith(b": again")
                assert len(a.peers) + len(b.peers) == 5
                route = {"listener": "default/gw/dns", "route": "udproute/default/dns/rule/0", "protocol": "udp"}
                samples = scraped_at(proxy, "tidegate_l4_connections_total", 5, **route)
                assert l4_metric(samples, "tidegate_l4_open_connections", **route) == 1
                for direction in ("in", "out"):
                    assert l4_metric(samples, "tidegate_l4_datagrams_total", **route, direction=direction) == 13
            finally:
                for client in clients:
                    client.close()
            assert proxy.poll() is None
        # Four sessions ended idle, the fifth with the stop; each line counts its datagrams both ways.
        lines = access_lines(tmp_path)
        assert sorted(line["outcome"] for line in lines) == ["idle-timeout"] * 4 + ["shutdown"]
        assert sum(line["datagrams_in"] for line in lines) == sum(line["datagrams_out"] for line in lines) == 13
        assert all(line["protocol"] == "udp" and line["route"] == "udproute/default/dns/rule/0" for line in lines)


def test_tcp_and_udp_with_two_workers(tmp_path):
    """Each worker opens the L4 sockets too (SO_REUSEPORT), and /metrics adds their counts up."""
    port, http_port = free_port(GW), free_port(GW)
    with pods(TCPPod(POD_A, "pod-a"), UDPPod(POD_B, "pod-b")) as (a, b):
        config = write_config(tmp_path,
            gateway(GW, f"[{{name: db, port: {port}, protocol: TCP}}, {{name: dns, port: {port}, protocol: UDP}}, "
                        f"{{name: http, port: {http_port}, protocol: HTTP}}]")
            + l4_service("db", [a]) + l4_service("dns", [b], protocol="UDP")
            + l4_route("TCPRoute", "db", "db", "[{name: db, port: 9000}]")
            + l4_route("UDPRoute", "dns", "dns", "[{name: dns, port: 9000}]"))
        with tidegate_run(config, (GW, http_port), tmp_path / "tidegate.log", "--workers", "2") as proxy:
            wait_until(lambda: request("127.0.0.1", proxy.admin_port, "/readyz")[0] == 200, what="both workers")
            for _ in range(10):
                client = Client(port)
                assert client.line() == "hello from pod-a"
                client.close()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(5)
                udp.sendto(b"q", (GW, port))  # the same port number as the TCP listener: UDP is apart
                assert udp.recvfrom(100)[0] == b"pod-b: q"
            tcp = {"listener": "default/gw/db", "route": "tcproute/default/db/rule/0", "protocol": "tcp"}
            wait_until(lambda: l4_metric(scraped(proxy), "tidegate_l4_connections_total", **tcp) == 10,
                       what="both workers' connections counted")
            assert l4_metric(scraped(proxy), "tidegate_l4_connections_total", listener="default/gw/dns",
                             route="udproute/default/dns/rule/0", protocol="udp") == 1
