"""`tidegate simulate`: how requests to a Service would spread over its pods, three ways.

- through tidegate: straight to the pods' endpoints (every ready endpoint gets an equal share);
- through a node-level external load balancer (MetalLB L2/BGP, a cloud LB with externalTrafficPolicy: Local)
  that spreads requests evenly over the nodes hosting pods, each node then picking one of its local pods:
  a lone pod on a node gets as much as all the pods of another node together;
- the same balancer with node weights by local endpoint count, which restores an even share per pod;
- for a LoadBalancer Service, tidegate's own Layer 2 mode: one node announces the address (the node the
  election picks among those with pods) and relays to every pod (`Cluster`) or to its own pods only
  (`Local`, where the pods on other nodes get nothing until that node fails);
- and its BGP mode under `Local`: every node with a pod announces the address, the router spreads over them
  by equal ECMP (the node balancer above), or, with `tidegate.io/weighting: endpoints`, by the weights the
  routes carry (the weighted one).

Requests are played one by one through the same smooth weighted round robin the data plane uses, so the
shares are what would happen, not only what should.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tidegate import ir
from tidegate.announce.election import Candidacy, assign
from tidegate.announce.ipam import AllocationOptions, allocate
from tidegate.balancing.algorithms import WeightedChoice
from tidegate.resources.model import Resource
from tidegate.translate.backends import service_endpoints
from tidegate.translate.index import Index


@dataclass
class PodShare:
    pod: str
    node: str
    tidegate: float
    node_balancer: float
    node_balancer_weighted: float
    l2_cluster: float | None = None  # LoadBalancer Services only
    l2_local: float | None = None
    l2_node: str = ""  # the node that would announce the address under Local
    bgp_ecmp: float | None = None  # BGP, Local: equal ECMP over the nodes with pods
    bgp_weighted: float | None = None  # ... with tidegate.io/weighting: endpoints


def _play(requests: int, nodes: dict[str, list[ir.Endpoint]], weighted: bool) -> Counter:
    names = sorted(nodes)
    choice = WeightedChoice(names, [len(nodes[n]) if weighted else 1 for n in names])
    next_pod = dict.fromkeys(names, 0)
    seen: Counter = Counter()
    for _ in range(requests):
        node = choice.pick()
        pods = nodes[node]
        seen[pods[next_pod[node] % len(pods)]] += 1
        next_pod[node] += 1
    return seen


def simulate_service(index: Index, service: Resource, requests: int) -> list[PodShare]:
    """Shares per pod of one Service (its first port), from `requests` requests played each way."""
    ports = service.spec.get("ports") or []
    if not ports:
        return []
    endpoints = [e for e in service_endpoints(index, service.namespace, service.name, service.spec, ports[0],
                                              int(ports[0]["port"])) if e.ready]
    if not endpoints:
        return []
    direct = WeightedChoice(endpoints, [1] * len(endpoints))
    through_tidegate: Counter = Counter(direct.pick() for _ in range(requests))
    nodes: dict[str, list[ir.Endpoint]] = {}
    for endpoint in endpoints:
        nodes.setdefault(endpoint.node or "(unknown node)", []).append(endpoint)
    plain = _play(requests, nodes, weighted=False)
    weighted = _play(requests, nodes, weighted=True)
    l2_node = ""
    local: Counter = Counter()
    if service.spec.get("type") == "LoadBalancer":
        # Under Local, the election picks among the nodes with pods; the pick depends on the address (the one
        # an IPAddressPool gives, else the Service's name stands in).
        given = allocate(index, AllocationOptions(lb_class=service.spec.get("loadBalancerClass") or "",
                                                  classless=True)).assignments.get((service.namespace, service.name))
        address = given.addresses[0] if given else f"{service.namespace}/{service.name}"
        l2_node = assign([Candidacy(address, tuple(sorted(nodes)))], None)[address]
        own = WeightedChoice(nodes[l2_node], [1] * len(nodes[l2_node]))
        local = Counter(own.pick() for _ in range(requests))
    is_lb = bool(l2_node)
    return [PodShare(pod=e.pod or f"{e.address}:{e.port}", node=e.node or "(unknown node)",
                     tidegate=through_tidegate[e] / requests, node_balancer=plain[e] / requests,
                     node_balancer_weighted=weighted[e] / requests,
                     l2_cluster=through_tidegate[e] / requests if is_lb else None,
                     l2_local=local[e] / requests if is_lb else None, l2_node=l2_node,
                     bgp_ecmp=plain[e] / requests if is_lb else None,
                     bgp_weighted=weighted[e] / requests if is_lb else None)
            for e in sorted(endpoints, key=lambda e: (e.node, e.pod, e.address))]


def simulate(resources: list[Resource], requests: int, service: str = "") -> dict[str, list[PodShare]]:
    """Shares for every Service with ready endpoints (or the one named "namespace/name")."""
    index = Index(resources)
    results = {}
    for svc in index.all("Service"):
        name = f"{svc.namespace}/{svc.name}"
        if service and name != service:
            continue
        shares = simulate_service(index, svc, requests)
        if shares:
            results[name] = shares
    return results
