"""The admin listener: health, readiness, Prometheus metrics and a read-only JSON API.

    GET /healthz            the process is up
    GET /readyz             a configuration is applied and serves at least one of its listeners (503 before)
    GET /metrics            Prometheus exposition
    GET /api/v1/openapi.json  this API, described in OpenAPI 3
    GET /api/v1/config      version of the configuration in force, its sources, readiness
    GET /api/v1/status      status of every resource (the same YAML as `tidegate status`, as JSON), with what
                            the data plane found (ports taken, addresses not usable)
    GET /api/v1/routes      the IR being served
    GET /api/v1/explain?url=URL[&method=M][&header=Name:value...]
                            which listener, route and rule serve a request, and why others do not
    GET /api/v1/backends    backends and their endpoints: health, ejection, weight, in flight, counts, latency
    GET /api/v1/traffic     request counts by route and status class, latency buckets, connections
    GET /api/v1/certificates  ACME certificates: names, issuer, state, the last failure, expiry, next try
    GET /api/v1/loadbalancers  LoadBalancer Services: addresses, pools and their counts, Services refused an
                            address and why, which node announces each address and since when, nodes up
    GET /dashboard/         the web dashboard (static files from the package; nothing from outside)

Who may ask: with a token configured (--admin-token-file or TIDEGATE_ADMIN_TOKEN), every client must send
`Authorization: Bearer TOKEN`, loopback ones too (a mesh sidecar relays remote clients from 127.0.0.6), unless
--admin-trust-loopback; without a token, loopback clients alone. /healthz and /readyz answer anyone (kubelet
probes; they tell nothing). A request head over ADMIN_REQUEST_LIMIT is refused before it is parsed further,
so that no client can hold the control process up. The metrics listener (--metrics) answers /metrics and
/healthz alone, to anyone: what Prometheus's scrape annotations can reach without a token.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools

from tidegate.balancing.state import LATENCY_BOUNDS
from tidegate.observe.metrics import METRICS

log = logging.getLogger("tidegate.admin")
OPENAPI = importlib_resources.files("tidegate.observe").joinpath("openapi.json").read_bytes()


@dataclass
class RunState:
    """What the running process knows, for the admin API: updated by the run loop on every new config."""

    sources: list[str] = field(default_factory=list)
    version: int = 0
    translation: Any = None  # tidegate.translate.Translation
    statuses: list[dict] = field(default_factory=list)
    ready: bool = False
    started: float = field(default_factory=time.time)
    applied_at: float = 0.0
    registry: Any = None  # tidegate.balancing.state.Registry of the data plane: endpoint health and counts
    unbound: dict[str, str] = field(default_factory=dict)  # sockets the workers could not open: address → why
    # Config files whose last reading was refused or partly rejected: file → its problems (FileSource).
    file_problems: Callable[[], dict[str, list[Any]]] = dict
    # Brings the workers' counts up to date before an answer that shows them (WorkerPool.refresh_stats).
    refresh: Callable[[], Awaitable[None]] | None = None
    announcer: Any = None  # tidegate.announce.node.Layer2Agent, with --node
    bgp: Any = None  # tidegate.announce.bgp.BGPAgent, with --node and BGPPeers for this node
    acme: Any = None  # tidegate.acme.manager.AcmeManager, with --acme-dir


# Answers that show the workers' counts: they are brought up to date first.
_COUNTED = frozenset((b"/metrics", b"/api/v1/traffic", b"/api/v1/backends"))


ADMIN_REQUEST_LIMIT = 8 * 1024  # bytes of a request (head and any body) the admin listener reads


def peer_allowed(peer: str, authorization: str | None, token: str, trust_loopback: bool = False) -> bool:
    """With a token, whoever presents it (and loopback peers too when `trust_loopback`); without one, loopback
    peers alone."""
    try:
        loopback = ipaddress.ip_address(peer.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if loopback and (trust_loopback or not token):
        return True
    if not token or not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(authorization[len("Bearer "):].strip(), token)


class AdminProtocol(asyncio.Protocol):
    def __init__(self, state: RunState, token: str, explain: Callable[[str, str, dict[str, str]], dict],
                 trust_loopback: bool = False, metrics_only: bool = False):
        self.state = state
        self.token = token
        self.trust_loopback = trust_loopback
        self.metrics_only = metrics_only
        self.explain = explain
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.url = b""
        self.headers: dict[str, str] = {}
        self.received = 0  # bytes of the request being read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > ADMIN_REQUEST_LIMIT:
            self.parser = None
            self._send(431, {"error": f"an admin request is {ADMIN_REQUEST_LIMIT} bytes at most"}, close=True)
            return
        if self.parser is None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(400, {"error": "malformed request"}, close=True)

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        keep = self.parser.should_keep_alive()
        self.received = 0
        path = self.url.split(b"?")[0].rstrip(b"/")
        if self.metrics_only:
            if path not in (b"/metrics", b"/healthz"):
                self._send(404, {"error": "this listener serves /metrics and /healthz only"}, close=not keep)
                return
        elif path not in (b"/healthz", b"/readyz") and not peer_allowed(  # kubelet probes: no token
                self.peer, self.headers.get("authorization"), self.token, self.trust_loopback):
            self._send(403 if not self.token else 401, {"error": "the admin API needs a bearer token" if self.token
                                                        else "no admin token is configured: loopback clients only"},
                       close=not keep)
            return
        if method not in ("GET", "HEAD"):
            self._send(405, {"error": "the admin API is read-only"}, close=not keep)
            return
        if self.state.refresh is not None and path in _COUNTED:
            assert self.transport is not None
            self.transport.pause_reading()  # the next request waits for this answer
            asyncio.get_running_loop().create_task(self._answer_refreshed(self.url, method, keep))
            return
        self._answer(self.url, method, keep)

    async def _answer_refreshed(self, url: bytes, method: str, keep: bool) -> None:
        try:
            await self.state.refresh()  # type: ignore[misc]
        finally:
            self._answer(url, method, keep)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def _answer(self, url: bytes, method: str, keep: bool) -> None:
        try:
            status, body, ctype = self._route(url.decode("latin-1"))
        except Exception as exc:  # an admin bug must not take the process down
            log.exception("admin request failed")
            status, body, ctype = 500, json.dumps({"error": str(exc)}).encode(), "application/json"
        if status == 302:
            self._write(302, b"", "text/plain", close=not keep, location=ctype)
            return
        self._write(status, body, ctype, close=not keep, head=method == "HEAD")

    def _route(self, target: str) -> tuple[int, bytes, str]:
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        path = parts.path.rstrip("/") or "/"
        state = self.state
        if path in ("/", "/dashboard") and not parts.path.startswith("/dashboard/"):
            return 302, b"", "/dashboard/"
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        if path == "/readyz":
            return (200, b"ready\n", "text/plain") if state.ready else (503, b"not ready\n", "text/plain")
        if path == "/metrics":
            return 200, METRICS.exposition(), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/api/v1/openapi.json":
            return 200, OPENAPI, "application/json"
        if path == "/api/v1/config":
            return 200, _json({"version": state.version, "sources": state.sources, "ready": state.ready,
                               "unopenedListeners": state.unbound,
                               "started": state.started, "appliedAt": state.applied_at,
                               "listeners": [listener.name for listener in _listeners(state)]}), "application/json"
        if path == "/api/v1/status":
            from tidegate.translate.loadbalancers import with_announcements

            view = loadbalancers_view(state)
            entries = with_announcements(state.statuses, view["announcements"], view.get("bgp"))
            return 200, _json(entries + file_statuses(state.file_problems())), "application/json"
        if path == "/api/v1/routes":
            return 200, _json(state.translation.ir.to_data() if state.translation else {}), "application/json"
        if path == "/api/v1/backends":
            return 200, _json({"latencyBounds": list(LATENCY_BOUNDS), "backends": backends_view(state)}), \
                "application/json"
        if path == "/api/v1/traffic":
            return 200, _json({**METRICS.traffic(), "version": state.version, "now": time.time()}), \
                "application/json"
        if path == "/api/v1/loadbalancers":
            return 200, _json(loadbalancers_view(state)), "application/json"
        if path == "/api/v1/certificates":
            return 200, _json({"certificates": state.acme.view() if state.acme is not None else []}), \
                "application/json"
        if parts.path.startswith("/dashboard/"):
            name = parts.path[len("/dashboard/"):] or "index.html"
            asset = DASHBOARD.get(name)
            if asset is None:
                return 404, _json({"error": f"no such file: {name}"}), "application/json"
            return 200, asset[1], asset[0]
        if path == "/api/v1/explain":
            url = (query.get("url") or [""])[0]
            if not url:
                return 400, _json({"error": "url= is required"}), "application/json"
            headers = {}
            for raw in query.get("header", []):
                name, _, value = raw.partition(":")
                headers[name.strip().lower()] = value.strip()
            method = (query.get("method") or ["GET"])[0]
            return 200, _json(self.explain(url, method, headers)), "application/json"
        return 404, _json({"error": f"no such endpoint: {path}"}), "application/json"

    def _send(self, status: int, payload: dict, close: bool) -> None:
        self._write(status, _json(payload), "application/json", close)

    def _write(self, status: int, body: bytes, ctype: str, close: bool, head: bool = False,
               location: str = "") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reason = {200: "OK", 302: "Found", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                  404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
                  500: "Internal Server Error",
                  503: "Service Unavailable"}.get(status, "")
        head_bytes = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                      + (f"Location: {location}\r\n" if location else "")
                      + "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                      + ("Connection: close\r\n" if close else "") + "\r\n").encode()
        self.transport.write(head_bytes + (b"" if head else body))
        if close:
            self.transport.close()


def _load_dashboard() -> dict[str, tuple[str, bytes]]:
    folder = importlib_resources.files("tidegate.observe").joinpath("dashboard")
    types = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
    return {item.name: (types.get(item.name[item.name.rfind("."):], "application/octet-stream"), item.read_bytes())
            for item in folder.iterdir() if item.is_file()}


DASHBOARD = _load_dashboard()


def backends_view(state: RunState) -> list[dict[str, Any]]:
    """Every backend of the configuration in force with its endpoints: health (active checks), ejection
    (outlier detection), weight, requests in flight, and counts and latency buckets since start."""
    if state.translation is None:
        return []
    registry = state.registry
    now = time.monotonic()
    found: dict[str, dict[str, Any]] = {}
    for listener in state.translation.ir.listeners:
        for route in (*listener.http_routes, *listener.l4_routes):
            for backend in route.backends:
                entry = found.get(backend.name)
                if entry is None:
                    policy = backend.policy
                    counts = registry.backends.get(backend.name) if registry is not None else None
                    entry = found[backend.name] = {
                        "name": backend.name, "invalid": backend.invalid or None, "routes": [],
                        "algorithm": policy.algorithm if policy is not None else "RoundRobin",
                        "activeChecks": policy is not None and policy.health_check is not None,
                        "outlierDetection": policy is not None and policy.outlier is not None,
                        "active": counts.active if counts is not None else 0,
                        "retriesInFlight": counts.retries if counts is not None else 0,
                        "endpoints": [_endpoint_view(e, registry, now) for e in backend.endpoints]}
                if route.name not in entry["routes"]:
                    entry["routes"].append(route.name)
    return [found[name] for name in sorted(found)]


def _endpoint_view(endpoint: Any, registry: Any, now: float) -> dict[str, Any]:
    state = registry.endpoints.get((endpoint.address, endpoint.port)) if registry is not None else None
    view: dict[str, Any] = {
        "address": endpoint.address, "port": endpoint.port, "pod": endpoint.pod, "node": endpoint.node,
        "zone": endpoint.zone, "weight": endpoint.weight, "ready": endpoint.ready, "serving": endpoint.serving,
        "terminating": endpoint.terminating}
    if state is None:
        return {**view, "health": "unknown", "ejectedFor": 0, "ejections": 0, "active": 0, "requests": 0,
                "failures": 0, "latency": []}
    health = ("unchecked" if not state.check_results else "healthy" if state.healthy else "unhealthy")
    return {**view, "health": health, "ejectedFor": round(max(0.0, state.ejected_until - now), 1),
            "ejections": state.ejections, "active": state.active, "requests": state.requests,
            "failures": state.failures, "latency": list(state.latency)}


def file_statuses(problems: dict[str, list[Any]], most: int = 20) -> list[dict]:
    """Config files with problems, as status entries of kind ConfigFile (the dashboard's problems table shows
    any entry with a False condition): an edit that was rejected shows here until an edit mends it."""
    entries = []
    for name, listed in sorted(problems.items()):
        errors = [p for p in listed if p.severity == "error"] or listed
        message = "; ".join(str(p) for p in errors[:most])
        if len(errors) > most:
            message += f"; and {len(errors) - most} more"
        entries.append({"kind": "ConfigFile", "name": name, "status": {"conditions": [
            {"type": "Accepted", "status": "False", "reason": "Invalid", "message": message}]}})
    return entries


def _listeners(state: RunState) -> list:
    return list(state.translation.ir.listeners) if state.translation else []


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1, default=str).encode() + b"\n"


async def start_admin(address: str, state: RunState, token: str,
                      explain: Callable[[str, str, dict[str, str]], dict], trust_loopback: bool = False,
                      metrics_only: bool = False) -> asyncio.base_events.Server:
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AdminProtocol(state, token, explain, trust_loopback, metrics_only),
                                    host=host.strip("[]") or "127.0.0.1", port=int(port), reuse_address=True)


def loadbalancers_view(state: RunState) -> dict[str, Any]:
    """LoadBalancer Services, pools, and the Layer 2 announcements as this node sees them."""
    from tidegate.announce.election import assign
    from tidegate.announce.ipam import pool_status

    translation = state.translation
    if translation is None:
        return {"services": [], "refused": [], "pools": {}, "announcements": [], "nodes": []}
    lbs = translation.load_balancers
    agent = state.announcer
    if agent is not None:
        announcements, nodes = agent.status(), agent.nodes()
    else:  # no --node: who would announce with every node up
        chosen = assign(lbs.l2, None)
        announcements = [{"address": c.address, "services": list(c.services), "node": chosen.get(c.address),
                          "candidates": list(c.nodes), "since": None} for c in lbs.l2]
        nodes = [{"node": n.name, "address": n.address, "up": None} for n in lbs.nodes]
    return {
        "node": agent.node if agent is not None else None,
        "services": [{"namespace": s.namespace, "name": s.name, "pool": s.pool, "addresses": list(s.addresses),
                      "ports": [f"{port}/{protocol}" for protocol, port in s.ports],
                      "externalTrafficPolicy": "Local" if s.local else "Cluster",
                      "nodesWithPods": list(s.nodes_with_pods)} for s in lbs.services],
        "refused": [{"namespace": ns, "name": name, "reason": r.reason, "message": r.message}
                    for (ns, name), r in sorted(lbs.allocation.refusals.items())],
        "pools": {name: {**pool_status(usage), "services": usage.services}
                  for name, usage in lbs.allocation.pools.items()},
        "refusedPools": {str(key): message for key, message in lbs.allocation.pool_problems.items()},
        "announcements": announcements,
        "problems": agent.speaker.problems() if agent is not None else [],
        "nodes": nodes + [{"node": n.name, "address": n.address, "up": False, "excluded": n.reason}
                          for n in lbs.nodes if not n.usable],
        "bgp": state.bgp.status() if state.bgp is not None else planned_bgp(lbs.bgp),
    }


def planned_bgp(plan: Any) -> dict[str, Any]:
    """BGP as this process would announce it (no session runs here)."""
    from tidegate.announce.bgp import routes_view

    return {"sessions": [{"name": s.name, "peer": s.peer_address, "state": None} for s in plan.sessions],
            "routes": routes_view(plan)}
