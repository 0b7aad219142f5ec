"""tidegate next to HAProxy and nginx, on the same machine, in one run.

    .venv/bin/python benchmarks/proxies.py [--seconds 5] [--quick] [--only tidegate] [--profile FILE]

Starts two nginx backends, then HAProxy, nginx (as a proxy, upstream keep-alive) and tidegate with
equivalent configs (round robin over the two backends). Each proxy is pinned to core 0; the backends and
the load generators (wrk, h2load) run on core 1. For each scenario and proxy it reports req/s, p50/p99
latency, the proxy's own CPU seconds (from /proc) and requests per CPU-second, then the ratio tidegate ÷
HAProxy and ÷ nginx. Scenarios come in groups that share one configuration: plain HTTP (small, 1 KB and
1 MB responses, a new connection per request, a 10 MB upload, HTTP/2 with h2load), 1,000 routes with
distinct hostnames, 1 worker against 2, and TLS termination (keep-alive, and a handshake per request). A
second tidegate without its access log runs each group's first scenario, to show what logging costs.

1 worker against 2 is run twice. As is, the second worker shares core 1 with the load. Then with each
serving process held to 40 % of core 0 by a CPU quota (a cgroup each; needs root, else it is skipped and
the report says why): two workers fit on core 0, and the report gives core 1's use, to show that the load
generator was not the limit.

Control-plane figures follow: loading and translating 10,000 HTTPRoutes, and the time from a file change to
the new route serving. The report goes to benchmarks/RESULTS.md. Loopback only; every run is bounded by
--seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
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
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROXY_CORE, LOAD_CORE = "0", "1"
TOOLS = {"haproxy": "haproxy", "nginx": "nginx-light", "wrk": "wrk", "h2load": "nghttp2-client", "taskset": "util-linux"}
HOSTS = 1000
NO_LOG = "tidegate, no log"  # run beside the others on each group's first scenario: what the access log costs
# benchmarks/minimal_proxy.py, on the first scenario: what a Python proxy that does nothing but pass bytes costs
FLOOR = "minimal uvloop+httptools proxy"
TWO_WORKERS = "tidegate, 2 workers"  # --workers 2 on both cores (the load generator shares one)
# The same comparison with every serving process held to CAP_SHARE of core 0 by a CPU quota (cgroups): two
# workers then fit on the proxies' core, and the load generator's core is shared with neither of them.
CAPPED_ONE = "tidegate, capped"
CAPPED_TWO = "tidegate, 2 workers, capped"
CAP_SHARE = 0.4
# Edge protection: every proxy checks an IP allow list, a deny list of DENIED CIDRs and a rate limit per
# client address high enough never to refuse (what is measured is the check's cost). "tidegate" there runs
# a local TrafficPolicy; these two run beside it on the same route: without any policy, and with the limit
# counted in Redis (a redis-server on the load generator's core).
EDGE_NONE = "tidegate, no policy"
EDGE_GLOBAL = "tidegate, global limit"
DENIED = 1000
EDGE_RATE = 100_000_000  # requests a second per client: never reached


@dataclass
class Scenario:
    name: str
    path: str
    connections: int
    close: bool = False
    script: str = ""  # a wrk Lua script (rotating Host headers or paths)
    h2: bool = False  # h2load over h2c instead of wrk
    tls: bool = False
    upload: int = 0  # bytes POSTed per request, with h2load --h1 (wrk stalls on bodies this big)


@dataclass
class Group:
    """Scenarios that share one configuration of every proxy."""

    name: str
    scenarios: list[Scenario]
    hosts: int = 0  # >0: that many routes with distinct hostnames
    tls: bool = False
    tcp: bool = False  # the proxies relay TCP (HAProxy mode tcp, nginx stream, a TCPRoute); wrk speaks HTTP through
    edge: bool = False  # an IP allow list, a deny list and a rate limit on the route (see EDGE_NONE)
    proxies: tuple[str, ...] = ("haproxy", "nginx", "tidegate", NO_LOG)


ROTATE = textwrap.dedent(f"""
    local i = 0
    request = function()
      i = (i % {HOSTS}) + 1
      return wrk.format("GET", "/small", {{["Host"] = "h" .. i .. ".bench.local"}})
    end
""")

PATHS = 10_000
# Real traffic has ids in its paths: more distinct request lines than a router could remember.
ROTATE_PATHS = textwrap.dedent(f"""
    local i = 0
    request = function()
      i = (i % {PATHS}) + 1
      return wrk.format("GET", "/p/" .. i)
    end
