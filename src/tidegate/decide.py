"""What tidegate answers a request with, worked out from the route table alone, without sending anything: the
status (a redirect, an error the rule answers itself, 404 for no rule), or where the request would go (the
backend, the path and query, the Host) with what it would carry.

It follows the data plane's order (dataplane/http1.py serve_exchange) and uses its filter functions
(dataplane/filters.py), so that a test of routing behaviour, `tidegate explain` and the comparison of two
configurations read the same answers the data plane gives; tests/test_ingress_nginx.py drives both for the
same cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tidegate import ir
from tidegate.dataplane import basic_auth
from tidegate.dataplane.filters import cors, modify_headers, redirect_location, replace_path, with_query
from tidegate.router import Request, Router, normal_path


@dataclass
class Decision:
    status: int  # 0: forwarded to `backend`; -1: no listener on the port
    route: str = ""
    backend: str = ""  # "ns/service:port" of the first backend the rule has
    weights: str = ""  # with more than one backend: "name=weight,..."
    target: str = ""  # the path and query sent on
    host: str = ""  # the Host sent on
    location: str = ""  # a redirect's Location
    headers: dict[str, str] = field(default_factory=dict)  # request headers a filter set or added (lower case)
    asks: str = ""  # an authentication service that decides first (external authentication: its URL)


def decide(router: Router, request: Request, scheme: str = "http", port: int = 80, query: str = "") -> Decision:
    request = replace(request, path=normal_path(request.path))  # as the data plane reads it (route_request)
    candidate = router.lookup(request)
    if candidate is None:
        return Decision(404)
    route = candidate.route
    path = request.path
    matched_prefix = candidate.match.path.value if candidate.match.path.type == "PathPrefix" else None
    headers: list[tuple[str, str]] = []
    host = request.host
    asks = ""
    upstream_path = path
    for f in route.filters:
        if f.type == "RequestRedirect":
            return Decision(int(f.config.get("statusCode", 302)), route.name,
                            location=redirect_location(f.config, scheme, request.host, port, path, query,
                                                       matched_prefix))
        if f.type == "CORS" and cors(f.config, request.method, dict(request.headers))[0]:
            return Decision(204, route.name)  # a preflight tidegate answers itself
        if f.type == "BasicAuth":
            refused = _basic_auth(f.config, request.headers.get("authorization"))
            if refused:
                return Decision(refused, route.name)
        if f.type == "ExternalAuth":
            if f.config.get("problem"):
                return Decision(503, route.name)
            asks = f.config["url"]
        host, upstream_path, headers = _apply(f, host, upstream_path, headers, matched_prefix)
    if upstream_path != path and not upstream_path.startswith("/"):
        return Decision(400, route.name)  # a rewrite that made no absolute path (dataplane/http1.py)
    if route.direct_status:
        return Decision(route.direct_status, route.name)
    backend = next((b for b in route.backends if b.weight > 0), None)
    if backend is None:
        return Decision(500, route.name)
    if backend.invalid:
        return Decision(500, route.name, backend.name)
    for f in backend.filters:
        host, upstream_path, headers = _apply(f, host, upstream_path, headers, matched_prefix)
    shares = [b for b in route.backends if b.weight > 0]
    weights = ",".join(f"{b.name}={b.weight}" for b in shares) if len(shares) > 1 else ""
    return Decision(0, route.name, backend.name, weights=weights, target=with_query(upstream_path, query), host=host,
                    headers={name.lower(): value for name, value in headers}, asks=asks)


def _basic_auth(config: dict, authorization: str | None) -> int:
    """basic_auth.check's status, worked out at once: 0 (let in), 401 or 503."""
    if config.get("problem"):
        return 503
    found = basic_auth.credentials(authorization) if authorization else None
    return 0 if found is not None and basic_auth.users_of(config["htpasswd"]).verify(*found) else 401


def _apply(f: ir.Filter, host: str, path: str, headers: list[tuple[str, str]], matched_prefix: str | None
           ) -> tuple[str, str, list[tuple[str, str]]]:
    if f.type == "RequestHeaderModifier":
        headers = modify_headers(headers, f.config)
    elif f.type == "URLRewrite":
        if f.config.get("hostname"):
            host = f.config["hostname"]
        if f.config.get("path"):
            path = replace_path(path, f.config["path"], matched_prefix)
    return host, path, headers
