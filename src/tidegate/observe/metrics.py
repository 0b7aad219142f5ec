"""Prometheus metrics (prometheus-client), with labels that stay bounded: listener, route and backend names
from the configuration, method from a fixed list, status by class. Never raw paths or client addresses."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
_CODE_CLASSES: Final = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _cumulative(counts: list[float]) -> list[tuple[str, float]]:
    out, running = [], 0.0
    for bound, count in zip((*_LATENCY_BUCKETS, float("inf")), counts[:-1], strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out


class _RequestCollector:
    """Per-request counts and latency buckets kept in plain dicts and lists, turned into metric families only
    when scraped: no lock and no metric object per update on the request path."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.buckets: dict[tuple[str, str], list[float]] = {}  # counts per bucket (+Inf last), then the sum
        self.upstream: dict[tuple[str, str], list[float]] = {}  # the same, for time spent at the endpoints
        self.transfer: dict[tuple[str, str], list[int]] = {}  # request body bytes, response body bytes

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("tidegate_http_requests", "HTTP requests answered, by listener, route, "
                                       "method and status class", labels=["listener", "route", "method", "code"])
        for key, value in list(self.requests.items()):
            requests.add_metric(list(key), value)
        yield requests
        duration = HistogramMetricFamily("tidegate_http_request_duration_seconds", "Time from a request's head "
                                         "to the end of its response", labels=["listener", "route"])
        for pair, counts in list(self.buckets.items()):
            duration.add_metric(list(pair), _cumulative(counts), sum_value=counts[-1])
        yield duration
        upstream = HistogramMetricFamily("tidegate_http_upstream_duration_seconds", "Time spent waiting on "
                                         "endpoints (all tries of a request)", labels=["listener", "route"])
        for pair, counts in list(self.upstream.items()):
            upstream.add_metric(list(pair), _cumulative(counts), sum_value=counts[-1])
        yield upstream
        received = CounterMetricFamily("tidegate_http_request_body_bytes", "Request body bytes received from "
                                       "clients", labels=["listener", "route"])
        sent = CounterMetricFamily("tidegate_http_response_body_bytes", "Response body bytes sent to clients",
                                   labels=["listener", "route"])
        for pair, (bytes_in, bytes_out) in list(self.transfer.items()):
            received.add_metric(list(pair), bytes_in)
            sent.add_metric(list(pair), bytes_out)
        yield received
        yield sent


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
        self.connections = Gauge("tidegate_http_connections", "Client connections open now", registry=self.registry)
        self.connections_total = Counter("tidegate_http_connections_accepted", "Client connections accepted",
                                         registry=self.registry)
        self.reloads = Counter("tidegate_config_reloads", "Configurations applied, by result", ["result"],
                               registry=self.registry)
        self.config_version = Gauge("tidegate_config_version", "Version of the configuration in force",
                                    registry=self.registry)
        self.translation = Histogram("tidegate_translation_duration_seconds", "Time to translate a snapshot",
                                     registry=self.registry)

    def observe_request(self, listener: str, route: str, method: str, status: int, seconds: float,
                        upstream_seconds: float | None = None, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Per request: dict updates and bucket increments, no locks (one event loop per process)."""
        collector = self._collector
        key = (listener, route, method if method in _METHODS else "OTHER",
               _CODE_CLASSES[status // 100] if 0 < status < 600 else "none")
        requests = collector.requests
        requests[key] = requests.get(key, 0) + 1
        hkey = (listener, route)
        counts = collector.buckets.get(hkey)
        if counts is None:
            counts = collector.buckets[hkey] = [0.0] * (len(_LATENCY_BUCKETS) + 2)
            collector.upstream[hkey] = [0.0] * (len(_LATENCY_BUCKETS) + 2)
            collector.transfer[hkey] = [0, 0]
        counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        counts[-1] += seconds
        if upstream_seconds is not None:
            upstream = collector.upstream[hkey]
            upstream[bisect_left(_LATENCY_BUCKETS, upstream_seconds)] += 1
            upstream[-1] += upstream_seconds
        transfer = collector.transfer[hkey]
        transfer[0] += bytes_in
        transfer[1] += bytes_out

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _data_plane_metrics(self) -> tuple:
        return (self.upstream_errors, self.retries, self.connections, self.connections_total, self.ejections,
                self.circuit_rejections, self.retry_budget_exhausted)

    def snapshot(self) -> dict:
        """What a worker process counted, as plain data for the control process to add up."""
        samples = []
        for metric in self._data_plane_metrics():
            for family in metric.collect():
                for sample in family.samples:
                    if not sample.name.endswith("_created"):
                        samples.append((family.name, family.type, family.documentation, sample.name,
                                        tuple(sorted(sample.labels.items())), sample.value))
        c = self._collector
        return {"requests": dict(c.requests), "buckets": {k: list(v) for k, v in c.buckets.items()},
                "upstream": {k: list(v) for k, v in c.upstream.items()},
                "transfer": {k: list(v) for k, v in c.transfer.items()}, "samples": samples}

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
        c = self._collector
        c.requests, c.buckets, c.upstream, c.transfer = (requests, lists["buckets"], lists["upstream"],
                                                         lists["transfer"])

    def traffic(self) -> dict:
        """Counts so far, as plain data (the dashboard turns two readings into rates and percentiles)."""
        routes: dict[tuple[str, str], dict] = {}
        for (listener, route, _method, code), count in list(self._collector.requests.items()):
            entry = routes.setdefault((listener, route), {"listener": listener, "route": route, "codes": {},
                                                          "latency": []})
            entry["codes"][code] = entry["codes"].get(code, 0) + count
        for (listener, route), counts in list(self._collector.buckets.items()):
            entry = routes.setdefault((listener, route), {"listener": listener, "route": route, "codes": {},
                                                          "latency": []})
            entry["latency"] = [int(c) for c in counts[:-1]]
        return {"latencyBounds": list(_LATENCY_BUCKETS), "routes": list(routes.values()),
                "connections": self.registry.get_sample_value("tidegate_http_connections") or 0,
                "connectionsAccepted": self.registry.get_sample_value("tidegate_http_connections_accepted_total") or 0,
                "retries": sum(sample.value for family in self.registry.collect()
                               if family.name == "tidegate_http_retries" for sample in family.samples
                               if sample.name.endswith("_total"))}


METRICS = Metrics()  # one per process; the admin listener serves it
