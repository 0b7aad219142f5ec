"""Request guards: a TrafficPolicy's IP access lists, request limits and local rate limits, decided once a
request is routed and before anything reaches a pod.

- IP access: `deny` wins; with `allow` set, a client in none of it is refused (403). Address lists are merged
  into sorted ranges and searched by bisection; each client address's answer is kept (bounded).
- Rate limits: GCRA (the generic cell rate algorithm): one number per key, the "theoretical arrival time".
  A rule admits `burst` requests at once and then one every `period / requests`; no interval of length L
  admits more than `burst + requests × L / period`. A refused request gets 429 and the exact wait, rounded
  up to whole seconds, in `Retry-After`. The keys of a rule are kept in a bounded table: the least recently
  used go first.
- Request limits: a declared body over `maxBodySize` gets 413 at once; `maxInFlightPerClient` counts the
  requests of one client address being served (429 over it).

Counts are per worker process (a `Local` rule means this replica): with `--workers N` each worker admits
its share (requests and burst divided by N), the kernel spreading connections over the workers.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import re2

from tidegate import ir
from tidegate.dataplane import redis_limits
from tidegate.observe.metrics import METRICS

log = logging.getLogger("tidegate.ratelimit")
MAX_KEYS = 100_000  # per rule: least recently used keys go first
MAX_CACHED_ADDRESSES = 65_536  # per address list: client address → verdict


class Share:
    """This process's part of each Local limit (set by the worker from --workers), and of a Global one when
    Redis cannot be reached and the policy falls back to local counts (--rate-limit-replicas)."""

    def __init__(self) -> None:
        self.workers = 1
        self.replicas = 1


SHARE = Share()


def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        parsed = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


class AddressSet:
    """A set of CIDRs: membership of an address in O(log n), the answers per address cached."""

    def __init__(self, cidrs: Iterable[str]):
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            ranges[net.version].append((int(net.network_address), int(net.broadcast_address)))
        self.starts: dict[int, list[int]] = {}
        self.ends: dict[int, list[int]] = {}
        for version, spans in ranges.items():
            merged: list[list[int]] = []
            for start, end in sorted(spans):
                if merged and start <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            self.starts[version] = [s for s, _ in merged]
            self.ends[version] = [e for _, e in merged]
        self.cache: dict[str, bool] = {}

    def __contains__(self, address: str) -> bool:
        found = self.cache.get(address)
        if found is not None:
            return found
        parsed = _parse(address)
        found = False
        if parsed is not None:
            value = int(parsed)
            starts = self.starts[parsed.version]
            i = bisect.bisect_right(starts, value) - 1
            found = i >= 0 and value <= self.ends[parsed.version][i]
        if len(self.cache) >= MAX_CACHED_ADDRESSES:
            self.cache.clear()
        self.cache[address] = found
        return found


class GCRA:
    """The counts of one rate-limit rule: for each key, when its next request would be exactly on time."""

    __slots__ = ("interval", "max_keys", "tats", "tolerance")

    def __init__(self, requests: int, period: float, burst: int, share: int = 1, max_keys: int = MAX_KEYS):
        per_worker = max(requests / share, 1e-9)
        self.interval = period / per_worker
        self.tolerance = (max(1, math.ceil(burst / share)) - 1) * self.interval
        self.tats: dict[str, float] = {}
        self.max_keys = max_keys

    def take(self, key: str, now: float) -> float:
        """Count a request at `now`: 0.0 when admitted, else how long until it would be."""
        tats = self.tats
        tat = tats.pop(key, now)  # out and in again: the dict's order is the order of last use
        if tat < now:
            tat = now
        late = tat - now - self.tolerance
        if late > 1e-9:
            tats[key] = tat
            return late
        tats[key] = tat + self.interval
        if len(tats) > self.max_keys:
            del tats[next(iter(tats))]
        return 0.0

    def remaining(self, key: str, now: float) -> int:
        """Requests `key` could still send at once."""
        tat = max(self.tats.get(key, now), now)
        return max(0, math.floor((now + self.tolerance - tat) / self.interval + 1e-9) + 1)

    def reset(self, key: str, now: float) -> int:
        """Whole seconds until `key`'s allowance is full again."""
        return max(0, math.ceil(self.tats.get(key, now) - now - 1e-9))


