"""The data plane's hot modules, compiled by Cython when tidegate is installed (setup.py) on a machine with a
C compiler. It makes the per-request path about 1.4 times faster.

Each module keeps its Python source beside the compiled file, and the source is used instead:
- when the environment has TIDEGATE_PURE_PYTHON=1,
- when no compiled file was built (no compiler, or the build failed),
- when the compiled file is older than its source: the module was edited since the build, and an edit must
  never be shadowed by a stale build (`scripts/bootstrap` builds again).

This module uses the standard library only: setup.py reads MODULES from it before anything is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

MODULES = (
    "tidegate.balancing.algorithms",
    "tidegate.balancing.balancer",
    "tidegate.balancing.outlier",
    "tidegate.balancing.state",
    "tidegate.dataplane.fastlane",
    "tidegate.dataplane.filters",
    "tidegate.dataplane.http1",
    "tidegate.dataplane.http2",
    "tidegate.dataplane.upstream",
    "tidegate.dataplane.upstream_h2",
    "tidegate.observe.accesslog",
    "tidegate.observe.metrics",
    "tidegate.router",
)

PURE_ENV = "TIDEGATE_PURE_PYTHON"

# What each hot module imported so far runs as: "compiled", or "source: <why>".
loaded: dict[str, str] = {}


class _SourceWhenNotCompiled(importlib.abc.MetaPathFinder):
    """Sends the import of a hot module to its source when the compiled file must not be used."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in MODULES or not path:
            return None
        stem = fullname.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, stem + ".py")
            if not os.path.exists(source):
                continue
            built = next((os.path.join(entry, stem + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES
                          if os.path.exists(os.path.join(entry, stem + suffix))), None)
            if os.environ.get(PURE_ENV) == "1":
                why = f"{PURE_ENV}=1"
            elif built is None:
                why = "not compiled"
            elif os.stat(built).st_mtime < os.stat(source).st_mtime:
                why = "compiled file older than the source"
            else:
                loaded[fullname] = "compiled"
                return None  # the standard finders load it: extension modules come before sources
            loaded[fullname] = f"source: {why}"
            return importlib.util.spec_from_file_location(fullname, source)
        return None


def install() -> None:
    """Put the finder first (once); tidegate/__init__.py calls it before any hot module is imported."""
    if not any(isinstance(f, _SourceWhenNotCompiled) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceWhenNotCompiled())


def summary() -> str:
    """One line for logs and `tidegate --version`: how the hot modules run in this process."""
    for name in MODULES:  # import them all, so that the answer covers every one
        __import__(name)
    stale = sorted(f"{name.removeprefix('tidegate.')} ({how.removeprefix('source: ')})"
                   for name, how in loaded.items() if how != "compiled")
    if not stale:
        return f"hot path compiled (Cython, {len(MODULES)} modules)"
    if len(stale) == len(MODULES) and len({s.partition(' (')[2] for s in stale}) == 1:
        return f"hot path pure Python ({stale[0].partition(' (')[2]}"
    return "hot path partly compiled; pure Python: " + ", ".join(stale)
