"""Status write-back to the API server (the `--kubernetes` mode), by the leader only.

The translator's statuses are compared with what each object's status is now; only a difference is
written, so one real change makes one write, and a new leader writes only what is stale. tidegate writes
its own part only: a route's `status.parents` and a policy's `status.ancestors` keep other controllers'
entries (those whose controllerName is not tidegate's); GatewayClasses, Gateways and Ingresses are written
only when the translator produced their status, which it does only for tidegate's classes. Conditions get
`lastTransitionTime`, kept while their status stays the same. Writes go to the status subresource with the
object's resourceVersion: a conflict reads the object again and retries.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import logging
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Event

from tidegate.leader import LeaderElector
from tidegate.resources import kinds
from tidegate.resources.model import Key, Problem
from tidegate.sources.kubernetes import KubernetesSource, resource_class
from tidegate.translate.conditions import CONTROLLER_NAME
from tidegate.translate.loadbalancers import ADDRESS_CONDITION

log = logging.getLogger("tidegate.status")

SHARED_LISTS = ("parents", "ancestors")  # entries of several controllers, told apart by controllerName
_ENTRY_IDS = {"listeners": "name", "parents": "parentRef", "ancestors": "ancestorRef"}
CONFLICT_RETRIES = 3


def merged_status(current: dict[str, Any], ours: dict[str, Any], now: str) -> dict[str, Any]:
    """The status to write: `ours`, with other controllers' shared-list entries kept, and lastTransitionTime
    carried over from `current` for conditions whose status did not change."""
    desired = copy.deepcopy(ours)
    if "loadBalancer" in desired and "conditions" in desired:
        # A Service's conditions are shared with other controllers: keep the types tidegate does not set.
        mine = {c.get("type") for c in desired["conditions"]}
        desired["conditions"] = [c for c in current.get("conditions") or [] if isinstance(c, dict)
                                 and c.get("type") not in mine] + desired["conditions"]
    for field in SHARED_LISTS:
        if field in desired:
            others = [e for e in current.get(field) or [] if e.get("controllerName") != CONTROLLER_NAME]
            desired[field] = others + desired[field]
    _stamp(desired, current, now)
    return desired


def _stamp(desired: Any, current: Any, now: str) -> None:
    if not isinstance(desired, dict):
        return
    current = current if isinstance(current, dict) else {}
    for key, value in desired.items():
        if key == "conditions" and isinstance(value, list):
            before = {c.get("type"): c for c in current.get("conditions") or [] if isinstance(c, dict)}
            for cond in value:
                old = before.get(cond.get("type"))
                same = old is not None and old.get("status") == cond.get("status") and old.get("lastTransitionTime")
                cond["lastTransitionTime"] = old["lastTransitionTime"] if same else now
        elif isinstance(value, list) and key in _ENTRY_IDS:
            ident = _ENTRY_IDS[key]
            olds = {_freeze(e.get(ident)): e for e in current.get(key) or [] if isinstance(e, dict)}
            for entry in value:
                if isinstance(entry, dict):
                    _stamp(entry, olds.get(_freeze(entry.get(ident)), {}), now)
        elif isinstance(value, dict):
            _stamp(value, current.get(key), now)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "lastTransitionTime"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def same_status(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _without_times(_normalize(a)) == _without_times(_normalize(b))


def _normalize(status: dict[str, Any]) -> dict[str, Any]:
    """Fields that are empty count as absent (the API server drops some of them)."""
    return {k: v for k, v in status.items() if v not in (None, [], {})}


class StatusWriter:
    def __init__(self, client: AsyncClient, source: KubernetesSource, leader: LeaderElector | None):
        self.client = client
        self.source = source
        self.leader = leader
        self.writes = 0
        self._latest: dict[Key, dict[str, Any]] | None = None
        self._notes: list[Problem] = []
        self._wake = asyncio.Event()
        # What an Event has said already, per Ingress (its uid too: a new object of the same name hears it again)
        self._told: dict[Key, tuple[str, set[str]]] = {}

    def submit(self, statuses: dict[Key, dict[str, Any]], notes: list[Problem] | None = None) -> None:
        """The newest translation's statuses (and its notes, for the Events on Ingresses); the writer catches
        up with the latest only."""
        self._latest = statuses
        self._notes = notes or []
        self._wake.set()

    async def run(self) -> None:
        while True:
            waits = [asyncio.ensure_future(self._wake.wait())]
            if self.leader is not None:
                waits.append(asyncio.ensure_future(self.leader.changed.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            self._wake.clear()
            if self.leader is not None:
                self.leader.changed.clear()
            if self._latest is not None:
                await self.write_all(self._latest)
                await self.tell_ingresses(self._notes)

    def _leading(self) -> bool:
        return self.leader is None or self.leader.is_leader()

    async def write_all(self, statuses: dict[Key, dict[str, Any]]) -> int:
        written = 0
        statuses = dict(statuses)
        for key, current in list(self.source.statuses.items()):
            # A route or policy tidegate no longer serves: take its own entries out, leave the others'.
            for field in SHARED_LISTS:
                if key not in statuses and any(e.get("controllerName") == CONTROLLER_NAME
                                               for e in current.get(field) or []):
                    statuses[key] = {field: []}
        for key, ours in statuses.items():
            if not self._leading():
                return written  # lost the lease: not one more write
            if key not in self.source.objects:
                continue
            try:
                written += await self._write(key, ours)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot write the status of %s: %s", key, exc)
        return written

    async def tell_ingresses(self, notes: list[Problem]) -> int:
        """An Event on an Ingress for each report of the translator about it (an annotation refused, ignored or
        unknown, a path not served): `kubectl describe ingress` shows what tidegate made of it, as ingress-nginx
        users expect. Each message once per Ingress object; the leader alone."""
        told = 0
        for note in notes:
            key = note.key
            if key is None or key.kind != "Ingress" or key not in self.source.objects or not self._leading():
                continue
            uid = str((self.source.objects[key].obj.get("metadata") or {}).get("uid", ""))
            seen_uid, seen = self._told.get(key, ("", set()))
            if seen_uid != uid:
                seen = set()
                self._told[key] = (uid, seen)
            if note.message in seen:
                continue
            seen.add(note.message)
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            body = {"apiVersion": "v1", "kind": "Event",
                    "metadata": {"generateName": f"{key.name}.", "namespace": key.namespace},
                    "involvedObject": {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                                       "namespace": key.namespace, "name": key.name, **({"uid": uid} if uid else {})},
                    "reason": "Rejected" if note.severity == "error" else "Ignored", "message": note.message[:1024],
                    "type": "Warning", "source": {"component": "tidegate"},
                    "reportingComponent": "tidegate.io/ingress-controller",
                    "firstTimestamp": now, "lastTimestamp": now, "count": 1}
            try:
                await self.client.create(Event.from_dict(body), namespace=key.namespace)
                told += 1
            except Exception as exc:  # an Event is a courtesy: the log and `tidegate status` have it too
                log.info("no Event for %s: %s", key, exc)
        for key in [k for k in self._told if k not in self.source.objects]:
            del self._told[key]
        return told

    async def _address_event(self, key: Key, before: dict[str, Any], after: dict[str, Any], now: str) -> None:
        """An Event on a LoadBalancer Service when its address changes or it is refused one (`kubectl describe
        service` shows it, as MetalLB's users expect)."""
        def condition(status: dict[str, Any]) -> dict[str, Any]:
            return next((c for c in status.get("conditions") or [] if c.get("type") == ADDRESS_CONDITION), {})

        old, new = condition(before), condition(after)
        if not new or (old.get("status"), old.get("reason"), old.get("message")) == (
                new.get("status"), new.get("reason"), new.get("message")):
            return
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{key.name}.", "namespace": key.namespace},
                "involvedObject": {"apiVersion": "v1", "kind": "Service", "namespace": key.namespace,
                                   "name": key.name},
                "reason": "IPAllocated" if new.get("status") == "True" else new.get("reason", "AllocationFailed"),
                "message": new.get("message", ""), "type": "Normal" if new.get("status") == "True" else "Warning",
                "source": {"component": "tidegate"}, "reportingComponent": "tidegate.io/lb-controller",
                "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        try:
            await self.client.create(Event.from_dict(body), namespace=key.namespace)
        except Exception as exc:  # an Event is a courtesy: the status is written already
            log.info("no Event for %s: %s", key, exc)

    async def _write(self, key: Key, ours: dict[str, Any]) -> int:
        info = kinds.by_name(key.kind)
        version = self.source.versions.get(key.kind, "v1")
        res = resource_class(info, version)
        current = self.source.statuses.get(key, {})
        resource_version = self.source.resource_versions.get(key, "")
        for _ in range(CONFLICT_RETRIES):
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            desired = merged_status(current, ours, now)
            if same_status(desired, current):
                return 0
            body = {"apiVersion": f"{info.group}/{version}" if info.group else version, "kind": key.kind,
                    "metadata": {"name": key.name, "resourceVersion": resource_version,
                                 **({"namespace": key.namespace} if key.namespace else {})},
                    "status": desired}
            if not self._leading():
                return 0
            try:
                # from_dict: lightkube's models (built-in kinds) and generic resources (CRDs) alike
                answer = await self.client.replace(res.Status.from_dict(body), namespace=key.namespace or None)
            except ApiError as exc:
                if exc.status.code == 404:
                    return 0
                if exc.status.code != 409:
                    raise
                fresh = await self.client.get(res, key.name, namespace=key.namespace or None)
                obj = fresh.to_dict() if hasattr(fresh, "to_dict") else dict(fresh)
                current = obj.get("status") or {}
                resource_version = obj["metadata"]["resourceVersion"]
                continue
            obj = answer.to_dict() if hasattr(answer, "to_dict") else dict(answer)
            if key.kind == "Service":
                await self._address_event(key, current, desired, now)
            # Remember what was written at once: the watch event follows, but a translation may come first.
            self.source.statuses[key] = obj.get("status") or desired
            self.source.resource_versions[key] = (obj.get("metadata") or {}).get("resourceVersion", resource_version)
            self.writes += 1
            log.info("status of %s written", key)
            return 1
        log.warning("status of %s: still conflicting after %d tries; next translation retries", key,
                    CONFLICT_RETRIES)
        return 0