_TABLES: dict[tuple[str, int, float, int, int], GCRA] = {}  # outlive configurations: counts survive a reload


def _share(rule: ir.RateLimitRule) -> int:
    """Local: this worker's part of its replica's limit. Global, counted here (no Redis, or Redis down
    under FallBackToLocal): also this replica's part of the whole."""
    return SHARE.workers * (SHARE.replicas if rule.scope == "Global" else 1)


def table(rule: ir.RateLimitRule) -> GCRA:
    key = (rule.name, rule.requests, rule.period, rule.burst, _share(rule))
    found = _TABLES.get(key)
    if found is None:
        found = _TABLES[key] = GCRA(rule.requests, rule.period, rule.burst, _share(rule))
    return found


def forget_tables(keep: Iterable[ir.RateLimitRule]) -> None:
    """Drop the counts of rules no configuration has any more."""
    wanted = {(r.name, r.requests, r.period, r.burst, _share(r)) for r in keep}
    for key in [k for k in _TABLES if k not in wanted]:
        del _TABLES[key]


class InFlight:
    """Requests being served per client address, for maxInFlightPerClient."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> bool:
        count = self.counts.get(key, 0)
        if count >= limit:
            return False
        self.counts[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self.counts.get(key, 0) - 1
        if count > 0:
            self.counts[key] = count
        else:
            self.counts.pop(key, None)


IN_FLIGHT = InFlight()


@dataclass
class Refusal:
    status: int
    message: str
    headers: list[tuple[str, str]]
    rule: str  # for the access log and metrics: "ipAccess", "maxBodySize", "TrafficPolicy ns/name: rule" ...
    result: str  # denied | limited | too-large | unavailable


class RateRule:
    """A rate-limit rule ready to use."""

    def __init__(self, rule: ir.RateLimitRule):
        self.rule = rule
        self.name = rule.name
        self.short = rule.name.rpartition(": ")[2]
        self.exempt = rule.exempt
        self.methods = frozenset(rule.methods)
        self.path = rule.path_match
        self.path_regex = re2.compile(self.path.value) if self.path and self.path.type == "RegularExpression" \
            else None
        self.headers = [(h.name, h.value, re2.compile(h.value) if h.type == "RegularExpression" else None)
                        for h in rule.headers]
        self.sources = AddressSet(rule.source_cidrs) if rule.source_cidrs else None
        self.key = rule.key
        self.simple_key = rule.key == ("ClientIP",)
        self.table = table(rule) if not rule.exempt else None
        self.policy_header = f'"{self.short}";q={rule.requests};w={max(1, round(rule.period))}'
        self.global_scope = rule.scope == "Global"
        if self.global_scope and not rule.exempt:  # the whole limit, counted in Redis
            self.interval = rule.period / rule.requests
            self.tolerance = (max(1, rule.burst) - 1) * self.interval

    def matches(self, peer: str, method: str, path: str, headers: dict[str, str]) -> bool:
        if self.methods and method not in self.methods:
            return False
        path_match = self.path
        if path_match is not None:
            if path_match.type == "Exact":
                if path != path_match.value:
                    return False
            elif path_match.type == "PathPrefix":
                prefix = path_match.value.rstrip("/")
                if prefix and path != prefix and not path.startswith(prefix + "/"):
                    return False
            elif self.path_regex is not None and not self.path_regex.fullmatch(path):
                return False
        for name, value, regex in self.headers:
            got = headers.get(name)
            if got is None or (regex.fullmatch(got) is None if regex is not None else got != value):
                return False
        return self.sources is None or peer in self.sources

    def key_of(self, peer: str, host: str, headers: dict[str, str], route: str) -> str:
        if self.simple_key:
            return peer
        parts = []
        for part in self.key:
            if part == "ClientIP":
                parts.append(peer)
            elif part.startswith("ClientIPPrefix/"):
                parts.append(_prefix(peer, part))
            elif part.startswith("Header:"):
                parts.append(headers.get(part[7:], ""))
            elif part == "Host":
                parts.append(host.lower())
            else:
                parts.append(route)
        return "\x1f".join(parts)


_PREFIXES: dict[tuple[str, str], str] = {}


def _prefix(peer: str, part: str) -> str:
    found = _PREFIXES.get((peer, part))
    if found is None:
        _, v6, v4 = part.split("/")
        parsed = _parse(peer)
        if parsed is None:
            found = peer
        else:
            length = int(v4) if parsed.version == 4 else int(v6)
            found = str(ipaddress.ip_network(f"{parsed}/{length}", strict=False))
        if len(_PREFIXES) >= MAX_CACHED_ADDRESSES:
            _PREFIXES.clear()
        _PREFIXES[(peer, part)] = found
    return found


class Guard:
    """One rule's RequestGuard, ready to decide."""

    def __init__(self, guard: ir.RequestGuard):
        self.spec = guard
        self.allow = AddressSet(guard.allow) if guard.allow else None
        self.deny = AddressSet(guard.deny) if guard.deny else None
        self.max_body = guard.max_body
        self.max_in_flight = guard.max_in_flight_per_client
        self.rules = [RateRule(r) for r in guard.rate_limits]
        self.headers = guard.rate_limit_headers

    def check(self, peer: str, method: str, host: str, path: str, headers: dict[str, str], route: str,
              content_length: int | None, now: float
              ) -> tuple[Refusal | None, list[tuple[str, str]] | None, list[tuple[RateRule, str]] | None]:
        """(a refusal, or None; the RateLimit headers for the answer when asked for; the Global rules to ask
        Redis about, with their keys: `decide_global` awaits the answer)."""
        if self.deny is not None and peer in self.deny:
            return Refusal(403, "forbidden: the client's address is denied", [], "ipAccess.deny", "denied"), None, None
        if self.allow is not None and peer not in self.allow:
            return Refusal(403, "forbidden: the client's address is not allowed", [], "ipAccess.allow",
                           "denied"), None, None
        if self.max_body is not None and content_length is not None and content_length > self.max_body:
            return Refusal(413, f"request body larger than {self.max_body} bytes", [], "requestLimits.maxBodySize",
                           "too-large"), None, None
        answer_headers = None
        deferred: list[tuple[RateRule, str]] | None = None
        for rule in self.rules:
            if not rule.matches(peer, method, path, headers):
                continue
            if rule.exempt:
                break
            key = rule.key_of(peer, host, headers, route)
            limiter = redis_limits.LIMITER
            if rule.global_scope and limiter is not None:
                # This worker's lease of the key decides most requests of a busy key; the others ask Redis.
                leased = limiter.leased(redis_limits.redis_key(rule.name, key), now)
                if leased > 0.0:
                    return self.refused(rule, leased), None, None
                if leased < 0.0:
                    if deferred is None:
                        deferred = []
                    deferred.append((rule, key))
                continue
            gcra = rule.table
            assert gcra is not None
            wait = gcra.take(key, now)
            if wait > 0.0:
                return self.refused(rule, wait), None, None
            if self.headers and answer_headers is None:
                answer_headers = [("RateLimit-Policy", rule.policy_header),
                                  ("RateLimit", f'"{rule.short}";r={gcra.remaining(key, now)};'
                                                f't={gcra.reset(key, now)}')]
        return None, answer_headers, deferred

    def refused(self, rule: RateRule, wait: float) -> Refusal:
        extra = [("Retry-After", str(max(1, math.ceil(wait))))]
        if self.headers:
            extra += [("RateLimit-Policy", rule.policy_header),
                      ("RateLimit", f'"{rule.short}";r=0;t={max(1, math.ceil(wait))}')]
        return Refusal(429, "too many requests", extra, rule.name, "limited")

    async def decide_global(self, deferred: list[tuple[RateRule, str]]) -> Refusal | None:
        """Ask Redis about the Global rules a request matched (one batch with the loop turn's other checks)."""
        limiter = redis_limits.LIMITER
        asked = [limiter.check(redis_limits.redis_key(rule.name, key), rule.interval, rule.tolerance, True)
                 for rule, key in deferred]
        waits = [await future for future in asked]
        return self._verdict(deferred, waits)

    def when_decided(self, deferred: list[tuple[RateRule, str]], then: Any) -> None:
        """decide_global for a caller with no task: `then(refusal or None)` once Redis has answered (maybe at
        once, when Redis is known to be away)."""
        limiter = redis_limits.LIMITER
        waits: list[Any] = [None] * len(deferred)
        left = [len(deferred)]

        def answered_at(i: int) -> Any:
            def answered(wait: Any) -> None:
                waits[i] = wait
                left[0] -= 1
                if left[0] == 0:
                    then(self._verdict(deferred, waits))
            return answered

        for i, (rule, key) in enumerate(deferred):
            limiter.ask(redis_limits.redis_key(rule.name, key), rule.interval, rule.tolerance, answered_at(i), True)

    def _verdict(self, deferred: list[tuple[RateRule, str]], waits: list[Any]) -> Refusal | None:
        """Redis's answers (None where it could not say in time: the policy's failMode decides)."""
        refusal = None
        for (rule, key), wait in zip(deferred, waits, strict=True):
            if wait is None:
                mode = self.spec.fail_mode
                METRICS.redis_fallbacks.labels(mode).inc()
                if mode == "Closed":
                    refusal = refusal or Refusal(500, "rate limit store unavailable", [], rule.name, "unavailable")
                    continue
                if mode != "FallBackToLocal":
                    continue
                assert rule.table is not None
                wait = rule.table.take(key, time.monotonic())
            if wait > 0.0 and refusal is None:
                refusal = self.refused(rule, wait)
        return refusal


