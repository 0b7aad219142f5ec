"""Prometheus metrics (prometheus-client), with labels that stay bounded: listener, route and backend names
from the configuration, method from a fixed list, status by class. Never raw paths or client addresses."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tidegate_http_requests", "HTTP requests answered, by listener, route, method and "
                                "status class", ["listener", "route", "method", "code"], registry=self.registry)
        self.duration = Histogram("tidegate_http_request_duration_seconds", "Time from a request's head to the end "
                                  "of its response", ["listener", "route"], buckets=_LATENCY_BUCKETS,
                                  registry=self.registry)
        self.upstream_errors = Counter("tidegate_upstream_errors", "Failed attempts at an endpoint, by backend and "
                                       "kind (connect, timeout, reset)", ["backend", "kind"], registry=self.registry)
        self.retries = Counter("tidegate_http_retries", "Requests sent again to a backend", ["route"],
                               registry=self.registry)
        self.connections = Gauge("tidegate_http_connections", "Client connections open now", registry=self.registry)
        self.connections_total = Counter("tidegate_http_connections_accepted", "Client connections accepted",
                                         registry=self.registry)
        self.reloads = Counter("tidegate_config_reloads", "Configurations applied, by result", ["result"],
                               registry=self.registry)
        self.config_version = Gauge("tidegate_config_version", "Version of the configuration in force",
                                    registry=self.registry)
        self.translation = Histogram("tidegate_translation_duration_seconds", "Time to translate a snapshot",
                                     registry=self.registry)
        self._children: dict[tuple[str, str, str, str], Counter] = {}
        self._histograms: dict[tuple[str, str], Histogram] = {}

    def observe_request(self, listener: str, route: str, method: str, status: int, seconds: float) -> None:
        """Per request: two dict lookups and two updates (children are cached per label set)."""
        code = f"{status // 100}xx" if status else "none"
        key = (listener, route, method if method in _METHODS else "OTHER", code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(*key)
        child.inc()
        hkey = (listener, route)
        histogram = self._histograms.get(hkey)
        if histogram is None:
            histogram = self._histograms[hkey] = self.duration.labels(*hkey)
        histogram.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METRICS = Metrics()  # one per process; the admin listener serves it
