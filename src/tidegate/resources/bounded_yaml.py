"""YAML from files nobody vetted, read within limits: a hostile or careless file gets a clear error, never a
crash, a hang, or memory out of proportion to its size.

PyYAML's C composer recurses once per nesting level (a list nested 100,000 deep overflows the C stack and
kills the process), and aliases let 38 KiB stand for a billion nodes (every later walk over the object then
takes minutes). So each document is first read as a stream of parser events, which libyaml produces without
recursion, and checked: nesting depth, nodes, and the nodes that aliases (and `<<` merge keys, which are
aliases) would add. Only a document within the limits is built into Python objects.

The limits are far above what Kubernetes objects need (Gateway API objects nest about 10 deep; etcd stores
at most 1.5 MiB per object), and a directory of 100,000 objects loads. Kubernetes' own YAML reader refuses
the same shapes: "excessive aliasing", "anchor contains itself".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    file_bytes: int = 256 * MIB  # one file (a whole cluster's dump fits: 263,000 Services are 50 MB)
    document_bytes: int = 64 * MIB  # one `---` document (a kind: List of many objects is one document)
    depth: int = 100  # mappings and lists inside each other
    nodes: int = 5_000_000  # scalars, mappings and lists in one document
    # Nodes that aliases may add to a document: at most as many as it has of its own, or this many when
    # that is more. Reuse of a block of labels passes; an alias of an alias of ... (a "billion laughs") fails.
    alias_nodes: int = 10_000
    objects: int = 1_000_000  # Kubernetes objects in one file, `kind: List` items counted one by one


LIMITS = Limits()


class YAMLLimitError(ValueError):
    """A document or file over one of the limits; the message names the limit."""


def read_text(path: Path, limits: Limits = LIMITS) -> str:
    """A file's text, refused before it is read when it is larger than the limit."""
    size = path.stat().st_size
    if size > limits.file_bytes:
        raise YAMLLimitError(f"the file is {size:,} bytes; the limit is {limits.file_bytes:,} "
                             f"({limits.file_bytes // MIB} MiB): split it into several files")
    return path.read_text()


def check_document(text: str, limits: Limits = LIMITS) -> None:
    """Raise YAMLLimitError when building `text` would go past a limit, yaml.YAMLError when it is not YAML."""
    if len(text) > limits.document_bytes:
        raise YAMLLimitError(f"the document is {len(text):,} characters; the limit is {limits.document_bytes:,} "
                             f"({limits.document_bytes // MIB} MiB)")
    depth = nodes = aliased = 0
    sizes: dict[str, int] = {}  # anchor → the nodes its value stands for, aliases inside counted in
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, count when it opened) of the collections open now
    for event in yaml.parse(text, Loader=_Loader):
        kind = type(event)
        if kind is yaml.ScalarEvent:
            nodes += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            nodes += 1
            depth += 1
            if depth > limits.depth:
                line = event.start_mark.line + 1 if event.start_mark is not None else 0
                raise YAMLLimitError(f"nesting deeper than {limits.depth} levels (line {line})")
            open_nodes.append((event.anchor, nodes + aliased))
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            depth -= 1
            anchor, opened_at = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = nodes + aliased - opened_at + 1
        elif kind is yaml.AliasEvent:
            if any(anchor == event.anchor for anchor, _ in open_nodes):
                raise YAMLLimitError(f"the alias *{event.anchor} is inside its own anchor &{event.anchor}")
            aliased += sizes.get(event.anchor, 1)  # an unknown anchor: the composer says so below
            if aliased > max(limits.alias_nodes, nodes):
                raise YAMLLimitError(f"excessive aliasing: aliases would add over {aliased:,} nodes to "
                                     f"{nodes:,}; the limit is {max(limits.alias_nodes, nodes):,}")
        else:
            continue
        if nodes + aliased > limits.nodes:
            raise YAMLLimitError(f"more than {limits.nodes:,} nodes in one document")


def load_document(text: str, limits: Limits = LIMITS) -> Any:
    """One YAML document as Python objects, after `check_document` passed it."""
    check_document(text, limits)
    return yaml.load(text, Loader=_Loader)
