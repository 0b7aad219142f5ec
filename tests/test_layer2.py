"""LoadBalancer addresses announced in Layer 2, on a lab of network namespaces (tests/netns.py): two nodes
running `tidegate run --node`, a client on the same segment, pods on both nodes.

The client reaches a Service's IPv4 and IPv6 addresses over TCP and UDP; the node announcing an address is
killed (SIGKILL) or cut off, and the client's probes (every 100 ms) find the other node within 1 s of its
detecting the loss (detection within --node-timeout 2 s plus a heartbeat). Ten addresses spread five and
five. A killed node leaves no address on an interface and no neighbour entry; its next start removes the
local routes it left.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from tests.harness import TIDEGATE, process, wait_until
from tests.manifests import gateway
from tests.netns import POD, PROBE, can_make_namespaces, lab, read_probes

WHY_NOT = can_make_namespaces()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)

NODES = {"a": 1, "b": 2}
ADMIN = "http://127.0.0.1:9900"
NODE_TIMEOUT = 2.0
VIP4, VIP6 = "198.18.0.100", "2001:db8::100"


def _config(tmp: Path) -> Path:
    extras = "".join(f"""---
apiVersion: v1
kind: Service
metadata: {{name: extra-{i}, namespace: default}}
spec: {{type: LoadBalancer, loadBalancerClass: tidegate.io/lb, ports: [{{port: 80}}]}}
""" for i in range(8))
    services = ""
    for family, name, vip, pods in (("IPv4", "web4", VIP4, [("198.18.0.1", "node-a", "pod-a"), ("198.18.0.2", "node-b", "pod-b")]),
                               ("IPv6", "web6", VIP6, [("2001:db8::1", "node-a", "pod-a"), ("2001:db8::2", "node-b",
                                                                                        "pod-b")])):
        endpoints = "".join(f"\n- {{addresses: ['{address}'], nodeName: {node}, targetRef: {{kind: Pod, name: {pod}}}}}"
                            for address, node, pod in pods)
        services += f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, annotations: {{metallb.io/loadBalancerIPs: "{vip}"}}}}
spec:
  type: LoadBalancer
  loadBalancerClass: tidegate.io/lb
  ipFamilies: [{family}]
  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: {family}
ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:{endpoints}
"""
    config = tmp / "config"
    config.mkdir()
    (config / "lab.yaml").write_text(f"""apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status: {{addresses: [{{type: InternalIP, address: 198.18.0.1}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-b}}
status: {{addresses: [{{type: InternalIP, address: 198.18.0.2}}]}}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: lab, namespace: metallb-system}}
spec:
  addresses: [{VIP4}-198.18.0.119, {VIP6}-2001:db8::119]
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {{name: lab, namespace: metallb-system}}
spec: {{ipAddressPools: [lab]}}
{services}{extras}""")
    return config


@contextmanager
def _node(world, role: str, config: Path, tmp: Path, log_name: str = ""):
    args = world.exec_args(role, *TIDEGATE, "run", "-f", str(config), "--node", f"node-{role}",
                           "--admin", "127.0.0.1:9900", "--bind", "127.0.0.1", "--node-timeout", str(NODE_TIMEOUT))
    with process(args, tmp / (log_name or f"tidegate-{role}.log")) as proc:
        yield proc


def _view(world, role: str) -> dict:
    return world.get_json(role, f"{ADMIN}/api/v1/loadbalancers")


def _settled(world, roles=("a", "b"), count: int = 10) -> dict[str, str] | None:
    """address -> node when every node agrees and every address is announced; else None."""
    views = []
    for role in roles:
        try:
            view = _view(world, role)
        except Exception:
            return None
        if len(view["announcements"]) != count or not all(n["up"] for n in view["nodes"]):
            return None
        views.append({a["address"]: a["node"] for a in view["announcements"]})
    if any(v != views[0] for v in views) or None in views[0].values():
        return None
    return views[0]


def _held(world, role: str) -> set[str]:
    return {a["address"] for a in _view(world, role)["announcements"] if "interfaces" in a}


def _log_time(log: Path, pattern: str) -> float:
    """The time of the first log line matching `pattern` (the log's local-time stamps)."""
    for line in log.read_text().splitlines():
        if re.search(pattern, line):
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no line matching {pattern!r} in {log}")


