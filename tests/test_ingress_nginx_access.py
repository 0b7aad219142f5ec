"""ingress-nginx's access and balancing annotations on a running tidegate: CORS and cookie affinity as
testdata/ingress-nginx/access.yaml says (cases from ingress-nginx's e2e tests), basic authentication checked
against Debian's nginx reading the same htpasswd file (hashes made by Apache's htpasswd and by openssl),
sticky sessions and upstream-hash-by over HTTP/1.1 and HTTP/2, and proxy-read-timeout against a slow pod.
curl is the client throughout.
"""

from __future__ import annotations

import base64
import http.server
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.certs import tls_secret_yaml
from tests.harness import free_port, process, tidegate_run, wait_until
from tests.test_ingress_nginx import CLASS, _nginx_pod, _routers
from tests.test_ingress_nginx import _service as nginx_service
from tidegate.dataplane import basic_auth

ROOT = Path(__file__).resolve().parent.parent
CASES = yaml.safe_load((ROOT / "testdata" / "ingress-nginx" / "access.yaml").read_text())["cases"]
NGINX = shutil.which("nginx")
CURL = shutil.which("curl")
HTPASSWD = shutil.which("htpasswd")
OPENSSL = shutil.which("openssl")
PODS = ("127.0.10.1", "127.0.10.2", "127.0.10.3")
needs_tools = pytest.mark.skipif(NGINX is None or CURL is None, reason="nginx and curl are not installed "
                                                                       "(scripts/test does)")


def _service(name: str, port: int, pods: tuple[str, ...] = PODS) -> str:
    return nginx_service(name, pods, port)


def _ingress(name: str, host: str, annotations: dict[str, str], path: str = "/", service: str = "echo",
             tls: bool = False, namespace: str = "default", others: dict[str, str] | None = None) -> str:
    """An Ingress with ingress-nginx's `annotations` (keys without their prefix) and `others` as they are."""
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": name, "namespace": namespace,
                            "annotations": {**{f"nginx.ingress.kubernetes.io/{k}": str(v)
                                               for k, v in annotations.items()}, **(others or {})}},
               "spec": {"ingressClassName": "tidegate", "rules": [{"host": host, "http": {"paths": [
                   {"path": path, "pathType": "Prefix",
                    "backend": {"service": {"name": service, "port": {"number": 80}}}}]}}]}}
    if tls:
        ingress["spec"]["tls"] = [{"hosts": [host], "secretName": f"{name}-tls"}]
        return "---\n" + yaml.safe_dump(ingress) + "---\n" + tls_secret_yaml(namespace, f"{name}-tls", [host])
    return "---\n" + yaml.safe_dump(ingress)


def _pods(tmp: Path, port: int, extra: str = "", files: bool = False) -> Path:
    """Debian's nginx as three pods (one address each), answering 200 and their name to anything."""
    servers = "".join(f"""
  }}
  server {{
    listen {pod}:{port};
    location / {{ return 200 "pod-{n}"; }}""" for n, pod in enumerate(PODS))
    return _nginx_pod(tmp, servers.removeprefix("\n  }\n  server {") + extra, files)


def _curl(port: int, host: str, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None,
          scheme: str = "http", extra: tuple[str, ...] = (), address: str = "127.0.0.1"
          ) -> tuple[int, list[tuple[str, str]], str]:
    """One request with curl to `address`: the status, the response's header fields in order, the body."""
    args = [CURL, "-sk", "-D", "-", "-X", method, "--resolve", f"{host}:{port}:{address}", *extra]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, f"{scheme}://{host}:{port}{path}"], capture_output=True, text=True, timeout=20,
                         check=True).stdout
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    fields = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]) if k]
    return int(lines[0].split()[1]), fields, body


def _values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in fields if k.lower() == name.lower()]


@needs_tools
def test_cors_and_affinity_cookies_as_ingress_nginx_sets_them(tmp_path):
    """Every request of access.yaml through a running tidegate: its status and the headers its source saw."""
    pod_port, http_port = free_port(PODS[0]), free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(CLASS + _service("echo", pod_port) + "".join(
        _ingress(f"case-{n}", f"case-{n}.test", case["annotations"], case.get("path", "/"))
        for n, case in enumerate(CASES)))
    failures = []
    with process([NGINX, "-p", str(tmp_path), "-c", str(_pods(tmp_path, pod_port)), "-g", "daemon off;"],
                 tmp_path / "nginx.log", ready=(PODS[0], pod_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port)):
        for n, case in enumerate(CASES):
            for want in case["requests"]:
                status, fields, _ = _curl(http_port, f"case-{n}.test", want.get("url_path", "/"), want["method"],
                                          want.get("headers"))
                what = f"{case['name']} ({case['source']}): {want['method']} {want.get('headers', {})}"
                wrong = [f"status {status}"] if status != want["status"] else []
                for name, value in (want.get("equal") or {}).items():
                    if _values(fields, name) != [str(value)]:
                        wrong.append(f"{name}: {_values(fields, name)}, expected [{value!r}]")
                wrong += [f"{name} present" for name in want.get("absent", ()) if _values(fields, name)]
                cookies = _values(fields, "Set-Cookie")
                if "cookie" in want:
                    if len(cookies) != 1:
                        wrong.append(f"Set-Cookie: {cookies}")
                    else:
                        parts = [p.strip() for p in cookies[0].split(";")]
                        wrong += [f"cookie lacks {p!r}: {cookies[0]}" for p in want["cookie"]
                                  if not any(part.startswith(p) for part in parts)]
                        wrong += [f"cookie has {p!r}: {cookies[0]}" for p in want.get("cookie_absent", ())
                                  if any(part.startswith(p) for part in parts)]
                if wrong:
                    failures.append(f"{what}: " + "; ".join(wrong))
    assert not failures, "\n".join(failures)


def _htpasswd_lines() -> dict[str, tuple[str, str]]:
    """user → (password, htpasswd line), hashed by Apache's htpasswd and by openssl (the tools people use)."""
    made: dict[str, tuple[str, str]] = {}

    def run(*args: str) -> str:
        return subprocess.run(args, capture_output=True, text=True, check=True, timeout=20).stdout.strip()

    for user, flags in (("apr1", ["-m"]), ("bcrypt", ["-B", "-C", "5"]), ("sha1", ["-s"]), ("crypt", ["-d"])):
        password = f"{user}-Pa55"[:8] if user == "crypt" else f"{user}-Pa55:word"  # (DES reads 8 characters)
        made[user] = (password, run(HTPASSWD, "-nb", *flags, user, password))  # type: ignore[arg-type]
    for user, flag in (("md5", "-1"), ("sha256", "-5"), ("sha512", "-6")):
        password = f"{user}-secret"
        made[user] = (password, f"{user}:" + run(OPENSSL, "passwd", flag, password))  # type: ignore[arg-type]
    made["plain"] = ("plain-text", "plain:{PLAIN}plain-text")
    made["empty"] = ("", "empty:")  # ingress-nginx's e2e "invalid content": nobody gets in
    return made


