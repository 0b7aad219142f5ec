"""ClientPolicy (tidegate.io/v1alpha1): where a listener's clients' addresses come from, how many
connections the listener and one client may hold, how long a client may leave a request or a connection
hanging, the HTTP/2 limits, and when to shed load.

A policy targets Gateways in its own namespace (with `sectionName`: one listener). For a listener the
sections (`clientIP`, `connections`, `timeouts`, `http2`, `overload`) are taken from its Gateway's policy, then
its own: the more specific wins, section by section. Two policies on one target: the older wins, the other is
`Conflicted`. A policy that cannot be used (an entry that is no address or CIDR, a duration of 0) is
`Accepted=False` (`Invalid`) and not applied: its targets keep their Gateway's policy, if one targets it,
else what tidegate does without a policy (the peer's address is the client's; the default limits hold).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tidegate import ir
from tidegate.resources.model import Key, Problem, Resource
from tidegate.translate.conditions import policy_status
from tidegate.translate.index import Index
from tidegate.translate.routes import parse_duration
from tidegate.translate.traffic_policies import cidrs, InvalidPolicy, parse_size

GATEWAY_GROUP = "gateway.networking.k8s.io"


def _parsed(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = spec.get("clientIP")
    if isinstance(client, dict):
        proxy = cidrs((client.get("proxyProtocol") or {}).get("trustedCIDRs"), "clientIP.proxyProtocol.trustedCIDRs")
        if client.get("header"):
            header = client["header"]
            out["client_ip"] = ir.ClientIP(trusted=cidrs(header.get("trustedCIDRs"), "clientIP.header.trustedCIDRs"),
                                           header=header["name"].lower())
        elif client.get("xForwardedFor"):
            xff = client["xForwardedFor"]
            out["client_ip"] = ir.ClientIP(trusted=cidrs(xff.get("trustedCIDRs"), "clientIP.xForwardedFor."
                                                                                     "trustedCIDRs"),
                                           hops=int(xff.get("hops") or 0))
            if not out["client_ip"].trusted and not out["client_ip"].hops:
                raise InvalidPolicy("clientIP.xForwardedFor: trust proxies by trustedCIDRs, hops, or both")
        if proxy:
            out["client_ip"] = dataclasses.replace(out.get("client_ip") or ir.ClientIP(), proxy_protocol=proxy)
    connections = spec.get("connections")
    if isinstance(connections, dict):
        out["connections"] = {"max_per_listener": connections.get("maxPerListener"),
                              "max_per_client": connections.get("maxPerClient")}
    timeouts = spec.get("timeouts")
    if isinstance(timeouts, dict):
        out["timeouts"] = _timeouts(timeouts)
    http2 = spec.get("http2")
    if isinstance(http2, dict):
        out["http2"] = _http2(http2)
    overload = spec.get("overload")
    if isinstance(overload, dict):
        out["overload"] = {"shed_at_loop_lag": _seconds(overload["maxEventLoopLag"], "overload.maxEventLoopLag")}
    return out


def _seconds(value: Any, where: str) -> float:
    try:
        seconds = parse_duration(value)
    except (TypeError, ValueError):
        raise InvalidPolicy(f"{where}: {value!r} is not a duration such as 10s") from None
    if seconds <= 0:
        raise InvalidPolicy(f"{where} must be longer than 0")
    return seconds


def _timeouts(section: dict[str, Any]) -> ir.ClientTimeouts:
    found: dict[str, Any] = {}
    for name, field in (("requestHead", "request_head"), ("idle", "idle"), ("send", "send"),
                        ("tlsHandshake", "tls_handshake")):
        if section.get(name) is not None:
            found[field] = _seconds(section[name], f"timeouts.{name}")
    rate = section.get("requestBodyMinRate")
    if isinstance(rate, dict):
        size = parse_size(rate.get("bytes"))
        if not size:
            raise InvalidPolicy(f"timeouts.requestBodyMinRate.bytes: {rate.get('bytes')!r} is not a size above 0")
        found["request_body_min_bytes"] = size
        found["request_body_window"] = _seconds(rate.get("per"), "timeouts.requestBodyMinRate.per")
    return ir.ClientTimeouts(**found)


def _http2(section: dict[str, Any]) -> ir.HTTP2Limits:
    found: dict[str, Any] = {}
    if section.get("maxConcurrentStreams") is not None:
        found["max_concurrent_streams"] = int(section["maxConcurrentStreams"])
    frames = section.get("controlFrames")
    if isinstance(frames, dict):
        found["control_frame_burst"] = int(frames["burst"])
        found["control_frames_per_second"] = float(frames["perSecond"])
    if section.get("maxUnreadBytes") is not None:
        size = parse_size(section["maxUnreadBytes"])
        if not size or size < 65536:
            raise InvalidPolicy(f"http2.maxUnreadBytes: {section['maxUnreadBytes']!r} is not a size of 64Ki or more "
                                "(a client must be able to take one full window of answers)")
        found["max_unread_bytes"] = size
    return ir.HTTP2Limits(**found)


def apply_client_policies(index: Index, listeners: list[ir.Listener], statuses: dict[Key, Any],
                          notes: list[Problem]) -> list[ir.Listener]:
    """Put the ClientPolicy settings on each Gateway listener (and its HTTP rules); write each policy's
    status."""
    policies = sorted(index.all("ClientPolicy"), key=lambda p: (p.creation_timestamp, p.namespace, p.name))
    if not policies:
        return listeners
    parsed: dict[Key, dict[str, Any]] = {}
    verdicts: dict[Key, tuple[bool, str, str]] = {}
    by_target: dict[tuple[str, str, str], Resource] = {}  # (namespace, gateway, listener or "") → policy
    for policy in policies:
        verdict = (True, "Accepted", "Policy is accepted")
        try:
            parsed[policy.key] = _parsed(policy.spec)
        except InvalidPolicy as exc:
            verdict = (False, "Invalid", str(exc))
            notes.append(Problem("error", policy.origin, f"invalid: {exc}; not applied (its targets keep their "
                                 "Gateway's policy, or tidegate's defaults)", policy.key))
        for ref in policy.spec.get("targetRefs", []):
            gateway = index.get("Gateway", policy.namespace, ref["name"])
            section = ref.get("sectionName", "")
            names = [listener.get("name") for listener in (gateway.spec.get("listeners") or ())] if gateway else []
            if gateway is None or (section and section not in names):
                if verdict[0]:
                    verdict = (False, "TargetNotFound", f"Gateway {policy.namespace}/{ref['name']} not found"
                               if gateway is None else f"Gateway {policy.namespace}/{ref['name']} has no "
                                                       f"listener named {section}")
                continue
            target = (policy.namespace, ref["name"], section)
            holder = by_target.get(target)
            if holder is not None:
                if verdict[0]:
                    verdict = (False, "Conflicted", f"Gateway {policy.namespace}/{ref['name']}"
                                                    + (f" section {section}" if section else "")
                                                    + f" already has ClientPolicy {holder.namespace}/{holder.name}, "
                                                      "which is older")
                continue
            if policy.key in parsed:
                by_target[target] = policy
        verdicts[policy.key] = verdict
    used_at: dict[Key, set[str]] = {}
    out = []
    for listener in listeners:
        namespace, _, gateway = listener.gateway.partition("/")
        if not gateway:
            out.append(listener)
            continue
        merged: dict[str, Any] = {}
        for section in ("", listener.name.rsplit("/", 1)[-1]):
            policy = by_target.get((namespace, gateway, section))
            if policy is not None:
                merged.update(parsed[policy.key])
                used_at.setdefault(policy.key, set()).add(listener.gateway)
        if merged:
            client_ip = merged.get("client_ip")
            routes = tuple(dataclasses.replace(r, client_ip=client_ip) for r in listener.http_routes) \
                if client_ip is not None else listener.http_routes
            limits = {**merged.get("connections", {}), **merged.get("overload", {})}
            listener = dataclasses.replace(listener, client_ip=client_ip, http_routes=routes,
                                           connection_limits=ir.ConnectionLimits(**limits) if limits else None,
                                           timeouts=merged.get("timeouts"), http2=merged.get("http2"))
        out.append(listener)
    for policy in policies:
        statuses[policy.key] = policy_status(policy, verdicts[policy.key], used_at.get(policy.key, ()))
    return out
