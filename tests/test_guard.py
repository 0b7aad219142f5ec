"""The request guard's parts without sockets (dataplane/guard.py): GCRA under a fake clock (hypothesis: no
interval admits more than burst + rate × length, and a steady client gets exactly the rate), address lists
as tables (CIDRs, IPv6, IPv4-mapped clients), rule matches and keys, and a whole guard's decisions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate import ir
from tidegate.dataplane.guard import GCRA, AddressSet, Guard, guard_for, reset_for
from tidegate.translate.traffic_policies import parse_size


@settings(max_examples=300, deadline=None)
@given(requests=st.integers(1, 50), period=st.sampled_from([0.5, 1.0, 60.0]), burst=st.integers(1, 40),
       gaps=st.lists(st.floats(0.0, 0.3, allow_nan=False), min_size=1, max_size=300))
def test_no_interval_admits_more_than_burst_plus_rate_times_its_length(requests, period, burst, gaps):
    gcra = GCRA(requests, period, burst)
    now, admitted = 1000.0, []
    for gap in gaps:
        now += gap
        if gcra.take("k", now) == 0.0:
            admitted.append(now)
    rate = requests / period
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            length = admitted[j] - start
            assert j - i + 1 <= burst + rate * length + 1e-6, (i, j, length)


@settings(max_examples=100, deadline=None)
@given(requests=st.integers(1, 100), burst=st.integers(1, 100), offered=st.integers(2, 20))
def test_a_client_asking_faster_than_the_rate_gets_the_rate_and_the_burst(requests, burst, offered):
    """Offered `offered` times the rate for 10 periods: admitted = burst + rate × time (or everything, when
    that is less), within one request."""
    gcra = GCRA(requests, 1.0, burst)
    step = 1.0 / (requests * offered)
    sent = round(10 / step)
    count = sum(1 for n in range(sent) if gcra.take("k", n * step) == 0.0)
    assert abs(count - min(sent, burst + requests * 10)) <= 1, count


def test_a_refused_request_learns_its_exact_wait_and_the_table_forgets_the_least_recent_keys():
    gcra = GCRA(2, 1.0, 1, max_keys=3)
    assert gcra.take("a", 0.0) == 0.0
    assert gcra.take("a", 0.1) == pytest.approx(0.4)  # one every 0.5 s
    assert gcra.take("a", 0.5) == 0.0
    for key in ("b", "c", "d"):
        gcra.take(key, 1.0)
    assert list(gcra.tats) == ["b", "c", "d"]  # "a" was the least recently used
    gcra.take("b", 1.0)  # refused, yet used: it goes to the end
    assert list(gcra.tats) == ["c", "d", "b"]


def test_remaining_and_reset_follow_the_bucket():
    gcra = GCRA(10, 1.0, 5)
    assert gcra.remaining("k", 0.0) == 5
    for expected in (4, 3, 2, 1, 0):
        assert gcra.take("k", 0.0) == 0.0
        assert gcra.remaining("k", 0.0) == expected
    assert gcra.take("k", 0.0) > 0
    assert gcra.reset("k", 0.0) == 1  # 0.5 s to full, rounded up
    assert gcra.remaining("k", 0.1) == 1


def test_each_worker_enforces_its_share():
    one, of_four = GCRA(100, 1.0, 20), GCRA(100, 1.0, 20, share=4)
    assert one.interval == pytest.approx(0.01) and of_four.interval == pytest.approx(0.04)
    assert of_four.tolerance == pytest.approx(4 * 0.04)  # 5 at once


@pytest.mark.parametrize(("cidrs", "inside", "outside"), [
    (["10.0.0.0/8"], ["10.0.0.1", "10.255.255.255", "::ffff:10.1.2.3"], ["11.0.0.0", "9.255.255.255", "::1"]),
    (["192.0.2.7/32", "192.0.2.8/31"], ["192.0.2.7", "192.0.2.8", "192.0.2.9"], ["192.0.2.6", "192.0.2.10"]),
    (["2001:db8::/32", "127.0.0.0/8"], ["2001:db8::1", "2001:db8:ffff::", "127.0.0.1", "2001:db8::2"],
     ["2001:db9::", "128.0.0.1", "::1"]),
    (["fe80::/10"], ["fe80::1%eth0"], ["fec0::1"]),
    (["0.0.0.0/0"], ["1.2.3.4"], ["::1", "not an address"]),
    (["10.0.0.0/24", "10.0.0.128/25", "10.0.1.0/24"], ["10.0.0.200", "10.0.1.255"], ["10.0.2.0"]),  # merged
])
def test_address_sets(cidrs, inside, outside):
    addresses = AddressSet(cidrs)
    for address in inside:
        assert address in addresses, address
        assert address in addresses, address  # cached
    for address in outside:
        assert address not in addresses, address


def _guard(**fields) -> Guard:
    return Guard(ir.RequestGuard(**fields))


def _rule(name: str = "r", **fields) -> ir.RateLimitRule:
    return ir.RateLimitRule(name=f"TrafficPolicy ns/p: {name}", **fields)


def test_deny_wins_over_allow_and_allow_keeps_everyone_else_out():
    guard = _guard(allow=("10.0.0.0/8",), deny=("10.6.6.0/24",))
    decide = lambda peer: guard.check(peer, "GET", "h", "/", {}, "route", None, 0.0)[0]  # noqa: E731
    assert decide("10.1.1.1") is None
    assert decide("10.6.6.6").status == 403 and decide("10.6.6.6").rule == "ipAccess.deny"
    assert decide("192.0.2.1").status == 403 and decide("192.0.2.1").rule == "ipAccess.allow"


def test_a_declared_body_over_the_limit_is_refused_at_once():
    guard = _guard(max_body=1024)
    assert guard.check("1.1.1.1", "POST", "h", "/", {}, "r", 1024, 0.0)[0] is None
    refusal = guard.check("1.1.1.1", "POST", "h", "/", {}, "r", 1025, 0.0)[0]
    assert refusal is not None and refusal.status == 413


def test_rules_match_count_by_their_key_and_exempt_ones_stop_the_count():
    guard = _guard(rate_limits=(
        _rule("health", exempt=True, path_match=ir.PathMatch("Exact", "/healthz")),
        _rule("keys", requests=1, period=60.0, burst=1, key=("Header:x-api-key", "Route"), methods=("POST",),
              headers=(ir.ValueMatch("x-api-key", "k-[0-9]+", "RegularExpression"),)),
        _rule("nets", requests=2, period=60.0, burst=2, key=("ClientIPPrefix/56/24",),
              path_match=ir.PathMatch("PathPrefix", "/api")),
    ), rate_limit_headers=True)

    def decide(peer="10.0.0.1", method="GET", path="/api/x", headers=None, route="r1"):
        refusal, answer, _ = guard.check(peer, method, "h", path, headers or {}, route, None, 0.0)
        return refusal.status if refusal else 200, refusal.headers if refusal else answer

    for _ in range(5):
        assert decide(path="/healthz")[0] == 200  # exempt, and never counted by the rules after it
    # Two per /24 (or /56): a third client of the same network is refused; another network is not.
    assert decide("10.0.0.1")[0] == 200
    status, headers = decide("10.0.0.2")
    assert status == 200 and dict(headers) == {"RateLimit-Policy": '"nets";q=2;w=60', "RateLimit": '"nets";r=0;t=60'}
    status, headers = decide("10.0.0.3")
    assert status == 429 and dict(headers)["Retry-After"] == "30"
    assert decide("10.0.1.1")[0] == 200
    assert decide("2001:db8:0:ff::1")[0] == 200 and decide("2001:db8:0:ff:1::1")[0] == 200
    assert decide("2001:db8:0:ff::2")[0] == 429
    assert decide("10.0.0.1", path="/apix")[0] == 200  # segment-wise prefix: /apix is not under /api
    # One POST per key and route; a key that does not match the pattern is not counted by that rule.
    assert decide("10.9.0.1", "POST", "/p", {"x-api-key": "k-1"})[0] == 200
    assert decide("10.9.0.2", "POST", "/p", {"x-api-key": "k-1"})[0] == 429
    assert decide("10.9.0.3", "POST", "/p", {"x-api-key": "k-1"}, route="r2")[0] == 200
    assert decide("10.9.0.4", "POST", "/p", {"x-api-key": "k-2"})[0] == 200
    assert decide("10.9.0.5", "POST", "/p", {"x-api-key": "nope"})[0] == 200


def test_ready_guards_and_counts_survive_a_reload_of_the_same_rules():
    rule = _rule("same", requests=1, period=60.0, burst=1)
    first = ir.RequestGuard(rate_limits=(rule,))
    listener = ir.Listener(name="ns/gw/http", gateway="ns/gw", address="", port=80, protocol="HTTP",
                           http_routes=(ir.HTTPRoute(name="r", source="HTTPRoute ns/r", hostnames=("*",),
                                                     matches=(ir.Match(),), guard=first),))
    reset_for([listener])
    assert guard_for(first).check("1.1.1.1", "GET", "h", "/", {}, "r", None, 0.0)[0] is None
    again = ir.RequestGuard(rate_limits=(_rule("same", requests=1, period=60.0, burst=1),))  # a new IR, same rule
    reset_for([ir.Listener(name="ns/gw/http", gateway="ns/gw", address="", port=80, protocol="HTTP",
                           http_routes=(ir.HTTPRoute(name="r", source="HTTPRoute ns/r", hostnames=("*",),
                                                     matches=(ir.Match(),), guard=again),))])
    assert guard_for(again).check("1.1.1.1", "GET", "h", "/", {}, "r", None, 1.0)[0].status == 429


@pytest.mark.parametrize(("text", "size"), [("0", 0), ("1024", 1024), ("1k", 1024), ("10m", 10 * 2 ** 20),
                                            ("2Gi", 2 * 2 ** 30), ("5M", 5 * 2 ** 20), (4096, 4096), ("1.5m", None),
                                            ("ten", None), ("-1", None)])
def test_body_sizes_read_as_nginx_writes_them(text, size):
    assert parse_size(text) == size


def test_retry_after_is_whole_seconds_rounded_up():
    gcra = GCRA(1, 2.5, 1)
    gcra.take("k", 0.0)
    wait = gcra.take("k", 0.1)
    assert math.ceil(wait) == 3


TRUSTED = ir.ClientIP(trusted=("10.0.0.0/8", "fd00::/8"))


@pytest.mark.parametrize(("spec", "peer", "forwarded", "client"), [
    # Trusted CIDRs, read right to left (nginx's real_ip_recursive): the first address no trusted proxy holds.
    (TRUSTED, "10.0.0.1", "203.0.113.7", "203.0.113.7"),
    (TRUSTED, "10.0.0.1", "203.0.113.7, 10.1.1.1, 10.2.2.2", "203.0.113.7"),
    (TRUSTED, "10.0.0.1", "6.6.6.6, 203.0.113.7, 10.1.1.1", "203.0.113.7"),  # the spoofed first entry is ignored
    (TRUSTED, "192.0.2.1", "203.0.113.7", "192.0.2.1"),  # an untrusted peer's header is not read
    (TRUSTED, "10.0.0.1", "10.1.1.1, 10.2.2.2", "10.1.1.1"),  # all trusted: the leftmost
    (TRUSTED, "10.0.0.1", "", "10.0.0.1"),
    (TRUSTED, "10.0.0.1", "not-an-address, 203.0.113.7", "203.0.113.7"),
    (TRUSTED, "10.0.0.1", "203.0.113.7, garbage", "10.0.0.1"),  # garbage where the client should be
    (TRUSTED, "fd00::1", "2001:db8::7, fd00::2", "2001:db8::7"),
    (TRUSTED, "::ffff:10.0.0.1", "203.0.113.7", "203.0.113.7"),  # an IPv4-mapped peer
    # Hops: the entry that many from the right (Traefik's depth).
    (ir.ClientIP(hops=1), "192.0.2.1", "6.6.6.6, 203.0.113.7", "203.0.113.7"),
    (ir.ClientIP(hops=2), "192.0.2.1", "6.6.6.6, 203.0.113.7, 10.1.1.1", "203.0.113.7"),
    (ir.ClientIP(hops=3), "192.0.2.1", "203.0.113.7, 10.1.1.1", "192.0.2.1"),  # fewer entries than hops
    (ir.ClientIP(trusted=("10.0.0.0/8",), hops=1), "192.0.2.1", "203.0.113.7", "192.0.2.1"),  # both: peer trusted?
    # A header a trusted proxy sets.
    (ir.ClientIP(trusted=("173.245.48.0/20",), header="cf-connecting-ip"), "173.245.48.1", "", "198.51.100.9"),
    (ir.ClientIP(trusted=("173.245.48.0/20",), header="cf-connecting-ip"), "192.0.2.1", "", "192.0.2.1"),
])
def test_the_client_address_comes_from_trusted_proxies_only(spec, peer, forwarded, client):
    from tidegate.dataplane.guard import ClientAddress

    headers = {"cf-connecting-ip": "198.51.100.9"}
    if forwarded:
        headers["x-forwarded-for"] = forwarded
    assert ClientAddress(spec).of(peer, headers) == client


def test_connection_caps_count_per_socket_and_per_peer():
    from tidegate.dataplane.guard import ConnectionCaps

    caps, limits = ConnectionCaps(), ir.ConnectionLimits(max_per_listener=3, max_per_client=2)
    assert [caps.admit("s", "a", limits) for _ in range(3)] == ["", "", "connections-per-client"]
    assert caps.admit("s", "b", limits) == ""
    assert caps.admit("s", "c", limits) == "connections-per-listener"
    assert caps.admit("other", "a", limits) == ""  # another socket counts alone
    caps.release("s", "a")
    assert caps.admit("s", "c", limits) == ""
    for peer in ("a", "b", "c"):
        caps.release("s", peer)
    caps.release("other", "a")
    assert caps.per_socket == {} and caps.per_client == {}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("client", ["203.0.113.7", "2001:db8::7"])
def test_proxy_headers_read_back_what_haproxys_forms_say_at_any_split(version, client):
    from tidegate.dataplane.proxy_protocol import header, parse

    server = "10.0.0.1" if ":" not in client else "2001:db8::1"
    head = header(version, (client, 5555), (server, 80))
    assert parse(head + b"GET / HTTP/1.1\r\n") == (len(head), client)
    for cut in range(1, len(head)):
        assert parse(head[:cut]) is None, cut  # more bytes needed, never a wrong answer


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"PROXY TCP4 nope 10.0.0.1 1 2\r\n",
                                  b"PROXY TCP6 10.0.0.9 10.0.0.1 1 2\r\n", b"PROXY " + b"x" * 120,
                                  b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + b"\x00" * 12,
                                  b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x0c" + b"\x00" * 12])
def test_what_is_no_proxy_header_is_refused(data):
    from tidegate.dataplane.proxy_protocol import BadHeader, parse

    with pytest.raises(BadHeader):
        parse(data)


def test_local_and_unknown_headers_leave_the_peer_as_it_is():
    from tidegate.dataplane.proxy_protocol import V2_SIGNATURE, parse

    assert parse(b"PROXY UNKNOWN\r\nGET") == (15, "")
    assert parse(V2_SIGNATURE + b"\x20\x00\x00\x00GET") == (16, "")  # LOCAL: a health check of the proxy's own
