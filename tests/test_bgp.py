"""LoadBalancer addresses announced over BGP to a real BIRD 2 router, on a lab of network namespaces
(tests/netns.py): a node running `tidegate run --node` with MetalLB's BGPPeer and BGPAdvertisement objects, a
router namespace running Debian's `bird` (started here, `import all`, routes exported to its kernel table).

The router learns a Service's address and reaches the pod through it; a Service added gets its route in the
router's table within 100 ms of tidegate announcing it, and loses it as fast when removed; a peer that does
not answer is reported without disturbing the one that does; a killed tidegate (SIGKILL) takes ExaBGP with it,
so the session closes and the router drops the routes at once. `ip -ts monitor route` in the router namespace
gives the times. A Gateway asking for a pool address is announced like a Service; the dashboard shows the
sessions and routes (headless Chromium through a forwarded port).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import pytest

from tests.harness import TIDEGATE, process, wait_until
from tests.manifests import gateway
from tests.netns import POD, can_make_namespaces, lab

WHY_NOT = can_make_namespaces() or ("" if shutil.which("bird") else "BIRD 2 (Debian bird2) is not installed; "
                                    "scripts/test installs it")
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)

ADMIN = "http://127.0.0.1:9900"
FIRST, SECOND, EDGE = "198.18.1.1", "198.18.1.2", "198.18.1.4"


def _bird_conf(world, path: Path) -> Path:
    path.write_text(f"""
router id {world.v4("router")};
protocol device {{ scan time 1; }}
protocol kernel {{ ipv4 {{ export all; }}; merge paths on; }}
protocol bgp node_a {{
  local {world.v4("router")} as 64512;
  neighbor {world.v4("a")} as 64513;
  hold time 9;
  ipv4 {{ import all; export none; }};
}}
""")
    return path


def _objects(world) -> str:
    return f"""apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status: {{addresses: [{{type: InternalIP, address: {world.v4("a")}}}]}}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {{name: router, namespace: metallb-system}}
spec: {{myASN: 64513, peerASN: 64512, peerAddress: {world.v4("router")}, holdTime: 9s}}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {{name: silent, namespace: metallb-system}}
spec: {{myASN: 64513, peerASN: 64512, peerAddress: 198.18.0.250, holdTime: 9s}}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: routed, namespace: metallb-system}}
spec: {{addresses: [198.18.1.0/28]}}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {{name: routed, namespace: metallb-system}}
spec: {{ipAddressPools: [routed], communities: ["64513:100"]}}
"""


def _bird(stack: ExitStack, world, conf: Path, role: str = "router") -> None:
    """Debian's BIRD in `role`'s namespace on `conf`, its control socket and log beside it; stopped on exit."""
    base = conf.with_suffix("")
    stack.enter_context(process(world.exec_args(role, "bird", "-f", "-c", str(conf), "-s", f"{base}.ctl", "-P",
                                                f"{base}.pid"), Path(f"{base}.log")))


def _service(name: str, address: str, pod: str, weighted: bool = False) -> str:
    """A LoadBalancer Service on `address` with one pod on node-a; `weighted`: under Local, with
    tidegate.io/weighting: endpoints."""
    extra = ", tidegate.io/weighting: endpoints" if weighted else ""
    local = " externalTrafficPolicy: Local," if weighted else ""
    return f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, annotations: {{metallb.io/loadBalancerIPs: "{address}"{extra}}}}}
spec: {{type: LoadBalancer, loadBalancerClass: tidegate.io/lb,{local} ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{{addresses: ['{pod}'], nodeName: node-a}}]
"""


def _gateway_to_first() -> str:
    """A Gateway asking for a pool address (announced over BGP like a Service), routing to Service first."""
    return f"""---
{gateway(EDGE, "[{name: http, port: 80, protocol: HTTP}]", name="edge")}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: edge, namespace: default}}
spec:
  parentRefs: [{{name: edge}}]
  rules: [{{backendRefs: [{{name: first, port: 80}}]}}]
"""


def _route_events(path: Path) -> list[tuple[float, str, str]]:
    """(time, "add" | "del", prefix) from `ip -ts monitor route` output."""
    out = []
    for line in path.read_text().splitlines():
        found = re.match(r"^\[([^\]]+)\]\s*(Deleted )?(\S+)", line)
        if found:
            when = datetime.fromisoformat(found.group(1)).timestamp()
            out.append((when, "del" if found.group(2) else "add", found.group(3)))
    return out


