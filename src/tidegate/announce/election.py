"""Which node announces which LoadBalancer address in Layer 2 mode: a pure function every node computes alike,
with no write to the API server (MetalLB's way), but spread evenly over the nodes.

MetalLB gives each address to the node that hashes first with it, so one node can carry many addresses (its
issues 439 and 2284). Here the answer is made in two steps:

1. the **baseline**, over every eligible node as if all were up: addresses in a fixed pseudo-random order each
   go to their best-ranked candidate (rendezvous hash of node and address) that still has room (each node
   floor(addresses / nodes), the remainder one more each), else to the least loaded candidate;
2. the addresses whose baseline node is down go, one by one, to the least loaded live candidate (ties by rank).

So a node's loss moves only the addresses it held, spread over the others; its return takes back the same
ones. Preferred nodes (L2Advertisement `preferredNodeSelectors`, summed weights) are tried first at both steps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidacy:
    """One address and the nodes that may announce it, with their preference scores and interfaces."""

    address: str
    nodes: tuple[str, ...]  # eligible: selected by an L2Advertisement, ready, not excluded (Local: has a pod)
    scores: tuple[tuple[str, int], ...] = ()  # preferredNodeSelectors weights per node; absent = 0
    # Interfaces to announce from, per node; () = the ones whose subnet holds the address.
    interfaces: tuple[tuple[str, tuple[str, ...]], ...] = ()
    services: tuple[str, ...] = ()  # "namespace/name", for status and logs

    def score(self, node: str) -> int:
        return dict(self.scores).get(node, 0)

    def interfaces_of(self, node: str) -> tuple[str, ...]:
        return dict(self.interfaces).get(node, ())


def rank(node: str, address: str) -> bytes:
    """Rendezvous rank: lower is better; the same everywhere."""
    return hashlib.sha256(f"{node}#{address}".encode()).digest()


def _order(address: str) -> bytes:
    return hashlib.sha256(address.encode()).digest()


def _best(candidacy: Candidacy, nodes: Iterable[str]) -> list[str]:
    """The candidates among `nodes` with the highest preference score."""
    pool = list(nodes)
    if not pool:
        return []
    top = max(candidacy.score(n) for n in pool)
    return [n for n in pool if candidacy.score(n) == top]


def baseline(candidacies: Iterable[Candidacy]) -> dict[str, str]:
    """address -> node, as if every eligible node were up."""
    items = sorted((c for c in candidacies if c.nodes), key=lambda c: _order(c.address))
    nodes = {n for c in items for n in c.nodes}
    if not items:
        return {}
    # Every node gets floor(addresses / nodes), and the remainder one more each, as long as candidacies allow.
    share, extra = divmod(len(items), len(nodes))
    load: dict[str, int] = dict.fromkeys(nodes, 0)
    out: dict[str, str] = {}
    for c in items:
        best = sorted(_best(c, c.nodes), key=lambda n: rank(n, c.address))
        room = [n for n in best if load[n] < share or (load[n] == share and extra > 0)]
        node = room[0] if room else min(best, key=lambda n: (load[n], rank(n, c.address)))
        if load[node] == share and extra > 0:
            extra -= 1
        out[c.address] = node
        load[node] += 1
    return out


def assign(candidacies: Iterable[Candidacy], live: set[str] | None) -> dict[str, str]:
    """address -> the node that announces it now; an address with no live candidate is left out.
    `live` None: every node counts as up."""
    items = list(candidacies)
    base = baseline(items)
    if live is None:
        return base
    out = {a: n for a, n in base.items() if n in live}
    load: dict[str, int] = {}
    for node in out.values():
        load[node] = load.get(node, 0) + 1
    for c in sorted((c for c in items if c.address in base and c.address not in out), key=lambda c: _order(c.address)):
        best = _best(c, [n for n in c.nodes if n in live])
        if not best:
            continue
        node = min(best, key=lambda n: (load.get(n, 0), rank(n, c.address)))
        out[c.address] = node
        load[node] = load.get(node, 0) + 1
    return out


def per_node(assignment: Mapping[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for address, node in sorted(assignment.items()):
        out.setdefault(node, []).append(address)
    return out
