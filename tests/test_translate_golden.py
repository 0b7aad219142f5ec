"""Golden files: testdata/translate/NAME.in.yaml → NAME.out.yaml (IR, statuses, notes).

Regenerate after an intended change with:  TIDEGATE_UPDATE_GOLDEN=1 scripts/test tests/test_translate_golden.py
then read the YAML diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests import golden
from tidegate.cli import dump_yaml, statuses_as_data
from tidegate.resources.loader import load_paths
from tidegate.translate import TranslateOptions, translate

GOLDEN = Path(__file__).resolve().parent.parent / "testdata" / "translate"
CASES = golden.cases(GOLDEN)


def render(case: str) -> str:
    source = GOLDEN / f"{case}.in.yaml"
    options = TranslateOptions(**golden.options(source))
    loaded = load_paths([source])
    assert not loaded.errors, [str(e) for e in loaded.errors]
    result = translate(loaded.resources, options)
    data = {
        "ir": result.ir.to_data(),
        "status": statuses_as_data(result),
        "notes": [f"{n.severity}: {n.key}: {n.message}" for n in result.notes],
    }
    return dump_yaml(data)


@pytest.mark.parametrize("case", CASES)
def test_translation_matches_golden(case: str) -> None:
    golden.check(GOLDEN / f"{case}.out.yaml", render(case))


def test_translation_is_pure_and_deterministic() -> None:
    loaded = load_paths([GOLDEN / "attachment.in.yaml"])
    before = [yaml.safe_dump(r.obj) for r in loaded.resources]
    first = translate(loaded.resources)
    second = translate(list(reversed(loaded.resources)))
    assert first.ir == second.ir
    assert first.statuses == second.statuses
    assert [yaml.safe_dump(r.obj) for r in loaded.resources] == before
