"""`tidegate run --workers N`: N data-plane processes beside one control process.

`tidegate run` always serves from worker processes, one by default: nothing that loading or translating a
configuration does can hold up a request. The control process keeps everything that must happen once:
sources, store, translation, status writes, leader election, the admin listener, and active health checks.
Each worker process serves traffic: it opens every listener with SO_REUSEPORT (the kernel spreads
connections over the workers), receives each new IR over a channel (channel.py: framed and flow-controlled,
whatever the IR's size) and answers with the sockets it could not open (and later, with those that opened at
last), learns health verdicts from the control process, and reports its counters every second and when
asked; the control process adds them up for /metrics, the admin API and the dashboard. A worker that dies is
started again with the configuration in force. Workers never act on signals themselves: the control process
tells them to stop, with the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tidegate import ir
from tidegate.balancing.state import Registry
from tidegate.channel import Channel
from tidegate.dataplane import acme_challenge, descriptors
from tidegate.dataplane.deadlines import DEADLINES, Deadlines

log = logging.getLogger("tidegate.workers")

STATS_INTERVAL = 1.0
APPLY_TIMEOUT = 30.0


@dataclass(frozen=True)
class WorkerOptions:
    bind: str
    zone: str
    access_log: str
    access_log_file: str
    access_log_sample: float
    access_log_status: str
    deadlines: Deadlines = field(default_factory=Deadlines)
    log_level: int = logging.INFO
    node: str = ""  # --node: workers answer the heartbeat that tells other nodes this one serves
    heartbeat_port: int = 0
    incarnation: str = ""  # this run's, in heartbeat answers (a node that said goodbye is not up again)
    transparent: bool = False  # the return path is in place: relays may connect from clients' addresses
    workers: int = 1  # how many share the traffic: each enforces its share of a Local rate limit
    rate_limit_redis: str = ""  # --rate-limit-redis: where Global rate limits are counted
    rate_limit_redis_timeout: float = 0.05
    rate_limit_replicas: int = 1  # --rate-limit-replicas: this replica's share of a Global limit without Redis
    acme_dir: str = ""  # --acme-dir: where HTTP-01 answers are read from


# -- the control process's side ---------------------------------------------------------------------------

class WorkerPool:
    def __init__(self, count: int, options: WorkerOptions, registry: Registry):
        self.count = count
        self.options = options
        self.registry = registry  # the control process's: health verdicts, and the workers' counts added up
        self._context = multiprocessing.get_context("spawn")
        self._procs: dict[int, Any] = {}
        self._channels: dict[int, Channel] = {}
        self._waiting: dict[int, asyncio.Future] = {}
        self._config: tuple[int, ir.IR] | None = None
        self._endpoint_stats: dict[int, dict] = {}
        self._reports: dict[int, list[asyncio.Future]] = {}  # refresh_stats waiting for a worker's counts
        # The sockets each worker could not open; and who hears when that changes between configurations.
        self._worker_errors: dict[int, dict] = {}
        self.on_listeners: Callable[[dict], None] | None = None
        self._stopping = False
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        for index in range(self.count):
            await self._spawn(index)
        self._watcher = asyncio.get_running_loop().create_task(self._supervise())

    async def _spawn(self, index: int) -> None:
        parent, child = self._context.Pipe()  # a socket pair: the child's end travels to the new process
        proc = self._context.Process(target=worker_main, args=(child, index, self.options),
                                     name=f"tidegate-worker-{index}")
        proc.start()
        child.close()
        self._procs[index] = proc
        self._channels[index] = await Channel.open(_socket_of(parent), lambda m: self._receive(index, m),
                                                   lambda: None)  # a worker's end: _supervise notices
        log.info("worker %d started (pid %d)", index, proc.pid)

    async def _receive(self, index: int, message: tuple) -> None:
        kind = message[0]
        if kind == "applied":
            self._worker_errors[index] = message[2]
            waiter = self._waiting.get(index)
            if waiter is not None and not waiter.done():
                waiter.set_result(message[2])
        elif kind == "listeners":
            self._worker_errors[index] = message[1]
            if self.on_listeners is not None:
                self.on_listeners(self.listener_errors())
        elif kind == "stats":
            from tidegate.observe.metrics import METRICS

            METRICS.merge_worker(index, message[1])
            self._endpoint_stats[index] = message[2]
            self._merge_endpoints()
            for waiter in self._reports.pop(index, []):
                if not waiter.done():
                    waiter.set_result(None)

    async def refresh_stats(self, timeout: float = 0.5) -> None:
        """Ask every worker for its counts now, and wait (at most `timeout` seconds) until they are in: a
        scrape then counts every request answered before it. A worker that does not answer in time (busy, or
        starting) is counted as of its last report."""
        loop = asyncio.get_running_loop()
        waiters = []
        for index in list(self._channels):
            waiter = loop.create_future()
            self._reports.setdefault(index, []).append(waiter)
            waiters.append(waiter)
            loop.create_task(self._send(index, ("report",)))
        if waiters:
            await asyncio.wait(waiters, timeout=timeout)

    def _merge_endpoints(self) -> None:
        """The workers' per-endpoint counts, added up into the control process's registry (what the admin
        API, the dashboard and /metrics read)."""
        now = time.monotonic()
        totals: dict[tuple[str, int], list] = {}
        for stats in self._endpoint_stats.values():
            for key, (active, requests, failures, latency, ejected_for, ejections) in stats.items():
                t = totals.setdefault(key, [0, 0, 0, [0] * len(latency), 0.0, 0])
                t[0] += active
                t[1] += requests
                t[2] += failures
                t[3] = [a + b for a, b in zip(t[3], latency, strict=False)]
                t[4] = max(t[4], ejected_for)
                t[5] = max(t[5], ejections)
        for (address, port), (active, requests, failures, latency, ejected_for, ejections) in totals.items():
            state = self.registry.endpoints.get((address, port))
            if state is None:
                continue
            state.active, state.requests, state.failures, state.latency = active, requests, failures, latency
            state.ejected_until = now + ejected_for if ejected_for else 0.0
            state.ejections = ejections

    async def _send(self, index: int, message: tuple) -> None:
        channel = self._channels.get(index)
        if channel is None:
            return
        try:
            await channel.send(message, large=message[0] == "config")
        except ConnectionError as exc:
            log.warning("worker %d: cannot send %s: %s", index, message[0], exc)

    async def apply(self, version: int, config: ir.IR) -> dict:
        """Send a configuration to every worker; the listeners any of them could not open (with why)."""
        self._config = (version, config)
        errors: dict = {}
        results = await asyncio.gather(*(self._apply_one(i, version, config) for i in list(self._channels)))
        for found in results:
            errors.update(found)
        return errors

    async def _apply_one(self, index: int, version: int, config: ir.IR) -> dict:
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[index] = waiter
        await self._send(index, ("config", version, config))
        for key, state in self.registry.endpoints.items():  # verdicts so far, for a worker that just started
            for check, healthy in state.check_results.items():
                if not healthy:
                    await self._send(index, ("health", key[0], key[1], check, healthy))
        try:
            async with asyncio.timeout(APPLY_TIMEOUT):
                return await waiter
        except TimeoutError:
            log.error("worker %d did not apply config version %d within %.0f s", index, version, APPLY_TIMEOUT)
            return {}

    def listener_errors(self) -> dict:
        """The sockets some worker could not open, with the reason."""
        errors: dict = {}
        for found in self._worker_errors.values():
            errors.update(found)
        return errors

    def health_changed(self, address: str, port: int, check: ir.HealthCheck, healthy: bool) -> None:
        for index in list(self._channels):
            asyncio.get_running_loop().create_task(self._send(index, ("health", address, port, check, healthy)))

    async def _supervise(self) -> None:
        """Start a worker again when one dies (not while stopping)."""
        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, proc in list(self._procs.items()):
                if proc.is_alive() or self._stopping:
                    continue
                log.error("worker %d (pid %d) exited with %s: starting it again", index, proc.pid, proc.exitcode)
                from tidegate.observe.metrics import METRICS

                METRICS.retire_worker(index)
                self._endpoint_stats.pop(index, None)
                self._channels.pop(index).close()
                await self._spawn(index)
                if self._config is not None:
                    asyncio.get_running_loop().create_task(self._apply_one(index, *self._config))

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    async def stop(self, grace: float) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        deadline = time.monotonic() + grace + 5
        sends = [asyncio.ensure_future(self._send(index, ("stop", grace))) for index in list(self._channels)]
        # A worker that reads nothing (still starting, or stuck) must not hold the stop up: it is killed below.
        await asyncio.wait(sends, timeout=5)
        for proc in self._procs.values():
            await asyncio.get_running_loop().run_in_executor(None, proc.join, max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for channel in self._channels.values():
            channel.close()


def _socket_of(conn: Connection) -> socket.socket:
    """The socket under a multiprocessing Pipe end (a socket pair on Linux), for the event loop to drive."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    return sock


