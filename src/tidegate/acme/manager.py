"""Keeps each wanted certificate (translate/acme.py): orders it when there is none, when its names or issuer
changed, and at renewal time: within the window the CA suggests (ACME Renewal Information, RFC 9773) when its
directory offers one, else when a third of the lifetime is left. Backs off per certificate after a failure.

One replica orders at a time: the store's lock. A replica that finds the lock taken checks again shortly,
and re-reads the store first: the certificate another replica wrote is not ordered twice. Failures wait
`backoff` seconds, doubling up to 6 hours, with ±20 % jitter: with the default of 120 s a name that cannot
validate is tried 5 times in its first hour, within Let's Encrypt's limit of 5 failed validations per
account, name and hour.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from tidegate.acme import client
from tidegate.acme.store import FileStore
from tidegate.translate.acme import Wanted

log = logging.getLogger("tidegate.acme")

LOCK_RETRY = 2.0  # seconds between looks at a lock another replica holds
LONGEST_WAIT = 3600.0  # a certificate's renewal time is looked at again at least this often
MAX_BACKOFF = 6 * 3600.0


@dataclass
class Progress:
    """What the manager knows of one certificate, for status, logs and the admin API."""

    wanted: Wanted
    state: str = "pending"  # pending | ordering | valid | failed
    message: str = ""
    failures: int = 0
    not_after: float = 0.0
    next_try: float = 0.0  # after a failure: when the next order is placed
    # ACME Renewal Information for the certificate held (`ari_for`: its chain): a time in the CA's window, and
    # when to ask again
    ari_for: str = ""
    ari_at: float | None = None
    ari_check: float = 0.0
    orders: int = 0  # orders this process placed for it


def renewal_due(chain_pem: str) -> tuple[float, float]:
    """(when to renew: a third of the lifetime before the end, when it ends) of a chain's first certificate."""
    cert = x509.load_pem_x509_certificate(chain_pem.encode("ascii"))
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    return end - (end - start) / 3, end


class AcmeMetrics:
    """Prometheus collector of a manager's certificates: orders by result, seconds to expiry, failures."""

    def __init__(self, manager: AcmeManager):
        self.manager = manager

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        orders = CounterMetricFamily("tidegate_acme_orders", "ACME orders this process placed, by result",
                                     labels=["result"])
        for result in ("issued", "failed"):
            orders.add_metric([result], self.manager.results.get(result, 0))
        expiry = GaugeMetricFamily("tidegate_acme_certificate_expiry_seconds", "Seconds until an ACME "
                                   "certificate expires, by Secret", labels=["secret"])
        failures = GaugeMetricFamily("tidegate_acme_certificate_failures", "Orders of a certificate that failed "
                                     "in a row (0 once one succeeds), by Secret", labels=["secret"])
        now = self.manager._clock()
        for key, progress in sorted(self.manager.progress.items()):
            if progress.not_after:
                expiry.add_metric([key], progress.not_after - now)
            failures.add_metric([key], progress.failures)
        return [orders, expiry, failures]


