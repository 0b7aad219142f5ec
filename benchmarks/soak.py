"""Soak: mixed traffic for a long time, with config changes and pod kills, watching for anything that grows.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--out benchmarks/SOAK.md]

One `tidegate run` serves three echo pods (`tidegate echo`, HTTP/1.1, h2c and WebSocket) through an HTTPRoute
with a BackendPolicy retry (connect failures, resets, gateway errors), and a TCP echo pod through a TCPRoute.
Four clients run side by side, each in a loop bounded in count and time: HTTP/1.1 keep-alive, HTTP/2 (h2c),
WebSocket (a connection per ten messages) and TCP (a connection per exchange). Every 10 s a config file
changes (a header filter and an extra route come and go); every minute one HTTP pod is killed (SIGKILL) and
started again two seconds later. Every 30 s the control process's and the worker's RSS, open descriptors and
the worker's event-loop tasks are sampled. The report is a table of the samples and a verdict: no failed
request that the retry policy covers (HTTP and WebSocket; a TCP connection cut by a reload is counted
apart), and RSS, descriptors and tasks flat between the first sample after warm-up and the last.

Not a test (it takes half an hour); traffic goes to 127.0.0.0/8 only.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import children, free_port, h2_request, rss_kb, wait_for_port  # noqa: E402
from tests.manifests import backend_policy, gateway, service  # noqa: E402

GW = "127.0.0.1"
PODS = [("127.0.3.1", "pod-a"), ("127.0.3.2", "pod-b"), ("127.0.3.3", "pod-c")]
TCP_POD = "127.0.3.4"

def base_config(port: int, tcp_port: int, pod_port: int, tcp_pod_port: int) -> str:
    """The Gateway (an HTTP and a TCP listener), the Services of the pods, the retry policy and the TCPRoute."""
    listeners = f"[{{name: http, port: {port}, protocol: HTTP}}, {{name: tcp, port: {tcp_port}, protocol: TCP}}]"
    return (gateway(GW, listeners) + service("echo", [(ip, pod_port, name) for ip, name in PODS])
            + backend_policy("echo", "echo", """
                retry: {attempts: 3, retryOn: [connect-failure, reset, gateway-error], backoff: {base: 10ms, max: 100ms},
                        budget: {percent: 100, minRetriesPerSecond: 100}}
                healthCheck:
                  passive: {consecutiveGatewayErrors: 2, baseEjectionTime: 2s, maxEjectionPercent: 50}""")
            + service("tcp", [(TCP_POD, tcp_pod_port, "tcp-pod")]) + """---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: tcp, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: tcp}]
  rules: [{backendRefs: [{name: tcp, port: 80}]}]
""")


ROUTE = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo, namespace: default}}
spec:
  parentRefs: [{{name: gw, sectionName: http}}]
  hostnames: [echo.test]
  rules:
    - backendRefs: [{{name: echo, port: 80}}]
      filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: X-Round, value: "{round}"}}]}}}}]
{extra}"""

EXTRA = """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: extra, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: http}]
  hostnames: [extra.test]
  rules: [{backendRefs: [{name: echo, port: 80}]}]
"""


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.errors: dict[str, str] = {}

    def add(self, kind: str, ok: bool, error: str = "") -> None:
        with self.lock:
            table = self.ok if ok else self.failed
            table[kind] = table.get(kind, 0) + 1
            if error:
                self.errors[kind] = error


