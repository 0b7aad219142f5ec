"""The file source: Kubernetes YAML from files and directories, watched for changes.

An edit that breaks a resource keeps its last good version in the store and says why. A file that cannot be
parsed at all keeps every resource it held before, since a deletion and a breakage cannot be told apart.
Deleting a file, or a document from a file that still parses, removes its resources.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import watchfiles

from tidegate import background
from tidegate.resources.bounded_yaml import YAMLLimitError, read_text
from tidegate.resources.loader import YAML_SUFFIXES, expand_paths, load_text
from tidegate.resources.model import Key, Origin, Problem, Resource
from tidegate.store import Store

log = logging.getLogger("tidegate.sources.file")


def _content(obj: dict) -> dict:
    """What a change of counts as a new generation: everything but status and server-set metadata."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items()
            if k not in ("generation", "resourceVersion", "managedFields")}
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": meta}


def _with_generation(res: Resource, previous: Resource | None) -> Resource:
    """Number generations as the API server does: a resource whose content changed gets the next one, so that
    status can say which generation it describes (observedGeneration)."""
    if previous is None:
        return res
    generation = previous.generation
    if _content(res.obj) != _content(previous.obj):
        generation += 1
    if res.generation == generation:
        return res
    obj = {**res.obj, "metadata": {**res.obj["metadata"], "generation": generation}}
    return Resource(res.key, res.api_version, obj, res.origin)


class FileSource:
    name = "file"

    def __init__(self, paths: Iterable[str | Path], store: Store, default_namespace: str = "default",
                 report: Callable[[Problem], None] | None = None):
        self.paths = [Path(p) for p in paths]
        self.store = store
        self.default_namespace = default_namespace
        self.report = report or (lambda p: log.warning("%s", p))
        self._by_file: dict[Path, dict[Key, Resource]] = {}
        # What each file's last reading found wrong: the admin API and the dashboard show it until an edit
        # mends it. Replaced whole on each reading (the admin listener reads it from another thread).
        self.problems_by_file: dict[str, list[Problem]] = {}

    def load(self) -> list[Problem]:
        """Read every file once and publish the result."""
        problems: list[Problem] = []
        for path in self.paths:
            if not path.exists():
                problems.append(Problem("error", Origin(str(path)), "no such file or directory"))
        found: dict[str, list[Problem]] = {}
        for file in expand_paths(self.paths):
            found[str(file)] = self._read(file)
            problems += found[str(file)]
        self.problems_by_file = {name: listed for name, listed in found.items() if listed}
        problems += self._publish()
        return problems

    def reload(self, changed: Iterable[Path]) -> list[Problem]:
        """Re-read changed files (paths as the watcher reports them, usually absolute)."""
        return self._reread(changed) + self._publish()

    def _reread(self, changed: Iterable[Path]) -> list[Problem]:
        problems: list[Problem] = []
        current = {f.resolve(): f for f in expand_paths(self.paths)}
        known = {f.resolve(): f for f in self._by_file}
        by_file = dict(self.problems_by_file)
        for path in sorted({Path(p).resolve() for p in changed}):
            if path in current:
                found = self._read(current[path])
                problems += found
                by_file[str(current[path])] = found
            elif path in known:
                del self._by_file[known[path]]
                by_file.pop(str(known[path]), None)
        self.problems_by_file = {name: listed for name, listed in by_file.items() if listed}
        return problems

    def _read(self, file: Path) -> list[Problem]:
        previous = self._by_file.get(file, {})
        try:
            text = read_text(file)
        except YAMLLimitError as exc:
            return [Problem("error", Origin(str(file)), f"refused: {exc}; keeping what it had")]
        except (OSError, UnicodeDecodeError) as exc:
            return [Problem("error", Origin(str(file)), f"cannot read file: {exc}; keeping what it had")]
        result = load_text(text, str(file), self.default_namespace)
        problems = list(result.problems)
        fresh: dict[Key, Resource] = {}
        for res in result.resources:
            if res.key in fresh:
                problems.append(Problem("error", res.origin, f"duplicate of the one defined at "
                                                             f"{fresh[res.key].origin}", res.key))
                continue
            fresh[res.key] = res
        for key, res in list(fresh.items()):
            fresh[key] = _with_generation(res, previous.get(key))
        kept = [k for k in previous if k not in fresh and (k in result.failed_keys or result.unidentified_failure)]
        for key in kept:
            fresh[key] = previous[key]
            problems.append(Problem("warning", Origin(str(file)), "invalid edit: keeping the last good version",
                                    key))
        self._by_file[file] = fresh
        return problems

    def _publish(self) -> list[Problem]:
        problems: list[Problem] = []
        merged: dict[Key, Resource] = {}
        for file in sorted(self._by_file):
            for key, res in self._by_file[file].items():
                if key in merged:
                    problems.append(Problem("error", res.origin,
                                            f"duplicate of the one defined at {merged[key].origin}", key))
                    continue
                merged[key] = res
        self.store.replace_source(self.name, merged)
        return problems

    async def watch(self, stop_event=None) -> None:
        """Reload on every change until cancelled (or until `stop_event` is set)."""
        roots = [p for p in self.paths if p.exists()]
        if not roots:
            return
        # Only YAML files wake the watcher: `tidegate run -f DIR > DIR/tidegate.log` must not feed itself.
        async for changes in watchfiles.awatch(*roots, debounce=50, step=20, stop_event=stop_event,
                                               recursive=True, watch_filter=_is_yaml):
            files = {Path(path) for _, path in changes}
            try:
                # Reading and validating in a thread: a 50 MB file takes a minute, and the admin listener on
                # this loop must keep answering probes meanwhile. The store is written here, on the loop.
                problems = await background.run(self._reread, files)
                problems += self._publish()
            except Exception as exc:  # a bug must not end the watch: later edits still apply
                log.exception("reloading %s failed; the last good configuration keeps serving",
                              ", ".join(sorted(map(str, files))))
                problems = [Problem("error", Origin(str(min(files))), f"reload failed: {exc!r}")]
            for problem in problems:
                self.report(problem)


def _is_yaml(change: watchfiles.Change, path: str) -> bool:
    return Path(path).suffix in YAML_SUFFIXES
