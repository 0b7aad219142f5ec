"""The Python CPU one request costs on tidegate's fast lane, without sockets or load generator noise.

A client connection and a kept endpoint connection are driven by hand with fake transports: a small GET goes
in, tidegate routes it, balances it and writes the request for the endpoint; a small answer comes back and
goes out to the client. Everything but the system calls runs as in `tidegate run`, metrics and (with --log)
the JSON access log included. Prints µs per request, and with --profile the functions that take the time.

    .venv/bin/python benchmarks/request_path.py [--requests N] [--log] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.manifests import http_gateway, route, service  # noqa: E402
from tidegate import compiled  # noqa: E402
from tidegate.balancing.balancer import RouteBalancer  # noqa: E402
from tidegate.balancing.state import Registry  # noqa: E402
from tidegate.dataplane import redis_limits  # noqa: E402
from tidegate.dataplane.http1 import ClientConnection  # noqa: E402
from tidegate.dataplane.server import PoolSet, Site  # noqa: E402
from tidegate.dataplane.upstream import UpstreamConnection  # noqa: E402
from tidegate.observe import accesslog  # noqa: E402
from tidegate.resources.loader import load_text  # noqa: E402
from tidegate.router import routers_by_port  # noqa: E402
from tidegate.translate import translate  # noqa: E402

REQUEST = (b"GET /small HTTP/1.1\r\nHost: app.bench.local\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
           b"Accept-Encoding: gzip\r\n\r\n")
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 17:00:00 GMT\r\n"
          b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nhello, world\n")


class Transport:
    """Just enough of an asyncio transport: writes are kept (the last one) and counted."""

    def __init__(self, peer: str):
        self.peer = peer
        self.last = b""
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1

    def get_extra_info(self, name: str, default=None):
        return (self.peer, 40000) if name == "peername" else default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the connection was closed")


# --edge: what benchmarks/proxies.py's edge-protection group puts on the route: an allow list, 1,000 denied
# networks and a rate limit per client that is never reached; Local, then Global with this worker holding a
# lease of the client's key (what a busy key costs between two Redis calls: redis_limits.py).
DENIED = ", ".join(f"198.{18 + n // 256}.{n % 256}.0/24" for n in range(1000))
EDGE_POLICY = """
---
apiVersion: tidegate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: edge, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}]
  ipAccess:
    allow: [127.0.0.0/8, 10.0.0.0/8]
    deny: [%s]
  rateLimit:
    rules: [{name: per-client, limit: {requests: 100000000, period: 1s}, scope: SCOPE}]
""" % DENIED


def site(hosts: int, edge: str = "") -> Site:
    """`edge`: the rate limit's scope, or "" for no TrafficPolicy."""
    text = http_gateway("127.0.0.1", 8080) + service("app", [("127.0.0.2", 8081, "p1"), ("127.0.0.3", 8081, "p2")])
    text += route("app", "app.bench.local", "- backendRefs: [{name: app, port: 80}]")
    if edge:
        text += EDGE_POLICY.replace("SCOPE", edge)
    for i in range(1, hosts + 1):  # one HTTPRoute per hostname, as benchmarks/proxies.py's 1,000-hostname group
        text += route(f"h{i}", f"h{i}.bench.local", "- backendRefs: [{name: app, port: 80}]")
    loaded = load_text(text, "bench")
    assert not loaded.errors, loaded.errors
    routing = translate(loaded.resources).ir
    router = next(iter(routers_by_port(routing).values()))
    if edge == "Global":  # a limiter that never connects, holding a lease of the client's key that never ends
        limiter = redis_limits.LIMITER = redis_limits.RedisLimiter("redis://127.0.0.1:1/0")
        rule = next(r.guard.rate_limits[0] for r in routing.listeners[0].http_routes if r.guard is not None)
        lease = limiter.leases[redis_limits.redis_key(rule.name, "127.0.0.1")] = redis_limits._Lease()
        lease.units, lease.until = 1 << 60, float("inf")
    return Site(router, RouteBalancer(Registry()), PoolSet())


