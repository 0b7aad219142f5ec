"""Turn multi-document Kubernetes YAML into validated, defaulted resources and clear problems.

Each document is parsed on its own, so a syntax error in one leaves the others loadable. Every error names the
file, the document, the kind/namespace/name when known, and the field path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tidegate.resources import checks, kinds
from tidegate.resources.bounded_yaml import LIMITS, YAMLLimitError, load_document, read_text
from tidegate.resources.cel import CelCompileError
from tidegate.resources.model import Key, Origin, Problem, Resource

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DOC_SEPARATOR = re.compile(r"^---(\s.*)?$")

YAML_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class LoadResult:
    resources: list[Resource] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # Identities of documents that failed validation: a file source keeps their last good version.
    failed_keys: set[Key] = field(default_factory=set)
    # True when some document could not even be identified (bad YAML, no kind/name).
    unidentified_failure: bool = False

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def split_documents(text: str) -> list[tuple[int, str]]:
    """Split a YAML stream at `---` lines; returns (first line number, text) per document."""
    docs: list[tuple[int, str]] = []
    start, lines = 1, []
    for number, line in enumerate(text.splitlines(), start=1):
        if _DOC_SEPARATOR.match(line):
            docs.append((start, "\n".join(lines)))
            start, lines = number + 1, []
        else:
            lines.append(line)
    docs.append((start, "\n".join(lines)))
    result = []
    for first, doc in docs:
        content = [i for i, s in enumerate(doc.splitlines()) if s.strip() and not s.lstrip().startswith("#")]
        if content:
            result.append((first + content[0], doc))  # point at the first line with content
    return result


def load_text(text: str, source: str, default_namespace: str = "default") -> LoadResult:
    result = LoadResult()
    objects = 0
    for index, (line, doc_text) in enumerate(split_documents(text), start=1):
        origin = Origin(source, index, line)
        try:
            doc = load_document(doc_text)
        except YAMLLimitError as exc:
            result.problems.append(Problem("error", origin, f"refused: {exc}"))
            result.unidentified_failure = True
            continue
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            first = next(i for i, s in enumerate(doc_text.splitlines()) if s.strip() and not s.lstrip().startswith("#"))
            where = Origin(source, index, line - first + mark.line) if mark is not None else origin
            reason = getattr(exc, "problem", None) or str(exc)
            result.problems.append(Problem("error", where, f"invalid YAML: {reason}"))
            result.unidentified_failure = True
            continue
        if doc is None:
            continue
        items = doc["items"] if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(
            doc.get("items"), list) else [doc]
        objects += len(items)
        if objects > LIMITS.objects:
            result.problems.append(Problem("error", origin, f"refused: more than {LIMITS.objects:,} objects in "
                                                            f"one file; split it into several files"))
            result.unidentified_failure = True
            break
        for item in items:
            load_object(item, origin, default_namespace, result)
    return result


def load_paths(paths: Iterable[str | Path], default_namespace: str = "default") -> LoadResult:
    """Load files and directories (recursively, *.yaml/*.yml/*.json, in name order)."""
    result = LoadResult()
    for file in expand_paths(paths, result):
        try:
            text = read_text(file)
        except YAMLLimitError as exc:
            result.problems.append(Problem("error", Origin(str(file)), f"refused: {exc}"))
            result.unidentified_failure = True
            continue
        except (OSError, UnicodeDecodeError) as exc:
            result.problems.append(Problem("error", Origin(str(file)), f"cannot read file: {exc}"))
            result.unidentified_failure = True
            continue
        part = load_text(text, str(file), default_namespace)
        result.resources += part.resources
        result.problems += part.problems
        result.failed_keys |= part.failed_keys
        result.unidentified_failure |= part.unidentified_failure
    dedupe(result)
    return result


def expand_paths(paths: Iterable[str | Path], result: LoadResult | None = None) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in YAML_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        elif result is not None:
            result.problems.append(Problem("error", Origin(str(path)), "no such file or directory"))
    return files


def dedupe(result: LoadResult) -> None:
    """Two documents with one identity: the first one wins, the second is an error."""
    seen: dict[Key, Resource] = {}
    kept: list[Resource] = []
    for res in result.resources:
        first = seen.get(res.key)
        if first is not None:
            result.problems.append(Problem("error", res.origin, f"duplicate of the one defined at {first.origin}",
                                           res.key))
            continue
        seen[res.key] = res
        kept.append(res)
    result.resources = kept


def load_object(doc: Any, origin: Origin, default_namespace: str, result: LoadResult) -> None:
    """Validate one object (from a file or from the API server), apply defaults, add it or its problems to
    `result`."""
    if not isinstance(doc, dict):
        result.problems.append(Problem("error", origin, "a document must be a mapping with apiVersion and kind"))
        result.unidentified_failure = True
        return
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        result.problems.append(Problem("error", origin, "apiVersion and kind are required"))
        result.unidentified_failure = True
        return
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    info = kinds.lookup(api_version, kind)
    if info is None:
        if kind in kinds.KIND_NAMES:
            known = kinds.by_name(kind)
            result.problems.append(Problem(
                "error", origin,
                f"{kind} is not served as {api_version}; use one of {', '.join(known.api_versions())}"))
            result.unidentified_failure = True
        else:
            label = f"{kind} {name}" if isinstance(name, str) else kind
            result.problems.append(Problem("warning", origin, f"ignoring {label} ({api_version}): not a kind tidegate reads"))
        return
    _, version = kinds.split_api_version(api_version)
    if version not in kinds.served_versions(info):
        result.problems.append(Problem(
            "error", origin, f"{kind} is not served as {api_version}; use one of {', '.join(info.api_versions())}"))
        result.unidentified_failure = True
        return
    if not isinstance(meta, dict) or not isinstance(name, str) or not name:
        result.problems.append(Problem("error", origin, f"{kind} without metadata.name", path="metadata.name"))
        result.unidentified_failure = True
        return
    obj = copy.deepcopy(doc)
    meta = obj["metadata"]
    namespace = ""
    if info.namespaced:
        namespace = meta.get("namespace") or default_namespace
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    meta.setdefault("generation", 1)
    key = Key(kind, namespace if isinstance(namespace, str) else str(namespace), name)

    problems = _check_metadata(kind, meta)
    schema = kinds.schema_for(info, version)
    if not problems:
        schema.apply_defaults(obj)
        try:
            problems = [(e.path, e.message) for e in schema.validate(obj)]
        except CelCompileError as exc:
            problems = [("", str(exc))]
        if not problems:
            problems = checks.check(kind, obj)
    if problems:
        for path, message in problems:
            result.problems.append(Problem("error", origin, message, key, path))
        result.failed_keys.add(key)
        return
    result.resources.append(Resource(key, api_version, obj, origin))


def _check_metadata(kind: str, meta: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    name = meta["name"]
    if kind == "Namespace":
        pattern, limit, what = _DNS_LABEL, 63, "a DNS-1123 label"
    elif kind == "Service":
        pattern, limit, what = _DNS_1035_LABEL, 63, "a DNS-1035 label (lower case, starting with a letter)"
    else:
        pattern, limit, what = _DNS_SUBDOMAIN, 253, "a DNS-1123 subdomain"
    if len(name) > limit or not pattern.match(name):
        problems.append(("metadata.name", f"{name!r} is not {what} of at most {limit} characters"))
    namespace = meta.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not _DNS_LABEL.match(namespace)
                                  or len(namespace) > 63):
        problems.append(("metadata.namespace", f"{namespace!r} is not a valid namespace name"))
    for field_name in ("labels", "annotations"):
        values = meta.get(field_name)
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append((f"metadata.{field_name}", "must be a map of strings"))
            continue
        for k, v in values.items():
            path = f"metadata.{field_name}[{k}]"
            if not isinstance(v, str):
                problems.append((path, "value must be a string (quote it)"))
            elif field_name == "labels":
                if not _label_key_ok(str(k)):
                    problems.append((path, "invalid label key"))
                if len(v) > 63 or not _LABEL_VALUE.match(v):
                    problems.append((path, f"invalid label value {v!r}"))
    return problems


def _label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))
