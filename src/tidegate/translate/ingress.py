"""Ingress and IngressClass: the same IR as the Gateway API, served on tidegate's Ingress ports.

Paths are matched as ingress-nginx matches them (docs/user-guide/ingress-path-matching.md and its
controller): `Exact` exactly; `Prefix` by whole segments (nginx's "/foo/" and "= /foo"), a prefix that
ends in "/" as that string; `ImplementationSpecific` as a plain string prefix (/foo takes /foobar). When
any Ingress of a host asks for `use-regex`, or for a `rewrite-target` that differs from a path, every path of
that host, whatever its Ingress and type, becomes a case-insensitive regular expression anchored at the
path's start, tried longest first. Annotations: ingress_annotations.py.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import re2

from tidegate import ir
from tidegate.resources.model import Key, Problem, Resource
from tidegate.dataplane import basic_auth
from tidegate.translate.backends import decode_secret_field, resolve_backend, service_port_by_name
from tidegate.translate.certificates import (CertificateError, ca_bundle_is_valid, certificate_from_secret,
                                             certificate_pair)
from tidegate.translate.conditions import INGRESS_CONTROLLER
from tidegate.translate import ingress_annotations
from tidegate.translate.acme import ISSUER_OPTION, TLS_ACME, Issuer, Wanted, default_issuer, find_issuer
from tidegate.translate.index import Index
from tidegate.translate.ingress_annotations import BasicAuth, Canary, ExternalAuth, Routing

DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
LEGACY_CLASS_ANNOTATION = "kubernetes.io/ingress.class"


def ingresses_for_tidegate(index: Index, without_class: bool = False) -> list[Resource]:
    """Ingresses whose class is tidegate's; one without a class when tidegate's class is the default, or with
    `without_class` (ingress-nginx's --watch-ingress-without-class)."""
    ours = {ic.name: ic for ic in index.all("IngressClass") if ic.spec.get("controller") == INGRESS_CONTROLLER}
    default = any(ic.annotations.get(DEFAULT_CLASS_ANNOTATION) == "true" for ic in ours.values())
    taken = []
    for ing in index.all("Ingress"):
        name = ing.spec.get("ingressClassName") or ing.annotations.get(LEGACY_CLASS_ANNOTATION)
        if (name in ours) if name else (default or without_class):
            taken.append(ing)
    return taken


def translate_ingresses(index: Index, address: str, http_port: int, https_port: int,
                        backend_tls: dict, statuses: dict[Key, Any], notes: list[Problem],
                        without_class: bool = False, acme: list[Wanted] | None = None) -> list[ir.Listener]:
    http_routes: list[ir.HTTPRoute] = []
    https_routes: list[ir.HTTPRoute] = []
    certificates: dict[str, ir.Certificate] = {}
    taken = ingresses_for_tidegate(index, without_class)
    routing = {ing.key: ingress_annotations.read(ing, notes) for ing in taken}
    # Canary Ingresses serve no host of their own: each path joins the mainline path of the same host and path.
    canaries: dict[tuple[str, str], Canaried] = {}
    for ing in [i for i in taken if routing[i.key].canary is not None]:
        for rule in ing.spec.get("rules", []):
            for path in (rule.get("http") or {}).get("paths", []):
                backend = _with_protocol(_backend(index, ing, path["backend"], backend_tls, notes), routing[ing.key],
                                         False, _pod_tls(index, ing, routing[ing.key], notes))
                canaries.setdefault((rule.get("host", ""), path.get("path") or "/"),
                                    Canaried(ing, routing[ing.key].canary, backend))  # type: ignore[arg-type]
    taken = [ing for ing in taken if routing[ing.key].canary is None]
    # The hosts whose paths are all regular expressions (ingress-nginx's enforceRegexModifier, per server).
    regex_hosts = {rule.get("host", "") for ing in taken for rule in ing.spec.get("rules", [])
                   if routing[ing.key].use_regex or any(routing[ing.key].rewrites(path.get("path") or "/")
                                                        for path in (rule.get("http") or {}).get("paths", []))}
    # The hosts with a certificate from an Ingress: their HTTP requests are redirected (ssl-redirect).
    tls_hosts = {host for ing in taken for tls in ing.spec.get("tls", []) if tls.get("secretName")
                 for host in tls.get("hosts") or ()}
    hosts = {rule.get("host", "") for ing in taken for rule in ing.spec.get("rules", [])}
    # server-alias: more names for a host's server (every path of the host, whichever Ingress has it), unless
    # a name is a host of its own.
    aliases: dict[str, list[str]] = {}
    for ing in taken:
        for rule in ing.spec.get("rules", []):
            host = rule.get("host", "")
            for alias in routing[ing.key].server_aliases:
                if host and alias not in hosts and alias not in aliases.setdefault(host, []):
                    aliases[host].append(alias)
    for ing in taken:
        plain, secure = _ingress_routes(index, ing, routing[ing.key], regex_hosts, tls_hosts, hosts, canaries,
                                        backend_tls, notes)
        if aliases:
            plain, secure = ([dataclasses.replace(r, hostnames=(*r.hostnames, *aliases[r.hostnames[0]]))
                              if r.hostnames[0] in aliases else r for r in routes] for routes in (plain, secure))
        if not routing[ing.key].enable_access_log:
            plain, secure = ([dataclasses.replace(r, access_log=False) for r in routes] for routes in (plain, secure))
        http_routes += plain
        https_routes += secure
        ordered = _acme_issuer(index, ing, notes)
        for tls in ing.spec.get("tls", []):
            secret_name = tls.get("secretName")
            if not secret_name:
                continue
            if ordered is not None and tls.get("hosts") and acme is not None:
                acme.append(Wanted(ordered, tuple(tls["hosts"]), ing.namespace, secret_name,
                                   f"Ingress {ing.namespace}/{ing.name}"))
            secret = index.get("Secret", ing.namespace, secret_name)
            if secret is None:
                waiting = f"waiting for its certificate from {ordered.key}" if ordered is not None else "not found"
                notes.append(Problem("warning", ing.origin, f"TLS Secret {ing.namespace}/{secret_name} {waiting}",
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
    http_routes, https_routes = _slash_redirects_where_nginx_has_them(http_routes), \
        _slash_redirects_where_nginx_has_them(https_routes)
    passthrough = [route for ing in taken if routing[ing.key].ssl_passthrough
                   for route in _passthrough_routes(index, ing, backend_tls, notes)]
    if not http_routes and not certificates and not passthrough:
        return []
    listeners = [ir.Listener(name="ingress/http", gateway="ingress", address="", port=http_port, protocol="HTTP",
                             http_routes=tuple(http_routes))]
    if certificates or passthrough:
        listeners.append(ir.Listener(
            name="ingress/https", gateway="ingress", address="", port=https_port, protocol="HTTPS",
            tls=ir.ListenerTLS(mode="Terminate", certificates=tuple(certificates.values())),
            http_routes=tuple(https_routes), l4_routes=tuple(passthrough)))
    return listeners


def _passthrough_routes(index: Index, ing: Resource, backend_tls: dict, notes: list[Problem]) -> list[ir.L4Route]:
    """ssl-passthrough: each host's TLS connections, chosen by their ClientHello's name on the HTTPS port, go
    as they are to the pods of its "/" path (ingress-nginx's rule: the other paths are ignored for it)."""
    routes = []
    for rule in ing.spec.get("rules", []):
        host = rule.get("host", "")
        paths = (rule.get("http") or {}).get("paths", [])
        root = next((p for p in paths if (p.get("path") or "/") == "/"), None)
        if not host or root is None:
            notes.append(Problem("warning", ing.origin, f"ssl-passthrough needs a host and a \"/\" path: "
                                 f"{host or 'a rule without a host'} is not passed through", ing.key))
            continue
        routes.append(ir.L4Route(name=f"ingress/{ing.namespace}/{ing.name}/passthrough/{host}",
                                 source=f"Ingress {ing.namespace}/{ing.name}", hostnames=(host,),
                                 backends=(_backend(index, ing, root["backend"], backend_tls, notes),),
                                 created=ing.creation_timestamp))
    return routes


def _looks_like_ip(address: str) -> bool:
    return address.replace(".", "").isdigit() or ":" in address


def _ingress_routes(index: Index, ing: Resource, routing: Routing, regex_hosts: set[str], tls_hosts: set[str],
                    hosts: set[str], canaries: dict[tuple[str, str], Canaried], backend_tls: dict,
                    notes: list[Problem]) -> tuple[list[ir.HTTPRoute], list[ir.HTTPRoute]]:
    """The Ingress's rules for the HTTP listener and for the HTTPS one (the same, less the HTTPS redirect; with
    backend-protocol AUTO_HTTP, TLS to the pod from the HTTPS one)."""
    source = f"Ingress {ing.namespace}/{ing.name}"
    plain: list[ir.HTTPRoute] = []
    secure: list[ir.HTTPRoute] = []
    app_root_hosts: list[str] = []
    www_hosts: list[str] = []
    fallback = _default_backend(index, ing, routing.default_backend, backend_tls, notes) \
        if routing.default_backend else None
    if routing.error_codes and fallback is None:
        notes.append(Problem("warning", ing.origin, "custom-http-errors without a default-backend that serves: "
                             "tidegate has no default backend of its own, so the pods' answers are passed on",
                             ing.key))
    pod_tls = _pod_tls(index, ing, routing, notes)
    mirror = _mirror_filter(index, ing, routing.mirror, backend_tls, notes) if routing.mirror else None
    headers = _custom_headers(index, ing, routing.custom_headers, notes) if routing.custom_headers else None
    auth: list[ir.Filter] = []  # both must let a request in (nginx's `satisfy all`)
    if routing.external_auth is not None:
        auth.append(external_auth_filter(index, ing, routing.external_auth, notes))
    if routing.basic_auth is not None:
        auth.append(basic_auth_filter(index, ing, routing.basic_auth, notes))
    for r, rule in enumerate(ing.spec.get("rules", [])):
        host = rule.get("host", "")
        if routing.app_root and host not in app_root_hosts:
            app_root_hosts.append(host)
        if routing.from_to_www and host and not host.startswith("*") and host not in www_hosts:
            www_hosts.append(host)
        for p, path in enumerate((rule.get("http") or {}).get("paths", [])):
            value = path.get("path") or "/"
            matches = _matches(path.get("pathType", "ImplementationSpecific"), value, host in regex_hosts)
            if isinstance(matches, str):
                notes.append(Problem("error", ing.origin, f"path {value!r} of host {host or '*'}: {matches}; this "
                                     "path is not served", ing.key, f"spec.rules[{r}].http.paths[{p}].path"))
                continue
            filters = _filters(routing, value, auth, ing, path["backend"]) + ([mirror] if mirror is not None else [])
            if isinstance(headers, ir.Filter):
                filters.append(headers)
            backend = _backend(index, ing, path["backend"], backend_tls, notes)
            if fallback is not None and routing.error_codes:
                service, _, port = backend.name.rpartition(":")
                filters.append(ir.Filter("ErrorPages", {
                    "codes": list(routing.error_codes), "namespace": ing.namespace, "ingress": ing.name,
                    "service": service.partition("/")[2], "port": port}, mirror=fallback))
            if fallback is not None and not backend.invalid and not any(e.ready for e in backend.endpoints):
                # ingress-nginx: a Service with no ready endpoint is served by the default-backend
                backend = dataclasses.replace(fallback, weight=backend.weight)
            route = ir.HTTPRoute(
                name=f"ingress/{ing.namespace}/{ing.name}/rule/{r}/path/{p}", source=source,
                hostnames=(host or "*",), matches=matches, filters=tuple(filters),
                backends=(_with_protocol(backend, routing, False, pod_tls),),
                created=ing.creation_timestamp, wildcard_single_label=True)
            if isinstance(headers, str):  # ingress-nginx's "location denied"
                route = dataclasses.replace(route, direct_status=503, guard=ir.RequestGuard(problem=headers))
            canaried = canaries.get((host, value))
            secure_route = dataclasses.replace(route, backends=(_with_protocol(backend, routing, True, pod_tls),))
            secure += _canary_routes(secure_route, canaried) if canaried else [secure_route]
            if routing.force_ssl_redirect or (routing.ssl_redirect and host in tls_hosts):
                # Lua's, at the end of ingress-nginx's rewrite phase: after permanent-redirect, temporal-redirect
                # and a rewrite-target to a URL (nginx's own rewrite directives), and the CORS headers; its
                # Location has the path as requested, so the path's rewrite does not change it.
                at = sum(f.type in ("CORS", "RequestRedirect") for f in route.filters)
                redirect = ir.Filter("RequestRedirect", {"scheme": "https", "statusCode": 308,
                                                         "stripTrailingSlash": not routing.preserve_trailing_slash})
                route = dataclasses.replace(route, filters=(*route.filters[:at], redirect, *route.filters[at:]))
            plain += _canary_routes(route, canaried) if canaried else [route]
            if value != "/" and value.endswith("/") and host not in regex_hosts:
                # nginx's location "/foo/" (or "= /foo/") with proxy_pass answers "/foo" itself: 301 to "/foo/",
                # unless a location for "/foo" exists (the youngest rule: any other rule for "/foo" wins).
                slash = ir.HTTPRoute(
                    name=f"{route.name}/slash", source=source, hostnames=route.hostnames,
                    matches=(ir.Match(path=ir.PathMatch("Exact", value[:-1])),),
                    filters=(ir.Filter("RequestRedirect", {"path": {"type": "ReplaceFullPath",
                                                                    "replaceFullPath": value},
                                                           "statusCode": 301}),),
                    created="~~", wildcard_single_label=True)
                plain.append(slash)
                secure.append(slash)
    default = ing.spec.get("defaultBackend")
    if default:
        route = ir.HTTPRoute(
            name=f"ingress/{ing.namespace}/{ing.name}/default", source=source, hostnames=("*",),
            matches=(ir.Match(),), backends=(_backend(index, ing, default, backend_tls, notes),),
            created=ing.creation_timestamp, wildcard_single_label=True)
        plain.append(route)
        secure.append(route)
    for host in www_hosts:
        # ingress-nginx's server for the other name (www. added or taken away), when no Ingress has that host:
        # 308 to the Ingress's host, the scheme and port the request came with, less one trailing "/".
        other = host[4:] if host.startswith("www.") else f"www.{host}"
        if other in hosts:
            continue
        route = ir.HTTPRoute(
            name=f"ingress/{ing.namespace}/{ing.name}/from-to-www/{other}", source=source, hostnames=(other,),
            matches=(ir.Match(),), filters=(ir.Filter("RequestRedirect", {
                "hostname": host, "statusCode": 308, "stripTrailingSlash": True, "alwaysPort": True}),),
            created=ing.creation_timestamp, wildcard_single_label=True)
        plain.append(route)
        secure.append(route)
    for host in app_root_hosts:
        # ingress-nginx's `if ($uri = /) { return 302 $scheme://$http_host<app-root>; }`, in the server block:
        # before any location, for the host's "/" alone; the query string only with "$is_args$args".
        route = ir.HTTPRoute(
            name=f"ingress/{ing.namespace}/{ing.name}/app-root/{host or '*'}", source=source,
            hostnames=(host or "*",), matches=(ir.Match(path=ir.PathMatch("Exact", "/")),),
            filters=(ir.Filter("RequestRedirect", {
                "path": {"type": "ReplaceFullPath",
                         "replaceFullPath": routing.app_root.removesuffix(ingress_annotations.APP_ROOT_QUERY)},
                "statusCode": 302, "dropQuery": not routing.app_root.endswith(ingress_annotations.APP_ROOT_QUERY)}),),
            created="0", wildcard_single_label=True)  # "0": before every other rule for "/" (the oldest)
        plain.append(route)
        secure.append(route)
    return plain, secure


def _acme_issuer(index: Index, ing: Resource, notes: list[Problem]) -> Issuer | None:
    """The issuer that orders the Ingress's certificates (tidegate.io/acme-issuer, or kubernetes.io/tls-acme
    and the default issuer), if it asks for one."""
    name = str(ing.annotations.get(ISSUER_OPTION, "")).strip()
    if not name and str(ing.annotations.get(TLS_ACME, "")).strip().lower() != "true":
        return None
    issuer = find_issuer(index, ing.namespace, name) if name else default_issuer(index, ing.namespace)
    if isinstance(issuer, str):
        notes.append(Problem("error", ing.origin, f"{ISSUER_OPTION if name else TLS_ACME}: {issuer}; no certificate "
                             "is ordered", ing.key))
        return None
    return issuer


def _slash_redirects_where_nginx_has_them(routes: list[ir.HTTPRoute]) -> list[ir.HTTPRoute]:
    """Without the "/foo" → "/foo/" redirects of hosts where a rule takes "/foo" as it is (nginx's "= /foo",
    from an Exact or a Prefix path "/foo"), and with one per host and path."""
    taken = {(host, m.path.value) for r in routes if not r.name.endswith("/slash") for host in r.hostnames
             for m in r.matches if m.path.type in ("Exact", "PathPrefix")}
    out = []
    for route in routes:
        if route.name.endswith("/slash"):
            key = (route.hostnames[0], route.matches[0].path.value)
            if key in taken:
                continue
            taken.add(key)
        out.append(route)
    return out


@dataclass(frozen=True)
class Canaried:
    """A canary Ingress's path, for the mainline path of the same host and path."""

    ingress: Resource
    canary: Canary
    backend: ir.Backend


def _canary_routes(route: ir.HTTPRoute, canaried: Canaried) -> list[ir.HTTPRoute]:
    """A mainline path's rule with its canary, in ingress-nginx's order (balancer.lua): the header decides
    first (canary-by-header-value: that value; else -pattern: a match; else "always" / "never"), then the
    cookie ("always" / "never"), then the weight of the rest. The header's rules come before the cookie's
    (the names sort them: the same header count, the same age)."""
    canary, main = canaried.canary, route.backends[0]
    alternative = canaried.backend
    out: list[ir.HTTPRoute] = []

    def on(kind: str, name: str, value: str, regex: bool, backend: ir.Backend) -> None:
        header = ir.ValueMatch(name, value, "RegularExpression" if regex else "Exact")
        out.append(dataclasses.replace(route, name=f"{route.name}/canary/{len(out) + 1}-{kind}",
                                       matches=tuple(dataclasses.replace(m, headers=(*m.headers, header))
                                                     for m in route.matches),
                                       backends=(dataclasses.replace(backend, weight=1),)))

    if canary.header:
        if canary.header_value:
            on("header", canary.header.lower(), canary.header_value, False, alternative)
        elif canary.header_pattern:  # searched in the value, as ngx.re.match does
            on("header", canary.header.lower(), f"(?s).*(?:{canary.header_pattern}).*", True, alternative)
        else:
            on("header", canary.header.lower(), "always", False, alternative)
            on("header", canary.header.lower(), "never", False, main)
    if canary.cookie:
        for word, backend in (("always", alternative), ("never", main)):
            on("cookie", "cookie", rf"(?s)(?:.*[;,]\s*)?{re2.escape(canary.cookie)}={word}(?:\s*[;,].*)?", True,
               backend)
    weight = min(canary.weight, canary.weight_total)
    backends = tuple(b for b in (dataclasses.replace(main, weight=canary.weight_total - weight),
                                 dataclasses.replace(alternative, weight=weight)) if b.weight > 0)
    out.append(dataclasses.replace(route, backends=backends))
    return out


def _matches(path_type: str, value: str, regex_host: bool) -> tuple[ir.Match, ...] | str:
    """The matches of one Ingress path (the module's docstring), or why it cannot be served."""
    if regex_host:
        # `location ~* "^PATH"`, whatever the path's type. (ingress-nginx makes a Prefix path that asks for no
        # regex itself two locations, "^PATH/" and "^PATH": "^PATH" takes what both take; only its place among
        # regexes of one character more differs.)
        pattern = f"(?i)(?:{value}).*"  # searched from the start: a match at the start, then anything
        try:
            re2.compile(pattern)
        except re2.error as exc:
            return f"not a regular expression RE2 reads ({exc}; nginx's PCRE may have taken it)"
        return (ir.Match(path=ir.PathMatch("RegularExpression", pattern)),)
    if path_type == "Exact":
        return (ir.Match(path=ir.PathMatch("Exact", value)),)
    if path_type == "Prefix" and (value == "/" or not value.endswith("/")):
        return (ir.Match(path=ir.PathMatch("PathPrefix", value)),)
    # ImplementationSpecific, and a Prefix that ends in "/" ("/foo/": nginx's location "/foo/" and "= /foo/")
    return (ir.Match(path=ir.PathMatch("StringPrefix", value)),)


_UNCHECKED = ir.BackendTLS(hostname="", verify=False)  # ingress-nginx's default: proxy_ssl_verify off


def _with_protocol(backend: ir.Backend, routing: Routing, secure: bool, pod_tls: ir.BackendTLS | str = _UNCHECKED
                   ) -> ir.Backend:
    """backend-protocol on a path's backend (proxy-connect-timeout and the balancing annotations are
    BackendPolicy sections: backend_policies.py). HTTPS (and AUTO_HTTP from the HTTPS listener): TLS to the
    pod as `pod_tls` says (the proxy-ssl-* annotations; by default its certificate not checked, as
    ingress-nginx's proxy_ssl_verify off; a BackendTLSPolicy on the Service, when there is one, decides
    instead); GRPC: HTTP/2 in clear (h2c); GRPCS: HTTP/2 over TLS. A `pod_tls` that is a problem (str) makes the
    backend answer 500 where TLS is spoken."""
    if backend.invalid:
        return backend
    protocol = routing.backend_protocol
    tls_wanted = protocol in ("HTTPS", "GRPCS") or (protocol == "AUTO_HTTP" and secure)
    if tls_wanted and backend.tls is None and isinstance(pod_tls, str):
        return dataclasses.replace(backend, invalid=pod_tls)
    if backend.tls is None and tls_wanted and protocol != "GRPCS":
        backend = dataclasses.replace(backend, tls=pod_tls)
    elif protocol == "GRPC" and backend.tls is None:
        backend = dataclasses.replace(backend, protocol="kubernetes.io/h2c")
    elif protocol == "GRPCS":
        backend = dataclasses.replace(backend, protocol="kubernetes.io/h2c", tls=backend.tls or pod_tls)
    return backend


def _pod_tls(index: Index, ing: Resource, routing: Routing, notes: list[Problem]) -> ir.BackendTLS | str:
    """TLS to the Ingress's pods as its proxy-ssl-* annotations say, or why it cannot be spoken (a str)."""
    ssl = routing.proxy_ssl
    if ssl is None:
        return _UNCHECKED
    if ssl.problem:
        return ssl.problem
    if ssl.verify and not ssl.name:
        notes.append(Problem("error", ing.origin, "annotation nginx.ingress.kubernetes.io/proxy-ssl-verify on needs "
                             "proxy-ssl-name (ingress-nginx checked the name upstream_balancer, which no pod's "
                             "certificate carries): the Ingress's TLS paths answer 500", ing.key))
        return "proxy-ssl-verify on without proxy-ssl-name"
    ca_pem, client = "", None
    if ssl.secret_name:
        secret = index.get("Secret", ssl.secret_namespace, ssl.secret_name)
        if secret is None:
            notes.append(Problem("error", ing.origin, f"proxy-ssl-secret {ssl.secret_namespace}/{ssl.secret_name} "
                                 "not found: the Ingress's TLS paths answer 500", ing.key))
            return "proxy-ssl-secret not found"
        ca = decode_secret_field(secret.obj, "ca.crt")
        cert, key = decode_secret_field(secret.obj, "tls.crt"), decode_secret_field(secret.obj, "tls.key")
        where = f"proxy-ssl-secret {secret.namespace}/{secret.name}"
        if ca and not ca_bundle_is_valid(ca):
            notes.append(Problem("error", ing.origin, f"{where}: ca.crt is not PEM certificates; the Ingress's TLS "
                                 "paths answer 500", ing.key))
            return "proxy-ssl-secret ca.crt unreadable"
        ca_pem = ca.decode() if ca else ""
        if cert and key:
            try:
                certificate_pair(cert, key)
            except CertificateError as exc:
                notes.append(Problem("error", ing.origin, f"{where}: {exc}; the Ingress's TLS paths answer 500",
                                     ing.key))
                return "proxy-ssl-secret tls.crt/tls.key unreadable"
            client = ir.Certificate(f"{secret.namespace}/{secret.name}", cert.decode(), key.decode())
        if ssl.verify and not ca_pem:
            notes.append(Problem("warning", ing.origin, f"proxy-ssl-secret {secret.namespace}/{secret.name} has no "
                                 "ca.crt: the pods' certificates are checked against the system's CAs", ing.key))
    return ir.BackendTLS(hostname=ssl.name if (ssl.verify or ssl.server_name) else "", ca_pem=ca_pem,
                         verify=ssl.verify, client_certificate=client)


def _filters(routing: Routing, value: str, auth: list[ir.Filter], ing: Resource, backend: dict) -> list[ir.Filter]:
    """A path's filters from its Ingress's annotations, in the order ingress-nginx applies them: CORS (its
    rewrite phase), the redirect annotations, authentication (its access phase), then the request's changes.
    The caller puts the redirect to HTTPS after the CORS and redirect filters."""
    filters = []
    if routing.cors is not None:
        filters.append(ir.Filter("CORS", routing.cors))
    if routing.redirect_url:
        filters.append(ir.Filter("RequestRedirect", {"location": routing.redirect_url,
                                                     "statusCode": routing.redirect_code}))
    to_url = routing.rewrites(value) and routing.rewrite_target.startswith(("http://", "https://"))
    if to_url:
        # `rewrite "(?i)PATH" https://... break;`: nginx answers 302 to that URL (the request's query after it)
        filters.append(ir.Filter("RequestRedirect", {"path": {
            "type": "RegexReplace", "pattern": f"(?i){value}", "substitution": routing.rewrite_target},
            "statusCode": 302}))
    filters += auth
    rewrite: dict[str, Any] = {}
    if routing.rewrites(value) and not to_url:
        # `rewrite "(?i)PATH" TARGET break;`: the whole path becomes TARGET, $1... its groups
        rewrite["path"] = {"type": "RegexReplace", "pattern": f"(?i){value}", "substitution": routing.rewrite_target}
        if routing.x_forwarded_prefix:
            filters.append(ir.Filter("RequestHeaderModifier", {"set": [{"name": "X-Forwarded-Prefix",
                                                                        "value": routing.x_forwarded_prefix}]}))
    if routing.upstream_vhost:
        service = backend.get("service") or {}
        port = service.get("port") or {}
        known = {"$namespace": ing.namespace, "$ingress_name": ing.name, "$service_name": service.get("name", ""),
                 "$service_port": str(port.get("number") or port.get("name") or "")}
        rewrite["hostname"] = re.sub(r"\$\w+", lambda m: known[m.group(0)], routing.upstream_vhost)
    if rewrite:
        filters.append(ir.Filter("URLRewrite", rewrite))
    return filters


_HEADER = re2.compile(r"[a-zA-Z0-9_-]+")  # ingress-nginx's customheaders headerRegexp and valueRegexp
_HEADER_VALUE = re2.compile(r"[a-zA-Z0-9_ :;.,\\/\"'?!(){}\[\]@<>=\-+*#$&`|~^%]+")


def _custom_headers(index: Index, ing: Resource, name: str, notes: list[Problem]) -> ir.Filter | str:
    """custom-headers: the ConfigMap's entries as response headers (a ResponseHeaderModifier), or why the
    Ingress's paths answer 503 instead (a missing ConfigMap, a name or value outside ingress-nginx's
    grammar), as ingress-nginx denies the location."""
    config_map = index.get("ConfigMap", ing.namespace, name)
    where = f"custom-headers ConfigMap {ing.namespace}/{name}"
    data = {str(k): str(v) for k, v in ((config_map.obj.get("data") or {}) if config_map else {}).items()}
    bad = [k for k, v in data.items() if not _HEADER.fullmatch(k) or not _HEADER_VALUE.fullmatch(v)]
    problem = f"{where} not found" if config_map is None else \
        f"{where}: {len(bad)} entries are not a header name and value" if bad else ""
    if problem:
        notes.append(Problem("error", ing.origin, f"{problem}: the Ingress's paths answer 503", ing.key))
        return problem
    return ir.Filter("ResponseHeaderModifier", {"set": [{"name": k, "value": v} for k, v in sorted(data.items())]})


def _mirror_filter(index: Index, ing: Resource, mirror: tuple[str, str, int, bool], backend_tls: dict,
                   notes: list[Problem]) -> ir.Filter | None:
    """mirror-target's Service as a RequestMirror (its pods get a copy of each request's head)."""
    namespace, name, port, tls = mirror
    backend, problem = resolve_backend(index, {"name": name, "port": port}, "Ingress", namespace, backend_tls)
    if problem:
        notes.append(Problem("warning", ing.origin, f"mirror-target: {problem.message}; nothing is mirrored",
                             ing.key))
        return None
    if tls and backend.tls is None:
        backend = dataclasses.replace(backend, tls=_UNCHECKED)
    return ir.Filter("RequestMirror", {"percent": 100}, mirror=backend)


def _default_backend(index: Index, ing: Resource, name: str, backend_tls: dict, notes: list[Problem]
                     ) -> ir.Backend | None:
    """default-backend: the Service (its first port, as ingress-nginx takes it) that serves the Ingress's
    paths whose Service has no ready endpoint, and its custom-http-errors."""
    service = index.get("Service", ing.namespace, name)
    ports = (service.spec.get("ports") or []) if service is not None else []
    if not ports:
        notes.append(Problem("warning", ing.origin, f"default-backend Service {ing.namespace}/{name} "
                             f"{'has no port' if service is not None else 'not found'}: ignored", ing.key))
        return None
    backend, problem = resolve_backend(index, {"name": name, "port": ports[0]["port"]}, "Ingress", ing.namespace,
                                       backend_tls)
    if problem:
        notes.append(Problem("warning", ing.origin, f"default-backend: {problem.message}", ing.key))
    return backend


def external_auth_filter(index: Index, ing: Resource, auth: ExternalAuth, notes: list[Problem]) -> ir.Filter:
    """The ExternalAuth filter of an Ingress's paths (dataplane/external_auth.py). A URL whose host names a
    Service of the cluster (NAME.NAMESPACE, NAME.NAMESPACE.svc, NAME.NAMESPACE.svc.cluster.local) is sent
    straight to its ready pods (`targets`), as every backend is."""
    config: dict[str, Any] = {k: v for k, v in dataclasses.asdict(auth).items() if v}
    if auth.proxy_set_headers:
        config_map = index.get("ConfigMap", ing.namespace, auth.proxy_set_headers)
        data = {str(k): str(v) for k, v in ((config_map.obj.get("data") or {}) if config_map else {}).items()}
        where = f"auth-proxy-set-headers ConfigMap {ing.namespace}/{auth.proxy_set_headers}"
        if config_map is None or any(not _HEADER.fullmatch(k) or "\n" in v or "\r" in v for k, v in data.items()):
            problem = f"{where} {'not found' if config_map is None else 'has an entry that is not a header'}"
            notes.append(Problem("error", ing.origin, f"{problem}: the Ingress's paths answer 503", ing.key))
            return ir.Filter("ExternalAuth", {"problem": problem})
        config["proxy_set_headers"] = [[k, v] for k, v in sorted(data.items())]
        config["proxySetHeadersConfigMap"] = auth.proxy_set_headers
    if auth.problem:
        return ir.Filter("ExternalAuth", config)
    config["response_headers"] = list(auth.response_headers)
    parts = urlsplit(auth.url)
    labels = (parts.hostname or "").split(".")
    if "$" not in parts.netloc and len(labels) >= 2 and (len(labels) == 2 or labels[2:] in (["svc"], [
            "svc", "cluster", "local"])):
        service = index.get("Service", labels[1], labels[0])
        if service is not None:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            backend, problem = resolve_backend(index, {"name": labels[0], "port": port}, "Ingress", labels[1], {})
            config["targets"] = [] if problem else [[e.address, e.port] for e in backend.endpoints
                                                    if e.ready]
    return ir.Filter("ExternalAuth", config)


def basic_auth_filter(index: Index, ing: Resource, auth: BasicAuth, notes: list[Problem]) -> ir.Filter:
    """The BasicAuth filter of an Ingress's paths: the users from its Secret, or the reason they answer 503."""
    config: dict[str, Any] = {"realm": auth.realm, "source": f"{ing.kind} {ing.namespace}/{ing.name}",
                              "secretName": auth.secret_name, "secretType": auth.secret_type}
    problem = auth.problem
    secret = index.get("Secret", auth.secret_namespace, auth.secret_name) if not problem else None
    if not problem and secret is None:
        problem = f"Secret {auth.secret_namespace}/{auth.secret_name} (auth-secret) not found"
    elif secret is not None:
        config["secret"] = f"{secret.namespace}/{secret.name}"
        if auth.secret_type == "auth-file":
            content = decode_secret_field(secret.obj, "auth")
            if content is None:
                problem = f"Secret {secret.namespace}/{secret.name} has no key auth (an htpasswd file)"
            else:
                config["htpasswd"] = content.decode("utf-8", "replace")
        else:
            data = {**(secret.obj.get("stringData") or {}), **(secret.obj.get("data") or {})}
            lines = [f"{user}:{(decode_secret_field(secret.obj, user) or b'').decode('utf-8', 'replace')}"
                     for user in sorted(data)]
            config["htpasswd"] = "".join(line + "\n" for line in lines)
    if problem:
        if not auth.problem:
            notes.append(Problem("error", ing.origin, f"authentication: {problem}; the Ingress's paths answer 503",
                                 ing.key))
        config["problem"] = problem
    else:
        for line in basic_auth.unreadable(config["htpasswd"]):
            notes.append(Problem("warning", ing.origin, f"auth-secret {config['secret']}: {line}", ing.key))
    return ir.Filter("BasicAuth", config)


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
