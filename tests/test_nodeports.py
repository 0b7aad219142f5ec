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


def test_check_reads_a_cluster_with_the_files_in_place_of_its_objects(tmp_path):
    """--kubernetes: the cluster's Services and running Pods (the API stand-in), with the files' objects taking
    the place of the cluster's of the same name. A new file's port that a cluster Service holds, or a running
    Pod's hostPort, is a conflict; a finished Pod's is not; a file that changes a cluster Service's own port
    does not clash with the old one."""
    from tests.apiserver import fake_apiserver

    def pod(name: str, host_port: int, phase: str) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
                "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 53,
                                                                               "hostPort": host_port}]}]},
                "status": {"phase": phase}}

    # ports in the static band (30000-30085 for the default range), so that DynamicBand stays out of it
    with fake_apiserver() as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(api.kubeconfig())
        api.put(_service("web", 1, {0: 30010}))
        api.put(_service("db", 1, {0: 30011}))
        api.put(pod("dns", 30020, "Running"))
        api.put(pod("batch", 30021, "Succeeded"))
        files = tmp_path / "files"
        files.mkdir()
        (files / "new.yaml").write_text(yaml.safe_dump_all([
            _service("shop", 3, {0: 30010, 1: 30020, 2: 30021}),
            _service("db", 1, {0: 30012}),  # the cluster's db, moved: 30011 is free again
            _service("cache", 1, {0: 30011})]))
        alone = tidegate("nodeports", "check", "--kubernetes", "--kubeconfig", str(kubeconfig))
        assert alone.returncode == 0 and "2 Service(s), 0 conflict(s)" in alone.stdout, alone.stdout + alone.stderr
        both = tidegate("nodeports", "check", str(files), "--kubernetes", "--kubeconfig", str(kubeconfig))
        assert both.returncode == 1, both.stdout + both.stderr
        found = [line for line in both.stdout.splitlines() if ":" in line]
        assert any(line.startswith("Duplicate: node port 30010") and "Service default/web" in line
                   and "Service default/shop" in line for line in found), found
        assert any(line.startswith("HostPort:") and "30020" in line and "Pod default/dns" in line for line in found)
        assert not any("30021" in line or "30011" in line or "30012" in line for line in found), found
        assert "4 Service(s), 2 conflict(s)" in both.stderr, both.stderr
        allocated = tidegate("nodeports", "allocate", "--kubernetes", "--kubeconfig", str(kubeconfig))
        assert allocated.returncode == 0 and allocated.stdout == "", allocated.stdout + allocated.stderr
    unreachable = tidegate("nodeports", "check", "--kubernetes", "--kubeconfig", str(kubeconfig))
    assert unreachable.returncode == 1 and "error: the cluster's Services:" in unreachable.stderr, unreachable.stderr
    assert tidegate("nodeports", "check").returncode == 2