def _secret(name: str, data: dict[str, str], namespace: str = "default") -> str:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return "---\n" + yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                     "metadata": {"name": name, "namespace": namespace}, "data": encoded})


@needs_tools
@pytest.mark.skipif(HTPASSWD is None or OPENSSL is None, reason="htpasswd (apache2-utils) and openssl are not "
                                                                "installed (scripts/test installs them)")
def test_basic_auth_lets_in_whom_nginx_lets_in(tmp_path):
    """auth-type basic with an htpasswd Secret: for every user and a right, a wrong, an empty and a malformed
    password, tidegate answers as Debian's nginx reading the same file does (200 or 401, and the realm); an
    auth-map Secret works the same; a missing or other-namespace Secret makes the paths answer 503 and other
    Ingresses serve on; a 401 carries the CORS headers; HTTP/2 too."""
    users = _htpasswd_lines()
    htpasswd = "".join(line + "\n" for _, line in users.values())
    assert not [line for line in basic_auth.unreadable(htpasswd) if "empty" not in line]
    (tmp_path / "htpasswd").write_text(htpasswd)
    pod_port, front_port, http_port = free_port(PODS[0]), free_port("127.0.10.4"), free_port()
    conf = _pods(tmp_path, pod_port, f"""
  }}
  server {{
    listen 127.0.10.4:{front_port};
    auth_basic "Protected Area";
    auth_basic_user_file {tmp_path}/htpasswd;
    location / {{ root {tmp_path}/www; }}""", files=True)  # (a file, not `return`: that answers before access checks)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("in")
    config = tmp_path / "config"
    config.mkdir()
    auth = {"auth-type": "basic", "auth-secret": "basic-auth", "auth-realm": "Protected Area"}
    apr1 = users["apr1"]
    (config / "all.yaml").write_text(
        CLASS + _service("echo", pod_port) + _secret("basic-auth", {"auth": htpasswd})
        + _secret("basic-map", {"apr1": apr1[1].split(":", 1)[1]})
        + _secret("elsewhere", {"auth": htpasswd}, "other")
        + _ingress("file", "file.test", auth)
        + _ingress("map", "map.test", {**auth, "auth-secret": "basic-map", "auth-secret-type": "auth-map"})
        + _ingress("missing", "missing.test", {**auth, "auth-secret": "no-such-secret"})
        + _ingress("across", "across.test", {**auth, "auth-secret": "other/elsewhere"})
        + _ingress("cors", "cors.test", {**auth, "enable-cors": "true"})
        + _ingress("open", "open.test", {}))
    credentials: list[tuple[str, str]] = []
    for user, (password, _) in users.items():
        credentials += [(user, password), (user, password + "x"), (user, ""), ("nobody", password)]
    with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                 ready=(PODS[0], pod_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port)):
        disagree = []
        for user, password in credentials:
            header = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
            nginx_status = _curl(front_port, "front.test", headers=header, address="127.0.10.4")[0]
            ours = _curl(http_port, "file.test", headers=header)[0]
            if ours != nginx_status:
                disagree.append(f"{user}:{password!r}: tidegate {ours}, nginx {nginx_status}")
        assert not disagree, "\n".join(disagree)
        # Both refused and let in, for each kind of hash: the comparison above compared something.
        for user, (password, _) in users.items():
            want = 401 if user == "empty" else 200
            assert _curl(http_port, "file.test", extra=("-u", f"{user}:{password}"))[0] == want, user
        for probe in ({}, {"Authorization": "Basic !!!"}, {"Authorization": "Bearer abc"}):
            status, fields, _ = _curl(http_port, "file.test", headers=probe)
            assert status == _curl(front_port, "front.test", headers=probe, address="127.0.10.4")[0] == 401, probe
            assert _values(fields, "WWW-Authenticate") == ['Basic realm="Protected Area"']
        assert _curl(http_port, "map.test", extra=("-u", f"apr1:{apr1[0]}"))[0] == 200
        assert _curl(http_port, "map.test", extra=("-u", "apr1:wrong"))[0] == 401
        assert _curl(http_port, "missing.test", extra=("-u", f"apr1:{apr1[0]}"))[0] == 503
        assert _curl(http_port, "across.test", extra=("-u", f"apr1:{apr1[0]}"))[0] == 503
        assert _curl(http_port, "open.test")[0] == 200
        status, fields, _ = _curl(http_port, "cors.test")
        assert status == 401 and _values(fields, "Access-Control-Allow-Origin") == ["*"]
        for extra in (("--http2-prior-knowledge",), ("--http2-prior-knowledge", "-u", f"sha512:{users['sha512'][0]}")):
            status, _, body = _curl(http_port, "file.test", extra=extra)
            assert status == (200 if "-u" in extra else 401) and (body.startswith("pod-") or "-u" not in extra)


def _pod_of(body: str) -> str:
    assert body.startswith("pod-"), body
    return body


