"""Ingress objects as ingress-nginx serves them: the cases of testdata/ingress-nginx/routing.yaml (each from a
source others wrote: ingress-nginx's e2e tests and docs), the annotation registry (snippets refused, values
outside their grammar and the injection strings of the 2025 advisories dropped, unknown keys reported), and a
running tidegate with Debian's nginx as the pod and curl as the client giving the answers `decide` gives.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.certs import tls_secret_yaml
from tests.harness import free_port, process, tidegate_run
from tidegate.decide import decide
from tidegate.resources.loader import load_text
from tidegate.router import Request, routers_by_port
from tidegate.translate import translate

ROOT = Path(__file__).resolve().parent.parent
CASES = yaml.safe_load((ROOT / "testdata" / "ingress-nginx" / "routing.yaml").read_text())["cases"]
CLASS = """apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: tidegate}
spec: {controller: tidegate.io/ingress-controller}
"""


def _service(name: str, pod: str | tuple[str, ...] = "10.0.0.1", pod_port: int = 8080) -> str:
    """A Service on port 80 and its EndpointSlice: one pod address, or several (none: no endpoint)."""
    addresses = ", ".join(f'{{addresses: ["{p}"]}}' for p in ((pod,) if isinstance(pod, str) else pod))
    return f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec: {{ports: [{{port: 80, targetPort: {pod_port}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
endpoints: [{addresses}]
ports: [{{port: {pod_port}}}]
"""


def _ingress(spec: dict) -> str:
    """A case's Ingress: one host, its paths (each to `service`, echo by default), its annotations."""
    paths = spec.get("paths") or [{"path": spec["path"], "pathType": spec["pathType"],
                                   "service": spec.get("service", "echo")}]
    ingress = {
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": spec["name"], "namespace": "default",
                     "annotations": {f"nginx.ingress.kubernetes.io/{k}": str(v)
                                     for k, v in (spec.get("annotations") or {}).items()}},
        "spec": {"ingressClassName": "tidegate", "rules": [{"host": spec["host"], "http": {"paths": [
            {"path": p["path"], "pathType": p["pathType"],
             "backend": {"service": {"name": p.get("service", "echo"), "port": {"number": 80}}}}
            for p in paths]}}]}}
    text = "---\n" + yaml.safe_dump(ingress)
    if spec.get("tls"):
        ingress["spec"]["tls"] = [{"hosts": [spec["host"]], "secretName": f"{spec['name']}-tls"}]
        text = "---\n" + yaml.safe_dump(ingress) + "---\n" + tls_secret_yaml("default", f"{spec['name']}-tls",
                                                                             [spec["host"]])
    return text


def _case_config(case: dict, pod: str = "10.0.0.1", pod_port: int = 8080) -> str:
    services = sorted({p.get("service", "echo") for ing in case["ingresses"]
                       for p in (ing.get("paths") or [ing])})
    secrets = "".join("---\n" + yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                                "metadata": {"name": name, "namespace": "default"},
                                                "stringData": data})
                      for name, data in (case.get("secrets") or {}).items())
    return CLASS + "".join(_service(s, pod, pod_port) for s in services) + secrets + "".join(
        map(_ingress, case["ingresses"]))


def _routers(text: str):
    loaded = load_text(text, "case")
    assert not loaded.errors, loaded.errors
    translation = translate(loaded.resources)
    return routers_by_port(translation.ir), translation


def _expected(want: dict, got) -> list[str]:
    wrong = []
    for name in ("status", "backend", "target", "host", "location"):
        if name in want and getattr(got, name) != want[name]:
            wrong.append(f"{name}: {getattr(got, name)!r}, expected {want[name]!r}")
    if "headers" in want:
        if want["headers"]:
            for name, value in want["headers"].items():
                if got.headers.get(name) != value:
                    wrong.append(f"header {name}: {got.headers.get(name)!r}, expected {value!r}")
        elif got.headers:
            wrong.append(f"headers {got.headers}, expected none")
    return wrong


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ingress_nginx_behaviour(case):
    """Every request of the case gets the answer its source observed from ingress-nginx."""
    routers, _ = _routers(_case_config(case))
    failures = []
    for want in case["requests"]:
        scheme, _, rest = want["url"].partition("://")
        host, _, target = rest.partition("/")
        path, _, query = ("/" + target).partition("?")
        port = 443 if scheme == "https" else 80
        router = next((r for (_, p), r in routers.items() if p == port), None)
        sent = {k.lower(): v for k, v in (want.get("send") or {}).items()}
        got = decide(router, Request(host=host, path=path, headers=sent), scheme=scheme, port=port, query=query) \
            if router is not None else None
        if got is None:  # no listener at all: nothing is served
            failures += [] if want["status"] == 404 else [f"{want['url']}: no listener"]
            continue
        wrong = _expected(want, got)
        if wrong:
            failures.append(f"{want['url']}: " + "; ".join(wrong))
    assert not failures, f"{case['source']}\n" + "\n".join(failures)


