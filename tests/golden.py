"""Golden files: NAME.in.yaml → NAME.out.yaml, compared as text. TIDEGATE_UPDATE_GOLDEN=1 rewrites them
(then read the YAML diff)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml


def cases(folder: Path) -> list[str]:
    return sorted(p.name[: -len(".in.yaml")] for p in folder.glob("*.in.yaml"))


def options(source: Path) -> dict:
    """The `# options: {...}` line of an input file, as data ({} without one)."""
    line = re.search(r"^# options: (.*)$", source.read_text(), re.MULTILINE)
    return yaml.safe_load(line.group(1)) if line else {}


def check(out: Path, got: str) -> None:
    if os.environ.get("TIDEGATE_UPDATE_GOLDEN"):
        out.write_text(got)
    assert out.exists(), f"no golden file {out.name}: run with TIDEGATE_UPDATE_GOLDEN=1"
    assert got == out.read_text()