@needs_tools
def test_sticky_sessions_and_upstream_hash_by(tmp_path):
    """affinity: cookie sends a client with the cookie to one pod every time (HTTP/1.1, and HTTP/2 over TLS,
    where the cookie is Secure); clients without it are spread; upstream-hash-by $http_x_user keeps each user
    on one pod."""
    pod_port, http_port, https_port = free_port(PODS[0]), free_port(), free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        CLASS + _service("echo", pod_port)
        + _ingress("sticky", "sticky.test", {"affinity": "cookie", "ssl-redirect": "false"}, tls=True)
        + _ingress("hashed", "hashed.test", {"upstream-hash-by": "$http_x_user"}))
    with process([NGINX, "-p", str(tmp_path), "-c", str(_pods(tmp_path, pod_port)), "-g", "daemon off;"],
                 tmp_path / "nginx.log", ready=(PODS[0], pod_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port), "--ingress-https-port", str(https_port)):
        spread = {_pod_of(_curl(http_port, "sticky.test")[2]) for _ in range(30)}
        assert len(spread) >= 2, spread
        for scheme, port, extra in (("http", http_port, ()), ("https", https_port, ("--http2",))):
            status, fields, body = _curl(port, "sticky.test", scheme=scheme, extra=extra)
            assert status == 200, (scheme, status)
            [cookie] = _values(fields, "Set-Cookie")
            assert cookie.startswith("INGRESSCOOKIE=") and "HttpOnly" in cookie, cookie
            assert ("Secure" in cookie) == (scheme == "https"), cookie
            sent = {"Cookie": cookie.split(";")[0]}
            seen = {_pod_of(_curl(port, "sticky.test", headers=sent, scheme=scheme, extra=extra)[2])
                    for _ in range(12)}
            assert len(seen) == 1, (scheme, seen)
            assert not _values(_curl(port, "sticky.test", headers=sent, scheme=scheme, extra=extra)[1], "Set-Cookie")
        users = {}
        for user in (f"user-{n}" for n in range(12)):
            pods = {_pod_of(_curl(http_port, "hashed.test", headers={"X-User": user})[2]) for _ in range(4)}
            assert len(pods) == 1, (user, pods)
            users[user] = pods.pop()
        assert len(set(users.values())) >= 2, users