def _notes(annotations: dict[str, str]) -> list[str]:
    spec = {"name": "probe", "host": "probe.test", "path": "/", "pathType": "Prefix", "annotations": annotations}
    _, translation = _routers(CLASS + _service("echo") + _ingress(spec))
    return [f"{p.severity}: {p.message}" for p in translation.notes]


@pytest.mark.parametrize("key", ["server-snippet", "configuration-snippet", "auth-snippet", "stream-snippet",
                                 "modsecurity-snippet"])
def test_snippets_are_refused_and_the_ingress_still_serves(key):
    notes = _notes({key: "return 200 'owned';"})
    assert any(n.startswith("error:") and f"nginx.ingress.kubernetes.io/{key} refused" in n for n in notes), notes
    routers, translation = _routers(CLASS + _service("echo") + _ingress(
        {"name": "probe", "host": "probe.test", "path": "/", "pathType": "Prefix", "annotations": {key: "x"}}))
    assert "owned" not in repr(translation.ir)
    got = decide(next(iter(routers.values())), Request(host="probe.test", path="/"))
    assert got.status == 0 and got.backend == "default/echo:80"


# Values of the kind the 2025 ingress-nginx advisories injected (CVE-2025-1974, -24513, -24514, -1097, -1098):
# a line break that ends the directive and starts another, or characters outside the annotation's grammar.
INJECTIONS = [
    "/foo;\nlocation /x { return 200 'owned'; }",
    "/foo\r\n}",
    "/foo' ; evil",
    "/$1}}\n",
    "http://x.test/#;\nload_module /tmp/evil.so;",
]


@pytest.mark.parametrize("key", ["rewrite-target", "app-root", "x-forwarded-prefix", "permanent-redirect",
                                 "temporal-redirect", "upstream-vhost"])
@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_strings_are_dropped_and_reach_nothing(key, value):
    notes = _notes({key: value, "rewrite-target" if key == "x-forwarded-prefix" else "use-regex":
                    "/ok" if key == "x-forwarded-prefix" else "false"})
    assert any(f"nginx.ingress.kubernetes.io/{key} ignored" in n for n in notes), notes
    _, translation = _routers(CLASS + _service("echo") + _ingress(
        {"name": "probe", "host": "probe.test", "path": "/", "pathType": "Prefix", "annotations": {key: value}}))
    assert "owned" not in repr(translation.ir) and "evil" not in repr(translation.ir)


def test_unknown_and_not_yet_supported_keys_are_reported():
    notes = _notes({"no-such-thing": "1", "limit-rate": "1024", "limit-rps": "5", "use-regex": "maybe"})
    assert any("no-such-thing is unknown" in n for n in notes), notes
    assert any("limit-rate is not supported yet" in n for n in notes), notes
    assert any("use-regex ignored: 'maybe' is not true or false" in n for n in notes), notes
    assert not any("limit-rps" in n for n in notes), notes  # read by the TrafficPolicy side


def test_a_path_re2_cannot_read_is_reported_and_the_others_serve():
    spec = {"name": "probe", "host": "probe.test", "annotations": {"use-regex": "true"},
            "paths": [{"path": "/(?=lookahead)", "pathType": "ImplementationSpecific"},
                      {"path": "/ok", "pathType": "ImplementationSpecific"}]}
    routers, translation = _routers(CLASS + _service("echo") + _ingress(spec))
    assert any("is not served" in p.message and "RE2" in p.message for p in translation.notes)
    assert decide(next(iter(routers.values())), Request(host="probe.test", path="/ok/x")).status == 0


