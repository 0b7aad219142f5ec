"""BGP plan golden files: testdata/bgp/NAME.in.yaml → NAME.out.yaml: for each node named in the input's
`# options:` line, its sessions and the routes each carries (announce/bgp_plan.py, through the translator),
and what was reported about the BGP objects.

Regenerate after an intended change with:  TIDEGATE_UPDATE_GOLDEN=1 scripts/test tests/test_bgp_plan_golden.py
then read the YAML diff.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from tests import golden
from tidegate.cli import dump_yaml
from tidegate.resources.loader import load_paths
from tidegate.translate import TranslateOptions, translate

GOLDEN = Path(__file__).resolve().parent.parent / "testdata" / "bgp"
CASES = golden.cases(GOLDEN)
BGP_KINDS = {"BGPPeer", "BGPAdvertisement", "Community"}


def _route(route) -> dict:
    data = {k: v for k, v in asdict(route).items() if v not in (None, ())}
    if route.link_bandwidth is not None:
        data["link_bandwidth"] = f"{route.link_bandwidth[0]}:{route.link_bandwidth[1]}"
    return data


def render(case: str) -> str:
    source = GOLDEN / f"{case}.in.yaml"
    options = golden.options(source)
    loaded = load_paths([source])
    assert not loaded.errors, [str(e) for e in loaded.errors]
    out: dict = {"nodes": {}, "reported": []}
    for node in options["nodes"]:
        translation = translate(loaded.resources, TranslateOptions(node=node,
                                                                   gateway_pods=options.get("gateway_pods", "")))
        plan = translation.load_balancers.bgp
        out["nodes"][node] = {
            "sessions": {s.name: {k: v for k, v in asdict(s).items() if k not in ("name", "password")}
                         | ({"password": "(set)"} if s.password else {}) for s in plan.sessions},
            "routes": {name: [_route(r) for r in routes] for name, routes in plan.routes.items()},
        }
        reported = sorted(f"{n.severity}: {n.message}" for n in translation.notes
                          if n.key is not None and n.key.kind in BGP_KINDS)
        if not out["reported"]:
            out["reported"] = reported
        assert reported == out["reported"], "what is reported does not depend on the node"
    return dump_yaml(out)


@pytest.mark.parametrize("case", CASES)
def test_bgp_plan_matches_golden(case: str) -> None:
    golden.check(GOLDEN / f"{case}.out.yaml", render(case))
