"""Routes: attachment to Gateway listeners exactly as the Gateway API says, and their rules as IR."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import re2

from tidegate import ir
from tidegate.resources.model import Resource
from tidegate.translate.backends import RefProblem, resolve_backend
from tidegate.translate.conditions import CONTROLLER_NAME, condition
from tidegate.translate.extension_filters import KIND as EXTENSION_KIND, extension_filter
from tidegate.translate.gateways import GATEWAY_GROUP, GatewayState, ListenerState
from tidegate.translate.hostnames import intersect
from tidegate.translate.index import Index, selector_matches

ROUTE_KINDS = ("HTTPRoute", "GRPCRoute", "TLSRoute", "TCPRoute", "UDPRoute")
_HOSTNAME_KINDS = ("HTTPRoute", "GRPCRoute", "TLSRoute")
SUPPORTED_HTTP_FILTERS = {"RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite",
                          "RequestMirror", "CORS", "ExtensionRef"}
SUPPORTED_GRPC_FILTERS = {"RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror"}
_DURATION = re.compile(r"(\d+)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class InvalidRoute(ValueError):
    """A route that the spec says must not be accepted (reason UnsupportedValue)."""


@dataclass
class CompiledRoute:
    """A route's rules, translated once, with the problems that decide its conditions on every parent."""

    resource: Resource
    http_rules: list[ir.HTTPRoute] = field(default_factory=list)
    l4_rules: list[ir.L4Route] = field(default_factory=list)
    unsupported: str = ""  # message: not Accepted, reason UnsupportedValue
    ref_problem: RefProblem | None = None


def parse_duration(value: str) -> float:
    """A Gateway API duration ("1h2m3s", "500ms") in seconds; "0s" means no timeout."""
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(value))


def check_regex(pattern: str, where: str) -> None:
    try:
        re2.compile(pattern)
    except re2.error as exc:
        raise InvalidRoute(f"{where}: {pattern!r} is not a valid RE2 regular expression ({exc})") from exc


def translate_routes(index: Index, gateways: list[GatewayState], backend_tls: dict, statuses: dict) -> None:
    by_key = {g.key: g for g in gateways}
    for kind in ROUTE_KINDS:
        for route in index.all(kind):
            compiled: CompiledRoute | None = None
            parents: list[dict[str, Any]] = []
            for ref in route.spec.get("parentRefs", []):
                if ref.get("group", GATEWAY_GROUP) != GATEWAY_GROUP or ref.get("kind", "Gateway") != "Gateway":
                    continue
                gateway = by_key.get((ref.get("namespace") or route.namespace, ref["name"]))
                if gateway is None:
                    continue  # not a Gateway of tidegate's: another controller writes this parent's status
                if compiled is None:
                    compiled = compile_route(index, route, backend_tls)
                parents.append(_attach(index, route, ref, gateway, compiled))
            if parents:
                statuses[route.key] = {"parents": parents}


def _attach(index: Index, route: Resource, ref: dict, gateway: GatewayState, compiled: CompiledRoute) -> dict[str, Any]:
    gen = route.generation
    accepted, reason, message = True, "Accepted", "Route is accepted"
    attached: list[tuple[ListenerState, list[str]]] = []
    candidates = gateway.listeners
    if ref.get("sectionName"):
        candidates = [listener for listener in candidates if listener.name == ref["sectionName"]]
    if ref.get("port"):
        candidates = [listener for listener in candidates if listener.port == ref["port"]]
    if not candidates:
        what = " and ".join(f"{k} {ref[k]}" for k in ("sectionName", "port") if ref.get(k))
        accepted, reason, message = False, "NoMatchingParent", f"Gateway has no listener with {what}"
    elif not gateway.accepted:
        accepted, reason, message = False, "NotAllowedByListeners", "the Gateway is not accepted"
    else:
        allowed_somewhere = False
        for listener in candidates:
            if not listener.attachable or route.kind not in listener.supported_kinds:
                continue
            if not _namespace_allowed(index, listener, route):
                continue
            allowed_somewhere = True
            if route.kind in _HOSTNAME_KINDS:
                hosts = intersect(listener.hostname, route.spec.get("hostnames", []))
            else:
                hosts = ["*"]
            if hosts:
                attached.append((listener, hosts))
        if not attached:
            if allowed_somewhere:
                accepted, reason = False, "NoMatchingListenerHostname"
                message = "no listener hostname intersects the route's hostnames"
            else:
                accepted, reason = False, "NotAllowedByListeners"
                message = f"no listener allows a {route.kind} from namespace {route.namespace}"
    if accepted and compiled.unsupported:
        accepted, reason, message = False, "UnsupportedValue", compiled.unsupported
    if accepted:
        for listener, hosts in attached:
            listener.attached += 1
            _add_to_listener(listener, compiled, hosts)
    problem = compiled.ref_problem
    resolved = condition("ResolvedRefs", problem is None, problem.reason if problem else "ResolvedRefs",
                         problem.message if problem else "All references are resolved", gen)
    return {
        "parentRef": dict(ref),
        "controllerName": CONTROLLER_NAME,
        "conditions": [condition("Accepted", accepted, reason, message, gen), resolved],
    }


