"""`tidegate diff OLD NEW`: which requests change where they go between two configurations.

For every rule on either side, the requests that tell rules apart are made up: each path as written and its
neighbours (with a trailing "/", one more segment, one more character, the case flipped, a doubled "/", an
encoded "/"), each header, query and method match with a value that matches, one that does not, and none,
each hostname and a sibling under the same parent domain. Each request is answered on both sides from the
route table alone (decide.py: status, backend and weights, the path and Host sent on, a redirect's
Location); the requests whose answers differ are printed, grouped by the rule that answered them before.
Nothing is sent anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tidegate import ir
from tidegate.decide import Decision, decide
from tidegate.router import Request, Router, routers_by_port

_LITERAL = re.compile(r"[^.\[\]()*+?{}|^$\\]*")


@dataclass(frozen=True)
class Probe:
    port: int
    scheme: str
    host: str
    path: str
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    query: str = ""

    def describe(self) -> str:
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        text = f"{self.method} {self.scheme}://{self.host}{port}{self.path}" + (f"?{self.query}" if self.query else "")
        return text + "".join(f" [{name}: {value}]" for name, value in self.headers)


@dataclass
class Difference:
    probe: Probe
    old: Decision
    new: Decision


@dataclass
class Report:
    probes: int = 0
    # by the rule that answered before (or after, when none did): its differences
    differences: dict[str, list[Difference]] = field(default_factory=dict)

    def text(self) -> str:
        lines = []
        for route, found in self.differences.items():
            lines.append(f"{route}:")
            for d in found:
                lines.append(f"  {d.probe.describe()}")
                lines.append(f"    before: {_answer(d.old)}")
                lines.append(f"    after:  {_answer(d.new)}")
        count = sum(len(v) for v in self.differences.values())
        lines.append(f"{count} of {self.probes} requests answered differently" if count
                     else f"no difference in {self.probes} requests")
        return "\n".join(lines) + "\n"


def _answer(d: Decision) -> str:
    if d.status == -1:
        return "no listener on that port"
    if d.status == 0:
        parts = [f"{d.backend or '?'}", d.target]
        if d.weights:
            parts.append(f"(weights {d.weights})")
        parts.append(f"Host: {d.host}")
        parts += [f"{name}: {value}" for name, value in sorted(d.headers.items())]
        if d.asks:
            parts.append(f"if {d.asks} lets it in")
        return " ".join(parts)
    return f"{d.status}" + (f" Location: {d.location}" if d.location else "") + (f" ({d.route})" if d.route else "")


def compare(old: ir.IR, new: ir.IR) -> Report:
    """The requests that tell the rules of either side apart, answered by both."""
    routers = [routers_by_port(old), routers_by_port(new)]
    schemes = {listener.port: "https" if listener.protocol == "HTTPS" else "http"
               for side in (old, new) for listener in side.listeners if listener.protocol in ("HTTP", "HTTPS")}
    report = Report()
    seen: set[Probe] = set()
    for side in (old, new):
        for listener in side.listeners:
            if listener.protocol not in ("HTTP", "HTTPS"):
                continue
            for route in listener.http_routes:
                for probe in _probes(listener, route, schemes.get(listener.port, "http")):
                    if probe in seen:
                        continue
                    seen.add(probe)
                    before, after = (_decide(r, probe) for r in routers)
                    if _key(before) != _key(after):
                        group = before.route or after.route or "(no rule)"
                        report.differences.setdefault(group, []).append(Difference(probe, before, after))
    report.probes = len(seen)
    return report


def _decide(routers: dict[tuple[str, int], Router], probe: Probe) -> Decision:
    router = next((r for (_, port), r in sorted(routers.items()) if port == probe.port), None)
    if router is None:
        return Decision(-1)
    from urllib.parse import parse_qs

    request = Request(host=probe.host, path=probe.path, method=probe.method,
                      headers={name.lower(): value for name, value in probe.headers},
                      query=parse_qs(probe.query, keep_blank_values=True) if probe.query else {})
    return decide(router, request, probe.scheme, probe.port, probe.query)


def _key(d: Decision) -> tuple:
    return d.status, d.backend, d.weights, d.target, d.host, d.location, tuple(sorted(d.headers.items())), d.asks


def _probes(listener: ir.Listener, route: ir.HTTPRoute, scheme: str) -> Iterator[Probe]:
    hosts = list(_hosts(route.hostnames, listener.hostname))
    for match in route.matches:
        headers = tuple((h.name, _sample(h.value) if h.type == "RegularExpression" else h.value)
                        for h in match.headers)
        query = "&".join(f"{q.name}={_sample(q.value) if q.type == 'RegularExpression' else q.value}"
                         for q in match.query)
        method = match.method or "GET"
        for host in hosts:
            for path in _paths(match.path):
                yield Probe(listener.port, scheme, host, path, method, headers, query)
            path = _first_path(match.path)
            if match.method:
                yield Probe(listener.port, scheme, host, path, "POST" if match.method != "POST" else "GET",
                            headers, query)
            for i, (name, value) in enumerate(headers):
                others = headers[:i] + headers[i + 1:]
                yield Probe(listener.port, scheme, host, path, method, others, query)
                yield Probe(listener.port, scheme, host, path, method, (*others, (name, value + "-not")), query)
            if query:
                yield Probe(listener.port, scheme, host, path, method, headers, "")


def _hosts(hostnames: Iterable[str], listener_hostname: str) -> Iterator[str]:
    for name in hostnames:
        if name == "*":
            name = listener_hostname or "any-host.example"
        if name.startswith("*."):
            yield "sample" + name[1:]
            yield name[2:]
        else:
            yield name
            parent = name.partition(".")[2]
            if parent:
                yield f"sibling-of-{name.partition('.')[0]}.{parent}"


def _first_path(path: ir.PathMatch) -> str:
    return next(iter(_paths(path)))


def _paths(path: ir.PathMatch) -> list[str]:
    if path.type == "RegularExpression":
        value = path.value.removeprefix("(?i)").removeprefix("(?:")
        literal = _LITERAL.match(value).group(0) or "/"  # type: ignore[union-attr]
        literal = literal if literal.startswith("/") else "/" + literal
        return list(dict.fromkeys([literal, literal.rstrip("/") + "/x", literal + "x", literal.swapcase()]))
    value = path.value or "/"
    bare = value.rstrip("/")
    found = [value, bare + "/", bare + "/x", bare + "x", value.swapcase(), "/" + value, bare + "%2Fx", "/"]
    return list(dict.fromkeys(p for p in found if p.startswith("/")))


def _sample(pattern: str) -> str:
    """A value a regular expression may take: its leading literal characters (or "x")."""
    return _LITERAL.match(pattern.removeprefix("^")).group(0) or "x"  # type: ignore[union-attr]
