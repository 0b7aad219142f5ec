"""Hostname rules of the Gateway API: wildcard matching and listener/route intersection."""

from __future__ import annotations


def matches(pattern: str, host: str) -> bool:
    """Does `host` (itself possibly a wildcard) fall under `pattern`? `*.a.com` covers `x.a.com` and
    `x.y.a.com` (any number of labels, as the Gateway API says) but not `a.com`."""
    if not pattern or pattern == "*":
        return True
    if pattern == host:
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".a.com"
        if host.startswith("*."):
            return host[1:].endswith(suffix) and len(host) > len(pattern)
        return host.endswith(suffix) and len(host) > len(suffix)
    return False


def intersect(listener_hostname: str, route_hostnames: list[str]) -> list[str]:
    """The hostnames a route serves on a listener; empty when they do not intersect.

    ["*"] means any host. A route hostname narrower than the listener's wildcard is kept; a route wildcard
    wider than the listener's hostname yields the listener's hostname.
    """
    if not route_hostnames:
        return [listener_hostname or "*"]
    if not listener_hostname:
        return list(dict.fromkeys(route_hostnames))
    result: list[str] = []
    for host in route_hostnames:
        if matches(listener_hostname, host):
            result.append(host)
        elif matches(host, listener_hostname):
            result.append(listener_hostname)
    return list(dict.fromkeys(result))


def specificity(hostname: str) -> tuple[int, int]:
    """Sort key, most specific first: exact names before wildcards, longer before shorter, "" last."""
    if not hostname or hostname == "*":
        return (2, 0)
    if hostname.startswith("*."):
        return (1, -len(hostname))
    return (0, -len(hostname))
