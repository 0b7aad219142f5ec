"""HTTPRouteFilter (tidegate.io): the filters an HTTPRoute rule names with an ExtensionRef, as IR filters.

Each HTTPRouteFilter sets one of: `regexRewrite` (nginx's rewrite with capture groups), `basicAuth`,
`externalAuth`, `errorPages`: the Gateway API has no filter for these, and `tidegate convert` needs them to
carry an ingress-nginx Ingress over. They become the same IR filters the Ingress annotations make
(translate/ingress.py), so the data plane serves both alike.

A reference that cannot be resolved (no such object, another kind, an unusable value) is not skipped: the
rule answers 500, as the Gateway API asks, and the route's ResolvedRefs condition says why. Authentication
that cannot be checked (its Secret or ConfigMap missing) answers 503, as for an Ingress.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import re2

from tidegate import ir
from tidegate.resources.kinds import TIDEGATE_GROUP
from tidegate.resources.model import Problem, Resource
from tidegate.translate import ingress
from tidegate.translate.backends import resolve_backend
from tidegate.translate.index import Index
from tidegate.translate.ingress_annotations import BasicAuth, ExternalAuth, auth_url_problem

KIND = "HTTPRouteFilter"


def extension_filter(index: Index, route: Resource, ref: dict, backend_tls: dict) -> ir.Filter | str:
    """The IR filter an ExtensionRef names, or why the rule must answer 500 instead."""
    group, kind, name = ref.get("group", ""), ref.get("kind", ""), ref.get("name", "")
    if (group, kind) != (TIDEGATE_GROUP, KIND):
        return f"ExtensionRef to {group or 'core'}/{kind} {name}: tidegate reads {TIDEGATE_GROUP}/{KIND} only"
    found = index.get(KIND, route.namespace, name)
    if found is None:
        return f"ExtensionRef: {KIND} {route.namespace}/{name} not found"
    spec = found.spec
    notes: list[Problem] = []
    made: ir.Filter | str
    if "regexRewrite" in spec:
        made = _regex_rewrite(spec["regexRewrite"])
    elif "basicAuth" in spec:
        auth = spec["basicAuth"]
        made = ingress.basic_auth_filter(index, found, BasicAuth(
            found.namespace, auth["secretName"], auth.get("secretType", "auth-file"), auth.get("realm", "")), notes)
    elif "externalAuth" in spec:
        made = _external_auth(index, found, spec["externalAuth"], notes)
    elif "errorPages" in spec:
        made = _error_pages(index, found, spec["errorPages"], backend_tls)
    else:
        made = f"{KIND} {found.namespace}/{name} sets none of regexRewrite, basicAuth, externalAuth, errorPages"
    return made


def _regex_rewrite(spec: dict) -> ir.Filter | str:
    try:
        re2.compile(spec["pattern"])
    except re2.error as exc:
        return f"regexRewrite pattern {spec['pattern']!r} is not a regular expression RE2 reads ({exc})"
    path = {"type": "RegexReplace", "pattern": spec["pattern"], "substitution": spec["substitution"]}
    if spec["substitution"].startswith(("http://", "https://")):
        return ir.Filter("RequestRedirect", {"path": path, "statusCode": 302})
    return ir.Filter("URLRewrite", {"path": path})


def _external_auth(index: Index, found: Resource, spec: dict, notes: list[Problem]) -> ir.Filter | str:
    for field in ("url", "signin", "requestRedirect"):
        why = auth_url_problem(spec[field]) if spec.get(field) else ""
        if why:
            return f"externalAuth {field}: {why}"
    auth = ExternalAuth(url=spec["url"], method=spec.get("method", ""), signin=spec.get("signin", ""),
                        signin_param=spec.get("signinRedirectParam", ""),
                        response_headers=tuple(spec.get("responseHeaders") or ()),
                        request_redirect=spec.get("requestRedirect", ""),
                        always_set_cookie=bool(spec.get("alwaysSetCookie")),
                        proxy_set_headers=spec.get("proxySetHeadersConfigMap", ""))
    return ingress.external_auth_filter(index, found, auth, notes)


def _error_pages(index: Index, found: Resource, spec: dict, backend_tls: dict) -> ir.Filter | str:
    service = spec["service"]
    backend, problem = resolve_backend(index, {"name": service["name"], "port": service["port"]}, "HTTPRoute",
                                       found.namespace, backend_tls)
    if problem:
        return f"errorPages: {problem.message}"
    config: dict[str, Any] = {"codes": sorted(set(spec["codes"])), "namespace": found.namespace,
                              "ingress": spec.get("ingressName", ""), "service": "", "port": ""}
    return ir.Filter("ErrorPages", config, mirror=dataclasses.replace(backend, weight=1))
