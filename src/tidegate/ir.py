"""The intermediate representation: small, immutable, protocol-shaped (not Kubernetes-shaped).

The translator builds it; the data plane serves from it; the route table (`tidegate.router`) is compiled from
it. `to_data()` gives plain YAML-able data for golden files and `tidegate routes`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone: str = ""
    node: str = ""
    pod: str = ""  # targetRef name, for logs and the echo-based tests
    hints: tuple[str, ...] | None = None  # EndpointSlice hints.forZones; None: the slice gave none
    weight: int = 1  # from a BackendPolicy's endpointWeights


@dataclass(frozen=True)
class BackendTLS:
    """Upstream TLS from a BackendTLSPolicy."""

    hostname: str
    ca_pem: str = ""  # concatenated PEM; empty with well_known_ca
    well_known_ca: str = ""  # "System"
    subject_alt_names: tuple[str, ...] = ()
    policy: str = ""
    # Set when the policy is invalid: its Service must not be reached in clear text, so it answers 500.
    problem: str = ""
    # False: the pod's certificate is not checked (ingress-nginx's backend-protocol HTTPS, proxy_ssl_verify off)
    verify: bool = True
    # The certificate tidegate presents to this backend (ingress-nginx's proxy-ssl-secret), in place of its
    # Gateway's (spec.tls.backend.clientCertificateRef)
    client_certificate: Certificate | None = None


@dataclass(frozen=True)
class HashKey:
    """What a consistent hash is keyed by."""

    type: str  # Path | Header | Cookie | SourceIP
    name: str = ""  # the header or cookie name
    cookie_ttl: float | None = None  # set: a client without the cookie is given one (sticky session); 0: no Max-Age
    cookie_path: str = "/"
    cookie_expires: float = 0.0  # > 0: the made cookie's Expires is this many seconds ahead (ingress-nginx's)
    cookie_attributes: str = ""  # "; Domain=...; SameSite=...; Secure" as the made cookie carries them
    table_size: int = 16381


@dataclass(frozen=True)
class HealthCheck:
    """An active check, run once per endpoint however many routes use it."""

    type: str  # HTTP | TCP
    path: str = "/"
    host: str = ""
    method: str = "GET"
    expected_statuses: tuple[int, ...] = ()  # empty: 2xx and 3xx
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    jitter: float = 0.1


@dataclass(frozen=True)
class OutlierDetection:
    """Passive health: consecutive failures seen in live traffic eject an endpoint for a growing time."""

    consecutive_5xx: int = 0  # 0: not counted
    consecutive_gateway_errors: int = 5  # 502, 503, 504, connect failures, resets, timeouts
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 2
    retry_on: tuple[str, ...] = ("connect-failure", "reset", "gateway-error")
    status_codes: tuple[int, ...] = ()
    per_try_timeout: float | None = None
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    budget_percent: int = 20
    budget_min_per_second: int = 3


@dataclass(frozen=True)
class CircuitBreaker:
    """Limits per backend (Service port) across its endpoints; None means no limit."""

    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None


@dataclass(frozen=True)
class TrafficPolicy:
    """The BackendPolicy settings in force for one backend of one route, merged from its Gateway, route and
    Service policies (the more specific wins, section by section)."""

    algorithm: str = "RoundRobin"  # RoundRobin | LeastRequest | Random | PowerOfTwoChoices | ConsistentHash
    hash: HashKey | None = None
    slow_start: float = 0.0  # seconds over which a new endpoint's share ramps up
    # Prefer endpoints in tidegate's zone: (min endpoints there, overload factor); None = zone-blind.
    zone_aware: tuple[int, int] | None = None
    health_check: HealthCheck | None = None
    outlier: OutlierDetection | None = None
    retry: RetryPolicy | None = None
    connect_timeout: float | None = None
    request_timeout: float | None = None
    idle_timeout: float | None = None
    # HTTP pods: the longest a pod may send nothing while its answer is awaited (None: the run's
    # --upstream-read-timeout); ingress-nginx's proxy-read-timeout
    read_timeout: float | None = None
    circuit_breaker: CircuitBreaker | None = None
    # Where each section came from: (section, "BackendPolicy ns/name on Service ns/svc").
    origins: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Backend:
    """One weighted member of a route's backend group: a Service port resolved to pod endpoints."""

    name: str  # "ns/service:port"
    weight: int
    endpoints: tuple[Endpoint, ...] = ()
    protocol: str = ""  # appProtocol of the Service port (h2c, ws, ...)
    filters: tuple[Filter, ...] = ()
    tls: BackendTLS | None = None
    # Why this backend cannot be used (not found, not permitted, ...): its share of requests gets a 500.
    invalid: str = ""
    policy: TrafficPolicy | None = None
    # L4 relays: send the PROXY protocol header first ("v1" | "v2"), from the Service's tidegate.io/proxy-protocol
    proxy_protocol: str = ""
    # L4 relays: connect to the pod from the client's own address (IP_TRANSPARENT), so that it sees who the
    # client is: a LoadBalancer Service with externalTrafficPolicy: Local, whose pods are on this node
    keep_client_address: bool = False


