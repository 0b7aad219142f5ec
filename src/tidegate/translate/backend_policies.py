"""BackendPolicy (tidegate.io/v1alpha1): how traffic reaches the pods behind a Service.

Attachment follows the Gateway API policy attachment rules. A policy targets a Gateway, a route or a Service
in its own namespace; for one backend of one route, the sections (loadBalancer, healthCheck.active,
healthCheck.passive, retry, timeouts, circuitBreaker) are taken from the Gateway's policy, then the route's,
then the Service's: the more specific wins, section by section. When two policies target the same object, the
older one (creationTimestamp, then namespace/name) wins and the other is reported `Conflicted`.

Ingress gets the same settings from ingress-nginx's annotations (affinity, upstream-hash-by, load-balance,
proxy-connect-timeout, proxy-read-timeout: ingress_annotations.balancing) and `tidegate.io/...` ones (at the
route level), and a Service with `sessionAffinity: ClientIP` is balanced by a consistent hash of the client
address unless a policy says otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tidegate import ir
from tidegate.resources.model import Key, Problem, Resource
from tidegate.translate import ingress_annotations
from tidegate.translate.conditions import policy_status
from tidegate.translate.index import Index
from tidegate.translate.routes import parse_duration

GATEWAY_GROUP = "gateway.networking.k8s.io"
SECTIONS = ("loadBalancer", "healthCheck.active", "healthCheck.passive", "retry", "timeouts", "circuitBreaker")
ANNOTATION_PREFIX = "tidegate.io/"

Section = dict[str, Any]


def _sections(spec: dict[str, Any]) -> dict[str, Section]:
    """The policy's settings by section name, as given (defaults already applied by the schema)."""
    found: dict[str, Section] = {}
    for name in SECTIONS:
        node: Any = spec
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            found[name] = node
    return found


def _seconds(value: str | None) -> float | None:
    return parse_duration(value) if value else None


def _build(sections: dict[str, tuple[Section, str]], location: str = "/", https: bool = False) -> ir.TrafficPolicy:
    """Merged sections → the IR policy. `sections` maps a section to (its settings, where they came from);
    `location` is the path a sticky cookie is for unless its section says (an Ingress path's own, as
    ingress-nginx's; "/" for a Gateway API route); on `https` listeners the cookie is Secure unless it says."""
    fields: dict[str, Any] = {}
    if "loadBalancer" in sections:
        lb = sections["loadBalancer"][0]
        fields["algorithm"] = lb.get("type", "RoundRobin")
        ch = lb.get("consistentHash")
        if ch:
            cookie = ch.get("cookie") or {}
            name = (ch.get("header") or {}).get("name", "") if ch["type"] == "Header" else cookie.get("name", "")
            attributes = "".join(f"; {label}={cookie[key]}" for key, label in (("domain", "Domain"),
                                                                                 ("sameSite", "SameSite"))
                                 if cookie.get(key))
            if cookie.get("secure", https):
                attributes += "; Secure"
            fields["hash"] = ir.HashKey(type=ch["type"], name=name, cookie_ttl=_seconds(cookie.get("ttl")),
                                        cookie_path=cookie.get("path") or location,
                                        cookie_expires=float(cookie.get("expires", 0)), cookie_attributes=attributes,
                                        table_size=ch.get("tableSize", 16381))
        if lb.get("slowStart"):
            fields["slow_start"] = parse_duration(lb["slowStart"]["window"])
        if "zoneAware" in lb:
            fields["zone_aware"] = (lb["zoneAware"].get("minEndpoints", 1), lb["zoneAware"].get("overloadFactor", 2))
    if "healthCheck.active" in sections:
        hc = sections["healthCheck.active"][0]
        http = hc.get("http") or {}
        fields["health_check"] = ir.HealthCheck(
            type=hc["type"], path=http.get("path", "/"), host=http.get("host", ""), method=http.get("method", "GET"),
            expected_statuses=tuple(http.get("expectedStatuses", ())),
            interval=parse_duration(hc.get("interval", "5s")) or 5.0,
            timeout=parse_duration(hc.get("timeout", "1s")) or 1.0,
            healthy_threshold=hc.get("healthyThreshold", 2), unhealthy_threshold=hc.get("unhealthyThreshold", 3),
            jitter=hc.get("jitterPercent", 10) / 100)
    if "healthCheck.passive" in sections:
        od = sections["healthCheck.passive"][0]
        fields["outlier"] = ir.OutlierDetection(
            consecutive_5xx=od.get("consecutive5xx", 0),
            consecutive_gateway_errors=od.get("consecutiveGatewayErrors", 5),
            base_ejection_time=parse_duration(od.get("baseEjectionTime", "30s")),
            max_ejection_time=parse_duration(od.get("maxEjectionTime", "300s")),
            max_ejection_percent=od.get("maxEjectionPercent", 50))
    if "retry" in sections:
        r = sections["retry"][0]
        backoff = r.get("backoff") or {}
        budget = r.get("budget") or {}
        fields["retry"] = ir.RetryPolicy(
            attempts=r.get("attempts", 2),
            retry_on=tuple(r.get("retryOn", ("connect-failure", "reset", "gateway-error"))),
            status_codes=tuple(r.get("statusCodes", ())), per_try_timeout=_seconds(r.get("perTryTimeout")),
            backoff_base=parse_duration(backoff.get("base", "25ms")),
            backoff_max=parse_duration(backoff.get("max", "250ms")),
            budget_percent=budget.get("percent", 20), budget_min_per_second=budget.get("minRetriesPerSecond", 3))
    if "timeouts" in sections:
        t = sections["timeouts"][0]
        fields["connect_timeout"] = _seconds(t.get("connect"))
        fields["request_timeout"] = _seconds(t.get("request"))
        fields["idle_timeout"] = _seconds(t.get("idle"))
        fields["read_timeout"] = _seconds(t.get("read"))
    if "circuitBreaker" in sections:
        cb = sections["circuitBreaker"][0]
        fields["circuit_breaker"] = ir.CircuitBreaker(
            max_connections=cb.get("maxConnections"), max_pending_requests=cb.get("maxPendingRequests"),
            max_requests=cb.get("maxRequests"), max_retries=cb.get("maxRetries"))
    fields["origins"] = tuple((name, origin) for name, (_, origin) in sections.items())
    return ir.TrafficPolicy(**fields)


