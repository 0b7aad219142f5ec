"""The modules mypyc compiles (setup.py reads HOT_MODULES from this file), and which copy of them runs.

Compiled modules sit beside their sources. They are used all together or not at all: compiled modules call
each other directly and check each other's classes, so a mix of compiled and Python copies would fail on the
first request. In a source checkout (an editable install builds them in place, beside setup.py's src/), they
are used only when each is newer than its source: an edit to a hot module takes effect at once, as Python,
until the next install compiles it again. Setting TIDEGATE_PURE_PYTHON=1 runs the Python copies too (the test
suite runs its data-plane tests both ways).

This module imports only the standard library: setup.py runs it before anything is installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

HOT_MODULES = (
    "tidegate.dataplane.fastlane",
    "tidegate.dataplane.guard",
    "tidegate.dataplane.redis_limits",
    "tidegate.dataplane.h2request",
    "tidegate.dataplane.http1",
    "tidegate.dataplane.http2",
    "tidegate.dataplane.upstream",
    "tidegate.dataplane.server",
    "tidegate.dataplane.l4",
    "tidegate.observe.accesslog",
    "tidegate.observe.metrics",
    "tidegate.balancing.balancer",
    "tidegate.balancing.algorithms",
    "tidegate.balancing.state",
    "tidegate.router",
)

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory that holds tidegate/
_CHECKOUT = (_PACKAGE_ROOT.parent / "setup.py").exists()  # src/ of a source checkout, not site-packages


def _paths(name: str) -> tuple[Path, Path | None]:
    """A hot module's source, and its compiled copy if there is one."""
    source = _PACKAGE_ROOT.joinpath(*name.split(".")).with_suffix(".py")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        compiled = source.with_suffix(suffix)
        if compiled.exists():
            return source, compiled
    return source, None


def pure_python_requested() -> bool:
    """TIDEGATE_PURE_PYTHON set to anything but "" or "0": build nothing (setup.py), run the Python copies."""
    return os.environ.get("TIDEGATE_PURE_PYTHON", "") not in ("", "0")


def why_not_compiled() -> str:
    """"" when the compiled copies can run, else why the Python ones run instead."""
    if pure_python_requested():
        return "TIDEGATE_PURE_PYTHON is set"
    for name in HOT_MODULES:
        source, compiled = _paths(name)
        if compiled is None:
            return f"{name} is not compiled"
        if _CHECKOUT and source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
            return f"{source.name} changed after it was compiled (install again to compile it)"
    return ""


class _SourceFirst:
    """A meta path finder that loads the hot modules from their .py files."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in HOT_MODULES:
            return None
        source, _ = _paths(fullname)
        return importlib.util.spec_from_file_location(fullname, source)


REASON = ""  # why the Python copies run ("" when the compiled ones do); set by choose()


def choose() -> None:
    """Called once, when tidegate is imported: put the source-first finder in place when it has to be."""
    global REASON
    REASON = why_not_compiled()
    if REASON and not any(isinstance(finder, _SourceFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())


def describe() -> str:
    """For logs and --version: which copies of the hot modules run."""
    return "compiled with mypyc" if not REASON else f"pure Python ({REASON})"
