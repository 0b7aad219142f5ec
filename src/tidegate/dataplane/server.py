"""Listeners and atomic configuration swaps.

Each bound (address, port) has a `Site`: the router, balancer and connection pools of the IR in force. A new
IR replaces the Site objects in one step; a request reads its Site once when it starts, so requests in flight
finish on the configuration they began with. Sockets of listeners that stay are never closed on reload, so
keep-alive connections survive it.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from tidegate import ir
from tidegate.balancing.balancer import RouteBalancer
from tidegate.balancing.health import HealthChecker
from tidegate.balancing.state import Registry
from tidegate.dataplane import acme_challenge, deadlines, guard, h2limits
from tidegate.dataplane.deadlines import DEADLINES, Deadlines
from tidegate.dataplane.h2limits import H2_LIMITS, H2Limits
from tidegate.dataplane.http1 import IN_FLIGHT, ClientConnection
from tidegate.dataplane.l4 import L4DataPlane, L4Listener, L4Site, L4Table, free_socket, l4_kind
from tidegate.dataplane.proxied import ProxiedServer, listening_socket, proxy_peers
from tidegate.dataplane.tls import TLSSite, server_context
from tidegate.dataplane.upstream import EndpointPool, backend_tls_context
from tidegate.dataplane.upstream_h2 import H2EndpointPool
from tidegate.observe import accesslog
from tidegate.router import Router, routers_by_port

log = logging.getLogger("tidegate.dataplane")

BIND_RETRY_FIRST = 1.0  # seconds before a failed bind is tried again; doubled each time
BIND_RETRY_MAX = 30.0

# What a listening socket is opened with: its scheme; for HTTPS, its client-certificate checks, TLS handshake
# timeout, whether PROXY headers come before TLS (proxied.py), and whether some names are passed through to
# pods rather than terminated (TLS passthrough routes on the HTTPS listener: an Ingress's ssl-passthrough). A
# new configuration that changes it opens the socket anew.
Identity = tuple[str, str, str, float, bool, bool]


def _bind_error(key: tuple[str, int], exc: OSError) -> tuple[str, str]:
    """The status reason and message for a socket that could not be opened."""
    reason = "AddressNotUsable" if exc.errno == errno.EADDRNOTAVAIL else "PortUnavailable"
    return reason, f"cannot listen on {key[0]}:{key[1]}: {exc.strerror or exc}"


class PoolSet:
    """Connection pools by endpoint, kept across reloads (endpoints rarely change with routes)."""

    def __init__(self) -> None:
        self._pools: dict[tuple, EndpointPool] = {}
        self._h2_pools: dict[tuple, H2EndpointPool] = {}

    def pool(self, address: str, port: int, tls: ir.BackendTLS | None = None,
             client_certificate: ir.Certificate | None = None) -> EndpointPool:
        if tls is not None and tls.client_certificate is not None:
            client_certificate = tls.client_certificate  # the backend's own (proxy-ssl-secret)
        key = (address, port, tls, client_certificate if tls is not None else None)
        found = self._pools.get(key)
        if found is None:
            if tls is None:
                found = EndpointPool(address, port)
            else:
                # With subjectAltNames the policy names what to trust instead of the hostname (GEP-1897).
                ctx = backend_tls_context(tls.ca_pem, tls.well_known_ca, check_hostname=not tls.subject_alt_names,
                                          client_certificate=client_certificate, verify=tls.verify)
                found = EndpointPool(address, port, tls=ctx, server_hostname=tls.hostname,
                                     subject_alt_names=tls.subject_alt_names)
            self._pools[key] = found
        return found

    def h2_pool(self, address: str, port: int, tls: ir.BackendTLS | None = None,
                client_certificate: ir.Certificate | None = None) -> H2EndpointPool:
        if tls is not None and tls.client_certificate is not None:
            client_certificate = tls.client_certificate  # the backend's own (proxy-ssl-secret)
        key = (address, port, tls, client_certificate if tls is not None else None)
        found = self._h2_pools.get(key)
        if found is None:
            if tls is None:
                found = H2EndpointPool(address, port)
            else:
                ctx = backend_tls_context(tls.ca_pem, tls.well_known_ca, check_hostname=not tls.subject_alt_names,
                                          client_certificate=client_certificate, verify=tls.verify, alpn="h2")
                found = H2EndpointPool(address, port, tls=ctx, server_hostname=tls.hostname)
            self._h2_pools[key] = found
        return found

    def retain(self, endpoints: set[tuple[str, int]]) -> None:
        for key in [k for k in self._pools if k[:2] not in endpoints]:
            self._pools.pop(key).close()
        for key in [k for k in self._h2_pools if k[:2] not in endpoints]:
            self._h2_pools.pop(key).close()

    def close(self) -> None:
        self.retain(set())


@dataclass
class Site:
    router: Router | None
    balancer: RouteBalancer
    pools: PoolSet
    background: set = field(default_factory=set)
    # What the fast lane looked up of this configuration's endpoints, by the id of their IR object
    # (fastlane.EndpointSlot).
    endpoint_slots: dict[int, Any] = field(default_factory=dict)
    # ClientPolicy connections of the listeners on this socket (the strictest of each when several share
    # it), and the socket's key for the counts.
    limits: ir.ConnectionLimits | None = None
    key: Any = None
    # ClientPolicy proxyProtocol: peers whose connections to this socket start with a PROXY header
    proxy_from: Any = None  # guard.AddressSet
    # ClientPolicy timeouts and http2 of the listeners on this socket (the strictest where they differ), or the
    # run's defaults.
    deadlines: Deadlines = field(default_factory=lambda: DEADLINES)  # the object itself: the run's flags set it
    h2: H2Limits = H2_LIMITS


def _socket_limits(listeners: list[ir.Listener]) -> ir.ConnectionLimits | None:
    found = [listener.connection_limits for listener in listeners if listener.connection_limits is not None]
    if not found:
        return None
    per_listener = [f.max_per_listener for f in found if f.max_per_listener is not None]
    per_client = [f.max_per_client for f in found if f.max_per_client is not None]
    lags = [f.shed_at_loop_lag for f in found if f.shed_at_loop_lag is not None]
    return ir.ConnectionLimits(min(per_listener) if per_listener else None, min(per_client) if per_client else None,
                               min(lags) if lags else None)


class DataPlane:
    def __init__(self, bind: str = "0.0.0.0", reuse_port: bool = False, health_checks: bool = True):
        """`reuse_port`: worker processes share each listening port (SO_REUSEPORT; the kernel spreads
        connections). `health_checks`: False in workers, whose verdicts come from the control process."""
        self.bind = bind
        self.reuse_port = reuse_port
        self.run_health_checks = health_checks
        self.pools = PoolSet()
        self.sites: dict[tuple[str, int], Site] = {}
        self.servers: dict[tuple[str, int], Any] = {}  # asyncio (uvloop) Servers, proxied.ProxiedServers
        # Sockets that could not be opened: (reason for the status condition, message).
        self.errors: dict[tuple[str, int], tuple[str, str]] = {}
        self.tls_sites: dict[tuple[str, int], TLSSite] = {}
        self.schemes: dict[tuple[str, int], Identity] = {}
        # (certificate, key, client CA, mode) → SSLContext, reused across reloads
        self._contexts: dict[tuple[str, str, str, str], object] = {}
        self._background: set = set()
        # Endpoint health, ejections, active requests, circuit counts: they outlive configurations.
        self.registry = Registry()
        self.health = HealthChecker(self.registry)
        self.l4 = L4DataPlane(reuse_port)  # TCP, UDP and TLS passthrough listeners
        self.passthrough: dict[tuple[str, int], L4Site] = {}  # TLS passthrough routes of HTTPS sockets
        # Failed binds are tried again (_retry_binds); HTTP(S) ones by the identity they were to have.
        self._unbound_http: dict[tuple[str, int], Identity] = {}
        # HTTP(S) sockets bound with IP_FREEBIND: a Gateway address from an IPAddressPool that another node
        # may announce now.
        self._freebind: set[tuple[str, int]] = set()
        self._retrier: asyncio.Task | None = None
        # Told the listeners that still cannot be opened whenever one of them opens at last.
        self.on_errors: Callable[[dict[tuple[str, int], tuple[str, str]]], None] | None = None

    def _empty_site(self) -> Site:
        return Site(None, RouteBalancer(self.registry), self.pools, self._background)

    def _tls_site(self, key: tuple[str, int]) -> TLSSite | None:
        """The certificates a listening socket serves now (its SNI callback asks on each handshake)."""
        return self.tls_sites.get(key)

    async def apply(self, config: ir.IR) -> dict[tuple[str, int], tuple[str, str]]:
        """Serve `config` from now on. Returns the listeners that could not be opened, with the reason."""
        # The route tables are compiled in a thread: that work grows with the number of routes, and the
        # event loop meanwhile serves on the tables in force, held up at most a switch interval at a time.
        compiled = await asyncio.get_running_loop().run_in_executor(None, routers_by_port, config)
        routers = {(addr or self.bind, port): router for (addr, port), router in compiled.items()}
        https: dict[tuple[str, int], list[ir.Listener]] = {}
        for listener in config.listeners:
            if listener.protocol == "HTTPS":
                https.setdefault((listener.address or self.bind, listener.port), []).append(listener)
            elif listener.protocol != "HTTP" and not l4_kind(listener):
                log.warning("listener %s: %s is not served yet", listener.name, listener.protocol)
        used = {(c.cert_pem, c.key_pem) for group in https.values() for listener in group
                for c in (listener.tls.certificates if listener.tls else ())}
        self._contexts = {k: v for k, v in self._contexts.items() if k[:2] in used}
        tls_sites = {key: TLSSite(group, self._contexts) for key, group in https.items()}  # type: ignore[arg-type]
        self.registry.retain(config)
        guard.reset_for(config.listeners)
        if self.run_health_checks:
            self.health.apply(config)
        if accesslog.ACCESS_LOG is not None:
            accesslog.ACCESS_LOG.set_listeners({l.name: l.access_log for l in config.listeners if l.access_log})
            accesslog.ACCESS_LOG.set_quiet({r.name for listener in config.listeners for r in listener.http_routes
                                            if not r.access_log})
        balancer = RouteBalancer(self.registry)
        by_socket: dict[tuple[str, int], list[ir.Listener]] = {}
        for listener in config.listeners:
            if listener.protocol in ("HTTP", "HTTPS"):
                by_socket.setdefault((listener.address or self.bind, listener.port), []).append(listener)
        sites = {key: Site(router, balancer, self.pools, self._background,
                           limits=_socket_limits(by_socket.get(key, [])), key=key,
                           proxy_from=proxy_peers(by_socket.get(key, [])),
                           deadlines=deadlines.for_socket([l.timeouts for l in by_socket.get(key, []) if l.timeouts],
                                                          deadlines.backend_reads(by_socket.get(key, []))),
                           h2=h2limits.for_socket([l.http2 for l in by_socket.get(key, []) if l.http2]))
                 for key, router in routers.items()}
        # TLS passthrough routes on HTTPS sockets: chosen by the ClientHello's name before any termination.
        passthrough = {key: L4Site("tls", L4Table([r for l in group for r in l.l4_routes]), balancer, group[0].name,
                                   {id(r): l.name for l in group for r in l.l4_routes})
                       for key, group in https.items() if any(l.l4_routes for l in group)}
        self.sites = sites  # the atomic swap: new requests see the new configuration
        self.tls_sites = tls_sites
        self.passthrough = passthrough

        errors: dict[tuple[str, int], tuple[str, str]] = {}
        self._unbound_http = {}
        self._freebind = {(listener.address or self.bind, listener.port) for listener in config.listeners
                          if listener.freebind and not l4_kind(listener)}
        for key in routers:
            scheme = "https" if key in https else "http"
            # The socket's identity: its scheme and, for HTTPS, its client-certificate checks and handshake time.
            validation = tls_sites[key].client_validation if key in tls_sites else ("", "")
            identity = (scheme, validation[0], validation[1],
                        sites[key].deadlines.tls_handshake if key in tls_sites else 0.0,
                        key in tls_sites and sites[key].proxy_from is not None, key in passthrough)
            if key in self.servers and self.schemes.get(key) == identity:
                continue
            if key in self.servers:
                self.servers.pop(key).close()
            try:
                await self._open_http(key, identity)
            except OSError as exc:
                errors[key] = _bind_error(key, exc)
                log.error("%s", errors[key][1])
                self._unbound_http[key] = identity
        for key in [k for k in self.servers if k not in routers]:
            self.servers.pop(key).close()
            log.info("stopped listening on %s:%d", *key)
        errors.update(await self.l4.apply(config, self.bind, balancer, set(routers)))
        self.errors = errors
        if errors and (self._retrier is None or self._retrier.done()):
            self._retrier = asyncio.get_running_loop().create_task(self._retry_binds())
        self.pools.retain({(e.address, e.port) for listener in config.listeners for route in listener.http_routes
                           for backend in route.backends for e in backend.endpoints}
                          | {(e.address, e.port) for listener in config.listeners for route in listener.http_routes
                             for f in route.filters if f.mirror for e in f.mirror.endpoints})
        for listener in config.listeners:
            for route in listener.http_routes:
                for backend in route.backends:
                    if backend.policy is not None and backend.policy.idle_timeout:
                        for e in backend.endpoints:
                            self.pools.pool(e.address, e.port, backend.tls).idle_timeout = backend.policy.idle_timeout
        return errors

    async def _open_http(self, key: tuple[str, int], identity: Identity) -> None:
        address, port = key
        scheme = identity[0]
        ssl_ctx = server_context(partial(self._tls_site, key), identity[1],
                                 identity[2]) if scheme == "https" else None

        def site() -> Site:
            return self.sites.get(key) or self._empty_site()

        def protocol(source: str = "") -> ClientConnection:
            return ClientConnection(site, port, scheme, source)

        loop = asyncio.get_running_loop()
        handshake = identity[3] if ssl_ctx is not None else None
        challenge = acme_challenge.tls_alpn_context if ssl_ctx is not None and acme_challenge.DIR is not None \
            else None
        if identity[4] or identity[5] or challenge is not None:  # before TLS: PROXY headers, passthrough
            # names or an ACME TLS-ALPN-01 validation (tidegate accepts)
            sock = free_socket(address, port, False, self.reuse_port) if key in self._freebind \
                else listening_socket(address, port, self.reuse_port)
            relays = L4Listener(f"{address}:{port} passthrough", lambda: self.passthrough.get(key))
            self.l4.adopt(relays)

            def passed_through(name: str) -> Callable[[str], Any] | None:
                found = self.passthrough.get(key)
                return relays.protocol if found is not None and found.table.for_server_name(name) else None

            server: Any = ProxiedServer(sock, protocol, lambda: site().proxy_from, ssl_ctx, identity[3],
                                        identity[3], passthrough=passed_through if identity[5] else None,
                                        challenge=challenge)
        elif key in self._freebind:
            server = await loop.create_server(protocol, sock=free_socket(address, port, False, self.reuse_port),
                                              backlog=1024, ssl=ssl_ctx, ssl_handshake_timeout=handshake)
        else:
            server = await loop.create_server(protocol, host=address, port=port, reuse_address=True,
                                              reuse_port=self.reuse_port or None, backlog=1024, ssl=ssl_ctx,
                                              ssl_handshake_timeout=handshake)
        self.schemes[key] = identity
        self.servers[key] = server
        log.info("listening on %s:%d (%s)", address, port, scheme.upper())

    async def _retry_binds(self) -> None:
        """Sockets that could not be opened (a port another process held, an address not yet on this host)
        are tried again, every BIND_RETRY_FIRST seconds at first, then less often (BIND_RETRY_MAX at most),
        until they open or a new configuration no longer has them; each one that opens is reported
        (`on_errors`), and status and readiness follow."""
        delay = BIND_RETRY_FIRST
        while self._unbound_http or self.l4.unbound:  # not the other errors (two protocols on one port):
            await asyncio.sleep(delay)                 # only a new configuration mends those
            delay = min(delay * 2, BIND_RETRY_MAX)
            opened = []
            for key in list(self.errors):
                try:
                    if key in self._unbound_http:
                        await self._open_http(key, self._unbound_http[key])
                        del self._unbound_http[key]
                    elif key in self.l4.unbound:
                        await self.l4.retry(key)
                    else:
                        continue
                except OSError:
                    continue
                opened.append(key)
            if opened:
                self.errors = {k: v for k, v in self.errors.items() if k not in opened}
                log.info("opened at last: %s", ", ".join(f"{a}:{p}" for a, p in opened))
                if self.on_errors is not None:
                    self.on_errors(dict(self.errors))

    def bound_port(self, key: tuple[str, int]) -> int:
        server = self.servers[key]
        return server.sockets[0].getsockname()[1]

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; give requests in flight up to `grace` seconds; then close everything."""
        if self._retrier is not None:
            self._retrier.cancel()
        for server in self.servers.values():
            server.close()
        self.l4.stop_accepting()
        deadline = asyncio.get_running_loop().time() + grace
        while (IN_FLIGHT.count or self.l4.connections()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.servers.clear()
        self.l4.close()
        await self.health.close()
        self.pools.close()


# Objects allocated, less objects freed, between two collections of the youngest generation (Python's default is
# 700). Each request's objects come in a burst (an HTTP/2 read brings several requests, each with some hundred
# objects) and are freed a moment later; at 700 most bursts set off a collection, each of which moves the objects
# of requests still in flight to an older generation, whose collections then cost more. With an HTTP/2 load
# (benchmarks/proxies.py), collections took 9 % of the CPU at 700 and 1.5 % at 10,000, where a collection of
# the young generation takes about 2 ms.
YOUNG_COLLECTION_THRESHOLD: Final = 10_000


def freeze_startup_heap() -> None:
    """Once, when the first configuration serves: collect what starting up left behind, then move every object
    that exists now (schemas, modules, the first configuration) out of the cyclic collector's sight. Its full
    collections then scan only what came later: with a new connection per request, full collections over
    the startup heap took 25 ms each, the p99 of that benchmark. Objects are still freed as usual when their
    last reference goes. From then on the young generation is collected less often (YOUNG_COLLECTION_THRESHOLD)."""
    if gc.get_freeze_count():
        return
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)