""")

GROUPS = [
    Group("plain HTTP", proxies=("haproxy", "nginx", "tidegate", NO_LOG, FLOOR), scenarios=[
        Scenario("small GET, keep-alive, 64 conns", "/small", 64),
        Scenario("small GET, keep-alive, 256 conns", "/small", 256),
        Scenario(f"small GET over {PATHS:,} paths, 64 conns", "/p/1", 64, script=ROTATE_PATHS),
        Scenario("1 KB response, keep-alive, 64 conns", "/1k", 64),
        Scenario("new connection per request, 64 conns", "/small", 64, close=True),
        Scenario("1 MB response, keep-alive, 16 conns", "/1m", 16),
        Scenario("10 MB upload, 4 conns", "/upload", 4, upload=10 * 2**20),
        Scenario("HTTP/2 (h2c) small GET, 64 conns x 10 streams", "/small", 64, h2=True),
    ]),
    Group(f"{HOSTS} routes", [Scenario(f"small GET over {HOSTS} hostnames, 64 conns", "/small", 64, script=ROTATE)],
          hosts=HOSTS),
    Group("workers", [Scenario("small GET, keep-alive, 64 conns, 1 vs 2 workers", "/small", 64)],
          proxies=("tidegate", TWO_WORKERS)),
    Group("workers, capped", [Scenario(f"small GET, keep-alive, 64 conns, 1 vs 2 workers at "
                                       f"{100 * CAP_SHARE:.0f} % of a core each", "/small", 64)],
          proxies=(CAPPED_ONE, CAPPED_TWO)),
    Group("TLS termination", [
        Scenario("TLS small GET, keep-alive, 64 conns", "/small", 64, tls=True),
        Scenario("TLS handshake per request, 64 conns", "/small", 64, close=True, tls=True),
    ], tls=True),
    Group("edge protection", [Scenario(f"small GET, 64 conns, IP lists ({DENIED} denied CIDRs) + rate limit",
                                       "/small", 64)],
          edge=True, proxies=("haproxy", "nginx", "tidegate", EDGE_NONE, EDGE_GLOBAL)),
    Group("TCP relay", [
        Scenario("TCP relay: small GET, keep-alive, 64 conns", "/small", 64),
        Scenario("TCP relay: 1 MB response, keep-alive, 16 conns", "/1m", 16),
        Scenario("TCP relay: new connection per request, 64 conns", "/small", 64, close=True),
    ], tcp=True, proxies=("haproxy", "nginx", "tidegate")),
]

# nginx relays TCP with its stream module: Debian's libnginx-mod-stream.
NGINX_STREAM = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@dataclass
class Result:
    proxy: str
    scenario: str
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    cpu_s: float
    errors: int
    seconds: float = 0.0
    load_core_busy: float = 0.0  # the share of the load generator's core in use during the run

    @property
    def per_cpu_second(self) -> float:
        return self.rps * self.seconds / self.cpu_s if self.cpu_s else 0.0


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


def tidegate_args(folder: Path, ports: Ports, backends: list[int], group: Group, cert: bytes, key: bytes,
                  workers: int = 1, log: bool = True, edge: str = "Local", redis: int = 0) -> list[str]:
    """`tidegate run` on its configuration in `folder`, with the JSON access log to a file there (unless `log`
    is False), metrics and an admin listener. `edge` (an edge group): the TrafficPolicy's rate-limit scope,
    or "" for none; `redis`: the port of the Redis that counts Global limits."""
    args = [str(ROOT / ".venv" / "bin" / "tidegate"), "run", "-f",
            str(tidegate_config(folder, ports, backends, group, cert, key, edge)), "--admin",
            f"127.0.0.1:{free_port()}"]
    if redis:
        args += ["--rate-limit-redis", f"redis://127.0.0.1:{redis}/0"]
    args += ["--access-log", "json", "--access-log-file", str(folder / "access.log")] if log else \
        ["--access-log", "off"]
    return args + (["--workers", str(workers)] if workers > 1 else [])


def core_jiffies(core: str) -> tuple[int, int]:
    """(busy, total) clock ticks of one core so far, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            ticks = [int(n) for n in line.split()[1:]]
            idle = ticks[3] + ticks[4]  # idle and iowait
            return sum(ticks) - idle, sum(ticks)
    return 0, 0


def serving_pids(pid: int) -> list[int]:
    """The processes of a tidegate that serve traffic: its workers (multiprocessing children) if it has any,
    else itself."""
    workers = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(int(child))
        except FileNotFoundError:
            continue
    return workers or [pid]


