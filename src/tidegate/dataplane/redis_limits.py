"""Global rate limits: GCRA counted in Redis, shared by every worker of every replica.

One small asyncio client per worker process over one connection, replies parsed by hiredis (redis-py's
asyncio client costs ~60 µs of CPU per call: too much for the request path). The checks of one event-loop
turn go to Redis as one EVALSHA of one Lua script, which reads Redis's own clock (`TIME`, so the replicas'
clocks do not matter) and answers, for each key, 0 (admitted) or how many microseconds until it would be.

A busy key is not sent to Redis once per request: each answer is a lease. Redis gives a worker as many of the
key's requests as it asks for and the limit allows at once (GCRA with a quantity: the key's timestamp moves on
by that many intervals), and the worker admits that many more requests of the key by itself for LEASE_SECONDS.
A lease asks for twice what the key used since the last one (1 for a new key, LEASE_MAX at most); what is
left of it when it runs out is given back with the key's next call (the timestamp moves back by that much),
so that no allowance is lost while the key has traffic. A refusal is leased too: until the wait Redis named
has passed, the worker refuses that key's requests without asking (no other request could be admitted
before then, by any replica). So Redis counts exactly what GCRA allows; a flood from one client costs a call
per lease, not per request.

No request waits longer than `timeout` (50 ms by default) on Redis. When Redis is slow, down, or answers
an error, each waiting check gets `None` and the policy's `failMode` decides (Open, Closed,
FallBackToLocal). After 3 failures in a row the breaker opens: Redis is not asked for 1 s (every check gets
`None` at once), then one batch tries again. A lost connection is made again every 0.2 s, so a restarted
Redis is used again within a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from tidegate.observe.metrics import METRICS

log = logging.getLogger("tidegate.ratelimit")

# KEYS: the counts; ARGV, 4 for each: interval and tolerance (µs), the requests wanted, the requests given back
# (leased before and not used). Returns, for each, the requests granted (1 or more), or minus the wait (µs).
SCRIPT = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[4 * i - 3])
  local tolerance = tonumber(ARGV[4 * i - 2])
  local want = tonumber(ARGV[4 * i - 1])
  local back = tonumber(ARGV[4 * i])
  local tat = tonumber(redis.call('GET', key)) or now
  tat = tat - back * interval
  if tat < now then tat = now end
  local room = math.floor((now + tolerance - tat) / interval) + 1
  local granted = 0
  if room >= 1 then
    granted = math.min(want, room)
    out[i] = granted
  else
    out[i] = -(tat - now - tolerance)
  end
  if granted > 0 or back > 0 then
    local new = tat + granted * interval
    redis.call('SET', key, string.format('%d', new), 'PX', math.floor((new - now) / 1000) + 1000)
  end
end
return out
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT).hexdigest().encode()
KEY_PREFIX = "tidegate:rl:"
BREAKER_FAILURES = 3
BREAKER_OPEN_SECONDS = 1.0
RECONNECT_SECONDS = 0.2
MAX_BATCH = 512  # checks in one script call
LEASE_SECONDS = 0.025  # how long a worker may admit a lease's requests by itself
LEASE_MAX = 256  # requests one lease asks for at most
LEASES_MAX = 100_000  # keys with a lease, past which the run-out ones are forgotten


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%b\r\n" % (len(part), part))
    return b"".join(out)


def redis_key(rule: str, key: str) -> bytes:
    whole = f"{KEY_PREFIX}{rule}\x1f{key}"
    if len(whole) > 200:  # a long header value: its hash, so that keys stay small
        whole = f"{KEY_PREFIX}{rule}\x1f#{hashlib.sha1(key.encode()).hexdigest()}"
    return whole.encode()


Answer = Callable[[Any], None]  # called with 0.0 (admitted), the wait in seconds, or None (no word from Redis)


class _Lease:
    """What a worker holds of one key's allowance: requests it may admit until `until`, or a refusal until
    `refused_until`; `used`, the key's requests since it last asked Redis (the next lease's size)."""

    __slots__ = ("refused_until", "units", "until", "used")

    def __init__(self) -> None:
        self.units = 0
        self.until = 0.0
        self.refused_until = 0.0
        self.used = 0


class _Batch:
    __slots__ = ("answers", "decided", "keys", "leases", "sent", "timer")

    def __init__(self) -> None:
        self.keys: list[tuple[bytes, int, int, int, int]] = []
        self.leases: list[_Lease] = []
        self.answers: list[Answer] = []
        self.decided = False
        self.sent = 0.0
        self.timer: asyncio.TimerHandle | None = None


class RedisLimiter(asyncio.Protocol):
    def __init__(self, url: str, timeout: float = 0.05):
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"{url!r}: a Redis URL is redis://HOST:PORT/DB or rediss://...")
        self.url = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.strip("/") or 0)
        self.password = unquote(parts.password) if parts.password else ""
        self.username = unquote(parts.username) if parts.username else ""
        self.tls = parts.scheme == "rediss"
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.replies: deque[_Batch | None] = deque()  # what each reply answers (None: a setup command's)
        self.open: _Batch | None = None  # checks gathered in this loop turn
        self.failures = 0
        self.breaker_until = 0.0
        self.up = False
        self.closing = False
        self.task: asyncio.Task[None] | None = None
        self.problem = ""
        self.leases: dict[bytes, _Lease] = {}

    # -- the request path's side ----------------------------------------------------------------------
    def leased(self, key: bytes, now: float) -> float:
        """What this worker's lease of `key` says of one more request, with no call: 0.0 (admitted: a request of
        the lease taken), the wait in seconds (refused until then), or -1.0 (Redis must be asked: `ask`)."""
        lease = self.leases.get(key)
        if lease is None:
            return -1.0
        lease.used += 1
        if lease.units > 0 and now < lease.until:
            lease.units -= 1
            return 0.0
        if now < lease.refused_until:
            return lease.refused_until - now
        return -1.0

    def ask(self, key: bytes, interval: float, tolerance: float, answer: Answer, leased: bool = False) -> None:
        """Count a request: `answer` is called with 0.0 (admitted), the wait in seconds (refused), or None
        (Redis could not say in time: the fail mode decides); at once when Redis is known to be away, else
        when the reply (or the timeout) comes; at once too while this worker holds a lease of the key (the
        module's docstring). No future and no task per request: this is the request path."""
        now = time.monotonic()
        if not leased:  # (`leased` True: the caller asked `leased` already, and it said -1.0)
            wait = self.leased(key, now)
            if wait >= 0.0:
                answer(wait)
                return
        lease = self.leases.get(key)
        if not self.up or (self.breaker_until and now < self.breaker_until):
            answer(None)
            return
        if lease is None:
            if len(self.leases) >= LEASES_MAX:
                self._forget_leases(now)
            lease = self.leases[key] = _Lease()
            lease.used = 1
        back, lease.units = lease.units, 0  # what is left of a lease that ran out: given back
        want = min(LEASE_MAX, 2 * lease.used)
        lease.used = 0
        batch = self.open
        if batch is None or len(batch.keys) >= MAX_BATCH:
            batch = self.open = _Batch()
            asyncio.get_running_loop().call_soon(self._send, batch)
        # Counted in whole µs: a limit over a million requests a second per key counts as a million.
        batch.keys.append((key, max(1, round(interval * 1e6)), round(tolerance * 1e6), want, back))
        batch.leases.append(lease)
        batch.answers.append(answer)

    def _forget_leases(self, now: float) -> None:
        """Too many keys: forget the leases that ran out (their unused requests are not given back), or all."""
        self.leases = {k: v for k, v in self.leases.items() if now < v.until or now < v.refused_until}
        if len(self.leases) >= LEASES_MAX // 2:
            self.leases = {}

    def check(self, key: bytes, interval: float, tolerance: float, leased: bool = False
              ) -> asyncio.Future[float | None]:
        """`ask`, for a caller that awaits."""
        future: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()

        def answer(wait: Any) -> None:
            if not future.done():
                future.set_result(wait)

        self.ask(key, interval, tolerance, answer, leased)
        return future

    def _send(self, batch: _Batch) -> None:
        if self.open is batch:
            self.open = None
        if self.transport is None or not self.up:
            self._fail(batch, "not connected")
            return
        args = [b"EVALSHA", SCRIPT_SHA, b"%d" % len(batch.keys)]
        args += [key for key, _, _, _, _ in batch.keys]
        for _, interval, tolerance, want, back in batch.keys:
            args += [b"%d" % interval, b"%d" % tolerance, b"%d" % want, b"%d" % back]
        self.transport.write(_command(*args))
        batch.sent = time.monotonic()
        batch.timer = asyncio.get_running_loop().call_later(self.timeout, self._expire, batch)
        self.replies.append(batch)

    def _expire(self, batch: _Batch) -> None:
        """No answer within the timeout: the checks go on without Redis (the reply, if it comes, is dropped)."""
        self._fail(batch, f"no answer within {self.timeout * 1000:g} ms")

    def _fail(self, batch: _Batch, why: str) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if not batch.decided:
            batch.decided = True
            for answer in batch.answers:
                _call(answer, None)
            METRICS.redis_failures.labels(why.split(" ")[0]).inc()
            self.failures += 1
            if self.failures >= BREAKER_FAILURES and not self.breaker_until:
                log.warning("global rate limits: Redis %s failed %d times in a row (%s): not asked for %g s",
                            self.url, self.failures, why, BREAKER_OPEN_SECONDS)
            if self.failures >= BREAKER_FAILURES:
                self.breaker_until = time.monotonic() + BREAKER_OPEN_SECONDS

    # -- the connection -------------------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._keep_connected())

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        said = ""
        while not self.closing:
            if self.transport is None:
                try:
                    context = ssl.create_default_context() if self.tls else None
                    await asyncio.wait_for(loop.create_connection(lambda: self, self.host, self.port, ssl=context),
                                           timeout=1.0)
                except (OSError, TimeoutError, ssl.SSLError) as exc:
                    why = f"cannot connect to Redis {self.url}: {exc or type(exc).__name__}"
                    if why != said:
                        log.warning("global rate limits: %s (each rule's failMode applies; trying again)", why)
                        said = why
                    self.problem = why
                else:
                    said = ""
            await asyncio.sleep(RECONNECT_SECONDS)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        setup = []
        if self.password:
            setup.append(_command(b"AUTH", *([self.username.encode()] if self.username else []),
                                  self.password.encode()))
        if self.db:
            setup.append(_command(b"SELECT", b"%d" % self.db))
        setup.append(_command(b"SCRIPT", b"LOAD", SCRIPT))
        for command in setup:
            transport.write(command)  # type: ignore[attr-defined]
            self.replies.append(None)
        self.up = True
        self.failures = 0
        self.breaker_until = 0.0
        self.problem = ""
        METRICS.redis_up.set(1)
        log.info("global rate limits: connected to Redis %s", self.url)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            batch = self.replies.popleft() if self.replies else None
            if batch is None:
                if isinstance(reply, hiredis.ReplyError):
                    log.error("global rate limits: Redis %s refused the setup: %s", self.url, reply)
                    self.problem = f"Redis refused the setup: {reply}"
                    self.up = False
                continue
            if batch.timer is not None:
                batch.timer.cancel()
                batch.timer = None
            if isinstance(reply, hiredis.ReplyError) or not isinstance(reply, list) \
                    or len(reply) != len(batch.answers):
                if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT") \
                        and self.transport is not None:  # its scripts were flushed: load ours again
                    self.transport.write(_command(b"SCRIPT", b"LOAD", SCRIPT))
                    self.replies.append(None)
                self._fail(batch, f"error {reply}")
                continue
            if batch.decided:  # too late: the fail mode has decided already
                continue
            batch.decided = True
            now = time.monotonic()
            METRICS.redis_seconds.observe(now - batch.sent)
            self.failures = 0
            self.breaker_until = 0.0
            for answer, lease, granted in zip(batch.answers, batch.leases, reply, strict=True):
                if granted > 0:  # this request, and the rest for the lease
                    lease.units += granted - 1
                    lease.until = now + LEASE_SECONDS
                    _call(answer, 0.0)
                else:
                    wait = -granted / 1e6
                    lease.refused_until = now + wait
                    _call(answer, wait)

    def connection_lost(self, exc: Exception | None) -> None:
        was_up = self.up
        self.transport = None
        self.up = False
        METRICS.redis_up.set(0)
        while self.replies:
            batch = self.replies.popleft()
            if batch is not None:
                self._fail(batch, "connection lost")
        if was_up and not self.closing:
            log.warning("global rate limits: lost the connection to Redis %s (each rule's failMode applies; "
                        "reconnecting)", self.url)

    def close(self) -> None:
        self.closing = True
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.close()


def _call(answer: Answer, wait: Any) -> None:
    """One request's answer: a bug in what it goes on to do must not keep the batch's others waiting."""
    try:
        answer(wait)
    except Exception:  # noqa: BLE001
        log.exception("internal error after a global rate-limit answer")


LIMITER: Any = None  # the worker's RedisLimiter, with --rate-limit-redis
