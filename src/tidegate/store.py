"""The store: the latest valid copy of every resource and a version that grows with each change.

Sources write whole views (`replace_source`); readers take immutable snapshots. `updates()` coalesces bursts:
after a change it waits until the store has been quiet for `settle` seconds (at most `max_delay`), then
yields one snapshot for the lot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from tidegate.resources.model import Key, Resource


@dataclass(frozen=True)
class Snapshot:
    version: int
    resources: tuple[Resource, ...]

    def get(self, key: Key) -> Resource | None:
        return next((r for r in self.resources if r.key == key), None)


class Store:
    def __init__(self) -> None:
        self._sources: dict[str, dict[Key, Resource]] = {}
        self._merged: dict[Key, Resource] = {}
        self.version = 0
        self._changed_at = 0.0
        self._event: asyncio.Event | None = None

    def replace_source(self, source: str, resources: Mapping[Key, Resource]) -> bool:
        """Set everything one source currently provides. Returns True when the merged view changed."""
        self._sources[source] = dict(resources)
        merged: dict[Key, Resource] = {}
        for name in sorted(self._sources):
            for key, res in self._sources[name].items():
                merged.setdefault(key, res)
        changed = merged.keys() != self._merged.keys() or any(
            not res.same_content(self._merged[key]) for key, res in merged.items())
        if changed:
            self._merged = merged
            self.version += 1
            self._changed_at = time.monotonic()
            if self._event is not None:
                self._event.set()
        return changed

    def snapshot(self) -> Snapshot:
        return Snapshot(self.version, tuple(self._merged[k] for k in sorted(self._merged)))

    async def updates(self, settle: float = 0.05, max_delay: float = 1.0) -> AsyncIterator[Snapshot]:
        """Yield the current snapshot, then one per burst of changes."""
        if self._event is None:
            self._event = asyncio.Event()
        seen = self.version
        yield self.snapshot()
        while True:
            if self.version == seen:
                self._event.clear()
                await self._event.wait()
            started = time.monotonic()
            while time.monotonic() - self._changed_at < settle and time.monotonic() - started < max_delay:
                await asyncio.sleep(settle)
            seen = self.version
            yield self.snapshot()
