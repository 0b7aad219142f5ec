"""`tidegate convert`: Ingress objects, with ingress-nginx's annotations, as Gateway API objects.

The conversion starts from what tidegate serves for the Ingresses (translate/ingress.py), so that it carries
ingress-nginx's meaning rather than the fields' names: a Gateway (or `--gateway NS/NAME`, an existing one),
one HTTPRoute per Ingress and host (two when plain HTTP redirects to HTTPS: one on each listener), named
rules, ReferenceGrants for certificates in other namespaces. Every object names the Ingress it came from
(annotation `tidegate.io/converted-from`).

A report says, per Ingress and field, `converted`, `approximated` (with the behaviour that changes),
`tidegate-policy` (tidegate's own kinds carry it, and are written: a BackendPolicy on the HTTPRoute for
balancing and timeouts, a TrafficPolicy on the Ingress's HTTPRoutes for edge protection, HTTPRouteFilters that
the rules name by ExtensionRef for authentication, error pages and rewrites with capture groups),
`unsupported` or `refused`.
`tidegate diff INGRESS CONVERTED` then shows, request by request, that nothing else changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tidegate import ir
from tidegate.resources.model import Resource
from tidegate.translate import TranslateOptions, translate
from tidegate.translate.conditions import CONTROLLER_NAME as GATEWAY_CONTROLLER
from tidegate.translate.index import Index
from tidegate.translate.ingress import ingresses_for_tidegate
from tidegate.translate.backend_policies import ingress_sections
from tidegate.translate.traffic_policies import ingress_sections as traffic_sections
from tidegate.translate.ingress_annotations import (ACCESS_KEYS, BALANCING_KEYS, LATER_KEYS, NGINX_PREFIX,
                                                    NO_EFFECT_KEYS, PROTECTION_KEYS, ROUTING_KEYS)

GATEWAY_API = "gateway.networking.k8s.io/v1"
TIDEGATE_API = "tidegate.io/v1alpha1"
Extension = Callable[[str, dict[str, Any]], dict[str, Any]]  # (kind, HTTPRouteFilter spec) → the filter naming it
FROM = "tidegate.io/converted-from"
VERDICTS = ("converted", "approximated", "tidegate-policy", "unsupported", "refused")
_REDIRECT_CODES = (301, 302, 303, 307, 308)  # what HTTPRoute's RequestRedirect takes
_CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "*")


@dataclass(frozen=True)
class Entry:
    ingress: str  # "ns/name"
    field: str  # an annotation's key, or a spec field
    verdict: str  # one of VERDICTS
    note: str = ""


def convert(resources: list[Resource], gateway: str = "", options: TranslateOptions = TranslateOptions()
            ) -> tuple[list[dict[str, Any]], list[Entry]]:
    """The Gateway API objects for the Ingresses among `resources`, and the report."""
    ingresses = ingresses_for_tidegate(Index(resources), options.ingress_without_class)  # tidegate's to serve
    report = [entry for ing in ingresses for entry in _annotation_entries(ing)]
    served = translate(resources, options).ir
    listeners = {listener.name: listener for listener in served.listeners if listener.gateway == "ingress"}
    namespace, name = gateway.split("/", 1) if gateway else (
        (ingresses[0].namespace if ingresses else "default"), "ingress")
    objects: list[dict[str, Any]] = []
    if not gateway:
        if not any(r.kind == "GatewayClass" and r.spec.get("controllerName") == GATEWAY_CONTROLLER for r in resources):
            objects.append({"apiVersion": GATEWAY_API, "kind": "GatewayClass", "metadata": {"name": "tidegate"},
                            "spec": {"controllerName": GATEWAY_CONTROLLER}})
        objects += _gateway(namespace, name, listeners, options, report)
    http = listeners.get("ingress/http")
    https = listeners.get("ingress/https")
    by_ingress: dict[tuple[str, tuple[str, ...]], dict[str, list[ir.HTTPRoute]]] = {}
    for section, listener in (("http", http), ("https", https)):
        for route in listener.http_routes if listener is not None else ():
            source = route.source.removeprefix("Ingress ")
            by_ingress.setdefault((source, route.hostnames), {}).setdefault(section, []).append(route)
    seen_paths: set[tuple[str, str]] = set()
    by_name = {f"{ing.namespace}/{ing.name}": ing for ing in ingresses}
    route_names: dict[str, list[str]] = {}  # Ingress → its HTTPRoutes
    extensions: dict[tuple[str, str], str] = {}  # (namespace, an HTTPRouteFilter's spec) → its name
    for (source, hostnames), sections in by_ingress.items():
        ns, ing_name = source.split("/", 1)
        host = hostnames[0] if hostnames != ("*",) else ""
        plain, secure = sections.get("http", []), sections.get("https", [])
        if plain == secure or not secure:
            groups = [("", plain, ["http", "https"] if https is not None and secure else ["http"])]
        else:
            groups = [("-http", plain, ["http"]), ("-https", secure, ["https"])]
        for suffix, routes, parents in groups:
            route_name = _name(ing_name, host) + suffix

            def extension(kind: str, spec: dict[str, Any], ns: str = ns, ing_name: str = ing_name,
                          source: str = source) -> dict[str, Any]:
                """An HTTPRouteFilter with `spec` (one per Ingress and content), as the filter that names it."""
                key = (ns, json.dumps(spec, sort_keys=True))
                if key not in extensions:
                    taken = sum(1 for other in extensions.values() if other.startswith(f"{ing_name}-{kind}"))
                    extensions[key] = f"{ing_name}-{kind}" + (f"-{taken + 1}" if taken else "")
                    objects.append({"apiVersion": TIDEGATE_API, "kind": "HTTPRouteFilter", "metadata": {
                        "name": extensions[key], "namespace": ns, "annotations": {FROM: f"Ingress {source}"}},
                        "spec": spec})
                return {"type": "ExtensionRef", "extensionRef": {"group": "tidegate.io", "kind": "HTTPRouteFilter",
                                                                 "name": extensions[key]}}

            rules = [_rule(route, source, report, seen_paths, extension) for route in routes]
            objects.append({
                "apiVersion": GATEWAY_API, "kind": "HTTPRoute",
                "metadata": {"name": route_name, "namespace": ns, "annotations": {FROM: f"Ingress {source}"}},
                "spec": {"parentRefs": [{"name": name, "namespace": namespace, "sectionName": s} for s in parents],
                         **({"hostnames": list(hostnames)} if host else {}), "rules": rules}})  # (server-alias too)
            policy = _backend_policy(by_name.get(source), ns, route_name, routes, report)
            if policy is not None:
                objects.append(policy)
            route_names.setdefault(source, []).append(route_name)
    for source, names in route_names.items():
        protection = _traffic_policy(by_name[source], names) if source in by_name else None
        if protection is not None:
            objects.append(protection)
    # An annotation whose rules said more (approximated, unsupported) is not also "converted".
    said = {(e.ingress, key) for e in report if e.verdict != "converted" for key in _COVERS.get(e.field, ())}
    report = [e for e in report if not (e.verdict == "converted" and (e.ingress, e.field) in said)]
    return objects, report


# The annotations behind what a rule's conversion reports.
_COVERS = {
    "permanent-redirect / temporal-redirect": (NGINX_PREFIX + "permanent-redirect", NGINX_PREFIX + "temporal-redirect",
                                               NGINX_PREFIX + "permanent-redirect-code",
                                               NGINX_PREFIX + "temporal-redirect-code"),
    "ssl-redirect": (NGINX_PREFIX + "ssl-redirect", NGINX_PREFIX + "force-ssl-redirect"),
    "app-root": (NGINX_PREFIX + "app-root",),
    "from-to-www-redirect": (NGINX_PREFIX + "from-to-www-redirect",),
    "rewrite-target": (NGINX_PREFIX + "rewrite-target",),
}


def _name(ingress: str, host: str) -> str:
    label = host.replace("*", "wildcard").replace(".", "-") if host else "any-host"
    return f"{ingress}-{label}"[:253].rstrip("-")


def _annotation_entries(ing: Resource) -> list[Entry]:
    out = []
    source = f"{ing.namespace}/{ing.name}"
    for full, value in ing.annotations.items():
        if not full.startswith(NGINX_PREFIX):
            continue
        key = full[len(NGINX_PREFIX):]
        if key.endswith("-snippet"):
            out.append(Entry(source, full, "refused", "nginx configuration is never used"))
        elif key in PROTECTION_KEYS:
            out.append(Entry(source, full, "tidegate-policy", "a TrafficPolicy on the HTTPRoutes"))
        elif key in BALANCING_KEYS:
            if key == "proxy-send-timeout":
                out.append(Entry(source, full, "unsupported", "tidegate sets no limit on writes to a pod"))
            else:
                out.append(Entry(source, full, "tidegate-policy", "a BackendPolicy on the HTTPRoute"))
        elif key == "enable-access-log":
            out.append(Entry(source, full, "unsupported", "access logs are chosen per Gateway (its tidegate.io/"
                                                          "access-log annotation)"))
        elif key == "ssl-passthrough":
            out.append(Entry(source, full, "unsupported", "a TLSRoute on a TLS Passthrough listener of a port of its "
                                                          "own: tidegate's Gateways do not pass through and "
                                                          "terminate on one port"))
        elif key.startswith("proxy-ssl-"):
            out.append(Entry(source, full, "unsupported", "a BackendTLSPolicy checks the pods (caCertificateRefs "
                                                          "with ca.crt, hostname proxy-ssl-name), and the Gateway's "
                                                          "spec.tls.backend shows a certificate: write them"))
        elif key in ("mirror-target", "mirror-request-body"):
            out.append(Entry(source, full, "approximated", "HTTPRoute's RequestMirror to the Service (its head; "
                                                           "the body is not mirrored; a Service in another "
                                                           "namespace needs a ReferenceGrant there)"))
        elif key == "custom-http-errors":
            out.append(Entry(source, full, "tidegate-policy", "an HTTPRouteFilter (tidegate.io) errorPages on the "
                                                              "rules"))
        elif key == "default-backend":
            out.append(Entry(source, full, "approximated", "its error pages are carried (custom-http-errors), but "
                                                           "HTTPRoute has no fallback for a Service without ready "
                                                           "endpoints (the conversion names the Service serving now)"))
        elif key in ACCESS_KEYS and key.startswith("auth-"):
            out.append(Entry(source, full, "tidegate-policy", "an HTTPRouteFilter (tidegate.io) on the rules: "
                                                              "basicAuth or externalAuth"))
        elif key in ACCESS_KEYS:
            out.append(Entry(source, full, "approximated", "HTTPRoute's CORS filter answers only preflights (OPTIONS "
                                                           "with Access-Control-Request-Method) and sends its "
                                                           "headers only to requests with an Origin"))
        elif key == "backend-protocol" and str(value).upper() in ("HTTPS", "AUTO_HTTP", "GRPCS"):
            out.append(Entry(source, full, "unsupported", "a BackendTLSPolicy checks the pod's certificate, which "
                                                          "ingress-nginx did not: write one with the pods' CA"))
        elif key == "backend-protocol" and str(value).upper() == "GRPC":
            out.append(Entry(source, full, "approximated", "set appProtocol: kubernetes.io/h2c on the Service port"))
        elif key in ROUTING_KEYS:
            out.append(Entry(source, full, "converted"))
        elif key in NO_EFFECT_KEYS:
            out.append(Entry(source, full, "converted", f"nothing to carry: {NO_EFFECT_KEYS[key]}"))
        elif key in LATER_KEYS:
            out.append(Entry(source, full, "unsupported", "not supported by tidegate yet"))
        else:
            out.append(Entry(source, full, "unsupported", "not one of ingress-nginx's annotations"))
    return out


def _backend_policy(ing: Resource | None, namespace: str, route: str, rules: list[ir.HTTPRoute],
                    report: list[Entry]) -> dict[str, Any] | None:
    """A BackendPolicy on the converted HTTPRoute with what the Ingress's annotations set of balancing and
    timeouts (what tidegate served from the Ingress itself)."""
    sections = ingress_sections(ing, []) if ing is not None else {}
    if not sections:
        return None
    spec: dict[str, Any] = {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route}]}
    for name, section in sections.items():
        node = spec
        *parents, last = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = section
    cookie = ((spec.get("loadBalancer") or {}).get("consistentHash") or {}).get("cookie")
    source = f"{ing.namespace}/{ing.name}" if ing is not None else ""
    if cookie is not None:
        if cookie.pop("expires", None):
            report.append(Entry(source, NGINX_PREFIX + "session-cookie-expires", "approximated",
                                "BackendPolicy's cookie has a Max-Age (ttl), no Expires"))
        paths = {r.matches[0].path.value for r in rules if r.matches and r.matches[0].path.type != "RegularExpression"}
        if "path" not in cookie and paths != {"/"}:
            cookie["path"] = "/"
            report.append(Entry(source, NGINX_PREFIX + "affinity", "approximated",
                                "the sticky cookie is for path / (ingress-nginx made it for each Ingress path: "
                                f"{', '.join(sorted(paths))}); session-cookie-path sets one"))
    return {"apiVersion": "tidegate.io/v1alpha1", "kind": "BackendPolicy",
            "metadata": {"name": route, "namespace": namespace, "annotations": {FROM: f"Ingress {source}"}},
            "spec": spec}


def _traffic_policy(ing: Resource, routes: list[str]) -> dict[str, Any] | None:
    """A TrafficPolicy on the Ingress's HTTPRoutes with its protection annotations (what tidegate served from
    the Ingress itself: one policy, so its rate limits still share one count across the routes)."""
    sections, problem = traffic_sections(ing, [])
    if not sections or problem:
        return None
    spec: dict[str, Any] = {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": name}
                                           for name in routes]}
    if "ipAccess" in sections:
        spec["ipAccess"] = {k: list(v) for k, v in sections["ipAccess"].items() if v}
    limits = sections.get("requestLimits") or {}
    request_limits = {"maxBodySize": limits.get("max_body"),
                      "maxInFlightPerClient": limits.get("max_in_flight_per_client")}
    if any(v is not None for v in request_limits.values()):
        spec["requestLimits"] = {k: v for k, v in request_limits.items() if v is not None}
    if "rateLimit" in sections:
        rules = []
        for rule in sections["rateLimit"]["rate_limits"]:
            out: dict[str, Any] = {"name": rule.name.rsplit(": ", 1)[1]}
            if rule.exempt:
                out.update(exempt=True, match={"sourceCIDRs": list(rule.source_cidrs)})
            else:
                out.update(limit={"requests": rule.requests, "period": f"{int(rule.period)}s"}, burst=rule.burst,
                           scope=rule.scope)
            rules.append(out)
        spec["rateLimit"] = {"rules": rules}
    return {"apiVersion": "tidegate.io/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": ing.name, "namespace": ing.namespace,
                         "annotations": {FROM: f"Ingress {ing.namespace}/{ing.name}"}},
            "spec": spec}


def _gateway(namespace: str, name: str, listeners: dict[str, ir.Listener], options: TranslateOptions,
             report: list[Entry]) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = [{"name": "http", "port": options.ingress_http_port, "protocol": "HTTP",
                                    "allowedRoutes": {"namespaces": {"from": "All"}}}]
    grants: dict[str, dict[str, Any]] = {}
    https = listeners.get("ingress/https")
    if https is not None and https.tls is not None:
        refs = []
        for cert in https.tls.certificates:
            ns, secret = cert.secret.split("/", 1)
            refs.append({"kind": "Secret", "name": secret, **({"namespace": ns} if ns != namespace else {})})
            if ns != namespace and ns not in grants:
                grants[ns] = {"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
                              "metadata": {"name": f"{name}-certificates", "namespace": ns,
                                           "annotations": {FROM: "the Ingresses' TLS Secrets"}},
                              "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                                 "namespace": namespace}],
                                       "to": [{"group": "", "kind": "Secret"}]}}
        specs.append({"name": "https", "port": options.ingress_https_port, "protocol": "HTTPS",
                      "tls": {"mode": "Terminate", "certificateRefs": refs},
                      "allowedRoutes": {"namespaces": {"from": "All"}}})
    gateway = {"apiVersion": GATEWAY_API, "kind": "Gateway",
               "metadata": {"name": name, "namespace": namespace, "annotations": {FROM: "every Ingress"}},
               "spec": {"gatewayClassName": "tidegate", "listeners": specs}}
    return [gateway, *grants.values()]


def _rule(route: ir.HTTPRoute, source: str, report: list[Entry], seen: set[tuple[str, str]],
          extension: Extension) -> dict[str, Any]:
    def once(field: str, verdict: str, note: str) -> None:
        if (source, field + note) not in seen:
            seen.add((source, field + note))
            report.append(Entry(source, field, verdict, note))

    matches = []
    for match in route.matches:
        path = match.path
        if path.type == "StringPrefix":
            once("pathType ImplementationSpecific", "approximated",
                 "a string prefix becomes a regular expression, which is tried before every prefix path of the "
                 "host (the longest prefix no longer wins over it)")
            value = {"type": "RegularExpression", "value": f"\\Q{path.value}\\E.*"}
        else:
            value = {"type": path.type, "value": path.value}
        out: dict[str, Any] = {"path": value}
        if match.headers:
            out["headers"] = [{"type": h.type, "name": h.name, "value": h.value} for h in match.headers]
        matches.append(out)
    filters = []
    for f in route.filters:
        filters += _filter(f, once, extension)
    rule: dict[str, Any] = {"name": _rule_name(route.name), "matches": matches}
    if filters:
        rule["filters"] = filters
    backends = [b for b in route.backends if b.weight > 0]
    if backends and not any(f["type"] == "RequestRedirect" for f in filters):
        rule["backendRefs"] = [_backend_ref(b, len(backends) > 1) for b in backends]
    return rule


def _rule_name(name: str) -> str:
    """ingress/ns/name/rule/0/path/1 → rule-0-path-1 (a section name: lower case, digits, "-" and ".")."""
    text = "-".join(name.split("/")[3:]).lower()
    text = re.sub(r"[^a-z0-9.-]+", "-", text)
    return re.sub(r"-+", "-", text)[:63].strip("-.") or "rule"


def _backend_ref(backend: ir.Backend, weighted: bool) -> dict[str, Any]:
    service, _, port = backend.name.partition(":")
    namespace, _, svc = service.partition("/")
    ref: dict[str, Any] = {"name": svc, "port": int(port) if port.isdigit() else port}
    if weighted:
        ref["weight"] = backend.weight
    return ref


def _filter(f: ir.Filter, once: Any, extension: Extension) -> list[dict[str, Any]]:
    """The HTTPRoute filters for one of the rule's IR filters (none when it cannot be written)."""
    config = dict(f.config)
    regex = (config.get("path") or {}).get("type") == "RegexReplace"
    if f.type in ("RequestRedirect", "URLRewrite") and regex and "$" in config["path"]["substitution"]:
        # capture groups: tidegate's regexRewrite (a URL among them: its redirect)
        path = config["path"]
        once("rewrite-target", "tidegate-policy", "capture groups: an HTTPRouteFilter (tidegate.io) regexRewrite")
        out = [extension("rewrite", {"regexRewrite": {"pattern": path["pattern"],
                                                      "substitution": path["substitution"]}})]
        if f.type == "URLRewrite" and config.get("hostname"):
            out.append({"type": "URLRewrite", "urlRewrite": {"hostname": config["hostname"]}})
        return out
    if f.type == "BasicAuth" and config.get("secretName"):
        spec = {"secretName": config["secretName"], "secretType": config.get("secretType", "auth-file")}
        if config.get("realm"):
            spec["realm"] = config["realm"]
        return [extension("basic-auth", {"basicAuth": spec})]
    if f.type == "ExternalAuth" and config.get("url"):
        names = {"url": "url", "method": "method", "signin": "signin", "signin_param": "signinRedirectParam",
                 "request_redirect": "requestRedirect", "always_set_cookie": "alwaysSetCookie",
                 "proxySetHeadersConfigMap": "proxySetHeadersConfigMap"}
        spec = {names[k]: v for k, v in config.items() if k in names and v}
        if config.get("response_headers"):
            spec["responseHeaders"] = list(config["response_headers"])
        return [extension("external-auth", {"externalAuth": spec})]
    if f.type == "ErrorPages" and f.mirror is not None:
        service, _, port = f.mirror.name.rpartition(":")
        return [extension("error-pages", {"errorPages": {
            "codes": list(config["codes"]), "service": {"name": service.partition("/")[2], "port": int(port)},
            "ingressName": config.get("ingress", "")}})]
    one = _one_filter(f, config, once)
    return [one] if one is not None else []