class ClientAddress:
    """A listener's ClientPolicy clientIP, ready: the client's address from the peer's and the headers."""

    def __init__(self, spec: ir.ClientIP):
        self.trusted = AddressSet(spec.trusted) if spec.trusted else None
        self.hops = spec.hops
        self.header = spec.header

    def of(self, peer: str, headers: dict[str, str]) -> str:
        if not self.header and not self.hops and self.trusted is None:
            return peer  # PROXY protocol alone: the peer is already the client
        trusted = self.trusted
        if trusted is not None and peer not in trusted:
            return peer  # an untrusted peer's word is not taken
        if self.header:
            value = headers.get(self.header, "").strip()
            return value if value and _parse(value) is not None else peer
        forwarded = headers.get("x-forwarded-for")
        if not forwarded:
            return peer
        entries = [e.strip() for e in forwarded.split(",")]
        if self.hops:
            if len(entries) < self.hops:
                return peer
            found = entries[-self.hops]
            return found if _parse(found) is not None else peer
        assert trusted is not None
        for entry in reversed(entries):  # right to left: the first address no trusted proxy holds
            if _parse(entry) is None:
                return peer
            if entry not in trusted:
                return entry
        return entries[0] if _parse(entries[0]) is not None else peer


def _ready(cache: dict[int, tuple[Any, Any]], spec: Any, make: Any) -> Any:
    """The ready form of an IR object (`make(spec)`), kept while that object lives: keyed by its identity,
    and checked, since an identity can be reused once its object is gone. Bounded."""
    found = cache.get(id(spec))
    if found is not None and found[0] is spec:
        return found[1]
    made = make(spec)
    if len(cache) > 10_000:
        cache.clear()
    cache[id(spec)] = (spec, made)
    return made


