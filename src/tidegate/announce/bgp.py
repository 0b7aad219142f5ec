"""BGP announcements (`tidegate run --node`): this node's plan (bgp_plan.py) spoken to the routers.

The BGP itself is ExaBGP 5's (a maintained implementation, run as a child process), behind the small `Speaker`
interface so that another could take its place:

- tidegate writes ExaBGP's configuration (one `neighbor` per session) and starts `exabgp server` with an API
  process (exabgp_bridge.py) that relays commands and events over a Unix socket;
- tidegate keeps what each session must carry and sends it when the session comes up (then End-of-RIB, sent
  by hand so that a router that kept our routes through a graceful restart drops none of them early), and the
  differences after each change: `announce route ... next-hop self` with LOCAL_PREF, communities, large
  communities and the Link Bandwidth extended community; `withdraw route` for what is gone. ExaBGP keeps no
  copy (`adj-rib-out false`): tidegate's is the one that counts. New weights of a route already announced
  replace it (no withdraw) after a second's debounce, so that pods rolling out send a few updates, not one
  per pod;
- a change of sessions rewrites the configuration and reloads ExaBGP (SIGUSR1); unchanged sessions stay up;
- ExaBGP dies with tidegate (PR_SET_PDEATHSIG): a killed node's sessions close at once, and its routes go
  (unless the peer kept them for a graceful restart). A stop closes them with a Cease, or, when a session
  asked for graceful restart, drops the connection without one so that the router keeps the routes until
  the next start sends them again;
- ExaBGP missing or crashing is reported (status, metrics, log) and retried with backoff; the data plane
  does not depend on it.

Every address this node announces also gets a local route (`table local proto 116 metric 1`, beside Layer 2's
metric 0) so that the node accepts the traffic the routers send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tidegate.announce.bgp_plan import BGPPlan, BGPRoute, BGPSession

log = logging.getLogger("tidegate.bgp")

ROUTE_PROTO = 116
ROUTE_METRIC = 1  # Layer 2's local routes have metric 0: both may hold one address
LOCAL_TABLE = 255
GRACEFUL_RESTART_TIME = 120  # seconds a router keeps our routes after the session drops, when asked
BACKOFF_MAX = 30.0
LOGGED = 5  # prefixes named in one log line
WEIGHT_DEBOUNCE = 1.0  # seconds new attributes of an announced prefix wait, so that a rollout sends few updates


@dataclass
class SessionState:
    name: str
    peer_address: str
    state: str = "idle"  # idle | connecting | up | down
    since: float = 0.0  # time.time() of the last change
    routes: int = 0  # prefixes announced on it now
    last_error: str = ""


NOTIFICATIONS = {  # RFC 4271 section 4.5, RFC 4486 (Cease)
    (1, 0): "message header error", (2, 0): "OPEN message error", (2, 1): "unsupported version number",
    (2, 2): "Bad Peer AS", (2, 3): "bad BGP identifier", (2, 4): "unsupported optional parameter",
    (2, 6): "unacceptable hold time", (2, 7): "unsupported capability", (3, 0): "UPDATE message error",
    (4, 0): "hold timer expired", (5, 0): "finite state machine error", (6, 0): "Cease",
    (6, 1): "Cease: maximum number of prefixes reached", (6, 2): "Cease: administrative shutdown",
    (6, 3): "Cease: peer de-configured", (6, 4): "Cease: administrative reset",
    (6, 5): "Cease: connection rejected", (6, 6): "Cease: other configuration change",
    (6, 7): "Cease: connection collision resolution", (6, 8): "Cease: out of resources",
}


class Speaker(Protocol):
    async def start(self) -> None: ...

    async def apply(self, sessions: list[BGPSession], routes: dict[str, tuple[BGPRoute, ...]]) -> None: ...

    def sessions(self) -> list[SessionState]: ...

    async def close(self) -> None: ...


# -- ExaBGP's language ------------------------------------------------------------------------------------

def local_address_for(peer: str) -> str:
    """The address this host would use to reach `peer` (a routing lookup; nothing is sent)."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((peer, 179))
        return str(probe.getsockname()[0])