class _SlowPod(http.server.BaseHTTPRequestHandler):
    """GET /sleep/N: answers after N seconds."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        time.sleep(float(self.path.rsplit("/", 1)[1]))
        try:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"slept")
        except OSError:
            pass  # tidegate gave up on it

    def log_message(self, *args) -> None:
        pass


def test_proxy_read_timeout_sets_the_pods_silence_limit(tmp_path):
    """proxy-read-timeout replaces the run's --upstream-read-timeout for its Ingress's pods, longer or shorter:
    with the run's 1 s, a pod silent 2 s answers through an Ingress that allows 4 s, and one silent 9 s there
    gets 504 after about 4 s; through an Ingress without the annotation, 2 s of silence gets 504."""
    pod = http.server.ThreadingHTTPServer(("127.0.10.5", 0), _SlowPod)
    pod.daemon_threads = True
    threading.Thread(target=pod.serve_forever, daemon=True).start()
    http_port = free_port()
    config = tmp_path / "config"
    config.mkdir()

    def write(seconds: str) -> None:
        (config / "all.yaml").write_text(
            CLASS + _service("slow", pod.server_address[1], ("127.0.10.5",))
            + _ingress("patient", "patient.test", {"proxy-read-timeout": seconds}, service="slow")
            + _ingress("default", "default.test", {}, service="slow"))

    write("4")
    try:
        with tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                          "--ingress-http-port", str(http_port), "--upstream-read-timeout", "1"):
            assert _curl(http_port, "patient.test", "/sleep/2")[0] == 200
            started = time.monotonic()
            assert _curl(http_port, "patient.test", "/sleep/9")[0] == 504
            assert 3.9 <= time.monotonic() - started < 6.0
            started = time.monotonic()
            assert _curl(http_port, "default.test", "/sleep/2")[0] == 504
            assert time.monotonic() - started < 1.9
        # With the run's default (60 s), a 1 s proxy-read-timeout still ends within about a second: the
        # connections look as often as the shortest backend's limit needs (ingress2gateway's "short timeout").
        write("1")
        with tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate-2.log",
                          "--ingress-http-port", str(http_port)):
            started = time.monotonic()
            assert _curl(http_port, "patient.test", "/sleep/9")[0] == 504
            assert time.monotonic() - started < 1.9
            assert _curl(http_port, "default.test", "/sleep/2")[0] == 200
    finally:
        pod.shutdown()
        pod.server_close()


def test_balancing_annotations_become_the_backends_policy():
    """The translation: affinity over upstream-hash-by over load-balance, as balancer.lua chooses; the cookie's
    attributes; the timeouts; tidegate.io/ annotations winning section by section; bad values reported."""
    def policy_and_notes(annotations: dict[str, str]):
        _, translation = _routers(CLASS + _service("echo", 8080) + _ingress("probe", "probe.test", annotations,
                                                                             "/app"))
        route = next(r for listener in translation.ir.listeners for r in listener.http_routes
                     if r.hostnames == ("probe.test",))
        return route.backends[0].policy, [p.message for p in translation.notes]

    policy, notes = policy_and_notes({"affinity": "cookie", "upstream-hash-by": "$remote_addr", "load-balance": "ewma",
                                      "session-cookie-samesite": "lax", "session-cookie-max-age": "60",
                                      "proxy-connect-timeout": "3", "proxy-read-timeout": "120"})
    assert policy.algorithm == "ConsistentHash" and policy.hash.type == "Cookie" and not notes, notes
    assert (policy.hash.name, policy.hash.cookie_path, policy.hash.cookie_ttl) == ("INGRESSCOOKIE", "/app", 60.0)
    assert policy.hash.cookie_attributes == "; SameSite=Lax"
    assert (policy.connect_timeout, policy.read_timeout) == (3.0, 120.0)
    policy, _ = policy_and_notes({"upstream-hash-by": "$http_x_tenant_id", "load-balance": "ewma"})
    assert (policy.hash.type, policy.hash.name, policy.hash.cookie_ttl) == ("Header", "x-tenant-id", None)
    _, translation = _routers(CLASS + _service("echo", 8080) + _ingress(
        "probe", "probe.test", {"load-balance": "ewma", "proxy-connect-timeout": "2"},
        others={"tidegate.io/load-balance": "least-request"}))
    [policy] = {b.policy for listener in translation.ir.listeners for r in listener.http_routes for b in r.backends}
    assert (policy.algorithm, policy.connect_timeout) == ("LeastRequest", 2.0)  # the connect timeout is kept
    _, notes = policy_and_notes({"affinity": "ip", "upstream-hash-by": "$host$uri", "load-balance": "fastest",
                                 "proxy-read-timeout": "soon"})
    for key in ("affinity", "upstream-hash-by", "load-balance", "proxy-read-timeout"):
        assert any(f"/{key} ignored" in n for n in notes), (key, notes)


def test_convert_writes_a_backend_policy_a_traffic_policy_and_a_cors_filter():
    """convert: the balancing and timeout annotations become a BackendPolicy on the HTTPRoute, the protection
    ones a TrafficPolicy, which the converted set serves as the Ingress was served; enable-cors becomes
    HTTPRoute's CORS filter (approximated); basic authentication an HTTPRouteFilter (tidegate.io) the rule names."""
    from tidegate.convert import convert
    from tidegate.resources.loader import load_text
    from tidegate.translate import translate

    text = CLASS + _service("echo", 8080) + _ingress(
        "shop", "shop.test", {"affinity": "cookie", "session-cookie-path": "/", "session-cookie-max-age": "600",
                              "proxy-read-timeout": "120", "enable-cors": "true",
                              "cors-allow-origin": "https://a.example, null", "cors-allow-methods": "get, POST",
                              "auth-type": "basic", "auth-secret": "users", "limit-rps": "5",
                              "whitelist-source-range": "10.0.0.0/8", "limit-whitelist": "10.1.0.0/16",
                              "proxy-body-size": "1m"})
    loaded = load_text(text, "ingress")
    objects, report = convert(loaded.resources)
    [policy] = [o for o in objects if o["kind"] == "BackendPolicy"]
    [route] = [o for o in objects if o["kind"] == "HTTPRoute"]
    assert policy["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                             "name": route["metadata"]["name"]}]
    assert policy["spec"]["timeouts"] == {"read": "120s"}
    [cors] = [f["cors"] for f in route["spec"]["rules"][0]["filters"] if f["type"] == "CORS"]
    assert cors["allowOrigins"] == ["https://a.example"] and cors["allowMethods"] == ["GET", "POST"]
    others = [r.obj for r in loaded.resources if r.kind not in ("Ingress", "IngressClass")]
    converted = load_text("".join("---\n" + yaml.safe_dump(o) for o in objects + others), "converted")
    assert not converted.errors, converted.errors

    def served(resources):
        [backend] = [b for listener in translate(resources).ir.listeners for r in listener.http_routes
                     for b in r.backends if r.hostnames == ("shop.test",)]
        return backend.policy

    ingress, gateway_api = served(loaded.resources), served(converted.resources)
    assert (ingress.hash, ingress.read_timeout) == (gateway_api.hash, gateway_api.read_timeout) != (None, None)

    def guard(resources):
        [found] = {r.guard for listener in translate(resources).ir.listeners for r in listener.http_routes
                   if r.hostnames == ("shop.test",)}
        return (found.allow, found.deny, found.max_body, [(r.requests, r.period, r.burst, r.source_cidrs, r.exempt)
                                                          for r in found.rate_limits])

    assert guard(loaded.resources) == guard(converted.resources) == (
        ("10.0.0.0/8",), (), 1048576, [(0, 1.0, 0, ("10.1.0.0/16",), True), (5, 1.0, 25, (), False)])
    assert [o["kind"] for o in objects].count("TrafficPolicy") == 1
    verdicts = {e.field.removeprefix("nginx.ingress.kubernetes.io/"): e.verdict for e in report}
    assert verdicts["affinity"] == verdicts["proxy-read-timeout"] == "tidegate-policy"
    assert verdicts["enable-cors"] == "approximated" and verdicts["auth-type"] == "tidegate-policy"
    [auth] = [o for o in objects if o["kind"] == "HTTPRouteFilter"]
    assert auth["spec"] == {"basicAuth": {"secretName": "users", "secretType": "auth-file"}}
    named = {"type": "ExtensionRef", "extensionRef": {"group": "tidegate.io", "kind": "HTTPRouteFilter",
                                                      "name": auth["metadata"]["name"]}}
    assert named in route["spec"]["rules"][0]["filters"]
    assert verdicts["limit-rps"] == verdicts["proxy-body-size"] == "tidegate-policy"


def test_the_cluster_source_keeps_the_secrets_annotations_name_in_their_own_namespace_only():
    """With --kubernetes, Secrets and ConfigMaps are kept only when referenced: an Ingress's auth-secret,
    proxy-ssl-secret and custom-headers are, when in the Ingress's namespace (another namespace's is refused, so
    never read)."""
    from tidegate.resources.loader import load_text
    from tidegate.resources.model import Key
    from tidegate.sources.kubernetes import referenced

    auth = {"auth-type": "basic"}
    loaded = load_text(_ingress("mine", "a.test", {**auth, "auth-secret": "users"}, namespace="shop")
                       + _ingress("theirs", "b.test", {**auth, "auth-secret": "bank/vault"}, namespace="shop")
                       + _ingress("pods", "c.test", {"proxy-ssl-secret": "shop/pod-tls"}, namespace="shop")
                       + _ingress("headers", "d.test", {"custom-headers": "security"}, namespace="shop"), "x")
    wanted = referenced({r.key: r for r in loaded.resources})
    assert wanted == {Key("Secret", "shop", "users"), Key("Secret", "shop", "pod-tls"),
                      Key("ConfigMap", "shop", "security")}


@needs_tools
def test_external_auth_asks_the_service_as_ingress_nginx_does(tmp_path):
    """auth-url with Debian's nginx as the authentication service (it answers by the request's X-Token: 200
    with X-Auth-User and a cookie, 401 with a challenge, 403, 502) and as the pod (it says what it received):
    2xx lets the request through with auth-response-headers copied (a client's own copy replaced, a header the
    service did not send removed) and the cookie added; 401, 403 pass on; anything else is 500; auth-signin
    redirects a 401 with rd=; auth-proxy-set-headers adds a ConfigMap's headers; the URL's host may be a
    Service (its pods are asked) or an address; a broken annotation answers 503 and other Ingresses serve on;
    HTTP/2 too."""
    auth_port, pod_port, http_port = free_port("127.0.10.6"), free_port("127.0.10.7"), free_port()
    conf = _nginx_pod(tmp_path, f"""
    listen 127.0.10.6:{auth_port};
    location = /auth {{
      add_header X-Seen-Url $http_x_original_url always;
      add_header X-Seen-Method "$request_method $http_x_original_method" always;
      if ($http_x_token = "good") {{  # (add_header inside `if` replaces the location's)
        add_header X-Seen-Url $http_x_original_url always;
        add_header X-Seen-Method "$request_method $http_x_original_method" always;
        add_header X-Auth-User alice always;
        add_header Set-Cookie "session=s1; Path=/" always;
        return 200;
      }}
      if ($http_x_token = "forbidden") {{ return 403; }}
      if ($http_x_token = "broken") {{ return 502; }}
      add_header WWW-Authenticate 'Bearer realm="test"' always;
      return 401;
    }}
    location = /auth-extra {{
      if ($http_x_proxy_set = "from extra.test") {{ return 200; }}
      return 401;
    }}
  }}
  server {{
    listen 127.0.10.7:{pod_port};
    location / {{
      return 200 "$http_x_auth_user|$http_x_seen_url|$http_x_seen_method|$http_x_missing|$http_x_token";
    }}""")
    config = tmp_path / "config"
    config.mkdir()
    by_service = {"auth-url": "http://authsvc.default.svc.cluster.local:81/auth",
                  "auth-response-headers": "X-Auth-User, X-Seen-Url, X-Seen-Method, X-Missing"}
    (config / "all.yaml").write_text(
        CLASS + _service("echo", pod_port, ("127.0.10.7",)) + _service("authsvc", auth_port, ("127.0.10.6",)).replace(
            "port: 80,", "port: 81,") + _service("nobody", 9, ())
        + _ingress("app", "app.test", by_service)
        + _ingress("direct", "direct.test", {"auth-url": f"http://127.0.10.6:{auth_port}/auth"})
        + _ingress("signin", "signin.test", {**by_service, "auth-signin": "http://$host/auth/start"})
        + _ingress("down", "down.test", {"auth-url": "http://nobody.default.svc:80/auth"})
        + _ingress("broken", "broken.test", {"auth-url": "http://$nonsense/auth"})
        + "---\n" + yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "data": {"X-Proxy-Set": "from $host"},
                                    "metadata": {"name": "extra-headers", "namespace": "default"}})
        + _ingress("extra", "extra.test", {"auth-url": f"http://127.0.10.6:{auth_port}/auth-extra",
                                           "auth-proxy-set-headers": "extra-headers"})
        + _ingress("noextra", "noextra.test", {"auth-url": f"http://127.0.10.6:{auth_port}/auth-extra"})
        + _ingress("badextra", "badextra.test", {"auth-url": f"http://127.0.10.6:{auth_port}/auth-extra",
                                                 "auth-proxy-set-headers": "no-such-map"})
        + _ingress("open", "open.test", {}))
    with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                 ready=("127.0.10.6", auth_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port)):
        status, fields, _ = _curl(http_port, "app.test")
        assert status == 401 and _values(fields, "WWW-Authenticate") == ['Bearer realm="test"']
        status, fields, body = _curl(http_port, "app.test", "/shop?q=1", "POST",
                                     {"X-Token": "good", "X-Auth-User": "mallory", "X-Missing": "forged",
                                      "X-Original-URL": "http://app.test/public"})
        assert status == 200, (status, body)
        assert body == f"alice|http://app.test:{http_port}/shop?q=1|GET POST||good", body
        assert _values(fields, "Set-Cookie") == ["session=s1; Path=/"]
        assert _curl(http_port, "app.test", headers={"X-Token": "forbidden"})[0] == 403
        assert _curl(http_port, "app.test", headers={"X-Token": "broken"})[0] == 500
        assert _curl(http_port, "direct.test", headers={"X-Token": "good"})[0] == 200
        assert _curl(http_port, "direct.test")[0] == 401
        status, fields, _ = _curl(http_port, "signin.test", "/?a=b&c=d")
        assert status == 302 and _values(fields, "Location") == [
            f"http://signin.test/auth/start?rd=http://signin.test:{http_port}%2F%3Fa%3Db%26c%3Dd"], fields
        assert _curl(http_port, "down.test", headers={"X-Token": "good"})[0] == 500
        assert _curl(http_port, "broken.test", headers={"X-Token": "good"})[0] == 503
        assert _curl(http_port, "open.test")[0] == 200
        # auth-proxy-set-headers: the ConfigMap's headers (variables filled in) over the client's own
        assert _curl(http_port, "extra.test", headers={"X-Proxy-Set": "forged"})[0] == 200
        assert _curl(http_port, "noextra.test")[0] == 401
        assert _curl(http_port, "badextra.test")[0] == 503
        status, _, body = _curl(http_port, "app.test", headers={"X-Token": "good"}, extra=("--http2-prior-knowledge",))
        assert status == 200 and body.startswith("alice|"), (status, body)


