"""The command line: exit codes, messages without tracebacks, and each subcommand's output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "examples" / "basic")


def tidegate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tidegate", *args], capture_output=True, text=True, timeout=60)


def test_validate_passes_on_the_example_and_fails_with_a_clear_message(tmp_path: Path):
    ok = tidegate("validate", EXAMPLE)
    assert ok.returncode == 0 and "0 error(s)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
                   "spec: {parentRefs: [{name: gw, port: 0}]}\n")
    result = tidegate("validate", str(bad))
    assert result.returncode == 1
    assert f"error: {bad}:1 (document 1): HTTPRoute default/r spec.parentRefs[0].port:" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_reports_what_only_shows_across_objects_pools_and_loadbalancer_requests(tmp_path: Path):
    result = tidegate("validate", str(ROOT / "testdata" / "ipam" / "bad-input.in.yaml"))
    assert result.returncode == 1 and "2 error(s)" in result.stderr
    assert "IPAddressPool metallb-system/overlapping '192.0.2.4-192.0.2.20' overlaps '192.0.2.0/29'" in result.stderr
    assert "warning: Service default/in-no-pool: no address (AddressNotInPool): 172.16.0.1: in no IPAddressPool" \
        in result.stderr
    malformed = tmp_path / "pools.yaml"
    malformed.write_text((ROOT / "testdata" / "ipam" / "bad-input.in.yaml").read_text().replace(
        "[192.0.2.0/29]", "[192.0.2.0/33]"))
    result = tidegate("validate", str(malformed))
    assert result.returncode == 1
    assert f"{malformed}:2 (document 1): IPAddressPool metallb-system/main spec.addresses[0]: invalid CIDR " \
           "'192.0.2.0/33'" in result.stderr


def test_missing_path_is_an_error_not_a_traceback(tmp_path: Path):
    result = tidegate("status", str(tmp_path / "nope"))
    assert result.returncode == 1 and "no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_prints_yaml_for_every_resource_with_a_status():
    result = tidegate("status", EXAMPLE, "--address", "192.0.2.1")
    assert result.returncode == 0, result.stderr
    statuses = {(s["kind"], s["name"]): s["status"] for s in yaml.safe_load(result.stdout)}
    route = statuses[("HTTPRoute", "echo")]
    assert route["parents"][0]["conditions"][0]["status"] == "True"
    assert statuses[("Gateway", "web")]["listeners"][0]["attachedRoutes"] == 1


def test_routes_shows_listeners_matches_and_pod_endpoints():
    result = tidegate("routes", EXAMPLE)
    assert result.returncode == 0
    assert "LISTENER default/web/http  HTTP 127.0.0.1:8080" in result.stdout
    assert "endpoints: 127.0.0.1:9001, 127.0.0.1:9002" in result.stdout


def test_explain_exit_codes_follow_whether_a_route_matched():
    hit = tidegate("explain", EXAMPLE, "--url", "http://echo.example.com:8080/hello", "-H", "X-A: 1")
    assert hit.returncode == 0 and "route     httproute/default/echo/rule/0" in hit.stdout
    miss = tidegate("explain", EXAMPLE, "--url", "http://echo.example.com:9999/")
    assert miss.returncode == 1 and "no HTTP listener on port 9999" in miss.stdout
    bad_header = tidegate("explain", EXAMPLE, "--url", "http://echo.example.com:8080/", "-H", "nocolon")
    assert bad_header.returncode == 2


def test_routes_and_explain_show_the_backend_policy_in_force_and_where_it_came_from():
    golden = str(ROOT / "testdata" / "translate" / "backend-policies.in.yaml")
    routes = tidegate("routes", golden)
    assert routes.returncode == 0, routes.stderr
    assert ("      policy loadBalancer: LeastRequest, slow start 30s, zone-aware (at least 2 local, spill at 2× "
            "load)  <- BackendPolicy default/shop-least-request on HTTPRoute default/shop") in routes.stdout
    assert "endpoints: 10.0.0.1:8080 (weight 4), 10.0.0.2:8080 (weight 0)" in routes.stdout
    assert "policy loadBalancer: ConsistentHash by SourceIP  <- sessionAffinity of Service default/legacy" in (
        routes.stdout)
    explained = tidegate("explain", golden, "--url", "http://shop.example.com/cart")
    assert explained.returncode == 0, explained.stderr
    assert ("  policy  retry: 3 on connect-failure, reset, gateway-error, per try 2s, budget 10% + 3/s  "
            "<- BackendPolicy default/gateway-retries on Gateway default/gw") in explained.stdout
    assert "annotation tidegate.io/max-requests ignored: 'lots' is not a whole number" in explained.stderr


def test_run_once_translates_and_exits():
    result = tidegate("run", "-f", EXAMPLE, "--once")
    assert result.returncode == 0
    assert "config version 1: 1 listener(s), 1 route rule(s)" in result.stderr


def test_help_lists_the_subcommands():
    result = tidegate("--help")
    for command in ("run", "validate", "status", "routes", "explain"):
        assert command in result.stdout


def test_simulate_shows_the_node_level_imbalance_and_its_fixes():
    result = tidegate("simulate", str(ROOT / "examples" / "uneven"), "--requests", "10000", "--json")
    assert result.returncode == 0, result.stderr
    shares = {s["pod"]: s for s in __import__("json").loads(result.stdout)["default/shop"]}
    for pod in ("shop-a1", "shop-a2", "shop-a3", "shop-b1"):
        assert abs(shares[pod]["tidegate"] - 0.25) <= 0.03  # straight to the pods: even
        assert abs(shares[pod]["node_balancer_weighted"] - 0.25) <= 0.03  # node weights by local endpoints
    assert abs(shares["shop-b1"]["node_balancer"] - 0.5) <= 0.03  # the lone pod takes half
    assert all(abs(shares[p]["node_balancer"] - 1 / 6) <= 0.03 for p in ("shop-a1", "shop-a2", "shop-a3"))
    # tidegate's own Layer 2 mode: Cluster relays to every pod; Local keeps to the announcing node's pods.
    node = shares["shop-a1"]["l2_node"]
    assert node in ("node-a", "node-b") and all(abs(s["l2_cluster"] - 0.25) <= 0.03 for s in shares.values())
    for pod, share in shares.items():
        expected = (1 / 3 if node == "node-a" else 0.0) if pod != "shop-b1" else (1.0 if node == "node-b" else 0.0)
        assert abs(share["l2_local"] - expected) <= 0.03, (pod, share)
    # BGP under Local: equal ECMP over the two nodes (the lone pod takes half), or weighted (a quarter each).
    assert abs(shares["shop-b1"]["bgp_ecmp"] - 0.5) <= 0.03
    assert all(abs(s["bgp_weighted"] - 0.25) <= 0.03 for s in shares.values())
    table = tidegate("simulate", str(ROOT / "examples" / "uneven"))
    assert "shop-b1" in table.stdout and "50.0%" in table.stdout and "L2 Local" in table.stdout
    assert "BGP weighted" in table.stdout
    missing = tidegate("simulate", str(ROOT / "examples" / "uneven"), "--service", "default/nope")
    assert missing.returncode == 1 and "no Service with ready endpoints named default/nope" in missing.stderr


def test_bad_run_options_are_usage_errors():
    for option in (["--access-log-status", "abc"], ["--access-log-sample", "2"], ["--admin", "nonsense"],
                   ["--access-log", "json", "--access-log-file", "/no/such/dir/access.log"]):
        result = tidegate("run", "-f", EXAMPLE, *option)
        assert result.returncode == 2 and "tidegate: error:" in result.stderr and "TIDEGATE_DEBUG" not in result.stderr
    for args in ([], ["--kubernetes", "--lease-duration", "1", "--renew-deadline", "2"],
                 ["--kubernetes", "--kubeconfig", "/no/such/kubeconfig"]):
        result = tidegate("run", *args)
        assert result.returncode == 2 and "tidegate: error:" in result.stderr, (args, result.stderr)