def fallback_router_id(node: str) -> str:
    """A stable router ID for a node with no IPv4 address known: from its name, in 240.0.0.0/4 (reserved,
    never routed, so never someone's address)."""
    digest = int.from_bytes(hashlib.sha256(node.encode()).digest()[:4], "big")
    return str(ipaddress.IPv4Address(0xF0000000 | (digest & 0x0FFFFFFF)))


def exabgp_config(sessions: list[BGPSession], local_addresses: dict[str, str], router_id: str,
                  bridge: list[str]) -> str:
    """ExaBGP's configuration for `sessions` (local_addresses: session name -> source address)."""
    lines = ["process tidegate {", f"    run {' '.join(bridge)};", "    encoder json;", "}", ""]
    for session in sessions:
        family = "ipv6" if ":" in session.peer_address else "ipv4"
        local = session.source_address or local_addresses.get(session.name, "") or "auto"
        lines += [f"neighbor {session.peer_address} {{",
                  f'    description "{session.name}";',
                  f"    router-id {session.router_id or router_id};",
                  f"    local-address {local};",
                  f"    local-as {session.my_asn};",
                  f"    peer-as {session.peer_asn};",
                  f"    hold-time {session.hold_time};",
                  "    group-updates false;",
                  "    adj-rib-out false;",
                  "    manual-eor true;"]
        if session.peer_port != 179:
            lines.append(f"    connect {session.peer_port};")
        if session.password:
            escaped = session.password.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'    md5-password "{escaped}";')
        if session.ebgp_multihop:
            lines.append("    outgoing-ttl 255;")
        lines += [f"    family {{ {family} unicast; }}"]
        if session.graceful_restart:
            lines.append(f"    capability {{ graceful-restart {GRACEFUL_RESTART_TIME}; }}")
        lines += ["    api { processes [ tidegate ]; neighbor-changes; receive { parsed; notification; } }", "}", ""]
    return "\n".join(lines)


def announce_command(peer: str, route: BGPRoute) -> str:
    parts = [f"neighbor {peer} announce route {route.prefix} next-hop self"]
    if route.local_pref is not None:
        parts.append(f"local-preference {route.local_pref}")
    if route.communities:
        parts.append(f"community [{' '.join(route.communities)}]")
    if route.large_communities:
        parts.append(f"large-community [{' '.join(route.large_communities)}]")
    if route.link_bandwidth is not None:
        parts.append(f"extended-community [bandwidth:{route.link_bandwidth[0]}:{route.link_bandwidth[1]}]")
    return " ".join(parts)


def withdraw_command(peer: str, prefix: str) -> str:
    return f"neighbor {peer} withdraw route {prefix} next-hop self"


def eor_command(peer: str) -> str:
    return f"neighbor {peer} announce eor {'ipv6' if ':' in peer else 'ipv4'} unicast"


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def find_exabgp() -> str | None:
    beside = Path(sys.executable).parent / "exabgp"
    return str(beside) if beside.exists() else shutil.which("exabgp")


