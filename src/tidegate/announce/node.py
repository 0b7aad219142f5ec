"""The node agent's Layer 2 side (`tidegate run --node NAME`): after each translation and each change in which
nodes are up, compute who announces what (election.py) and announce this node's share (l2.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tidegate.announce.election import Candidacy, assign
from tidegate.announce.l2 import L2Speaker
from tidegate.announce.members import Membership

log = logging.getLogger("tidegate.announce")


class Layer2Agent:
    def __init__(self, node: str, heartbeat_port: int, node_timeout: float = 2.0, heartbeat_interval: float = 0.2,
                 refresh: float = 10.0, incarnation: str = ""):
        self.node = node
        self.speaker = L2Speaker(refresh=refresh)
        self.members = Membership(node, heartbeat_port, heartbeat_interval, node_timeout, self._changed,
                                  incarnation)
        self.candidacies: list[Candidacy] = []
        self.assignment: dict[str, str] = {}
        self.since: dict[str, float] = {}  # address -> when its current node took it (as this node saw it)
        self._wake = asyncio.Event()
        self._live: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.speaker.start()
        await self.members.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def leave(self) -> None:
        """A clean stop begins: the other nodes take this node's addresses now; it stops answering for them
        but keeps their routes while its connections drain (close() removes them)."""
        if self._task is not None:
            self._task.cancel()
        self.members.leave()
        self.speaker.quiesce()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.members.close()
        await self.speaker.close()

    def update(self, candidacies: list[Candidacy], nodes: list[Any]) -> None:
        """A new translation: the addresses to announce in Layer 2 and the nodes (translate.loadbalancers)."""
        self.candidacies = candidacies
        peers = {n.name: n.address for n in nodes if n.usable}
        if self.node in peers and not peers[self.node]:
            peers[self.node] = "127.0.0.1"  # no address known for this node: its own workers still answer
        if self.node not in {n.name for n in nodes}:
            log.warning("node %s is not among the Node objects: it announces nothing", self.node)
        self.members.set_peers(peers)
        self._changed()

    def _changed(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._apply()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the announcements already made
                log.exception("announcements not updated")

    async def _apply(self) -> None:
        live = self.members.live()
        # A node that comes back (a mended link, say) may have held its addresses all along in its own view,
        # while the segment learnt another node's MAC for them: on any change in who is up, every node tells
        # the segment again what it holds.
        rejoined = live != self._live
        self._live = live
        assignment = assign(self.candidacies, live)
        now = time.time()
        for address, node in assignment.items():
            if self.assignment.get(address) != node:
                self.since[address] = now
        self.since = {a: t for a, t in self.since.items() if a in assignment}
        self.assignment = assignment
        by_address = {c.address: c for c in self.candidacies}
        mine = {a: by_address[a].interfaces_of(self.node) for a, n in assignment.items() if n == self.node}
        await self.speaker.apply(mine, reannounce=rejoined)

    def status(self) -> list[dict[str, Any]]:
        """Each Layer 2 address: its Services, the node announcing it and since when (as this node sees it)."""
        held = self.speaker.status()
        out = []
        for c in sorted(self.candidacies, key=lambda c: c.address):
            node = self.assignment.get(c.address, "")
            entry: dict[str, Any] = {"address": c.address, "services": list(c.services), "node": node or None,
                                     "candidates": list(c.nodes),
                                     "since": _iso(self.since[c.address]) if c.address in self.since else None}
            if c.address in held:
                entry["interfaces"] = held[c.address]["interfaces"]
            out.append(entry)
        return out

    def nodes(self) -> list[dict[str, Any]]:
        live = self.members.live()
        return [{"node": n, "address": a, "up": n in live,
                 "since": _iso(self.members.since[n]) if n in self.members.since else None}
                for n, a in sorted(self.members.peers.items())]


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
