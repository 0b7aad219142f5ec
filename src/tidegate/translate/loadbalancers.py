"""LoadBalancer Services: their addresses (the address manager, MetalLB's rules), their status, and a listener
per address and port that relays straight to the Service's pods.

`externalTrafficPolicy: Local` keeps to the pods on this node (`TranslateOptions.node`; with no node named,
every pod counts as local); `Cluster` uses every ready pod.

A Gateway whose `spec.addresses` names a pool address is announced like a Service. Where the Gateways are
served by other pods than the announcing process (a cluster: the Deployment's pods, `--gateway-pods`), the node
agents relay each of the Gateway's ports on that address to those pods, as for a Service under `Local`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tidegate import ir
from tidegate.announce.bgp_plan import BGPPlan, BGPService, plan_bgp
from tidegate.announce.election import Candidacy
from tidegate.announce.ipam import Allocation, AllocationOptions, allocate, annotation, pool_status
from tidegate.resources.model import Key, Origin, Problem
from tidegate.translate.backends import proxy_protocol_of, service_endpoints
from tidegate.translate.conditions import condition
from tidegate.translate.index import Index, selector_matches

ADDRESS_CONDITION = "tidegate.io/AddressAssigned"
LOADBALANCER_PREFIX = "service:"  # IR listeners of LoadBalancer Services: gateway "service:ns/name"
SERVED_PROTOCOLS = ("TCP", "UDP")


@dataclass(frozen=True)
class LoadBalancerService:
    """One LoadBalancer Service with addresses: what the announcers and `tidegate status` need."""

    namespace: str
    name: str
    pool: str
    addresses: tuple[str, ...]
    ports: tuple[tuple[str, int], ...]  # (protocol, port)
    local: bool  # externalTrafficPolicy: Local
    nodes_with_pods: tuple[str, ...] = ()  # nodes that run a ready pod of the Service, sorted
    sharing: str = ""
    pods_by_node: tuple[tuple[str, int], ...] = ()  # ready pods per node, sorted by node
    ready: int = 0  # ready pods, with or without a node
    kind: str = "Service"  # or "Gateway": an address from spec.addresses (name: "Gateway ns/name")


EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"


@dataclass(frozen=True)
class NodeInfo:
    """A node that may announce addresses: its name, the address its heartbeat is sent to, and whether it may
    announce at all (and why not)."""

    name: str
    address: str = ""  # InternalIP (IPv4 first); "" = none known
    usable: bool = True
    reason: str = ""


@dataclass
class LoadBalancers:
    services: list[LoadBalancerService] = field(default_factory=list)
    listeners: list[ir.Listener] = field(default_factory=list)
    allocation: Allocation = field(default_factory=Allocation)
    nodes: list[NodeInfo] = field(default_factory=list)
    l2: list[Candidacy] = field(default_factory=list)  # addresses announced in Layer 2, with their candidates
    bgp: BGPPlan = field(default_factory=BGPPlan)  # this node's BGP sessions and routes
    health_checks: list[HealthCheck] = field(default_factory=list)  # --node-ports: healthCheckNodePort answers


def translate_load_balancers(index: Index, options: AllocationOptions, node: str, statuses: dict[Key, Any],
                             notes: list[Problem], reserved: dict[str, str] | None = None,
                             gateway_ports: dict[str, tuple[tuple[str, int], ...]] | None = None,
                             gateway_pods: str = "") -> LoadBalancers:
    """`reserved`: the addresses accepted Gateways ask for (address -> "Gateway ns/name"); those in a pool are
    kept from Services, and announced like theirs. `gateway_pods` ("namespace/name" of a Service): the pods
    that serve the Gateways, to which this process relays the Gateways' `gateway_ports` on their pool
    addresses (address -> (protocol, port) pairs)."""
    result = LoadBalancers(allocation=allocate(index, options, reserved))
    allocation = result.allocation
    host = _node_addresses(index, node)
    for key, message in allocation.pool_problems.items():
        pool = index.get("IPAddressPool", key.namespace, key.name)
        notes.append(Problem("error", pool.origin if pool else Origin("<memory>"), message, key))
    for usage in allocation.pools.values():
        if usage.key is not None:
            statuses[usage.key] = pool_status(usage)
    for (namespace, name), refusal in allocation.refusals.items():
        service = index.get("Service", namespace, name)
        assert service is not None
        statuses[service.key] = {"loadBalancer": {}, "conditions": [
            condition(ADDRESS_CONDITION, False, refusal.reason, refusal.message, service.generation)]}
    for (namespace, name), assignment in allocation.assignments.items():
        service = index.get("Service", namespace, name)
        assert service is not None
        spec = service.spec
        statuses[service.key] = {
            "loadBalancer": {"ingress": [{"ip": a, "ipMode": "Proxy"} for a in assignment.addresses]},
            "conditions": [condition(ADDRESS_CONDITION, True, "Assigned",
                                     f"{', '.join(assignment.addresses)} from IPAddressPool {assignment.pool}",
                                     service.generation)]}
        local = spec.get("externalTrafficPolicy") == "Local"
        proxy_protocol, problem = proxy_protocol_of(service)
        if problem:
            notes.append(Problem("warning", service.origin, problem, service.key))
        served = []
        nodes: set[str] = set()
        pods: dict[str, str] = {}  # ready pod address -> its node ("" unknown)
        for port in spec.get("ports") or []:
            protocol = port.get("protocol", "TCP")
            if protocol not in SERVED_PROTOCOLS:
                notes.append(Problem("warning", service.origin, f"port {port.get('port')}/{protocol}: tidegate "
                                     "serves TCP and UDP ports only", service.key))
                continue
            endpoints = service_endpoints(index, namespace, name, spec, port, int(port["port"]))
            nodes.update(e.node for e in endpoints if e.ready and e.node)
            pods.update((e.address, e.node) for e in endpoints if e.ready)
            if local and node:
                endpoints = tuple(e for e in endpoints if e.node == node)
            label = f"{namespace}/{name}:{port['port']}" + ("/UDP" if protocol == "UDP" else "")
            header = proxy_protocol if protocol == "TCP" else ""
            # Local, on this node, and no PROXY header: connect from the client's address. Not to a pod on the
            # host's network (its replies would leave by the node's own routes, not come back to the relay).
            transparent = local and bool(node) and not header \
                and not any(_on_host(e.address, host) for e in endpoints)
            backend = ir.Backend(name=label, weight=1, endpoints=endpoints, protocol=port.get("appProtocol", ""),
                                 proxy_protocol=header, keep_client_address=transparent)
            served.append((protocol, int(port["port"])))
            for address in assignment.addresses:
                listener_name = f"{LOADBALANCER_PREFIX}{namespace}/{name}:{port['port']}/{protocol}@{address}"
                result.listeners.append(ir.Listener(
                    name=listener_name, gateway=f"{LOADBALANCER_PREFIX}{namespace}/{name}", address=address,
                    port=int(port["port"]), protocol=protocol, freebind=True,
                    l4_routes=(ir.L4Route(name=listener_name, source=f"Service {namespace}/{name}",
                                          backends=(backend,), created=service.creation_timestamp),)))
        per_node: dict[str, int] = {}
        for pod_node in pods.values():
            if pod_node:
                per_node[pod_node] = per_node.get(pod_node, 0) + 1
        result.services.append(LoadBalancerService(
            namespace, name, assignment.pool, assignment.addresses, tuple(served), local, tuple(sorted(nodes)),
            sharing=annotation(service, "allow-shared-ip") or "", pods_by_node=tuple(sorted(per_node.items())),
            ready=len(pods)))
    result.nodes = _nodes(index, node)
    gateways = [LoadBalancerService("", (reserved or {})[address], pool, (address,), (), local=False,
                                    kind="Gateway") for address, pool in sorted(allocation.reserved.items())]
    if gateway_pods:
        gateways = _relayed_gateways(index, gateways, gateway_ports or {}, gateway_pods, node, host, result, notes)
    result.l2 = _l2_candidacies(index, result.services + gateways, result.nodes, allocation.pools)
    this = next((n for n in result.nodes if n.name == node), None)
    this_node = index.get("Node", "", node) if node else None
    result.bgp = plan_bgp(index, node, [_for_bgp(index, s) for s in result.services + gateways], this_node.labels
                          if this_node else {}, this is not None and this.usable, notes)
    for key in allocation.not_ours if index.all("IPAddressPool") else ():
        service = index.get("Service", key.namespace, key.name)
        if service is not None and not service.spec.get("loadBalancerClass"):
            notes.append(Problem("warning", service.origin, "type LoadBalancer without spec.loadBalancerClass: left "
                                 "to another controller (run with --lb-classless to take it, once MetalLB is gone)",
                                 key))
    return result


@dataclass(frozen=True)
class HealthCheck:
    """kube-proxy's answer on a Service's healthCheckNodePort: how many ready pods of it this node runs."""

    port: int
    namespace: str
    name: str
    local_endpoints: int


def translate_node_ports(index: Index, node: str, notes: list[Problem]) -> tuple[list[ir.Listener],
                                                                               list[HealthCheck]]:
    """`--node-ports` (clusters without kube-proxy): a listener on every address for each node port of the
    NodePort and LoadBalancer Services, relaying straight to the pods (under `Local` this node's only, from the
    client's address), and the health check answers for `healthCheckNodePort`s."""
    listeners: list[ir.Listener] = []
    checks: list[HealthCheck] = []
    host = _node_addresses(index, node)
    taken: dict[tuple[int, str], str] = {}
    for service in sorted(index.all("Service"), key=lambda s: (s.namespace, s.name)):
        spec = service.spec
        if spec.get("type") not in ("NodePort", "LoadBalancer"):
            continue
        namespace, name = service.namespace, service.name
        local = spec.get("externalTrafficPolicy") == "Local"
        local_pods: set[str] = set()
        for port in spec.get("ports") or []:
            protocol = port.get("protocol", "TCP")
            endpoints = service_endpoints(index, namespace, name, spec, port, int(port["port"]))
            local_pods.update(e.address for e in endpoints if e.ready and e.node == node)
            number = port.get("nodePort")
            if not isinstance(number, int) or protocol not in SERVED_PROTOCOLS:
                continue
            owner = f"Service {namespace}/{name}"
            if taken.setdefault((number, protocol), owner) != owner:
                notes.append(Problem("error", service.origin, f"nodePort {number}/{protocol} is {taken[(number, protocol)]}'s "
                                     "already: not served for this one (tidegate nodeports check)", service.key))
                continue
            if local and node:
                endpoints = tuple(e for e in endpoints if e.node == node)
            header = proxy_protocol_of(service)[0] if protocol == "TCP" else ""
            transparent = local and bool(node) and not header and not any(_on_host(e.address, host) for e in endpoints)
            label = f"{namespace}/{name}:{port['port']}" + ("/UDP" if protocol == "UDP" else "")
            listener_name = f"{LOADBALANCER_PREFIX}{namespace}/{name}:{port['port']}/{protocol}@nodePort {number}"
            backend = ir.Backend(name=label, weight=1, endpoints=endpoints, protocol=port.get("appProtocol", ""),
                                 proxy_protocol=header, keep_client_address=transparent)
            listeners.append(ir.Listener(
                name=listener_name, gateway=f"{LOADBALANCER_PREFIX}{namespace}/{name}", address="", port=number,
                protocol=protocol, l4_routes=(ir.L4Route(name=listener_name, source=f"Service {namespace}/{name}",
                                                         backends=(backend,), created=service.creation_timestamp),)))
        check_port = spec.get("healthCheckNodePort")
        if spec.get("type") == "LoadBalancer" and local and isinstance(check_port, int):
            checks.append(HealthCheck(check_port, namespace, name, len(local_pods)))
    return listeners, checks


def _relayed_gateways(index: Index, gateways: list[LoadBalancerService],
                      ports: dict[str, tuple[tuple[str, int], ...]], gateway_pods: str, node: str,
                      host: frozenset[str], result: LoadBalancers, notes: list[Problem]) -> list[LoadBalancerService]:
    """Relays from the Gateways' pool addresses to the pods that serve Gateways (the pods of the Service
    `gateway_pods`), on the same port numbers: as under `Local`, from the nodes that run one of those pods,
    to that node's own, from the client's address."""
    namespace, _, name = gateway_pods.partition("/")
    service = index.get("Service", namespace, name)
    if service is None or not service.spec.get("ports"):
        notes.append(Problem("error", Origin("--gateway-pods"), f"no Service {gateway_pods} with ports: the "
                             "Gateways' pool addresses are not relayed or announced", None))
        return []
    # Every ready pod of that Service, on whichever port: the relay uses each listener's own port number.
    pods = service_endpoints(index, namespace, name, service.spec, service.spec["ports"][0],
                             int(service.spec["ports"][0]["port"]))
    pods = tuple(e for e in pods if e.ready)
    nodes = tuple(sorted({e.node for e in pods if e.node}))
    per_node = tuple((n, sum(1 for e in pods if e.node == n)) for n in nodes)
    local = tuple(e for e in pods if e.node == node) if node else pods
    transparent = bool(node) and not any(_on_host(e.address, host) for e in local)
    out = []
    for gateway in gateways:
        gateway_name = gateway.name.removeprefix("Gateway ")
        address = gateway.addresses[0]
        for protocol, port in ports.get(address, ()):
            listener_name = f"{LOADBALANCER_PREFIX}{gateway_name}:{port}/{protocol}@{address}"
            backend = ir.Backend(name=f"{gateway_pods}:{port}" + ("/UDP" if protocol == "UDP" else ""), weight=1,
                                 endpoints=tuple(replace(e, port=port) for e in local),
                                 keep_client_address=transparent)
            result.listeners.append(ir.Listener(
                name=listener_name, gateway=f"{LOADBALANCER_PREFIX}{gateway_name}", address=address, port=port,
                protocol=protocol, freebind=True,
                l4_routes=(ir.L4Route(name=listener_name, source=gateway.name, backends=(backend,)),)))
        out.append(replace(gateway, ports=ports.get(address, ()), local=True, nodes_with_pods=nodes,
                           pods_by_node=per_node, ready=len(pods)))
    return out


def _for_bgp(index: Index, svc: LoadBalancerService) -> BGPService:
    if svc.kind == "Gateway":
        namespace, _, name = svc.name.removeprefix("Gateway ").partition("/")
        res = index.get("Gateway", namespace, name)
        if not svc.local:  # this process serves the Gateway itself: like a Service with one pod, here
            return BGPService("", svc.name, svc.pool, svc.addresses, False, (), 1,
                              tuple(sorted(res.labels.items())) if res else (),
                              tuple(sorted(res.annotations.items())) if res else ())
    else:
        res = index.get("Service", svc.namespace, svc.name)
    return BGPService(svc.namespace, svc.name, svc.pool, svc.addresses, svc.local, svc.pods_by_node, svc.ready,
                      tuple(sorted(res.labels.items())) if res else (),
                      tuple(sorted(res.annotations.items())) if res else ())


def _node_addresses(index: Index, node: str) -> frozenset[str]:
    """Every address the Node object of `node` lists (a pod with one of them runs on the host's network)."""
    res = index.get("Node", "", node) if node else None
    if res is None:
        return frozenset()
    return frozenset(a.get("address", "") for a in (res.obj.get("status") or {}).get("addresses") or [])


def _on_host(address: str, host: frozenset[str]) -> bool:
    return address in host or address.startswith("127.") or address == "::1"


def _nodes(index: Index, this_node: str) -> list[NodeInfo]:
    """The Node objects (a cluster's, or written in files); with none, this node alone (--node)."""
    out = []
    for res in index.all("Node"):
        status = res.obj.get("status") or {}
        addresses = [a.get("address", "") for a in status.get("addresses") or [] if a.get("type") == "InternalIP"]
        address = next((a for a in addresses if ":" not in a), addresses[0] if addresses else "")
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        reason = ""
        if EXCLUDE_LABEL in res.labels:
            reason = f"labelled {EXCLUDE_LABEL}"
        elif conditions.get("Ready", "True") != "True":
            reason = f"condition Ready is {conditions['Ready']}"
        elif conditions.get("NetworkUnavailable") == "True":
            reason = "condition NetworkUnavailable is True"
        out.append(NodeInfo(res.name, address, not reason, reason))
    if not out and this_node:
        out.append(NodeInfo(this_node))
    return out


def _l2_candidacies(index: Index, services: list[LoadBalancerService], nodes: list[NodeInfo],
                    allocation_pools: dict[str, Any]) -> list[Candidacy]:
    """For each address of a pool that an L2Advertisement covers: the nodes that may announce it."""
    ads = index.all("L2Advertisement")
    if not ads:
        return []
    node_labels = {n.name: (index.get("Node", "", n.name).labels if index.get("Node", "", n.name) else {})
                   for n in nodes}
    usable = [n.name for n in nodes if n.usable]
    by_address: dict[str, list[LoadBalancerService]] = {}
    for svc in services:
        for address in svc.addresses:
            by_address.setdefault(address, []).append(svc)
    out = []
    for address, users in sorted(by_address.items()):
        usage = allocation_pools.get(users[0].pool)
        pool = index.get("IPAddressPool", usage.key.namespace, usage.key.name) if usage and usage.key else None
        chosen: dict[str, tuple[list[str], int]] = {}  # node -> (interfaces, or ["*"] for any; score)
        for ad in ads:
            spec = ad.spec
            names, selectors = spec.get("ipAddressPools") or [], spec.get("ipAddressPoolSelectors") or []
            if (names or selectors) and not (pool is not None and (pool.name in names or any(
                    selector_matches(s, pool.labels) for s in selectors))):
                continue
            service_selectors = spec.get("serviceSelectors") or []
            if service_selectors and not all(
                    u.kind == "Service" and not u.sharing
                    and any(selector_matches(s, _labels(index, u)) for s in service_selectors) for u in users):
                continue
            node_selectors = spec.get("nodeSelectors") or []
            for name in usable:
                if node_selectors and not any(selector_matches(s, node_labels[name]) for s in node_selectors):
                    continue
                score = sum(int(p.get("weight") or 0) for p in spec.get("preferredNodeSelectors") or []
                            if selector_matches(p.get("preference") or {}, node_labels[name]))
                interfaces, best = chosen.get(name, ([], 0))
                chosen[name] = (interfaces + (spec.get("interfaces") or ["*"]), max(best, score))
        if any(u.local for u in users):
            with_pods = {n for u in users for n in u.nodes_with_pods}
            chosen = {n: v for n, v in chosen.items() if n in with_pods}
        if not chosen:
            continue
        out.append(Candidacy(
            address=address, nodes=tuple(sorted(chosen)),
            scores=tuple((n, v[1]) for n, v in sorted(chosen.items()) if v[1]),
            interfaces=tuple((n, tuple(sorted(set(v[0])))) for n, v in sorted(chosen.items()) if "*" not in v[0]),
            services=tuple(f"{u.namespace}/{u.name}" if u.kind == "Service" else u.name for u in users)))
    return out


def _labels(index: Index, svc: LoadBalancerService) -> dict[str, str]:
    res = index.get("Service", svc.namespace, svc.name)
    return res.labels if res is not None else {}


def with_announcements(entries: list[dict[str, Any]], announcements: list[dict[str, Any]],
                        bgp: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Status entries (`tidegate status`, /api/v1/status) with, on each LoadBalancer Service, the node that
    announces each of its addresses in Layer 2 (and since when, when a running node knows), and the BGP routes
    this node announces for it (with each session's state, when the node runs)."""
    def key(user: str) -> tuple[str, str, str]:  # "ns/name" (a Service) or "Gateway ns/name"
        kind, _, rest = user.rpartition(" ")
        namespace, _, name = rest.partition("/")
        return kind or "Service", namespace, name

    by_service: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for a in announcements:
        for service in a["services"]:
            by_service.setdefault(key(service), []).append(
                {"address": a["address"], "node": a["node"], **({"since": a["since"]} if a.get("since") else {})})
    routes: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    states = {s["name"]: s.get("state") for s in (bgp or {}).get("sessions", [])}
    for route in (bgp or {}).get("routes", []):
        for service in route["services"]:
            routes.setdefault(key(service), []).append(
                {"session": route["session"], "prefix": route["prefix"],
                 **({"sessionState": states[route["session"]]} if states.get(route["session"]) else {}),
                 **({"pods": route["pods"]} if "pods" in route else {})})
    out = []
    for e in entries:
        k = (e["kind"], e.get("namespace") or "", e["name"])
        if k in by_service:
            e = {**e, "announcedBy": by_service[k]}
        if k in routes:
            e = {**e, "bgp": routes[k]}
        out.append(e)
    return out
