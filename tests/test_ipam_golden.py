"""Address management golden files: testdata/ipam/NAME.in.yaml → NAME.out.yaml (each Service's addresses or
the reason it has none, each pool's counts, the pools refused).

Regenerate after an intended change with:  TIDEGATE_UPDATE_GOLDEN=1 scripts/test tests/test_ipam_golden.py
then read the YAML diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import golden
from tidegate.announce.ipam import AllocationOptions, allocate, pool_status
from tidegate.cli import dump_yaml
from tidegate.resources.loader import load_paths
from tidegate.translate.index import Index

GOLDEN = Path(__file__).resolve().parent.parent / "testdata" / "ipam"
CASES = golden.cases(GOLDEN)


def render(case: str) -> str:
    source = GOLDEN / f"{case}.in.yaml"
    options = golden.options(source)
    held = tuple(((ns, name), tuple(addresses)) for key, addresses in options.pop("held", {}).items()
                 for ns, name in [key.split("/")])
    loaded = load_paths([source])
    assert not loaded.errors, [str(e) for e in loaded.errors]
    result = allocate(Index(loaded.resources), AllocationOptions(**options, held=held))
    data = {
        "services": {f"{ns}/{name}": {"pool": a.pool, "addresses": list(a.addresses)}
                     for (ns, name), a in result.assignments.items()}
        | {f"{ns}/{name}": {"refused": r.reason, "message": r.message} for (ns, name), r in result.refusals.items()},
        "pools": {name: pool_status(usage) | {"services": usage.services} for name, usage in result.pools.items()},
        "refused pools": {str(key): message for key, message in result.pool_problems.items()},
        "not ours": [str(key) for key in result.not_ours],
    }
    data["services"] = dict(sorted(data["services"].items()))
    return dump_yaml(data)


@pytest.mark.parametrize("case", CASES)
def test_allocation_matches_golden(case: str) -> None:
    golden.check(GOLDEN / f"{case}.out.yaml", render(case))
