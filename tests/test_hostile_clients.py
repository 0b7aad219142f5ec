"""Clients that try to make tidegate work or hold memory without bound: each is cut off at a limit, memory
stays flat, and other clients are answered meanwhile."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.harness import (
    echo_servers,
    free_port,
    request,
    reset_rss_high_water,
    rss_high_water_kb,
    rss_kb,
    tidegate_run,
    worker_pid,
)
from tests.manifests import http_gateway, route, service

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
        yield {"port": port, "worker": worker_pid(proxy), "log": tmp / "tidegate.log"}


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
