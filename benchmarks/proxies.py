"""tidegate next to HAProxy and nginx, on the same machine, in one run.

    .venv/bin/python benchmarks/proxies.py [--seconds 5] [--quick]

Starts two nginx backends, then HAProxy, nginx (as a proxy, upstream keep-alive) and tidegate with
equivalent configs (round robin over the two backends). Each proxy is pinned to core 0; the backends and
wrk run on core 1. For each scenario and proxy it reports req/s, p50/p99 latency, the proxy's own CPU
seconds (from /proc) and requests per CPU-second, then the ratio tidegate ÷ HAProxy and ÷ nginx, and writes
the table to benchmarks/RESULTS.md. Loopback only; every run is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROXY_CORE, LOAD_CORE = "0", "1"
TOOLS = {"haproxy": "haproxy", "nginx": "nginx-light", "wrk": "wrk", "taskset": "util-linux"}


@dataclass
class Scenario:
    name: str
    path: str
    connections: int
    close: bool = False


SCENARIOS = [
    Scenario("small GET, keep-alive, 64 conns", "/small", 64),
    Scenario("small GET, keep-alive, 256 conns", "/small", 256),
    Scenario("1 KB response, keep-alive, 64 conns", "/1k", 64),
    Scenario("new connection per request, 64 conns", "/small", 64, close=True),
    Scenario("1 MB response, keep-alive, 16 conns", "/1m", 16),
]


@dataclass
class Result:
    proxy: str
    scenario: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_s: float
    errors: int

    @property
    def per_cpu_second(self) -> float:
        return self.rps * self.seconds / self.cpu_s if self.cpu_s else 0.0

    seconds: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes and their children (nginx workers), in seconds."""
    total = 0
    ticks = os.sysconf("SC_CLK_TCK")
    seen = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            todo += [int(c) for c in children]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total / ticks


def version(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0]


