"""Prometheus metrics (prometheus-client), with labels that stay bounded: listener, route and backend names
from the configuration, method from a fixed list, status by class. Never raw paths or client addresses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

_METHODS_LISTED: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")
_CODE_CLASSES: Final = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
# A list, not a tuple: compiled (setup.py), a Final tuple of floats is built again wherever it is read.
_LATENCY_BUCKETS: Final = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    """Counts per bucket (+Inf last) as a histogram's cumulative buckets."""
    out, running = [], 0.0
    for bound, count in zip([*_LATENCY_BUCKETS, float("inf")], counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out


def bucket_index(bounds: list[float], seconds: float) -> int:
    """The bucket of `seconds` (bisect_left's answer): a short scan, as most requests fall in the first
    buckets, and compiled it compares C doubles."""
    for i in range(len(bounds)):
        if seconds <= bounds[i]:
            return i
    return len(bounds)


_METHOD_INDEX: Final = {method: i for i, method in enumerate(_METHODS_LISTED)}
_OTHER_METHOD: Final = len(_METHODS_LISTED)  # "OTHER"
_CLASSES: Final = len(_CODE_CLASSES)
_SLOTS: Final = (len(_METHODS_LISTED) + 1) * _CLASSES  # request counts per method and status class


class RouteCounts:
    """One (listener, route)'s request counts and latency buckets. The data plane keeps a reference with the
    rule it serves (fastlane), so recording a request costs no dict lookup; counts are ints and sums are
    unboxed floats when compiled (setup.py)."""

    __slots__ = ("bytes_in", "bytes_out", "latency", "latency_sum", "requests", "upstream", "upstream_sum")

    def __init__(self) -> None:
        self.requests = [0] * _SLOTS  # by method index * _CLASSES + status class index
        self.latency = [0] * (len(_LATENCY_BUCKETS) + 1)  # per bucket, +Inf last
        self.latency_sum = 0.0
        self.upstream = [0] * (len(_LATENCY_BUCKETS) + 1)  # time spent at the endpoints, likewise
        self.upstream_sum = 0.0
        self.bytes_in = 0  # request body bytes
        self.bytes_out = 0  # response body bytes

    def observe(self, method: str, status: int, seconds: float, upstream_seconds: float, bytes_in: int,
                bytes_out: int) -> None:
        """One request answered; `upstream_seconds` < 0 when no endpoint was tried."""
        code = status // 100 if 0 < status < 600 else 0
        self.requests[_METHOD_INDEX.get(method, _OTHER_METHOD) * _CLASSES + code] += 1
        self.latency[bucket_index(_LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        if upstream_seconds >= 0.0:
            self.upstream[bucket_index(_LATENCY_BUCKETS, upstream_seconds)] += 1
            self.upstream_sum += upstream_seconds
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def request_counts(self) -> Iterator[tuple[str, str, int]]:
        """(method, status class, count) for the counts that are not zero."""
        for i, count in enumerate(self.requests):
            if count:
                method, code = divmod(i, _CLASSES)
                yield (_METHODS_LISTED[method] if method < _OTHER_METHOD else "OTHER"), _CODE_CLASSES[code], count


class _RequestCollector:
    """Per-request counts and latency buckets kept per (listener, route) in RouteCounts, turned into metric
    families only when scraped: no lock and no metric object per update on the request path. In the control
    process of `run --workers N`, the workers' sums in the same shape (Metrics.merge_worker)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], RouteCounts] = {}

    def requests(self) -> dict[tuple[str, str, str, str], int]:
        """Counts by (listener, route, method, status class)."""
        out: dict[tuple[str, str, str, str], int] = {}
        for (listener, route), counts in list(self.routes.items()):
            for method, code, count in counts.request_counts():
                out[(listener, route, method, code)] = count
        return out

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("tidegate_http_requests", "HTTP requests answered, by listener, route, "
                                       "method and status class", labels=["listener", "route", "method", "code"])
        for key, value in self.requests().items():
            requests.add_metric(list(key), value)
        yield requests
        routes = list(self.routes.items())
        duration = HistogramMetricFamily("tidegate_http_request_duration_seconds", "Time from a request's head "
                                         "to the end of its response", labels=["listener", "route"])
        for pair, counts in routes:
            duration.add_metric(list(pair), _cumulative(counts.latency), sum_value=counts.latency_sum)
        yield duration
        upstream = HistogramMetricFamily("tidegate_http_upstream_duration_seconds", "Time spent waiting on "
                                         "endpoints (all tries of a request)", labels=["listener", "route"])
        for pair, counts in routes:
            upstream.add_metric(list(pair), _cumulative(counts.upstream), sum_value=counts.upstream_sum)
        yield upstream
        received = CounterMetricFamily("tidegate_http_request_body_bytes", "Request body bytes received from "
                                       "clients", labels=["listener", "route"])
        sent = CounterMetricFamily("tidegate_http_response_body_bytes", "Response body bytes sent to clients",
                                   labels=["listener", "route"])
        for pair, counts in routes:
            received.add_metric(list(pair), counts.bytes_in)
            sent.add_metric(list(pair), counts.bytes_out)
        yield received
        yield sent


class ConnectionCounts:
    """Client connections open now and accepted so far: plain ints that each connection bumps (a
    prometheus_client Gauge or Counter takes a lock on every change), read when scraped."""

    __slots__ = ("accepted", "open")

    def __init__(self) -> None:
        self.open = 0  # decremented by whichever protocol sees the connection close
        self.accepted = 0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("tidegate_http_connections", "Client connections open now", value=self.open)
        yield CounterMetricFamily("tidegate_http_connections_accepted", "Client connections accepted",
                                  value=self.accepted)


# The places of an L4Counts route's list (module constants: compiled, a class's attributes are per instance).
L4_OPENED: Final = 0
L4_OPEN: Final = 1
L4_BYTES_IN: Final = 2
L4_BYTES_OUT: Final = 3
L4_DATAGRAMS_IN: Final = 4
L4_DATAGRAMS_OUT: Final = 5


class L4Counts:
    """TCP connections and UDP sessions (dataplane/l4.py) by listener, route and protocol, and what was
    refused by listener and reason: plain ints that each connection bumps, read when scraped."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str, str], list[int]] = {}
        self.refused: dict[tuple[str, str], int] = {}

    def route(self, listener: str, route: str, protocol: str) -> list[int]:
        counts = self.routes.get((listener, route, protocol))
        if counts is None:
            counts = self.routes[(listener, route, protocol)] = [0] * 6
        return counts

    def refuse(self, listener: str, reason: str) -> None:
        self.refused[(listener, reason)] = self.refused.get((listener, reason), 0) + 1

    def collect(self) -> Iterator[Metric]:
        labels = ["listener", "route", "protocol"]
        opened = CounterMetricFamily("tidegate_l4_connections", "TCP connections (TLS ones included) relayed to an "
                                     "endpoint, and UDP sessions opened", labels=labels)
        open_now = GaugeMetricFamily("tidegate_l4_open_connections", "TCP connections and UDP sessions open now",
                                     labels=labels)
        transferred = CounterMetricFamily("tidegate_l4_bytes", "Bytes relayed: in from clients, out to them",
                                          labels=[*labels, "direction"])
        datagrams = CounterMetricFamily("tidegate_l4_datagrams", "UDP datagrams relayed: in from clients, out to "
                                        "them", labels=[*labels, "direction"])
        for (listener, route, protocol), counts in list(self.routes.items()):
            key = [listener, route, protocol]
            opened.add_metric(key, counts[L4_OPENED])
            open_now.add_metric(key, counts[L4_OPEN])
            transferred.add_metric([*key, "in"], counts[L4_BYTES_IN])
            transferred.add_metric([*key, "out"], counts[L4_BYTES_OUT])
            if protocol == "udp":
                datagrams.add_metric([*key, "in"], counts[L4_DATAGRAMS_IN])
                datagrams.add_metric([*key, "out"], counts[L4_DATAGRAMS_OUT])
        refused = CounterMetricFamily("tidegate_l4_refused", "TCP connections closed and UDP datagrams dropped "
                                      "before reaching an endpoint, by reason", labels=["listener", "reason"])
        for (listener, reason), count in list(self.refused.items()):
            refused.add_metric([listener, reason], count)
        yield from (opened, open_now, transferred, datagrams, refused)


class _EndpointCollector:
    """Endpoint health, ejection, requests in flight and counts, read from the data plane's balancing state
    when scraped. `source` returns the admin API's backends view (set by `tidegate run`)."""

    def __init__(self) -> None:
        self.source: Callable[[], list[dict]] | None = None

    def collect(self) -> Iterator[Metric]:
        labels = ["backend", "endpoint"]
        healthy = GaugeMetricFamily("tidegate_endpoint_healthy", "1 when the endpoint passes its active health "
                                    "checks (or has none), else 0", labels=labels)
        ejected = GaugeMetricFamily("tidegate_endpoint_ejected", "1 while outlier detection keeps the endpoint "
                                    "out of rotation", labels=labels)
        active = GaugeMetricFamily("tidegate_endpoint_active_requests", "Requests in flight to the endpoint",
                                   labels=labels)
        requests = CounterMetricFamily("tidegate_endpoint_requests", "Tries sent to the endpoint", labels=labels)
        failures = CounterMetricFamily("tidegate_endpoint_failures", "Tries that got a 5xx or no answer",
                                       labels=labels)
        for backend in (self.source() if self.source is not None else []):
            for e in backend["endpoints"]:
                key = [backend["name"], f"{e['address']}:{e['port']}"]
                healthy.add_metric(key, 0 if e["health"] == "unhealthy" else 1)
                ejected.add_metric(key, 1 if e["ejectedFor"] > 0 else 0)
                active.add_metric(key, e["active"])
                requests.add_metric(key, e["requests"])
                failures.add_metric(key, e["failures"])
        yield from (healthy, ejected, active, requests, failures)


class _WorkerSums:
    """The workers' data-plane counters and gauges, added up, and each worker's request count."""

    def __init__(self, workers: dict[int | str, dict]):
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        totals: dict[tuple[str, str, tuple], float] = {}
        for snap in list(self.workers.values()):
            for name, kind, doc, sample, labels, value in snap["samples"]:
                if name not in families:
                    families[name] = Metric(name, doc, kind)
                key = (name, sample, labels)
                totals[key] = totals.get(key, 0.0) + value
        for (name, sample, labels), value in totals.items():
            families[name].add_sample(sample, dict(labels), value)
        yield from families.values()
        per_worker = CounterMetricFamily("tidegate_worker_requests", "HTTP requests answered, by worker process",
                                         labels=["worker"])
        for index, snap in sorted((k, v) for k, v in self.workers.items() if isinstance(k, int)):
            per_worker.add_metric([str(index)], sum(snap["requests"].values()))
        yield per_worker


class AnnouncerMetrics:
    """Address pools, the Layer 2 agent and the BGP agent (control process): read when scraped."""

    def __init__(self) -> None:
        self.source: Any = None  # tidegate.announce.node.Layer2Agent
        self.bgp: Any = None  # tidegate.announce.bgp.BGPAgent
        self.pools: dict[str, Any] = {}  # pool name -> announce.ipam.PoolUsage

    def collect(self) -> Iterator[Metric]:
        assigned = GaugeMetricFamily("tidegate_address_pool_assigned", "Addresses of an IPAddressPool given to "
                                     "LoadBalancer Services, by pool and family", labels=["pool", "family"])
        available = GaugeMetricFamily("tidegate_address_pool_available", "Addresses of an IPAddressPool still "
                                      "free, by pool and family", labels=["pool", "family"])
        for name, usage in sorted(self.pools.items()):
            for family, used, free in (("ipv4", usage.assigned_v4, usage.available_v4),
                                       ("ipv6", usage.assigned_v6, usage.available_v6)):
                assigned.add_metric([name, family], used)
                available.add_metric([name, family], float(free))
        yield assigned
        yield available
        if self.bgp is not None:
            yield from self._bgp(self.bgp)
        agent = self.source
        if agent is None:
            return
        counts = agent.speaker.counts
        announced = GaugeMetricFamily("tidegate_l2_announced", "1 for each address this node announces now",
                                      labels=["address"])
        for address in agent.speaker.held:
            announced.add_metric([address], 1)
        yield announced
        yield CounterMetricFamily("tidegate_l2_gratuitous_packets", "Gratuitous ARP and unsolicited neighbour "
                                  "advertisements sent (takeovers and refreshes)", value=counts.gratuitous)
        yield CounterMetricFamily("tidegate_l2_replies", "ARP replies and solicited neighbour advertisements sent",
                                  value=counts.replies)
        yield CounterMetricFamily("tidegate_l2_takeovers", "Addresses this node started announcing",
                                  value=counts.takeovers)
        up = GaugeMetricFamily("tidegate_node_up", "1 when the node's workers answer heartbeats", labels=["node"])
        live = agent.members.live()
        for node in sorted(agent.members.peers):
            up.add_metric([node], node in live)
        yield up

    @staticmethod
    def _bgp(agent: Any) -> Iterator[Metric]:
        status = agent.status()
        up = GaugeMetricFamily("tidegate_bgp_session_up", "1 when the BGP session with a peer is established",
                               labels=["peer"])
        routes = GaugeMetricFamily("tidegate_bgp_routes_announced", "Prefixes announced on a BGP session now",
                                   labels=["peer"])
        for session in status["sessions"]:
            up.add_metric([session["name"]], session["state"] == "up")
            routes.add_metric([session["name"]], session["routes"])
        yield up
        yield routes
        yield CounterMetricFamily("tidegate_bgp_speaker_restarts", "Times the BGP speaker (ExaBGP) stopped and was "
                                  "started again", value=status["restarts"])
        yield GaugeMetricFamily("tidegate_bgp_speaker_up", "1 while the BGP speaker runs",
                                value=0 if status["problem"] else 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._collector = _RequestCollector()
        self.registry.register(self._collector)
        self.endpoints = _EndpointCollector()
        self.registry.register(self.endpoints)
        self.upstream_errors = Counter("tidegate_upstream_errors", "Failed attempts at an endpoint, by backend and "
                                       "kind (timeout, error)", ["backend", "kind"], registry=self.registry)
        self.retries = Counter("tidegate_http_retries", "Requests sent again to a backend", ["route"],
                               registry=self.registry)
        self.ejections = Counter("tidegate_endpoint_ejections", "Endpoints taken out of rotation by outlier "
                                 "detection, by backend", ["backend"], registry=self.registry)
        self.circuit_rejections = Counter("tidegate_circuit_breaker_rejections", "Requests refused (503) because a "
                                          "backend was at a circuit-breaker limit, by backend and limit",
                                          ["backend", "limit"], registry=self.registry)
        self.retry_budget_exhausted = Counter("tidegate_retry_budget_exhausted", "Retries not made because the "
                                              "backend's retry budget was spent", ["backend"], registry=self.registry)
        self.health_checks = Counter("tidegate_health_checks", "Active health checks run, by backend and result",
                                     ["backend", "result"], registry=self.registry)
        self.limits = Counter("tidegate_limit_hits", "Connections, streams and requests cut off at one of tidegate's "
                              "limits, by limit (README: Limits and defaults)", ["limit"], registry=self.registry)
        self.acme_challenges = Counter("tidegate_acme_challenges_served", "ACME validations this replica answered, "
                                       "by type (http-01, tls-alpn-01)", ["type"], registry=self.registry)
        self.traffic_policy = Counter("tidegate_traffic_policy_refusals", "Requests a TrafficPolicy refused, by "
                                      "route, rule and result (denied: 403, limited: 429, too-large: 413)",
                                      ["route", "rule", "result"], registry=self.registry)
        self.redis_up = Gauge("tidegate_rate_limit_redis_up", "1 while the worker is connected to the global rate "
                              "limits' Redis (summed over workers)", registry=self.registry)
        self.redis_seconds = Histogram("tidegate_rate_limit_redis_seconds", "Time for Redis to answer one batch of "
                                       "global rate-limit checks", registry=self.registry,
                                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1))
        self.redis_failures = Counter("tidegate_rate_limit_redis_failures", "Batches of global rate-limit checks "
                                      "Redis did not answer in time or at all, by reason", ["reason"],
                                      registry=self.registry)
        self.redis_fallbacks = Counter("tidegate_rate_limit_fallbacks", "Global rate-limit checks decided without "
                                       "Redis, by the policy's failMode", ["mode"], registry=self.registry)
        self.loop_lag = Histogram("tidegate_event_loop_lag_seconds", "How late a data-plane worker's event loop "
                                  "ran a timer due every 50 ms", registry=self.registry,
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.open_fds = Gauge("tidegate_open_fds", "File descriptors a data-plane process has open",
                              registry=self.registry)
        self.tasks = Gauge("tidegate_event_loop_tasks", "Tasks alive on a data-plane process's event loop",
                           registry=self.registry)
        self.max_fds = Gauge("tidegate_max_fds", "The limit of open file descriptors of a data-plane process",
                             registry=self.registry)
        self.connections = ConnectionCounts()
        self.registry.register(self.connections)
        self.l4 = L4Counts()
        self.registry.register(self.l4)
        self.listener_open = Gauge("tidegate_listener_open", "1 when the listener's socket is open, 0 when it "
                                   "could not be opened (a port taken: tried again on a timer)", ["listener"],
                                   registry=self.registry)
        self.reloads = Counter("tidegate_config_reloads", "Configurations applied, by result", ["result"],
                               registry=self.registry)
        self.config_version = Gauge("tidegate_config_version", "Version of the configuration in force",
                                    registry=self.registry)
        self.translation = Histogram("tidegate_translation_duration_seconds", "Time to translate a snapshot",
                                     registry=self.registry)
        self.announcer = AnnouncerMetrics()
        self.registry.register(self.announcer)

    def set_pools(self, pools: dict[str, Any]) -> None:
        self.announcer.pools = dict(pools)

    def route_counts(self, listener: str, route: str) -> RouteCounts:
        """The counts of one (listener, route), kept for as long as the process runs."""
        routes = self._collector.routes
        counts = routes.get((listener, route))
        if counts is None:
            counts = routes[(listener, route)] = RouteCounts()
        return counts

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _data_plane_metrics(self) -> tuple:
        return (self.upstream_errors, self.retries, self.connections, self.ejections,
                self.circuit_rejections, self.retry_budget_exhausted, self.l4, self.limits, self.open_fds,
                self.max_fds, self.tasks, self.traffic_policy, self.redis_up, self.redis_seconds,
                self.redis_failures, self.redis_fallbacks, self.loop_lag, self.acme_challenges)

    def snapshot(self) -> dict:
        """What a worker process counted, as plain data for the control process to add up."""
        samples = []
        for metric in self._data_plane_metrics():
            for family in metric.collect():
                for sample in family.samples:
                    if not sample.name.endswith("_created"):
                        samples.append((family.name, family.type, family.documentation, sample.name,
                                        tuple(sorted(sample.labels.items())), sample.value))
        routes = list(self._collector.routes.items())
        return {"requests": self._collector.requests(),
                "buckets": {k: [*v.latency, v.latency_sum] for k, v in routes},
                "upstream": {k: [*v.upstream, v.upstream_sum] for k, v in routes},
                "transfer": {k: [v.bytes_in, v.bytes_out] for k, v in routes}, "samples": samples}

    def use_workers(self) -> None:
        """In the control process of `run --workers N`: data-plane figures are the workers' sums."""
        for metric in self._data_plane_metrics():
            self.registry.unregister(metric)
        self._workers: dict[int | str, dict] = {}  # by index; and the last counts of workers gone
        self.registry.register(_WorkerSums(self._workers))

    def retire_worker(self, index: int) -> None:
        """A worker died: what it counted stays in the sums (counters never go down); its gauges go."""
        snap = self._workers.pop(index, None)
        if snap is None:
            return
        snap = {**snap, "samples": [x for x in snap["samples"] if x[1] == "counter"]}
        self._workers[f"retired-{len(self._workers)}-{index}"] = snap
        self.merge_worker(None, None)

    def merge_worker(self, index: int | None, snapshot: dict | None) -> None:
        if index is not None and snapshot is not None:
            self._workers[index] = snapshot
        requests: dict = {}
        lists: dict[str, dict] = {"buckets": {}, "upstream": {}, "transfer": {}}
        for snap in self._workers.values():
            for key, count in snap["requests"].items():
                requests[key] = requests.get(key, 0) + count
            for name, merged in lists.items():
                for key, counts in snap.get(name, {}).items():
                    mine = merged.setdefault(key, [0] * len(counts))
                    for i, c in enumerate(counts):
                        mine[i] += c
        routes: dict[tuple[str, str], RouteCounts] = {}
        for (listener, route, method, code), count in requests.items():
            counts = routes.setdefault((listener, route), RouteCounts())
            method_index = _METHOD_INDEX.get(method, _OTHER_METHOD)
            counts.requests[method_index * _CLASSES + _CODE_CLASSES.index(code)] += count
        for key, latency in lists["buckets"].items():
            counts = routes.setdefault(key, RouteCounts())
            counts.latency, counts.latency_sum = [int(c) for c in latency[:-1]], float(latency[-1])
        for key, upstream in lists["upstream"].items():
            counts = routes.setdefault(key, RouteCounts())
            counts.upstream, counts.upstream_sum = [int(c) for c in upstream[:-1]], float(upstream[-1])
        for key, (bytes_in, bytes_out) in lists["transfer"].items():
            counts = routes.setdefault(key, RouteCounts())
            counts.bytes_in, counts.bytes_out = int(bytes_in), int(bytes_out)
        self._collector.routes = routes

    def traffic(self) -> dict:
        """Counts so far, as plain data (the dashboard turns two readings into rates and percentiles)."""
        routes: dict[tuple[str, str], dict] = {}
        for (listener, route), counts in list(self._collector.routes.items()):
            codes: dict[str, int] = {}
            for _method, code, count in counts.request_counts():
                codes[code] = codes.get(code, 0) + count
            routes[(listener, route)] = {"listener": listener, "route": route, "codes": codes,
                                         "latency": list(counts.latency)}
        refusals: dict[str, dict[str, float]] = {}  # route → result → count (TrafficPolicy)
        refused: dict[str, float] = {}  # connections closed at once, by limit (ClientPolicy)
        for family in self.registry.collect():
            if family.name == "tidegate_traffic_policy_refusals":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        by_result = refusals.setdefault(sample.labels["route"], {})
                        result = sample.labels["result"]
                        by_result[result] = by_result.get(result, 0) + sample.value
            elif family.name == "tidegate_limit_hits":
                for sample in family.samples:
                    limit = sample.labels.get("limit", "")
                    if sample.name.endswith("_total") and limit in _REFUSED_CONNECTIONS:
                        refused[limit] = refused.get(limit, 0) + sample.value
        return {"latencyBounds": list(_LATENCY_BUCKETS), "routes": list(routes.values()),
                "refusals": refusals, "connectionsRefused": refused,
                "connections": self.registry.get_sample_value("tidegate_http_connections") or 0,
                "connectionsAccepted": self.registry.get_sample_value("tidegate_http_connections_accepted_total") or 0,
                "retries": sum(sample.value for family in self.registry.collect()
                               if family.name == "tidegate_http_retries" for sample in family.samples
                               if sample.name.endswith("_total"))}


_REFUSED_CONNECTIONS: Final = frozenset(("connections-per-client", "connections-per-listener", "overload"))
METRICS: Final = Metrics()  # one per process; the admin listener serves it