@needs_tools
def test_custom_http_errors_and_default_backend(tmp_path):
    """custom-http-errors with default-backend: a pod's answer with a listed status is replaced by the
    default-backend's answer to GET / with X-Code, X-Original-URI, X-Service-Name ... (ingress-nginx's
    CUSTOM_ERRORS location); other statuses pass; a Service without ready endpoints is served by the
    default-backend; without a default-backend the pod's answer passes (reported). Debian's nginx is the pod
    and the error backend."""
    pod_port, pages_port, http_port = free_port("127.0.10.7"), free_port("127.0.10.8"), free_port()
    conf = _nginx_pod(tmp_path, f"""
    listen 127.0.10.7:{pod_port};
    location = /missing {{ return 404 "pod's own 404"; }}
    location = /broken {{ return 500 "pod's own 500"; }}
    location / {{ return 200 "app $request_uri"; }}
  }}
  server {{
    listen 127.0.10.8:{pages_port};
    location / {{
      return 200 "page $http_x_code $http_x_service_name:$http_x_service_port $http_x_original_uri $request_method \
$request_uri $http_x_ingress_name";
    }}""")
    config = tmp_path / "config"
    config.mkdir()
    pages = {"custom-http-errors": "404,503", "default-backend": "pages"}
    (config / "all.yaml").write_text(
        CLASS + _service("echo", pod_port, ("127.0.10.7",)) + _service("pages", pages_port, ("127.0.10.8",))
        + _service("gone", 9, ())
        + _ingress("shop", "shop.test", pages)
        + _ingress("empty", "empty.test", {"default-backend": "pages"}, service="gone")
        + _ingress("plain", "plain.test", {"custom-http-errors": "404"}))
    with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                 ready=("127.0.10.8", pages_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port)):
        assert _curl(http_port, "shop.test", "/missing?x=1")[::2] == (200, "page 404 echo:80 /missing?x=1 GET / shop")
        status, _, body = _curl(http_port, "shop.test", "/missing", "POST", extra=("--data", "a=b"))
        assert (status, body) == (200, "page 404 echo:80 /missing GET / shop")
        assert _curl(http_port, "shop.test", "/fine")[::2] == (200, "app /fine")
        assert _curl(http_port, "shop.test", "/broken")[::2] == (500, "pod's own 500")
        assert _curl(http_port, "empty.test", "/any/path")[::2] == (200, "page  :  GET /any/path ")
        assert _curl(http_port, "plain.test", "/missing")[::2] == (404, "pod's own 404")
        status, _, body = _curl(http_port, "shop.test", "/missing", extra=("--http2-prior-knowledge",))
        assert (status, body) == (200, "page 404 echo:80 /missing GET / shop")
        assert "custom-http-errors without a default-backend" in (tmp_path / "tidegate.log").read_text()