def _resumed_at(probes: list[dict], host: str, proto: str, after: float) -> float:
    """When `host` answered again over `proto` after `after`, for good (every later probe answered)."""
    mine = [p for p in probes if p["host"] == host and p["proto"] == proto and p["t"] > after]
    assert mine and mine[-1]["pod"], f"{host} {proto} does not answer at the end: {mine[-5:]}"
    last_failure = max((p["t"] for p in mine if not p["pod"]), default=after)
    return min(p["t"] for p in mine if p["t"] > last_failure)


@contextmanager
def _running_lab(tmp: Path, extra: str = "", count: int = 10):
    with ExitStack() as stack:
        world = stack.enter_context(lab({**NODES, "client": 10}))
        config = _config(tmp)
        if extra:
            (config / "extra.yaml").write_text(extra)
        for role, host in NODES.items():
            for address in (f"198.18.0.{host}", f"2001:db8::{host}"):
                stack.enter_context(process(world.exec_args(role, sys.executable, "-c", POD, f"pod-{role}",
                                                            address, "8080", "5353", str(tmp / f"www-{role}")),
                                            tmp / f"pod-{role}-{address}.log"))
        nodes = {role: stack.enter_context(_node(world, role, config, tmp)) for role in NODES}
        placed = wait_until(lambda: _settled(world, count=count), timeout=30,
                            what="both nodes to agree on the announcements")
        stop = tmp / "stop-probing"
        probes = tmp / "probes.jsonl"
        targets = f'[["{VIP4}", 80, 53], ["{VIP6}", 80, 53]]'
        stack.enter_context(process(world.exec_args("client", sys.executable, "-c", PROBE, targets, "0.1",
                                                    str(stop)), probes))
        stack.callback(stop.write_text, "")
        yield world, config, nodes, placed, probes


def _gateway_pod(world) -> str:
    """The pod that answers the client through the Gateway on its pool address."""
    return world.python("client", f"import urllib.request;print(urllib.request.urlopen('http://{EDGE}:8081/pod', "
                                  "timeout=5).read().decode())").strip()


def _first_answers(probes: Path) -> None:
    wait_until(lambda: {(p["host"], p["proto"]) for p in read_probes(probes) if p["pod"]} == {
        (VIP4, "tcp"), (VIP4, "udp"), (VIP6, "tcp"), (VIP6, "udp")}, timeout=15,
        what="the client to reach both addresses over TCP and UDP")