NGINX = shutil.which("nginx")
CURL = shutil.which("curl")


def _nginx_pod(tmp: Path, server: str, files: bool = False) -> Path:
    """An nginx.conf for Debian's nginx as a pod, all its files under `tmp`, with one server block.
    `files`: its workers run as the test's user, so that they read files under `tmp` (root's worker would be
    www-data, which cannot)."""
    conf = tmp / "nginx.conf"
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if files and os.geteuid() == 0 else ""
    conf.write_text(f"""{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{{server}
  }}
}}
""")
    return conf


@pytest.mark.skipif(NGINX is None or CURL is None, reason="nginx and curl are not installed (scripts/test does)")
def test_a_running_tidegate_answers_as_decide_says(tmp_path):
    """The cases' requests through a running tidegate (curl as the client; Debian's nginx as the pod, which
    says the request URI, Host and X-Forwarded-Prefix it received): status, Location, path, Host and header
    as `decide` worked them out from the same configuration."""
    pod_port, http_port, https_port = free_port("127.0.10.1"), free_port(), free_port()
    conf = _nginx_pod(tmp_path, f"""
    listen 127.0.10.1:{pod_port};
    location / {{ return 200 "$request_uri|$http_host|$http_x_forwarded_prefix"; }}""")
    chosen = [c for c in CASES if c["name"] in (
        "the rewrite regex is searched in the whole path; the query string follows", "paths by descending length, "
        "case-insensitive", "X-Forwarded-Prefix with a rewrite", "upstream-vhost sets the Host sent on",
        "permanent-redirect and its code", "app-root redirects the host's / alone",
        "preserve-trailing-slash keeps it, for a host with a certificate",
        "without regex, ImplementationSpecific is a plain string prefix and Prefix goes by segments",
        'a path that ends in "/" answers the same path without it with a 301',
        "paths are normalised before they are matched", "rewrite-target to a URL answers 302 there, the query "
        "string after it", "a group's text is never a redirect, nor a path that is not absolute",
        "what capture groups bring is normalised", "app-root with $is_args$args keeps the query string",
        "upstream-vhost with the location's variables")]
    checked = 0
    for n, case in enumerate(chosen):
        config = tmp_path / f"config-{n}"
        config.mkdir()
        text = _case_config(case, "127.0.10.1", pod_port)
        (config / "all.yaml").write_text(text)
        routers, _ = _routers(text)
        with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                     ready=("127.0.10.1", pod_port)), \
                tidegate_run(config, ("127.0.0.1", http_port), tmp_path / f"tidegate-{n}.log",
                             "--ingress-http-port", str(http_port), "--ingress-https-port", str(https_port)):
            for want in case["requests"]:
                scheme, _, rest = want["url"].partition("://")
                host, _, target = rest.partition("/")
                path, _, query = ("/" + target).partition("?")
                local = https_port if scheme == "https" else http_port
                # The router of the Ingress port the URL names; redirects written for the port tidegate is on.
                router = next(r for (_, p), r in routers.items() if p == (443 if scheme == "https" else 80))
                expected = decide(router, Request(host=host, path=path), scheme=scheme, port=local, query=query)
                head, body = tmp_path / "answer-head", tmp_path / "answer-body"
                subprocess.run([CURL, "-sk", "--path-as-is", "-D", str(head), "-o", str(body), "--resolve", f"{host}:{local}:127.0.0.1",
                                f"{scheme}://{host}:{local}/{target}"], check=True, timeout=20)
                lines = head.read_text().splitlines()
                status = int(lines[0].split()[1])
                location = next((line.split(":", 1)[1].strip() for line in lines
                                 if line.lower().startswith("location:")), "")
                what = f"{case['name']}: {want['url']}"
                if expected.status:
                    assert (status, location) == (expected.status, expected.location), (what, lines)
                else:
                    uri, got_host, prefix = body.read_text().split("|")
                    assert status == 200 and uri == expected.target, (what, lines, uri)
                    assert got_host.split(":")[0] == expected.host.split(":")[0], (what, got_host)
                    assert prefix == expected.headers.get("x-forwarded-prefix", ""), (what, prefix)
                checked += 1
    assert checked >= 40


