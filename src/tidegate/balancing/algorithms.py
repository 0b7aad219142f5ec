"""Endpoint choice: smooth weighted round robin, random, least request, power of two choices, and Maglev
consistent hashing. Each picker chooses among the endpoints that may take traffic now (the balancer filters
out ejected, unhealthy and draining ones before asking)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from tidegate import ir
from tidegate.balancing.state import EndpointState


class WeightedChoice:
    """Smooth weighted round robin (as nginx does): over any window of sum(weights) picks, each item appears
    weight times, interleaved rather than in runs."""

    __slots__ = ("current", "equal", "items", "turn", "weights")

    def __init__(self, items: list, weights: Sequence[float]):
        self.items = items
        self.weights = [float(weight) for weight in weights]
        self.current = [0.0] * len(items)
        # Equal weights: the smooth sequence is plain turns (0, 1, 2, ...), kept by a counter.
        self.equal = len(set(weights)) <= 1
        self.turn = 0

    def pick(self) -> Any:
        if self.equal:
            turn = self.turn
            self.turn = (turn + 1) % len(self.items)
            return self.items[turn]
        total = 0.0
        best = -1
        for i, weight in enumerate(self.weights):
            self.current[i] += weight
            total += weight
            if best < 0 or self.current[i] > self.current[best]:
                best = i
        self.current[best] -= total
        return self.items[best]


def stable_hash(text: str) -> int:
    """The same number for the same text in every process and replica (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


def maglev_table(names: Sequence[str], size: int) -> list[int]:
    """Maglev's lookup table (Eisenbud et al., NSDI 2016): each of `size` slots (a prime) holds an index into
    `names`; every name gets size/len(names) slots, give or take one, and adding or removing a name moves
    little more than its own share of slots."""
    n = len(names)
    offsets, skips = [], []
    for name in names:
        digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
        offsets.append(int.from_bytes(digest[:8], "big") % size)
        skips.append(int.from_bytes(digest[8:], "big") % (size - 1) + 1)
    table = [-1] * size
    following = [0] * n
    filled = 0
    while True:
        for i in range(n):
            offset, skip = offsets[i], skips[i]
            slot = (offset + following[i] * skip) % size
            while table[slot] >= 0:
                following[i] += 1
                slot = (offset + following[i] * skip) % size
            table[slot] = i
            following[i] += 1
            filled += 1
            if filled == size:
                return table


class Picker:
    """Chooses one of `candidates` (never empty). `weights` is None when all are equal; whole numbers when
    they are endpointWeights; fractions while an endpoint is in slow start."""

    def pick(self, candidates: list[ir.Endpoint], states: list[EndpointState], weights: list[float] | None,
             key: str | None) -> ir.Endpoint:
        raise NotImplementedError


class RoundRobin(Picker):
    """Smooth weighted round robin over whichever endpoints are candidates: the sequence state is kept per
    candidate set, so an endpoint leaving and coming back does not upset the others' shares."""

    def __init__(self) -> None:
        self._choices: dict[tuple, WeightedChoice] = {}
        # The balancer hands over the same candidate list while nothing changed: its choice, found at once.
        self._last: tuple[list, list | None, WeightedChoice] | None = None

    def pick(self, candidates: list[ir.Endpoint], states: list[EndpointState], weights: list[float] | None,
             key: str | None) -> ir.Endpoint:
        last = self._last
        if last is not None and last[0] is candidates and last[1] is weights:
            return last[2].pick()
        if weights is not None and not all(isinstance(w, int) for w in weights):
            # Slow start ramps weights continuously: a weighted random pick follows them.
            return random.choices(candidates, weights)[0]
        ident = (tuple(id(e) for e in candidates), tuple(weights) if weights else None)
        choice = self._choices.get(ident)
        if choice is None:
            if len(self._choices) > 64:
                self._choices.clear()
            choice = self._choices[ident] = WeightedChoice(candidates, weights or [1] * len(candidates))
        self._last = (candidates, weights, choice)
        return choice.pick()


class Random(Picker):
    def pick(self, candidates: list[ir.Endpoint], states: list[EndpointState], weights: list[float] | None,
             key: str | None) -> ir.Endpoint:
        if weights is not None:
            return random.choices(candidates, weights)[0]
        return candidates[random.randrange(len(candidates))]


class LeastRequest(Picker):
    """The endpoint with the fewest requests in flight; ties go round the candidates in turn, so an idle
    backend still spreads its load evenly. With weights (as Envoy does), each endpoint's weight is divided by
    its requests in flight plus one, and a smooth weighted round robin follows those changing weights: an
    idle backend shares by weight, a busy endpoint gets less."""

    def __init__(self) -> None:
        self._turn = 0
        self._current: dict[int, float] = {}

    def pick(self, candidates: list[ir.Endpoint], states: list[EndpointState], weights: list[float] | None,
             key: str | None) -> ir.Endpoint:
        if weights is not None:
            current = self._current
            total, best, best_value = 0.0, 0, float("-inf")
            for i, (e, state) in enumerate(zip(candidates, states, strict=True)):
                dynamic = weights[i] / (state.active + 1)
                value = current.get(id(e), 0.0) + dynamic
                current[id(e)] = value
                total += dynamic
                if value > best_value:
                    best, best_value = i, value
            current[id(candidates[best])] -= total
            if len(current) > 4 * len(candidates) + 64:
                current.clear()
            return candidates[best]
        best_indexes: list[int] = []
        best_load = -1  # none yet
        for i, state in enumerate(states):
            load = state.active
            if best_load < 0 or load < best_load:
                best_indexes, best_load = [i], load
            elif load == best_load:
                best_indexes.append(i)
        self._turn += 1
        return candidates[best_indexes[self._turn % len(best_indexes)]]


class PowerOfTwoChoices(Picker):
    """Two endpoints at random (by weight); the one with fewer requests in flight wins, a tie at random."""

    def pick(self, candidates: list[ir.Endpoint], states: list[EndpointState], weights: list[float] | None,
             key: str | None) -> ir.Endpoint:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        if weights is None:
            a, b = random.sample(range(n), 2)
        else:
            a, b = random.choices(range(n), weights, k=2)
        load_a = states[a].active / (weights[a] if weights else 1.0)
        load_b = states[b].active / (weights[b] if weights else 1.0)
        if load_a == load_b:
            return candidates[a if random.random() < 0.5 else b]
        return candidates[a if load_a < load_b else b]


class ConsistentHash(Picker):
    """Maglev over the candidates, sorted by address so that every replica builds the same table. A request
    without a key (no such header or cookie) goes to a random candidate."""

    def __init__(self, table_size: int):
        self.table_size = table_size
        self._tables: dict[tuple[tuple[str, int], ...], list[int]] = {}

    def pick(self, candidates: list[ir.Endpoint], states: list[EndpointState], weights: list[float] | None,
             key: str | None) -> ir.Endpoint:
        if key is None:
            return candidates[random.randrange(len(candidates))]
        ordered = sorted(candidates, key=lambda e: (e.address, e.port))
        ident = tuple((e.address, e.port) for e in ordered)
        table = self._tables.get(ident)
        if table is None:
            if len(self._tables) > 16:
                self._tables.clear()
            table = self._tables[ident] = maglev_table([f"{a}:{p}" for a, p in ident], self.table_size)
        return ordered[table[stable_hash(key) % self.table_size]]


def picker_for(policy: ir.TrafficPolicy | None) -> Picker:
    algorithm = policy.algorithm if policy is not None else "RoundRobin"
    if algorithm == "ConsistentHash" and policy is not None and policy.hash is not None:
        return ConsistentHash(policy.hash.table_size)
    return {"LeastRequest": LeastRequest, "Random": Random,
            "PowerOfTwoChoices": PowerOfTwoChoices}.get(algorithm, RoundRobin)()
