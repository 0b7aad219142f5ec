"""ClientPolicy (tidegate.io/v1alpha1): where a listener's clients' addresses come from, how many
connections the listener and one client may hold, and when to shed load.

A policy targets Gateways in its own namespace (with `sectionName`: one listener). For a listener the
sections (`clientIP`, `connections`, `overload`) are taken from its Gateway's policy, then its own: the more specific
wins, section by section. Two policies on one target: the older wins, the other is `Conflicted`. A policy
that cannot be used (an entry that is no address or CIDR) is `Accepted=False` (`Invalid`) and not applied:
the peer's address is then the client's, which is what tidegate does without a policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tidegate import ir
from tidegate.resources.model import Key, Problem, Resource
from tidegate.translate.conditions import policy_status
from tidegate.translate.index import Index
from tidegate.translate.routes import parse_duration
from tidegate.translate.traffic_policies import cidrs, InvalidPolicy

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
    overload = spec.get("overload")
    if isinstance(overload, dict):
        lag = parse_duration(overload["maxEventLoopLag"])
        if lag <= 0:
            raise InvalidPolicy("overload.maxEventLoopLag must be longer than 0")
        out["overload"] = {"shed_at_loop_lag": lag}
    return out


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
            notes.append(Problem("error", policy.origin, f"invalid: {exc}; not applied (clients' addresses are "
                                 "their connections' peers)", policy.key))
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
                                           connection_limits=ir.ConnectionLimits(**limits) if limits else None)
        out.append(listener)
    for policy in policies:
        statuses[policy.key] = policy_status(policy, verdicts[policy.key], used_at.get(policy.key, ()))
    return out
