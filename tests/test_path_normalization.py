"""Request paths are normalised before routing (RFC 3986 section 6.2.2, as nginx, Envoy and Traefik do), and
pods receive the normalised path: `/public/../admin` is a request for /admin, never one for /public."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, strategies as st

from tests.harness import free_port, process, tidegate_run
from tests.manifests import http_gateway, route, service
from tests.test_ingress_nginx import _nginx_pod
from tidegate.router import normal_path

NGINX = shutil.which("nginx")
CURL = shutil.which("curl")


@pytest.mark.parametrize("sent, normal", [
    ("/", "/"), ("/a/b", "/a/b"), ("/a/b/", "/a/b/"),
    ("//", "/"), ("////uuid", "/uuid"), ("/a//b///c/", "/a/b/c/"),
    ("/./uuid", "/uuid"), ("/a/.", "/a/"), ("/a/./b", "/a/b"),
    ("/ip/abc/../../uuid", "/uuid"), ("/a/b/..", "/a/"), ("/../x", "/x"), ("/a/b/../../..", "/"),
    ("/public/../admin", "/admin"), ("/%2e%2e/admin", "/admin"), ("/public/%2E%2E/admin", "/admin"),
    ("/%75uid", "/uuid"), ("/a%7Eb", "/a~b"),
    ("/a%2fb", "/a%2Fb"), ("/a%2F..%2Fb", "/a%2F..%2Fb"),  # an escaped slash is no separator
    ("/a%zz", "/a%zz"), ("/a%", "/a%"), ("/a%2", "/a%2"),  # not escapes: as they came
    ("/a/...", "/a/..."), ("/.well-known/acme", "/.well-known/acme"), ("/a..b/c", "/a..b/c"),
    ("*", "*"),  # OPTIONS *
])
def test_normal_forms(sent, normal):
    assert normal_path(sent) == normal


PATHS = st.lists(st.sampled_from(["", ".", "..", "a", "b", "%2e", "%2E%2e", "%41", "%2f", "%zz", "x.y"]),
                 max_size=8).map(lambda segments: "/" + "/".join(segments))


@given(PATHS)
def test_a_normal_path_has_no_dot_segments_or_empty_ones_and_stays_as_it_is(path):
    normal = normal_path(path)
    assert normal.startswith("/")
    segments = normal.split("/")[1:]
    assert not {".", ".."} & set(segments)
    assert "" not in segments[:-1]  # no "//"; only a last empty segment (a trailing slash)
    assert "%2e" not in normal.lower() and "%41" not in normal
    assert normal_path(normal) == normal


@pytest.mark.skipif(NGINX is None or CURL is None, reason="nginx and curl are not installed (scripts/test does)")
def test_dot_segments_reach_the_rule_and_the_pod_of_the_normal_path(tmp_path):
    """Over HTTP/1.1 and HTTP/2 (curl as the client, sending paths as written; Debian's nginx as the pod,
    saying the request URI it received): a rule for /public does not take /public/../admin, and the pod
    receives the normal path."""
    gw, pod = "127.0.0.1", "127.0.16.1"
    port, pod_port = free_port(gw), free_port(pod)
    conf = _nginx_pod(tmp_path, f"""
    listen {pod}:{pod_port};
    merge_slashes off;
    location / {{ return 200 "$request_uri"; }}""")
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        http_gateway(gw, port) + service("public", [(pod, pod_port, "pod")])
        + route("public", "app.test", "- matches: [{path: {type: PathPrefix, value: /public}}]\n"
                                      "  backendRefs: [{name: public, port: 80}]"))
    with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                 ready=(pod, pod_port)), tidegate_run(config, (gw, port), tmp_path / "tidegate.log"):
        for http2 in ((), ("--http2-prior-knowledge",)):
            def get(path: str) -> tuple[str, str]:
                done = subprocess.run([CURL, "-s", "--path-as-is", *http2, "-o", "-", "-w", "|%{http_code}",
                                       "-H", "Host: app.test", f"http://{gw}:{port}{path}"],
                                      capture_output=True, text=True, timeout=20, check=True)
                body, _, status = done.stdout.rpartition("|")
                return status, body
            assert get("/public/x") == ("200", "/public/x"), http2
            assert get("/public/../admin")[0] == "404", http2
            assert get("/public/%2e%2e/admin")[0] == "404", http2
            assert get("/public//./x/../y") == ("200", "/public/y"), http2
            assert get("/other/../public/%78?q=/..") == ("200", "/public/x?q=/.."), http2
