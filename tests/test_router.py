"""The route table: Gateway API precedence, hostnames, listener isolation, and explain."""

from __future__ import annotations

import random
import textwrap

from tidegate.resources.loader import load_text
from tidegate.router import Request, explain, routers_by_port
from tidegate.translate import translate

HEADER = """
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: tidegate}
spec: {controllerName: tidegate.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: tidegate
  listeners:
    - {name: http, port: 80, protocol: HTTP}
    - {name: admin, port: 80, protocol: HTTP, hostname: admin.example.com}
"""


def route(name: str, matches: str, hostnames: str = "", created: str = "", section: str = "http") -> str:
    meta = f"{{name: {name}, namespace: default" + (f", creationTimestamp: '{created}'" if created else "") + "}"
    return textwrap.dedent(f"""
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {meta}
    spec:
      parentRefs: [{{name: gw, sectionName: {section}}}]
      {('hostnames: ' + hostnames) if hostnames else ''}
      rules:
        - matches: {matches}
    """)


def router_for(*routes: str):
    loaded = load_text(HEADER + "".join(routes), "test.yaml")
    assert not loaded.errors, [str(e) for e in loaded.errors]
    return routers_by_port(translate(loaded.resources).ir)[("", 80)]


def served_by(router, url: str, method: str = "GET", headers: dict | None = None) -> str | None:
    found = router.lookup(Request.from_url(url, method, headers))
    return found.route.source.split("/")[-1] if found else None


def test_exact_path_beats_longer_prefix():
    router = router_for(route("exact", "[{path: {type: Exact, value: /a}}]"),
                        route("prefix", "[{path: {type: PathPrefix, value: /a}}]"))
    assert served_by(router, "h/a") == "exact"
    assert served_by(router, "h/a/b") == "prefix"


def test_longest_prefix_wins_and_prefixes_match_whole_segments():
    router = router_for(route("root", "[{path: {type: PathPrefix, value: /}}]"),
                        route("foo", "[{path: {type: PathPrefix, value: /foo/}}]"),
                        route("foobar", "[{path: {type: PathPrefix, value: /foo/bar}}]"))
    assert served_by(router, "h/foo/bar/baz") == "foobar"
    assert served_by(router, "h/foo/barista") == "foo"
    assert served_by(router, "h/foo") == "foo"
    assert served_by(router, "h/foolish") == "root"


def test_method_then_header_count_then_query_count_break_ties():
    router = router_for(
        route("plain", "[{path: {type: PathPrefix, value: /p}}]", created="2026-01-01T00:00:00Z"),
        route("one-header", "[{path: {type: PathPrefix, value: /p}, headers: [{name: a, value: '1'}]}]"),
        route("two-headers", "[{path: {type: PathPrefix, value: /p}, headers: [{name: a, value: '1'}, "
                             "{name: b, value: '2'}]}]"),
        route("method", "[{path: {type: PathPrefix, value: /p}, method: DELETE}]"),
        route("query", "[{path: {type: PathPrefix, value: /p}, queryParams: [{name: q, value: x}]}]"))
    assert served_by(router, "h/p", "DELETE", {"a": "1", "b": "2"}) == "method"
    assert served_by(router, "h/p", "GET", {"a": "1", "b": "2"}) == "two-headers"
    assert served_by(router, "h/p", "GET", {"a": "1"}) == "one-header"
    assert served_by(router, "h/p?q=x") == "query"
    assert served_by(router, "h/p?q=y") == "plain"


def test_oldest_route_then_name_break_remaining_ties():
    router = router_for(route("b-old", "[{path: {type: PathPrefix, value: /}}]", created="2026-01-01T00:00:00Z"),
                        route("a-new", "[{path: {type: PathPrefix, value: /}}]", created="2026-06-01T00:00:00Z"))
    assert served_by(router, "h/") == "b-old"
    router = router_for(route("b", "[{path: {type: PathPrefix, value: /}}]"),
                        route("a", "[{path: {type: PathPrefix, value: /}}]"))
    assert served_by(router, "h/") == "a"


def test_regex_matches_use_re2_and_the_whole_value():
    router = router_for(route("regex", "[{path: {type: RegularExpression, value: '/v[0-9]+'}, "
                                       "headers: [{name: x, type: RegularExpression, value: 'ab+'}]}]"))
    assert served_by(router, "h/v12", headers={"x": "abbb"}) == "regex"
    assert served_by(router, "h/v12/more", headers={"x": "abbb"}) is None
    assert served_by(router, "h/v12", headers={"x": "abc"}) is None


def test_exact_hostname_before_wildcard_and_wildcards_cover_many_labels():
    router = router_for(route("exact", "[{path: {type: PathPrefix, value: /}}]", hostnames="[a.example.com]"),
                        route("wild", "[{path: {type: PathPrefix, value: /}}]", hostnames="['*.example.com']"))
    assert served_by(router, "a.example.com/") == "exact"
    assert served_by(router, "A.Example.com:80/") == "exact"
    assert served_by(router, "b.c.example.com/") == "wild"
    assert served_by(router, "example.com/") is None


def test_listener_isolation_sends_a_host_only_to_its_most_specific_listener():
    router = router_for(route("general", "[{path: {type: PathPrefix, value: /}}]"),
                        route("admin", "[{path: {type: PathPrefix, value: /admin}}]", section="admin"))
    assert served_by(router, "admin.example.com/admin") == "admin"
    # the admin listener owns this host: the catch-all route on the other listener must not take it
    assert served_by(router, "admin.example.com/other") is None
    assert served_by(router, "www.example.com/admin") == "general"