def _namespace_allowed(index: Index, listener: ListenerState, route: Resource) -> bool:
    namespaces = (listener.spec.get("allowedRoutes") or {}).get("namespaces") or {}
    origin = namespaces.get("from", "Same")
    if origin == "All":
        return True
    if origin == "Same":
        return route.namespace == listener.gateway.resource.namespace
    if origin == "Selector":
        return selector_matches(namespaces.get("selector") or {}, index.namespace_labels(route.namespace))
    return False


def _add_to_listener(listener: ListenerState, compiled: CompiledRoute, hosts: list[str]) -> None:
    for rule in compiled.http_rules:
        listener.http_routes.append(replace(rule, hostnames=tuple(hosts)))
    for l4 in compiled.l4_rules:
        listener.l4_routes.append(replace(l4, hostnames=tuple(hosts) if hosts != ["*"] else ()))


def compile_route(index: Index, route: Resource, backend_tls: dict) -> CompiledRoute:
    compiled = CompiledRoute(route)
    try:
        for i, rule in enumerate(route.spec.get("rules", [])):
            name = f"{route.kind.lower()}/{route.namespace}/{route.name}/rule/{i}"
            backends = tuple(_backend(index, route, ref, backend_tls, compiled) for ref in rule.get("backendRefs", []))
            if route.kind in ("HTTPRoute", "GRPCRoute"):
                compiled.http_rules.append(_http_rule(index, route, rule, name, backends, backend_tls, compiled))
            else:
                compiled.l4_rules.append(ir.L4Route(name=name, source=f"{route.kind} {route.namespace}/{route.name}",
                                                    backends=backends, created=route.creation_timestamp))
    except InvalidRoute as exc:
        compiled.unsupported = str(exc)
        compiled.http_rules.clear()
        compiled.l4_rules.clear()
    return compiled


def _backend(index: Index, route: Resource, ref: dict, backend_tls: dict, compiled: CompiledRoute) -> ir.Backend:
    filters = tuple(_filter(index, route, f, backend_tls, compiled, "backendRefs.filters")
                    for f in ref.get("filters", []))
    backend, problem = resolve_backend(index, ref, route.kind, route.namespace, backend_tls, filters)
    if problem and compiled.ref_problem is None:
        compiled.ref_problem = problem
    return backend


def _http_rule(index: Index, route: Resource, rule: dict, name: str, backends: tuple[ir.Backend, ...],
               backend_tls: dict, compiled: CompiledRoute) -> ir.HTTPRoute:
    grpc = route.kind == "GRPCRoute"
    matches = tuple(_grpc_match(m) if grpc else _http_match(m) for m in rule.get("matches", [])) or (ir.Match(),)
    filters = tuple(_filter(index, route, f, backend_tls, compiled, "filters") for f in rule.get("filters", []))
    unresolved = next((f.config["problem"] for f in filters if f.type == _UNRESOLVED), "")
    filters = tuple(_for_backends(f, backends) for f in filters if f.type != _UNRESOLVED)
    timeouts = ir.Timeouts()
    if rule.get("timeouts"):
        t = rule["timeouts"]
        timeouts = ir.Timeouts(
            request=(parse_duration(t["request"]) or None) if "request" in t else None,
            backend_request=(parse_duration(t["backendRequest"]) or None) if "backendRequest" in t else None)
    retry = None
    if rule.get("retry"):
        r = rule["retry"]
        retry = ir.Retry(codes=tuple(r.get("codes", [])), attempts=int(r.get("attempts", 0)),
                         backoff=parse_duration(r["backoff"]) if r.get("backoff") else None)
    responds = any(f.type == "RequestRedirect" for f in filters)
    return ir.HTTPRoute(
        name=name, source=f"{route.kind} {route.namespace}/{route.name}", hostnames=(), matches=matches,
        filters=filters, backends=backends, timeouts=timeouts, retry=retry, rule_name=rule.get("name", ""),
        created=route.creation_timestamp,
        # A rule with no backends and nothing that answers by itself answers 500 (the spec's rule), and so
        # does a rule whose ExtensionRef filter cannot be resolved ("MUST NOT be skipped").
        direct_status=500 if unresolved or not (backends or responds) else 0,
        guard=ir.RequestGuard(problem=unresolved) if unresolved else None)