def _endpoint_weight(endpoint: ir.Endpoint, weights: list[dict[str, Any]]) -> int:
    for entry in weights:
        if all(entry[k] == v for k, v in (("node", endpoint.node), ("zone", endpoint.zone), ("pod", endpoint.pod))
               if k in entry):
            return entry["weight"]
    return 1


# Ingress annotations → BackendPolicy sections. Values that do not parse are reported and ignored.
_ALGORITHMS = {"round-robin": "RoundRobin", "least-request": "LeastRequest", "random": "Random",
               "power-of-two-choices": "PowerOfTwoChoices", "p2c": "PowerOfTwoChoices"}


def ingress_sections(ing: Resource, notes: list[Problem]) -> dict[str, Section]:
    """An Ingress's sections: from ingress-nginx's annotations, then tidegate.io/ ones (which win, section by
    section)."""
    found: dict[str, Section] = ingress_annotations.balancing(ing, notes)
    ann = {k[len(ANNOTATION_PREFIX):]: v for k, v in ing.annotations.items() if k.startswith(ANNOTATION_PREFIX)}

    def bad(name: str, why: str) -> None:
        notes.append(Problem("warning", ing.origin, f"annotation {ANNOTATION_PREFIX}{name} ignored: {why}", ing.key))

    def number(name: str) -> int | None:
        if name not in ann:
            return None
        if not ann[name].isdigit():
            bad(name, f"{ann[name]!r} is not a whole number")
            return None
        return int(ann[name])

    def duration(name: str) -> str | None:
        value = ann.get(name)
        if value is not None and not parse_duration(value) and value != "0s":
            bad(name, f"{value!r} is not a duration such as 500ms or 2s")
            return None
        return value

    if "load-balance" in ann:
        algorithm = _ALGORITHMS.get(ann["load-balance"].lower())
        if algorithm is None:
            bad("load-balance", f"{ann['load-balance']!r} is not one of {', '.join(sorted(_ALGORITHMS))}")
        else:
            found["loadBalancer"] = {"type": algorithm}
    if "hash-by" in ann:
        kind, _, name = ann["hash-by"].partition(":")
        types = {"path": "Path", "source-ip": "SourceIP", "header": "Header", "cookie": "Cookie"}
        if kind not in types or (kind in ("header", "cookie")) != bool(name):
            bad("hash-by", f"{ann['hash-by']!r} is not path, source-ip, header:NAME or cookie:NAME")
        else:
            ch: Section = {"type": types[kind]}
            if kind == "header":
                ch["header"] = {"name": name}
            elif kind == "cookie":
                ch["cookie"] = {"name": name}
                ttl = duration("sticky-cookie-ttl")
                if ttl:
                    ch["cookie"]["ttl"] = ttl
            found["loadBalancer"] = {"type": "ConsistentHash", "consistentHash": ch}
    attempts, per_try = number("retry-attempts"), duration("per-try-timeout")
    if attempts is not None or per_try:
        found["retry"] = {k: v for k, v in (("attempts", attempts), ("perTryTimeout", per_try)) if v is not None}
    path = ann.get("health-check-path")
    if path is not None:
        if not path.startswith("/"):
            bad("health-check-path", "a path starts with /")
        else:
            found["healthCheck.active"] = {"type": "HTTP", "http": {"path": path},
                                           "interval": duration("health-check-interval") or "5s"}
    limits = {"maxConnections": number("max-connections"), "maxRequests": number("max-requests")}
    if any(v is not None for v in limits.values()):
        found["circuitBreaker"] = {k: v for k, v in limits.items() if v is not None}
    return found


_CLIENT_AFFINITY: dict[str, Section] = {"loadBalancer": {"type": "ConsistentHash",
                                                      "consistentHash": {"type": "SourceIP"}}}


