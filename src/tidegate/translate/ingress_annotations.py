"""ingress-nginx's annotations on Ingress objects (`nginx.ingress.kubernetes.io/*`), read as ingress-nginx
reads them.

Every key of that prefix is accounted for: the routing ones are read here (`Routing`), the protection ones by
traffic_policies.ingress_sections, the snippets are refused, the keys ingress-nginx knows and tidegate does not
do yet are reported as ignored, and any other key is reported as unknown: nothing is dropped in silence.

A value is checked with the grammar ingress-nginx (v1.15) checks it with; one that fails, or that holds a
line break (how configuration was injected into nginx, CVE-2025-1974 and its kin), is reported and not used,
as ingress-nginx's controller drops it: the Ingress is served as if the annotation were not there. Snippet
keys (`*-snippet`) are never read or copied anywhere: reported as refused, the rest of the Ingress is served,
as ingress-nginx does with `allow-snippet-annotations: false` (its default since v1.9).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import re2

from tidegate.resources.model import Problem, Resource

NGINX_PREFIX = "nginx.ingress.kubernetes.io/"

ROUTING_KEYS = frozenset({
    "use-regex", "rewrite-target", "app-root", "ssl-redirect", "force-ssl-redirect", "preserve-trailing-slash",
    "permanent-redirect", "permanent-redirect-code", "temporal-redirect", "temporal-redirect-code",
    "upstream-vhost", "x-forwarded-prefix", "from-to-www-redirect", "backend-protocol", "proxy-connect-timeout",
    "canary", "canary-by-cookie", "canary-by-header", "canary-by-header-pattern", "canary-by-header-value",
    "canary-weight", "canary-weight-total"})
# Read by traffic_policies.ingress_sections (TrafficPolicy's sections from an Ingress).
PROTECTION_KEYS = frozenset({
    "limit-rps", "limit-rpm", "limit-burst-multiplier", "limit-connections", "limit-whitelist", "limit-allowlist",
    "whitelist-source-range", "allowlist-source-range", "denylist-source-range", "proxy-body-size"})
# What ingress-nginx v1.15 knows besides those (its annotations/*/main.go): reported as not done yet.
LATER_KEYS = frozenset({
    "affinity", "affinity-canary-behavior", "affinity-mode", "auth-always-set-cookie", "auth-cache-duration",
    "auth-cache-key", "auth-file", "auth-keepalive", "auth-keepalive-requests", "auth-keepalive-share-vars",
    "auth-keepalive-timeout", "auth-map", "auth-method", "auth-proxy-set-headers", "auth-realm",
    "auth-request-redirect", "auth-response-headers", "auth-secret", "auth-secret-type", "auth-signin",
    "auth-signin-redirect-param", "auth-tls-error-page", "auth-tls-match-cn", "auth-tls-pass-certificate-to-upstream",
    "auth-tls-secret", "auth-tls-verify-client", "auth-tls-verify-depth", "auth-type", "auth-url",
    "client-body-buffer-size", "connection-proxy-header",
    "cors-allow-credentials", "cors-allow-headers", "cors-allow-methods", "cors-allow-origin", "cors-expose-headers",
    "cors-max-age", "custom-headers", "custom-http-errors", "default-backend", "disable-proxy-intercept-errors",
    "enable-access-log", "enable-cors", "enable-global-auth", "enable-modsecurity", "enable-opentelemetry",
    "enable-owasp-core-rules", "enable-rewrite-log", "fastcgi-index", "fastcgi-params-configmap",
    "http2-push-preload", "limit-rate", "limit-rate-after", "load-balance", "mirror-host",
    "mirror-request-body", "mirror-target", "modsecurity-transaction-id", "opentelemetry-operation-name",
    "opentelemetry-trust-incoming-span", "proxy-buffer-size", "proxy-buffering", "proxy-buffers-number",
    "proxy-busy-buffers-size", "proxy-cookie-domain", "proxy-cookie-path",
    "proxy-http-version", "proxy-max-temp-file-size", "proxy-next-upstream", "proxy-next-upstream-timeout",
    "proxy-next-upstream-tries", "proxy-read-timeout", "proxy-redirect-from", "proxy-redirect-to",
    "proxy-request-buffering", "proxy-send-timeout", "proxy-ssl-ciphers", "proxy-ssl-name", "proxy-ssl-protocols",
    "proxy-ssl-secret", "proxy-ssl-server-name", "proxy-ssl-verify", "proxy-ssl-verify-depth", "relative-redirects",
    "satisfy", "server-alias", "service-upstream", "session-cookie-change-on-failure",
    "session-cookie-conditional-samesite-none", "session-cookie-domain", "session-cookie-expires",
    "session-cookie-max-age", "session-cookie-name", "session-cookie-path", "session-cookie-samesite",
    "session-cookie-secure", "ssl-ciphers", "ssl-passthrough", "ssl-prefer-server-ciphers", "upstream-hash-by",
    "upstream-hash-by-subset", "upstream-hash-by-subset-size", "use-port-in-redirects"})

# ingress-nginx's value grammars (internal/ingress/annotations/parser/validators.go).
_ALNUM = r"\-\.\_\~a-zA-Z0-9\/:"
PATH_WITH_CAPTURE = re.compile(r"^/?[" + _ALNUM + r"\/\$]*$")  # RegexPathWithCapture
URL_CHARS = re.compile(r"^[" + _ALNUM + r",:?&=]*$")  # URLIsValidRegex
SERVER_NAME = re.compile(r"^[/" + _ALNUM + r"\^\$\[\]\(\)\{\}\*\+\?\|&=\\]*$")  # IsValidRegex
LINE_BREAK = re.compile(r"[\r\n]")
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP token
# Go's strconv.ParseBool
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


@dataclass(frozen=True)
class Routing:
    """The routing annotations of one Ingress (ingress-nginx's defaults where unset)."""

    use_regex: bool = False
    rewrite_target: str = ""
    app_root: str = ""
    ssl_redirect: bool = True  # with a certificate for the host (its spec.tls)
    force_ssl_redirect: bool = False
    preserve_trailing_slash: bool = False
    redirect_url: str = ""  # permanent-redirect or temporal-redirect (this one wins)
    redirect_code: int = 0
    upstream_vhost: str = ""
    x_forwarded_prefix: str = ""
    from_to_www: bool = False
    backend_protocol: str = "HTTP"  # HTTP | HTTPS | GRPC | AUTO_HTTP
    connect_timeout: float | None = None  # proxy-connect-timeout, seconds
    canary: Canary | None = None  # canary: "true"

    def rewrites(self, path: str) -> bool:
        """ingress-nginx's needsRewrite: a rewrite-target that differs from the path."""
        return bool(self.rewrite_target) and self.rewrite_target != path


@dataclass(frozen=True)
class Canary:
    """An Ingress that is a canary of the Ingress with the same host and path (ingress-nginx's balancer.lua
    route_to_alternative_balancer): the header first, then the cookie, then the weight."""

    header: str = ""
    header_value: str = ""
    header_pattern: str = ""
    cookie: str = ""
    weight: int = 0
    weight_total: int = 100


def read(ing: Resource, notes: list[Problem]) -> Routing:
    """The Ingress's routing annotations; every nginx.ingress.kubernetes.io/ key it has is reported unless it is
    one tidegate uses."""
    values: dict[str, str] = {}
    for full, raw in ing.annotations.items():
        if not full.startswith(NGINX_PREFIX):
            continue
        key = full[len(NGINX_PREFIX):]
        if key.endswith("-snippet"):
            notes.append(Problem("error", ing.origin, f"annotation {full} refused: snippets of nginx configuration "
                                 "are never used (the rest of the Ingress is served without it)", ing.key))
        elif key in ROUTING_KEYS:
            value = str(raw)
            if LINE_BREAK.search(value):
                _drop(ing, notes, full, "it holds a line break", "error")
            else:
                values[key] = value
        elif key in LATER_KEYS:
            notes.append(Problem("warning", ing.origin, f"annotation {full} is not supported yet: ignored", ing.key))
        elif key not in PROTECTION_KEYS:
            notes.append(Problem("warning", ing.origin, f"annotation {full} is unknown (not one of ingress-nginx's): "
                                 "ignored", ing.key))
    if not values:
        return Routing()
    found: dict[str, Any] = {}
    for key in ("use-regex", "ssl-redirect", "force-ssl-redirect", "preserve-trailing-slash", "from-to-www-redirect"):
        if key in values:
            flag = _bool(values[key])
            if flag is None:
                _drop(ing, notes, NGINX_PREFIX + key, f"{values[key]!r} is not true or false")
            else:
                found["from_to_www" if key == "from-to-www-redirect" else key.replace("-", "_")] = flag
    for key in ("rewrite-target", "app-root", "x-forwarded-prefix"):
        value = values.get(key)
        if value is None:
            continue
        checked = value.replace(" ", "") if key == "x-forwarded-prefix" else value
        if not PATH_WITH_CAPTURE.fullmatch(checked):
            _drop(ing, notes, NGINX_PREFIX + key, f"{value!r} is not a path (letters, digits, -._~/:$)")
        elif key == "app-root" and not value.startswith("/"):
            _drop(ing, notes, NGINX_PREFIX + key, f"{value!r} is not an absolute path")
        else:
            found[key.replace("-", "_")] = checked
    if "upstream-vhost" in values:
        vhost = values["upstream-vhost"].strip()
        if not SERVER_NAME.fullmatch(vhost) or "$" in vhost:
            _drop(ing, notes, NGINX_PREFIX + "upstream-vhost", f"{vhost!r} is not a host name")
        else:
            found["upstream_vhost"] = vhost
    if "backend-protocol" in values:
        protocol = values["backend-protocol"].strip().upper()
        if protocol in ("HTTP", "HTTPS", "GRPC", "AUTO_HTTP"):
            found["backend_protocol"] = protocol
        elif protocol in ("GRPCS", "FCGI"):
            notes.append(Problem("warning", ing.origin, f"annotation {NGINX_PREFIX}backend-protocol {protocol} is not "
                                 "supported yet: HTTP is used", ing.key))
        else:
            _drop(ing, notes, NGINX_PREFIX + "backend-protocol", f"{values['backend-protocol']!r} is not one of HTTP, "
                  "HTTPS, GRPC, GRPCS, AUTO_HTTP, FCGI")
    if "proxy-connect-timeout" in values:
        raw_seconds = values["proxy-connect-timeout"].strip()
        if re.fullmatch(r"[0-9]+", raw_seconds) and int(raw_seconds) > 0:
            found["connect_timeout"] = float(raw_seconds)
        else:
            _drop(ing, notes, NGINX_PREFIX + "proxy-connect-timeout", f"{raw_seconds!r} is not a whole number of "
                  "seconds above 0")
    if _bool(values.get("canary", "")):
        found["canary"] = _canary(ing, values, notes)
    for key, low, high, default in (("temporal-redirect", 300, 307, 302), ("permanent-redirect", 300, 308, 301)):
        url = values.get(key)
        if url is None or "redirect_url" in found:
            continue
        if not URL_CHARS.fullmatch(url) or not url.startswith(("http://", "https://")):
            _drop(ing, notes, NGINX_PREFIX + key, f"{url!r} is not an http(s) URL (letters, digits, -._~/:,?&=)")
            continue
        code = default
        if f"{key}-code" in values:
            raw_code = values[f"{key}-code"].strip()
            if re.fullmatch(r"[+-]?[0-9]+", raw_code) and low <= int(raw_code) <= high:
                code = int(raw_code)
            else:  # as ingress-nginx: out of range (or not a number) is the default
                notes.append(Problem("warning", ing.origin, f"annotation {NGINX_PREFIX}{key}-code {raw_code!r} is "
                                     f"not a status from {low} to {high}: {default} is used", ing.key))
        found["redirect_url"], found["redirect_code"] = url, code
    return Routing(**found)


def _canary(ing: Resource, values: dict[str, str], notes: list[Problem]) -> Canary:
    found: dict[str, Any] = {}
    for key, field in (("canary-by-header", "header"), ("canary-by-cookie", "cookie")):
        name = values.get(key, "").strip()
        if name and not HEADER_NAME.fullmatch(name):
            _drop(ing, notes, NGINX_PREFIX + key, f"{name!r} is not a {field} name")
        elif name:
            found[field] = name
    if values.get("canary-by-header-value"):
        found["header_value"] = values["canary-by-header-value"]
    elif values.get("canary-by-header-pattern"):
        pattern = values["canary-by-header-pattern"]
        try:
            re2.compile(pattern)
            found["header_pattern"] = pattern
        except re2.error:  # ingress-nginx: an error while matching routes to the mainline
            _drop(ing, notes, NGINX_PREFIX + "canary-by-header-pattern", f"{pattern!r} is not a regular expression "
                  "RE2 reads (requests go to the mainline by header)")
    for key, field in (("canary-weight", "weight"), ("canary-weight-total", "weight_total")):
        raw = values.get(key, "").strip()
        if raw and re.fullmatch(r"[0-9]+", raw):
            found[field] = int(raw)
        elif raw:
            _drop(ing, notes, NGINX_PREFIX + key, f"{raw!r} is not a whole number")
    if found.get("weight_total", 100) <= 100:  # balancer.lua takes a total only above 100
        found.pop("weight_total", None)
    return Canary(**found)


def _bool(value: str) -> bool | None:
    return True if value in _TRUE else False if value in _FALSE else None


def _drop(ing: Resource, notes: list[Problem], full: str, why: str, severity: str = "warning") -> None:
    notes.append(Problem(severity, ing.origin, f"annotation {full} ignored: {why}", ing.key))
