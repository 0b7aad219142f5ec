"""The pure parts of Layer 2 announcement: who announces what (election), the packets (ARP, NDP), the
heartbeat's format, and which nodes may announce an address (translate/loadbalancers.py)."""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.manifests import gateway
from tidegate.announce.election import Candidacy, assign, baseline
from tidegate.announce.l2 import (arp_reply, gratuitous_arp, neighbour_advertisement, parse_arp_request,
                                  parse_neighbour_solicitation, solicited_node)
from tidegate.announce.members import answer, goodbye, parse_answer, parse_goodbye, probe
from tidegate.resources.loader import load_text
from tidegate.translate import TranslateOptions, translate

MAC = bytes.fromhex("020000000001")
CLIENT_MAC = bytes.fromhex("02000000000a")


def _addresses(count: int) -> list[str]:
    return [f"198.18.{i // 250}.{i % 250}" for i in range(count)]


@settings(max_examples=150, deadline=None)
@given(nodes=st.integers(1, 7), count=st.integers(0, 60), dead=st.integers(0, 6))
def test_addresses_spread_evenly_and_a_lost_node_moves_only_its_own(nodes, count, dead):
    names = [f"node-{i}" for i in range(nodes)]
    candidacies = [Candidacy(a, tuple(names)) for a in _addresses(count)]
    everyone = assign(candidacies, None)
    loads = Counter(everyone.values())
    assert len(everyone) == count
    assert max(loads.values(), default=0) - min([loads[n] for n in names] if count else [0]) <= 1
    lost = names[dead % nodes]
    survivors = set(names) - {lost}
    after = assign(candidacies, survivors)
    moved = [a for a in everyone if after.get(a) != everyone[a]]
    assert all(everyone[a] == lost for a in moved)
    if survivors:
        assert len(after) == count and lost not in after.values()
        loads_after = Counter(after.values())  # the lost share goes to the least loaded
        assert max(loads_after.values(), default=0) - min(loads_after[n] for n in survivors) <= 1
    assert assign(candidacies, set(names)) == everyone  # every node up: the baseline itself


def test_ten_addresses_on_two_nodes_are_five_and_five_and_every_node_computes_the_same():
    candidacies = [Candidacy(a, ("node-a", "node-b")) for a in _addresses(10)]
    assert sorted(Counter(baseline(candidacies).values()).values()) == [5, 5]
    assert baseline(list(reversed(candidacies))) == baseline(candidacies)


def test_candidates_limit_where_an_address_can_go_and_preferred_nodes_come_first():
    local = Candidacy("198.18.0.1", ("node-b",))
    preferred = Candidacy("198.18.0.2", ("node-a", "node-b", "node-c"), scores=(("node-c", 50),))
    chosen = assign([local, preferred], None)
    assert chosen == {"198.18.0.1": "node-b", "198.18.0.2": "node-c"}
    assert assign([local, preferred], {"node-a", "node-b"})["198.18.0.2"] in ("node-a", "node-b")
    assert "198.18.0.1" not in assign([local], {"node-a"})  # its only candidate is down: not announced


def test_arp_request_gets_a_reply_from_our_mac_and_gratuitous_arp_carries_the_address():
    vip = ipaddress.IPv4Address("198.18.0.100").packed
    client_ip = ipaddress.IPv4Address("198.18.0.10").packed
    request = (b"\xff" * 6 + CLIENT_MAC + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
               + CLIENT_MAC + client_ip + b"\x00" * 6 + vip)
    parsed = parse_arp_request(request)
    assert parsed == (CLIENT_MAC, client_ip, vip)
    reply = arp_reply(MAC, parsed)
    assert reply[:6] == CLIENT_MAC and reply[6:12] == MAC and reply[20:22] == b"\x00\x02"
    assert reply[22:28] == MAC and reply[28:32] == vip and reply[32:38] == CLIENT_MAC and reply[38:42] == client_ip
    assert parse_arp_request(reply) is None  # a reply is not a request
    assert parse_arp_request(request[:30]) is None
    for frame in gratuitous_arp(MAC, vip):
        assert frame[:6] == b"\xff" * 6 and frame[28:32] == vip and frame[38:42] == vip


def test_neighbour_solicitation_target_and_the_advertisement_that_answers_it():
    vip = ipaddress.IPv6Address("2001:db8::100")
    solicitation = struct.pack("!BBHI", 135, 0, 0, 0) + vip.packed + bytes([1, 1]) + CLIENT_MAC
    assert parse_neighbour_solicitation(solicitation) == vip.packed
    assert parse_neighbour_solicitation(b"\x88" + solicitation[1:]) is None  # an advertisement
    advert = neighbour_advertisement(MAC, vip.packed, solicited=True)
    assert advert[0] == 136 and struct.unpack("!I", advert[4:8])[0] == 0x60000000
    assert advert[8:24] == vip.packed and advert[24:26] == b"\x02\x01" and advert[26:32] == MAC
    assert struct.unpack("!I", neighbour_advertisement(MAC, vip.packed, solicited=False)[4:8])[0] == 0x20000000
    assert str(solicited_node(vip)) == "ff02::1:ff00:100"


def test_heartbeat_answers_name_the_answering_node_and_ignore_strangers():
    sent = probe("node-a", 7)
    assert parse_answer(answer(sent, "node-b", "18f.2a")) == ("node-a", 7, "node-b", "18f.2a")
    assert answer(b"GET / HTTP/1.1\r\n", "node-b") is None
    assert answer(sent + b"x" * 600, "node-b") is None
    assert parse_answer(b"TGHB1 garbage") is None
    assert parse_goodbye(goodbye("node-b", "18f.2a")) == ("node-b", "18f.2a")
    assert parse_goodbye(sent) is None and parse_goodbye(b"TGBYE1 node-b") is None


