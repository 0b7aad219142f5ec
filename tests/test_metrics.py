"""Request metrics as they are kept per rule (RouteCounts) and as a scrape, a worker snapshot and the control
process's sums show them."""

from __future__ import annotations

import re

from tidegate.observe.metrics import Metrics

LISTENER, ROUTE = "default/gw/web", "httproute/default/app/rule/0"


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def _record(metrics: Metrics) -> None:
    counts = metrics.route_counts(LISTENER, ROUTE)
    assert metrics.route_counts(LISTENER, ROUTE) is counts  # one record per (listener, route), kept
    counts.observe("GET", 200, 0.0005, 0.0003, 0, 100)  # on a bound: "le" counts it
    counts.observe("GET", 204, 0.003, 0.002, 0, 0)
    counts.observe("BREW", 418, 0.02, -1.0, 10, 5)  # no endpoint tried: no upstream time
    counts.observe("POST", 0, 20.0, 19.0, 7, 0)  # no status (the client left); beyond the last bound
    metrics.route_counts(LISTENER, "").observe("GET", 404, 0.0001, -1.0, 0, 0)  # answered before routing


def test_counts_by_method_and_status_class_and_latency_buckets():
    metrics = Metrics()
    _record(metrics)
    text = metrics.exposition().decode()
    requests = "tidegate_http_requests_total"
    assert _sample(text, requests, route=ROUTE, method="GET", code="2xx") == 2
    assert _sample(text, requests, route=ROUTE, method="OTHER", code="4xx") == 1
    assert _sample(text, requests, route=ROUTE, method="POST", code="none") == 1
    assert _sample(text, requests, route="", method="GET", code="4xx") == 1
    duration = "tidegate_http_request_duration_seconds"
    assert _sample(text, f"{duration}_bucket", route=ROUTE, le="0.0005") == 1
    assert _sample(text, f"{duration}_bucket", route=ROUTE, le="0.005") == 2
    assert _sample(text, f"{duration}_bucket", route=ROUTE, le="0.025") == 3
    assert _sample(text, f"{duration}_bucket", route=ROUTE, le="10.0") == 3
    assert _sample(text, f"{duration}_bucket", route=ROUTE, le="+Inf") == 4
    assert abs(_sample(text, f"{duration}_sum", route=ROUTE) - 20.0235) < 1e-9
    upstream = "tidegate_http_upstream_duration_seconds"
    assert _sample(text, f"{upstream}_count", route=ROUTE) == 3
    assert _sample(text, f"{upstream}_bucket", route=ROUTE, le="0.0005") == 1
    assert _sample(text, "tidegate_http_request_body_bytes_total", route=ROUTE) == 17
    assert _sample(text, "tidegate_http_response_body_bytes_total", route=ROUTE) == 105
    traffic = {r["route"]: r for r in metrics.traffic()["routes"]}
    assert traffic[ROUTE]["codes"] == {"2xx": 2, "4xx": 1, "none": 1}
    assert sum(traffic[ROUTE]["latency"]) == 4


def test_worker_snapshots_add_up_in_the_control_process():
    worker = Metrics()
    _record(worker)
    control = Metrics()
    control.use_workers()
    control.merge_worker(0, worker.snapshot())
    control.merge_worker(1, worker.snapshot())
    mine, theirs = worker.exposition().decode(), control.exposition().decode()
    for name, labels in [("tidegate_http_requests_total", {"method": "GET", "code": "2xx"}),
                         ("tidegate_http_requests_total", {"method": "OTHER", "code": "4xx"}),
                         ("tidegate_http_request_duration_seconds_bucket", {"le": "0.005"}),
                         ("tidegate_http_request_duration_seconds_sum", {}),
                         ("tidegate_http_upstream_duration_seconds_count", {}),
                         ("tidegate_http_response_body_bytes_total", {})]:
        assert _sample(theirs, name, route=ROUTE, **labels) == 2 * _sample(mine, name, route=ROUTE, **labels)


def _plain(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"no {name} in:\n{text}"
    return float(match.group(1))


def test_client_connections_open_and_accepted_in_a_scrape_and_in_the_workers_sums():
    worker = Metrics()
    worker.connections.open += 3
    worker.connections.accepted += 10
    text = worker.exposition().decode()
    assert _plain(text, "tidegate_http_connections") == 3
    assert _plain(text, "tidegate_http_connections_accepted_total") == 10
    control = Metrics()
    control.use_workers()
    control.merge_worker(0, worker.snapshot())
    control.merge_worker(1, worker.snapshot())
    text = control.exposition().decode()
    assert _plain(text, "tidegate_http_connections") == 6
    assert _plain(text, "tidegate_http_connections_accepted_total") == 20
    control.retire_worker(1)  # its connections are gone; what it accepted still counts
    text = control.exposition().decode()
    assert _plain(text, "tidegate_http_connections") == 3
    assert _plain(text, "tidegate_http_connections_accepted_total") == 20
