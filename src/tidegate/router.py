"""The compiled route table: request → listener → route rule, with the Gateway API's precedence.

Compiled once per IR. Hosts: exact names in a dict, wildcards by suffix, then the catch-all; paths: exact paths
in a dict, then regular expressions, then prefixes in a tree of path segments. A lookup walks the host's labels
and the path's segments, so its cost does not grow with the number of routes (regular expressions excepted:
they are tried in order). Within one path, candidates are pre-sorted: method, most header matches, most query
matches, oldest route, then namespace/name and rule order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import re2

from tidegate import ir
from tidegate.translate.hostnames import matches, specificity


@dataclass(frozen=True)
class Request:
    host: str
    path: str  # without the query string
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names; repeated values joined by ","
    query: Mapping[str, list[str]] = field(default_factory=dict)

    @staticmethod
    def from_url(url: str, method: str = "GET", headers: Mapping[str, str] | None = None) -> Request:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(url if "://" in url else "http://" + url)
        hdrs = {k.lower(): v for k, v in (headers or {}).items()}
        host = hdrs.get("host") or parts.netloc
        return Request(host=host, path=parts.path or "/", method=method.upper(), headers=hdrs,
                       query=parse_qs(parts.query, keep_blank_values=True))


def normalize_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789abcdefABCDEF")


def normal_path(path: str) -> str:
    """A request path in the form routes are matched against and pods receive (RFC 3986 section 6.2.2, as
    nginx, Envoy and Traefik read paths before routing): percent-encoded unreserved characters decoded (%75
    is u, %2E is a dot) and other escapes in upper case (%2f is %2F, still a slash inside a segment), runs of
    slashes merged, "." segments dropped and ".." segments removing the one before (never above the root).
    Without it `/public/../admin` would match a rule for /public and reach the pod as a request for /admin."""
    if "//" not in path and "/." not in path and "%" not in path or not path.startswith("/"):
        return path
    if "%" in path:
        parts = path.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            code = part[:2]
            if len(code) == 2 and code[0] in _HEX and code[1] in _HEX:
                char = chr(int(code, 16))
                out.append((char if char in _UNRESERVED else "%" + code.upper()) + part[2:])
            else:
                out.append("%" + part)  # not an escape: left as it came
        path = "".join(out)
    segments: list[str] = []
    pieces = path.split("/")
    last = len(pieces) - 1
    for i, segment in enumerate(pieces):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
        if i == last and segment in ("", ".", ".."):
            segments.append("")  # a path that ends in a directory keeps its slash
    return "/" + "/".join(segments)


class Candidate:
    """One match of one rule, with its regexes compiled."""

    __slots__ = ("client_certificate", "counts", "header_tests", "listener", "match", "method", "order",
                 "path_regex", "plan", "query_tests", "route", "route_name")

    def __init__(self, route: ir.HTTPRoute, match: ir.Match, order: tuple, listener: str = "",
                 client_certificate: ir.Certificate | None = None):
        self.route = route
        self.route_name = route.name  # read per request: compiled, a native attribute, not an IR object's
        self.listener = listener  # name of the listener whose table holds it (for metrics and logs)
        self.client_certificate = client_certificate  # its Gateway's certificate for TLS to backends
        self.plan: object = None  # what the data plane worked out once for this rule (dataplane/fastlane.py)
        self.counts: Any = None  # its metrics, once it served a request (http1.served_by)
        self.match = match
        self.method = match.method or ""  # "" takes any; read per lookup (Router.lookup_line)
        self.order = order
        self.path_regex = re2.compile(match.path.value) if match.path.type == "RegularExpression" else None
        self.header_tests = [(h.name.lower(), h.value, re2.compile(h.value) if h.type == "RegularExpression"
                              else None) for h in match.headers]
        self.query_tests = [(q.name, q.value, re2.compile(q.value) if q.type == "RegularExpression" else None)
                            for q in match.query]

    def refusal(self, request: Request) -> str:
        """Why this candidate does not take the request ("" when it does). The path is checked by the table."""
        if self.match.method and self.match.method != request.method:
            return f"method {request.method} is not {self.match.method}"
        for name, value, regex in self.header_tests:
            got = request.headers.get(name)
            if got is None:
                return f"header {name} is missing"
            if not (regex.fullmatch(got) if regex else got == value):
                return f"header {name}: {got!r} does not match {value!r}"
        for name, value, regex in self.query_tests:
            values = request.query.get(name)
            if not values:
                return f"query parameter {name} is missing"
            first = values[0]  # the Gateway API looks at the first occurrence
            if not (regex.fullmatch(first) if regex else first == value):
                return f"query parameter {name}: {first!r} does not match {value!r}"
        return ""

    def describe(self) -> str:
        parts = [f"{self.match.path.type} {self.match.path.value}"]
        if self.match.method:
            parts.append(f"method {self.match.method}")
        parts += [f"header {h.name}{'~' if h.type != 'Exact' else '='}{h.value}" for h in self.match.headers]
        parts += [f"query {q.name}{'~' if q.type != 'Exact' else '='}{q.value}" for q in self.match.query]
        return ", ".join(parts)


class _PrefixNode:
    __slots__ = ("candidates", "children")

    def __init__(self) -> None:
        self.children: dict[str, _PrefixNode] = {}
        self.candidates: list[Candidate] = []


def _segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


class PathTable:
    """The routes of one hostname pattern on one listener."""

    def __init__(self) -> None:
        self.exact: dict[str, list[Candidate]] = {}
        self.regex: list[Candidate] = []
        self.prefixes = _PrefixNode()
        # Ingress ImplementationSpecific paths as ingress-nginx reads them: a plain string prefix (/foo takes
        # /foobar), the longest first, weighed against the segment prefixes by length as nginx weighs its
        # prefix locations (PathPrefix /foo is nginx's "/foo/": five characters).
        self.string_prefixes: list[Candidate] = []

    def add(self, candidate: Candidate) -> None:
        path = candidate.match.path
        if path.type == "Exact":
            self.exact.setdefault(path.value, []).append(candidate)
        elif path.type == "RegularExpression":
            self.regex.append(candidate)
        elif path.type == "StringPrefix":
            self.string_prefixes.append(candidate)
        else:
            node = self.prefixes
            for segment in _segments(path.value):
                node = node.children.setdefault(segment, _PrefixNode())
            node.candidates.append(candidate)

    def seal(self) -> None:
        for group in self.exact.values():
            group.sort(key=lambda c: c.order)
        # Longer regexes first, an Envoy Gateway habit: they tend to be the more specific ones.
        self.regex.sort(key=lambda c: (-len(c.match.path.value),) + c.order)
        self.string_prefixes.sort(key=lambda c: (-len(c.match.path.value),) + c.order)
        stack = [self.prefixes]
        while stack:
            node = stack.pop()
            node.candidates.sort(key=lambda c: c.order)
            stack.extend(node.children.values())

    def path_candidates(self, path: str) -> Iterator[Candidate]:
        """Every candidate whose path matches, in precedence order: exact, regex, longest prefix first."""
        yield from self.exact.get(path, ())
        for candidate in self.regex:
            if candidate.path_regex is not None and candidate.path_regex.fullmatch(path):
                yield candidate
        trail = [self.prefixes]
        node = self.prefixes
        for segment in _segments(path):
            child = node.children.get(segment)
            if child is None:
                break
            trail.append(child)
            node = child
        if not self.string_prefixes:
            for node in reversed(trail):
                yield from node.candidates
            return
        ranked = [(len(c.match.path.value.rstrip("/")) + 1, 0, c) for node in reversed(trail) for c in node.candidates]
        ranked += [(len(c.match.path.value), 1, c) for c in self.string_prefixes if path.startswith(c.match.path.value)]
        ranked.sort(key=lambda r: (-r[0], r[1]))  # stable: within one kind, the order above
        for _, _, candidate in ranked:
            yield candidate

    def first_for_line(self, path: str, method: str) -> Candidate | None:
        """The first of `path_candidates` that takes `method`, for rules that look at nothing else (a
        Router's `request_line_only`): the same order, without a generator or a Request."""
        if self.string_prefixes:
            for candidate in self.path_candidates(path):
                if not candidate.method or candidate.method == method:
                    return candidate
            return None
        group = self.exact.get(path)
        if group is not None:
            for candidate in group:
                if not candidate.method or candidate.method == method:
                    return candidate
        for candidate in self.regex:
            regex = candidate.path_regex
            if (not candidate.method or candidate.method == method) and regex is not None and regex.fullmatch(path):
                return candidate
        node = self.prefixes
        trail = [node]
        for segment in path.split("/"):
            if segment:
                child = node.children.get(segment)
                if child is None:
                    break
                trail.append(child)
                node = child
        for i in range(len(trail) - 1, -1, -1):
            for candidate in trail[i].candidates:
                if not candidate.method or candidate.method == method:
                    return candidate
        return None

    def all_candidates(self) -> Iterator[Candidate]:
        for group in self.exact.values():
            yield from group
        yield from self.regex
        yield from self.string_prefixes
        stack = [self.prefixes]
        while stack:
            node = stack.pop()
            yield from node.candidates
            stack.extend(node.children.values())


class ListenerTable:
    """Routes of one listener by hostname: exact names, then wildcard suffixes (most labels first), then any."""

    def __init__(self, listener: ir.Listener):
        self.listener = listener
        self.hostname = listener.hostname or ""  # read per lookup: a native attribute, not an IR object's
        self.exact: dict[str, PathTable] = {}
        self.wildcard: dict[str, tuple[PathTable, bool]] = {}  # ".a.com" → (table, single-label only)
        self.any: PathTable | None = None
        for r, route in enumerate(listener.http_routes):
            for m, match in enumerate(route.matches):
                order = (0 if match.method else 1, -len(match.headers), -len(match.query),
                         route.created or "~", route.source, route.name, m)
                for host in route.hostnames:
                    self._table(host, route.wildcard_single_label).add(
                        Candidate(route, match, order, listener.name, listener.backend_client_certificate))
        for table in self._tables():
            table.seal()

    def _table(self, host: str, single_label: bool) -> PathTable:
        host = host.lower()
        if host in ("", "*"):
            if self.any is None:
                self.any = PathTable()
            return self.any
        if host.startswith("*."):
            table, _ = self.wildcard.setdefault(host[1:], (PathTable(), single_label))
            return table
        return self.exact.setdefault(host, PathTable())

    def _tables(self) -> Iterator[PathTable]:
        yield from self.exact.values()
        yield from (t for t, _ in self.wildcard.values())
        if self.any is not None:
            yield self.any

    def host_tables(self, host: str) -> Iterator[tuple[str, PathTable]]:
        """Tables whose hostname covers `host`, most specific first."""
        table = self.exact.get(host)
        if table is not None:
            yield host, table
        labels = host.split(".")
        for i in range(1, len(labels)):
            suffix = "." + ".".join(labels[i:])
            entry = self.wildcard.get(suffix)
            if entry is not None and (not entry[1] or i == 1):
                yield "*" + suffix, entry[0]
        if self.any is not None:
            yield "*", self.any

    def first_for_line(self, host: str, path: str, method: str) -> Candidate | None:
        """`lookup` by the request line alone (see PathTable.first_for_line), `host` normalised."""
        table = self.exact.get(host)
        if table is not None:
            found = table.first_for_line(path, method)
            if found is not None:
                return found
        if self.wildcard:
            labels = host.split(".")
            for i in range(1, len(labels)):
                entry = self.wildcard.get("." + ".".join(labels[i:]))
                if entry is not None and (not entry[1] or i == 1):
                    found = entry[0].first_for_line(path, method)
                    if found is not None:
                        return found
        return self.any.first_for_line(path, method) if self.any is not None else None

    def lookup(self, request: Request, host: str | None = None) -> Candidate | None:
        host = normalize_host(request.host) if host is None else host
        for _, table in self.host_tables(host):
            for candidate in table.path_candidates(request.path):
                if not candidate.refusal(request):
                    return candidate
        return None


class Router:
    """HTTP routing for one bound port: the listener is chosen by hostname first (listener isolation), then its
    route table answers."""

    # Host headers remembered with their listener; forgotten all at once when full (random hosts cannot grow
    # it). Request lines are not remembered: real paths carry ids, and the walk of `first_for_line` costs
    # no more than remembering did (a lookup, and on a miss an insertion and a periodic clear).
    HOSTS_KEPT: Final = 4096

    def __init__(self, listeners: list[ir.Listener]):
        self.tables = [ListenerTable(listener) for listener in listeners]
        self.tables.sort(key=lambda t: specificity(t.listener.hostname))
        # When no rule looks at headers or the query, host, path and method decide: the answer can be kept.
        self.request_line_only = not any(c.header_tests or c.query_tests for t in self.tables
                                         for table in t._tables() for c in table.all_candidates())
        # A Host header as it came → (normalised, the table of its listener).
        self._hosts: dict[str, tuple[str, ListenerTable | None]] = {}

    def lookup_line(self, host: str, path: str, method: str) -> Candidate | None:
        """`lookup` for a router whose rules match on the request line only (`request_line_only`)."""
        hosts = self._hosts
        known = hosts.get(host)
        if known is None:
            if len(hosts) >= self.HOSTS_KEPT:
                hosts.clear()
            name = normalize_host(host)
            known = hosts[host] = (name, self.listener_for(name))
        name, table = known
        return table.first_for_line(name, path, method) if table is not None else None

    def listener_for(self, host: str) -> ListenerTable | None:
        for table in self.tables:
            pattern = table.hostname
            if not pattern or pattern == host or matches(pattern, host):  # the usual cases without a call
                return table
        return None

    def lookup(self, request: Request) -> Candidate | None:
        host = normalize_host(request.host)
        table = self.listener_for(host)
        return table.lookup(request, host) if table else None


@dataclass
class Explanation:
    request: Request
    listener: str = ""
    host_pattern: str = ""
    chosen: Candidate | None = None
    # (route name, match description, why it did not take the request), closest first
    passed_over: list[tuple[str, str, str]] = field(default_factory=list)


def routers_by_port(routing_ir: ir.IR) -> dict[tuple[str, int], Router]:
    """One Router per bound (address, port) of the HTTP-speaking listeners."""
    groups: dict[tuple[str, int], list[ir.Listener]] = {}
    for listener in routing_ir.listeners:
        if listener.protocol in ("HTTP", "HTTPS"):
            groups.setdefault((listener.address, listener.port), []).append(listener)
    return {key: Router(group) for key, group in groups.items()}


def explain(router: Router, request: Request, limit: int = 5) -> Explanation:
    """Which listener, route and rule serve a request, and why the closest other routes do not."""
    result = Explanation(request)
    host = normalize_host(request.host)
    table = router.listener_for(host)
    if table is None:
        return result
    result.listener = table.listener.name
    seen: set[int] = set()
    for pattern, paths in table.host_tables(host):
        for candidate in paths.path_candidates(request.path):
            seen.add(id(candidate))
            reason = candidate.refusal(request)
            if not reason and result.chosen is None:
                result.chosen, result.host_pattern = candidate, pattern
            elif result.chosen is None:
                result.passed_over.append((candidate.route.name, candidate.describe(), reason))
            elif len(result.passed_over) < limit:
                result.passed_over.append((candidate.route.name, candidate.describe(),
                                           f"lower precedence than {result.chosen.route.name}"))
    if result.chosen is None:
        # Near misses: same host but another path, or the path fits but the hostname does not.
        for pattern, paths in table.host_tables(host):
            for candidate in paths.all_candidates():
                if id(candidate) not in seen and len(result.passed_over) < limit:
                    seen.add(id(candidate))
                    result.passed_over.append((candidate.route.name, candidate.describe(),
                                               f"path {request.path} does not match"))
        for other in table.listener.http_routes:
            if len(result.passed_over) >= limit:
                break
            if any(host_covers(h, host, other.wildcard_single_label) for h in other.hostnames):
                continue
            result.passed_over.append((other.name, "hostnames " + ", ".join(other.hostnames),
                                       f"host {host} is not among the route's hostnames"))
    result.passed_over = result.passed_over[:limit] if result.chosen is None else result.passed_over
    return result


def host_covers(pattern: str, host: str, single_label: bool = False) -> bool:
    if pattern in ("", "*") or pattern == host:
        return True
    if pattern.startswith("*.") and host.endswith(pattern[1:]):
        return not single_label or host.count(".") == pattern.count(".")
    return False