class ExaBGPSpeaker:
    def __init__(self, router_id: str, exabgp: str | None = None):
        self.router_id = router_id
        self.exabgp = exabgp if exabgp is not None else find_exabgp()
        self.dir = Path(tempfile.mkdtemp(prefix="tidegate-bgp-"))
        self.socket_path = str(self.dir / "api.sock")
        self.config_path = self.dir / "exabgp.conf"
        self.wanted: list[BGPSession] = []
        self.routes: dict[str, tuple[BGPRoute, ...]] = {}
        self.sent: dict[str, dict[str, str]] = {}  # session -> prefix -> the announce command in force
        self.states: dict[str, SessionState] = {}
        self.problem = ""  # why ExaBGP is not running, when it is not
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.base_events.Server | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._started = asyncio.Event()  # a configuration exists: the supervisor may start ExaBGP
        self.debounce = WEIGHT_DEBOUNCE
        self._debouncer: asyncio.TimerHandle | None = None

    # -- life ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._bridged, path=self.socket_path)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        """Stop speaking. Sessions that asked for graceful restart are dropped without a Cease (the routers
        keep the routes until the next start); the others get one and withdraw everything."""
        self._closing = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            graceful = any(s.graceful_restart for s in self.wanted)
            proc.send_signal(signal.SIGKILL if graceful else signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._debouncer is not None:
            self._debouncer.cancel()
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def apply(self, sessions: list[BGPSession], routes: dict[str, tuple[BGPRoute, ...]]) -> None:
        changed = sessions != self.wanted
        self.wanted, self.routes = list(sessions), dict(routes)
        for session in sessions:
            self.states.setdefault(session.name, SessionState(session.name, session.peer_address,
                                                              since=time.time()))
        for name in [n for n in self.states if n not in {s.name for s in sessions}]:
            del self.states[name]
            self.sent.pop(name, None)
        if changed:
            self._write_config()
            if self._proc is not None and self._proc.returncode is None:
                log.info("BGP sessions changed: reloading ExaBGP's configuration")
                self._proc.send_signal(signal.SIGUSR1)
                # Sessions that stay keep their routes; send everything again to be sure (the same
                # announcements change nothing at the router).
                self.sent = {}
            self._started.set()
        self._sync()

    def sessions(self) -> list[SessionState]:
        return [self.states[s.name] for s in self.wanted if s.name in self.states]

    # -- the routes ----------------------------------------------------------------------------------------
    def _sync(self, only: str = "", flush: bool = False) -> None:
        """Send each up session what changed: new and withdrawn prefixes at once; new attributes of a prefix
        already announced (weights as pods come and go) after `debounce` seconds, the last ones only."""
        if self._writer is None:
            return
        for session in self.wanted:
            state = self.states.get(session.name)
            if state is None or state.state != "up" or (only and session.name != only):
                continue
            fresh = session.name not in self.sent
            sent = self.sent.setdefault(session.name, {})
            wanted = {r.prefix: announce_command(session.peer_address, r) for r in self.routes.get(session.name, ())}
            gone = [p for p in sent if p not in wanted]
            changed = [p for p, command in wanted.items() if sent.get(p) != command]
            held = [] if fresh or flush else [p for p in changed if p in sent]
            if held:
                changed = [p for p in changed if p not in held]
                if self._debouncer is None:
                    self._debouncer = asyncio.get_running_loop().call_later(self.debounce, self._flush)
            lines = [withdraw_command(session.peer_address, p) for p in gone] + [wanted[p] for p in changed]
            if fresh:
                lines.append(eor_command(session.peer_address))
            self.sent[session.name] = {**wanted, **{p: sent[p] for p in held}}
            state.routes = len(wanted)
            self._send(lines)
            if gone or changed:
                log.info("BGP session %s: %s", session.name, "; ".join(
                    ([f"announced {', '.join(changed[:LOGGED])}" + (f" and {len(changed) - LOGGED} more"
                                                                     if len(changed) > LOGGED else "")]
                     if changed else [])
                    + ([f"withdrawn {', '.join(gone[:LOGGED])}" + (f" and {len(gone) - LOGGED} more"
                                                                    if len(gone) > LOGGED else "")]
                       if gone else [])))

    def _flush(self) -> None:
        self._debouncer = None
        self._sync(flush=True)

    def _send(self, lines: list[str]) -> None:
        if lines and self._writer is not None:
            for line in lines:
                log.debug("to ExaBGP: %s", line)
            self._writer.write(("\n".join(lines) + "\n").encode())

    # -- ExaBGP ------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        addresses = {}
        for session in self.wanted:
            if not session.source_address:
                try:
                    addresses[session.name] = local_address_for(session.peer_address)
                except OSError as exc:  # no route to the peer yet: ExaBGP finds one when it connects
                    log.warning("BGP session %s: no route to %s yet (%s)", session.name, session.peer_address, exc)
        bridge = [sys.executable, "-m", "tidegate.announce.exabgp_bridge", self.socket_path]
        self.config_path.write_text(exabgp_config(self.wanted, addresses, self.router_id, bridge))
        self.config_path.chmod(0o600)  # passwords

    async def _supervise(self) -> None:
        backoff = 1.0
        await self._started.wait()
        while not self._closing:
            if not self.exabgp:
                self._fail("ExaBGP is not installed (pip install exabgp): no BGP session can be opened")
                return
            started = time.monotonic()
            env = {**os.environ, "exabgp_daemon_drop": "false", "exabgp_daemon_daemonize": "false",
                   "exabgp_api_cli": "false", "exabgp_api_ack": "true", "exabgp_api_respawn": "true",
                   "exabgp_log_destination": "stdout", "exabgp_tcp_bind": "", "exabgp_log_short": "true",
                   "exabgp_daemon_user": "root" if os.geteuid() == 0 else "nobody"}
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    self.exabgp, "server", str(self.config_path), env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, preexec_fn=_die_with_parent)
            except OSError as exc:
                self._fail(f"cannot start ExaBGP ({self.exabgp}): {exc}")
                code = None
            else:
                self.problem = ""
                log.info("ExaBGP started (pid %d) for %d BGP session(s)", self._proc.pid, len(self.wanted))
                await self._read_output(self._proc)
                code = await self._proc.wait()
            if self._closing:
                return
            self.restarts += 1
            for state in self.states.values():
                self._set_state(state, "down", "ExaBGP stopped")
            self.sent = {}
            if time.monotonic() - started > BACKOFF_MAX:
                backoff = 1.0
            self._fail(f"ExaBGP exited ({code}); starting it again in {backoff:.0f} s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _fail(self, message: str) -> None:
        if message != self.problem:
            log.error("%s", message)
        self.problem = message

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if "error" in line.lower():
                log.warning("ExaBGP: %s", line)
            else:
                log.debug("ExaBGP: %s", line)

    async def _bridged(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """ExaBGP's API process connected: commands go to it; its events come back."""
        if self._writer is not None:
            self._writer.close()
        self._writer = writer
        self.sent = {}
        self._sync()
        try:
            async for raw in reader:
                self._event(raw.decode(errors="replace").strip())
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()

    def _event(self, line: str) -> None:
        if not line or line == "done":
            return
        if not line.startswith("{"):
            if line.startswith("error"):
                log.warning("ExaBGP refused a command: %s", line)
            return
        try:
            event = json.loads(line)
        except ValueError:
            return
        neighbor = event.get("neighbor") or {}
        peer = (neighbor.get("address") or {}).get("peer", "")
        state = next((s for s in self.states.values() if s.peer_address == peer), None)
        if state is None:
            return
        if event.get("type") == "state":
            new = {"up": "up", "down": "down", "connected": "connecting"}.get(neighbor.get("state"), "")
            if new:
                self._set_state(state, new, str(neighbor.get("reason") or ""))
        elif event.get("type") == "notification":
            note = neighbor.get("notification") or {}
            code, subcode = note.get("code"), note.get("subcode")
            name = NOTIFICATIONS.get((code, subcode)) or NOTIFICATIONS.get((code, 0)) or f"code {code}/{subcode}"
            text = str(note.get("message") or "").strip()
            direction = "sent" if neighbor.get("direction") == "send" else "received"
            state.last_error = f"{direction} NOTIFICATION: {name}" + (f" ({text})" if text.isprintable() and text
                                                                       else "")
            log.warning("BGP session %s (%s): %s", state.name, state.peer_address, state.last_error)

    def _set_state(self, state: SessionState, new: str, reason: str = "") -> None:
        if state.state == new:
            return
        old, state.state, state.since = state.state, new, time.time()
        if new == "up":
            log.info("BGP session %s (%s) is up", state.name, state.peer_address)
            state.last_error = ""
            self.sent.pop(state.name, None)
            self._sync(only=state.name)
        else:
            if old == "up":
                log.warning("BGP session %s (%s) is %s%s", state.name, state.peer_address, new,
                            f": {reason}" if reason else "")
            if old == "connecting" and reason == "closing connection":
                reason = ("the peer closed the connection before the session was established: it refuses this "
                          "session (its neighbour address or AS for this node?)")
            if reason and "NOTIFICATION" not in state.last_error:  # the NOTIFICATION says more
                state.last_error = reason
            state.routes = 0
            self.sent.pop(state.name, None)