def _one_filter(f: ir.Filter, config: dict[str, Any], once: Any) -> dict[str, Any] | None:
    if f.type == "RequestRedirect":
        redirect: dict[str, Any] = {}
        to_url = (config.get("path") or {}).get("type") == "RegexReplace"  # (a rewrite-target to a URL)
        if to_url or config.get("location"):
            url = urlsplit(config["path"]["substitution"] if to_url else config["location"])
            redirect = {"scheme": url.scheme, "hostname": url.hostname or ""}
            if url.port:
                redirect["port"] = url.port
            redirect["path"] = {"type": "ReplaceFullPath", "replaceFullPath": url.path or "/"}
        if config.get("location"):
            once("permanent-redirect / temporal-redirect", "approximated",
                 "HTTPRoute's redirect keeps the request's query string, where ingress-nginx's sent the URL as it is"
                 + (f" (with its own query, {url.query}, lost here)" if url.query else "")
                 + ("; a URL with no path gets \"/\"" if not url.path else ""))
        elif not to_url:
            for key in ("scheme", "hostname", "port", "path"):
                if config.get(key):
                    redirect[key] = config[key]
        if config.get("stripTrailingSlash") and not config.get("alwaysPort"):
            once("ssl-redirect", "approximated", "the redirect to HTTPS keeps a trailing \"/\", which ingress-nginx "
                                                 "took off (unless preserve-trailing-slash)")
        if config.get("dropQuery"):
            once("app-root", "approximated", "the redirect keeps the request's query string")
        if config.get("alwaysPort"):
            once("from-to-www-redirect", "approximated", "the redirect leaves out a default port (:80, :443) and "
                                                         "keeps a trailing \"/\"")
        code = int(config.get("statusCode", 302))
        if code not in _REDIRECT_CODES:
            once("redirect code", "approximated", f"{code} is not an HTTPRoute redirect code: 302")
            code = 302
        redirect["statusCode"] = code
        return {"type": "RequestRedirect", "requestRedirect": redirect}
    if f.type == "URLRewrite":
        rewrite: dict[str, Any] = {}
        if config.get("hostname"):
            rewrite["hostname"] = config["hostname"]
        path = config.get("path")
        if path and path.get("type") == "RegexReplace":
            target = path["substitution"]
            if "?" in target:
                once("rewrite-target", "unsupported", f"{target!r} has a query: HTTPRoute's URLRewrite cannot; the "
                                                      "path is not rewritten")
            else:
                rewrite["path"] = {"type": "ReplaceFullPath", "replaceFullPath": target}
        elif path:
            rewrite["path"] = path
        return {"type": "URLRewrite", "urlRewrite": rewrite} if rewrite else None
    if f.type == "RequestHeaderModifier":
        return {"type": "RequestHeaderModifier", "requestHeaderModifier": config}
    if f.type == "ResponseHeaderModifier":  # (custom-headers)
        return {"type": "ResponseHeaderModifier", "responseHeaderModifier": config}
    if f.type == "CORS":
        def names(value: str) -> list[str]:
            return [n.strip() for n in value.split(",") if n.strip()]
        origins = [o for o in config["allowOrigins"] if o == "*" or o.startswith(("http://", "https://"))]
        if origins != config["allowOrigins"]:
            once("cors-allow-origin", "approximated", "HTTPRoute's CORS filter takes http(s) origins and * only")
        methods = [m.upper() for m in names(config["allowMethods"]) if m.upper() in _CORS_METHODS]
        cors: dict[str, Any] = {"allowOrigins": origins, "allowMethods": methods,
                                "allowHeaders": names(config["allowHeaders"]),
                                "allowCredentials": config["allowCredentials"], "maxAge": max(1, config["maxAge"])}
        if config.get("exposeHeaders"):
            cors["exposeHeaders"] = names(config["exposeHeaders"])
        return {"type": "CORS", "cors": cors}
    if f.type == "RequestMirror" and f.mirror is not None:
        service, _, port = f.mirror.name.rpartition(":")
        namespace, _, name = service.partition("/")
        return {"type": "RequestMirror", "requestMirror": {"backendRef": {
            "name": name, "namespace": namespace, "port": int(port) if port.isdigit() else port}}}
    if f.type in ("BasicAuth", "ExternalAuth"):
        once(f"filter {f.type}", "unsupported", "authentication that answers 503 (its annotation is not usable): "
                                                "no filter does that")
        return None
    once(f"filter {f.type}", "unsupported", "no HTTPRoute filter for it")
    return None