class AcmeManager:
    def __init__(self, store: FileStore, backoff: float = 120.0, order: Callable[..., client.Issued] = client.order,
                 clock: Callable[[], float] = time.time,
                 renewal_window: Callable[..., tuple[float | None, float]] = client.renewal_window):
        self._renewal_window = renewal_window
        self.on_change: Callable[[], None] | None = None  # told when a certificate's state changes (status)
        self.results: dict[str, int] = {}  # orders this process placed, by result: issued, failed
        self.store = store
        self.backoff = backoff
        self._order = order
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.progress: dict[str, Progress] = {}

    def update(self, wanted: list[Wanted]) -> None:
        """The certificates the configuration now asks for (the first ask for a Secret wins)."""
        by_key: dict[str, Wanted] = {}
        for want in wanted:
            by_key.setdefault(want.key, want)
        for key in list(self._tasks):
            if key not in by_key or self.progress[key].wanted != by_key[key]:
                self._tasks.pop(key).cancel()
                del self.progress[key]
        for key, want in by_key.items():
            if key not in self._tasks:
                self.progress[key] = Progress(want)
                self._tasks[key] = asyncio.create_task(self._keep(self.progress[key]), name=f"acme {key}")

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    def _wait(self, progress: Progress) -> float:
        """Seconds until the certificate held for it must be ordered (0: now)."""
        held = self.store.certificate(progress.wanted)
        if held is None:
            return 0.0
        chain, names, issuer = held
        if names != progress.wanted.names or issuer != progress.wanted.issuer.key:
            return 0.0
        try:
            renew_at, progress.not_after = renewal_due(chain)
        except ValueError:
            return 0.0
        progress.state = "valid"
        wait = renew_at - self._clock()
        if progress.ari_for == chain:  # the CA's suggestion wins, and is asked for again in time
            if progress.ari_at is not None:
                wait = progress.ari_at - self._clock()
            wait = min(wait, max(progress.ari_check - self._clock(), 1.0))
        return max(0.0, wait)

    async def _ask_for_renewal_information(self, progress: Progress) -> None:
        """Ask the CA when to renew the certificate held (RFC 9773), once it is time to ask again."""
        held = self.store.certificate(progress.wanted)
        if held is None or (progress.ari_for == held[0] and self._clock() < progress.ari_check):
            return
        progress.ari_at, progress.ari_check = await asyncio.to_thread(
            self._renewal_window, progress.wanted.issuer, held[0], self.store)
        progress.ari_for = held[0]
        if progress.ari_at is not None:
            log.info("ACME: %s suggests renewing the certificate for %s at %s", progress.wanted.issuer.key,
                     ", ".join(progress.wanted.names),
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(progress.ari_at)))

    async def _keep(self, progress: Progress) -> None:
        want = progress.wanted
        while True:
            wait = self._wait(progress)
            if wait > 0:
                await self._ask_for_renewal_information(progress)
                wait = self._wait(progress)
            if wait > 0:
                await asyncio.sleep(min(wait, LONGEST_WAIT))
                continue
            outcome = await asyncio.to_thread(self._order_if_first, progress)
            if outcome == "locked":  # another replica (or certificate) is being ordered: look again shortly
                await asyncio.sleep(LOCK_RETRY)
            elif outcome == "issued":
                progress.failures, progress.message = 0, ""
                self._count("issued")
                log.info("ACME: certificate for %s issued by %s (Secret %s)", ", ".join(want.names),
                         want.issuer.key, want.key)
            elif outcome != "held":
                progress.failures += 1
                progress.state, progress.message = "failed", outcome
                delay = self._delay(progress.failures)
                progress.next_try = self._clock() + delay
                self._count("failed")
                log.error("ACME: no certificate for %s from %s: %s; next try in %.0f s", ", ".join(want.names),
                          want.issuer.key, outcome, delay)
                await asyncio.sleep(delay)

    def _count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1
        if self.on_change is not None:
            self.on_change()

    def view(self) -> list[dict[str, Any]]:
        """The certificates it keeps, for the admin API and the dashboard."""
        now = self._clock()
        return [{"secret": key, "names": list(p.wanted.names), "issuer": p.wanted.issuer.key,
                 "server": p.wanted.issuer.server, "for": p.wanted.source, "state": p.state, "message": p.message,
                 "failures": p.failures, "notAfter": p.not_after or None,
                 "daysLeft": round((p.not_after - now) / 86400, 3) if p.not_after else None,
                 "nextTry": p.next_try if p.state == "failed" else None, "ordersPlaced": p.orders}
                for key, p in sorted(self.progress.items())]

    def mark(self, statuses: dict) -> dict:
        """`statuses` (a copy where it changes) with each waiting Gateway listener's last failure in its
        Programmed condition: the reason tidegate's order failed, and when it is tried again."""
        failed = {p.wanted.listener: p for p in self.progress.values() if p.state == "failed" and p.wanted.listener}
        if not failed:
            return statuses
        out = dict(statuses)
        for key, status in statuses.items():
            if key.kind != "Gateway":
                continue
            listeners = []
            for listener in status.get("listeners", []):
                progress = failed.get((key.namespace, key.name, listener["name"]))
                if progress is not None:
                    listener = {**listener, "conditions": [
                        {**c, "reason": "CertificateFailed", "message": f"the last order failed: "
                         f"{progress.message[:512]} (failures: {progress.failures}; next try at "
                         f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(progress.next_try))})"}
                        if c["type"] == "Programmed" and c["status"] == "False" else c
                        for c in listener["conditions"]]}
                listeners.append(listener)
            out[key] = {**status, "listeners": listeners}
        return out

    def _delay(self, failures: int) -> float:
        return min(self.backoff * 2 ** (failures - 1), MAX_BACKOFF) * random.uniform(0.8, 1.2)

    def _order_if_first(self, progress: Progress) -> str:
        """In a thread: order under the store's lock. "locked" (not this replica's turn), "held" (another
        replica wrote it meanwhile), "issued", or why it failed."""
        with self.store.ordering() as mine:
            if not mine:
                return "locked"
            if self._wait(progress) > 0:
                return "held"
            progress.state = "ordering"
            progress.orders += 1
            want = progress.wanted
            try:
                issued = self._order(want.issuer, want.names, self.store, journal=want.key)
            except client.OrderFailed as exc:
                return str(exc)
            except Exception as exc:  # a bug, or a library's surprise: reported, backed off, never silent
                log.exception("ACME: ordering %s failed unexpectedly", ", ".join(want.names))
                return f"{type(exc).__name__}: {exc}"
            self.store.save_certificate(want, issued.key_pem, issued.chain_pem)
            self._wait(progress)
            return "issued"