_CLIENT_ADDRESSES: dict[int, tuple[Any, Any]] = {}


def client_address_for(spec: ir.ClientIP) -> ClientAddress:
    ready: ClientAddress = _ready(_CLIENT_ADDRESSES, spec, ClientAddress)
    return ready


class LoopLag:
    """How late this worker's event loop runs: a timer due every 50 ms, and how late it fired last
    (ClientPolicy overload sheds while that is past its threshold)."""

    INTERVAL = 0.05

    def __init__(self) -> None:
        self.lag = 0.0
        self.due = 0.0
        self.loop: Any = None

    def start(self) -> None:
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.due = time.monotonic() + self.INTERVAL
        self.loop.call_later(self.INTERVAL, self._tick)

    def _tick(self) -> None:
        # A timer callback, not a task: it runs in the loop's timer phase, before the I/O that waited
        # behind the stall is read, so that I/O already sees the lag.
        now = time.monotonic()
        self.lag = max(0.0, now - self.due)
        METRICS.loop_lag.observe(self.lag)
        self.due = now + self.INTERVAL
        self.loop.call_later(self.INTERVAL, self._tick)

    def over(self, limits: ir.ConnectionLimits) -> bool:
        threshold = limits.shed_at_loop_lag
        return threshold is not None and self.lag > threshold