@needs_tools
def test_the_converted_set_authenticates_rewrites_and_serves_error_pages_as_the_ingress_did(tmp_path):
    """convert's HTTPRouteFilters (tidegate.io), named by ExtensionRef: basic authentication, a rewrite with
    capture groups and custom-http-errors pages, served from the Gateway API objects alone as tidegate served
    the Ingress (curl as the client, Debian's nginx as the pod and the error backend)."""
    from tidegate.convert import convert
    from tidegate.resources.loader import load_text
    from tidegate.translate import TranslateOptions

    pod_port, pages_port = free_port("127.0.10.7"), free_port("127.0.10.8")
    conf = _nginx_pod(tmp_path, f"""
    listen 127.0.10.7:{pod_port};
    location = /missing {{ return 404 "pod's own 404"; }}
    location / {{ return 200 "app $request_uri"; }}
  }}
  server {{
    listen 127.0.10.8:{pages_port};
    location / {{ return 200 "page $http_x_code $http_x_original_uri $http_x_service_name"; }}""")
    text = (CLASS + _service("echo", pod_port, ("127.0.10.7",)) + _service("pages", pages_port, ("127.0.10.8",))
            + "---\n" + yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                        "metadata": {"name": "users", "namespace": "default"},
                                        "stringData": {"auth": "foo:{PLAIN}bar\n"}})
            + _ingress("shop", "shop.test", {"use-regex": "true", "rewrite-target": "/$2", "auth-type": "basic",
                                             "auth-secret": "users", "custom-http-errors": "404",
                                             "default-backend": "pages"}, path="/shop(/|$)(.*)"))
    loaded = load_text(text, "ingress")
    port = free_port()
    objects, report = convert(loaded.resources, options=TranslateOptions(ingress_http_port=port))
    assert {o["kind"] for o in objects} >= {"Gateway", "HTTPRoute", "HTTPRouteFilter"}
    assert {e.verdict for e in report if "auth" in e.field or "errors" in e.field or "rewrite" in e.field} == {
        "tidegate-policy"}
    others = [r.obj for r in loaded.resources if r.kind not in ("Ingress", "IngressClass")]
    answers = {}
    for name, content in (("ingress", text), ("converted", "".join("---\n" + yaml.safe_dump(o)
                                                                     for o in objects + others))):
        config = tmp_path / name
        config.mkdir()
        (config / "all.yaml").write_text(content)
        with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                     ready=("127.0.10.8", pages_port)), \
                tidegate_run(config, ("127.0.0.1", port), tmp_path / f"tidegate-{name}.log",
                             "--ingress-http-port", str(port)):
            answers[name] = [_curl(port, "shop.test", path, headers=headers)[::2] for path, headers in (
                ("/shop/x", {}), ("/shop/x", {"Authorization": "Basic Zm9vOmJhcg=="}),
                ("/SHOP/a/b?q=1", {"Authorization": "Basic Zm9vOmJhcg=="}),
                ("/shop/missing", {"Authorization": "Basic Zm9vOmJhcg=="}))]
    assert answers["ingress"][1:] == [(200, "app /x"), (200, "app /a/b?q=1"), (200, "page 404 /shop/missing echo")]
    assert answers["ingress"][0][0] == 401
    assert answers["converted"] == answers["ingress"]


ACCESS_INJECTION_KEYS = {
    # key: the annotations that make it read (a key alone may not be)
    "cors-allow-origin": {"enable-cors": "true"}, "cors-allow-methods": {"enable-cors": "true"},
    "cors-allow-headers": {"enable-cors": "true"}, "cors-expose-headers": {"enable-cors": "true"},
    "auth-realm": {"auth-type": "basic", "auth-secret": "users"}, "auth-secret": {"auth-type": "basic"},
    "auth-url": {}, "auth-signin": {"auth-url": "http://auth.test/check"},
    "auth-response-headers": {"auth-url": "http://auth.test/check"},
    "auth-request-redirect": {"auth-url": "http://auth.test/check"},
    "session-cookie-name": {"affinity": "cookie"}, "session-cookie-path": {"affinity": "cookie"},
    "session-cookie-domain": {"affinity": "cookie"}, "upstream-hash-by": {}, "custom-http-errors": {},
    "default-backend": {}, "load-balance": {}, "proxy-read-timeout": {}}


@pytest.mark.parametrize("key", sorted(ACCESS_INJECTION_KEYS))
@pytest.mark.parametrize("value", ["x;\nlocation /x { return 200 'owned'; }", "x\r\n}", "x' ; evil",
                                   "http://x.test/#;\nload_module /tmp/evil.so;"])
def test_injection_strings_in_access_annotations_reach_nothing(key, value):
    """The 2025 advisories' injection strings in every free-text annotation of this slice: reported, and
    nothing of them anywhere in what tidegate serves."""
    _, translation = _routers(CLASS + _service("echo", 8080) + _ingress(
        "probe", "probe.test", {**ACCESS_INJECTION_KEYS[key], key: value}))
    assert any(f"nginx.ingress.kubernetes.io/{key}" in p.message for p in translation.notes), \
        [p.message for p in translation.notes]
    assert "owned" not in repr(translation.ir) and "evil" not in repr(translation.ir)


