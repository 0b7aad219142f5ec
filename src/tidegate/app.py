"""The running program (`tidegate run`): sources → store → translation → worker processes, with status,
readiness, health checks, the admin listener, leader election and the Layer 2 node agent wired around them.
`cli.py` parses the command line and hands over here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from typing import Any

from tidegate import __version__, compiled, ir
from tidegate.cli import EXIT_INVALID, EXIT_OK, explain_as_data, options_for, statuses_as_data
from tidegate.resources.model import Problem
from tidegate.translate import Translation, translate
from tidegate.translate.loadbalancers import LOADBALANCER_PREFIX


async def serve(args: argparse.Namespace) -> int:
    """`tidegate run`: until SIGTERM or SIGINT."""
    from tidegate import background
    from tidegate.balancing.health import HealthChecker
    from tidegate.balancing.state import Registry
    from tidegate.dataplane.deadlines import Deadlines
    from tidegate.dataplane.server import freeze_startup_heap
    from tidegate.observe.admin import RunState, start_admin
    from tidegate.observe.metrics import METRICS
    from tidegate.sources.file import FileSource
    from tidegate.store import Store
    from tidegate.translate.gateways import mark_unbindable
    from tidegate.workers import WorkerOptions, WorkerPool

    log = logging.getLogger("tidegate")
    log.info("tidegate %s, request path %s", __version__, compiled.describe())
    store = Store()

    def report(problem: Problem) -> None:
        (log.error if problem.severity == "error" else log.warning)("%s", problem)

    acme = None
    if args.acme_dir:
        from tidegate.acme.manager import AcmeManager
        from tidegate.acme.store import FileStore

        acme = AcmeManager(FileStore(args.acme_dir), backoff=args.acme_backoff)
        # the certificates it writes come back as Secrets, through the file source like any other
        args.paths = [*args.paths, str(acme.store.secrets_dir)]
    source = FileSource(args.paths, store, args.namespace, report)
    for problem in source.load():
        report(problem)
    cluster = writer = elector = None
    if args.kubernetes:
        from tidegate.leader import LeaderElector
        from tidegate.sources.kubernetes import KubernetesSource, connect
        from tidegate.status_writer import StatusWriter

        try:
            client = connect(args.kubeconfig, args.context)
        except Exception as exc:  # no usable kubeconfig or in-cluster credentials
            log.error("cannot set up a Kubernetes client: %s", exc)
            return EXIT_INVALID
        cluster = KubernetesSource(client, store, report)
        cluster.start()
        log.info("waiting for the first full list of every kind from the API server")
        await cluster.synced.wait()
        if args.serve == "all":  # a node agent (--serve loadbalancers) leaves status to the Deployment's leader
            elector = LeaderElector(client, args.lease_namespace, args.lease_name, args.identity,
                                    args.lease_duration, args.renew_deadline, args.retry_period)
            writer = StatusWriter(client, cluster, elector)
    if args.once:
        translation = translate(store.snapshot().resources, options_for(args))
        _log_translation(log, store.version, translation)
        if cluster is not None:
            await cluster.close()
        return EXIT_OK
    # Traffic goes to worker processes, one or more: this process keeps sources, loading, translation, status,
    # health checks and the admin listener, so that nothing a config file does holds up serving. (Each worker
    # writes its own access log lines.)
    METRICS.use_workers()
    registry = Registry()
    incarnation = f"{int(time.time() * 1000):x}.{os.getpid():x}"  # this run, in heartbeat answers
    return_path = await _return_path(args, log)
    deadlines = Deadlines(request_head=args.request_head_timeout, request_body_window=args.request_body_timeout,
                          idle=args.idle_timeout, send=args.send_timeout, upstream_read=args.upstream_read_timeout,
                          tls_handshake=args.tls_handshake_timeout)
    pool = WorkerPool(args.workers, WorkerOptions(args.bind, args.zone, args.access_log, args.access_log_file,
                                                  args.access_log_sample, args.access_log_status, deadlines,
                                                  node=args.node, heartbeat_port=args.heartbeat_port,
                                                  incarnation=incarnation, transparent=return_path is not None,
                                                  workers=args.workers, rate_limit_redis=args.rate_limit_redis,
                                                  rate_limit_redis_timeout=args.rate_limit_redis_timeout,
                                                  rate_limit_replicas=args.rate_limit_replicas,
                                                  acme_dir=args.acme_dir),
                      registry)
    health = HealthChecker(registry, on_change=pool.health_changed)
    await pool.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    state = RunState(sources=[str(p) for p in args.paths] + (["kubernetes"] if args.kubernetes else []))
    state.registry = registry
    state.refresh = pool.refresh_stats
    state.file_problems = lambda: source.problems_by_file
    from tidegate.observe.admin import backends_view

    METRICS.endpoints.source = lambda: backends_view(state)
    admin = metrics = None
    token = _admin_token(args, log)
    if args.admin != "off":
        try:
            admin = await start_admin(args.admin, state, token,
                                      lambda url, method, headers: explain_as_data(state.translation, url, method,
                                                                                   headers),
                                      trust_loopback=args.admin_trust_loopback)
            log.info("admin API on http://%s (/healthz /readyz /metrics /api/v1/...)%s",
                     _bound(admin) if admin.sockets else args.admin,
                     ", every client with the token" if token else ", loopback clients only (no token)")
        except (OSError, ValueError) as exc:
            log.error("cannot open the admin listener %s: %s", args.admin, exc)
    if args.metrics != "off":
        try:
            metrics = await start_admin(args.metrics, state, "", lambda *_: {}, metrics_only=True)
            log.info("metrics on http://%s/metrics", _bound(metrics) if metrics.sockets else args.metrics)
        except (OSError, ValueError) as exc:
            log.error("cannot open the metrics listener %s: %s", args.metrics, exc)

    unmarked = [dict[Any, Any]()]  # the statuses of the translation in force, before what the data plane found
    last_errors = [dict[Any, Any]()]  # the sockets that could not be opened, as publish was last told

    def publish(errors: dict) -> None:
        """Status, readiness and the listener gauges from the translation in force and the sockets the workers
        could not open: after each configuration, and whenever a socket opens at last."""
        translation = state.translation
        if translation is None:
            return
        listeners = list(served_ir(translation.ir, args.serve).listeners)
        # A copy each time: the status writer may still hold the statuses it was given last.
        translation.statuses = mark_unbindable(dict(unmarked[0]), listeners, errors, args.bind)
        if acme is not None:  # an ACME certificate's failed orders, on the listener that waits for it
            translation.statuses = acme.mark(translation.statuses)
        last_errors[0] = errors
        state.statuses = statuses_as_data(translation)
        state.unbound = {f"{address}:{port}": message for (address, port), (_, message) in errors.items()}
        ready = serves_something(listeners, errors, args.bind)
        if state.ready and not ready:
            log.error("not ready: none of the %d listener(s) could be opened", len(listeners))
        state.ready = ready
        METRICS.listener_open.clear()
        for listener in listeners:
            METRICS.listener_open.labels(listener.name).set((listener.address or args.bind, listener.port)
                                                            not in errors)
        if writer is not None:
            writer.submit(translation.statuses, translation.notes)

    pool.on_listeners = publish
    if acme is not None:
        from tidegate.acme.manager import AcmeMetrics

        acme.on_change = lambda: publish(last_errors[0])
        state.acme = acme
        METRICS.registry.register(AcmeMetrics(acme))

    logged = [frozenset[str]()]  # the failing conditions the last configuration logged
    acme_said: list[bool] = []  # whether the lack of --acme-dir was logged

    cannot_announce: list[str] = []  # why the Layer 2 agent could not start, once it failed
    cannot_bgp: list[str] = []  # likewise for BGP

    health_ports = None
    if args.node_ports:
        from tidegate.announce.health_check_ports import HealthCheckPorts

        health_ports = HealthCheckPorts(args.bind)

    async def announce(translation: Translation) -> None:
        """With --node: hand the Layer 2 addresses and the BGP plan to their agents, each started when it
        first has something to do. With --node-ports: the healthCheckNodePort answers."""
        lbs = translation.load_balancers
        METRICS.set_pools(lbs.allocation.pools)
        if health_ports is not None:
            await health_ports.update(lbs.health_checks)
        if args.node:
            await announce_l2(lbs)
            await announce_bgp(lbs)

    async def announce_bgp(lbs: Any) -> None:
        if cannot_bgp or (state.bgp is None and not lbs.bgp.sessions):
            return
        if state.bgp is None:
            from tidegate.announce.bgp import BGPAgent, fallback_router_id

            me = next((n for n in lbs.nodes if n.name == args.node), None)
            router_id = me.address if me is not None and me.address and ":" not in me.address \
                else fallback_router_id(args.node)
            agent = BGPAgent(args.node, router_id)
            try:
                await agent.start()
            except Exception as exc:  # not root, no netlink: serve anyway, say why nothing is announced
                log.error("cannot announce LoadBalancer addresses over BGP from node %s: %s", args.node, exc)
                cannot_bgp.append(str(exc))
                return
            state.bgp = agent
            METRICS.announcer.bgp = agent
            log.info("node %s: BGP speaker started (router ID %s)", args.node, router_id)
        await state.bgp.update(lbs.bgp)

    async def announce_l2(lbs: Any) -> None:
        if cannot_announce or (state.announcer is None and not lbs.l2):
            return
        if state.announcer is None:
            from tidegate.announce.node import Layer2Agent

            agent = Layer2Agent(args.node, args.heartbeat_port, args.node_timeout, refresh=args.l2_refresh,
                                incarnation=incarnation)
            try:
                await agent.start()
            except Exception as exc:  # not root, no netlink: serve anyway, say why nothing is announced
                log.error("cannot announce LoadBalancer addresses from node %s: %s", args.node, exc)
                cannot_announce.append(str(exc))  # --node still names the node: Local keeps to its pods
                return
            state.announcer = agent
            METRICS.announcer.source = agent
            log.info("node %s: announcing LoadBalancer addresses in Layer 2 (heartbeat on UDP port %d, a node "
                     "silent for %.1f s is down)", args.node, args.heartbeat_port, args.node_timeout)
        candidacies = lbs.l2
        if args.serve == "loadbalancers" and not args.gateway_pods:
            # A node agent that does not relay to the Gateways' pods does not announce their addresses
            candidacies = [c for c in candidacies if not all(s.startswith("Gateway ") for s in c.services)]
        state.announcer.update(candidacies, lbs.nodes)

    async def follow() -> None:
        async for snapshot in store.updates():
            started = time.perf_counter()
            # In a thread: the admin listener (probes, scrapes) keeps answering while a large config translates.
            translation = await background.run(translate, snapshot.resources, options_for(args, state.translation))
            METRICS.translation.observe(time.perf_counter() - started)
            served = served_ir(translation.ir, args.serve)
            try:
                registry.retain(served)
                health.apply(served)
                errors = await pool.apply(snapshot.version, served)
            except Exception:  # a bug here must not take down what is serving: keep the last good config
                log.exception("config version %d could not be applied; the previous one keeps serving",
                              snapshot.version)
                METRICS.reloads.labels("failed").inc()
                continue
            state.version, state.translation, state.applied_at = snapshot.version, translation, time.time()
            unmarked[0] = dict(translation.statuses)
            publish(errors)
            await announce(translation)
            if acme is not None:
                acme.update(translation.acme)
            elif translation.acme and not acme_said:
                acme_said.append(True)
                log.error("%d certificate(s) are to be ordered over ACME (%s), and this run has no --acme-dir: "
                          "none is ordered", len(translation.acme), translation.acme[0].source)
            METRICS.reloads.labels("ok").inc()
            METRICS.config_version.set(snapshot.version)
            logged[0] = _log_translation(log, snapshot.version, translation, logged[0])
            log.info("serving config version %d", snapshot.version)
            freeze_startup_heap()

    tasks = [asyncio.create_task(source.watch()), asyncio.create_task(follow())]
    if elector is not None and writer is not None:
        tasks += [asyncio.create_task(elector.run()), asyncio.create_task(writer.run())]
    await stop.wait()
    log.info("stopping: no new connections; in-flight requests get %.0f s to finish", args.grace)
    state.ready = False
    if state.announcer is not None:
        await state.announcer.leave()  # the other nodes take this node's addresses now, not after a timeout
    for task in tasks:
        task.cancel()
    if acme is not None:
        await acme.close()
    if elector is not None:
        await elector.release()
    if cluster is not None:
        await cluster.close()
    await pool.stop(args.grace)
    if state.announcer is not None:
        await state.announcer.close()
    if state.bgp is not None:
        await state.bgp.close()
    if health_ports is not None:
        health_ports.close()
    if return_path is not None:
        await asyncio.to_thread(return_path.remove)
    await health.close()
    for listener in (admin, metrics):
        if listener is not None:
            listener.close()
    return EXIT_OK


async def _return_path(args: argparse.Namespace, log: logging.Logger) -> Any:
    """With --node: the return path for relays that connect to local pods from the client's address
    (externalTrafficPolicy: Local), set up before the workers start; None when it cannot be (they connect from
    this node's address then, and the log says why)."""
    if not args.node or args.no_transparent:
        return None
    from tidegate.announce.return_path import ReturnPath

    path = ReturnPath()
    try:
        await asyncio.to_thread(path.install)
    except Exception as exc:  # not root, no nft: serve anyway
        log.error("node %s: pods behind externalTrafficPolicy: Local will see this node's address, not the "
                  "client's: %s (or give the Service tidegate.io/proxy-protocol)", args.node, exc)
        return None
    log.info("node %s: relays to local pods keep the client's address (nftables table inet tidegate, fwmark "
             "%#x, routing table %d)", args.node, path.mark, path.table)
    return path


def served_ir(config: ir.IR, serve: str) -> ir.IR:
    """What this process serves of the configuration: all of it, or (a node agent) the LoadBalancer Services'
    addresses alone."""
    if serve == "all":
        return config
    return ir.IR(listeners=tuple(listener for listener in config.listeners
                                 if listener.gateway.startswith(LOADBALANCER_PREFIX)))


def serves_something(listeners: list[Any], errors: dict, bind: str) -> bool:
    """Readiness, per Gateway and not per process: this replica is ready once its configuration is applied and
    it serves at least one of its listeners (or has none to serve). A listener whose port is taken shows in its
    Gateway's status and in tidegate_listener_open, and does not take the replica, with every other
    Gateway it serves, out of its Service."""
    wanted = {(listener.address or bind, listener.port) for listener in listeners}
    return not wanted or bool(wanted - errors.keys())


def _admin_token(args: argparse.Namespace, log: logging.Logger) -> str:
    """The admin token: from --admin-token-file (a mounted Secret; a file not there yet means none), else from
    TIDEGATE_ADMIN_TOKEN. Never from the command line, where `ps` shows it."""
    if args.admin_token_file:
        try:
            with open(args.admin_token_file) as f:
                return f.read().strip()
        except FileNotFoundError:
            log.warning("no admin token: %s does not exist; only loopback clients reach the admin API",
                        args.admin_token_file)
            return ""
    return os.environ.get("TIDEGATE_ADMIN_TOKEN", "").strip()


def _bound(server: asyncio.base_events.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"{host}:{port}"


LOG_LINES_PER_LOAD = 20  # of each kind: listeners, notes, failing conditions


def _log_translation(log: logging.Logger, version: int, translation: Translation,
                     logged_before: frozenset[str] = frozenset()) -> frozenset[str]:
    """A configuration's summary in the log. Failing conditions are logged when they are new since the last
    configuration (`logged_before`, what this returned then), and no kind of line more than LOG_LINES_PER_LOAD
    times: 10,000 failing listeners once wrote 40,000 lines per load. The rest is in `tidegate status` and
    /api/v1/status."""
    listeners = translation.ir.listeners
    routes = sum(len(listener.http_routes) + len(listener.l4_routes) for listener in listeners)
    log.info("config version %d: %d listener(s), %d route rule(s)", version, len(listeners), routes)
    for listener in listeners[:LOG_LINES_PER_LOAD]:
        log.info("  %s %s %s:%d", listener.name, listener.protocol, listener.address or "*", listener.port)
    _log_rest(log, logging.INFO, len(listeners), "listener(s): tidegate routes, or /api/v1/routes")
    for note in translation.notes[:LOG_LINES_PER_LOAD]:
        log.warning("%s", note)
    _log_rest(log, logging.WARNING, len(translation.notes), "note(s): tidegate status")
    failing = [f"{key}: {cond['type']}={cond['status']} {cond['reason']}: {cond['message']}"
               for key, status in translation.statuses.items() for cond in _failing_conditions(status)]
    new = [line for line in failing if line not in logged_before]
    for line in new[:LOG_LINES_PER_LOAD]:
        log.warning("%s", line)
    _log_rest(log, logging.WARNING, len(new), "new failing condition(s): tidegate status, or /api/v1/status")
    return frozenset(failing)


def _log_rest(log: logging.Logger, level: int, count: int, what: str) -> None:
    if count > LOG_LINES_PER_LOAD:
        log.log(level, "  and %d more %s", count - LOG_LINES_PER_LOAD, what)


def _failing_conditions(status: dict[str, Any]) -> list[dict[str, Any]]:
    bad = [c for c in status.get("conditions", []) if c["status"] == "False" and c["type"] != "Conflicted"]
    for parent in status.get("parents", []) + status.get("ancestors", []):
        bad += [c for c in parent["conditions"] if c["status"] == "False"]
    for listener in status.get("listeners", []):
        bad += [c for c in listener["conditions"] if (c["status"] == "False") != (c["type"] == "Conflicted")]
    return bad


