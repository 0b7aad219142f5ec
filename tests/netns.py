"""A small bare-metal lab in network namespaces, made and removed by the tests that use it: a bridge in a
"lan" namespace, node namespaces and a client namespace each joined to it by a veth pair, with addresses from
198.18.0.0/24 and 2001:db8::/64 that exist only inside them. Needs root (tests skip with a reason otherwise).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SUBNET4, SUBNET6 = "198.18.0.", "2001:db8::"
CLONE_NEWNET = 0x40000000


def can_make_namespaces() -> str:
    """"" when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    name = f"tgprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


class CommandFailed(OSError):
    """A command exited non-zero. An OSError, so that `wait_until` takes a client that could not connect yet
    (inside a namespace) as "not yet", as it does for a connection refused in the test process itself."""


def sh(*args: str, check: bool = True) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise CommandFailed(f"{' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


@dataclass
class Lab:
    prefix: str
    hosts: dict[str, int] = field(default_factory=dict)  # namespace role -> host number (198.18.0.N)
    pods: dict[str, int] = field(default_factory=dict)  # pod role -> its network's number (10.244.N.2)

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def v4(self, role: str) -> str:
        return f"{SUBNET4}{self.hosts[role]}"

    def v6(self, role: str) -> str:
        return f"{SUBNET6}{self.hosts[role]}"

    def pod_v4(self, role: str) -> str:
        return f"{POD4}{self.pods[role]}.2"

    def pod_v6(self, role: str) -> str:
        return f"{POD6}{self.pods[role]}::2"

    def run(self, role: str, *args: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", self.ns(role), *args, check=check)

    def exec_args(self, role: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *args]

    def python(self, role: str, code: str) -> str:
        return self.run(role, sys.executable, "-c", code)

    def get_json(self, role: str, url: str) -> dict:
        return json.loads(self.python(role, f"import urllib.request;print(urllib.request.urlopen({url!r}, "
                                                "timeout=5).read().decode())"))

    def link(self, role: str, up: bool) -> None:
        """Cut (or mend) a namespace's link at the bridge."""
        sh("ip", "netns", "exec", self.ns("lan"), "ip", "link", "set", f"v{role}", "up" if up else "down")

    def pids(self, role: str) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", self.ns(role)).split()]

    @contextmanager
    def forwarded(self, role: str, port: int) -> Iterator[int]:
        """A port on 127.0.0.1 here that leads to 127.0.0.1:`port` inside `role`'s namespace (for a browser
        run by the test to reach an admin listener there). One thread moves into that namespace (setns acts
        on the calling thread alone) and opens the inner connections; bounded: 500 connections at most."""
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        stop = threading.Event()
        failed: list[str] = []

        def pipe(source: socket.socket, sink: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    sink.sendall(data)
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

        def serve() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.ns(role)}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    failed.append(os.strerror(ctypes.get_errno()))
                    return
            finally:
                os.close(fd)
            served = 0
            while not stop.is_set() and served < 500:
                try:
                    outer, _ = listener.accept()
                except TimeoutError:
                    continue
                served += 1
                try:
                    inner = socket.create_connection(("127.0.0.1", port), timeout=5)
                except OSError:
                    outer.close()
                    continue
                inner.settimeout(None)
                for a, b in ((outer, inner), (inner, outer)):
                    threading.Thread(target=pipe, args=(a, b), daemon=True).start()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            thread.join(5)
            listener.close()
        assert not failed, f"setns into {self.ns(role)}: {failed[0]}"


SECOND4 = "198.19.0."  # a second segment, for the interface tests
POD4, POD6 = "10.244.", "fd00:244:"  # pod networks behind a node: 10.244.N.0/24 and fd00:244:N::/64


def _pod_behind(world: Lab, pod: str, node: str, number: int) -> None:
    """A pod namespace wired to its node as a CNI does: a veth pair, the node's end as its gateway."""
    outside = f"p{pod}"[:15]
    world.run(node, "ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", world.ns(pod))
    world.run(node, "ip", "addr", "add", f"{POD4}{number}.1/24", "dev", outside)
    world.run(node, "ip", "-6", "addr", "add", f"{POD6}{number}::1/64", "dev", outside, "nodad")
    world.run(node, "ip", "link", "set", outside, "up")
    world.run(pod, "ip", "addr", "add", f"{POD4}{number}.2/24", "dev", "eth0")
    world.run(pod, "ip", "-6", "addr", "add", f"{POD6}{number}::2/64", "dev", "eth0", "nodad")
    world.run(pod, "ip", "link", "set", "eth0", "up")
    world.run(pod, "ip", "route", "add", "default", "via", f"{POD4}{number}.1")
    world.run(pod, "ip", "-6", "route", "add", "default", "via", f"{POD6}{number}::1")


@contextmanager
def lab(roles: dict[str, int], second: dict[str, int] | None = None,
        pods: dict[str, str] | None = None) -> Iterator[Lab]:
    """Namespaces `{prefix}-{role}` for each role (host number in the subnets), joined by a bridge; the roles
    of `second` (new ones or the same) also get an eth1 on a second bridge, in 198.19.0.0/24; each pod of
    `pods` (pod role -> node role) is a namespace behind its node, in a network of its own (Lab.pod_v4)."""
    pods = pods or {}
    world = Lab(f"tg{os.getpid() % 100000}", dict(roles), {pod: n for n, pod in enumerate(pods, start=1)})
    second = second or {}
    made: list[str] = []
    try:
        for role in ["lan", *roles, *(r for r in second if r not in roles), *pods]:
            sh("ip", "netns", "add", world.ns(role))
            made.append(world.ns(role))
            world.run(role, "ip", "link", "set", "lo", "up")
            for key in ("all", "default"):
                world.run(role, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0")
        world.run("lan", "ip", "link", "add", "br0", "type", "bridge")
        world.run("lan", "ip", "link", "set", "br0", "up")
        for role, host in roles.items():
            outside = f"v{role}"
            world.run("lan", "ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns",
                      world.ns(role))
            world.run("lan", "ip", "link", "set", outside, "master", "br0", "up")
            world.run(role, "ip", "addr", "add", f"{SUBNET4}{host}/24", "dev", "eth0")
            world.run(role, "ip", "-6", "addr", "add", f"{SUBNET6}{host}/64", "dev", "eth0", "nodad")
            world.run(role, "ip", "link", "set", "eth0", "up")
        if second:
            world.run("lan", "ip", "link", "add", "br1", "type", "bridge")
            world.run("lan", "ip", "link", "set", "br1", "up")
        for role, host in second.items():
            world.run("lan", "ip", "link", "add", f"w{role}", "type", "veth", "peer", "name", "eth1", "netns",
                      world.ns(role))
            world.run("lan", "ip", "link", "set", f"w{role}", "master", "br1", "up")
            world.run(role, "ip", "addr", "add", f"{SECOND4}{host}/24", "dev", "eth1")
            world.run(role, "ip", "link", "set", "eth1", "up")
        for pod, node in pods.items():
            _pod_behind(world, pod, node, world.pods[pod])
        yield world
    finally:
        for name in made:
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
        time.sleep(0.1)
        for name in reversed(made):
            sh("ip", "netns", "del", name, check=False)


# A probe run in the client namespace: every `interval` seconds, an HTTP GET over TCP and a UDP datagram to
# each target; one JSON line per attempt: when it was sent, target, protocol, and the pod that answered or "".
PROBE = r"""
import json, socket, sys, time
targets = json.loads(sys.argv[1]); interval = float(sys.argv[2]); stop = sys.argv[3]
import os
while not os.path.exists(stop):
    started = time.time()
    for host, tcp_port, udp_port in targets:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        answer = ""
        sent = time.time()
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(0.3)
                s.connect((host, tcp_port))
                s.sendall(b"GET /pod HTTP/1.0\r\nHost: probe\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"HTTP/1.0 200"):
                    answer = data.split(b"\r\n\r\n", 1)[1].decode().strip()
        except OSError:
            pass
        print(json.dumps({"t": sent, "host": host, "proto": "tcp", "pod": answer}), flush=True)
        answer = ""
        sent = time.time()
        if udp_port:
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.settimeout(0.3)
                    s.sendto(b"who", (host, udp_port))
                    answer = s.recv(512).decode()
            except OSError:
                pass
            print(json.dumps({"t": sent, "host": host, "proto": "udp", "pod": answer}), flush=True)
    time.sleep(max(0.0, interval - (time.time() - started)))
"""

# A pod: a stock HTTP server (the standard library's) serving /pod, and a UDP echo that answers its name.
POD = r"""
import http.server, os, socket, sys, threading
name, address, tcp_port, udp_port, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
os.makedirs(root, exist_ok=True)
open(os.path.join(root, "pod"), "w").write(name)
family = socket.AF_INET6 if ":" in address else socket.AF_INET
udp = socket.socket(family, socket.SOCK_DGRAM)
udp.bind((address, udp_port))
def echo():
    while True:
        _, peer = udp.recvfrom(512)
        udp.sendto(name.encode(), peer)
threading.Thread(target=echo, daemon=True).start()
class Server(http.server.ThreadingHTTPServer):
    address_family = family
    def server_bind(self):  # without HTTPServer's getfqdn: no DNS in a namespace, its lookup would stall
        import socketserver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = address, tcp_port
handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=root)
http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
Server((address, tcp_port), handler).serve_forever()
"""


def read_probes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