LAG = LoopLag()


class ConnectionCaps:
    """Open connections per listening socket and per peer address (ClientPolicy connections)."""

    def __init__(self) -> None:
        self.per_socket: dict[Any, int] = {}
        self.per_client: dict[tuple[Any, str], int] = {}

    def admit(self, socket_key: Any, peer: str, limits: ir.ConnectionLimits) -> str:
        """"" when the connection may stay (and is counted), else the limit it is over."""
        if LAG.over(limits):
            return "overload"
        open_here = self.per_socket.get(socket_key, 0)
        if limits.max_per_listener is not None and open_here >= limits.max_per_listener:
            return "connections-per-listener"
        from_client = self.per_client.get((socket_key, peer), 0)
        if limits.max_per_client is not None and from_client >= limits.max_per_client:
            return "connections-per-client"
        self.per_socket[socket_key] = open_here + 1
        self.per_client[(socket_key, peer)] = from_client + 1
        return ""

    def release(self, socket_key: Any, peer: str) -> None:
        count = self.per_socket.get(socket_key, 0) - 1
        if count > 0:
            self.per_socket[socket_key] = count
        else:
            self.per_socket.pop(socket_key, None)
        count = self.per_client.get((socket_key, peer), 0) - 1
        if count > 0:
            self.per_client[(socket_key, peer)] = count
        else:
            self.per_client.pop((socket_key, peer), None)


CONNECTIONS = ConnectionCaps()


_GUARDS: dict[int, tuple[Any, Any]] = {}


def guard_for(spec: ir.RequestGuard) -> Guard:
    """The ready guard of a rule's RequestGuard (its counts live in _TABLES, whatever happens to it)."""
    ready: Guard = _ready(_GUARDS, spec, Guard)
    return ready


def reset_for(listeners: Any) -> None:
    """A new configuration: keep the ready guards and counts it still uses, drop the others."""
    specs = {id(route.guard): route.guard for listener in listeners for route in listener.http_routes
             if route.guard is not None}
    for key in [k for k in _GUARDS if k not in specs or _GUARDS[k][0] is not specs[k]]:
        del _GUARDS[key]
    rules = [rule for spec in specs.values() for rule in spec.rate_limits]
    forget_tables(rules)
    if redis_limits.LIMITER is None:
        for name in sorted({r.name for r in rules if r.scope == "Global"} - _SAID_LOCAL):
            log.warning("%s: scope Global without --rate-limit-redis: counted by each replica (1/%d of the "
                        "limit, --rate-limit-replicas)", name, SHARE.replicas)
            _SAID_LOCAL.add(name)


_SAID_LOCAL: set[str] = set()
