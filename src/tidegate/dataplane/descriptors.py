"""File descriptors: a worker raises its soft limit to the hard one when it starts (as nginx's
worker_rlimit_nofile does), and watches how many it has open.

At the limit, the event loop (libuv) accepts each new connection on a descriptor it keeps in reserve and closes
it at once, and accepts again as soon as descriptors free up; clients see their connections closed, and
nothing else says why. So a worker near its limit says so: a warning (once a minute at most) and
tidegate_limit_hits_total{limit="file-descriptors"}, and tidegate_open_fds / tidegate_max_fds carry the
numbers.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time

from tidegate.observe.metrics import METRICS

log = logging.getLogger("tidegate.descriptors")

CHECK_INTERVAL = 1.0
NEAR = 0.95  # of the limit: from here on new connections may be refused
WARN_EVERY = 60.0


def raise_limit() -> int:
    """Raise the soft limit of open files to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def open_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened


async def watch() -> None:
    """Every CHECK_INTERVAL: the count and the limit (read anew: an operator may change it with prlimit)."""
    warned = 0.0
    while True:
        await asyncio.sleep(CHECK_INTERVAL)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            count = open_count()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                return  # no /proc: nothing to watch
            count = limit  # not one left to look with
        METRICS.open_fds.set(count)
        METRICS.max_fds.set(limit)
        if limit != resource.RLIM_INFINITY and count >= NEAR * limit:
            METRICS.limits.labels("file-descriptors").inc()
            now = time.monotonic()
            if now - warned >= WARN_EVERY:
                warned = now
                log.warning("file descriptors nearly exhausted: %d of %d open; new connections are closed as they "
                            "come until some close (raise the limit: ulimit -n, or LimitNOFILE)", count, limit)