def _log_time(log: Path, pattern: str) -> float:
    for line in log.read_text().splitlines():
        if re.search(pattern, line):
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no line matching {pattern!r} in {log}")


def _event_after(events_path: Path, kind: str, prefix: str, after: float) -> float:
    return wait_until(lambda: next((t for t, k, p in _route_events(events_path)
                                    if k == kind and p == prefix and t >= after - 0.001), None),
                      timeout=10, what=f"the router to see {kind} {prefix}")


def _bgp(world) -> dict:
    return world.get_json("a", f"{ADMIN}/api/v1/loadbalancers")["bgp"]


def test_addresses_reach_a_bird_router_within_100_ms_and_leave_with_a_killed_node(tmp_path):
    with ExitStack() as stack:
        world = stack.enter_context(lab({"a": 1, "router": 254}))
        _bird(stack, world, _bird_conf(world, tmp_path / "bird.conf"))
        events = tmp_path / "routes.log"
        stack.enter_context(process(world.exec_args("router", "ip", "-ts", "monitor", "route"), events))
        stack.enter_context(process(world.exec_args("a", sys.executable, "-c", POD, "pod-a", world.v4("a"), "8080",
                                                    "5353", str(tmp_path / "www")), tmp_path / "pod.log"))
        config = tmp_path / "config"
        config.mkdir()
        (config / "lab.yaml").write_text(_objects(world) + _service("first", FIRST, world.v4("a"))
                                         + _gateway_to_first())
        log = tmp_path / "tidegate.log"
        node = stack.enter_context(process(world.exec_args(
            "a", *TIDEGATE, "run", "-f", str(config), "--node", "node-a", "--admin", "127.0.0.1:9900", "--bind",
            "127.0.0.1"), log))

        # The session comes up and the router learns the first address, with the advertisement's community.
        wait_until(lambda: f"{FIRST} via {world.v4('a')}" in world.run("router", "ip", "route"), timeout=30,
                   what="the router to learn the first address")
        learned = world.run("router", "birdc", "-s", str(tmp_path / "bird.ctl"), "show", "route", "all")
        assert "(64513,100)" in learned, learned
        # ... and reaches the pod through it (the node accepts the address: a local route of tidegate's).
        assert world.python("router", f"import urllib.request;print(urllib.request.urlopen('http://{FIRST}/pod', "
                                      "timeout=5).read().decode())").strip() == "pod-a"
        # The peer that does not answer is reported; the other is unaffected.
        sessions = {s["name"]: s for s in _bgp(world)["sessions"]}
        assert sessions["metallb-system/router"]["state"] == "up" and sessions["metallb-system/router"]["routes"] == 2
        # The Gateway's pool address too: the router reaches the pod through the Gateway's HTTPRoute.
        wait_until(lambda: f"{EDGE} via {world.v4('a')}" in world.run("router", "ip", "route"), timeout=10,
                   what="the router to learn the Gateway's address")
        assert world.python("router", f"import urllib.request;print(urllib.request.urlopen('http://{EDGE}/pod', "
                                      "timeout=5).read().decode())").strip() == "pod-a"
        edge = next(e for e in world.get_json("a", f"{ADMIN}/api/v1/status") if e["kind"] == "Gateway")
        assert [(r["prefix"], r.get("sessionState")) for r in edge["bgp"] if r["session"] == "metallb-system/router"] \
            == [(f"{EDGE}/32", "up")], edge
        assert sessions["metallb-system/silent"]["state"] != "up", sessions
        metrics = world.python("a", f"import urllib.request;print(urllib.request.urlopen('{ADMIN}/metrics')"
                                    ".read().decode())")
        assert 'tidegate_bgp_session_up{peer="metallb-system/router"} 1.0' in metrics
        assert 'tidegate_bgp_session_up{peer="metallb-system/silent"} 0.0' in metrics
        assert 'tidegate_bgp_routes_announced{peer="metallb-system/router"} 2.0' in metrics
        first = next(e for e in world.get_json("a", f"{ADMIN}/api/v1/status") if e["name"] == "first")
        routes = {r["session"]: r for r in first["bgp"]}
        assert routes["metallb-system/router"] == {"session": "metallb-system/router", "prefix": f"{FIRST}/32",
                                                   "sessionState": "up"}
        assert routes["metallb-system/silent"]["sessionState"] != "up"  # planned, waiting for the session

        # A Service added: announced, and in the router's table within 100 ms of that.
        written = time.time()
        (config / "second.yaml").write_text(_service("second", SECOND, world.v4("a")))
        announced = wait_until(lambda: _log_time(log, f"metallb-system/router: announced {SECOND}/32"), timeout=10,
                               what="tidegate to announce the second address")
        added = _event_after(events, "add", SECOND, written)
        print(f"BGP: file written → announced {announced - written:.3f} s, announced → in the router's table "
              f"{added - announced:.3f} s")
        assert added - announced <= 0.1, added - announced
        # Removed: withdrawn, and gone from the router's table within 100 ms.
        written = time.time()
        (config / "second.yaml").unlink()
        withdrawn = wait_until(lambda: _log_time(log, f"metallb-system/router: withdrawn {SECOND}/32"), timeout=10,
                               what="tidegate to withdraw the second address")
        deleted = _event_after(events, "del", SECOND, written)
        print(f"BGP: withdrawn → out of the router's table {deleted - withdrawn:.3f} s")
        assert deleted - withdrawn <= 0.1, deleted - withdrawn

        # SIGKILL: ExaBGP goes with tidegate, the session closes, the router drops the route at once.
        speakers = [p for p in world.pids("a") if b"exabgp" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert speakers, "ExaBGP runs in the node's namespace"
        killed = time.time()
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        gone = _event_after(events, "del", FIRST, killed)
        print(f"BGP: SIGKILL → out of the router's table {gone - killed:.3f} s")
        assert gone - killed <= 0.1, gone - killed
        time.sleep(0.2)
        left = [p for p in world.pids("a") if b"exabgp" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert not left, "ExaBGP outlived tidegate"


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="Debian's chromium and chromium-driver are not installed (scripts/test does)")
def test_the_dashboard_shows_each_session_and_the_routes_it_carries(tmp_path):
    """The dashboard of a node with sessions, in headless Chromium (reaching the node's admin listener through
    a forwarded port): the session that is up, the one that is not, and each announced prefix with its next
    hop, Services (a Gateway's too), pods and Link Bandwidth."""
    from tests.test_dashboard import ARTIFACTS, _browser

    with ExitStack() as stack:
        world = stack.enter_context(lab({"a": 1, "router": 254}))
        _bird(stack, world, _bird_conf(world, tmp_path / "bird.conf"))
        config = tmp_path / "config"
        config.mkdir()
        (config / "lab.yaml").write_text(_objects(world) + _service("first", FIRST, world.v4("a"), weighted=True)
                                         + _gateway_to_first())
        stack.enter_context(process(world.exec_args(
            "a", *TIDEGATE, "run", "-f", str(config), "--node", "node-a", "--admin", "127.0.0.1:9900", "--bind",
            "127.0.0.1"), tmp_path / "tidegate.log"))
        wait_until(lambda: f"{EDGE} via {world.v4('a')}" in world.run("router", "ip", "route"), timeout=30,
                   what="the router to learn the Gateway's address")
        port = stack.enter_context(world.forwarded("a", 9900))
        driver = _browser(tmp_path / "chromium-profile")
        stack.callback(driver.quit)
        driver.get(f"http://127.0.0.1:{port}/dashboard/")

        def rows(key: str, count: int) -> dict[str, str] | None:  # read in one step: the tables are redrawn
            found = dict(driver.execute_script(
                f"return [...document.querySelectorAll('tr[data-{key}]')].map((r) => [r.dataset.{key}, r.innerText])"))
            return found if len(found) == count else None

        sessions = wait_until(lambda: rows("session", 2), timeout=15, what="both sessions on the dashboard")
        router, silent = sessions["metallb-system/router"].split("\t"), sessions["metallb-system/silent"].split("\t")
        assert router[1:3] == [world.v4("router"), "up"] and router[4] == "2", sessions  # two prefixes sent
        assert silent[2] != "up" and silent[4] == "0", sessions
        routes = wait_until(lambda: rows("prefix", 2), timeout=15, what="the routes on the dashboard")
        first, edge = routes[f"{FIRST}/32"], routes[f"{EDGE}/32"]
        assert "default/first" in first and "self" in first and "125000 B/s" in first and "64513:100" in first, routes
        assert "Gateway default/edge" in edge and "B/s" not in edge, routes
        service = driver.execute_script(f"return document.querySelector('tr[data-address=\"{FIRST}\"]').innerText")
        assert "BGP" in service, service
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard-bgp.png"))


def test_status_with_a_node_shows_the_routes_it_would_announce(tmp_path):
    """`tidegate status --node` (offline): each Service's BGP routes from that node, with the pods behind a
    weighted route."""
    import yaml

    from tests.test_cli import tidegate

    source = Path(__file__).resolve().parent.parent / "testdata" / "bgp" / "weights.in.yaml"
    (tmp_path / "weights.yaml").write_text(source.read_text())
    result = tidegate("status", str(tmp_path), "--node", "node-a")
    assert result.returncode == 0, result.stderr
    entries = {e["name"]: e for e in yaml.safe_load(result.stdout) if e["kind"] == "Service"}
    assert entries["weighted"]["bgp"] == [{"session": "metallb-system/router", "prefix": "198.18.1.1/32", "pods": 3}]
    assert entries["equal"]["bgp"] == [{"session": "metallb-system/router", "prefix": "198.18.1.2/32"}]


def test_the_exabgp_configuration_says_what_the_bgppeer_says():
    from tidegate.announce.bgp import announce_command, exabgp_config, withdraw_command
    from tidegate.announce.bgp_plan import BGPRoute, BGPSession

    session = BGPSession(name="metallb-system/tor", peer_address="10.0.1.1", peer_asn=64500, my_asn=64500,
                         peer_port=1179, hold_time=9, keepalive_time=3, password='pa"ss', ebgp_multihop=True,
                         graceful_restart=True)
    config = exabgp_config([session], {"metallb-system/tor": "10.0.1.10"}, "10.0.1.10", ["bridge", "/sock"])
    for line in ("neighbor 10.0.1.1 {", "local-address 10.0.1.10;", "local-as 64500;", "peer-as 64500;",
                 "hold-time 9;", "connect 1179;", 'md5-password "pa\\"ss";', "outgoing-ttl 255;",
                 "family { ipv4 unicast; }", "capability { graceful-restart 120; }", "adj-rib-out false;",
                 "manual-eor true;", "run bridge /sock;"):
        assert line in config, (line, config)
    route = BGPRoute(prefix="198.18.1.1/32", local_pref=200, communities=("64500:1",),
                     large_communities=("64500:1:2",), link_bandwidth=(64500, 375000))
    assert announce_command("10.0.1.1", route) == (
        "neighbor 10.0.1.1 announce route 198.18.1.1/32 next-hop self local-preference 200 community [64500:1] "
        "large-community [64500:1:2] extended-community [bandwidth:64500:375000]")
    assert withdraw_command("10.0.1.1", "198.18.1.1/32") == "neighbor 10.0.1.1 withdraw route 198.18.1.1/32 " \
        "next-hop self"
    assert json.loads(json.dumps({"ok": True}))  # the module imports without a running loop


def test_graceful_restart_keeps_the_routes_across_a_restart_of_tidegate(tmp_path):
    """enableGracefulRestart: a stop drops the session without a Cease, the router (BIRD with `graceful restart
    on`) keeps the route as stale, the next start sends it again then End-of-RIB: the route never leaves the
    router's table. Without graceful restart a clean stop withdraws it (the Cease)."""
    with ExitStack() as stack:
        world = stack.enter_context(lab({"a": 1, "router": 254}))
        conf = _bird_conf(world, tmp_path / "bird.conf")
        conf.write_text(conf.read_text().replace("hold time 9;", "hold time 9;\n  graceful restart on;"))
        _bird(stack, world, conf)
        events = tmp_path / "routes.log"
        stack.enter_context(process(world.exec_args("router", "ip", "-ts", "monitor", "route"), events))
        config = tmp_path / "config"
        config.mkdir()
        objects = _objects(world).replace("holdTime: 9s}", "holdTime: 9s, enableGracefulRestart: true}")
        (config / "lab.yaml").write_text(objects + _service("first", FIRST, world.v4("a")))
        args = world.exec_args("a", *TIDEGATE, "run", "-f", str(config), "--node", "node-a", "--admin",
                               "127.0.0.1:9900", "--bind", "127.0.0.1", "--grace", "0")
        learned = f"{FIRST} via {world.v4('a')}"
        with process(args, tmp_path / "tidegate-1.log") as first_run:
            wait_until(lambda: learned in world.run("router", "ip", "route"), timeout=30,
                       what="the router to learn the address")
            first_run.terminate()
            first_run.wait(15)
        stopped = time.time()
        time.sleep(1.0)
        assert learned in world.run("router", "ip", "route"), "the router dropped the route at a graceful stop"
        with process(args, tmp_path / "tidegate-2.log"):
            wait_until(lambda: "metallb-system/router: announced" in (tmp_path / "tidegate-2.log").read_text(),
                       timeout=30, what="the restarted node to announce again")
            time.sleep(1.0)  # past the End-of-RIB: stale routes would be flushed now
            assert learned in world.run("router", "ip", "route")
            shown = world.run("router", "birdc", "-s", str(tmp_path / "bird.ctl"), "show", "route", "for", FIRST,
                              "all")
            assert FIRST in shown and "stale" not in shown.lower(), shown
        assert not [e for e in _route_events(events) if e[1] == "del" and e[2] == FIRST and e[0] < stopped + 30], \
            "the route left the router's table during the restart"


FRR = Path("/usr/lib/frr")

# The client behind the router: `count` new connections to an address, each a GET /pod; the pods' names
# counted (bounded in count and time).
SPREAD = r"""
import collections, json, socket, sys, time
host, count = sys.argv[1], int(sys.argv[2])
seen = collections.Counter()
deadline = time.time() + 90
for _ in range(count):
    if time.time() > deadline:
        break
    try:
        with socket.create_connection((host, 80), timeout=3) as s:
            s.sendall(b"GET /pod HTTP/1.0\r\nHost: spread\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        seen[data.split(b"\r\n\r\n", 1)[1].decode().strip() if data.startswith(b"HTTP/1.0 200") else "error"] += 1
    except OSError as exc:
        seen["error"] += 1
        seen.setdefault(f"first error: {exc}", 1)
print(json.dumps(seen))
"""


def _frr(world, stack: ExitStack, tmp: Path, neighbours: list[str]) -> Path:
    """FRR (zebra and bgpd) in the router namespace: eBGP to each node, ECMP over up to 8 paths; it turns the
    Link Bandwidth extended community into next-hop weights by itself."""
    # The daemons run as Debian's frr user, who cannot enter pytest's private tmp_path
    run = Path(tempfile.mkdtemp(prefix="tidegate-frr-"))
    stack.callback(shutil.rmtree, run, True)
    run.chmod(0o777)
    (run / "zebra.conf").write_text("hostname router\n")
    (run / "bgpd.conf").write_text(
        f"frr defaults traditional\nrouter bgp 64512\n bgp router-id {world.v4('router')}\n"
        " no bgp ebgp-requires-policy\n bgp bestpath as-path multipath-relax\n"
        + "".join(f" neighbor {n} remote-as 64513\n neighbor {n} timers 3 9\n" for n in neighbours)
        + " address-family ipv4 unicast\n  maximum-paths 8\n exit-address-family\n")
    common = ["-u", "frr", "-g", "frr", "-z", str(run / "zserv.api"), "--vty_socket", str(run)]
    stack.enter_context(process(world.exec_args("router", str(FRR / "zebra"), *common, "-i", str(run / "zebra.pid"),
                                                "-f", str(run / "zebra.conf")), tmp / "zebra.log"))
    wait_until(lambda: (run / "zserv.api").exists(), timeout=10, what="zebra's socket")
    stack.enter_context(process(world.exec_args("router", str(FRR / "bgpd"), *common, "-i", str(run / "bgpd.pid"),
                                                "-f", str(run / "bgpd.conf")), tmp / "bgpd.log"))
    return run


@pytest.mark.skipif(not (FRR / "bgpd").exists(), reason="FRR (Debian frr) is not installed; scripts/test installs it")
def test_weights_by_pods_per_node_give_each_pod_a_quarter_through_a_real_frr_router(tmp_path):
    """The brief's example: three pods on node A, one on node B, behind FRR with ECMP. With
    tidegate.io/weighting: endpoints the router splits connections 3:1 between the nodes, so each pod gets a
    quarter; without it, 1:1, and the lone pod gets half."""
    pods = {"pa1": "a", "pa2": "a", "pa3": "a", "pb1": "b", "client": "router"}
    with ExitStack() as stack:
        world = stack.enter_context(lab({"a": 1, "b": 2, "router": 254}, pods=pods))
        world.run("router", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        world.run("router", "sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1")
        client_net = f"{world.pod_v4('client').rsplit('.', 1)[0]}.0/24"
        for node in ("a", "b"):
            world.run(node, "ip", "route", "add", client_net, "via", world.v4("router"))
        _frr(world, stack, tmp_path, [world.v4("a"), world.v4("b")])
        for pod in ("pa1", "pa2", "pa3", "pb1"):
            stack.enter_context(process(world.exec_args(pod, sys.executable, "-c", POD, pod, world.pod_v4(pod), "8080",
                                                        "5353", str(tmp_path / f"www-{pod}")), tmp_path / f"{pod}.log"))
        endpoints = "".join(f"\n- {{addresses: ['{world.pod_v4(p)}'], nodeName: node-{n}, targetRef: {{kind: Pod, "
                            f"name: {p}}}}}" for p, n in pods.items() if p != "client")
        services = ""
        for name, address, weighting in (("weighted", FIRST, "tidegate.io/weighting: endpoints, "),
                                         ("plain", SECOND, "")):
            services += f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, annotations: {{{weighting}metallb.io/loadBalancerIPs: "{address}"}}}}