class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], name: str, port: int, core: str) -> subprocess.Popen:
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(["taskset", "-c", core, *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        try:
            wait_port(port)
        except TimeoutError as exc:
            raise RuntimeError(f"{name} did not start: {log_path.read_text()[-2000:]}") from exc
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def backend_config(tmp: Path, port: int, name: str) -> Path:
    root = tmp / f"www-{name}"
    root.mkdir()
    (root / "small").write_text("hello\n")
    (root / "1k").write_bytes(b"k" * 1024)
    (root / "1m").write_bytes(b"m" * 1024 * 1024)
    conf = tmp / f"backend-{name}.conf"
    conf.write_text(textwrap.dedent(f"""
        daemon off; master_process off; worker_processes 1; pid {tmp}/backend-{name}.pid;
        error_log {tmp}/backend-{name}.err warn;
        events {{ worker_connections 4096; }}
        http {{
            access_log off; keepalive_requests 1000000; default_type text/plain;
            client_body_temp_path {tmp}/cb-{name}; proxy_temp_path {tmp}/pt-{name};
            fastcgi_temp_path {tmp}/ft-{name}; uwsgi_temp_path {tmp}/ut-{name}; scgi_temp_path {tmp}/st-{name};
            server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }}
        }}
    """))
    return conf


def haproxy_config(tmp: Path, port: int, backends: list[int]) -> Path:
    conf = tmp / "haproxy.cfg"
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    conf.write_text(textwrap.dedent(f"""
        global
            nbthread 1
            maxconn 4000
        defaults
            mode http
            timeout connect 5s
            timeout client 30s
            timeout server 30s
            http-reuse always
        frontend web
            bind 127.0.0.1:{port}
            default_backend pods
        backend pods
            balance roundrobin
    """) + servers + "\n")
    return conf


def nginx_proxy_config(tmp: Path, port: int, backends: list[int]) -> Path:
    conf = tmp / "nginx-proxy.conf"
    servers = " ".join(f"server 127.0.0.1:{p};" for p in backends)
    conf.write_text(textwrap.dedent(f"""
        daemon off; master_process off; worker_processes 1; pid {tmp}/proxy.pid;
        error_log {tmp}/proxy.err warn;
        events {{ worker_connections 8192; }}
        http {{
            access_log off; keepalive_requests 1000000;
            client_body_temp_path {tmp}/cb-p; proxy_temp_path {tmp}/pt-p;
            fastcgi_temp_path {tmp}/ft-p; uwsgi_temp_path {tmp}/ut-p; scgi_temp_path {tmp}/st-p;
            upstream pods {{ {servers} keepalive 64; }}
            server {{
                listen 127.0.0.1:{port};
                location / {{ proxy_pass http://pods; proxy_http_version 1.1; proxy_set_header Connection "";
                             proxy_buffering on; }}
            }}
        }}
    """))
    return conf


def tidegate_config(tmp: Path, port: int, backends: list[int]) -> Path:
    folder = tmp / "tidegate"
    folder.mkdir()
    slices = "".join(textwrap.dedent(f"""
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {{name: pods-{i}, namespace: default, labels: {{kubernetes.io/service-name: pods}}}}
        addressType: IPv4
        ports: [{{name: http, port: {p}}}]
        endpoints: [{{addresses: [127.0.0.1]}}]
        """) for i, p in enumerate(backends))
    (folder / "bench.yaml").write_text(textwrap.dedent(f"""
        apiVersion: gateway.networking.k8s.io/v1
        kind: GatewayClass
        metadata: {{name: tidegate}}
        spec: {{controllerName: tidegate.io/gateway-controller}}
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {{name: bench, namespace: default}}
        spec:
          gatewayClassName: tidegate
          addresses: [{{value: 127.0.0.1}}]
          listeners: [{{name: http, port: {port}, protocol: HTTP}}]
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {{name: bench, namespace: default}}
        spec:
          parentRefs: [{{name: bench}}]
          rules: [{{backendRefs: [{{name: pods, port: 80}}]}}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {{name: pods, namespace: default}}
        spec: {{ports: [{{name: http, port: 80}}]}}
        """) + slices)
    return folder


_LATENCY = re.compile(r"^\s*(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(port: int, scenario: Scenario, seconds: float) -> tuple[float, float, float, int]:
    args = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{scenario.connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "--timeout", "10s", "-H", "Host: bench.local"]
    if scenario.close:
        args += ["-H", "Connection: close"]
    done = subprocess.run([*args, f"http://127.0.0.1:{port}{scenario.path}"], capture_output=True, text=True,
                          timeout=seconds + 30)
    out = done.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk failed on port {port}: {done.stdout[-500:]} {done.stderr[-500:]}")
    rps = float(found.group(1))
    latencies = {m.group(1): float(m.group(2)) * _UNIT[m.group(3)] for m in _LATENCY.finditer(out)}
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rps, latencies.get("50", 0.0), latencies.get("99", 0.0), errors + (int(non2xx.group(1)) if non2xx else 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run (default: 5)")
    parser.add_argument("--quick", action="store_true", help="only the first scenario")
    parser.add_argument("--only", choices=["haproxy", "nginx", "tidegate"], action="append",
                        help="run only these proxies (repeatable; no report file is written)")
    parser.add_argument("--profile", metavar="FILE", help="record where tidegate spends its time with py-spy "
                                                          "(pip install py-spy) during its first scenario: a "
                                                          "collapsed-stack file for flame graphs")
    args = parser.parse_args()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        packages = " ".join(sorted({TOOLS[t] for t in missing}))
        print(f"missing: {', '.join(missing)}. Install them with:\n  sudo apt-get install {packages}",
              file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("needs 2 cores: one for the proxy, one for the load", file=sys.stderr)
        return 2
    scenarios = SCENARIOS[:1] if args.quick else SCENARIOS
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-") as tmpdir:
        tmp = Path(tmpdir)
        stack = Stack(tmp)
        try:
            backends = [free_port(), free_port()]
            for i, port in enumerate(backends):
                stack.start(["nginx", "-c", str(backend_config(tmp, port, str(i)))], f"backend-{i}", port, LOAD_CORE)
            proxies = {}
            port = free_port()
            proxies["haproxy"] = (stack.start(["haproxy", "-f", str(haproxy_config(tmp, port, backends))],
                                              "haproxy", port, PROXY_CORE), port)
            port = free_port()
            proxies["nginx"] = (stack.start(["nginx", "-c", str(nginx_proxy_config(tmp, port, backends))],
                                            "nginx-proxy", port, PROXY_CORE), port)
            port = free_port()
            # tidegate runs as users would run it: metrics on, JSON access log to a file, admin listener open.
            tidegate = [str(ROOT / ".venv" / "bin" / "tidegate"), "run", "-f", str(tidegate_config(tmp, port, backends)),
                        "--access-log", "json", "--access-log-file", str(tmp / "tidegate-access.log"),
                        "--admin", f"127.0.0.1:{free_port()}"]
            proxies["tidegate"] = (stack.start(tidegate, "tidegate", port, PROXY_CORE), port)
            for scenario in scenarios:
                for name, (proc, port) in proxies.items():
                    if args.only and name not in args.only:
                        continue
                    run_wrk(port, scenario, 1.0)  # warm up: pools, caches
                    profiler = None
                    if args.profile and name == "tidegate" and scenario is scenarios[0]:
                        profiler = subprocess.Popen(
                            [shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy"), "record", "--pid",
                             str(proc.pid), "--duration", str(max(1, round(args.seconds))), "--format", "raw",
                             "--output", args.profile, "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                    before = cpu_seconds([proc.pid])
                    rps, p50, p99, errors = run_wrk(port, scenario, args.seconds)
                    cpu = cpu_seconds([proc.pid]) - before
                    if profiler is not None:
                        profiler.wait(30)
                    result = Result(name, scenario.name, rps, p50, p99, cpu, errors, seconds=args.seconds)
                    results.append(result)
                    print(f"{scenario.name:40s} {name:9s} {rps:10.0f} req/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
                          f"  cpu {cpu:5.2f} s  {result.per_cpu_second:9.0f} req/cpu-s  errors {errors}",
                          flush=True)
        finally:
            stack.stop()
    report = render(results, scenarios, args.seconds)
    if not args.only:
        (ROOT / "benchmarks" / "RESULTS.md").write_text(report)
    print("\n" + report)
    return 0


def render(results: list[Result], scenarios: list[Scenario], seconds: float) -> str:
    by = {(r.proxy, r.scenario): r for r in results}
    lines = [
        "# tidegate next to HAProxy and nginx",
        "",
        f"Run on {datetime.date.today().isoformat()} by `benchmarks/proxies.py --seconds {seconds:g}` on "
        f"{os.cpu_count()} cores: each proxy pinned to core {PROXY_CORE}; wrk and two nginx backends on core "
        f"{LOAD_CORE}. Loopback only.",
        "",
        f"- {version(['haproxy', '-v'])}",
        f"- {version(['nginx', '-v'])}",
        f"- {version(['wrk', '-v'])}",
        f"- tidegate {version([str(ROOT / '.venv' / 'bin' / 'tidegate'), '--version']).split()[-1]} "
        f"(Python {sys.version.split()[0]}, uvloop, httptools), one worker process, with Prometheus metrics and a "
        "JSON access log to a file on (HAProxy and nginx log nothing)",
        "",
        "Requests per CPU-second is requests served divided by the proxy's own CPU time (user + system, from "
        "/proc): steadier than req/s when the load generator shares the machine.",
        "",
        "| scenario | proxy | req/s | p50 ms | p99 ms | proxy CPU s | req per CPU-s | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in scenarios:
        for proxy in ("haproxy", "nginx", "tidegate"):
            r = by.get((proxy, scenario.name))
            if r:
                lines.append(f"| {scenario.name} | {proxy} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                             f"{r.cpu_s:.2f} | {r.per_cpu_second:.0f} | {r.errors} |")
    lines += ["", "| scenario | tidegate ÷ HAProxy (req per CPU-s) | tidegate ÷ nginx | p99 tidegate ÷ HAProxy |",
              "|---|---:|---:|---:|"]
    for scenario in scenarios:
        t, h, n = (by.get((p, scenario.name)) for p in ("tidegate", "haproxy", "nginx"))
        if t and h and n and h.per_cpu_second and n.per_cpu_second and h.p99_ms:
            lines.append(f"| {scenario.name} | {t.per_cpu_second / h.per_cpu_second:.2f} | "
                         f"{t.per_cpu_second / n.per_cpu_second:.2f} | {t.p99_ms / h.p99_ms:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
