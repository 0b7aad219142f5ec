"""Typed handles for Kubernetes objects as tidegate keeps them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, order=True)
class Key:
    """Identity of a resource: (kind, namespace, name); namespace is "" for cluster-scoped kinds."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Origin:
    """Where a document came from, for messages: file, 1-based document number and first line."""

    source: str
    document: int = 0
    line: int = 0

    def __str__(self) -> str:
        where = self.source
        if self.line:
            where += f":{self.line}"
        if self.document:
            where += f" (document {self.document})"
        return where


@dataclass(frozen=True, eq=False)
class Resource:
    """A validated, defaulted object. `obj` is never mutated after loading."""

    key: Key
    api_version: str
    obj: dict[str, Any]
    origin: Origin = field(default=Origin("<memory>"))

    @property
    def kind(self) -> str:
        return self.key.kind

    @property
    def namespace(self) -> str:
        return self.key.namespace

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.obj.get("spec")
        return spec if isinstance(spec, dict) else {}

    @property
    def metadata(self) -> dict[str, Any]:
        return self.obj.get("metadata") or {}

    @property
    def labels(self) -> dict[str, str]:
        return self.metadata.get("labels") or {}

    @property
    def annotations(self) -> dict[str, str]:
        return self.metadata.get("annotations") or {}

    @property
    def generation(self) -> int:
        return int(self.metadata.get("generation") or 1)

    @property
    def creation_timestamp(self) -> str:
        return str(self.metadata.get("creationTimestamp") or "")

    def same_content(self, other: Resource) -> bool:
        return self.api_version == other.api_version and self.obj == other.obj


@dataclass(frozen=True)
class Problem:
    """A message about one input document: an error (the document is not loaded) or a warning."""

    severity: str  # "error" | "warning"
    origin: Origin
    message: str
    key: Key | None = None
    path: str = ""

    def __str__(self) -> str:
        what = f" {self.key}" if self.key else ""
        where = f" {self.path}:" if self.path else ""
        return f"{self.origin}:{what}{where} {self.message}"
