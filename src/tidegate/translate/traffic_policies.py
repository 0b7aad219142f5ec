"""TrafficPolicy (tidegate.io/v1alpha1): who may send requests, how large they may be, and how many of them.

Attachment follows the Gateway API policy attachment rules, as BackendPolicy does. A policy targets, in its
own namespace, a Gateway (with `sectionName`: one of its listeners), or an HTTPRoute or GRPCRoute (with
`sectionName`: one of its rules, by name). For one rule on one listener the sections (`ipAccess`,
`requestLimits`, `rateLimit`) are taken from the Gateway's policy, then the listener's, the route's and the
rule's: the more specific wins, section by section. When two policies target the same object (and section),
the older one (creationTimestamp, then namespace/name) wins and the other is reported `Conflicted`.

A policy whose content cannot be used (an address list entry that is no address or CIDR, a bad regular
expression) is `Accepted=False` with the reason, and the rules it targets answer 500 saying so until it is
mended: a list meant to keep clients out must not let them in because of a typo.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

import re2

from tidegate import ir
from tidegate.resources.model import Key, Problem, Resource
from tidegate.translate.conditions import policy_status
from tidegate.translate.index import Index
from tidegate.translate.routes import parse_duration

GATEWAY_GROUP = "gateway.networking.k8s.io"
SECTIONS = ("ipAccess", "requestLimits", "rateLimit")
_SIZE = re.compile(r"^([0-9]+)([kKmMgG]i?)?$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}

Section = dict[str, Any]


def parse_size(value: Any) -> int | None:
    """A body size: bytes, or with nginx's suffixes (k, m, g: powers of 1024; Ki, Mi, Gi the same)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    found = _SIZE.match(str(value))
    if not found:
        return None
    return int(found.group(1)) * _SIZE_UNITS[(found.group(2) or "")[:1].lower()]


def network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or a CIDR (host bits set are refused: 10.0.0.1/8 is most likely a typo)."""
    return ipaddress.ip_network(text.strip(), strict=True)


class InvalidPolicy(ValueError):
    pass


def cidrs(values: Any, where: str) -> tuple[str, ...]:
    out = []
    for value in values or ():
        try:
            out.append(str(network(str(value))))
        except ValueError as exc:
            raise InvalidPolicy(f"{where}: {value!r} is not an address or CIDR ({exc})") from exc
    return tuple(out)


def _rule(policy: str, spec: Section) -> ir.RateLimitRule:
    name = spec["name"]
    where = f"rateLimit rule {name}"
    match = spec.get("match") or {}
    path = None
    if match.get("path"):
        path = ir.PathMatch(match["path"].get("type", "PathPrefix"), match["path"]["value"])
        if path.type == "RegularExpression":
            _regex(path.value, f"{where}: match.path")
    headers = []
    for header in match.get("headers") or ():
        kind = header.get("type", "Exact")
        if kind == "RegularExpression":
            _regex(header["value"], f"{where}: match.headers {header['name']}")
        headers.append(ir.ValueMatch(header["name"].lower(), header["value"], kind))
    key = []
    for part in spec.get("key") or [{"type": "ClientIP"}]:
        kind = part["type"]
        if kind == "ClientIPPrefix":
            key.append(f"ClientIPPrefix/{part.get('prefixLength', 64)}/{part.get('ipv4PrefixLength', 32)}")
        elif kind == "Header":
            if not part.get("name"):
                raise InvalidPolicy(f"{where}: a Header key names its header")
            key.append(f"Header:{part['name'].lower()}")
        else:
            key.append(kind)
    limit = spec.get("limit") or {}
    exempt = bool(spec.get("exempt", False))
    if not exempt and not limit:
        raise InvalidPolicy(f"{where}: a rule that is not exempt has a limit")
    period = parse_duration(limit["period"]) if limit else 1.0
    if limit and period <= 0:
        raise InvalidPolicy(f"{where}: limit.period must be longer than 0")
    requests = int(limit.get("requests", 0))
    return ir.RateLimitRule(
        name=f"TrafficPolicy {policy}: {name}", requests=requests, period=period,
        burst=int(spec.get("burst") or requests), key=tuple(key),
        methods=tuple(m.upper() for m in match.get("methods") or ()), path_match=path, headers=tuple(headers),
        source_cidrs=cidrs(match.get("sourceCIDRs"), f"{where}: match.sourceCIDRs"), exempt=exempt,
        scope=spec.get("scope", "Local"))


def _regex(pattern: str, where: str) -> None:
    try:
        re2.compile(pattern)
    except re2.error as exc:
        raise InvalidPolicy(f"{where}: {pattern!r} is not a valid RE2 regular expression ({exc})") from exc


def _parsed(policy: Resource) -> dict[str, Any]:
    """The policy's sections, checked and in IR form: {"ipAccess": {...}, ...}. Raises InvalidPolicy."""
    spec = policy.spec
    name = f"{policy.namespace}/{policy.name}"
    out: dict[str, Any] = {}
    if isinstance(spec.get("ipAccess"), dict):
        access = spec["ipAccess"]
        out["ipAccess"] = {"allow": cidrs(access.get("allow"), "ipAccess.allow"),
                           "deny": cidrs(access.get("deny"), "ipAccess.deny")}
    if isinstance(spec.get("requestLimits"), dict):
        limits = spec["requestLimits"]
        size = None
        if limits.get("maxBodySize") is not None:
            size = parse_size(limits["maxBodySize"])
            if size is None:
                raise InvalidPolicy(f"requestLimits.maxBodySize: {limits['maxBodySize']!r} is not a size such as 10m")
        out["requestLimits"] = {"max_body": size, "max_in_flight_per_client": limits.get("maxInFlightPerClient")}
    if isinstance(spec.get("rateLimit"), dict):
        rl = spec["rateLimit"]
        rules = tuple(_rule(name, r) for r in rl.get("rules") or ())
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise InvalidPolicy("rateLimit.rules: two rules have one name")
        out["rateLimit"] = {"rate_limits": rules, "rate_limit_headers": rl.get("responseHeaders") == "Draft10",
                            "fail_mode": rl.get("failMode", "Open")}
    return out