spec: {{type: LoadBalancer, loadBalancerClass: tidegate.io/lb, externalTrafficPolicy: Local,
        ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:{endpoints}
"""
        config = tmp_path / "config"
        config.mkdir()
        (config / "lab.yaml").write_text(f"""apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status: {{addresses: [{{type: InternalIP, address: {world.v4("a")}}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-b}}
status: {{addresses: [{{type: InternalIP, address: {world.v4("b")}}}]}}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {{name: router, namespace: metallb-system}}
spec: {{myASN: 64513, peerASN: 64512, peerAddress: {world.v4("router")}, holdTime: 9s}}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: routed, namespace: metallb-system}}
spec: {{addresses: [198.18.1.0/28]}}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {{name: routed, namespace: metallb-system}}
{services}""")
        for node in ("a", "b"):
            stack.enter_context(process(world.exec_args(
                node, *TIDEGATE, "run", "-f", str(config), "--node", f"node-{node}", "--admin", "127.0.0.1:9900",
                "--bind", "127.0.0.1"), tmp_path / f"tidegate-{node}.log"))

        def both_paths(address: str) -> str | None:
            shown = world.run("router", "ip", "route", "show", address)
            return shown if shown.count("nexthop via") == 2 else None

        weighted = wait_until(lambda: both_paths(FIRST), timeout=60, what="two weighted paths at the router")
        plain = wait_until(lambda: both_paths(SECOND), timeout=30, what="two paths at the router")
        print(f"FRR's routes:\n{weighted}{plain}")
        weights = dict(re.findall(r"nexthop via (\S+) dev \S+ weight (\d+)", weighted))
        assert weights == {world.v4("a"): "75", world.v4("b"): "25"}, weighted
        assert "weight 1 " in plain.replace("\n", " ") + " " and "weight 75" not in plain, plain

        def spread(address: str, count: int) -> dict[str, float]:
            seen = json.loads(world.run("client", sys.executable, "-c", SPREAD, address, str(count)))
            assert seen.get("error", 0) <= count * 0.01, seen
            return {pod: seen.get(pod, 0) / count for pod in ("pa1", "pa2", "pa3", "pb1")}

        shares = spread(FIRST, 2000)
        print(f"weighted, 2000 connections: {shares}")
        assert abs(shares["pa1"] + shares["pa2"] + shares["pa3"] - 0.75) <= 0.05, shares
        assert all(abs(share - 0.25) <= 0.05 for share in shares.values()), shares
        shares = spread(SECOND, 1000)
        print(f"equal ECMP, 1000 connections: {shares}")
        assert abs(shares["pb1"] - 0.5) <= 0.05, shares


def test_a_missing_or_crashing_exabgp_is_reported_and_started_again_with_backoff(tmp_path):
    """No ExaBGP: said once, nothing retried in a loop. An ExaBGP that exits at once: each exit is counted and
    reported with its code, and it is started again after 1 s, then 2 s (backoff); sessions stay down."""
    import asyncio

    from tidegate.announce.bgp import ExaBGPSpeaker
    from tidegate.announce.bgp_plan import BGPSession

    crashing = tmp_path / "exabgp"
    crashing.write_text("#!/bin/sh\necho 'exabgp: cannot read the configuration'\nexit 3\n")
    crashing.chmod(0o755)
    session = BGPSession(name="ns/router", peer_address="192.0.2.254", peer_asn=64512, my_asn=64513)

    async def scenario() -> tuple[str, list[tuple[float, int, str]], str]:
        missing = ExaBGPSpeaker("192.0.2.1", exabgp="")
        await missing.start()
        await missing.apply([session], {})
        await asyncio.sleep(0.3)
        said = missing.problem
        assert missing.restarts == 0
        await missing.close()
        speaker = ExaBGPSpeaker("192.0.2.1", exabgp=str(crashing))
        await speaker.start()
        began = time.monotonic()
        await speaker.apply([session], {})
        seen: list[tuple[float, int, str]] = []
        while time.monotonic() - began < 5 and speaker.restarts < 3:
            if not seen or seen[-1][1] != speaker.restarts:
                seen.append((time.monotonic() - began, speaker.restarts, speaker.problem))
            await asyncio.sleep(0.02)
        seen.append((time.monotonic() - began, speaker.restarts, speaker.problem))
        state = speaker.sessions()[0].state
        await speaker.close()
        return said, seen, state

    said, seen, state = asyncio.run(scenario())
    assert "ExaBGP is not installed" in said, said
    by_count = {count: (when, problem) for when, count, problem in seen}
    assert by_count[1][1] == "ExaBGP exited (3); starting it again in 1 s", seen
    assert by_count[2][1] == "ExaBGP exited (3); starting it again in 2 s", seen
    assert 0.9 <= by_count[2][0] - by_count[1][0] <= 1.6, seen  # the first wait: 1 s
    assert 3 not in by_count or by_count[3][0] - by_count[2][0] >= 1.9, seen  # then 2 s
    assert state != "up"


def test_new_weights_replace_a_route_after_a_debounce_and_new_prefixes_go_at_once():
    """Pods rolling out change a route's weight many times a second: the speaker sends the last weight once,
    a second later, as a new announcement of the same prefix (no withdraw). A new prefix or a withdrawal is
    not held back."""
    import asyncio

    from tidegate.announce.bgp import ExaBGPSpeaker
    from tidegate.announce.bgp_plan import BGPRoute, BGPSession

    class Wire:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def write(self, data: bytes) -> None:
            self.lines += data.decode().splitlines()

        def close(self) -> None:
            pass

    async def scenario() -> list[list[str]]:
        speaker = ExaBGPSpeaker("192.0.2.1", exabgp="/nonexistent")
        speaker.debounce = 0.2
        wire = Wire()
        speaker._writer = wire  # type: ignore[assignment]
        session = BGPSession(name="ns/router", peer_address="192.0.2.254", peer_asn=64512, my_asn=64513)

        def weighted(pods: int, *extra: str) -> dict:
            routes = [BGPRoute("198.18.1.1/32", link_bandwidth=(64513, pods * 125000), pods=pods)]
            return {"ns/router": tuple(routes + [BGPRoute(p) for p in extra])}

        await speaker.apply([session], weighted(3))
        speaker._set_state(speaker.states["ns/router"], "up")
        steps = [list(wire.lines)]
        for pods in (2, 1, 2):
            wire.lines.clear()
            await speaker.apply([session], weighted(pods))
            steps.append(list(wire.lines))
        wire.lines.clear()
        await speaker.apply([session], weighted(2, "198.18.1.2/32"))
        steps.append(list(wire.lines))
        wire.lines.clear()
        await asyncio.sleep(0.3)
        steps.append(list(wire.lines))
        await speaker.close()
        return steps

    first, *changes, added, flushed = asyncio.run(scenario())
    assert first == ["neighbor 192.0.2.254 announce route 198.18.1.1/32 next-hop self extended-community "
                     "[bandwidth:64513:375000]", "neighbor 192.0.2.254 announce eor ipv4 unicast"]
    assert changes == [[], [], []]  # held back
    assert added == ["neighbor 192.0.2.254 announce route 198.18.1.2/32 next-hop self"]
    assert flushed == ["neighbor 192.0.2.254 announce route 198.18.1.1/32 next-hop self extended-community "
                       "[bandwidth:64513:250000]"]


def test_sessions_that_fail_are_reported_and_the_others_keep_their_routes(tmp_path):
    """Bad input and bad days: a password the router does not have (TCP MD5: its kernel drops our signed
    segments), a router that refuses our AS, ExaBGP killed, a cut link. Each is reported (session state,
    last error, metrics); the good session keeps its route, ExaBGP is started again and announces again, and
    the cut link's route leaves the router within its hold time."""
    with ExitStack() as stack:
        # Three routers, one BIRD each (BIRD lets one protocol at a time talk to a neighbour address).
        world = stack.enter_context(lab({"a": 1, "router": 254, "pw": 253, "as": 252}))
        for role, extra in (("router", "passive on; error wait time 1, 1;  # the nodes connect: tidegate does not "
                                       "listen on 179"), ("pw", ""), ("as", "")):
            peer_as = 64999 if role == "as" else 64513
            conf = tmp_path / f"bird-{role}.conf"
            conf.write_text(f"""
router id {world.v4(role)};
protocol device {{ scan time 1; }}
protocol kernel {{ ipv4 {{ export all; }}; merge paths on; }}
protocol bgp node_a {{ local {world.v4(role)} as 64512; neighbor {world.v4("a")} as {peer_as}; hold time 3;
  {extra}
  ipv4 {{ import all; export none; }}; }}
""")
            _bird(stack, world, conf, role)
        events = tmp_path / "routes.log"
        stack.enter_context(process(world.exec_args("router", "ip", "-ts", "monitor", "route"), events))
        config = tmp_path / "config"
        config.mkdir()
        (config / "lab.yaml").write_text(f"""apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status: {{addresses: [{{type: InternalIP, address: {world.v4("a")}}}]}}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {{name: good, namespace: metallb-system}}
spec: {{myASN: 64513, peerASN: 64512, peerAddress: 198.18.0.254, holdTime: 3s}}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {{name: md5, namespace: metallb-system}}
spec: {{myASN: 64513, peerASN: 64512, peerAddress: 198.18.0.253, password: wrong}}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {{name: other-as, namespace: metallb-system}}
spec: {{myASN: 64513, peerASN: 64512, peerAddress: 198.18.0.252}}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: routed, namespace: metallb-system}}
spec: {{addresses: [198.18.1.0/28]}}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {{name: routed, namespace: metallb-system}}
""" + _service("first", FIRST, world.v4("a")))
        log = tmp_path / "tidegate.log"
        stack.enter_context(process(world.exec_args(
            "a", *TIDEGATE, "run", "-f", str(config), "--node", "node-a", "--admin", "127.0.0.1:9900", "--bind",
            "127.0.0.1"), log))
        learned = f"{FIRST} via {world.v4('a')}"
        wait_until(lambda: learned in world.run("router", "ip", "route"), timeout=30, what="the good session's route")
        time.sleep(3)  # the bad sessions have tried by now
        sessions = {s["name"].split("/")[1]: s for s in _bgp(world)["sessions"]}
        assert sessions["good"]["state"] == "up"
        assert sessions["md5"]["state"] != "up" and sessions["other-as"]["state"] != "up", sessions
        refused = sessions["other-as"].get("lastError", "")  # BIRD's NOTIFICATION, or its closing the connection
        assert "Bad Peer AS" in refused or "refuses this session" in refused, sessions["other-as"]

        # ExaBGP killed: reported, started again, the route announced again.
        [speaker] = [p for p in world.pids("a") if b"exabgp\x00server" in Path(f"/proc/{p}/cmdline").read_bytes()]
        world.run("a", "kill", "-9", str(speaker))
        wait_until(lambda: "ExaBGP exited" in log.read_text(), timeout=10, what="the crash reported")
        wait_until(lambda: _bgp(world)["restarts"] == 1 and {s["name"].split("/")[1]: s["state"]
                                                             for s in _bgp(world)["sessions"]}["good"] == "up",
                   timeout=15, what="ExaBGP started again with the good session up")
        wait_until(lambda: learned in world.run("router", "ip", "route"), timeout=10, what="the route back")
        metrics = world.python("a", f"import urllib.request;print(urllib.request.urlopen('{ADMIN}/metrics')"
                                    ".read().decode())")
        assert "tidegate_bgp_speaker_restarts_total 1.0" in metrics

        # The link cut: the router drops the route when the hold time (3 s) runs out. The hold timer restarts on
        # every keepalive, and BIRD then writes the kernel table: seen up to 3.73 s on the CI machine, so the bound
        # is the hold time and 1.5 s, far below what a route kept by graceful restart or a missed cut would take.
        cut = time.time()
        world.link("a", up=False)
        gone = _event_after(events, "del", FIRST, cut)
        print(f"BGP: link cut → out of the router's table {gone - cut:.2f} s (hold time 3 s)")
        assert gone - cut <= 4.5, gone - cut