LAB = """
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {zone: left}}
status: {addresses: [{type: InternalIP, address: 198.18.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {zone: right}}
status: {addresses: [{type: InternalIP, address: 198.18.0.2}], conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-c, labels: {zone: right, node.kubernetes.io/exclude-from-external-load-balancers: ""}}
status: {addresses: [{type: InternalIP, address: 198.18.0.3}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-d}
status: {addresses: [{type: InternalIP, address: 198.18.0.4}], conditions: [{type: Ready, status: "False"}]}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab, namespace: metallb-system, labels: {l2: "yes"}}
spec: {addresses: [198.18.0.100-198.18.0.109]}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: quiet, namespace: metallb-system}
spec: {addresses: [198.18.1.0/24]}
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: right-only, namespace: metallb-system}
spec:
  ipAddressPoolSelectors: [{matchLabels: {l2: "yes"}}]
  nodeSelectors: [{matchLabels: {zone: right}}]
  interfaces: [eth1]
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: all-nodes, namespace: metallb-system}
spec:
  ipAddressPools: [lab]
  preferredNodeSelectors: [{weight: 10, preference: {matchLabels: {zone: left}}}]
---
apiVersion: v1
kind: Service
metadata: {name: cluster, namespace: default}
spec: {type: LoadBalancer, loadBalancerClass: tidegate.io/lb, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec: {type: LoadBalancer, loadBalancerClass: tidegate.io/lb, externalTrafficPolicy: Local, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.2], nodeName: node-b}, {addresses: [10.0.0.3], nodeName: node-a,
             conditions: {ready: false}}]
---
apiVersion: v1
kind: Service
metadata: {name: unannounced, namespace: default, annotations: {metallb.io/address-pool: quiet}}
spec: {type: LoadBalancer, loadBalancerClass: tidegate.io/lb, ports: [{port: 80}]}
"""


def test_which_nodes_may_announce_follows_advertisements_node_state_and_local_pods():
    loaded = load_text(LAB, "lab.yaml")
    assert not loaded.errors, [str(e) for e in loaded.errors]
    lbs = translate(loaded.resources, TranslateOptions(node="node-a")).load_balancers
    assert {n.name: (n.usable, n.reason) for n in lbs.nodes} == {
        "node-a": (True, ""), "node-b": (True, ""),
        "node-c": (False, "labelled node.kubernetes.io/exclude-from-external-load-balancers"),
        "node-d": (False, "condition Ready is False")}
    by_address = {c.address: c for c in lbs.l2}
    assert set(by_address) == {"198.18.0.100", "198.18.0.101"}  # the quiet pool has no advertisement
    cluster, local = by_address["198.18.0.100"], by_address["198.18.0.101"]
    assert cluster.services == ("default/cluster",) and cluster.nodes == ("node-a", "node-b")
    # node-b is selected by both advertisements: eth1 from one, any interface from the other
    assert cluster.interfaces_of("node-b") == () and cluster.score("node-a") == 10
    assert local.nodes == ("node-b",)  # Local: only the node with a ready pod
    assert assign(lbs.l2, None) == {"198.18.0.100": "node-a", "198.18.0.101": "node-b"}


def test_a_gateway_address_from_a_pool_is_announced_like_a_services():
    text = LAB + "\n---\n" + gateway("198.18.0.109", "[{name: http, port: 80, protocol: HTTP}]", name="edge")
    translation = translate(load_text(text, "lab.yaml").resources, TranslateOptions())
    edge = next(c for c in translation.load_balancers.l2 if c.address == "198.18.0.109")
    assert edge.services == ("Gateway default/edge",) and edge.nodes == ("node-a", "node-b")
    assert [l.freebind for l in translation.ir.listeners if l.gateway == "default/edge"] == [True]


def test_interfaces_named_by_an_advertisement_are_kept_per_node():
    text = LAB.replace("  ipAddressPools: [lab]\n", "  ipAddressPools: [other]\n")
    lbs = translate(load_text(text, "lab.yaml").resources, TranslateOptions()).load_balancers
    cluster = next(c for c in lbs.l2 if c.address == "198.18.0.100")
    assert cluster.nodes == ("node-b",) and cluster.interfaces_of("node-b") == ("eth1",)


def test_no_node_objects_means_this_node_alone():
    text = "\n---\n".join(d for d in LAB.split("\n---\n") if "kind: Node" not in d)
    lbs = translate(load_text(text, "lab.yaml").resources, TranslateOptions(node="solo")).load_balancers
    assert [n.name for n in lbs.nodes] == ["solo"]
    assert [c.nodes for c in lbs.l2] == [("solo",)]  # Local's pods run on named nodes, none of them "solo"


def test_a_services_status_keeps_other_controllers_conditions():
    from tidegate.status_writer import merged_status

    current = {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]},
               "conditions": [{"type": "example.com/Probed", "status": "True", "reason": "Ok", "message": "",
                               "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    ours = {"loadBalancer": {"ingress": [{"ip": "192.0.2.1", "ipMode": "Proxy"}]},
            "conditions": [{"type": "tidegate.io/AddressAssigned", "status": "True", "reason": "Assigned",
                            "message": "192.0.2.1 from IPAddressPool lab", "observedGeneration": 1}]}
    merged = merged_status(current, ours, "2026-12-07T00:00:00Z")
    assert [c["type"] for c in merged["conditions"]] == ["example.com/Probed", "tidegate.io/AddressAssigned"]
    assert merged["loadBalancer"] == ours["loadBalancer"]