def test_backend_protocol_grpcs_speaks_http2_over_tls_to_a_stock_grpcio_server(tmp_path):
    """backend-protocol GRPCS: a grpcio client (h2c to tidegate's Ingress port) reaches a grpcio server that
    listens with TLS only, through HTTP/2 over TLS (ALPN h2), the server's self-signed certificate not checked
    as ingress-nginx does not; GRPC against the same server fails (it speaks no clear text)."""
    import grpc
    from concurrent import futures

    from tests.certs import self_signed

    cert, key = self_signed(["grpcs.pod"])
    pod_port, http_port = free_port("127.0.10.9"), free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: b"tls:" + request)})])
    server.add_secure_port(f"127.0.10.9:{pod_port}", grpc.ssl_server_credentials([(key, cert)]))
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        CLASS + _service("grpcs", pod_port, ("127.0.10.9",))
        + _ingress("secure", "secure.test", {"backend-protocol": "GRPCS"}, service="grpcs")
        + _ingress("clear", "clear.test", {"backend-protocol": "GRPC"}, service="grpcs"))
    server.start()
    try:
        with tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                          "--ingress-http-port", str(http_port)):
            for host, works in (("secure.test", True), ("clear.test", False)):
                with grpc.insecure_channel(f"127.0.0.1:{http_port}",
                                           options=[("grpc.default_authority", host)]) as channel:
                    call = channel.unary_unary("/test.Echo/Unary")
                    if works:
                        assert call(b"hello", timeout=10) == b"tls:hello"
                    else:
                        with pytest.raises(grpc.RpcError) as failed:
                            call(b"hello", timeout=10)
                        assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    finally:
        server.stop(grace=None)


@needs_tools
def test_proxy_ssl_annotations_check_the_pod_and_show_a_client_certificate(tmp_path):
    """proxy-ssl-secret, -verify, -name and -server-name with Debian's nginx as an HTTPS pod that asks for a
    client certificate: the pod sees tidegate's certificate from the Secret and the name sent; a pod whose
    certificate has another name, or another CA, gets 502; without the annotations TLS goes unchecked and
    without a certificate; verify without a name (ingress-nginx checked "upstream_balancer") answers 500."""
    from tests.certs import ca_and_leaves

    ca, ((pod_cert, pod_key), (client_cert, client_key)) = ca_and_leaves([["pod.internal"], ["client"]])
    other_ca, _ = ca_and_leaves([["elsewhere"]])
    for name, data in (("ca.pem", ca), ("pod.pem", pod_cert), ("pod.key", pod_key)):
        (tmp_path / name).write_bytes(data)
    pod_port, http_port = free_port("127.0.10.10"), free_port()
    conf = _nginx_pod(tmp_path, f"""
    listen 127.0.10.10:{pod_port} ssl;
    ssl_certificate {tmp_path}/pod.pem;
    ssl_certificate_key {tmp_path}/pod.key;
    ssl_client_certificate {tmp_path}/ca.pem;
    ssl_verify_client optional;
    location / {{ return 200 "client=$ssl_client_verify sni=$ssl_server_name"; }}""", files=True)
    config = tmp_path / "config"
    config.mkdir()
    checked = {"backend-protocol": "HTTPS", "proxy-ssl-secret": "pod-tls", "proxy-ssl-verify": "on",
               "proxy-ssl-name": "pod.internal", "proxy-ssl-server-name": "on"}
    (config / "all.yaml").write_text(
        CLASS + _service("secure", pod_port, ("127.0.10.10",))
        + _secret("pod-tls", {"ca.crt": ca.decode(), "tls.crt": client_cert.decode(), "tls.key": client_key.decode()})
        + _secret("other-ca", {"ca.crt": other_ca.decode()})
        + _ingress("mtls", "mtls.test", checked, service="secure")
        + _ingress("wrongname", "wrongname.test", {**checked, "proxy-ssl-name": "other.internal"}, service="secure")
        + _ingress("untrusted", "untrusted.test", {**checked, "proxy-ssl-secret": "other-ca"}, service="secure")
        + _ingress("unchecked", "unchecked.test", {"backend-protocol": "HTTPS"}, service="secure")
        + _ingress("nameless", "nameless.test", {"backend-protocol": "HTTPS", "proxy-ssl-verify": "on"},
                   service="secure"))
    with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                 ready=("127.0.10.10", pod_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port)):
        assert _curl(http_port, "mtls.test")[::2] == (200, "client=SUCCESS sni=pod.internal")
        assert _curl(http_port, "wrongname.test")[0] == 502
        assert _curl(http_port, "untrusted.test")[0] == 502
        assert _curl(http_port, "unchecked.test")[::2] == (200, "client=NONE sni=")
        assert _curl(http_port, "nameless.test")[0] == 500


@needs_tools
def test_proxy_next_upstream_retries_on_another_pod(tmp_path):
    """proxy-next-upstream http_503 with -tries 3: a pod that answers 503 is tried past (every request gets
    200 from one of the others); without the annotation its 503s reach the client; off retries nothing."""
    pod_port, http_port = free_port(PODS[0]), free_port()
    servers = "".join(f"""
  }}
  server {{
    listen {pod}:{pod_port};
    location / {{ return {503 if n == 1 else 200} "pod-{n}"; }}""" for n, pod in enumerate(PODS))
    conf = _nginx_pod(tmp_path, servers.removeprefix("\n  }\n  server {"))
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        CLASS + _service("echo", pod_port)
        + _ingress("retried", "retried.test", {"proxy-next-upstream": "error timeout http_503",
                                               "proxy-next-upstream-tries": "3"})
        + _ingress("plain", "plain.test", {})
        + _ingress("off", "off.test", {"proxy-next-upstream": "off"}))
    with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                 ready=(PODS[0], pod_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port)):
        assert {_curl(http_port, "retried.test")[::2] for _ in range(12)} <= {(200, "pod-0"), (200, "pod-2")}
        for host in ("plain.test", "off.test"):
            assert (503, "pod-1") in {_curl(http_port, host)[::2] for _ in range(12)}, host


@needs_tools
def test_mirror_target_sends_a_copy_to_a_services_pods(tmp_path):
    """mirror-target http://NAME.NAMESPACE.svc.cluster.local$request_uri: each request's head goes to that
    Service's pods as well (Debian's nginx logs what it got), the answer comes from the Ingress's own pod."""
    pod_port, shadow_port, http_port = free_port(PODS[0]), free_port("127.0.10.11"), free_port()
    conf = _pods(tmp_path, pod_port, f"""
  }}
  server {{
    listen 127.0.10.11:{shadow_port};
    access_log {tmp_path}/shadow.log;
    location / {{ return 200 "shadow"; }}""", files=True)
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        CLASS + _service("echo", pod_port) + _service("shadow", shadow_port, ("127.0.10.11",))
        + _ingress("mirrored", "mirrored.test", {
            "mirror-target": "http://shadow.default.svc.cluster.local$request_uri", "mirror-request-body": "off"}))
    with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                 ready=(PODS[0], pod_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port)):
        for n in range(3):
            status, _, body = _curl(http_port, "mirrored.test", f"/copy/{n}?q={n}")
            assert status == 200 and body.startswith("pod-"), body
        wait_until(lambda: (tmp_path / "shadow.log").exists()
                   and (tmp_path / "shadow.log").read_text().count("GET /copy/") == 3, what="three mirrored requests")
        assert "GET /copy/2?q=2 HTTP/1.1" in (tmp_path / "shadow.log").read_text()


