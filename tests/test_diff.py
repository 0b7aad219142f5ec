"""`tidegate diff OLD NEW`: the requests that tell rules apart, answered from both route tables; what differs is
printed by the rule that answered before, and the exit code says whether anything did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tidegate.dataplane.filters import replace_path
from tidegate.diff import compare
from tidegate.resources.loader import load_text
from tidegate.translate import translate

GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: tidegate}
spec: {controllerName: tidegate.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: tidegate
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec: {ports: [{port: 80}]}
"""


def _route(rules: str) -> str:
    return GATEWAY + f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: shop, namespace: default}}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: [shop.example.com]
  rules:
{rules}"""


BEFORE = _route("""    - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-tier, value: gold}]}]
      backendRefs: [{name: api, port: 80}]
    - backendRefs: [{name: web, port: 80}]
""")


def _ir(text: str):
    loaded = load_text(text, "diff")
    assert not loaded.errors, loaded.errors
    return translate(loaded.resources).ir


def test_the_same_configuration_has_no_difference():
    report = compare(_ir(BEFORE), _ir(BEFORE))
    assert not report.differences and report.probes > 10
    assert report.text().startswith("no difference in")


def test_a_rewrite_and_a_dropped_header_match_show_where_requests_change():
    after = _route("""    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]
      backendRefs: [{name: api, port: 80}]
    - backendRefs: [{name: web, port: 80}]
""")
    report = compare(_ir(BEFORE), _ir(after))
    found = {(d.probe.path, d.probe.headers): (d.old, d.new) for ds in report.differences.values() for d in ds}
    # With the header: the same backend, a new path.
    old, new = found[("/api/x", (("x-tier", "gold"),))]
    assert (old.backend, old.target, new.backend, new.target) == ("default/api:80", "/api/x", "default/api:80",
                                                                   "/v2/x")
    # Without it: it went to web before, to api now.
    old, new = found[("/api", ())]
    assert (old.backend, new.backend) == ("default/web:80", "default/api:80")
    # Neighbours the old prefix did not take stay where they were.
    assert ("/apix", ()) not in found and ("/apix", (("x-tier", "gold"),)) not in found
    assert "answered differently" in report.text()


def test_repeated_slashes_before_a_prefix_are_part_of_it():
    """What `diff` first found: the router matches /api against //api by segments, and ReplacePrefixMatch left
    the doubled slash in front of the path it wrote ("/v2//api")."""
    rewrite = {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}
    assert replace_path("//api", rewrite, "/api") == "/v2"
    assert replace_path("//api//x", rewrite, "/api") == "/v2//x"
    assert replace_path("/api/x", rewrite, "/api") == "/v2/x"
    assert replace_path("//api/x", {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}, "/api/") == "/x"


def test_the_command_exits_1_on_a_difference(tmp_path: Path):
    (tmp_path / "old.yaml").write_text(BEFORE)
    (tmp_path / "new.yaml").write_text(BEFORE.replace("value: gold", "value: silver"))
    (tmp_path / "same.yaml").write_text(BEFORE)
    cmd = [sys.executable, "-m", "tidegate", "diff"]
    changed = subprocess.run([*cmd, str(tmp_path / "old.yaml"), str(tmp_path / "new.yaml")], capture_output=True,
                             text=True, timeout=60)
    assert changed.returncode == 1, changed.stderr
    assert "[x-tier: gold]" in changed.stdout and "before: default/api:80" in changed.stdout
    same = subprocess.run([*cmd, str(tmp_path / "old.yaml"), str(tmp_path / "same.yaml")], capture_output=True,
                          text=True, timeout=60)
    assert same.returncode == 0 and same.stdout.startswith("no difference"), same
    broken = subprocess.run([*cmd, str(tmp_path / "old.yaml"), str(tmp_path / "missing.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode == 2, broken