_UNRESOLVED = "Unresolved"  # an ExtensionRef that could not be resolved (its config: the problem)


def _for_backends(f: ir.Filter, backends: tuple[ir.Backend, ...]) -> ir.Filter:
    """An ErrorPages filter tells its pages the Service of the rule (X-Service-Name, X-Service-Port)."""
    if f.type != "ErrorPages" or f.config.get("service") or not backends:
        return f
    service, _, port = backends[0].name.rpartition(":")
    return replace(f, config={**f.config, "service": service.partition("/")[2], "port": port})


def _http_match(m: dict) -> ir.Match:
    path = m.get("path") or {"type": "PathPrefix", "value": "/"}
    ptype, pvalue = path.get("type", "PathPrefix"), path.get("value", "/")
    if ptype == "RegularExpression":
        check_regex(pvalue, "path match")
    headers = tuple(_value_match(h, "header match") for h in m.get("headers", []))
    query = tuple(_value_match(q, "query parameter match") for q in m.get("queryParams", []))
    return ir.Match(path=ir.PathMatch(ptype, pvalue), method=m.get("method", ""), headers=headers, query=query)


def _value_match(spec: dict, where: str) -> ir.ValueMatch:
    mtype = spec.get("type", "Exact")
    if mtype == "RegularExpression":
        check_regex(spec["value"], where)
    return ir.ValueMatch(name=spec["name"], value=spec["value"], type=mtype)


def _grpc_match(m: dict) -> ir.Match:
    """gRPC method matches become path matches on /service/method, so one router serves both kinds."""
    method = m.get("method") or {}
    mtype = method.get("type", "Exact")
    service, name = method.get("service"), method.get("method")
    if mtype == "Exact":
        if service and name:
            path = ir.PathMatch("Exact", f"/{service}/{name}")
        elif service:
            path = ir.PathMatch("PathPrefix", f"/{service}")
        elif name:
            path = ir.PathMatch("RegularExpression", f"/[^/]+/{re2.escape(name)}")
        else:
            path = ir.PathMatch("PathPrefix", "/")
    else:
        for part, where in ((service, "gRPC service match"), (name, "gRPC method match")):
            if part:
                check_regex(part, where)
        path = ir.PathMatch("RegularExpression", f"/(?:{service or '[^/]+'})/(?:{name or '[^/]+'})")
    headers = tuple(_value_match(h, "header match") for h in m.get("headers", []))
    return ir.Match(path=path, headers=headers)


def _printable(text: str) -> bool:
    """Visible ASCII only: what a path that tidegate writes into a request line or a Location header may hold
    (the schema puts no pattern on path modifiers, and a CR LF there would start a header, or a request, of
    the route author's choosing)."""
    return all("!" <= c <= "~" for c in text)


def _filter(index: Index, route: Resource, spec: dict, backend_tls: dict, compiled: CompiledRoute,
            where: str) -> ir.Filter:
    ftype = spec["type"]
    supported = SUPPORTED_GRPC_FILTERS if route.kind == "GRPCRoute" else SUPPORTED_HTTP_FILTERS
    if ftype not in supported:
        raise InvalidRoute(f"{where}: filter type {ftype} is not supported by tidegate")
    if ftype == "ExtensionRef":
        if where != "filters":
            raise InvalidRoute(f"{where}: ExtensionRef filters are read on rules, not on backendRefs")
        made = extension_filter(index, route, spec.get("extensionRef") or {}, backend_tls)
        problem = made if isinstance(made, str) else made.config.get("problem", "")
        if problem and compiled.ref_problem is None:
            kind_known = (spec.get("extensionRef") or {}).get("kind") == EXTENSION_KIND
            compiled.ref_problem = RefProblem("BackendNotFound" if kind_known else "InvalidKind", problem)
        return ir.Filter(_UNRESOLVED, {"problem": made}) if isinstance(made, str) else made
    key = ftype[0].lower() + ftype[1:]
    if ftype == "URLRewrite":
        key = "urlRewrite"
    elif ftype == "CORS":
        key = "cors"
    config = dict(spec.get(key) or {})
    if ftype in ("URLRewrite", "RequestRedirect"):
        modifier = config.get("path") or {}
        for field in ("replaceFullPath", "replacePrefixMatch"):
            value = modifier.get(field)
            if isinstance(value, str) and not _printable(value):
                raise InvalidRoute(f"{where}: {ftype} {field} {value!r} has a space, a control character or a "
                                   "non-ASCII character: it would break the request line or the Location header")
    mirror = None
    if ftype == "RequestMirror":
        mirror, problem = resolve_backend(index, config["backendRef"], route.kind, route.namespace, backend_tls)
        if problem and compiled.ref_problem is None:
            compiled.ref_problem = problem
    return ir.Filter(type=ftype, config=config, mirror=mirror)
