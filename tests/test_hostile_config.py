"""Config files nobody vetted: each hostile shape gets a clear error naming the file and the limit, quickly,
and never a crash; a running tidegate keeps serving the last good configuration and takes later good edits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import free_port, request, tidegate_run, wait_until
from tests.manifests import http_gateway, route
from tidegate.resources.bounded_yaml import LIMITS
from tidegate.resources.loader import load_paths, load_text

ROUTE = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec: {parentRefs: [{name: gw}], hostnames: [a.example.com]}
"""


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "apiVersion: v1\nkind: Service\nmetadata: {name: bomb}\n" + "\n".join(lines) + "\n"


HOSTILE = {
    "an alias bomb": (billion_laughs(), "excessive aliasing"),
    "a merge-key bomb": ("a: &a {x: 1, y: 2, z: 3, w: 4, v: 5, u: 6, t: 7, s: 8, r: 9, q: 10}\n"
                         + "".join(f"b{i}: &b{i} {{<<: [{', '.join(['*a' if i == 0 else f'*b{i - 1}'] * 1)}], "
                                   f"c: {{<<: *{'a' if i == 0 else f'b{i - 1}'}}}, "
                                   f"d: {{<<: *{'a' if i == 0 else f'b{i - 1}'}}}}}\n"
                                   for i in range(25)), "excessive aliasing"),
    "flow lists 100,000 deep": ("[" * 100_000 + "]" * 100_000, "nesting deeper than 100 levels"),
    "flow maps 10,000 deep": ("{a: " * 10_000 + "1" + "}" * 10_000, "nesting deeper than 100 levels"),
    "block lists 150 deep": ("".join("  " * i + "-\n" for i in range(150)) + "  " * 150 + "x\n",
                             "nesting deeper than 100 levels"),
    "an anchor that holds itself": ("apiVersion: v1\nkind: Service\nmetadata: &m {name: s, labels: *m}\n",
                                    "inside its own anchor &m"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_document_is_refused_quickly_with_the_limit_named(name: str):
    text, expected = HOSTILE[name]
    started = time.perf_counter()
    result = load_text(text + "\n---\n" + ROUTE, "hostile.yaml")
    assert time.perf_counter() - started < 1.0
    assert [r.name for r in result.resources] == ["r"]  # the file's other documents still load
    [problem] = result.errors
    assert problem.origin.source == "hostile.yaml" and problem.origin.document == 1
    assert expected in str(problem) and "refused" in str(problem)
    assert result.unidentified_failure  # a file source keeps what the file held before


def test_what_real_objects_need_is_within_the_limits():
    anchors = ("apiVersion: v1\nkind: Service\nmetadata: {name: s, labels: &l {app: a, tier: web}}\n"
               "spec: {selector: *l, ports: [{port: 80}]}\n")
    assert not load_text(anchors, "s.yaml").problems
    deep = "x: " + "{a: " * (LIMITS.depth - 1) + "1" + "}" * (LIMITS.depth - 1) + "\n"
    result = load_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n" + deep, "c.yaml")
    assert not [p for p in result.problems if "refused" in str(p)]


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(LIMITS.file_bytes + 1)  # sparse: no disk, and reading it would take seconds
    (tmp_path / "ok.yaml").write_text(ROUTE)
    started = time.perf_counter()
    result = load_paths([tmp_path])
    assert time.perf_counter() - started < 1.0
    [problem] = result.errors
    assert str(big) in str(problem) and "the limit is 268,435,456 (256 MiB)" in str(problem)
    assert [r.name for r in result.resources] == ["r"]


# Pieces hostile YAML is made of: brackets, anchors and aliases, merge keys, tags, indentation, quotes.
PIECES = st.sampled_from(["[", "]", "{", "}", ", ", ": ", "- ", "\n", "  ", "&a ", "&b ", "*a", "*b", "<<: ",
                          "!!binary ", "!!str ", "!!python/object:os.system ", '"', "'", "? ", "|\n", "x", "1",
                          "---\n", "%YAML 1.1\n", "\t", "#", "kind: List\nitems:\n", "apiVersion: v1\n"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PIECES, max_size=200))
def test_any_text_gives_resources_or_problems_never_an_exception(pieces: list[str]):
    started = time.perf_counter()
    result = load_text("".join(pieces), "fuzz.yaml")
    assert time.perf_counter() - started < 1.0
    assert all(p.origin.source == "fuzz.yaml" for p in result.problems)


def test_a_running_tidegate_reports_hostile_files_and_keeps_serving(tmp_path: Path):
    port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "gw.yaml").write_text(http_gateway("127.0.0.1", port)
                                    + route("r", "a.example.com", "[{matches: [{path: {value: /}}]}]"))
    log = tmp_path / "tidegate.log"
    with tidegate_run(config, ("127.0.0.1", port), log):
        def answer(host: str) -> int:
            return request("127.0.0.1", port, headers={"Host": host}, timeout=2)[0]

        assert answer("a.example.com") == 500  # a route with no backends: it is served
        for name, (text, expected) in HOSTILE.items():
            (config / "hostile.yaml").write_text(text)
            wait_until(lambda: expected in log.read_text(), 5, f"the error for {name} in the log")
            assert answer("a.example.com") == 500
        # The process is alive and takes a good edit after all of them.
        (config / "hostile.yaml").write_text(route("b", "b.example.com", "[{matches: [{path: {value: /}}]}]"))
        wait_until(lambda: answer("b.example.com") == 500, 5, "the good edit served")


def test_a_rejected_edit_shows_in_the_admin_api_and_failures_are_logged_once_and_briefly(tmp_path: Path):
    import json

    port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    # 100 routes to a Service that does not exist: 100 failing conditions.
    (config / "gw.yaml").write_text(http_gateway("127.0.0.1", port) + "".join(
        route(f"r{i}", f"r{i}.example.com", "[{backendRefs: [{name: missing, port: 80}]}]") for i in range(100)))
    log = tmp_path / "tidegate.log"
    with tidegate_run(config, ("127.0.0.1", port), log) as proxy:
        def status() -> list[dict]:
            return json.loads(request("127.0.0.1", proxy.admin_port, "/api/v1/status")[2])

        first = log.read_text()
        assert first.count("ResolvedRefs=False BackendNotFound") == 20
        assert "and 80 more new failing condition(s)" in first
        (config / "bad.yaml").write_text(ROUTE.replace("hostnames: [a.example.com]", "hostnames: [NOT VALID]"))
        wait_until(lambda: any(s["kind"] == "ConfigFile" for s in status()), 5, "the rejected file in the API")
        [entry] = [s for s in status() if s["kind"] == "ConfigFile"]
        assert entry["name"].endswith("bad.yaml")
        [condition] = entry["status"]["conditions"]
        assert condition["status"] == "False" and "spec.hostnames[0]" in condition["message"]
        (config / "bad.yaml").write_text(ROUTE)
        wait_until(lambda: not any(s["kind"] == "ConfigFile" for s in status()), 5, "the mended file gone")
        wait_until(lambda: "serving config version 2" in log.read_text(), 5, "the mended file applied")
        # The same failing conditions are not logged again.
        assert log.read_text().count("ResolvedRefs=False BackendNotFound") == 20