def apply_backend_policies(index: Index, listeners: list[ir.Listener], statuses: dict[Key, Any],
                           notes: list[Problem]) -> list[ir.Listener]:
    """Attach the policy in force to every backend of every route; write each BackendPolicy's status."""
    policies = sorted(index.all("BackendPolicy"), key=lambda p: (p.creation_timestamp, p.namespace, p.name))
    by_target: dict[tuple[str, str, str], Resource] = {}  # (kind, namespace, name) → winning policy
    conditions: dict[Key, tuple[bool, str, str]] = {}
    for policy in policies:
        verdict = (True, "Accepted", "Policy is accepted")
        for ref in policy.spec.get("targetRefs", []):
            target = (ref["kind"], policy.namespace, ref["name"])
            if index.get(*target) is None:
                verdict = (False, "TargetNotFound", f"{ref['kind']} {policy.namespace}/{ref['name']} not found")
                continue
            holder = by_target.get(target)
            if holder is not None:
                verdict = (False, "Conflicted", f"{ref['kind']} {policy.namespace}/{ref['name']} already has "
                                                f"BackendPolicy {holder.namespace}/{holder.name}, which is older")
                continue
            by_target[target] = policy
        conditions[policy.key] = verdict
    section_cache: dict[Key, dict[str, Section]] = {p.key: _sections(p.spec) for p in policies}
    ingress_cache: dict[str, dict[str, Section]] = {}
    used_at: dict[Key, set[str]] = {}  # policy → Gateways where some section of it is in force

    def layer(kind: str, namespace: str, name: str) -> tuple[Resource | None, dict[str, Section]]:
        policy = by_target.get((kind, namespace, name))
        return policy, (section_cache[policy.key] if policy is not None else {})

    out: list[ir.Listener] = []
    for listener in listeners:
        gw_ns, _, gw_name = listener.gateway.partition("/")
        https = listener.protocol == "HTTPS"
        routes: list[Any] = []
        l4_routes: list[Any] = []
        for route in (*listener.http_routes, *listener.l4_routes):
            route_kind, _, route_ref = route.source.partition(" ")
            route_ns, _, route_name = route_ref.partition("/")
            layers: list[tuple[str, Resource | None, dict[str, Section]]] = []
            location = "/"
            if route_kind == "Ingress" and isinstance(route, ir.HTTPRoute) and route.matches:
                path = route.matches[0].path  # ingress-nginx's $location_path (a regular expression: "/")
                location = path.value if path.type != "RegularExpression" else "/"
            if gw_name:
                layers.append((f"Gateway {listener.gateway}", *layer("Gateway", gw_ns, gw_name)))
            if route_kind == "Ingress":
                if route_ref not in ingress_cache:
                    ing = index.get("Ingress", route_ns, route_name)
                    ingress_cache[route_ref] = ingress_sections(ing, notes) if ing is not None else {}
                layers.append((f"annotations of Ingress {route_ref}", None, ingress_cache[route_ref]))
            else:
                layers.append((f"{route_kind} {route_ref}", *layer(route_kind, route_ns, route_name)))
            backends = []
            for backend in route.backends:
                if backend.invalid:
                    backends.append(backend)
                    continue
                svc_ns, _, svc_name = backend.name.split(":")[0].partition("/")
                merged: dict[str, tuple[Section, str]] = {}
                service = index.get("Service", svc_ns, svc_name)
                chain = list(layers)
                if service is not None and service.spec.get("sessionAffinity") == "ClientIP":
                    # kube-proxy's client affinity, at the Service's level: a Service policy still overrides it.
                    chain.append((f"sessionAffinity of Service {svc_ns}/{svc_name}", None, _CLIENT_AFFINITY))
                chain.append((f"Service {svc_ns}/{svc_name}", *layer("Service", svc_ns, svc_name)))
                for where, policy, sections in chain:
                    for name, section in sections.items():
                        origin = f"BackendPolicy {policy.namespace}/{policy.name} on {where}" if policy else where
                        merged[name] = (section, origin)
                        if policy is not None:
                            used_at.setdefault(policy.key, set()).add(listener.gateway)
                if not merged:
                    backends.append(backend)
                    continue
                weights = merged["loadBalancer"][0].get("endpointWeights") if "loadBalancer" in merged else None
                endpoints = tuple(dataclasses.replace(e, weight=_endpoint_weight(e, weights)) if weights else e
                                  for e in backend.endpoints)
                backends.append(dataclasses.replace(backend, policy=_build(merged, location, https),
                                                    endpoints=endpoints))
            changed = any(new is not old for new, old in zip(backends, route.backends, strict=True))
            (l4_routes if isinstance(route, ir.L4Route) else routes).append(
                dataclasses.replace(route, backends=tuple(backends)) if changed else route)
        if any(new is not old for new, old in zip(routes, listener.http_routes, strict=True)) or any(
                new is not old for new, old in zip(l4_routes, listener.l4_routes, strict=True)):
            listener = dataclasses.replace(listener, http_routes=tuple(routes), l4_routes=tuple(l4_routes))
        out.append(listener)

    for policy in policies:
        statuses[policy.key] = policy_status(policy, conditions[policy.key], used_at.get(policy.key, ()))
    return out
