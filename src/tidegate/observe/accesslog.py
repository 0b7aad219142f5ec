"""Access logs: JSON lines, or Common/Combined Log Format, written in batches off the request path.

A request appends its line to a list; the batch is written when it reaches BATCH lines or `interval` seconds
after its first, and `close()` writes what is left, so no line is lost on a graceful stop. Sampling and a status
filter decide before anything is kept.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import IO, Final

# C when available: a JSON string literal, as json.dumps writes. Module constants are Final: compiled
# (setup.py), a Final name is read directly, any other through the module's dict.
_quote: Final = json.encoder.encode_basestring_ascii
# JSON string literals of the values that repeat from line to line (methods, hosts, routes, listeners,
# endpoints, client addresses): a lookup instead of encoding them again. Emptied when it grows past QUOTED_MAX.
_quoted: Final[dict[str, str]] = {}
QUOTED_MAX: Final = 4096
_MILLIS: Final = [f"{i:03d}" for i in range(1000)]  # "000" to "999": fractions written without a format spec


def _quote_repeated(text: str) -> str:
    quoted = _quoted.get(text)
    if quoted is None:
        if len(_quoted) >= QUOTED_MAX:
            _quoted.clear()
        quoted = _quoted[text] = _quote(text)
    return quoted


def _milliseconds(seconds: float) -> str:
    """Seconds as milliseconds with three decimals ("0.512"), from integer arithmetic: compiled, a format spec
    costs a generic call, and this line is written for every request."""
    micros = int(seconds * 1_000_000 + 0.5)
    return f"{micros // 1000}.{_MILLIS[micros % 1000]}"


FORMATS = ("json", "clf", "combined")
CHOICES = (*FORMATS, "off")  # per Gateway (annotation tidegate.io/access-log) or globally (--access-log)
BATCH: Final = 128  # lines written together at most


class Entry:
    """One request's line, before it is formatted. A plain class: compiled (setup.py), making one is a C call,
    where a NamedTuple's constructor runs as Python."""

    __slots__ = ("bytes_sent", "client", "duration", "endpoint", "host", "listener", "method", "policy", "proto",
                 "referer", "request_id", "retries", "route", "sni", "status", "target", "time", "upstream_duration",
                 "user_agent")

    def __init__(self, time: float, client: str, method: str, host: str, target: str, proto: str, status: int,
                 bytes_sent: int, duration: float, upstream_duration: float, route: str, listener: str,
                 endpoint: str, retries: int, sni: str, request_id: str, referer: str, user_agent: str,
                 policy: str = ""):
        self.time = time
        self.client = client
        self.method = method
        self.host = host
        self.target = target
        self.proto = proto
        self.status = status
        self.bytes_sent = bytes_sent
        self.duration = duration
        self.upstream_duration = upstream_duration
        self.route = route
        self.listener = listener
        self.endpoint = endpoint
        self.retries = retries
        self.sni = sni
        self.request_id = request_id
        self.referer = referer
        self.user_agent = user_agent
        self.policy = policy  # the TrafficPolicy rule that refused the request ("" when none did)


def parse_status_filter(spec: str) -> tuple[int, int] | None:
    """"400-599" or "500" → an inclusive range; "" → no filter."""
    if not spec:
        return None
    low, _, high = spec.partition("-")
    if not low.isdigit() or (high and not high.isdigit()):
        raise ValueError(f"status filter {spec!r} is not N or N-M")
    return int(low), int(high or low)


class _Stamp:
    """A log format's time stamp to the second, made with strftime once per second of log time, not once per
    line."""

    __slots__ = ("pattern", "second", "text")

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.second = -1
        self.text = ""

    def of(self, when: float) -> str:
        second = int(when)
        if second != self.second:
            self.second = second
            self.text = time.strftime(self.pattern, time.gmtime(second))
        return self.text