# ingress-nginx's annotation names (and their tidegate.io/ twins, which win when both are set).
NGINX_PREFIX = "nginx.ingress.kubernetes.io/"
TIDEGATE_PREFIX = "tidegate.io/"
_INGRESS_NAMES = ("limit-rps", "limit-rpm", "limit-burst-multiplier", "limit-connections", "limit-whitelist",
                  "limit-allowlist", "whitelist-source-range", "allowlist-source-range", "denylist-source-range",
                  "proxy-body-size", "rate-limit-scope")


def ingress_sections(ing: Resource, notes: list[Problem]) -> tuple[dict[str, Any], str]:
    """An Ingress's protection annotations as TrafficPolicy sections (and a problem that makes its rules
    answer 500: an address list that cannot be read is not skipped, it fails closed). Their meaning is
    ingress-nginx's: limits per client address, per replica (`tidegate.io/rate-limit-scope: Global` counts
    in Redis instead); rate limits share one count per Ingress."""
    ann: dict[str, str] = {}
    full: dict[str, str] = {}  # the name as written
    for name in _INGRESS_NAMES:
        for prefix in (NGINX_PREFIX, TIDEGATE_PREFIX):
            if prefix + name in ing.annotations:
                ann[name] = str(ing.annotations[prefix + name]).strip()
                full[name] = prefix + name
    if not ann:
        return {}, ""
    label = f"Ingress {ing.namespace}/{ing.name}"

    def bad(name: str, why: str) -> None:
        notes.append(Problem("warning", ing.origin, f"annotation {full[name]} ignored: {why}", ing.key))

    def number(name: str) -> int | None:
        value = ann.get(name)
        if value is None:
            return None
        if not value.isdigit() or int(value) < 1:
            bad(name, f"{value!r} is not a whole number above 0")
            return None
        return int(value)

    out: dict[str, Any] = {}
    try:
        allow = cidrs([c for c in (ann.get("allowlist-source-range") or ann.get("whitelist-source-range") or "")
                        .split(",") if c.strip()], "whitelist-source-range")
        deny = cidrs([c for c in ann.get("denylist-source-range", "").split(",") if c.strip()],
                      "denylist-source-range")
        exempt = cidrs([c for c in (ann.get("limit-allowlist") or ann.get("limit-whitelist") or "").split(",")
                         if c.strip()], "limit-whitelist")
    except InvalidPolicy as exc:
        notes.append(Problem("error", ing.origin, f"annotation {exc}: the Ingress's rules answer 500 until it is "
                             "mended (an address list is not skipped)", ing.key))
        return {}, f"{label}: annotation {exc}"
    if allow or deny:
        out["ipAccess"] = {"allow": allow, "deny": deny}
    size = None
    if "proxy-body-size" in ann:
        size = parse_size(ann["proxy-body-size"])
        if size is None:
            bad("proxy-body-size", f"{ann['proxy-body-size']!r} is not a size such as 8m")
        elif size == 0:
            size = None  # nginx: 0 turns the check off
    in_flight = number("limit-connections")
    if size is not None or in_flight is not None:
        out["requestLimits"] = {"max_body": size, "max_in_flight_per_client": in_flight}
    multiplier = number("limit-burst-multiplier") or 5
    scope = ann.get("rate-limit-scope", "Local")
    if scope not in ("Local", "Global"):
        bad("rate-limit-scope", f"{scope!r} is not Local or Global")
        scope = "Local"
    rules = []
    if exempt:
        rules.append(ir.RateLimitRule(name=f"{label}: limit-whitelist", source_cidrs=exempt, exempt=True))
    for name, period in (("limit-rps", 1.0), ("limit-rpm", 60.0)):
        requests = number(name)
        if requests is not None:
            rules.append(ir.RateLimitRule(name=f"{label}: {name}", requests=requests, period=period,
                                          burst=requests * multiplier, scope=scope))
    if any(not r.exempt for r in rules):
        out["rateLimit"] = {"rate_limits": tuple(rules), "rate_limit_headers": False, "fail_mode": "Open"}
    return out, ""


