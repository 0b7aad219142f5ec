"""translate(snapshot) -> Translation(IR, statuses, notes): a pure function.

Stages run in a fixed order over an index built once: GatewayClasses → Gateways and listeners → policies →
routes (attachment, rules, backends) → Ingress → LoadBalancer Services → BackendPolicies → TrafficPolicies →
ClientPolicies → IR. Statuses are returned as values; the snapshot is never
mutated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tidegate import ir
from tidegate.announce.ipam import AllocationOptions
from tidegate.resources.model import Key, Problem, Resource
from tidegate.translate.backend_policies import apply_backend_policies
from tidegate.translate.client_policies import apply_client_policies
from tidegate.translate.acme import Wanted
from tidegate.translate.conditions import condition
from tidegate.translate.gateways import gateway_status, translate_gateway_classes, translate_gateways
from tidegate.translate.index import Index
from tidegate.translate.ingress import translate_ingresses
from tidegate.translate.loadbalancers import LoadBalancers, translate_load_balancers, translate_node_ports
from tidegate.translate.policies import policy_statuses, resolve_backend_tls_policies
from tidegate.translate.routes import translate_routes
from tidegate.translate.traffic_policies import apply_traffic_policies


ACCESS_LOG_ANNOTATION = "tidegate.io/access-log"
ACCESS_LOG_CHOICES = ("json", "clf", "combined", "off")


@dataclass(frozen=True)
class TranslateOptions:
    address: str = ""  # the address shown in Gateway and Ingress status (a LoadBalancer IP, say)
    ingress_http_port: int = 80
    ingress_https_port: int = 443
    node: str = ""  # the node this process runs on (--node): its pods are the local ones
    lb_class: str = AllocationOptions.lb_class  # the spec.loadBalancerClass that is tidegate's (--lb-class)
    lb_classless: bool = False  # also take LoadBalancer Services with no class (--lb-classless)
    # The addresses the last translation gave ((namespace, name), addresses): kept while valid (file mode).
    lb_held: tuple[tuple[tuple[str, str], tuple[str, ...]], ...] = ()
    # --gateway-pods on a node agent: the Service whose pods serve the Gateways; Gateways' pool addresses are
    # relayed to them (translate/loadbalancers.py)
    gateway_pods: str = ""
    # --gateway-pods on those pods: the node agents bring the pool addresses' traffic, to any address of
    # theirs; the Gateways' listeners listen on every address instead of binding the pool address
    gateway_addresses_relayed: bool = False
    # --node-ports: serve NodePort Services' node ports and healthCheckNodePorts (no kube-proxy)
    node_ports: bool = False
    # --watch-ingress-without-class: serve Ingresses that name no class (ingress-nginx's flag of that name)
    ingress_without_class: bool = False


@dataclass
class Translation:
    ir: ir.IR
    statuses: dict[Key, dict[str, Any]] = field(default_factory=dict)
    notes: list[Problem] = field(default_factory=list)  # warnings about resources that have no status field
    load_balancers: LoadBalancers = field(default_factory=LoadBalancers)
    acme: list[Wanted] = field(default_factory=list)  # the certificates to order (translate/acme.py)


def translate(resources: Iterable[Resource], options: TranslateOptions = TranslateOptions()) -> Translation:
    index = Index(resources)
    statuses: dict[Key, dict[str, Any]] = {}
    notes: list[Problem] = []

    classes = translate_gateway_classes(index, statuses)
    gateways = translate_gateways(index, classes, options.address)
    policies = resolve_backend_tls_policies(index)
    translate_routes(index, gateways, policies.by_target, statuses)
    # LoadBalancer Services and the Gateway addresses that come from IPAddressPools
    reserved = {address: f"Gateway {gw.resource.namespace}/{gw.resource.name}" for gw in gateways if gw.accepted
                for address in gw.bind_addresses}
    gateway_ports = {address: tuple(sorted({("UDP" if s.protocol == "UDP" else "TCP", s.port) for s in gw.listeners
                                            if s.accepted[0] and s.programmable}))
                     for gw in gateways if gw.accepted for address in gw.bind_addresses}
    load_balancers = translate_load_balancers(
        index, AllocationOptions(options.lb_class, options.lb_classless, options.lb_held), options.node, statuses,
        notes, reserved, gateway_ports, options.gateway_pods)
    pool_addresses = load_balancers.allocation.reserved
    taken = load_balancers.allocation.reserve_refused

    listeners: list[ir.Listener] = []
    for gw in gateways:
        lost = [a for a in gw.bind_addresses if a in taken]
        if lost:
            gw.bind_addresses = [a for a in gw.bind_addresses if a not in taken]
            gw.addresses = [a for a in gw.addresses if a["value"] not in taken]
            gw.conditions = [condition("Programmed", False, "AddressNotUsable", taken[lost[0]], c["observedGeneration"])
                             if c["type"] == "Programmed" else c for c in gw.conditions]
        statuses[gw.resource.key] = gateway_status(gw)
        if not gw.accepted or (lost and not gw.bind_addresses):
            continue
        gateway_name = f"{gw.resource.namespace}/{gw.resource.name}"
        access_log = gw.resource.annotations.get(ACCESS_LOG_ANNOTATION, "")
        if access_log not in ("", *ACCESS_LOG_CHOICES):
            notes.append(Problem("warning", gw.resource.origin, f"annotation {ACCESS_LOG_ANNOTATION}: "
                                 f"{access_log!r} is not one of {', '.join(ACCESS_LOG_CHOICES)}; the global "
                                 "access log setting applies", gw.resource.key))
            access_log = ""
        for state in gw.listeners:
            # (A listener waiting for its ACME certificate is opened without one: a TLS-ALPN-01 validation
            # reaches it there, and no other handshake succeeds.)
            if not (state.accepted[0] and (state.programmable or state.pending)):
                continue
            addresses = gw.bind_addresses or [""]
            if options.gateway_addresses_relayed:  # reached through the node agents, at any address of this pod
                addresses = list(dict.fromkeys("" if a in pool_addresses else a for a in addresses))
            for address in addresses:
                listeners.append(ir.Listener(
                    name=f"{gateway_name}/{state.name}", gateway=gateway_name, address=address,
                    port=state.port, protocol=state.protocol, hostname=state.hostname, tls=state.tls,
                    backend_client_certificate=gw.backend_client_certificate,
                    access_log=access_log, freebind=address in pool_addresses,
                    http_routes=tuple(sorted(state.http_routes, key=lambda r: r.name)),
                    l4_routes=tuple(sorted(state.l4_routes, key=lambda r: r.name))))
    acme = [state.acme for gw in gateways for state in gw.listeners if state.acme is not None]
    listeners += translate_ingresses(index, options.address, options.ingress_http_port, options.ingress_https_port,
                                     policies.by_target, statuses, notes, options.ingress_without_class, acme)
    listeners += load_balancers.listeners
    if options.node_ports:
        node_port_listeners, load_balancers.health_checks = translate_node_ports(index, options.node, notes)
        listeners += node_port_listeners
    listeners = apply_backend_policies(index, listeners, statuses, notes)
    listeners = apply_traffic_policies(index, listeners, statuses, notes)
    listeners = apply_client_policies(index, listeners, statuses, notes)
    statuses.update(policy_statuses(index, policies, listeners))
    return Translation(ir=ir.IR(listeners=tuple(listeners)), statuses=dict(sorted(statuses.items())), notes=notes,
                       load_balancers=load_balancers, acme=acme)