def test_sigkill_of_the_announcing_node_moves_its_addresses_within_a_second_of_detection(tmp_path):
    with _running_lab(tmp_path) as (world, config, nodes, placed, probes):
        # Ten addresses, two nodes: five each, and each node holds what both agree it holds.
        assert sorted(Counter(placed.values()).values()) == [5, 5], placed
        for role in NODES:
            assert _held(world, role) == {a for a, n in placed.items() if n == f"node-{role}"}
        # Visible: status and metrics say who announces what, since when, and what was sent.
        web4 = next(e for e in world.get_json("a", f"{ADMIN}/api/v1/status") if e["name"] == "web4")
        assert web4["status"]["loadBalancer"]["ingress"] == [{"ip": VIP4, "ipMode": "Proxy"}]
        assert web4["announcedBy"][0]["node"] == placed[VIP4] and web4["announcedBy"][0]["since"]
        holder = placed[VIP4].removeprefix("node-")
        metrics = world.python(holder, f"import urllib.request;print(urllib.request.urlopen('{ADMIN}/metrics')"
                                       ".read().decode())")
        assert f'tidegate_l2_announced{{address="{VIP4}"}} 1.0' in metrics
        assert re.search(r"^tidegate_l2_gratuitous_packets_total [1-9]", metrics, re.M)
        assert 'tidegate_node_up{node="node-a"} 1.0' in metrics and 'tidegate_node_up{node="node-b"} 1.0' in metrics
        assert 'tidegate_address_pool_assigned{family="ipv4",pool="lab"} 9.0' in metrics
        _first_answers(probes)
        answered = {p["pod"] for p in read_probes(probes) if p["pod"]}
        assert answered <= {"pod-a", "pod-b"} and answered, answered

        victim = placed[VIP4].removeprefix("node-")
        survivor = next(r for r in NODES if r != victim)
        killed_at = time.time()
        for pid in world.pids(victim):
            if "tidegate" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                subprocess.run(["kill", "-9", str(pid)])
        nodes[victim].wait(10)

        wait_until(lambda: VIP4 in _held(world, survivor), timeout=10, what="the survivor to take the address")
        time.sleep(1.5)
        detected = _log_time(tmp_path / f"tidegate-{survivor}.log", f"node node-{victim} is down")
        got = read_probes(probes)
        resumed = {proto: _resumed_at(got, VIP4, proto, killed_at) for proto in ("tcp", "udp")}
        print(f"SIGKILL: detected after {detected - killed_at:.2f} s; " + ", ".join(
            f"{proto} answered again {when - detected:.2f} s after detection" for proto, when in resumed.items()))
        assert detected - killed_at <= NODE_TIMEOUT + 1.0, detected - killed_at
        for proto, when in resumed.items():
            assert when - detected <= 1.0, (proto, when - detected, when - killed_at)
        # The survivor's own addresses never stopped answering.
        if placed[VIP6] == f"node-{survivor}":
            assert all(p["pod"] for p in got if p["host"] == VIP6 and p["t"] > killed_at)
        else:
            assert _resumed_at(got, VIP6, "tcp", killed_at) - detected <= 1.0

        # Nothing of tidegate's on the killed node's interfaces or neighbour table.
        addresses = world.run(victim, "ip", "-o", "addr")
        neighbours = world.run(victim, "ip", "neigh") + world.run(victim, "ip", "-6", "neigh")
        for address in placed:
            assert f" {address}/" not in addresses and not re.search(rf"^{re.escape(address)} ", neighbours, re.M)
        # Its next start removes the local routes the killed run left, then takes back its own share.
        left = world.run(victim, "ip", "route", "show", "table", "local", "proto", "116")
        assert left.strip(), "the killed run's local routes (the restart must remove them)"
        with _node(world, victim, config, tmp_path, "tidegate-restarted.log"):
            wait_until(lambda: _settled(world) == placed, timeout=30, what="the same announcements as before")
            assert "removed" in (tmp_path / "tidegate-restarted.log").read_text()
            back = time.time()
            time.sleep(2.5)
            recent = [p for p in read_probes(probes) if p["t"] > back + 1.5]
            assert recent and all(p["pod"] for p in recent), recent[-4:]


EDGE = "198.18.0.110"  # the Gateway's address, from the lab pool
WIRED = """
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: wired, namespace: metallb-system}
spec: {addresses: [198.18.0.200/32]}
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: wired, namespace: metallb-system}
spec: {ipAddressPools: [wired], interfaces: [eth9]}
---
apiVersion: v1
kind: Service
metadata: {name: wired, namespace: default, annotations: {metallb.io/address-pool: wired}}
spec: {type: LoadBalancer, loadBalancerClass: tidegate.io/lb, ports: [{port: 80}]}
---
""" + gateway(EDGE, "[{name: http, port: 8081, protocol: HTTP}]", name="edge") + """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edge, namespace: default}
spec:
  parentRefs: [{name: edge}]
  rules: [{backendRefs: [{name: web4, port: 80}]}]
"""


