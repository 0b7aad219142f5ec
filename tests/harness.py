"""Real processes and sockets for end-to-end tests: tidegate and echo backends on loopback addresses.

Every process started here is stopped by its context manager (the tests leave nothing running).
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TIDEGATE = [sys.executable, "-m", "tidegate"]


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, and one this test run has not handed out before: the kernel may give
    a just-closed port again, and two listeners a test means to keep apart (a Gateway and the admin API,
    say) would then ask for the same port."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no fresh free port on {host}")


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {_output(proc)}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s: {_output(proc)}")


def _output(proc: subprocess.Popen) -> str:
    log = getattr(proc, "log_path", None)
    return Path(log).read_text()[-3000:] if log and Path(log).exists() else ""


@contextmanager
def process(args: list[str], log_path: Path, ready: tuple[str, int] | None = None,
            timeout: float = 15.0, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    try:
        if ready:
            wait_for_port(*ready, proc, timeout=timeout)
        yield proc
    except BaseException:
        # What the process said is the first thing to read when a test around it fails (pytest shows it).
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        text = Path(log_path).read_text(errors="replace")
        print(f"--- the last of {log_path} ({' '.join(args[:4])} ...) ---\n{text[-6000:]}")
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def echo_servers(pods: dict[tuple[str, int], str], log_path: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """pods: (address, port) → "namespace/pod" (with "+tls" for a TLS port; extra args give the certificate)."""
    args = [*TIDEGATE, "echo", "--log-requests", *extra]
    for (address, port), who in pods.items():
        args += ["--listen", f"{address}:{port}={who}"]
    first = next(iter(pods))
    with process(args, log_path, ready=first) as proc:
        for address, port in pods:
            wait_for_port(address, port, proc)
        yield proc


@contextmanager
def tidegate_run(config_dir: Path, ready: tuple[str, int], log_path: Path, *extra: str,
                 timeout: float = 15.0) -> Iterator[subprocess.Popen]:
    """`tidegate run` on a config folder; its admin listener is on a free loopback port (proc.admin_port).
    `timeout`: seconds to wait for the port to open (a large configuration takes a while to load)."""
    admin_port = free_port()
    args = [*TIDEGATE, "run", "-f", str(config_dir), "--admin", f"127.0.0.1:{admin_port}", *extra]
    with process(args, log_path, ready=ready, timeout=timeout) as proc:
        proc.admin_port = admin_port  # type: ignore[attr-defined]
        # A worker opens the port a moment before the control process hears that it applied the config.
        wait_until(lambda: "serving config version" in Path(log_path).read_text(errors="replace"), timeout=30,
                   what="the first configuration applied")
        yield proc


def children(pid: int, workers_only: bool = True) -> list[int]:
    """A tidegate process's workers (multiprocessing's spawn_main), or every child (its resource tracker too)."""
    try:
        found = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    if not workers_only:
        return found
    workers = []
    for child in found:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except FileNotFoundError:
            continue
    return workers


def worker_pid(proc: subprocess.Popen) -> int:
    """The process that serves traffic for `tidegate run` with one worker (the run process is the control
    process: it loads and translates, and serves the admin API)."""
    [pid] = wait_until(lambda: children(proc.pid), what="the worker process")
    return pid


def wait_until(check, timeout: float = 10.0, what: str = ""):
    """Poll `check` until it returns something true (its value is returned). Connection errors and failed
    assertions inside it count as "not yet"; after `timeout` seconds, fail saying `what` was awaited."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, AssertionError, KeyError) as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what} (last: {last!r})")


def request(host: str, port: int, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None,
            body=None, timeout: float = 10.0, chunked: bool = False) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes (or the timeout)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def rss_high_water_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def reset_rss_high_water(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux: "5" to clear_refs), so a peak measures only what
    happens next."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def h2_request(host: str, port: int, authority: str, path: str, method: str = "GET", body: bytes = b"",
               tls_server_name: str | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/2 request: h2c with prior knowledge, or h2 over TLS (ALPN) when a server name is given."""
    import ssl

    import h2.config
    import h2.connection
    import h2.events

    raw = socket.create_connection((host, port), timeout=timeout)
    if tls_server_name:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        raw = ctx.wrap_socket(raw, server_hostname=tls_server_name)
        assert raw.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", method), (":path", path), (":scheme", "https" if tls_server_name else "http"),
                          (":authority", authority)], end_stream=not body)
    raw.sendall(conn.data_to_send())
    status, headers, data, done = 0, {}, bytearray(), False
    pending = memoryview(body)
    try:
        while pending:  # send the body as the server's flow-control windows allow
            window = min(conn.local_flow_control_window(1), conn.max_outbound_frame_size, len(pending))
            if window > 0:
                conn.send_data(1, bytes(pending[:window]), end_stream=window == len(pending))
                pending = pending[window:]
                raw.sendall(conn.data_to_send())
                continue
            for event in conn.receive_data(raw.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = dict(event.headers)
                    status = int(headers[":status"])
            raw.sendall(conn.data_to_send())
        while not done:
            chunk = raw.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = dict(event.headers)
                    status = int(headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            raw.sendall(conn.data_to_send())
    finally:
        raw.close()
    return status, headers, bytes(data)