def cap_cpu(pids: list[int], share: float, tag: str, made: list[Path]) -> None:
    """Put each process in a cgroup of its own whose CPU quota is `share` of one core (cgroup v2's cpu.max, or
    v1's cpu controller). Each cgroup goes into `made` as soon as it exists, to be removed once the processes
    are gone, also when a later step fails. Raises OSError when this machine does not let it (not root, no
    cpu controller)."""
    root = Path("/sys/fs/cgroup")
    v2 = (root / "cgroup.controllers").exists()
    if v2 and "cpu" not in (root / "cgroup.subtree_control").read_text().split():
        (root / "cgroup.subtree_control").write_text("+cpu")
    for i, pid in enumerate(pids):
        group = (root if v2 else root / "cpu") / f"tidegate-bench-{tag}-{i}"
        group.mkdir(exist_ok=True)
        made.append(group)
        period = 100_000
        if v2:
            (group / "cpu.max").write_text(f"{int(share * period)} {period}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(int(share * period)))
        (group / "cgroup.procs").write_text(str(pid))


def remove_cgroups(groups: list[Path]) -> None:
    for group in groups:
        for _ in range(50):  # a process leaves its cgroup a moment after it exits
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


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

    def stop(self, procs: list[subprocess.Popen] | None = None) -> None:
        procs = list(self.procs) if procs is None else procs
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc in self.procs:
                self.procs.remove(proc)


# -- configurations -------------------------------------------------------------------------------------

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
            server {{
                listen 127.0.0.1:{port}; root {root};
                location / {{ }}
                location /p/ {{ return 200 "hello\\n"; }}
                # Reads the whole body first (request buffering, in memory), then answers: a backend that
                # answered before the body was in would test how proxies handle early answers instead.
                location = /upload {{
                    client_max_body_size 100m; client_body_buffer_size 16m; proxy_pass_request_body off;
                    proxy_set_header Content-Length ""; proxy_method GET; proxy_pass http://127.0.0.1:{port}/small;
                }}
            }}
        }}
    """))
    return conf


@dataclass
class Ports:
    http: int = field(default_factory=free_port)
    h2c: int = field(default_factory=free_port)


def denied_cidrs() -> list[str]:
    """DENIED networks nobody on loopback is in (benchmark traffic comes from 127.0.0.1)."""
    return [f"198.{18 + n // 256}.{n % 256}.0/24" for n in range(DENIED)]


def haproxy_config(tmp: Path, ports: Ports, backends: list[int], group: Group, cert: Path | None) -> Path:
    conf = tmp / "haproxy.cfg"
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    if group.tcp:
        conf.write_text(textwrap.dedent(f"""
            global
                nbthread 1
                maxconn 4000
            defaults
                mode tcp
                timeout connect 5s
                timeout client 30s
                timeout server 30s
            frontend relay
                bind 127.0.0.1:{ports.http}
                default_backend pods
            backend pods
                balance roundrobin
        """) + servers + "\n")
        return conf
    bind = f"bind 127.0.0.1:{ports.http}" + (f" ssl crt {cert}" if group.tls else "")
    routing = "default_backend pods"
    if group.hosts:
        (tmp / "hosts.lst").write_text("".join(f"h{i}.bench.local\n" for i in range(1, group.hosts + 1)))
        routing = f"use_backend pods if {{ req.hdr(host),lower -f {tmp}/hosts.lst }}"
    edge = ""
    if group.edge:  # a stick table counting each client's request rate, and the two address lists
        (tmp / "denied.lst").write_text("".join(f"{c}\n" for c in denied_cidrs()))
        edge = (f"stick-table type ip size 100k expire 30s store http_req_rate(1s)\n"
                f"            http-request deny if {{ src -f {tmp}/denied.lst }}\n"
                f"            http-request deny unless {{ src 127.0.0.0/8 10.0.0.0/8 }}\n"
                f"            http-request track-sc0 src\n"
                f"            http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt {EDGE_RATE} }}")
    conf.write_text(textwrap.dedent(f"""
        global
            nbthread 1
            maxconn 4000
            tune.ssl.default-dh-param 2048
        defaults
            mode http
            timeout connect 5s
            timeout client 30s
            timeout server 30s
            http-reuse always
        frontend web
            {bind}
            {edge}
            {routing}
        frontend h2c
            bind 127.0.0.1:{ports.h2c} proto h2
            default_backend pods
        backend pods
            balance roundrobin
    """) + servers + "\n")
    return conf


def nginx_proxy_config(tmp: Path, ports: Ports, backends: list[int], group: Group, cert: Path | None,
                       key: Path | None) -> Path:
    conf = tmp / "nginx-proxy.conf"
    servers = " ".join(f"server 127.0.0.1:{p};" for p in backends)
    if group.tcp:
        conf.write_text(textwrap.dedent(f"""
            load_module {NGINX_STREAM};
            daemon off; master_process off; worker_processes 1; pid {tmp}/proxy.pid;
            error_log {tmp}/proxy.err warn;
            events {{ worker_connections 8192; }}
            stream {{
                upstream pods {{ {servers} }}
                server {{ listen 127.0.0.1:{ports.http}; proxy_pass pods; }}
            }}
        """))
        return conf
    names = " ".join(f"h{i}.bench.local" for i in range(1, group.hosts + 1)) if group.hosts else "_"
    listen = f"listen 127.0.0.1:{ports.http}" + (" ssl" if group.tls else "") + ";"
    tls = f"ssl_certificate {cert}; ssl_certificate_key {key};" if group.tls else ""
    edge = ""
    if group.edge:  # limit_req per client address, and the two address lists (nginx checks them in order)
        edge = ("limit_req zone=perclient burst=1000000 nodelay; "
                + "".join(f"deny {c}; " for c in denied_cidrs()) + "allow 127.0.0.0/8; allow 10.0.0.0/8; deny all; ")
    location = ('location / { ' + edge + 'proxy_pass http://pods; proxy_http_version 1.1; '
                'proxy_set_header Connection ""; proxy_request_buffering off; client_max_body_size 100m; }')
    conf.write_text(textwrap.dedent(f"""
        daemon off; master_process off; worker_processes 1; pid {tmp}/proxy.pid;
        error_log {tmp}/proxy.err warn;
        events {{ worker_connections 8192; }}
        http {{
            access_log off; keepalive_requests 1000000; server_names_hash_max_size 4096;
            server_names_hash_bucket_size 64;
            client_body_temp_path {tmp}/cb-p; proxy_temp_path {tmp}/pt-p;
            fastcgi_temp_path {tmp}/ft-p; uwsgi_temp_path {tmp}/ut-p; scgi_temp_path {tmp}/st-p;
            upstream pods {{ {servers} keepalive 64; }}
            limit_req_zone $binary_remote_addr zone=perclient:10m rate={EDGE_RATE // 1000}r/s;
            server {{ {listen} server_name {names}; {tls} {location} }}
            server {{ listen 127.0.0.1:{ports.h2c} http2; {location} }}
        }}
    """))
    return conf


def tidegate_config(tmp: Path, ports: Ports, backends: list[int], group: Group, cert: bytes, key: bytes,
                    edge: str = "Local") -> Path:
    from tests.certs import tls_secret_pem_yaml
    from tests.manifests import gateway

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
    if group.tcp:
        listener = f"{{name: web, port: {ports.http}, protocol: TCP}}"
    elif group.tls:
        listener = (f"{{name: web, port: {ports.http}, protocol: HTTPS, "
                    "tls: {mode: Terminate, certificateRefs: [{name: bench-cert}]}}")
    else:
        listener = f"{{name: web, port: {ports.http}, protocol: HTTP}}"
    text = gateway("127.0.0.1", f"[{listener}, {{name: h2c, port: {ports.h2c}, protocol: HTTP}}]", "bench")
    text += textwrap.dedent("""
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: pods, namespace: default}
        spec: {ports: [{name: http, port: 80}]}
        """) + slices
    if group.hosts:
        for i in range(1, group.hosts + 1):
            text += textwrap.dedent(f"""
                ---
                apiVersion: gateway.networking.k8s.io/v1
                kind: HTTPRoute
                metadata: {{name: h{i}, namespace: default}}
                spec:
                  parentRefs: [{{name: bench}}]
                  hostnames: [h{i}.bench.local]
                  rules: [{{backendRefs: [{{name: pods, port: 80}}]}}]
                """)
    if group.tcp:
        text += textwrap.dedent("""
            ---
            apiVersion: gateway.networking.k8s.io/v1alpha2
            kind: TCPRoute
            metadata: {name: bench, namespace: default}
            spec:
              parentRefs: [{name: bench, sectionName: web}]
              rules: [{backendRefs: [{name: pods, port: 80}]}]
            """)
    text += textwrap.dedent("""
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: bench, namespace: default}
        spec:
          parentRefs: [{name: bench}]
          rules: [{backendRefs: [{name: pods, port: 80}]}]
        """)
    if group.tls:
        text += "---\n" + tls_secret_pem_yaml("default", "bench-cert", cert, key)
    if group.edge and edge:
        text += textwrap.dedent(f"""
            ---
            apiVersion: tidegate.io/v1alpha1
            kind: TrafficPolicy
            metadata: {{name: bench, namespace: default}}
            spec:
              targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: bench}}]
              ipAccess:
                allow: [127.0.0.0/8, 10.0.0.0/8]
                deny: [{", ".join(denied_cidrs())}]
              rateLimit:
                rules: [{{name: per-client, limit: {{requests: {EDGE_RATE}, period: 1s}}, scope: {edge}}}]
            """)
    (folder / "bench.yaml").write_text(text)
    return folder


# -- load generators --------------------------------------------------------------------------------------

_LATENCY = re.compile(r"^\s*(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(port: int, scenario: Scenario, seconds: float, tmp: Path) -> tuple[float, float | None, float | None, int]:
    args = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{scenario.connections}", f"-d{max(1, round(seconds))}s",
            "--latency", "--timeout", "10s"]
    if scenario.script:
        script = tmp / f"wrk-{abs(hash(scenario.script))}.lua"
        script.write_text(scenario.script)
        args += ["-s", str(script)]
    if scenario.script != ROTATE:
        args += ["-H", "Host: bench.local"]
    if scenario.close:
        args += ["-H", "Connection: close"]
    scheme = "https" if scenario.tls else "http"
    done = subprocess.run([*args, f"{scheme}://127.0.0.1:{port}{scenario.path}"], capture_output=True, text=True,
                          timeout=seconds + 60)
    out = done.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk failed on port {port}: {done.stdout[-500:]} {done.stderr[-500:]}")
    latencies = {m.group(1): float(m.group(2)) * _UNIT[m.group(3)] for m in _LATENCY.finditer(out)}
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return (float(found.group(1)), latencies.get("50"), latencies.get("99"),
            errors + (int(non2xx.group(1)) if non2xx else 0))


def run_h2load(port: int, scenario: Scenario, seconds: float, tmp: Path) -> tuple[float, None, None, int]:
    args = ["taskset", "-c", LOAD_CORE, "h2load", "-c", str(scenario.connections), "-t", "1",
            "-D", str(max(1, round(seconds)))]
    if scenario.upload:
        body = tmp / f"upload-{scenario.upload}"
        if not body.exists():
            body.write_bytes(b"u" * scenario.upload)
        args += ["--h1", "-m", "1", "-d", str(body)]
    else:
        args += ["-m", "10"]
    args.append(f"http://127.0.0.1:{port}{scenario.path}")
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    found = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", done.stdout)
    if found is None:
        raise RuntimeError(f"h2load failed on port {port}: {done.stdout[-800:]} {done.stderr[-300:]}")
    status = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                       done.stdout)
    errors = int(status.group(2)) + int(status.group(3)) if status else 0
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", done.stdout)
    if codes:
        errors += int(codes.group(3)) + int(codes.group(4))
    return float(found.group(1)), None, None, errors


# -- control plane ----------------------------------------------------------------------------------------

def control_plane_figures(tmp: Path) -> list[str]:
    """benchmarks/translate_routes.py for 10,000 routes (its own process), and file change → serving."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "translate_routes.py"), "--routes", "10000"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = ["- 10,000 HTTPRoutes (`benchmarks/translate_routes.py`; targets: translate < 1 s, < 300 MB):"]
    lines += [f"  - {' '.join(raw.split())}" for raw in done.stdout.splitlines() if raw.strip()]
    backend_port, port = free_port(), free_port()
    stack = Stack(tmp)
    try:
        stack.start(["nginx", "-c", str(backend_config(tmp, backend_port, "reload"))], "backend-reload",
                    backend_port, LOAD_CORE)
        config = tidegate_config(tmp, Ports(http=port), [backend_port], Group("reload", []), b"", b"")
        stack.start([str(ROOT / ".venv" / "bin" / "tidegate"), "run", "-f", str(config), "--admin", "off"],
                    "tidegate-reload", port, PROXY_CORE)
        times = []
        for attempt in range(5):
            host = f"new{attempt}.bench.local"
            wanted = _probe(port, host)
            assert wanted == 200, f"the catch-all route should answer {host}"
            started = time.perf_counter()
            (config / f"extra-{attempt}.yaml").write_text(textwrap.dedent(f"""
                apiVersion: gateway.networking.k8s.io/v1
                kind: HTTPRoute
                metadata: {{name: extra-{attempt}, namespace: default}}
                spec:
                  parentRefs: [{{name: bench}}]
                  hostnames: [{host}]
                  rules:
                    - filters: [{{type: RequestRedirect, requestRedirect: {{statusCode: 302}}}}]
                """))
            deadline = started + 5
            while time.perf_counter() < deadline and _probe(port, host) != 302:
                time.sleep(0.002)
            times.append(time.perf_counter() - started)
        times.sort()
        lines.append(f"- file change → new route serving: median {times[len(times) // 2] * 1000:.0f} ms, worst "
                     f"{times[-1] * 1000:.0f} ms over {len(times)} changes (target: < 200 ms)")
    finally:
        stack.stop()
    return lines