@dataclass(frozen=True)
class Filter:
    type: str  # RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror, CORS ...
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    mirror: Backend | None = None  # resolved backend of a RequestMirror


@dataclass(frozen=True)
class PathMatch:
    # Exact | PathPrefix | RegularExpression | StringPrefix (an Ingress ImplementationSpecific path as ingress-nginx
    # reads it: /foo takes /foobar)
    type: str
    value: str


@dataclass(frozen=True)
class ValueMatch:
    """A header or query parameter match."""

    name: str
    value: str
    type: str = "Exact"  # Exact | RegularExpression


@dataclass(frozen=True)
class Match:
    path: PathMatch = PathMatch("PathPrefix", "/")
    method: str = ""
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()


@dataclass(frozen=True)
class Timeouts:
    request: float | None = None  # seconds; None = no limit
    backend_request: float | None = None


@dataclass(frozen=True)
class Retry:
    codes: tuple[int, ...] = ()
    attempts: int = 0
    backoff: float | None = None


@dataclass(frozen=True)
class RateLimitRule:
    """One rule of a TrafficPolicy's rateLimit: which requests it counts, by what key, and how many it admits
    (GCRA: `requests` per `period` seconds, `burst` at once)."""

    name: str  # "TrafficPolicy ns/name: rule", also the name of its count table
    requests: int = 0
    period: float = 1.0
    burst: int = 0
    key: tuple[str, ...] = ("ClientIP",)  # "ClientIP", "ClientIPPrefix/64/32", "Header:x-api-key", "Host", "Route"
    methods: tuple[str, ...] = ()
    path_match: PathMatch | None = None
    headers: tuple[ValueMatch, ...] = ()
    source_cidrs: tuple[str, ...] = ()
    exempt: bool = False
    scope: str = "Local"  # Local | Global


