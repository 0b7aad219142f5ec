"""Control-plane work that must not take the CPU from serving: reading, validating and translating
configuration run here, on one thread with a lower scheduling priority (nice +10).

The control process's event loop (the admin listener, health checks, status writes) stays responsive while a
large configuration is read, and the worker processes, at normal priority, get the CPU first when both want
it: on a machine with fewer cores than busy processes, a 10,000-route translation at equal priority left
requests unanswered for over 100 ms.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

log = logging.getLogger("tidegate.background")

NICENESS = 10
T = TypeVar("T")


def _lower_priority() -> None:
    try:  # on Linux, a thread's id as PRIO_PROCESS's "who" sets that thread's priority alone
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
    except (OSError, AttributeError) as exc:
        log.debug("control-plane thread keeps its priority: %s", exc)


# One thread: work is done in the order it was asked for, and a burst never takes more than one core.
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidegate-control", initializer=_lower_priority)


async def run(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` on the control-plane thread."""
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, partial(function, *args))