# -- the node's side ---------------------------------------------------------------------------------------

class BGPAgent:
    """The sessions and routes of this node's BGP plan, and the local routes that let it accept the traffic."""

    def __init__(self, node: str, router_id: str, speaker: Speaker | None = None):
        self.node = node
        self.speaker: Speaker = speaker if speaker is not None else ExaBGPSpeaker(router_id)
        self.addresses: set[str] = set()  # with a local route of ours
        self.plan = BGPPlan()

    async def start(self) -> None:
        stale = await asyncio.to_thread(_local_routes, set(), None)
        if stale:
            log.info("removed %d BGP local route(s) a previous run left behind", len(stale))
        await self.speaker.start()

    async def update(self, plan: BGPPlan) -> None:
        self.plan = plan
        wanted = set(plan.addresses)
        if wanted != self.addresses:
            failed = await asyncio.to_thread(_local_routes, wanted, self.addresses)
            for address, message in failed.items():
                log.error("BGP: cannot add the local route of %s: %s", address, message)
            self.addresses = wanted - set(failed)
        await self.speaker.apply(plan.sessions, plan.routes)

    async def close(self) -> None:
        await self.speaker.close()
        await asyncio.to_thread(_local_routes, set(), self.addresses)
        self.addresses = set()

    def status(self) -> dict[str, Any]:
        sessions = self.speaker.sessions()
        return {
            "sessions": [{"name": s.name, "peer": s.peer_address, "state": s.state,
                          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.since)) if s.since else None,
                          "routes": s.routes, **({"lastError": s.last_error} if s.last_error else {})}
                         for s in sessions],
            "routes": routes_view(self.plan),
            "problem": getattr(self.speaker, "problem", ""),
            "restarts": getattr(self.speaker, "restarts", 0),
        }


