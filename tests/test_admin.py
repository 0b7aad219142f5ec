"""The admin listener: health, readiness, metrics that move with traffic, the JSON API, access control."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.harness import request
from tests.manifests import http_gateway
from tests.test_dataplane import GW_ADDR, stack  # noqa: F401  (the running stack fixture)
from tidegate.observe.admin import peer_allowed


def admin(stack, path: str) -> tuple[int, bytes]:  # noqa: F811
    status, _, body = request("127.0.0.1", stack["proxy"].admin_port, path)
    return status, body


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_health_and_readiness(stack):  # noqa: F811
    assert admin(stack, "/healthz") == (200, b"ok\n")
    assert admin(stack, "/readyz") == (200, b"ready\n")


def test_request_metrics_move_with_traffic(stack):  # noqa: F811
    route = "httproute/default/echo/rule/0"
    before = admin(stack, "/metrics")[1].decode()
    for _ in range(5):
        assert request(GW_ADDR, stack["port"], "/m", headers={"Host": "echo.test"})[0] == 200
    assert request(GW_ADDR, stack["port"], "/m", headers={"Host": "nowhere.test"})[0] == 404
    after = admin(stack, "/metrics")[1].decode()
    ok = dict(route=route, method="GET", code="2xx", listener="default/gw/http")
    assert metric(after, "tidegate_http_requests_total", **ok) - metric(before, "tidegate_http_requests_total", **ok) == 5
    assert metric(after, "tidegate_http_requests_total", route="", code="4xx") >= 1
    count = "tidegate_http_request_duration_seconds_count"
    assert metric(after, count, route=route) - metric(before, count, route=route) == 5
    upstream = "tidegate_http_upstream_duration_seconds_count"
    assert metric(after, upstream, route=route) - metric(before, upstream, route=route) == 5
    sent = "tidegate_http_response_body_bytes_total"
    assert metric(after, sent, route=route) - metric(before, sent, route=route) > 5 * 50  # echo JSON bodies
    assert request(GW_ADDR, stack["port"], "/m", method="POST", body=b"x" * 1000,
                   headers={"Host": "echo.test"})[0] == 200
    posted = admin(stack, "/metrics")[1].decode()
    received = "tidegate_http_request_body_bytes_total"
    assert metric(posted, received, route=route) - metric(after, received, route=route) == 1000
    assert metric(after, "tidegate_config_version") >= 1
    assert metric(after, "tidegate_http_connections_accepted_total") >= 6
    # bounded labels: no raw path anywhere
    assert "/m" not in after


def test_json_api_shows_status_routes_and_explain(stack):  # noqa: F811
    status, body = admin(stack, "/api/v1/status")
    assert status == 200
    statuses = {(s["kind"], s["name"]): s["status"] for s in json.loads(body)}
    assert statuses[("HTTPRoute", "echo")]["parents"][0]["conditions"][0]["status"] == "True"
    config = json.loads(admin(stack, "/api/v1/config")[1])
    assert config["ready"] and config["version"] >= 1 and "default/gw/http" in config["listeners"]
    routes = json.loads(admin(stack, "/api/v1/routes")[1])
    assert any(r["name"] == "httproute/default/echo/rule/0" for lst in routes["listeners"] for r in lst.get("http_routes", []))
    url = f"http://echo.test:{stack['port']}/x"
    answer = json.loads(admin(stack, f"/api/v1/explain?url={url}")[1])
    assert answer["route"] == "httproute/default/echo/rule/0" and answer["backends"][0]["endpoints"]
    assert admin(stack, "/api/v1/nope")[0] == 404


def test_without_a_token_loopback_alone_and_with_one_whoever_has_it():
    assert peer_allowed("127.0.0.1", None, "")
    assert peer_allowed("::1", None, "")
    assert not peer_allowed("10.1.2.3", None, "")  # no token configured: outside is refused
    assert not peer_allowed("10.1.2.3", None, "s3cret")
    assert not peer_allowed("10.1.2.3", "Bearer wrong", "s3cret")
    assert peer_allowed("10.1.2.3", "Bearer s3cret", "s3cret")
    # With a token, loopback needs it too: a mesh sidecar relays remote clients from 127.0.0.6.
    assert not peer_allowed("127.0.0.6", None, "s3cret")
    assert peer_allowed("127.0.0.6", "Bearer s3cret", "s3cret")
    assert peer_allowed("127.0.0.6", None, "s3cret", trust_loopback=True)


def test_the_token_comes_from_a_file_never_the_command_line(tmp_path):
    import socket

    from tests.harness import free_port, tidegate_run

    config = tmp_path / "config"
    config.mkdir()
    port, metrics = free_port(), free_port()
    (config / "c.yaml").write_text(http_gateway("127.0.0.1", port))
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    refused = subprocess.run([sys.executable, "-m", "tidegate", "run", "-f", str(config), "--admin-token", "s3cret"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "--admin-token-file" in refused.stderr
    with tidegate_run(config, ("127.0.0.1", port), tmp_path / "tidegate.log", "--admin-token-file", str(token),
                      "--metrics", f"127.0.0.1:{metrics}") as proxy:
        def get(path: str, token: str = "", at: int = proxy.admin_port) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return request("127.0.0.1", at, path, headers=headers)[0]

        assert get("/api/v1/config") == 401  # loopback too
        assert get("/api/v1/config", "s3cret") == 200
        assert get("/readyz") == 200 and get("/healthz") == 200  # kubelet probes need none
        assert "s3cret" not in " ".join(open(f"/proc/{proxy.pid}/cmdline").read().split("\0"))
        # The metrics listener: /metrics for anyone (Prometheus's scrape annotations carry no token), nothing else.
        assert get("/metrics", at=metrics) == 200 and get("/healthz", at=metrics) == 200
        assert get("/api/v1/config", at=metrics) == 404 and get("/api/v1/config", "s3cret", at=metrics) == 404
        # A request head over 8 KiB is refused before it is read further.
        with socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20_000)
            assert sock.recv(100).startswith(b"HTTP/1.1 431 ")


def test_every_path_of_the_openapi_description_answers(stack):  # noqa: F811
    status, body = admin(stack, "/api/v1/openapi.json")
    assert status == 200
    spec = json.loads(body)
    assert spec["openapi"].startswith("3.")
    url = f"http://echo.test:{stack['port']}/"
    for path in spec["paths"]:
        query = f"?url={url}" if path == "/api/v1/explain" else ""
        assert admin(stack, path + query)[0] == 200, path


def _netns_available() -> bool:
    import os
    import shutil

    return os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.mark.skipif(not _netns_available(), reason="needs root and iproute2 for a network namespace")
def test_a_client_from_another_host_needs_the_token(tmp_path):
    """A real non-loopback client: a network namespace joined to this one by a veth pair (198.18.213.0/24, which
    exists only on these two ends). The admin listener is bound to this side's address."""
    import os
    import subprocess

    from tests.harness import free_port, tidegate_run

    ns, host_if, ns_if = f"tgadm{os.getpid()}", f"tgh{os.getpid() % 100000}", f"tgn{os.getpid() % 100000}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    def get(path: str, token: str = "") -> int:
        code = ("import urllib.request, urllib.error\n"
                f"r = urllib.request.Request('http://198.18.213.1:{admin}{path}')\n"
                + (f"r.add_header('Authorization', 'Bearer {token}')\n" if token else "")
                + "try:\n print(urllib.request.urlopen(r, timeout=5).status)\n"
                  "except urllib.error.HTTPError as e:\n print(e.code)\n")
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", "198.18.213.1/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", "198.18.213.2/24", "dev", ns_if)
        ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        config = tmp_path / "config"
        config.mkdir()
        port = free_port()
        (config / "c.yaml").write_text(http_gateway("127.0.0.1", port))
        admin = free_port()
        token = tmp_path / "token"
        token.write_text("s3cret")
        with tidegate_run(config, ("127.0.0.1", port), tmp_path / "tidegate.log", "--admin",
                          f"198.18.213.1:{admin}", "--admin-token-file", str(token)):
            assert get("/api/v1/config") == 401  # no token
            assert get("/api/v1/config", "wrong") == 401
            assert get("/api/v1/config", "s3cret") == 200
            assert get("/healthz") == 200  # probes need none
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
