"""ingress-nginx's annotations on Ingress objects (`nginx.ingress.kubernetes.io/*`), read as ingress-nginx
reads them.

Every key of that prefix is accounted for: the routing and access ones (CORS, basic and external
authentication, error pages) are read here (`Routing`), the balancing and timeout ones here too as
BackendPolicy sections (`balancing`, used by backend_policies.py), the protection ones by
traffic_policies.ingress_sections; the snippets are refused, the keys ingress-nginx knows and tidegate does not
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
from urllib.parse import urlsplit

import re2

from tidegate.resources.model import Problem, Resource

NGINX_PREFIX = "nginx.ingress.kubernetes.io/"

ROUTING_KEYS = frozenset({
    "use-regex", "rewrite-target", "app-root", "ssl-redirect", "force-ssl-redirect", "preserve-trailing-slash",
    "permanent-redirect", "permanent-redirect-code", "temporal-redirect", "temporal-redirect-code",
    "upstream-vhost", "x-forwarded-prefix", "from-to-www-redirect", "backend-protocol",
    "canary", "canary-by-cookie", "canary-by-header", "canary-by-header-pattern", "canary-by-header-value",
    "canary-weight", "canary-weight-total", "custom-http-errors", "default-backend", "server-alias",
    "proxy-ssl-secret", "proxy-ssl-verify", "proxy-ssl-name", "proxy-ssl-server-name", "mirror-target",
    "mirror-request-body", "ssl-passthrough", "enable-access-log", "custom-headers"})
# Read here too, for the route's filters: CORS, basic and external authentication.
ACCESS_KEYS = frozenset({
    "enable-cors", "cors-allow-origin", "cors-allow-methods", "cors-allow-headers", "cors-allow-credentials",
    "cors-expose-headers", "cors-max-age", "auth-type", "auth-secret", "auth-secret-type", "auth-realm",
    "auth-url", "auth-method", "auth-signin", "auth-signin-redirect-param", "auth-response-headers",
    "auth-request-redirect", "auth-always-set-cookie", "auth-proxy-set-headers"})
# Read by `balancing` (BackendPolicy's sections from an Ingress, backend_policies.py).
BALANCING_KEYS = frozenset({
    "affinity", "affinity-mode", "session-cookie-name", "session-cookie-path", "session-cookie-max-age",
    "session-cookie-expires", "session-cookie-domain", "session-cookie-samesite", "session-cookie-secure",
    "upstream-hash-by", "load-balance", "proxy-connect-timeout", "proxy-read-timeout", "proxy-send-timeout",
    "proxy-next-upstream", "proxy-next-upstream-tries"})
# Read by traffic_policies.ingress_sections (TrafficPolicy's sections from an Ingress).
PROTECTION_KEYS = frozenset({
    "limit-rps", "limit-rpm", "limit-burst-multiplier", "limit-connections", "limit-whitelist", "limit-allowlist",
    "whitelist-source-range", "allowlist-source-range", "denylist-source-range", "proxy-body-size"})
# Keys with nothing to set in tidegate, and why (reported as having no effect, not as missing).
NO_EFFECT_KEYS = {
    "proxy-buffering": "tidegate streams answers to the client as they come (nginx's proxy_buffering off)",
    "proxy-buffer-size": "tidegate holds no response buffers of that kind (its limits: README, Limits and defaults)",
    "proxy-buffers-number": "tidegate holds no response buffers of that kind",
    "proxy-busy-buffers-size": "tidegate holds no response buffers of that kind",
    "proxy-max-temp-file-size": "tidegate writes no temporary files",
    "proxy-request-buffering": "tidegate streams request bodies to the pod as they come (nginx's off)",
    "client-body-buffer-size": "tidegate writes no temporary files for request bodies",
    "proxy-http-version": "tidegate speaks HTTP/1.1 to HTTP pods",
    "connection-proxy-header": "tidegate keeps its own connections to pods alive",
    "enable-rewrite-log": "tidegate's rewrites are pure and shown by `tidegate explain`",
    "http2-push-preload": "HTTP/2 server push is gone from browsers and nginx alike",
    "auth-keepalive": "tidegate keeps its connections to the authentication service alive",
    "auth-keepalive-requests": "tidegate keeps its connections to the authentication service alive",
    "auth-keepalive-timeout": "tidegate keeps its connections to the authentication service alive",
    "auth-keepalive-share-vars": "tidegate keeps no nginx variables to share",
}
# What ingress-nginx v1.15 knows besides those (its annotations/*/main.go): reported as not done yet.
LATER_KEYS = frozenset({
    "affinity-canary-behavior", "auth-cache-duration", "auth-cache-key", "auth-file", "auth-map",
    "auth-tls-error-page", "auth-tls-match-cn", "auth-tls-pass-certificate-to-upstream", "auth-tls-secret",
    "auth-tls-verify-client", "auth-tls-verify-depth", "disable-proxy-intercept-errors", "enable-global-auth",
    "enable-modsecurity", "enable-opentelemetry", "enable-owasp-core-rules", "fastcgi-index",
    "fastcgi-params-configmap", "limit-rate", "limit-rate-after", "mirror-host", "modsecurity-transaction-id",
    "opentelemetry-operation-name", "opentelemetry-trust-incoming-span", "proxy-cookie-domain", "proxy-cookie-path",
    "proxy-next-upstream-timeout", "proxy-redirect-from", "proxy-redirect-to", "proxy-ssl-ciphers",
    "proxy-ssl-protocols", "proxy-ssl-verify-depth", "relative-redirects", "satisfy", "service-upstream",
    "session-cookie-change-on-failure", "session-cookie-conditional-samesite-none", "ssl-ciphers",
    "ssl-prefer-server-ciphers", "upstream-hash-by-subset", "upstream-hash-by-subset-size", "use-port-in-redirects"})

# ingress-nginx's value grammars (internal/ingress/annotations/parser/validators.go).
_ALNUM = r"\-\.\_\~a-zA-Z0-9\/:"
# The variables ingress-nginx sets in each location, which upstream-vhost may use ($service_name.$namespace...)
VHOST_VARIABLES = frozenset({"$namespace", "$ingress_name", "$service_name", "$service_port"})
APP_ROOT_QUERY = "$is_args$args"  # app-root's idiom: the query string carried to the redirect
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
    backend_protocol: str = "HTTP"  # HTTP | HTTPS | GRPC | GRPCS | AUTO_HTTP
    canary: Canary | None = None  # canary: "true"
    cors: dict[str, Any] | None = None  # enable-cors: the CORS filter's config (style ingress-nginx)
    basic_auth: BasicAuth | None = None  # auth-type
    external_auth: ExternalAuth | None = None  # auth-url
    error_codes: tuple[int, ...] = ()  # custom-http-errors: answers of the pod the default-backend makes instead
    default_backend: str = ""  # a Service of the Ingress's namespace
    server_aliases: tuple[str, ...] = ()  # server-alias: more names for the Ingress's hosts
    proxy_ssl: ProxySSL | None = None  # proxy-ssl-*: how TLS to the pods is checked, and the certificate shown
    mirror: tuple[str, str, int, bool] | None = None  # mirror-target: (namespace, Service, port, TLS)
    ssl_passthrough: bool = False  # the hosts' TLS goes to the "/" path's pods as it is, chosen by SNI
    enable_access_log: bool = True  # False: its requests write no access log line
    custom_headers: str = ""  # a ConfigMap of the Ingress's namespace: response headers to set

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


@dataclass(frozen=True)
class BasicAuth:
    """auth-type basic: the Secret with the users (auth-file: an htpasswd file under its key `auth`; auth-map:
    a user per key), or why the Ingress's paths answer 503 instead (ingress-nginx's "location denied")."""

    secret_namespace: str = ""
    secret_name: str = ""
    secret_type: str = "auth-file"
    realm: str = ""
    problem: str = ""


def _checked(ing: Resource, keys: frozenset[str], notes: list[Problem]) -> dict[str, str]:
    """The values of the Ingress's nginx.ingress.kubernetes.io/ annotations among `keys`; one with a line break
    is reported and left out."""
    values: dict[str, str] = {}
    for full, raw in ing.annotations.items():
        key = full[len(NGINX_PREFIX):]
        if full.startswith(NGINX_PREFIX) and key in keys:
            value = str(raw)
            if LINE_BREAK.search(value):
                _drop(ing, notes, full, "it holds a line break", "error")
            else:
                values[key] = value
    return values


def read(ing: Resource, notes: list[Problem]) -> Routing:
    """The Ingress's routing annotations; every nginx.ingress.kubernetes.io/ key it has is reported unless it is
    one tidegate uses."""
    for full in ing.annotations:
        if not full.startswith(NGINX_PREFIX):
            continue
        key = full[len(NGINX_PREFIX):]
        if key.endswith("-snippet"):
            notes.append(Problem("error", ing.origin, f"annotation {full} refused: snippets of nginx configuration "
                                 "are never used (the rest of the Ingress is served without it)", ing.key))
        elif key in LATER_KEYS:
            notes.append(Problem("warning", ing.origin, f"annotation {full} is not supported yet: ignored", ing.key))
        elif key in NO_EFFECT_KEYS:
            notes.append(Problem("warning", ing.origin, f"annotation {full} has nothing to set: {NO_EFFECT_KEYS[key]}",
                                 ing.key))
        elif key not in PROTECTION_KEYS and key not in ROUTING_KEYS and key not in ACCESS_KEYS \
                and key not in BALANCING_KEYS:
            notes.append(Problem("warning", ing.origin, f"annotation {full} is unknown (not one of ingress-nginx's): "
                                 "ignored", ing.key))
    values = _checked(ing, ROUTING_KEYS | ACCESS_KEYS, notes)
    if not values:
        return Routing()
    found: dict[str, Any] = {}
    for key in ("use-regex", "ssl-redirect", "force-ssl-redirect", "preserve-trailing-slash", "from-to-www-redirect",
                "ssl-passthrough", "enable-access-log"):
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
        elif key == "app-root" and "$" in value.removesuffix(APP_ROOT_QUERY):
            _drop(ing, notes, NGINX_PREFIX + key, f"{value!r}: of nginx's variables, only a trailing "
                                                  f"{APP_ROOT_QUERY} (the request's query string) is read")
        else:
            found[key.replace("-", "_")] = checked
    if "upstream-vhost" in values:
        vhost = values["upstream-vhost"].strip()
        unknown = set(re.findall(r"\$\w*", vhost)) - VHOST_VARIABLES
        if vhost in ("$host", "$http_host"):
            pass  # the Host as it came, which is what goes on without the annotation
        elif not SERVER_NAME.fullmatch(vhost) or unknown:
            _drop(ing, notes, NGINX_PREFIX + "upstream-vhost", f"{vhost!r} is not a host name" + (
                f" (of nginx's variables, {', '.join(sorted(VHOST_VARIABLES))} are read, or $host alone)"
                if unknown else ""))
        else:
            found["upstream_vhost"] = vhost
    if "backend-protocol" in values:
        protocol = values["backend-protocol"].strip().upper()
        if protocol in ("HTTP", "HTTPS", "GRPC", "GRPCS", "AUTO_HTTP"):
            found["backend_protocol"] = protocol
        elif protocol == "FCGI":
            notes.append(Problem("warning", ing.origin, f"annotation {NGINX_PREFIX}backend-protocol {protocol} is not "
                                 "supported yet: HTTP is used", ing.key))
        else:
            _drop(ing, notes, NGINX_PREFIX + "backend-protocol", f"{values['backend-protocol']!r} is not one of HTTP, "
                  "HTTPS, GRPC, GRPCS, AUTO_HTTP, FCGI")
    if _bool(values.get("enable-cors", "")):
        found["cors"] = _cors(ing, values, notes)
    if "auth-type" in values:
        found["basic_auth"] = _basic_auth(ing, values, notes)
    if "auth-url" in values:
        found["external_auth"] = _external_auth(ing, values, notes)
    if "default-backend" in values:
        name = values["default-backend"].strip()
        if re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
            found["default_backend"] = name
        else:
            _drop(ing, notes, NGINX_PREFIX + "default-backend", f"{name!r} is not a Service's name")
    if any(key in values for key in ("proxy-ssl-secret", "proxy-ssl-verify", "proxy-ssl-name",
                                     "proxy-ssl-server-name")):
        found["proxy_ssl"] = _proxy_ssl(ing, values, notes)
    if "custom-headers" in values:
        namespace, _, name = values["custom-headers"].strip().rpartition("/")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or namespace not in ("", ing.namespace):
            _drop(ing, notes, NGINX_PREFIX + "custom-headers", "not the name of a ConfigMap of the Ingress's namespace")
        else:
            found["custom_headers"] = name
    if "mirror-target" in values:
        found["mirror"] = _mirror(ing, values, notes)
    if "server-alias" in values:
        aliases = [a.strip().lower() for a in values["server-alias"].split(",") if a.strip()]
        bad = [a for a in aliases if not re.fullmatch(r"(\*\.)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?", a)]
        if bad:  # (ingress-nginx takes regular expressions too; RE2 hosts are not Gateway API hostnames)
            _drop(ing, notes, NGINX_PREFIX + "server-alias", f"{', '.join(map(repr, bad))}: tidegate takes host "
                  "names and *.wildcards")
        else:
            found["server_aliases"] = tuple(sorted(set(aliases)))
    if "custom-http-errors" in values:
        raw = values["custom-http-errors"].replace(" ", "")
        if re.fullmatch(r"(?:[45][0-9]{2},?)*", raw):
            found["error_codes"] = tuple(sorted({int(code) for code in raw.split(",") if code}))
        else:
            _drop(ing, notes, NGINX_PREFIX + "custom-http-errors", f"{raw!r} is not a list of 4xx and 5xx statuses")
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


# enable-cors (ingress-nginx's annotations/cors/main.go): defaults and grammars
CORS_METHODS = "GET, PUT, POST, DELETE, PATCH, OPTIONS"
CORS_HEADERS = ("DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Range,"
                "Authorization")
CORS_MAX_AGE = 1728000
_CORS_ORIGIN = re.compile(r"[a-z]+://(\*\.)?[A-Za-z0-9\-.]*(:\d+)?|\*|null")
_CORS_METHODS = re.compile(r"([A-Za-z]+,?\s?)+")
_CORS_HEADERS = re.compile(r"[A-Za-z0-9\-_, ]*")
_CORS_EXPOSE = re.compile(r"(([A-Za-z0-9\-_]+|\*),?\s?)+")


def _cors(ing: Resource, values: dict[str, str], notes: list[Problem]) -> dict[str, Any]:
    """enable-cors with its cors-* annotations: the CORS filter's config, in ingress-nginx's style (a value that
    fails its grammar is reported and the default used, as ingress-nginx does)."""
    origins: list[str] = []
    for origin in values.get("cors-allow-origin", "*").split(","):
        origin = origin.strip()
        if origin == "*":
            origins = ["*"]
            break
        if origin and _CORS_ORIGIN.fullmatch(origin):
            origins.append(origin)
        elif origin:
            _drop(ing, notes, NGINX_PREFIX + "cors-allow-origin", f"origin {origin!r} is not scheme://host[:port], "
                  "null or *")
    config: dict[str, Any] = {"style": "ingress-nginx", "allowOrigins": origins or ["*"],
                              "allowMethods": CORS_METHODS, "allowHeaders": CORS_HEADERS, "exposeHeaders": "",
                              "allowCredentials": True, "maxAge": CORS_MAX_AGE}
    for key, field, grammar in (("cors-allow-methods", "allowMethods", _CORS_METHODS),
                                ("cors-allow-headers", "allowHeaders", _CORS_HEADERS),
                                ("cors-expose-headers", "exposeHeaders", _CORS_EXPOSE)):
        if key in values:
            if grammar.fullmatch(values[key]):
                config[field] = values[key]
            else:
                _drop(ing, notes, NGINX_PREFIX + key, f"{values[key]!r} is not a list of names")
    flag = _flag(ing, values, "cors-allow-credentials", notes)
    if flag is not None:
        config["allowCredentials"] = flag
    if "cors-max-age" in values:
        raw = values["cors-max-age"].strip()
        if re.fullmatch(r"-?[0-9]+", raw):
            config["maxAge"] = int(raw)
        else:
            _drop(ing, notes, NGINX_PREFIX + "cors-max-age", f"{raw!r} is not a whole number of seconds")
    return config


_BASIC_CHARS = re.compile(r"[/" + _ALNUM + r"]*")  # BasicCharsRegex
_CHARS_WITH_SPACE = re.compile(r"[/" + _ALNUM + r" ]*")  # CharsWithSpace


def _basic_auth(ing: Resource, values: dict[str, str], notes: list[Problem]) -> BasicAuth:
    """auth-type, auth-secret, auth-secret-type, auth-realm. What ingress-nginx refuses (a location denied,
    503) is refused the same way: tidegate never serves a path that asked for authentication without it."""
    kind = values["auth-type"].strip()
    realm = values.get("auth-realm", "")
    if not _CHARS_WITH_SPACE.fullmatch(realm):
        _drop(ing, notes, NGINX_PREFIX + "auth-realm", f"{realm!r} is not letters, digits, spaces and -._~/:")
        realm = ""
    if kind == "digest":
        return _denied(ing, notes, realm, "auth-type", "digest is not supported")
    if kind != "basic":
        return _denied(ing, notes, realm, "auth-type", f"{kind!r} is not basic or digest")
    secret_type = values.get("auth-secret-type", "auth-file").strip() or "auth-file"
    if secret_type not in ("auth-file", "auth-map"):
        return _denied(ing, notes, realm, "auth-secret-type", f"{secret_type!r} is not auth-file or auth-map")
    ref = values.get("auth-secret", "").strip()
    if not ref or not _BASIC_CHARS.fullmatch(ref) or ref.count("/") > 1:
        return _denied(ing, notes, realm, "auth-secret", f"{ref!r} is not a Secret's name (or namespace/name)")
    namespace, _, name = ref.rpartition("/")
    if namespace and namespace != ing.namespace:  # as ingress-nginx without allow-cross-namespace-resources
        return _denied(ing, notes, realm, "auth-secret", f"{ref!r} is in another namespace: not allowed")
    return BasicAuth(ing.namespace, name, secret_type, realm)


@dataclass(frozen=True)
class ProxySSL:
    """proxy-ssl-secret (its ca.crt checks the pod, its tls.crt and tls.key are shown to it), proxy-ssl-verify
    (off by default, as ingress-nginx's), proxy-ssl-name (the name checked, and sent with proxy-ssl-server-name).
    `problem`: the paths answer 500 rather than speak to the pod unchecked or without the certificate asked for."""

    secret_namespace: str = ""
    secret_name: str = ""
    verify: bool = False
    name: str = ""
    server_name: bool = False
    problem: str = ""


def _proxy_ssl(ing: Resource, values: dict[str, str], notes: list[Problem]) -> ProxySSL:
    found: dict[str, Any] = {}
    for key, field in (("proxy-ssl-verify", "verify"), ("proxy-ssl-server-name", "server_name")):
        raw = values.get(key, "").strip()
        if raw in ("on", "off"):
            found[field] = raw == "on"
        elif raw:
            _drop(ing, notes, NGINX_PREFIX + key, f"{raw!r} is not on or off")
    name = values.get("proxy-ssl-name", "").strip()
    if name and re.fullmatch(r"[A-Za-z0-9.-]+", name):
        found["name"] = name
    elif name:
        _drop(ing, notes, NGINX_PREFIX + "proxy-ssl-name", f"{name!r} is not a host name")
    ref = values.get("proxy-ssl-secret", "").strip()
    if ref:
        namespace, _, secret = ref.rpartition("/")
        if not _BASIC_CHARS.fullmatch(ref) or ref.count("/") > 1 or not secret:
            why = "is not a Secret's name (namespace/name)"
        elif namespace and namespace != ing.namespace:
            why = "is in another namespace: not allowed"
        else:
            return ProxySSL(ing.namespace, secret, **found)
        notes.append(Problem("error", ing.origin, f"annotation {NGINX_PREFIX}proxy-ssl-secret {why}; the Ingress's "
                             "paths answer 500", ing.key))
        return ProxySSL(problem="the proxy-ssl-secret annotation is not usable", **found)
    return ProxySSL(**found)


_MIRROR_TARGET = re.compile(r"(https?)://([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)"
                            r"(\.svc(\.cluster\.local)?)?(:([0-9]{1,5}))?\$request_uri")


def _mirror(ing: Resource, values: dict[str, str], notes: list[Problem]) -> tuple[str, str, int, bool] | None:
    """mirror-target as a RequestMirror to a Service: `http(s)://NAME.NAMESPACE[.svc[.cluster.local]][:PORT]`
    followed by `$request_uri` (the request's own path, as tidegate's mirror sends it). Bodies are not
    mirrored (mirror-request-body on, ingress-nginx's default, is reported)."""
    target = values["mirror-target"].strip()
    found = _MIRROR_TARGET.fullmatch(target)
    if found is None:
        _drop(ing, notes, NGINX_PREFIX + "mirror-target", f"{target!r}: tidegate mirrors to a Service, written "
              "http(s)://NAME.NAMESPACE[.svc[.cluster.local]][:PORT]$request_uri")
        return None
    if values.get("mirror-request-body", "on").strip() != "off":
        notes.append(Problem("warning", ing.origin, f"annotation {NGINX_PREFIX}mirror-request-body: tidegate mirrors "
                             "the request's head only, not its body", ing.key))
    tls = found[1] == "https"
    return found[4], found[2], int(found[9] or (443 if tls else 80)), tls


def _denied(ing: Resource, notes: list[Problem], realm: str, key: str, why: str) -> BasicAuth:
    notes.append(Problem("error", ing.origin, f"annotation {NGINX_PREFIX}{key}: {why}; the Ingress's paths answer "
                         "503", ing.key))
    return BasicAuth(realm=realm, problem=f"the {key} annotation is not usable")  # (no value of it: it is served)


@dataclass(frozen=True)
class ExternalAuth:
    """auth-url and its companions (ingress-nginx's authreq): what dataplane/external_auth.py needs, or why the
    Ingress's paths answer 503 instead."""

    url: str = ""
    method: str = ""
    signin: str = ""
    signin_param: str = ""
    response_headers: tuple[str, ...] = ()
    request_redirect: str = ""
    always_set_cookie: bool = False
    proxy_set_headers: str = ""  # a ConfigMap of the Ingress's namespace: headers sent to the service
    problem: str = ""


# nginx's variables an auth-url or auth-signin may hold: dataplane/external_auth.py fills in these.
VARIABLES = ("host", "http_host", "best_http_host", "scheme", "pass_access_scheme", "request_uri",
             "escaped_request_uri", "remote_addr")
_URL_WITH_VARIABLES = re.compile(r"[" + _ALNUM + r", ,:?&=$]*")  # URLWithNginxVariableRegex
_VARIABLE = re.compile(r"\$([A-Za-z_]+)")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"})


def auth_url_problem(value: str) -> str:
    """Why an auth-url or auth-signin value cannot be used, or ""."""
    if not _URL_WITH_VARIABLES.fullmatch(value):
        return "it holds characters other than letters, digits, -._~/:,?&=$ and spaces"
    unknown = sorted({name for name in _VARIABLE.findall(value) if name not in VARIABLES})
    if unknown:
        return f"tidegate does not fill in ${', $'.join(unknown)} (it does {', '.join('$' + v for v in VARIABLES)})"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or ".." in parts.netloc:
        return "it is not an http(s) URL with a host"
    return ""


def _external_auth(ing: Resource, values: dict[str, str], notes: list[Problem]) -> ExternalAuth:
    """auth-url with auth-method, auth-signin(-redirect-param), auth-response-headers, auth-request-redirect and
    auth-always-set-cookie. What ingress-nginx refuses (a location denied) answers 503."""
    url = values["auth-url"].strip()
    why = auth_url_problem(url)
    if why:
        notes.append(Problem("error", ing.origin, f"annotation {NGINX_PREFIX}auth-url: {why}; the Ingress's paths "
                             "answer 503", ing.key))
        return ExternalAuth(problem=f"auth-url: {why}")
    found: dict[str, Any] = {"url": url}
    method = values.get("auth-method", "").strip()
    if method and method not in _METHODS:
        notes.append(Problem("error", ing.origin, f"annotation {NGINX_PREFIX}auth-method {method!r} is not an HTTP "
                             "method; the Ingress's paths answer 503", ing.key))
        return ExternalAuth(problem="auth-method is not an HTTP method")
    found["method"] = method
    signin = values.get("auth-signin", "").strip()
    if signin:
        why = auth_url_problem(signin)
        if why:
            _drop(ing, notes, NGINX_PREFIX + "auth-signin", why)
        else:
            found["signin"] = signin
    param = values.get("auth-signin-redirect-param", "").strip()
    if param and not _BASIC_CHARS.fullmatch(param):
        _drop(ing, notes, NGINX_PREFIX + "auth-signin-redirect-param", f"{param!r} is not a parameter name")
    elif param:
        found["signin_param"] = param
    names = [n.strip() for n in values.get("auth-response-headers", "").split(",") if n.strip()]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_-]+", n)]
    if bad:
        _drop(ing, notes, NGINX_PREFIX + "auth-response-headers", f"{', '.join(map(repr, bad))} not header names")
    else:
        found["response_headers"] = tuple(names)
    redirect = values.get("auth-request-redirect", "").strip()
    if redirect and not URL_CHARS.fullmatch(redirect):
        _drop(ing, notes, NGINX_PREFIX + "auth-request-redirect", f"{redirect!r} is not a URL")
    elif redirect:
        found["request_redirect"] = redirect
    flag = _flag(ing, values, "auth-always-set-cookie", notes)
    if flag is not None:
        found["always_set_cookie"] = flag
    if "auth-proxy-set-headers" in values:
        namespace, _, name = values["auth-proxy-set-headers"].strip().rpartition("/")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or namespace not in ("", ing.namespace):
            notes.append(Problem("error", ing.origin, f"annotation {NGINX_PREFIX}auth-proxy-set-headers is not the "
                                 "name of a ConfigMap of the Ingress's namespace; the Ingress's paths answer 503",
                                 ing.key))
            return ExternalAuth(problem="the auth-proxy-set-headers annotation is not usable")
        found["proxy_set_headers"] = name
    return ExternalAuth(**found)


def balancing(ing: Resource, notes: list[Problem]) -> dict[str, dict[str, Any]]:
    """ingress-nginx's balancing and timeout annotations as BackendPolicy sections (loadBalancer, timeouts), in
    its order: cookie affinity, else upstream-hash-by, else load-balance."""
    values = _checked(ing, BALANCING_KEYS, notes)
    found: dict[str, dict[str, Any]] = {}
    hash_by = values.get("upstream-hash-by", "").strip()
    algorithm = values.get("load-balance", "").strip()
    if algorithm:
        if algorithm == "round_robin":
            found["loadBalancer"] = {"type": "RoundRobin"}
        elif algorithm == "ewma":  # two endpoints at random, the less loaded one (EWMA by latency there)
            found["loadBalancer"] = {"type": "PowerOfTwoChoices"}
        elif algorithm in ("chash", "chashsubset", "sticky_balanced", "sticky_persistent"):
            if not hash_by and not values.get("affinity"):
                _drop(ing, notes, NGINX_PREFIX + "load-balance", f"{algorithm} is chosen by upstream-hash-by or "
                      "affinity, which this Ingress does not set")
        else:
            _drop(ing, notes, NGINX_PREFIX + "load-balance", f"{algorithm!r} is not round_robin or ewma")
    if hash_by:
        key = _hash_key(hash_by)
        if key is None:
            _drop(ing, notes, NGINX_PREFIX + "upstream-hash-by", f"{hash_by!r}: tidegate hashes one of $request_uri, "
                  "$uri, $remote_addr, $binary_remote_addr, $http_NAME or $cookie_NAME")
        else:
            found["loadBalancer"] = {"type": "ConsistentHash", "consistentHash": key}
    affinity = values.get("affinity", "").strip()
    if affinity and affinity != "cookie":
        _drop(ing, notes, NGINX_PREFIX + "affinity", f"{affinity!r} is not cookie")
    elif affinity:
        found["loadBalancer"] = {"type": "ConsistentHash", "consistentHash": {
            "type": "Cookie", "cookie": _affinity_cookie(ing, values, notes)}}
    timeouts: dict[str, str] = {}
    for key, field in (("proxy-connect-timeout", "connect"), ("proxy-read-timeout", "read")):
        raw = values.get(key, "").strip()
        if raw and re.fullmatch(r"[0-9]+", raw) and int(raw) > 0:
            timeouts[field] = f"{int(raw)}s"
        elif raw:
            _drop(ing, notes, NGINX_PREFIX + key, f"{raw!r} is not a whole number of seconds above 0")
    if "proxy-send-timeout" in values:
        notes.append(Problem("warning", ing.origin, f"annotation {NGINX_PREFIX}proxy-send-timeout ignored: tidegate "
                             "sets no limit on writes to a pod (a pod that stops reading pauses the client)", ing.key))
    if timeouts:
        found["timeouts"] = timeouts
    retry = _next_upstream(ing, values, notes)
    if retry is not None:
        found["retry"] = retry
    return found


# proxy-next-upstream's conditions: what tidegate's retry rules call them
_NEXT_UPSTREAM = {"error": ("connect-failure", "reset"), "timeout": ("gateway-error",), "invalid_header": ("reset",)}


def _next_upstream(ing: Resource, values: dict[str, str], notes: list[Problem]) -> dict[str, Any] | None:
    """proxy-next-upstream and proxy-next-upstream-tries as a BackendPolicy retry section: `error` retries
    refused and reset connections, `timeout` timeouts (with 502-504: tidegate's gateway-error), `http_NNN`
    those statuses, `off` nothing; tries count the first one, as nginx's do. Requests with a body or a method
    that is not idempotent are not retried past a refused connection (nginx's default, without
    non_idempotent)."""
    conditions = values.get("proxy-next-upstream", "").split()
    raw_tries = values.get("proxy-next-upstream-tries", "").strip()
    if not conditions and not raw_tries:
        return None
    retry_on: list[str] = []
    codes: list[int] = []
    for condition in conditions or ["error", "timeout"]:  # nginx's default
        status = re.fullmatch(r"http_(403|404|429|500|502|503|504)", condition)
        if condition == "off":
            return {"attempts": 0}
        if status:
            codes.append(int(status[1]))
        elif condition in _NEXT_UPSTREAM:
            retry_on += [c for c in _NEXT_UPSTREAM[condition] if c not in retry_on]
        elif condition != "non_idempotent":
            _drop(ing, notes, NGINX_PREFIX + "proxy-next-upstream", f"{condition!r} is not one of error, timeout, "
                  "invalid_header, http_403, http_404, http_429, http_500, http_502-504, non_idempotent, off")
    section: dict[str, Any] = {"retryOn": retry_on + (["retriable-status-codes"] if codes else []),
                               "attempts": 2}  # ingress-nginx's default: 3 tries
    if codes:
        section["statusCodes"] = sorted(set(codes))
    if raw_tries:
        if re.fullmatch(r"[0-9]+", raw_tries):
            section["attempts"] = min(10, int(raw_tries) - 1) if int(raw_tries) else 10  # 0: nginx's "no limit"
        else:
            _drop(ing, notes, NGINX_PREFIX + "proxy-next-upstream-tries", f"{raw_tries!r} is not a whole number")
    return section


def _hash_key(expression: str) -> dict[str, Any] | None:
    """upstream-hash-by's nginx variable as a consistentHash key."""
    if expression in ("$request_uri", "$uri"):
        return {"type": "Path"}
    if expression in ("$remote_addr", "$binary_remote_addr"):
        return {"type": "SourceIP"}
    found = re.fullmatch(r"\$(http|cookie)_([A-Za-z0-9_-]+)", expression)
    if found is None:
        return None
    if found[1] == "http":  # nginx's $http_x_user: the header X-User
        return {"type": "Header", "header": {"name": found[2].replace("_", "-")}}
    return {"type": "Cookie", "cookie": {"name": found[2]}}


_EXPIRES = re.compile(r"0|-?[1-9][0-9]*")


def _affinity_cookie(ing: Resource, values: dict[str, str], notes: list[Problem]) -> dict[str, Any]:
    """affinity: cookie, with its session-cookie-* annotations (ingress-nginx's sticky.lua makes the cookie)."""
    cookie: dict[str, Any] = {"name": "INGRESSCOOKIE", "ttl": "0s"}  # no max-age: a session cookie
    name = values.get("session-cookie-name", "").strip()
    if name and HEADER_NAME.fullmatch(name) and _BASIC_CHARS.fullmatch(name):
        cookie["name"] = name
    elif name:
        _drop(ing, notes, NGINX_PREFIX + "session-cookie-name", f"{name!r} is not a cookie name: INGRESSCOOKIE")
    for key in ("session-cookie-max-age", "session-cookie-expires"):
        raw = values.get(key, "").strip()
        if raw and not _EXPIRES.fullmatch(raw):
            _drop(ing, notes, NGINX_PREFIX + key, f"{raw!r} is not a whole number of seconds")
        elif raw and int(raw) > 0:
            if key == "session-cookie-max-age":
                cookie["ttl"] = f"{int(raw)}s"
            else:
                cookie["expires"] = int(raw)
    path = values.get("session-cookie-path", "").strip()
    if path and URL_CHARS.fullmatch(path) and path.startswith("/"):
        cookie["path"] = path
    elif path:
        _drop(ing, notes, NGINX_PREFIX + "session-cookie-path", f"{path!r} is not a path")
    elif _bool(str(ing.annotations.get(NGINX_PREFIX + "use-regex", ""))):
        notes.append(Problem("warning", ing.origin, "session-cookie-path should be set when use-regex is true: the "
                             "cookie's path is /", ing.key))
    domain = values.get("session-cookie-domain", "").strip()
    if domain and re.fullmatch(r"[A-Za-z0-9.-]+", domain):
        cookie["domain"] = domain
    elif domain:
        _drop(ing, notes, NGINX_PREFIX + "session-cookie-domain", f"{domain!r} is not a domain")
    same_site = values.get("session-cookie-samesite", "").strip().lower()
    if same_site in ("none", "lax", "strict"):
        cookie["sameSite"] = same_site.capitalize()
    elif same_site:
        _drop(ing, notes, NGINX_PREFIX + "session-cookie-samesite", f"{same_site!r} is not None, Lax or Strict")
    flag = _flag(ing, values, "session-cookie-secure", notes)
    if flag is not None:
        cookie["secure"] = flag
    mode = values.get("affinity-mode", "balanced").strip()
    if mode not in ("balanced", "persistent"):
        _drop(ing, notes, NGINX_PREFIX + "affinity-mode", f"{mode!r} is not balanced or persistent")
    return cookie


def _flag(ing: Resource, values: dict[str, str], key: str, notes: list[Problem]) -> bool | None:
    """A true/false annotation among `values` (Go's ParseBool); one that is neither is reported: None."""
    if key not in values:
        return None
    flag = _bool(values[key].strip())
    if flag is None:
        _drop(ing, notes, NGINX_PREFIX + key, f"{values[key]!r} is not true or false")
    return flag


def _bool(value: str) -> bool | None:
    return True if value in _TRUE else False if value in _FALSE else None


def _drop(ing: Resource, notes: list[Problem], full: str, why: str, severity: str = "warning") -> None:
    notes.append(Problem(severity, ing.origin, f"annotation {full} ignored: {why}", ing.key))