@dataclass(frozen=True)
class RequestGuard:
    """The TrafficPolicy settings in force on one rule, merged section by section from its Gateway's, its
    listener's, its route's and its rule's policies."""

    allow: tuple[str, ...] = ()  # CIDRs; empty: everyone not denied
    deny: tuple[str, ...] = ()
    max_body: int | None = None  # bytes
    max_in_flight_per_client: int | None = None
    rate_limits: tuple[RateLimitRule, ...] = ()
    rate_limit_headers: bool = False  # RateLimit-Policy / RateLimit (draft-ietf-httpapi-ratelimit-headers-10)
    fail_mode: str = "Open"  # Global rules when Redis is slow or down: Open | Closed | FallBackToLocal
    problem: str = ""  # an invalid policy targets the rule: it answers 500 saying this (fail closed)
    # Where each section came from: (section, "TrafficPolicy ns/name on HTTPRoute ns/route").
    origins: tuple[tuple[str, str], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class ClientIP:
    """Where a listener's clients' addresses come from (ClientPolicy clientIP): X-Forwarded-For from trusted
    proxies (by CIDR, or a number of hops from the right), or a header trusted proxies set."""

    trusted: tuple[str, ...] = ()  # CIDRs of the proxies whose word is taken
    hops: int = 0  # X-Forwarded-For: the entry this many from the right is the client's
    header: str = ""  # lower-case; "" = X-Forwarded-For
    proxy_protocol: tuple[str, ...] = ()  # CIDRs of peers whose connections start with a PROXY header


@dataclass(frozen=True)
class ConnectionLimits:
    """ClientPolicy connections and overload: open connections on a listener's socket and from one peer
    address, and the event-loop lag past which new requests are shed."""

    max_per_listener: int | None = None
    max_per_client: int | None = None
    shed_at_loop_lag: float | None = None  # overload.maxEventLoopLag, seconds


@dataclass(frozen=True)
class ClientTimeouts:
    """ClientPolicy timeouts of a listener (None: the run's default, deadlines.py), seconds."""

    request_head: float | None = None
    request_body_min_bytes: int | None = None  # requestBodyMinRate: at least this many bytes ...
    request_body_window: float | None = None  # ... in every window this long
    idle: float | None = None
    send: float | None = None
    tls_handshake: float | None = None


@dataclass(frozen=True)
class HTTP2Limits:
    """ClientPolicy http2 of a listener (None: the default, h2limits.py)."""

    max_concurrent_streams: int | None = None
    control_frame_burst: int | None = None
    control_frames_per_second: float | None = None
    max_unread_bytes: int | None = None


@dataclass(frozen=True)
class HTTPRoute:
    """One rule of an HTTPRoute/GRPCRoute/Ingress as it applies on one listener."""

    name: str  # "httproute/ns/name/rule/0"
    source: str  # "HTTPRoute ns/name"
    hostnames: tuple[str, ...]  # effective hostnames on this listener; ("*",) = any
    matches: tuple[Match, ...]
    filters: tuple[Filter, ...] = ()
    backends: tuple[Backend, ...] = ()
    timeouts: Timeouts = Timeouts()
    retry: Retry | None = None
    rule_name: str = ""
    created: str = ""  # creationTimestamp, for precedence
    # Set when the rule can only answer with an error (e.g. a rule without backends): status code.
    direct_status: int = 0
    # Ingress semantics: "*.a.com" covers exactly one more label (the Gateway API allows any number).
    wildcard_single_label: bool = False
    guard: RequestGuard | None = None  # IP access, request limits, rate limits (TrafficPolicy)
    access_log: bool = True  # False: no access log lines for it (an Ingress's enable-access-log: "false")
    client_ip: ClientIP | None = None  # its listener's (ClientPolicy), where routing can read it


@dataclass(frozen=True)
class L4Route:
    """A TLSRoute (by SNI), TCPRoute or UDPRoute on one listener."""

    name: str
    source: str
    hostnames: tuple[str, ...] = ()
    backends: tuple[Backend, ...] = ()
    created: str = ""


@dataclass(frozen=True)
class Certificate:
    secret: str  # "ns/name"
    cert_pem: str
    key_pem: str
    hostnames: tuple[str, ...] = ()  # SANs / CN, for SNI selection


@dataclass(frozen=True)
class ListenerTLS:
    mode: str  # Terminate | Passthrough
    certificates: tuple[Certificate, ...] = ()
    # Client certificates (Gateway spec.tls.frontend): CAs to verify them against, and the mode
    # (AllowValidOnly: a valid certificate is required; AllowInsecureFallback: any client is let in).
    client_ca_pem: str = ""
    client_validation: str = ""


@dataclass(frozen=True)
class Listener:
    """A programmed listener of a Gateway (or tidegate's Ingress front door)."""

    name: str  # "ns/gateway/listener"
    gateway: str  # "ns/gateway" or "ingress"
    address: str  # bind address; "" = the run's --bind default
    port: int
    protocol: str  # HTTP | HTTPS | TLS | TCP | UDP
    hostname: str = ""  # "" = any
    tls: ListenerTLS | None = None
    # The certificate the Gateway presents to TLS backends (spec.tls.backend.clientCertificateRef).
    backend_client_certificate: Certificate | None = None
    http_routes: tuple[HTTPRoute, ...] = ()
    # TLS, TCP, UDP listeners: their routes. HTTPS: names passed through to pods, not terminated (chosen by the
    # ClientHello's name before any handshake: an Ingress's ssl-passthrough)
    l4_routes: tuple[L4Route, ...] = ()
    access_log: str = ""  # json | clf | combined | off from the Gateway's tidegate.io/access-log; "" = global
    # Bind even when the address is not (yet) this host's (IP_FREEBIND): a LoadBalancer address that another
    # node announces now and this one may take over.
    freebind: bool = False
    client_ip: ClientIP | None = None  # ClientPolicy
    connection_limits: ConnectionLimits | None = None
    timeouts: ClientTimeouts | None = None
    http2: HTTP2Limits | None = None


@dataclass(frozen=True)
class IR:
    listeners: tuple[Listener, ...] = ()

    def to_data(self) -> dict[str, Any]:
        return {"listeners": [_plain(listener) for listener in self.listeners]}


def _plain(value: Any) -> Any:
    """Dataclasses to dicts, dropping fields at their defaults so that golden files stay readable."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if item == default and (f.name not in ("weight", "path") or isinstance(value, Endpoint)):
                continue
            if f.name in ("cert_pem", "key_pem", "ca_pem"):
                out[f.name] = f"<{len(item)} bytes>"
                continue
            out[f.name] = _plain(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
