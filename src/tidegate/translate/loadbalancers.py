"""LoadBalancer Services: their addresses (the address manager, MetalLB's rules), their status, and a listener
per address and port that relays straight to the Service's pods.

`externalTrafficPolicy: Local` keeps to the pods on this node (`TranslateOptions.node`; with no node named,
every pod counts as local); `Cluster` uses every ready pod.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tidegate import ir
from tidegate.announce.ipam import Allocation, AllocationOptions, allocate, pool_status
from tidegate.resources.model import Key, Origin, Problem
from tidegate.translate.backends import service_endpoints
from tidegate.translate.conditions import condition
from tidegate.translate.index import Index

ADDRESS_CONDITION = "tidegate.io/AddressAssigned"
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


@dataclass
class LoadBalancers:
    services: list[LoadBalancerService] = field(default_factory=list)
    listeners: list[ir.Listener] = field(default_factory=list)
    allocation: Allocation = field(default_factory=Allocation)


def translate_load_balancers(index: Index, options: AllocationOptions, node: str, statuses: dict[Key, Any],
                             notes: list[Problem]) -> LoadBalancers:
    result = LoadBalancers(allocation=allocate(index, options))
    allocation = result.allocation
    for key, message in allocation.pool_problems.items():
        pool = index.get("IPAddressPool", key.namespace, key.name)
        notes.append(Problem("error", pool.origin if pool else Origin("<memory>"), message, key))
    for name, usage in allocation.pools.items():
        pool = next(p for p in index.all("IPAddressPool") if p.name == name)
        statuses[pool.key] = pool_status(usage)
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
        served = []
        nodes: set[str] = set()
        for port in spec.get("ports") or []:
            protocol = port.get("protocol", "TCP")
            if protocol not in SERVED_PROTOCOLS:
                notes.append(Problem("warning", service.origin, f"port {port.get('port')}/{protocol}: tidegate "
                                     "serves TCP and UDP ports only", service.key))
                continue
            endpoints = service_endpoints(index, namespace, name, spec, port, int(port["port"]))
            nodes.update(e.node for e in endpoints if e.ready and e.node)
            if local and node:
                endpoints = tuple(e for e in endpoints if e.node == node)
            label = f"{namespace}/{name}:{port['port']}"
            backend = ir.Backend(name=label, weight=1, endpoints=endpoints, protocol=port.get("appProtocol", ""))
            served.append((protocol, int(port["port"])))
            for address in assignment.addresses:
                listener_name = f"service:{label}/{protocol}@{address}"
                result.listeners.append(ir.Listener(
                    name=listener_name, gateway=f"service:{namespace}/{name}", address=address,
                    port=int(port["port"]), protocol=protocol, freebind=True,
                    l4_routes=(ir.L4Route(name=listener_name, source=f"Service {namespace}/{name}",
                                          backends=(backend,), created=service.creation_timestamp),)))
        result.services.append(LoadBalancerService(
            namespace, name, assignment.pool, assignment.addresses, tuple(served), local, tuple(sorted(nodes)),
            sharing=next((service.annotations[k] for k in ("metallb.io/allow-shared-ip",
                                                            "metallb.universe.tf/allow-shared-ip")
                          if k in service.annotations), "")))
    for key in allocation.not_ours if index.all("IPAddressPool") else ():
        service = index.get("Service", key.namespace, key.name)
        if service is not None and not service.spec.get("loadBalancerClass"):
            notes.append(Problem("warning", service.origin, "type LoadBalancer without spec.loadBalancerClass: left "
                                 "to another controller (run with --lb-classless to take it, once MetalLB is gone)",
                                 key))
    return result

