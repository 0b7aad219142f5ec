"""Ingress and IngressClass: the same IR as the Gateway API, served on tidegate's Ingress ports."""

from __future__ import annotations

from typing import Any

from tidegate import ir
from tidegate.resources.model import Key, Problem, Resource
from tidegate.translate.backends import resolve_backend, service_port_by_name
from tidegate.translate.certificates import CertificateError, certificate_from_secret
from tidegate.translate.conditions import INGRESS_CONTROLLER
from tidegate.translate.index import Index

DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
LEGACY_CLASS_ANNOTATION = "kubernetes.io/ingress.class"
_PATH_TYPES = {"Exact": "Exact", "Prefix": "PathPrefix", "ImplementationSpecific": "PathPrefix"}


def ingresses_for_tidegate(index: Index) -> list[Resource]:
    """Ingresses whose class is tidegate's; one without a class only when tidegate's class is the default."""
    ours = {ic.name: ic for ic in index.all("IngressClass") if ic.spec.get("controller") == INGRESS_CONTROLLER}
    default = any(ic.annotations.get(DEFAULT_CLASS_ANNOTATION) == "true" for ic in ours.values())
    taken = []
    for ing in index.all("Ingress"):
        name = ing.spec.get("ingressClassName") or ing.annotations.get(LEGACY_CLASS_ANNOTATION)
        if (name in ours) if name else default:
            taken.append(ing)
    return taken


def translate_ingresses(index: Index, address: str, http_port: int, https_port: int,
                        backend_tls: dict, statuses: dict[Key, Any], notes: list[Problem]) -> list[ir.Listener]:
    routes: list[ir.HTTPRoute] = []
    certificates: dict[str, ir.Certificate] = {}
    for ing in ingresses_for_tidegate(index):
        routes += _ingress_routes(index, ing, backend_tls, notes)
        for tls in ing.spec.get("tls", []):
            secret_name = tls.get("secretName")
            if not secret_name:
                continue
            secret = index.get("Secret", ing.namespace, secret_name)
            if secret is None:
                notes.append(Problem("warning", ing.origin, f"TLS Secret {ing.namespace}/{secret_name} not found",
                                     ing.key, "spec.tls"))
                continue
            try:
                cert = certificate_from_secret(secret)
            except CertificateError as exc:
                notes.append(Problem("warning", ing.origin, str(exc), ing.key, "spec.tls"))
                continue
            hosts = tuple(tls.get("hosts") or cert.hostnames)
            certificates.setdefault(cert.secret + "|" + ",".join(hosts),
                                    ir.Certificate(cert.secret, cert.cert_pem, cert.key_pem, hosts))
        loadbalancer = ({"ingress": [{"hostname" if not _looks_like_ip(address) else "ip": address}]}
                        if address else {})
        statuses[ing.key] = {"loadBalancer": loadbalancer}
    if not routes and not certificates:
        return []
    listeners = [ir.Listener(name="ingress/http", gateway="ingress", address="", port=http_port, protocol="HTTP",
                             http_routes=tuple(routes))]
    if certificates:
        listeners.append(ir.Listener(
            name="ingress/https", gateway="ingress", address="", port=https_port, protocol="HTTPS",
            tls=ir.ListenerTLS(mode="Terminate", certificates=tuple(certificates.values())),
            http_routes=tuple(routes)))
    return listeners


def _looks_like_ip(address: str) -> bool:
    return address.replace(".", "").isdigit() or ":" in address


def _ingress_routes(index: Index, ing: Resource, backend_tls: dict, notes: list[Problem]) -> list[ir.HTTPRoute]:
    source = f"Ingress {ing.namespace}/{ing.name}"
    routes: list[ir.HTTPRoute] = []
    for r, rule in enumerate(ing.spec.get("rules", [])):
        host = rule.get("host", "")
        for p, path in enumerate((rule.get("http") or {}).get("paths", [])):
            ptype = _PATH_TYPES[path["pathType"]]
            match = ir.Match(path=ir.PathMatch(ptype, path.get("path") or "/"))
            routes.append(ir.HTTPRoute(
                name=f"ingress/{ing.namespace}/{ing.name}/rule/{r}/path/{p}", source=source,
                hostnames=(host or "*",), matches=(match,),
                backends=(_backend(index, ing, path["backend"], backend_tls, notes),),
                created=ing.creation_timestamp, wildcard_single_label=True))
    default = ing.spec.get("defaultBackend")
    if default:
        routes.append(ir.HTTPRoute(
            name=f"ingress/{ing.namespace}/{ing.name}/default", source=source, hostnames=("*",),
            matches=(ir.Match(),), backends=(_backend(index, ing, default, backend_tls, notes),),
            created=ing.creation_timestamp, wildcard_single_label=True))
    return routes


def _backend(index: Index, ing: Resource, spec: dict, backend_tls: dict, notes: list[Problem]) -> ir.Backend:
    service = spec.get("service")
    if service is None:
        resource = spec.get("resource") or {}
        message = f"resource backend {resource.get('kind')} {resource.get('name')} is not supported"
        notes.append(Problem("warning", ing.origin, message, ing.key))
        return ir.Backend(name=str(resource.get("name")), weight=1, invalid=message)
    port = service["port"].get("number")
    if port is None:
        svc = index.get("Service", ing.namespace, service["name"])
        named = service_port_by_name(svc.spec, service["port"]["name"]) if svc else None
        if named is None:
            message = f"Service {ing.namespace}/{service['name']} has no port named {service['port']['name']!r}"
            notes.append(Problem("warning", ing.origin, message, ing.key))
            return ir.Backend(name=f"{ing.namespace}/{service['name']}:{service['port']['name']}", weight=1,
                              invalid=message)
        port = named["port"]
    backend, problem = resolve_backend(index, {"name": service["name"], "port": port}, "Ingress", ing.namespace,
                                       backend_tls)
    if problem:
        notes.append(Problem("warning", ing.origin, problem.message, ing.key))
    return backend