def _probe_backend(translation):
    return next(r for listener in translation.ir.listeners for r in listener.http_routes
                if r.hostnames == ("probe.test",)).backends[0]


def test_backend_protocol_and_connect_timeout_reach_the_backend():
    spec = {"name": "probe", "host": "probe.test", "path": "/", "pathType": "Prefix",
            "annotations": {"backend-protocol": "HTTPS", "proxy-connect-timeout": "3"}}
    _, translation = _routers(CLASS + _service("echo") + _ingress(spec))
    backend = _probe_backend(translation)
    assert backend.tls is not None and backend.tls.verify is False and backend.policy.connect_timeout == 3.0
    spec["annotations"] = {"backend-protocol": "grpc"}
    _, translation = _routers(CLASS + _service("echo") + _ingress(spec))
    backend = _probe_backend(translation)
    assert backend.protocol == "kubernetes.io/h2c" and backend.tls is None
    assert any("backend-protocol FCGI is not supported yet" in n for n in _notes({"backend-protocol": "FCGI"}))


@pytest.mark.skipif(NGINX is None or CURL is None, reason="nginx and curl are not installed (scripts/test does)")
def test_backend_protocol_https_speaks_tls_to_a_pod_with_a_self_signed_certificate(tmp_path):
    """ingress-nginx does not check a pod's certificate by default (proxy_ssl_verify off): Debian's nginx
    with a self-signed certificate answers through tidegate."""
    from tests.certs import self_signed

    cert, key = self_signed(["pod.local"])
    (tmp_path / "pod.crt").write_bytes(cert)
    (tmp_path / "pod.key").write_bytes(key)
    pod_port, http_port = free_port("127.0.10.1"), free_port()
    conf = _nginx_pod(tmp_path, f"""
    listen 127.0.10.1:{pod_port} ssl;
    ssl_certificate {tmp_path}/pod.crt;
    ssl_certificate_key {tmp_path}/pod.key;
    location / {{ return 200 "tls:$ssl_protocol"; }}""")
    config = tmp_path / "config"
    config.mkdir()
    spec = {"name": "secure", "host": "secure.test", "path": "/", "pathType": "Prefix",
            "annotations": {"backend-protocol": "HTTPS"}}
    (config / "all.yaml").write_text(CLASS + _service("echo", "127.0.10.1", pod_port) + _ingress(spec))
    with process([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log",
                 ready=("127.0.10.1", pod_port)), \
            tidegate_run(config, ("127.0.0.1", http_port), tmp_path / "tidegate.log", "--ingress-http-port",
                         str(http_port), "--ingress-https-port", str(free_port())):
        done = subprocess.run([CURL, "-s", "-H", "Host: secure.test", f"http://127.0.0.1:{http_port}/"],
                              capture_output=True, text=True, timeout=20)
        assert done.stdout.startswith("tls:TLSv1."), done.stdout


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_convert_changes_no_answer_except_where_its_report_says(case):
    """The differential test: tidegate fed the case's Ingresses and tidegate fed `convert`'s Gateway API objects
    answer every request `diff` makes up alike, except for rules of Ingresses the report calls approximated or
    unsupported."""
    from tidegate.convert import convert
    from tidegate.diff import compare

    loaded = load_text(_case_config(case), "case")
    objects, report = convert(loaded.resources)
    others = [r.obj for r in loaded.resources if r.kind not in ("Ingress", "IngressClass")]
    converted = load_text("".join("---\n" + yaml.safe_dump(o) for o in objects + others), "converted")
    assert not converted.errors, converted.errors
    result = compare(translate(loaded.resources).ir, translate(converted.resources).ir)
    inexact = {e.ingress for e in report if e.verdict in ("approximated", "unsupported", "refused")}
    for route, differences in result.differences.items():
        ingress = "/".join(route.split("/")[1:3])
        assert ingress in inexact, (f"{route} answers differently, and the report says nothing of it:\n"
                                    + result.text() + "\n" + "\n".join(map(str, report)))
    if not inexact:
        assert not result.differences, result.text()


def test_the_convert_command_writes_objects_and_a_report_and_says_by_its_exit_code(tmp_path):
    """-o DIR and --all give a set `tidegate diff` finds no difference in; --report writes the verdicts; the
    exit code is 1 for an unsupported field, and for an approximated one with --fail-on approximated."""
    import json

    def case(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(_case_config(next(c for c in CASES if c["name"].startswith(name))))
        return path

    cmd = [sys.executable, "-m", "tidegate"]
    exact = case("upstream-vhost")
    done = subprocess.run([*cmd, "convert", str(exact), "--all", "-o", str(tmp_path / "out"), "--report",
                           str(tmp_path / "report.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "report.json").read_text()) == [
        {"ingress": "default/upstreamvhost.foo.com", "field": "nginx.ingress.kubernetes.io/upstream-vhost",
         "verdict": "converted", "note": ""}]
    same = subprocess.run([*cmd, "diff", str(exact), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert same.returncode == 0, same.stdout
    policy = subprocess.run([*cmd, "convert", str(case("capture groups"))], capture_output=True, text=True,
                            timeout=60)
    assert policy.returncode == 0 and "tidegate-policy: Ingress default/regex: rewrite-target" in policy.stderr
    assert "kind: HTTPRoute\n" in policy.stdout and "kind: HTTPRouteFilter" in policy.stdout
    unknown = tmp_path / "unknown.yaml"
    odd = {"name": "odd", "host": "odd.test", "path": "/", "pathType": "Prefix",
           "annotations": {"proxy-ssl-ciphers": "HIGH"}}
    unknown.write_text(_case_config({"ingresses": [odd]}))
    unsupported = subprocess.run([*cmd, "convert", str(unknown)], capture_output=True, text=True, timeout=60)
    assert unsupported.returncode == 1 and "unsupported: Ingress default/odd: nginx.ingress" in unsupported.stderr
    assert "kind: HTTPRoute" in unsupported.stdout
    approximated = case("force-ssl-redirect")
    assert subprocess.run([*cmd, "convert", str(approximated)], capture_output=True, timeout=60).returncode == 0
    assert subprocess.run([*cmd, "convert", str(approximated), "--fail-on", "approximated"], capture_output=True,
                          timeout=60).returncode == 1


def test_ingresses_without_a_class_are_served_with_the_flag_only(tmp_path):
    """ingress-nginx's --watch-ingress-without-class: an Ingress naming no class is served when tidegate's
    IngressClass is the default, or with the flag; one naming another class never."""
    from tidegate.translate import TranslateOptions

    spec = {"name": "classless", "host": "classless.test", "path": "/", "pathType": "Prefix"}
    text = _ingress(spec).replace("  ingressClassName: tidegate\n", "")
    other = _ingress({**spec, "name": "other", "host": "other.test"}).replace("ingressClassName: tidegate",
                                                                              "ingressClassName: nginx")
    loaded = load_text(CLASS + _service("echo") + text + other, "case")
    assert "ingressClassName" not in text

    def hosts(options: TranslateOptions) -> set[str]:
        return {h for listener in translate(loaded.resources, options).ir.listeners for r in listener.http_routes
                for h in r.hostnames}

    assert hosts(TranslateOptions()) == set()
    assert hosts(TranslateOptions(ingress_without_class=True)) == {"classless.test"}
    (tmp_path / "in.yaml").write_text(CLASS + _service("echo") + text)
    done = subprocess.run([sys.executable, "-m", "tidegate", "routes", "--watch-ingress-without-class",
                           str(tmp_path / "in.yaml")], capture_output=True, text=True, timeout=60)
    assert "classless.test" in done.stdout, (done.stdout, done.stderr)


def test_keys_with_nothing_to_set_say_so_and_convert_carries_them():
    """nginx's buffering knobs mean nothing to a proxy that streams: reported as having no effect (not as
    missing), and convert does not fail a pipeline over them."""
    from tidegate.convert import convert

    notes = _notes({"proxy-buffering": "off", "proxy-buffer-size": "16k", "client-body-buffer-size": "1m"})
    assert len(notes) == 3 and all("has nothing to set" in n for n in notes), notes
    spec = {"name": "probe", "host": "probe.test", "path": "/", "pathType": "Prefix",
            "annotations": {"proxy-buffering": "off", "proxy-request-buffering": "off"}}
    _, report = convert(load_text(CLASS + _service("echo") + _ingress(spec), "x").resources)
    assert {e.verdict for e in report if "buffering" in e.field} == {"converted"}, report
