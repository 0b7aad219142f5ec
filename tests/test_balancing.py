"""The balancing algorithms, statistically: shares within ±3 % over 10,000 picks, Maglev's small disruption
when an endpoint is added, weights during slow start, outlier ejection limits, the retry budget, and the
order in which ready, ejected and terminating endpoints are used."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tidegate import ir
from tidegate.balancing.algorithms import maglev_table, stable_hash
from tidegate.balancing.balancer import RouteBalancer
from tidegate.balancing.health import parse_status_line, status_is_healthy
from tidegate.balancing.outlier import record_outcome
from tidegate.balancing.retry import DEFAULT_RETRY, policy_rules, route_rules
from tidegate.balancing.state import Registry, RetryBudget
from tidegate.dataplane.http1 import cookie_value, hash_key

N = 10_000
TOLERANCE = 0.03


def _backend(n: int, policy: ir.TrafficPolicy | None = None, **endpoint_fields) -> ir.Backend:
    endpoints = tuple(ir.Endpoint(f"10.0.0.{i}", 8080, **endpoint_fields) for i in range(1, n + 1))
    return ir.Backend(name="default/app:80", weight=1, endpoints=endpoints, policy=policy)


def _shares(picks: list[ir.Endpoint]) -> dict[str, float]:
    counts = Counter(e.address for e in picks)
    return {address: count / len(picks) for address, count in counts.items()}


@pytest.mark.parametrize("algorithm", ["RoundRobin", "Random", "LeastRequest", "PowerOfTwoChoices"])
def test_each_algorithm_shares_evenly_when_endpoints_are_alike(algorithm):
    random.seed(7)
    backend = _backend(4, ir.TrafficPolicy(algorithm=algorithm))
    balancer = RouteBalancer()
    shares = _shares([balancer.endpoint_for(backend) for _ in range(N)])
    assert len(shares) == 4
    for share in shares.values():
        assert abs(share - 0.25) <= TOLERANCE, shares


@pytest.mark.parametrize("algorithm", ["LeastRequest", "PowerOfTwoChoices"])
def test_load_aware_algorithms_avoid_the_busy_endpoint(algorithm):
    random.seed(7)
    backend = _backend(3, ir.TrafficPolicy(algorithm=algorithm))
    balancer = RouteBalancer()
    busy = balancer.registry.endpoint("10.0.0.1", 8080)
    busy.active = 5  # five requests in flight there
    shares = _shares([balancer.endpoint_for(backend) for _ in range(N)])
    if algorithm == "LeastRequest":
        assert "10.0.0.1" not in shares
    else:  # two random candidates: the busy one wins only when drawn twice, which sampling never does
        assert shares.get("10.0.0.1", 0) == 0
    for address in ("10.0.0.2", "10.0.0.3"):
        assert abs(shares[address] - 0.5) <= TOLERANCE


def test_round_robin_follows_backend_weights():
    route = ir.HTTPRoute(name="r", source="HTTPRoute default/r", hostnames=("*",), matches=(ir.Match(),),
                         backends=(ir.Backend("default/a:80", 3), ir.Backend("default/b:80", 1)))
    balancer = RouteBalancer()
    counts = Counter(balancer.backend_for(route).name for _ in range(N))
    assert abs(counts["default/a:80"] / N - 0.75) <= TOLERANCE


def test_slow_start_ramps_a_new_endpoint_up():
    random.seed(7)
    backend = _backend(3, ir.TrafficPolicy(slow_start=60.0))
    registry = Registry()
    registry.retain(ir.IR())  # tidegate has started: endpoints seen from now on are new
    balancer = RouteBalancer(registry)
    for i in (1, 2):
        registry.endpoint(f"10.0.0.{i}", 8080).first_seen = float("-inf")
    new = registry.endpoint("10.0.0.3", 8080)
    new.first_seen -= 15  # a quarter of the way through its 60 s window
    shares = _shares([balancer.endpoint_for(backend) for _ in range(N)])
    assert abs(shares["10.0.0.3"] - 0.25 / 2.25) <= TOLERANCE  # weights 1, 1, 0.25
    new.first_seen -= 60
    shares = _shares([balancer.endpoint_for(backend) for _ in range(N)])
    assert abs(shares["10.0.0.3"] - 1 / 3) <= TOLERANCE


def test_maglev_gives_each_endpoint_an_even_share_of_keys():
    backend = _backend(5, ir.TrafficPolicy(algorithm="ConsistentHash", hash=ir.HashKey(type="Header", name="x")))
    balancer = RouteBalancer()
    shares = _shares([balancer.endpoint_for(backend, key=f"user-{i}") for i in range(N)])
    for share in shares.values():
        assert abs(share - 0.2) <= TOLERANCE, shares


def test_maglev_moves_about_one_nth_of_keys_when_an_endpoint_is_added():
    policy = ir.TrafficPolicy(algorithm="ConsistentHash", hash=ir.HashKey(type="Header", name="x"))
    before, after = _backend(5, policy), _backend(6, policy)
    balancer = RouteBalancer()
    keys = [f"user-{i}" for i in range(N)]
    moved = sum(balancer.endpoint_for(before, key=k).address != balancer.endpoint_for(after, key=k).address
                for k in keys)
    assert moved / N <= 1 / 6 + TOLERANCE  # the new endpoint's share, and hardly more
    assert moved / N >= 1 / 6 - TOLERANCE


def test_maglev_tables_and_hashes_are_the_same_in_every_process():
    assert maglev_table(["a:1", "b:1", "c:1"], 251) == maglev_table(["a:1", "b:1", "c:1"], 251)
    assert stable_hash("user-1") == 0x9AAC5A8621EAE188  # blake2b: no per-process seed, unlike hash()
    table = maglev_table([f"10.0.0.{i}:80" for i in range(7)], 251)
    counts = Counter(table)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_hash_keys_come_from_the_request():
    headers = {"x-user": "ann", "cookie": "a=1; tg=abc"}
    assert hash_key(ir.HashKey(type="Header", name="X-User"), "/p", headers, "10.1.1.1") == ("ann", None)
    assert hash_key(ir.HashKey(type="Path"), "/p", headers, "10.1.1.1") == ("/p", None)
    assert hash_key(ir.HashKey(type="SourceIP"), "/p", headers, "10.1.1.1") == ("10.1.1.1", None)
    assert hash_key(ir.HashKey(type="Cookie", name="tg", cookie_ttl=60), "/p", headers, "") == ("abc", None)
    value, set_cookie = hash_key(ir.HashKey(type="Cookie", name="sid", cookie_ttl=60, cookie_path="/app"),
                                 "/p", headers, "")
    assert set_cookie == f"sid={value}; Path=/app; Max-Age=60; HttpOnly"
    assert hash_key(ir.HashKey(type="Cookie", name="sid"), "/p", headers, "") == (None, None)
    assert cookie_value('x=1;  sid="q"', "sid") == "q"


def test_a_request_without_a_hash_key_still_gets_an_endpoint():
    backend = _backend(3, ir.TrafficPolicy(algorithm="ConsistentHash", hash=ir.HashKey(type="Header", name="x")))
    assert RouteBalancer().endpoint_for(backend, key=None) is not None


def test_terminating_endpoints_get_requests_only_when_nothing_else_is_left():
    ready = ir.Endpoint("10.0.0.1", 80)
    draining = ir.Endpoint("10.0.0.2", 80, ready=False, serving=True, terminating=True)
    balancer = RouteBalancer()
    both = ir.Backend("default/a:80", 1, endpoints=(ready, draining))
    assert {balancer.endpoint_for(both).address for _ in range(20)} == {"10.0.0.1"}
    only_draining = ir.Backend("default/a:80", 1, endpoints=(draining,))
    assert balancer.endpoint_for(only_draining) == draining


def test_ejected_endpoints_are_skipped_unless_every_endpoint_is_out():
    outlier = ir.OutlierDetection(consecutive_gateway_errors=2, base_ejection_time=10, max_ejection_percent=100)
    backend = _backend(2, ir.TrafficPolicy(outlier=outlier))
    balancer = RouteBalancer()
    registry = balancer.registry
    a = registry.endpoint("10.0.0.1", 8080)
    record_outcome(registry, backend, a, 503, now=100.0)
    assert a.ejected_until == 0  # one failure is not enough
    record_outcome(registry, backend, a, None, now=100.0)
    assert a.ejected_until == 110.0
    b = registry.endpoint("10.0.0.2", 8080)
    b.ejected_until = 1e18
    # both out: better to try them than to refuse everything
    assert balancer.endpoint_for(backend) is not None


def test_ejections_respect_the_max_percent_and_grow_longer():
    outlier = ir.OutlierDetection(consecutive_5xx=1, consecutive_gateway_errors=0, base_ejection_time=10,
                                  max_ejection_time=25, max_ejection_percent=50)
    backend = _backend(4, ir.TrafficPolicy(outlier=outlier))
    registry = Registry()
    states = [registry.endpoint(e.address, e.port) for e in backend.endpoints]
    for s in states:
        record_outcome(registry, backend, s, 500, now=0.0)
    assert sum(s.ejected_until > 0 for s in states) == 2  # half of four
    first = states[0]
    record_outcome(registry, backend, first, 500, now=11.0)  # back after 10 s, fails again: 20 s this time
    assert first.ejected_until == 31.0
    record_outcome(registry, backend, first, 500, now=32.0)
    assert first.ejected_until == 32.0 + 25  # capped at maxEjectionTime
    record_outcome(registry, backend, first, 200, now=200.0)
    assert first.ejections == 0 and first.consecutive_5xx == 0


def test_the_retry_budget_allows_a_percentage_of_requests():
    policy = ir.RetryPolicy(attempts=3, budget_percent=20, budget_min_per_second=0)
    budget = RetryBudget()
    allowed = 0
    for _ in range(1000):
        budget.deposit(policy, now=budget.updated)
        if budget.available(policy, now=budget.updated):
            budget.withdraw()
            allowed += 1
    assert 195 <= allowed <= 200


def test_only_safe_requests_are_retried_after_bytes_were_sent():
    policy = ir.RetryPolicy(retry_on=("connect-failure", "reset", "gateway-error", "retriable-status-codes"),
                            status_codes=(409,))
    safe, unsafe = policy_rules(policy, True), policy_rules(policy, False)
    assert safe.codes == frozenset({409, 502, 503, 504}) and safe.reset and safe.timeout and safe.connect
    assert unsafe.codes == frozenset() and not unsafe.reset and not unsafe.timeout and unsafe.connect
    assert DEFAULT_RETRY.attempts == 1 and policy_rules(DEFAULT_RETRY, True).codes == frozenset()
    spec = route_rules(ir.Retry(codes=(500,), attempts=2), has_body=True)
    assert spec.codes == frozenset() and spec.connect


def test_health_check_answers():
    assert parse_status_line(b"HTTP/1.1 204 No Content") == 204
    assert parse_status_line(b"SSH-2.0-OpenSSH") is None
    check = ir.HealthCheck(type="HTTP")
    assert status_is_healthy(check, 301) and not status_is_healthy(check, 500)
    assert not status_is_healthy(check, None)
    strict = ir.HealthCheck(type="HTTP", expected_statuses=(204,))
    assert status_is_healthy(strict, 204) and not status_is_healthy(strict, 200)


def _zoned(zones: list[str], hints: bool = False, **policy) -> ir.Backend:
    endpoints = tuple(ir.Endpoint(f"10.0.0.{i}", 8080, zone=z, hints=(z,) if hints else None)
                      for i, z in enumerate(zones, start=1))
    return ir.Backend("default/app:80", 1, endpoints=endpoints, policy=ir.TrafficPolicy(**policy) if policy else None)


@pytest.mark.parametrize("algorithm", ["RoundRobin", "Random", "LeastRequest", "PowerOfTwoChoices"])
def test_endpoint_weights_set_the_shares(algorithm):
    random.seed(7)
    endpoints = (ir.Endpoint("10.0.0.1", 80, weight=3), ir.Endpoint("10.0.0.2", 80),
                 ir.Endpoint("10.0.0.3", 80, weight=0))
    backend = ir.Backend("default/app:80", 1, endpoints=endpoints, policy=ir.TrafficPolicy(algorithm=algorithm))
    balancer = RouteBalancer()
    shares = _shares([balancer.endpoint_for(backend) for _ in range(N)])
    assert "10.0.0.3" not in shares  # weight 0: nothing while the others can take it
    assert abs(shares["10.0.0.1"] - 0.75) <= TOLERANCE, shares


def test_topology_hints_keep_traffic_in_the_zone_when_every_endpoint_has_them():
    balancer = RouteBalancer()
    balancer.registry.zone = "a"
    hinted = _zoned(["a", "b", "b"], hints=True)
    assert {balancer.endpoint_for(hinted).zone for _ in range(50)} == {"a"}
    partly = ir.Backend("default/app:80", 1, endpoints=(*hinted.endpoints[:2], ir.Endpoint("10.0.0.9", 8080, zone="b")))
    assert {balancer.endpoint_for(partly).zone for _ in range(50)} == {"a", "b"}  # kube-proxy ignores partial hints
    balancer.registry.zone = ""
    assert {balancer.endpoint_for(hinted).zone for _ in range(50)} == {"a", "b"}


def test_zone_aware_balancing_stays_local_until_the_zone_is_overloaded():
    balancer = RouteBalancer()
    balancer.registry.zone = "a"
    backend = _zoned(["a", "a", "b", "b"], zone_aware=(2, 2))
    assert {balancer.endpoint_for(backend).zone for _ in range(50)} == {"a"}
    for address in ("10.0.0.1", "10.0.0.2"):
        balancer.registry.endpoint(address, 8080).active = 2  # 2 in flight each vs none elsewhere: overloaded
    assert {balancer.endpoint_for(backend).zone for _ in range(50)} == {"a", "b"}  # spilled over
    balancer.registry.endpoint("10.0.0.1", 8080).active = 0
    balancer.registry.endpoint("10.0.0.2", 8080).active = 0
    balancer.registry.endpoint("10.0.0.2", 8080).ejected_until = 1e18  # one local endpoint left: below minEndpoints
    assert {balancer.endpoint_for(backend).zone for _ in range(50)} == {"a", "b"}


async def _answering(status: bytes):
    """A loopback server that answers each request with `status` and an empty body, then closes; and its port."""
    import asyncio

    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_probes_over_real_sockets():
    import asyncio
    import socket

    from tidegate.balancing.health import probe

    async def main() -> tuple[bool, bool, bool, bool]:
        server, port = await _answering(b"503 Service Unavailable")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]  # bound, not listening: connections are refused
            tcp = ir.HealthCheck(type="TCP", timeout=1.0)
            http_any = ir.HealthCheck(type="HTTP", path="/healthz", timeout=1.0)
            http_503 = ir.HealthCheck(type="HTTP", path="/healthz", timeout=1.0, expected_statuses=(503,))
            results = (await probe(tcp, "127.0.0.1", port), await probe(tcp, "127.0.0.1", closed),
                       await probe(http_any, "127.0.0.1", port), await probe(http_503, "127.0.0.1", port))
        server.close()
        await server.wait_closed()
        return results

    assert asyncio.run(main()) == (True, False, False, True)


def test_a_probe_cancelled_at_any_point_stops():
    """Stopping cancels every check. A probe that swallowed the cancellation (asyncio.wait_for does so in
    Python 3.11 when its inner wait ends in the same loop turn) would keep its checker's loop running, and the
    stop would wait for it forever. The probe is cancelled after each number of loop turns in turn, so one
    of them lands between the answer arriving and the probe going on."""
    import asyncio

    from tidegate.balancing.health import probe

    async def main() -> tuple[int, int]:
        server, port = await _answering(b"200 OK")
        check = ir.HealthCheck(type="HTTP", path="/healthz", timeout=5.0)
        cancelled = carried_on = 0
        for turns in range(40):
            for _ in range(3):
                task = asyncio.ensure_future(probe(check, "127.0.0.1", port))
                for _ in range(turns):
                    await asyncio.sleep(0)
                if task.done():
                    assert task.result() is True
                    continue
                task.cancel()
                try:
                    await task
                    carried_on += 1
                except asyncio.CancelledError:
                    cancelled += 1
        server.close()
        await server.wait_closed()
        return cancelled, carried_on

    cancelled, carried_on = asyncio.run(main())
    assert cancelled > 0 and carried_on == 0, (cancelled, carried_on)


def test_kept_candidates_follow_ejections_as_they_start_and_as_they_run_out(monkeypatch):
    """The balancer keeps each backend's candidate list between requests; an ejection, an active-check
    verdict and the end of an ejection (a moment in time, with no event) must each show at once."""
    import tidegate.balancing.balancer as balancer_module

    clock = [1000.0]
    monkeypatch.setattr(balancer_module.time, "monotonic", lambda: clock[0])
    backend = _backend(2)
    balancer = RouteBalancer()
    a = balancer.registry.endpoint("10.0.0.1", 8080)
    b = balancer.registry.endpoint("10.0.0.2", 8080)
    picks = lambda: {balancer.endpoint_for(backend).address for _ in range(10)}  # noqa: E731
    assert picks() == {"10.0.0.1", "10.0.0.2"}
    a.ejected_until = 1030.0
    assert picks() == {"10.0.0.2"}
    clock[0] = 1029.9
    assert picks() == {"10.0.0.2"}
    clock[0] = 1030.0  # the ejection ran out
    assert picks() == {"10.0.0.1", "10.0.0.2"}
    check = ir.HealthCheck(type="TCP")
    b.set_check(check, False)
    assert picks() == {"10.0.0.1"}
    b.set_check(check, True)
    assert picks() == {"10.0.0.1", "10.0.0.2"}