def _guard(merged: dict[str, tuple[dict[str, Any], str]]) -> ir.RequestGuard:
    fields: dict[str, Any] = {}
    for section in SECTIONS:
        if section in merged:
            fields.update(merged[section][0])
    fields["origins"] = tuple((section, origin) for section, (_, origin) in merged.items())
    return ir.RequestGuard(**fields)


def apply_traffic_policies(index: Index, listeners: list[ir.Listener], statuses: dict[Key, Any],
                           notes: list[Problem]) -> list[ir.Listener]:
    """Put the TrafficPolicy settings in force on every HTTP rule of every listener; write each policy's
    status."""
    policies = sorted(index.all("TrafficPolicy"), key=lambda p: (p.creation_timestamp, p.namespace, p.name))
    ingresses = {f"{ing.namespace}/{ing.name}": ingress_sections(ing, notes) for ing in index.all("Ingress")
                 if any(k.startswith((NGINX_PREFIX, TIDEGATE_PREFIX)) for k in ing.annotations)}
    if not policies and not any(sections or problem for sections, problem in ingresses.values()):
        return listeners
    parsed: dict[Key, dict[str, Any]] = {}
    verdicts: dict[Key, tuple[bool, str, str]] = {}
    invalid: dict[Key, str] = {}
    for policy in policies:
        try:
            parsed[policy.key] = _parsed(policy)
        except InvalidPolicy as exc:
            invalid[policy.key] = f"TrafficPolicy {policy.namespace}/{policy.name} is invalid: {exc}"
            verdicts[policy.key] = (False, "Invalid", str(exc))
    by_target: dict[tuple[str, str, str, str], Resource] = {}  # (kind, namespace, name, section) → policy
    for policy in policies:
        verdict = verdicts.get(policy.key, (True, "Accepted", "Policy is accepted"))
        for ref in policy.spec.get("targetRefs", []):
            target = (ref["kind"], policy.namespace, ref["name"], ref.get("sectionName", ""))
            found = index.get(ref["kind"], policy.namespace, ref["name"])
            missing = _missing_section(found, ref)
            if found is None or missing:
                if verdict[0]:
                    verdict = (False, "TargetNotFound", missing or f"{ref['kind']} {policy.namespace}/"
                                                                  f"{ref['name']} not found")
                continue
            holder = by_target.get(target)
            if holder is not None:
                if verdict[0]:
                    section = f" section {target[3]}" if target[3] else ""
                    verdict = (False, "Conflicted", f"{ref['kind']} {policy.namespace}/{ref['name']}{section} "
                                                    f"already has TrafficPolicy {holder.namespace}/{holder.name}, "
                                                    "which is older")
                continue
            by_target[target] = policy
        verdicts[policy.key] = verdict
    used_at: dict[Key, set[str]] = {}

    def layer(kind: str, namespace: str, name: str, section: str) -> tuple[Resource | None, str]:
        policy = by_target.get((kind, namespace, name, section))
        where = f"{kind} {namespace}/{name}" + (f" section {section}" if section else "")
        return policy, where

    out: list[ir.Listener] = []
    for listener in listeners:
        gw_ns, _, gw_name = listener.gateway.partition("/")
        listener_section = listener.name.rsplit("/", 1)[-1] if gw_name else ""
        routes = []
        for route in listener.http_routes:
            route_kind, _, route_ref = route.source.partition(" ")
            route_ns, _, route_name = route_ref.partition("/")
            layers = []
            if gw_name:
                layers += [layer("Gateway", gw_ns, gw_name, ""), layer("Gateway", gw_ns, gw_name, listener_section)]
            if route_kind in ("HTTPRoute", "GRPCRoute"):
                layers.append(layer(route_kind, route_ns, route_name, ""))
                if route.rule_name:
                    layers.append(layer(route_kind, route_ns, route_name, route.rule_name))
            merged: dict[str, tuple[dict[str, Any], str]] = {}
            problem = ""
            if route_kind == "Ingress" and route_ref in ingresses:
                sections, problem = ingresses[route_ref]
                merged = {section: (settings, f"annotations of Ingress {route_ref}")
                          for section, settings in sections.items()}
            for policy, where in layers:
                if policy is None:
                    continue
                used_at.setdefault(policy.key, set()).add(listener.gateway)
                if policy.key in invalid:
                    problem = invalid[policy.key]
                    continue
                for section, settings in parsed[policy.key].items():
                    merged[section] = (settings, f"TrafficPolicy {policy.namespace}/{policy.name} on {where}")
            if problem:
                # Fail closed: the rule answers 500 until the policy is mended.
                route = dataclasses.replace(route, direct_status=500, guard=ir.RequestGuard(problem=problem))
            elif merged:
                route = dataclasses.replace(route, guard=_guard(merged))
            routes.append(route)
        if any(new is not old for new, old in zip(routes, listener.http_routes, strict=True)):
            listener = dataclasses.replace(listener, http_routes=tuple(routes))
        out.append(listener)

    for policy in policies:
        statuses[policy.key] = policy_status(policy, verdicts[policy.key], used_at.get(policy.key, ()))
        if policy.key in invalid:
            notes.append(Problem("error", policy.origin, f"invalid: {verdicts[policy.key][2]}; the rules it "
                                 "targets answer 500 until it is mended", policy.key))

    return out


def _missing_section(target: Resource | None, ref: dict[str, Any]) -> str:
    """Why a targetRef's sectionName names nothing on its target ("" when it does, or has none)."""
    section = ref.get("sectionName")
    if target is None or not section:
        return ""
    if ref["kind"] == "Gateway":
        names = [listener.get("name") for listener in target.spec.get("listeners") or ()]
        what = "listener"
    else:
        names = [rule.get("name") for rule in target.spec.get("rules") or ()]
        what = "rule"
    if section in names:
        return ""
    return f"{ref['kind']} {target.namespace}/{target.name} has no {what} named {section}"