class AccessLog:
    def __init__(self, fmt: str = "json", path: str = "-", sample: float = 1.0, statuses: str = "",
                 interval: float = 0.2):
        if fmt not in CHOICES:
            raise ValueError(f"access log format {fmt!r}: use one of {', '.join(CHOICES)}")
        if not 0.0 < sample <= 1.0:
            raise ValueError("access log sample must be in (0, 1]")
        self.format = fmt
        self.sample = sample
        self.statuses = parse_status_filter(statuses)
        self.interval = interval
        self._out: IO[str] = sys.stdout if path == "-" else open(path, "a", buffering=1 << 16)  # noqa: SIM115
        self._pending: list[str] = []  # lines
        # Listener name → format, for Gateways that choose their own (set with each configuration).
        self.by_listener: dict[str, str] = {}
        self.quiet: frozenset[str] = frozenset()  # rules that log nothing (an Ingress's enable-access-log: false)
        self.is_active = fmt != "off"  # cached `active`, read per request
        self._task: asyncio.Task | None = None
        self._json_time = _Stamp("%Y-%m-%dT%H:%M:%S")
        self._clf_time = _Stamp("%d/%b/%Y:%H:%M:%S +0000")
        self._wall_offset = time.time() - time.monotonic()  # read again with each batch (wall_time)

    @property
    def active(self) -> bool:
        """Is anything logged at all (globally, or by some Gateway)?"""
        return self.format != "off" or any(f != "off" for f in self.by_listener.values())

    def set_listeners(self, formats: dict[str, str]) -> None:
        self.by_listener = formats
        self.is_active = self.active

    def set_quiet(self, routes: set[str]) -> None:
        self.quiet = frozenset(routes)

    def wants(self, status: int, listener: str = "", route: str = "") -> str:
        """The format to log this response in, or "" when it is not logged (off, a quiet rule, filtered, not
        sampled)."""
        fmt = self.by_listener.get(listener, self.format) if self.by_listener else self.format
        if fmt == "off" or (self.quiet and route in self.quiet):
            return ""
        if self.statuses is not None and not self.statuses[0] <= status <= self.statuses[1]:
            return ""
        return fmt if self.sample >= 1.0 or random.random() < self.sample else ""

    def wall_time(self, monotonic: float) -> float:
        """The wall-clock time of a time.monotonic() reading. The offset between the two clocks is read when
        a batch starts, so a request reads one clock, not both, and a clock step shows within a batch."""
        return monotonic + self._wall_offset

    def record(self, entry: Entry, fmt: str = "") -> None:
        """Keep the entry's line for the next batch. It is formatted now, while what it reads is fresh in the
        CPU's caches, and the entry is freed at once."""
        self._keep(self.format_entry(entry, fmt))

    def record_connection(self, started: float, client: str, protocol: str, listener: str, route: str,
                          endpoint: str, sni: str, bytes_in: int, bytes_out: int, duration: float, outcome: str,
                          datagrams_in: int = -1, datagrams_out: int = -1) -> None:
        """One TCP connection or UDP session of an L4 listener, when it ends: a JSON line (the Common Log
        Format has no fields for it, so clf and combined log none). `started` is a time.monotonic() reading;
        `outcome` is "closed", "idle-timeout", "reset", "shutdown", or why it was refused ("no-route", ...).
        With a status filter, only refused connections are logged (they are the errors)."""
        fmt = self.by_listener.get(listener, self.format) if self.by_listener else self.format
        if fmt != "json":
            return
        if self.statuses is not None and outcome in ("closed", "idle-timeout", "shutdown"):
            return
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        when = self.wall_time(started)
        udp = (f',"datagrams_in":{datagrams_in},"datagrams_out":{datagrams_out}' if datagrams_in >= 0 else "")
        self._keep(f'{{"time":"{self._json_time.of(when)}.{_MILLIS[int(when * 1000) % 1000]}Z",'
                   f'"client":{_quote_repeated(client)},"protocol":{_quote_repeated(protocol)},'
                   f'"listener":{_quote_repeated(listener)},"route":{_quote_repeated(route)},'
                   f'"endpoint":{_quote_repeated(endpoint)},"sni":{_quote_repeated(sni)},'
                   f'"bytes_in":{bytes_in},"bytes_out":{bytes_out}{udp},'
                   f'"duration_ms":{_milliseconds(duration)},"outcome":{_quote_repeated(outcome)}}}\n')

    def _keep(self, line: str) -> None:
        self._pending.append(line)
        if len(self._pending) >= BATCH:
            self.flush()  # small batches: a big one written at once stalls every request behind it (p99)
        elif self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_later())
            self._wall_offset = time.time() - time.monotonic()

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.interval)
        self._task = None
        self.flush()

    def flush(self) -> None:
        batch, self._pending = self._pending, []
        self._wall_offset = time.time() - time.monotonic()
        if batch:
            self._out.write("".join(batch))
            self._out.flush()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.flush()
        if self._out is not sys.stdout:
            self._out.close()

    def format_entry(self, e: Entry, fmt: str = "") -> str:
        fmt = fmt or self.format
        if fmt == "json":
            # The same JSON object json.dumps would write, put together directly: strings through the C
            # string encoder (repeated ones looked up), numbers as they are, no format specs (a log line costs
            # half a µs compiled, not several).
            return (f'{{"time":"{self._json_time.of(e.time)}.{_MILLIS[int(e.time * 1000) % 1000]}Z",'
                    f'"client":{_quote_repeated(e.client)},"method":{_quote_repeated(e.method)},'
                    f'"host":{_quote_repeated(e.host)},"path":{_quote(e.target)},'
                    f'"protocol":{_quote_repeated(e.proto)},"status":{e.status},"bytes":{e.bytes_sent},'
                    f'"duration_ms":{_milliseconds(e.duration)},"upstream_ms":{_milliseconds(e.upstream_duration)},'
                    f'"route":{_quote_repeated(e.route)},"listener":{_quote_repeated(e.listener)},'
                    f'"endpoint":{_quote_repeated(e.endpoint)},"retries":{e.retries},"sni":{_quote_repeated(e.sni)},'
                    f'"request_id":{_quote(e.request_id)}'
                    + (f',"policy":{_quote_repeated(e.policy)}}}\n' if e.policy else '}\n'))
        stamp = self._clf_time.of(e.time)
        line = (f'{e.client or "-"} - - [{stamp}] "{e.method} {e.target} {e.proto}" {e.status} '
                f'{e.bytes_sent or "-"}')
        if fmt == "combined":
            line += f' "{e.referer or "-"}" "{e.user_agent or "-"}"'
        return line + "\n"


ACCESS_LOG: AccessLog | None = None  # set by `tidegate run` when access logging is on