async def run(requests: int, rounds: int, profile: bool, hosts: int = 0, connections: int = 1,
              paths: int = 0, edge: str = "") -> float:
    serving = site(hosts, edge)
    clients = []
    for _ in range(connections):
        client = ClientConnection(lambda: serving, 8080)
        client.connection_made(Transport("127.0.0.1"))
        clients.append(client)
    for address in ("127.0.0.2", "127.0.0.3"):  # an idle kept connection for each request in flight
        pool = serving.pools.pool(address, 8081)
        for _ in range(connections):
            upstream = UpstreamConnection(pool)
            upstream.connection_made(Transport(address))
            pool.release(upstream)

    # With --hosts, each request names the next of the hostnames, as wrk's script does in proxies.py.
    heads = [REQUEST.replace(b"app.bench.local", b"h%d.bench.local" % i) for i in range(1, hosts + 1)] or [REQUEST]
    # With --paths, each request asks for the next of N paths (/small/1, /small/2, ...), as real traffic does
    # (ids in paths): more request lines than the router remembers.
    if paths:
        heads = [head.replace(b"/small ", b"/small/%d " % i) for i in range(1, paths + 1) for head in heads]
    turn = [0]

    def one() -> None:
        """A request from each client connection, then each one's answer: `connections` in flight at once."""
        for client in clients:
            turn[0] = (turn[0] + 1) % len(heads)
            client.data_received(heads[turn[0]])
        for client in clients:
            upstream = client.upstream
            assert upstream is not None, "the request did not take the fast lane"
            upstream.data_received(ANSWER)

    requests = max(1, requests // connections)  # rounds of one request per connection
    for _ in range(max(1, 1000 // connections)):  # warm up
        one()
    assert clients[0].transport.last.startswith(b"HTTP/1.1 200"), clients[0].transport.last
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(requests):
            one()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return 0.0
    best = float("inf")
    for _ in range(rounds):  # the best round: a shared VM only ever adds time
        started = time.process_time()
        for _ in range(requests):
            one()
        best = min(best, time.process_time() - started)
    writes = sum(client.transport.writes for client in clients)
    sent = (rounds * requests + max(1, 1000 // connections)) * connections  # measured and warm-up requests
    print(f"client writes per request: {writes / sent:.2f}")
    return best / (requests * connections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000, help="per round")
    parser.add_argument("--rounds", type=int, default=5, help="the best round is reported")
    parser.add_argument("--log", action="store_true", help="with the JSON access log on (to /dev/null)")
    parser.add_argument("--hosts", type=int, default=0, metavar="N",
                        help="N HTTPRoutes with their own hostnames, each request to the next of them")
    parser.add_argument("--paths", type=int, default=0, metavar="N",
                        help="each request to the next of N paths (more than the router remembers: 4,096)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the loop (slows it down; it sees into the request path only when that runs "
                             "as Python: TIDEGATE_PURE_PYTHON=1, or perf record -g for the compiled one)")
    parser.add_argument("--connections", type=int, default=1, metavar="N",
                        help="N client connections (and N kept endpoint connections) with a request each in flight")
    parser.add_argument("--edge", action="store_true",
                        help="also measure the route with a TrafficPolicy (IP lists with 1,000 denied networks and a "
                             "rate limit never reached: Local, then Global on a lease), and print what each adds")
    args = parser.parse_args()
    for name, least in (("requests", 1), ("rounds", 1), ("hosts", 0), ("connections", 1), ("paths", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be at least {least}")
    if args.log:
        accesslog.ACCESS_LOG = accesslog.AccessLog("json", "/dev/null")
    per_request = asyncio.run(run(args.requests, args.rounds, args.profile, args.hosts, args.connections,
                                 args.paths))
    if args.profile:
        return
    print(f"request path {compiled.describe()}")
    print(f"{per_request * 1e6:.2f} µs of Python per request ({1 / per_request:,.0f} requests per CPU-second "
          f"before system calls){' with the JSON access log' if args.log else ''}"
          f"{f', over {args.hosts} hostnames' if args.hosts else ''}"
          f"{f', over {args.paths} paths' if args.paths else ''}"
          f"{f', {args.connections} connections' if args.connections > 1 else ''}")
    if args.edge:
        for scope in ("Local", "Global"):
            guarded = asyncio.run(run(args.requests, args.rounds, False, args.hosts, args.connections, args.paths,
                                      scope))
            print(f"{guarded * 1e6:.2f} µs with the TrafficPolicy, limit {scope}"
                  f"{' (a lease held: no Redis call)' if scope == 'Global' else ''}: it adds "
                  f"{(guarded - per_request) * 1e6:.2f} µs, {100 * (1 - per_request / guarded):.1f} % of the guarded "
                  "request's CPU")
    if accesslog.ACCESS_LOG is not None:
        accesslog.ACCESS_LOG.close()


if __name__ == "__main__":
    main()