def test_a_cut_link_moves_the_address_and_mending_it_brings_the_node_back(tmp_path):
    # One more address, announced only from an interface no node has: its node says so, the rest works. And
    # a Gateway on a pool address, bound on both nodes (IP_FREEBIND), served where it is announced.
    with _running_lab(tmp_path, WIRED, count=12) as (world, config, nodes, placed, probes):
        assert _gateway_pod(world) in ("pod-a", "pod-b")
        wired = placed["198.18.0.200"].removeprefix("node-")
        assert "198.18.0.200" not in _held(world, wired)
        assert any("eth9" in p and "198.18.0.200" in p for p in _view(world, wired)["problems"])
        assert "interface(s) eth9 named by the L2Advertisement are not on this node" in \
            (tmp_path / f"tidegate-{wired}.log").read_text()
        _first_answers(probes)
        victim = placed[VIP6].removeprefix("node-")
        survivor = next(r for r in NODES if r != victim)
        # As the cluster would mark the cut-off node's pods not ready: only the survivor's pods from now on
        # (the L2 takeover is what is measured here, not the endpoints controller).
        text = (config / "lab.yaml").read_text()
        host = NODES[victim]
        (config / "lab.yaml").write_text(re.sub(rf"\n- {{addresses: \['(198\.18\.0\.|2001:db8::){host}'\].*", "", text))
        cut_at = time.time()
        world.link(victim, up=False)
        wait_until(lambda: VIP6 in _held(world, survivor), timeout=10, what="the survivor to take the address")
        time.sleep(1.5)
        detected = _log_time(tmp_path / f"tidegate-{survivor}.log", f"node node-{victim} is down")
        assert detected - cut_at <= NODE_TIMEOUT + 1.0
        got = read_probes(probes)
        resumed = {proto: _resumed_at(got, VIP6, proto, cut_at) for proto in ("tcp", "udp")}
        print(f"link cut: detected after {detected - cut_at:.2f} s; " + ", ".join(
            f"{proto} (IPv6) answered again {when - detected:.2f} s after detection" for proto, when in resumed.items()))
        for proto, when in resumed.items():
            assert when - detected <= 1.0, (proto, when - detected)
        # The cut-off node thinks itself alone and announces everything, to no one; mended, both agree again.
        world.link(victim, up=True)
        wait_until(lambda: _settled(world, count=12) == placed, timeout=30, what="the announcements before the cut")
        assert _gateway_pod(world) in ("pod-a", "pod-b")
        mended = time.time()
        time.sleep(3.0)
        recent = [p for p in read_probes(probes) if p["t"] > mended + 1.5]
        assert recent and all(p["pod"] for p in recent), recent[-4:]

        # A clean stop (SIGTERM, as in a rolling update) says goodbye: its addresses move at once, with no
        # wait for the heartbeat to time out.
        leaving = placed[VIP4].removeprefix("node-")
        staying = next(r for r in NODES if r != leaving)
        stopped_at = time.time()
        nodes[leaving].terminate()
        wait_until(lambda: VIP4 in _held(world, staying), timeout=5, what="the address to move on goodbye")
        time.sleep(1.0)
        got = read_probes(probes)
        resumed = {proto: _resumed_at(got, VIP4, proto, stopped_at) - stopped_at for proto in ("tcp", "udp")}
        print("clean stop: " + ", ".join(f"{proto} answered by the other node {when:.2f} s after SIGTERM"
                                          for proto, when in resumed.items()))
        assert all(when <= 1.0 for when in resumed.values()), resumed
        assert f"node node-{leaving} is stopping" in (tmp_path / f"tidegate-{staying}.log").read_text()
        nodes[leaving].wait(20)
        assert not world.run(leaving, "ip", "route", "show", "table", "local", "proto", "116").strip()


def test_answers_leave_from_the_interface_whose_subnet_holds_the_address_or_the_ones_named(tmp_path):
    """MetalLB answered ARP from every interface (its issues 277, 316). Here each node has eth0 on the
    addresses' segment and eth1 on another; a host on the other segment that believes the address is on its
    link gets no answer, until an L2Advertisement names eth1 too."""
    with lab(NODES | {"client": 10}, second={**NODES, "far": 20}) as world:
        config = _config(tmp_path)
        world.run("far", "ip", "route", "add", "198.18.0.0/24", "dev", "eth1")  # the address "on its link"
        with _node(world, "a", config, tmp_path), _node(world, "b", config, tmp_path):
            wait_until(lambda: _settled(world), timeout=30, what="both nodes to agree on the announcements")
            near = f"import socket; socket.create_connection(('{VIP4}', 80), timeout=1).close(); print('ok')"
            wait_until(lambda: world.python("client", near).strip() == "ok", what="the address from its segment")
            far = world.run("far", sys.executable, "-c", near, check=False)
            assert "ok" not in far  # nobody answered its ARP request on the other segment
            text = (config / "lab.yaml").read_text()
            (config / "lab.yaml").write_text(text.replace("spec: {ipAddressPools: [lab]}",
                                                          "spec: {ipAddressPools: [lab], interfaces: [eth0, eth1]}"))
            wait_until(lambda: world.python("far", near).strip() == "ok", timeout=15,
                       what="the address from the other segment once eth1 is named")