def routes_view(plan: BGPPlan) -> list[dict[str, Any]]:
    """The plan's routes as the admin API and the dashboard show them: per session and prefix, the next hop
    (the session's source address, else this node's address toward the peer), the Services behind it and,
    with weighting, the pods and the Link Bandwidth they earn."""
    hops = {s.name: s.source_address or "self" for s in plan.sessions}
    return [{"session": name, "prefix": r.prefix, "nextHop": hops.get(name, "self"), "services": list(r.services),
             **({"pods": r.pods} if r.pods is not None else {}),
             **({"linkBandwidth": r.link_bandwidth[1]} if r.link_bandwidth else {}),
             **({"localPref": r.local_pref} if r.local_pref is not None else {}),
             **({"communities": list(r.communities + r.large_communities)}
                if r.communities or r.large_communities else {})}
            for name, routes in plan.routes.items() for r in routes]


def _local_routes(wanted: set[str], have: set[str] | None) -> dict[str, str]:
    """Make the BGP local routes `wanted` (from `have`; None: whatever a previous run left). Returns the
    failures by address; with have=None, the stale routes removed."""
    from pyroute2 import IPRoute

    failed: dict[str, str] = {}
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        if have is None:
            stale = [r.get_attr("RTA_DST") for r in ipr.get_routes(table=LOCAL_TABLE)
                     if r["proto"] == ROUTE_PROTO and r.get_attr("RTA_PRIORITY") == ROUTE_METRIC]
            for address in stale:
                with contextlib.suppress(Exception):
                    _route(ipr, "del", address, lo)
            return {address: "" for address in stale}
        for address in have - wanted:
            with contextlib.suppress(Exception):
                _route(ipr, "del", address, lo)
        for address in wanted - have:
            try:
                _route(ipr, "replace", address, lo)
            except Exception as exc:  # noqa: BLE001 (netlink errors have several types)
                failed[address] = str(exc)
    return failed


def _route(ipr: Any, op: str, address: str, lo: int) -> None:
    v6 = ":" in address
    ipr.route(op, dst=f"{address}/{128 if v6 else 32}", type="local", table=LOCAL_TABLE, oif=lo, proto=ROUTE_PROTO,
              priority=ROUTE_METRIC, family=socket.AF_INET6 if v6 else socket.AF_INET,
              **({} if v6 else {"scope": "host"}))