def _probe(port: int, host: str) -> int:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/small", headers={"Host": host})
    try:
        with opener.open(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


# -- the run ------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run (default: 5)")
    parser.add_argument("--quick", action="store_true", help="only the first scenario, no control-plane figures")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="runs per scenario and proxy, in rounds that run each proxy once, reporting the "
                             "median (use 3 or more to compare changes: a shared VM varies by tens of %%)")
    parser.add_argument("--only", choices=["haproxy", "nginx", "tidegate", "minimal"], action="append",
                        help="run only these proxies (repeatable; no report file is written)")
    parser.add_argument("--profile", metavar="FILE", help="record where tidegate spends its time with py-spy "
                                                          "(pip install py-spy) during its first scenario: a "
                                                          "collapsed-stack file for flame graphs")
    parser.add_argument("--scenario", metavar="TEXT", help="run only the scenarios whose name contains TEXT (no "
                                                           "report file is written, no control-plane figures)")
    args = parser.parse_args()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        packages = " ".join(sorted({TOOLS[t] for t in missing}))
        print(f"missing: {', '.join(missing)}. Install them with:\n  sudo apt-get install {packages}",
              file=sys.stderr)
        return 2
    running = version([str(ROOT / ".venv" / "bin" / "tidegate"), "--version"])
    if "compiled with mypyc" not in running:  # the figures would be the Python copies' (about half)
        print(f"warning: {running}. scripts/bootstrap compiles the request path.", file=sys.stderr)
    if (os.cpu_count() or 1) < 2:
        print("needs 2 cores: one for the proxy, one for the load", file=sys.stderr)
        return 2
    groups = [dataclasses.replace(GROUPS[0], scenarios=GROUPS[0].scenarios[:1])] if args.quick else GROUPS
    if args.scenario:
        groups = [dataclasses.replace(g, scenarios=[s for s in g.scenarios if args.scenario in s.name])
                  for g in groups]
        groups = [g for g in groups if g.scenarios]
        if not groups:
            names = "; ".join(s.name for g in GROUPS for s in g.scenarios)
            print(f"no scenario's name contains {args.scenario!r}; the scenarios: {names}", file=sys.stderr)
            return 2
    results: list[Result] = []
    control: list[str] = []
    profiled = False
    cgroups: list[Path] = []
    notes: list[str] = []
    # Edge groups: each round's cost of the policy against "no policy" in the same round (round by round, the
    # VM's drift between rounds cancels out), by scenario: {"local": [...], "global": [...]} in %.
    paired: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tidegate-bench-") as tmpdir:
        tmp = Path(tmpdir)
        stack = Stack(tmp)
        try:
            from tests.certs import self_signed

            cert, key = self_signed(["bench.local"])
            (tmp / "cert.pem").write_bytes(cert)
            (tmp / "key.pem").write_bytes(key)
            (tmp / "combined.pem").write_bytes(cert + key)
            backends = [free_port(), free_port()]
            for i, port in enumerate(backends):
                stack.start(["nginx", "-c", str(backend_config(tmp, port, str(i)))], f"backend-{i}", port, LOAD_CORE)
            for g, group in enumerate(groups):
                gtmp = tmp / f"group-{g}"
                gtmp.mkdir()
                started: dict[str, tuple[subprocess.Popen, Ports]] = {}
                launch: dict[str, Callable[[Ports], list[str]]] = {
                    "haproxy": lambda p: ["haproxy", "-f", str(haproxy_config(gtmp, p, backends, group,
                                                                             tmp / "combined.pem"))],
                    "nginx": lambda p: ["nginx", "-c", str(nginx_proxy_config(gtmp, p, backends, group,
                                                                              tmp / "cert.pem", tmp / "key.pem"))],
                    # tidegate runs as users would run it: metrics on, JSON access log to a file, admin open.
                    "tidegate": lambda p: tidegate_args(gtmp, p, backends, group, cert, key),
                    TWO_WORKERS: lambda p: tidegate_args(gtmp / "two", p, backends, group, cert, key, workers=2),
                    FLOOR: lambda p: [sys.executable, str(ROOT / "benchmarks" / "minimal_proxy.py"), str(p.http),
                                      *map(str, backends)],
                    CAPPED_ONE: lambda p: tidegate_args(gtmp / "capped1", p, backends, group, cert, key),
                    CAPPED_TWO: lambda p: tidegate_args(gtmp / "capped2", p, backends, group, cert, key, workers=2),
                    NO_LOG: lambda p: tidegate_args(gtmp / "nolog", p, backends, group, cert, key, log=False),
                    EDGE_NONE: lambda p: tidegate_args(gtmp / "noedge", p, backends, group, cert, key, edge=""),
                    EDGE_GLOBAL: lambda p: tidegate_args(gtmp / "global", p, backends, group, cert, key,
                                                         edge="Global", redis=redis_port),
                }
                for sub in ("nolog", "two", "capped1", "capped2", "noedge", "global"):
                    (gtmp / sub).mkdir()
                redis_port = 0
                if EDGE_GLOBAL in group.proxies and (not args.only or "tidegate" in args.only):
                    if shutil.which("redis-server"):
                        redis_port = free_port()
                        stack.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", str(gtmp)], f"redis-{g}", redis_port, LOAD_CORE)
                    else:
                        notes.append(f"\"{EDGE_GLOBAL}\" was not run: redis-server is missing "
                                     "(sudo apt-get install redis-server).")
                for name in group.proxies:
                    if args.only and name.split(",")[0].split()[0] not in args.only:
                        continue
                    if name == EDGE_GLOBAL and not redis_port:
                        continue
                    if name == "nginx" and group.tcp and not NGINX_STREAM.exists():
                        notes.append(f"nginx was not run on \"{group.name}\": its stream module is missing "
                                     "(sudo apt-get install libnginx-mod-stream).")
                        continue
                    ports = Ports()
                    core = f"{PROXY_CORE},{LOAD_CORE}" if name == TWO_WORKERS else PROXY_CORE
                    started[name] = (stack.start(launch[name](ports), f"{name.replace(', ', '-')}-{g}".replace(
                        " ", "-"), ports.http, core), ports)
                    if name in (TWO_WORKERS, CAPPED_TWO):
                        time.sleep(2)  # both workers listening (the port opens with the first)
                    if name in (CAPPED_ONE, CAPPED_TWO):
                        proc = started[name][0]
                        try:
                            cap_cpu(serving_pids(proc.pid), CAP_SHARE, f"{g}-{len(cgroups)}", cgroups)
                        except OSError as exc:
                            notes.append(f"{name} was not run: no CPU quota could be set ({exc}).")
                            stack.stop([proc])
                            del started[name]
                for scenario in group.scenarios:
                    running = [(name, proc, ports) for name, (proc, ports) in started.items()
                               if name not in (NO_LOG, FLOOR) or scenario is group.scenarios[0]]
                    load = run_h2load if scenario.h2 or scenario.upload else run_wrk
                    for name, proc, ports in running:
                        load(ports.h2c if scenario.h2 else ports.http, scenario, 1.0, gtmp)  # warm up: pools, caches
                    runs: dict[str, list[Result]] = {name: [] for name, _, _ in running}
                    # In rounds: each round runs every proxy once, so that a neighbour of this VM who comes or
                    # goes weighs on all of them alike, not on whichever proxy ran its repeats at that time.
                    for _ in range(args.repeat):
                        for name, proc, ports in running:
                            profiler = None
                            if args.profile and name == "tidegate" and not profiled:
                                profiled = True
                                profiler = subprocess.Popen(
                                    [shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy"), "record",
                                     "--pid", str(proc.pid), "--duration", str(max(1, round(args.seconds))),
                                     "--format", "raw", "--output", args.profile, "--nonblocking", "--rate",
                                     "400"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                            before = cpu_seconds([proc.pid])
                            load_before = core_jiffies(LOAD_CORE)
                            rps, p50, p99, errors = load(ports.h2c if scenario.h2 else ports.http, scenario,
                                                         args.seconds, gtmp)
                            cpu = cpu_seconds([proc.pid]) - before
                            load_after = core_jiffies(LOAD_CORE)
                            ticks = load_after[1] - load_before[1]
                            busy = (load_after[0] - load_before[0]) / ticks if ticks else 0.0
                            runs[name].append(Result(name, scenario.name, rps, p50, p99, cpu, errors,
                                                     seconds=args.seconds, load_core_busy=busy))
                            if profiler is not None:
                                profiler.wait(30)
                    if group.edge and runs.get(EDGE_NONE):
                        for label, name in (("local", "tidegate"), ("global", EDGE_GLOBAL)):
                            if runs.get(name):
                                paired.setdefault(scenario.name, {})[label] = [
                                    100 * (1 - r.per_cpu_second / n.per_cpu_second)
                                    for r, n in zip(runs[name], runs[EDGE_NONE]) if n.per_cpu_second]
                    for name, _, _ in running:
                        # The median run by requests per CPU-second: this machine's neighbours come and go. Its
                        # latencies are the medians of all runs': one run's p99 swings by tens of % on its own.
                        result = sorted(runs[name], key=lambda r: r.per_cpu_second)[len(runs[name]) // 2]
                        result = dataclasses.replace(result, p50_ms=_median([r.p50_ms for r in runs[name]]),
                                                     p99_ms=_median([r.p99_ms for r in runs[name]]))
                        results.append(result)
                        print(f"{scenario.name:46s} {name:17s} {result.rps:9.0f} req/s  p50 {_ms(result.p50_ms):>8s}  "
                              f"p99 {_ms(result.p99_ms):>8s}  cpu {result.cpu_s:5.2f} s  "
                              f"{result.per_cpu_second:8.0f} req/cpu-s  errors {result.errors}", flush=True)
                stack.stop([proc for proc, _ in started.values()])
        finally:
            stack.stop()
            remove_cgroups(cgroups)
        if not args.quick and not args.only and not args.scenario:
            with tempfile.TemporaryDirectory(prefix="tidegate-cp-") as cpdir:
                control = control_plane_figures(Path(cpdir))
            for line in control:
                print(line)
    report = render(results, groups, args.seconds, control, metrics_cost(), args.repeat, notes, paired)
    if not args.only and not args.scenario:
        (ROOT / "benchmarks" / "RESULTS.md").write_text(report)
    print("\n" + report)
    return 0


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    return known[len(known) // 2] if known else None


def metrics_cost() -> float:
    """Seconds of CPU that recording one request's metrics takes (they cannot be turned off)."""
    from tidegate.observe.metrics import Metrics

    counts = Metrics().route_counts("default/bench/web", "httproute/default/bench/rule/0")  # kept with the rule
    rounds = 200_000
    started = time.process_time()
    for i in range(rounds):
        counts.observe("GET", 200, 0.001 * (i % 7), 0.0005 * (i % 7), 0, 13)
    return (time.process_time() - started) / rounds


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render(results: list[Result], groups: list[Group], seconds: float, control: list[str],
           metric_seconds: float = 0.0, repeat: int = 1, notes: list[str] | None = None,
           paired: dict[str, dict[str, list[float]]] | None = None) -> str:
    by = {(r.proxy, r.scenario): r for r in results}
    lines = [
        "# tidegate next to HAProxy and nginx",
        "",
        f"Run on {datetime.date.today().isoformat()} by `benchmarks/proxies.py --seconds {seconds:g}"
        f"{f' --repeat {repeat}' if repeat > 1 else ''}` on "
        f"{os.cpu_count()} cores: each proxy pinned to core {PROXY_CORE}; wrk/h2load and two nginx backends on "
        f"core {LOAD_CORE}. Loopback only.",
        "",
        f"- {version(['haproxy', '-v'])}",
        f"- {version(['nginx', '-v'])}",
        f"- {version(['wrk', '-v'])}; {version(['h2load', '--version'])}",
        f"- {version([str(ROOT / '.venv' / 'bin' / 'tidegate'), '--version'])}, on Python "
        f"{sys.version.split()[0]} with uvloop and httptools; one worker process, with Prometheus metrics and a "
        "JSON access log to a file on (HAProxy and nginx log nothing); \"tidegate, no log\" is the same without "
        "the access log",
        "",
        "Requests per CPU-second is requests served divided by the proxy's own CPU time (user + system, from "
        "/proc): steadier than req/s when the load generator shares the machine. h2load (HTTP/2, and the "
        "upload: wrk stalls on 10 MB bodies) reports no percentiles (–)."
        + (f" Each scenario ran in {repeat} rounds, every proxy once per round (a neighbour on a shared VM weighs "
           "on all of them alike); a row is the proxy's median run by requests per CPU-second, with the medians of "
           "its runs' p50 and p99." if repeat > 1
           else ""),
        "",
        "| scenario | proxy | req/s | p50 ms | p99 ms | proxy CPU s | req per CPU-s | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = [s.name for g in groups for s in g.scenarios]
    for scenario in dict.fromkeys(names):
        for proxy in ("haproxy", "nginx", "tidegate", NO_LOG, FLOOR, TWO_WORKERS, CAPPED_ONE, CAPPED_TWO, EDGE_NONE,
                      EDGE_GLOBAL):
            r = by.get((proxy, scenario))
            if r:
                lines.append(f"| {scenario} | {proxy} | {r.rps:.0f} | {_ms(r.p50_ms)} | {_ms(r.p99_ms)} | "
                             f"{r.cpu_s:.2f} | {r.per_cpu_second:.0f} | {r.errors} |")
    lines += ["", "| scenario | tidegate ÷ HAProxy (req per CPU-s) | tidegate ÷ nginx | p99 tidegate ÷ HAProxy |",
              "|---|---:|---:|---:|"]
    for scenario in dict.fromkeys(names):
        t, h, n = (by.get((p, scenario)) for p in ("tidegate", "haproxy", "nginx"))
        if t and h and h.per_cpu_second:
            p99 = f"{t.p99_ms / h.p99_ms:.2f}" if t.p99_ms and h.p99_ms else "–"
            to_nginx = f"{t.per_cpu_second / n.per_cpu_second:.2f}" if n and n.per_cpu_second else "–"
            lines.append(f"| {scenario} | {t.per_cpu_second / h.per_cpu_second:.2f} | {to_nginx} | {p99} |")
    for group in groups:
        first = group.scenarios[0].name
        logged, unlogged = by.get(("tidegate", first)), by.get((NO_LOG, first))
        if logged and unlogged and unlogged.per_cpu_second:
            runs = f"the median of {repeat} runs each" if repeat > 1 else "one run each"
            lines.append(f"\nThe JSON access log costs {100 * (1 - logged.per_cpu_second / unlogged.per_cpu_second):.0f} "
                         f"% of tidegate's requests per CPU-second on \"{first}\" ({runs}: a few % is noise).")
    floor, haproxy, tidegate = (by.get((p, names[0])) for p in (FLOOR, "haproxy", "tidegate"))
    if floor and haproxy and tidegate and haproxy.per_cpu_second and floor.per_cpu_second:
        lines.append(f"\nA minimal uvloop + httptools proxy (`benchmarks/minimal_proxy.py`: bytes passed through, "
                     f"nothing else) reaches {floor.per_cpu_second / haproxy.per_cpu_second:.2f}× HAProxy's requests "
                     f"per CPU-second on \"{names[0]}\": the floor for a Python proxy on this machine. tidegate "
                     f"reaches {100 * tidegate.per_cpu_second / floor.per_cpu_second:.0f} % of that floor.")
    base = by.get(("tidegate", names[0]))
    if metric_seconds and base and base.per_cpu_second:
        share = 100 * metric_seconds * base.per_cpu_second
        lines.append(f"\nPrometheus metrics cost {metric_seconds * 1e6:.2f} µs of CPU per request (counts kept with "
                     f"the rule: a count, two latency buckets and their sums), {share:.1f} % of tidegate's CPU per "
                     f"request on \"{names[0]}\".")
    one = next((r for r in results if r.proxy == "tidegate" and "workers" in r.scenario), None)
    two = next((r for r in results if r.proxy == TWO_WORKERS), None)
    if one and two and one.rps:
        lines.append(f"\n2 workers serve {two.rps / one.rps:.2f}× the requests per second of 1 (target 1.7×). On 2 "
                     "cores the load generator and the backends share a core with the second worker, so this is "
                     "a floor, not the scaling a machine with spare cores would show. What this machine can show: "
                     f"per CPU-second, 2 workers serve {two.per_cpu_second / one.per_cpu_second:.2f}× what 1 does. "
                     "The workers share nothing on the request path (each has its own event loop, endpoint "
                     "connections and caches; SO_REUSEPORT spreads the connections), so each added core adds "
                     "about one worker's requests per second.")
    one = next((r for r in results if r.proxy == CAPPED_ONE), None)
    two = next((r for r in results if r.proxy == CAPPED_TWO), None)
    if one and two and one.rps:
        lines.append(f"\nWith each serving process held to {100 * CAP_SHARE:.0f} % of core {PROXY_CORE} by a CPU "
                     f"quota, two workers fit on the proxies' core and neither shares the load generator's: there, "
                     f"2 workers serve {two.rps / one.rps:.2f}× the requests per second of 1 (target 1.7×). Core "
                     f"{LOAD_CORE} (wrk and the backends) was {100 * two.load_core_busy:.0f} % busy during the "
                     f"2-worker run{' (so the load generator was not the limit)' if two.load_core_busy < 0.9 else ''}.")
    for group in groups:
        if not group.edge:
            continue
        scenario = group.scenarios[0].name
        costs = (paired or {}).get(scenario, {})

        def cost(label: str) -> str:
            found = sorted(costs.get(label, []))
            if not found:
                return "not measured"
            spread = f" (rounds: {', '.join(f'{c:.1f}' for c in found)})" if len(found) > 1 else ""
            return f"{_median(found):.1f} %{spread}"

        text = (f"\nEdge protection (\"{scenario}\"): the TrafficPolicy with the two address lists and a local "
                f"rate limit costs {cost('local')} of tidegate's requests per CPU-second against the same route "
                "without it in the same round (the median of the rounds; target: 5 % at most)")
        if costs.get("global"):
            text += (f"; with the limit counted in Redis, {cost('global')} (target: 10 % at most; Redis on "
                     "the load generator's core)")
            lines.append(text + ". HAProxy (a stick table, `src -f` lists) and nginx (`limit_req`, `allow`/`deny`) "
                                "run the same checks in the rows above.")
    for note in notes or []:
        lines.append(f"\n{note}")
    if control:
        lines += ["", "## Control plane", "", *control]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
