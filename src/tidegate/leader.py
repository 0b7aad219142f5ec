"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it.

Every replica serves traffic; only the leader writes status. A replica takes the Lease when it is free or
when its holder has not renewed it for `lease_duration` (measured on this replica's own clock from when it
last saw the record change, so clocks need not agree). The leader renews every `retry_period`; if it has not
renewed for `renew_deadline`, it stops being leader at once, before anyone else can take over. Writes use
the Lease's resourceVersion, so two replicas never both win. On a graceful stop the leader gives the Lease
up, and another replica takes over within one retry period.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource

log = logging.getLogger("tidegate.leader")

Lease = create_namespaced_resource("coordination.k8s.io", "v1", "Lease", "leases")


def _micro_time(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, client: AsyncClient, namespace: str, name: str, identity: str,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0):
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError("leader election needs lease duration > renew deadline > retry period > 0")
        self.client = client
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration, self.renew_deadline, self.retry_period = lease_duration, renew_deadline, retry_period
        self.changed = asyncio.Event()  # set whenever leadership is gained or lost
        self._leader = False
        self._renewed = 0.0  # monotonic time of the last successful acquire or renew
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, resourceVersion) last seen
        self._observed_at = 0.0

    def is_leader(self) -> bool:
        """Leader, and renewed recently enough that no other replica can have taken over."""
        return self._leader and time.monotonic() - self._renewed < self.renew_deadline

    async def run(self) -> None:
        while True:
            try:
                ok = await self._acquire_or_renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server is away: keep trying, lose leadership at the deadline
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                ok = False
            if ok and not self._leader:
                self._set(True)
            elif self._leader and not self.is_leader():
                self._set(False)
            wait = self.retry_period if self._leader else self.retry_period * random.uniform(1.0, 1.2)
            await asyncio.sleep(wait)

    def _set(self, leader: bool) -> None:
        self._leader = leader
        log.warning("%s is %s the leader (lease %s/%s)", self.identity, "now" if leader else "no longer",
                    self.namespace, self.name)
        self.changed.set()

    async def _acquire_or_renew(self) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        try:
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            record = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.lease_duration),
                      "acquireTime": _micro_time(now), "renewTime": _micro_time(now), "leaseTransitions": 0}
            try:
                await self.client.create(Lease({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                                "metadata": {"name": self.name, "namespace": self.namespace},
                                                "spec": record}))
            except ApiError as exc2:
                if exc2.status.code == 409:
                    return False  # another replica created it first
                raise
            self._renewed = time.monotonic()
            return True
        obj = lease.to_dict() if hasattr(lease, "to_dict") else dict(lease)
        spec = dict(obj.get("spec") or {})
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), obj["metadata"].get("resourceVersion"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and time.monotonic() - self._observed_at < duration:
            return False  # held by another replica that renewed recently enough
        if holder != self.identity:
            spec["acquireTime"] = _micro_time(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=int(self.lease_duration),
                    renewTime=_micro_time(now))
        obj["spec"] = spec
        try:
            await self.client.replace(Lease(obj))  # metadata.resourceVersion makes it conditional
        except ApiError as exc:
            if exc.status.code == 409:
                return False
            raise
        self._renewed = time.monotonic()
        return True

    async def release(self) -> None:
        """Give the Lease up (graceful stop): the next replica need not wait for it to expire."""
        if not self.is_leader():
            return
        self._leader = False
        try:
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
            obj = lease.to_dict() if hasattr(lease, "to_dict") else dict(lease)
            if (obj.get("spec") or {}).get("holderIdentity") == self.identity:
                obj["spec"] = {**obj["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
                await self.client.replace(Lease(obj))
                log.info("released lease %s/%s", self.namespace, self.name)
        except Exception as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc)