class _TCPEcho(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


def _loop(kind: str, counts: Counts, stop: threading.Event, once) -> None:
    while not stop.is_set():
        try:
            once()
            counts.add(kind, True)
        except Exception as exc:  # counted, and the loop goes on
            counts.add(kind, False, repr(exc)[:200])
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", default="", help="also write the report to this file")
    args = parser.parse_args()
    seconds = args.minutes * 60
    tmp = Path(tempfile.mkdtemp(prefix="tidegate-soak-"))
    config = tmp / "config"
    config.mkdir()
    port, tcp_port, pod_port = free_port(GW), free_port(GW), free_port(PODS[0][0])
    tcp_server = socketserver.ThreadingTCPServer((TCP_POD, 0), _TCPEcho)
    tcp_server.daemon_threads = True
    threading.Thread(target=tcp_server.serve_forever, daemon=True).start()
    (config / "base.yaml").write_text(base_config(port, tcp_port, pod_port, tcp_server.server_address[1]))
    (config / "route.yaml").write_text(ROUTE.format(round=0, extra=""))

    def start_pod(ip: str, name: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "tidegate", "echo", "--listen", f"{ip}:{pod_port}=default/{name}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(ip, pod_port, proc)
        return proc

    pods = {name: start_pod(ip, name) for ip, name in PODS}
    admin = free_port()
    log = open(tmp / "tidegate.log", "w")
    proxy = subprocess.Popen([sys.executable, "-m", "tidegate", "run", "-f", str(config), "--admin",
                              f"127.0.0.1:{admin}"], stdout=log, stderr=subprocess.STDOUT)
    counts, stop = Counts(), threading.Event()
    samples: list[tuple] = []
    try:
        wait_for_port(GW, port, proxy, timeout=30)
        [worker] = children(proxy.pid)

        def http1() -> None:
            conn = http.client.HTTPConnection(GW, port, timeout=10)
            try:
                for _ in range(50):
                    conn.request("GET", "/soak", headers={"Host": "echo.test"})
                    response = conn.getresponse()
                    response.read()
                    if response.status != 200:
                        raise RuntimeError(f"status {response.status}")
            finally:
                conn.close()

        def http2() -> None:
            status = h2_request(GW, port, "echo.test", "/soak-h2", timeout=10)[0]
            if status != 200:
                raise RuntimeError(f"status {status}")

        def websocket() -> None:
            from websockets.sync.client import connect

            sock = socket.create_connection((GW, port), timeout=10)
            with connect(f"ws://echo.test:{port}/ws", sock=sock, open_timeout=10) as ws:
                for n in range(10):
                    ws.send(f"m{n}")
                    ws.recv(timeout=10)

        def tcp() -> None:
            with socket.create_connection((GW, tcp_port), timeout=10) as sock:
                sock.sendall(b"hello\n")
                if sock.recv(100) != b"hello\n":
                    raise RuntimeError("no echo")

        threads = [threading.Thread(target=_loop, args=(kind, counts, stop, once), daemon=True)
                   for kind, once in (("http1", http1), ("http2", http2), ("websocket", websocket), ("tcp", tcp))]
        for thread in threads:
            thread.start()

        def tasks() -> int:
            text = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
            text.request("GET", "/metrics")
            body = text.getresponse().read().decode()
            text.close()
            found = re.search(r"^tidegate_event_loop_tasks (\S+)$", body, re.MULTILINE)
            return int(float(found.group(1))) if found else -1

        started = time.monotonic()
        next_change, next_kill, next_sample, rounds, kills = started + 10, started + 60, started, 0, 0
        while time.monotonic() - started < seconds and proxy.poll() is None:
            now = time.monotonic()
            if now >= next_change:
                rounds += 1
                (config / "route.yaml").write_text(ROUTE.format(round=rounds, extra=EXTRA if rounds % 2 else ""))
                next_change += 10
            if now >= next_kill:
                ip, name = PODS[kills % len(PODS)]
                pods[name].send_signal(signal.SIGKILL)
                pods[name].wait(10)
                time.sleep(2)
                pods[name] = start_pod(ip, name)
                kills += 1
                next_kill += 60
            if now >= next_sample:
                with counts.lock:
                    ok, failed = dict(counts.ok), dict(counts.failed)
                samples.append((round(now - started), rss_kb(proxy.pid) // 1024, rss_kb(worker) // 1024,
                                len(os.listdir(f"/proc/{proxy.pid}/fd")), len(os.listdir(f"/proc/{worker}/fd")),
                                tasks(), ok, failed))
                next_sample += 30
            time.sleep(0.2)
        alive = proxy.poll() is None
    finally:
        stop.set()
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(30)
        except subprocess.TimeoutExpired:
            proxy.kill()
        for pod in pods.values():
            pod.kill()
            pod.wait(10)
        tcp_server.shutdown()
        log.close()
    report = _report(samples, counts, args.minutes, rounds, kills, alive)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0 if "verdict: flat" in report else 1


def _report(samples: list[tuple], counts: Counts, minutes: float, rounds: int, kills: int, alive: bool) -> str:
    lines = [f"# Soak: {minutes:g} minutes, {rounds} config changes, {kills} pods killed", "",
             "| s | control RSS MiB | worker RSS MiB | control fds | worker fds | worker tasks | ok | failed |",
             "|---|---|---|---|---|---|---|---|"]
    for t, control_rss, worker_rss, control_fds, worker_fds, tasks, ok, failed in samples:
        lines.append(f"| {t} | {control_rss} | {worker_rss} | {control_fds} | {worker_fds} | {tasks} | "
                     f"{sum(ok.values())} | {sum(failed.values())} |")
    lines += ["", "ok and failed count client iterations: 50 requests on one connection for HTTP/1.1, one request "
                  "for HTTP/2, ten messages on one connection for WebSocket, one exchange on a connection for TCP.",
              "", f"iterations by kind: ok {counts.ok}, failed {counts.failed}"]
    if counts.errors:
        lines.append(f"last error by kind: {counts.errors}")
    covered_failures = counts.failed.get("http1", 0) + counts.failed.get("http2", 0)
    verdict = "flat"
    if len(samples) >= 3:
        first, last = samples[1], samples[-1]  # the first sample after warm-up, and the last
        grew = {"worker RSS": last[2] > first[2] * 1.2 + 5, "control RSS": last[1] > first[1] * 1.2 + 5,
                "worker fds": last[4] > first[4] + 20, "control fds": last[3] > first[3] + 20,
                "worker tasks": last[5] > first[5] + 50}
        if any(grew.values()):
            verdict = "grew: " + ", ".join(name for name, g in grew.items() if g)
    if covered_failures:
        verdict = f"{covered_failures} failed HTTP request(s) a retry covers; " + verdict
    if not alive:
        verdict = "tidegate exited; " + verdict
    lines += ["", f"verdict: {verdict}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