# -- a worker process ------------------------------------------------------------------------------------

def worker_main(conn: Connection, index: int, options: WorkerOptions) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the control process decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=options.log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    try:
        import uvloop

        uvloop.run(_serve(conn, index, options))
    except ImportError:
        asyncio.run(_serve(conn, index, options))


async def _serve(conn: Connection, index: int, options: WorkerOptions) -> None:
    from tidegate.dataplane.guard import LAG, SHARE
    from tidegate.dataplane.l4 import TRANSPARENCY
    from tidegate.dataplane.server import DataPlane, freeze_startup_heap
    from tidegate.observe import accesslog
    from tidegate.observe.metrics import METRICS

    accesslog.ACCESS_LOG = accesslog.AccessLog(options.access_log, options.access_log_file,
                                               options.access_log_sample, options.access_log_status)
    for deadline in fields(Deadlines):  # in place: the data plane's modules hold this object
        setattr(DEADLINES, deadline.name, getattr(options.deadlines, deadline.name))
    TRANSPARENCY.enabled = options.transparent
    if options.acme_dir:
        acme_challenge.DIR = Path(options.acme_dir) / "challenges"
    SHARE.workers = max(1, options.workers)
    LAG.start()
    SHARE.replicas = max(1, options.rate_limit_replicas)
    if options.rate_limit_redis:
        from tidegate.dataplane import redis_limits

        redis_limits.LIMITER = redis_limits.RedisLimiter(options.rate_limit_redis, options.rate_limit_redis_timeout)
        redis_limits.LIMITER.start()
    descriptors.raise_limit()
    fd_watch = asyncio.get_running_loop().create_task(descriptors.watch())
    dataplane = DataPlane(bind=options.bind, reuse_port=True, health_checks=False)
    dataplane.registry.zone = options.zone
    loop = asyncio.get_running_loop()
    heartbeat = None
    if options.node and options.heartbeat_port:
        from tidegate.announce.members import start_responder

        try:
            heartbeat = await start_responder(options.node, options.heartbeat_port, options.incarnation)
        except OSError as exc:
            logging.getLogger("tidegate.workers").error("worker %d: cannot answer heartbeats on port %d: %s", index,
                                                        options.heartbeat_port, exc)
    inbox: asyncio.Queue = asyncio.Queue()

    def stats() -> tuple:
        METRICS.tasks.set(len(asyncio.all_tasks()))
        now = time.monotonic()
        endpoints = {key: (s.active, s.requests, s.failures, list(s.latency), max(0.0, s.ejected_until - now),
                           s.ejections) for key, s in dataplane.registry.endpoints.items()}
        return ("stats", METRICS.snapshot(), endpoints)

    async def received(message: tuple) -> None:
        if message[0] == "report":  # answered at once, even while a configuration is being applied
            loop.create_task(send_stats())
        else:
            inbox.put_nowait(message)

    async def send_stats() -> bool:
        try:
            await channel.send(stats())
            return True
        except ConnectionError:
            return False

    # When the control process is gone, so are we.
    channel = await Channel.open(_socket_of(conn), received, lambda: inbox.put_nowait(("stop", 0.0)))

    async def send_quietly(message: tuple) -> None:
        try:
            await channel.send(message)
        except ConnectionError:
            pass

    # A socket that opened at last (DataPlane._retry_binds): the control process updates status and readiness.
    dataplane.on_errors = lambda errors: loop.create_task(send_quietly(("listeners", errors)))

    async def report() -> None:
        while await send_stats():
            await asyncio.sleep(STATS_INTERVAL)

    reporter = loop.create_task(report())
    grace = 0.0
    while True:
        message = await inbox.get()
        kind = message[0]
        if kind == "config":
            _, version, config = message
            try:
                errors = await dataplane.apply(config)
            except Exception:  # keep serving the last good configuration
                logging.getLogger("tidegate.workers").exception("worker %d: config %d not applied", index, version)
                errors = {}
            try:
                await channel.send(("applied", version, errors))
            except ConnectionError:
                break
            freeze_startup_heap()
        elif kind == "health":
            _, address, port, check, healthy = message
            dataplane.registry.endpoint(address, port).set_check(check, healthy)
        elif kind == "stop":
            grace = message[1]
            break
    reporter.cancel()
    fd_watch.cancel()
    if heartbeat is not None:
        heartbeat.close()  # other nodes take over this node's addresses while its connections drain
    await dataplane.close(grace=grace)
    if accesslog.ACCESS_LOG is not None:
        accesslog.ACCESS_LOG.close()
    if await send_stats():
        await channel.flush(timeout=2.0)
    os._exit(0)
