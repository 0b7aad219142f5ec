"""`tidegate nodeports`: golden files testdata/nodeports/NAME.in.yaml → NAME.out.yaml (what `check` finds and
what `allocate` gives), and allocation that is deterministic and never collides.

Regenerate after an intended change with:  TIDEGATE_UPDATE_GOLDEN=1 scripts/test tests/test_nodeports.py
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from tests import golden
from tests.test_cli import tidegate
from tidegate import nodeports
from tidegate.cli import dump_yaml
from tidegate.resources.loader import load_paths
from tidegate.translate import TranslateOptions, translate

GOLDEN = Path(__file__).resolve().parent.parent / "testdata" / "nodeports"
CASES = golden.cases(GOLDEN)


def render(case: str) -> str:
    source = GOLDEN / f"{case}.in.yaml"
    port_range = nodeports.parse_range(golden.options(source)["range"])
    docs, problems = nodeports.read_documents([source])
    assert not problems, problems
    listeners = [nodeports.Use(f"tidegate listener {listener.name}", listener.port, "TCP", "listening port")
                 for listener in translate(load_paths([source]).resources, TranslateOptions()).ir.listeners]
    findings = nodeports.check(docs, port_range, listeners)
    allocation = nodeports.allocate(docs, port_range, listeners)
    return dump_yaml({
        "static band": "-".join(map(str, nodeports.static_band(port_range))),
        "findings": [{"kind": f.kind, "port": f.port, "message": f.message.replace(str(GOLDEN) + "/", "")}
                     for f in findings],
        "allocated": [f"{u.owner}: {u.what} = {u.port}" for u in allocation.given],
        "patches": allocation.patches,
    })


@pytest.mark.parametrize("case", CASES)
def test_nodeports_match_golden(case: str) -> None:
    golden.check(GOLDEN / f"{case}.out.yaml", render(case))


def _service(name: str, ports: int, fixed: dict[int, int]) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "NodePort", "ports": [{"name": f"p{i}", "port": 80 + i,
                                                    **({"nodePort": fixed[i]} if i in fixed else {})}
                                                   for i in range(ports)]}}


def test_allocation_is_deterministic_never_collides_and_does_not_move_others():
    rng = random.Random(7)
    port_range = (30000, 30299)  # small: collisions between hashes are certain
    services = [_service(f"svc-{n}", rng.randint(1, 4), {0: 30000 + n} if n % 5 == 0 else {}) for n in range(60)]
    docs = [nodeports.Document(s, f"mem:{i}") for i, s in enumerate(services)]
    first = nodeports.allocate(docs, port_range)
    again = nodeports.allocate(list(reversed(docs)), port_range)
    assert [(u.owner, u.what, u.port) for u in first.given] == [(u.owner, u.what, u.port) for u in again.given]
    fixed = {p["nodePort"] for s in services for p in s["spec"]["ports"] if "nodePort" in p}
    given = [u.port for u in first.given]
    assert len(given) == len(set(given)) and not set(given) & fixed and not first.full
    band = nodeports.static_band(port_range)
    assert all(band[1] < port <= port_range[1] for port in given)
    # A new Service does not move the others (unless it took a port first: it cannot, it comes after).
    more = nodeports.allocate(docs + [nodeports.Document(_service("zz-new", 2, {}), "mem:new")], port_range)
    before = {(u.owner, u.what): u.port for u in first.given}
    after = {(u.owner, u.what): u.port for u in more.given}
    moved = [key for key in before if after[key] != before[key]]
    assert len(moved) <= 2, moved  # at most the ports the newcomer's hash landed on first
    # Full: an error, not a collision.
    tiny = nodeports.allocate(docs, (30000, 30009))
    assert tiny.full and len({u.port for u in tiny.given}) == len(tiny.given)


def test_the_commands_exit_1_on_conflicts_and_print_patches(tmp_path):
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(_service("web", 2, {0: 30001})))
    ok = tidegate("nodeports", "check", str(tmp_path))
    assert ok.returncode == 0 and "0 conflict(s)" in ok.stdout, ok.stderr
    allocated = tidegate("nodeports", "allocate", str(tmp_path), "--kubectl")
    assert allocated.returncode == 0, allocated.stderr
    assert allocated.stdout.startswith("kubectl patch service web -n default --type=merge -p '{\"spec\"")
    (tmp_path / "clash.yaml").write_text(yaml.safe_dump(_service("other", 1, {0: 30001})))
    bad = tidegate("nodeports", "check", str(tmp_path))
    assert bad.returncode == 1 and "Duplicate: node port 30001" in bad.stdout
    assert tidegate("nodeports", "check", str(tmp_path), "--range", "nonsense").returncode == 2