def _peer_certificate(port: int, name: str) -> str:
    """The common name of the certificate the HTTPS port shows for `name` (SNI), unchecked."""
    import socket
    import ssl

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@needs_tools
def test_ssl_passthrough_relays_a_hosts_tls_and_terminates_the_others_on_the_same_port(tmp_path):
    """ssl-passthrough: on the one HTTPS port, a ClientHello for the passthrough host goes as it is to the pod
    of its "/" path (Debian's nginx, which shows its own certificate and answers over its TLS), while other
    names are terminated by tidegate with the Ingress's certificate; plain HTTP to the host is routed as
    before; a host without a "/" path is reported and terminated."""
    from tests.certs import self_signed

    cert, key = self_signed(["pass.test"])
    (tmp_path / "pod.pem").write_bytes(cert)
    (tmp_path / "pod.key").write_bytes(key)
    tls_port, plain_port, http_port, https_port = (free_port("127.0.10.13"), free_port("127.0.10.14"),
                                                   free_port(), free_port())
    conf = _nginx_pod(tmp_path, f"""
    listen 127.0.10.13:{tls_port} ssl;
    ssl_certificate {tmp_path}/pod.pem;
    ssl_certificate_key {tmp_path}/pod.key;
    location / {{ return 200 "pod over its own TLS, sni=$ssl_server_name"; }}
  }}
  server {{
    listen 127.0.10.14:{plain_port};
    location / {{ return 200 "plain pod"; }}""", files=True)
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        CLASS + _service("secure", tls_port, ("127.0.10.13",)) + _service("plain", plain_port, ("127.0.10.14",))
        + _ingress("pass", "pass.test", {"ssl-passthrough": "true"}, service="secure")
        + _ingress("term", "term.test", {}, service="plain", tls=True)
        + _ingress("nopath", "nopath.test", {"ssl-passthrough": "true"}, path="/api", service="plain"))
    with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                 ready=("127.0.10.13", tls_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port), "--ingress-https-port", str(https_port)):
        assert _peer_certificate(https_port, "pass.test") == "pass.test"  # the pod's own certificate
        assert _peer_certificate(https_port, "term.test") == "term.test"  # the Ingress's, from tidegate
        assert _curl(https_port, "pass.test", scheme="https")[::2] == (200, "pod over its own TLS, sni=pass.test")
        for extra in ((), ("--http2",)):
            assert _curl(https_port, "term.test", scheme="https", extra=extra)[::2] == (200, "plain pod")
        assert _curl(http_port, "term.test")[0] == 308  # (its certificate: plain HTTP is redirected)
        assert "ssl-passthrough needs a host and a \"/\" path" in (tmp_path / "tidegate.log").read_text()


@needs_tools
def test_enable_access_log_false_keeps_an_ingress_out_of_the_access_log(tmp_path):
    """enable-access-log: "false" (health checks, say): its requests write no access log line, over HTTP/1.1
    and HTTP/2, while the other Ingresses' requests do."""
    import json

    pod_port, http_port = free_port(PODS[0]), free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(CLASS + _service("echo", pod_port)
                                     + _ingress("health", "health.test", {"enable-access-log": "false"})
                                     + _ingress("shop", "shop.test", {}))
    log_file = tmp_path / "access.log"
    with process([NGINX, "-p", str(tmp_path), "-c", str(_pods(tmp_path, pod_port)), "-g", "daemon off;"],
                 tmp_path / "nginx.log", ready=(PODS[0], pod_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port), "--access-log", "json",
                         "--access-log-file", str(log_file)):
        for extra in ((), ("--http2-prior-knowledge",)):
            for host in ("health.test", "shop.test", "health.test"):
                assert _curl(http_port, host, "/" + host, extra=extra)[0] == 200
        wait_until(lambda: log_file.exists() and log_file.read_text().count("\n") >= 2, what="the log lines")
        time.sleep(0.5)  # (a line of the quiet Ingress would be written by now too)
        hosts = [json.loads(line)["host"].split(":")[0] for line in log_file.read_text().splitlines()]
    assert hosts == ["shop.test", "shop.test"], hosts


@needs_tools
def test_custom_headers_from_a_config_map(tmp_path):
    """custom-headers: the ConfigMap's entries are set on every answer of the Ingress (over the pod's own
    copy); a missing ConfigMap, or one with a value outside ingress-nginx's grammar (a line break), makes
    the Ingress's paths answer 503, and the others serve on."""
    pod_port, http_port = free_port(PODS[0]), free_port()

    def config_map(name: str, data: dict[str, str]) -> str:
        return "---\n" + yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                                         "metadata": {"name": name, "namespace": "default"}, "data": data})

    config = tmp_path / "config"
    config.mkdir()
    (config / "all.yaml").write_text(
        CLASS + _service("echo", pod_port)
        + config_map("security", {"X-Frame-Options": "DENY", "Strict-Transport-Security": "max-age=31536000"})
        + config_map("broken", {"X-Evil": "a\r\nSet-Cookie: owned=1"})
        + _ingress("shop", "shop.test", {"custom-headers": "security"})
        + _ingress("evil", "evil.test", {"custom-headers": "broken"})
        + _ingress("gone", "gone.test", {"custom-headers": "no-such-map"})
        + _ingress("plain", "plain.test", {}))
    with process([NGINX, "-p", str(tmp_path), "-c", str(_pods(tmp_path, pod_port)), "-g", "daemon off;"],
                 tmp_path / "nginx.log", ready=(PODS[0], pod_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log",
                         "--ingress-http-port", str(http_port)):
        for extra in ((), ("--http2-prior-knowledge",)):
            status, fields, _ = _curl(http_port, "shop.test", extra=extra)
            assert status == 200 and _values(fields, "X-Frame-Options") == ["DENY"], fields
            assert _values(fields, "Strict-Transport-Security") == ["max-age=31536000"]
        status, fields, _ = _curl(http_port, "evil.test")
        assert status == 503 and not _values(fields, "Set-Cookie")
        assert _curl(http_port, "gone.test")[0] == 503
        assert _curl(http_port, "plain.test")[0] == 200