def test_lookup_cost_does_not_depend_on_route_count():
    many = [route(f"r{i}", f"[{{path: {{type: PathPrefix, value: /svc{i}}}}}]", hostnames=f"[h{i}.example.com]")
            for i in range(300)]
    router = router_for(*many)
    table = router.listener_for("h150.example.com")
    tables = list(table.host_tables("h150.example.com"))
    assert len(tables) == 1  # one dict lookup for the host, not a scan of 300 routes
    assert served_by(router, "h150.example.com/svc150/x") == "r150"


def test_explain_names_the_rule_and_why_overlapping_routes_lost():
    router = router_for(route("exact", "[{path: {type: Exact, value: /a}, method: POST}]"),
                        route("prefix", "[{path: {type: PathPrefix, value: /a}}]"),
                        route("root", "[{path: {type: PathPrefix, value: /}}]"))
    result = explain(router, Request.from_url("h/a", "GET"))
    assert result.chosen is not None and result.chosen.route.source == "HTTPRoute default/prefix"
    reasons = {name.split("/")[2]: why for name, _, why in result.passed_over}
    assert reasons["exact"] == "method GET is not POST"
    assert "lower precedence" in reasons["root"]


def test_explain_a_request_that_matches_nothing():
    router = router_for(route("only", "[{path: {type: PathPrefix, value: /api}}]", hostnames="[api.example.com]"))
    result = explain(router, Request.from_url("www.example.com/api"))
    assert result.chosen is None
    assert result.passed_over and "not among the route's hostnames" in result.passed_over[0][2]
    result = explain(router, Request.from_url("api.example.com/web"))
    assert result.chosen is None
    assert "does not match" in result.passed_over[0][2]


def test_request_line_routing_is_used_only_when_headers_and_query_do_not_matter():
    plain = router_for(route("a", "[{path: {type: PathPrefix, value: /a}}]"),
                       route("b", "[{path: {type: Exact, value: /b}, method: POST}]"))
    assert plain.request_line_only
    for host, path, method in [("x.test", "/a/1", "GET"), ("x.test", "/b", "POST"), ("x.test", "/b", "GET"),
                               ("admin.example.com", "/a", "GET")] * 2:  # the second time with the host known
        found = plain.lookup_line(host, path, method)
        expected = plain.lookup(Request(host=host, path=path, method=method))
        assert found is expected
    assert plain.lookup_line("x.test", "/b", "GET") is None
    assert plain.lookup_line("x.test", "/b", "POST").route.name.startswith("httproute/default/b/")
    for i in range(plain.HOSTS_KEPT + 10):  # random Host headers cannot grow what is kept without bound
        plain.lookup_line(f"h{i}.test", "/a", "GET")
    assert len(plain._hosts) <= plain.HOSTS_KEPT
    by_header = router_for(route("h", "[{headers: [{name: x-canary, value: 'yes'}]}]"))
    assert not by_header.request_line_only


def test_the_request_line_lookup_picks_what_the_full_lookup_picks():
    """lookup_line walks the tables without generators or a Request (its own code, for routers whose rules
    look at the request line only): over random rule sets and requests, it picks what lookup picks, with the
    Host header new or known."""
    rng = random.Random(5)
    route_hosts = ["a.example.com", "*.example.com", "*.a.example.com", "admin.example.com", "c.test"]
    paths = [("Exact", "/a"), ("Exact", "/a/b"), ("PathPrefix", "/"), ("PathPrefix", "/a"), ("PathPrefix", "/a/b"),
             ("PathPrefix", "/c"), ("RegularExpression", "/a/[0-9]+"), ("RegularExpression", "/c.*")]
    hosts = ["a.example.com", "A.Example.com:8080", "b.example.com", "x.a.example.com", "y.x.a.example.com",
             "example.com", "c.test.", "admin.example.com", "[::1]:80", "other.org"]
    request_paths = ["/", "/a", "/a/", "/a/b", "/a/b/c", "/a/12", "/a/1x", "/c", "/cd", "/c/d", "//a", "/b"]
    compared = 0
    for _ in range(30):
        routes = []
        for r in range(rng.randint(1, 6)):
            matches = []
            for _ in range(rng.randint(1, 3)):
                kind, value = rng.choice(paths)
                method = rng.choice(["", ", method: GET", ", method: POST"])
                matches.append(f"{{path: {{type: {kind}, value: '{value}'}}{method}}}")
            chosen = rng.sample(route_hosts, rng.randint(0, 2))
            section = "admin" if "admin.example.com" in chosen and rng.random() < 0.5 else "http"
            routes.append(route(f"r{r}", "[" + ", ".join(matches) + "]",
                                hostnames="[" + ", ".join(f"'{h}'" for h in chosen) + "]" if chosen else "",
                                section=section))
        router = router_for(*routes)
        assert router.request_line_only
        for _ in range(60):
            host, path, method = rng.choice(hosts), rng.choice(request_paths), rng.choice(["GET", "POST", "PUT"])
            expected = router.lookup(Request(host=host, path=path, method=method))
            assert router.lookup_line(host, path, method) is expected, (routes, host, path, method)
            assert router.lookup_line(host, path, method) is expected  # the host known
            compared += expected is not None
    assert compared > 500
