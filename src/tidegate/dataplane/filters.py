"""HTTPRoute filters as pure functions over header lists and paths (no I/O, so each rule is unit-testable)."""

from __future__ import annotations

import re
from typing import Any

import re2

from tidegate.router import normal_path

Headers = list[tuple[str, str]]  # (name as received, value), in order


def get_header(headers: Headers, name: str) -> str | None:
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return None


def modify_headers(headers: Headers, config: dict[str, Any]) -> Headers:
    """RequestHeaderModifier / ResponseHeaderModifier: set replaces, add appends, remove deletes."""
    out = list(headers)
    for item in config.get("set", []):
        lname = item["name"].lower()
        out = [(k, v) for k, v in out if k.lower() != lname]
        out.append((item["name"], item["value"]))
    for item in config.get("add", []):
        lname = item["name"].lower()
        existing = [i for i, (k, _) in enumerate(out) if k.lower() == lname]
        if existing:
            # add appends to the existing value, as the spec's example shows ("my-header: foo,bar")
            i = existing[0]
            out[i] = (out[i][0], f"{out[i][1]},{item['value']}")
        else:
            out.append((item["name"], item["value"]))
    removed = {name.lower() for name in config.get("remove", [])}
    if removed:
        out = [(k, v) for k, v in out if k.lower() not in removed]
    out.extend(config.get("append", ()))  # tidegate's own: new header lines (Set-Cookie must not be joined)
    return out


def replace_path(path: str, config: dict[str, Any], matched_prefix: str | None) -> str:
    """The path of an HTTPPathModifier. ReplacePrefixMatch swaps whole leading segments: with prefix /foo and
    replacement /xyz, /foo/bar → /xyz/bar and /foo → /xyz; trailing slashes of either side do not matter.
    RegexReplace (tidegate's own, for ingress-nginx's rewrite-target) is nginx's `rewrite REGEX TARGET break`:
    where `pattern` matches at the path's start, the whole path becomes `substitution`, $1-$9 its groups; a
    `?` in it brings new query parameters, the request's own following them (see with_query)."""
    kind = config.get("type")
    if kind == "ReplaceFullPath":
        return config.get("replaceFullPath") or "/"
    if kind == "RegexReplace":
        found = _compiled(config["pattern"]).match(path)
        if found is None:
            return path
        groups = found.groups()
        result = _CAPTURE.sub(lambda m: (groups[int(m.group(1)) - 1] or "") if 0 < int(m.group(1)) <= len(groups)
                              else "", config["substitution"]) or "/"
        if not result.startswith("/"):
            return result  # a URL (a redirect's), or no absolute path at all (the caller refuses it: 400)
        # What the groups brought is normalised as the request's path was: a pod receives /x, not //x or
        # /../x (from /api../x and "/$1").
        new_path, mark, params = result.partition("?")
        return normal_path(new_path) + mark + params
    if kind == "ReplacePrefixMatch" and matched_prefix is not None:
        rest = _after_segments(path, matched_prefix)
        return ((config.get("replacePrefixMatch") or "/").rstrip("/") + rest) or "/"
    return path


def _after_segments(path: str, prefix: str) -> str:
    """What follows the segments of `prefix` in `path`, which the router matched by segments: repeated slashes
    between them ("//api/x" for /api) are part of the prefix, not of what follows."""
    at = 0
    for segment in prefix.split("/"):
        if not segment:
            continue
        while at < len(path) and path[at] == "/":
            at += 1
        if not path.startswith(segment, at):
            return path.removeprefix(prefix.rstrip("/"))
        at += len(segment)
    return path[at:]


_CAPTURE = re.compile(r"\$([0-9])")
_REGEXES: dict[str, Any] = {}


def _compiled(pattern: str) -> Any:
    found = _REGEXES.get(pattern)
    if found is None:
        if len(_REGEXES) > 10_000:
            _REGEXES.clear()
        found = _REGEXES[pattern] = re2.compile(pattern)
    return found


def with_query(path: str, query: str) -> str:
    """A request target: `path` (which a RegexReplace may have given parameters of its own) and the request's
    query string, after them as nginx appends them."""
    if not query:
        return path
    return f"{path}&{query}" if "?" in path else f"{path}?{query}"


def strip_port(host: str) -> str:
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def redirect_location(config: dict[str, Any], scheme: str, host: str, listener_port: int, path: str,
                      query: str, matched_prefix: str | None) -> str:
    """The Location of a RequestRedirect, with the spec's port rules: an explicit port wins; a changed scheme
    means that scheme's default port; otherwise the listener's port. Default ports are not written.
    tidegate's own keys, for ingress-nginx's annotations: `location` (that URL as it is), `dropQuery` (the
    request's query string not carried over), `stripTrailingSlash` (a target of "/x/" becomes "/x", as
    ingress-nginx's HTTPS redirect does without preserve-trailing-slash), `alwaysPort` (the port written even
    when it is the scheme's default, as from-to-www-redirect writes it)."""
    if config.get("location"):
        return config["location"]
    rewrite = config.get("path") or {}
    if rewrite.get("type") == "RegexReplace" and rewrite["substitution"].startswith(("http://", "https://")):
        # nginx's `rewrite` to a URL (the target itself one, not a group's text): a redirect there
        return with_query(replace_path(path, rewrite, None), query)
    if config.get("dropQuery"):
        query = ""
    new_scheme = config.get("scheme") or scheme
    hostname = config.get("hostname") or strip_port(host)
    if config.get("port"):
        port = int(config["port"])
    elif config.get("scheme"):
        port = 443 if new_scheme == "https" else 80
    else:
        port = listener_port
    default = 443 if new_scheme == "https" else 80
    netloc = hostname if port == default and not config.get("alwaysPort") else f"{hostname}:{port}"
    new_path = replace_path(path, config["path"], matched_prefix) if config.get("path") else path
    if config.get("stripTrailingSlash") and not query and new_path.endswith("/"):
        new_path = new_path[:-1]
    return f"{new_scheme}://{netloc}{new_path}" + (f"?{query}" if query else "")


def _origin_allowed(config: dict[str, Any], origin: str) -> bool:
    for pattern in config.get("allowOrigins", []):
        if pattern == "*" or pattern == origin:
            return True
        if "*" in pattern:
            prefix, _, suffix = pattern.partition("*")
            # "https://*.bar.com" covers any number of labels before ".bar.com", but not "https://bar.com"
            if origin.startswith(prefix) and origin.endswith(suffix) and len(origin) > len(prefix) + len(suffix):
                return True
    return False


def cors_preflight(config: dict[str, Any], origin: str, method: str, headers: str) -> Headers:
    """Response headers for a CORS preflight (OPTIONS with Origin and Access-Control-Request-Method), answered
    by the gateway itself. An origin that is not allowed gets no CORS headers at all."""
    if not _origin_allowed(config, origin):
        return []
    credentials = bool(config.get("allowCredentials"))
    out: Headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
    methods = config.get("allowMethods", [])
    if "*" in methods:
        # With credentials a literal "*" means nothing to browsers, so the asked method is echoed.
        out.append(("Access-Control-Allow-Methods", method if credentials and method else "*"))
    elif methods:
        out.append(("Access-Control-Allow-Methods", ", ".join(methods)))
    allow_headers = config.get("allowHeaders", [])
    if "*" in allow_headers:
        value = headers if credentials and headers else "*"
        if value:
            out.append(("Access-Control-Allow-Headers", value))
    elif allow_headers:
        out.append(("Access-Control-Allow-Headers", ", ".join(allow_headers)))
    if config.get("exposeHeaders"):
        out.append(("Access-Control-Expose-Headers", ", ".join(config["exposeHeaders"])))
    out.append(("Access-Control-Max-Age", str(config.get("maxAge", 5))))
    if credentials:
        out.append(("Access-Control-Allow-Credentials", "true"))
    return out


def cors_response(config: dict[str, Any], origin: str) -> dict[str, Any]:
    """A ResponseHeaderModifier-shaped config adding CORS headers to an actual (non-preflight) response."""
    if not _origin_allowed(config, origin):
        return {}
    headers = [{"name": "Access-Control-Allow-Origin", "value": origin}, {"name": "Vary", "value": "Origin"}]
    if config.get("allowCredentials"):
        headers.append({"name": "Access-Control-Allow-Credentials", "value": "true"})
    if config.get("exposeHeaders"):
        headers.append({"name": "Access-Control-Expose-Headers", "value": ", ".join(config["exposeHeaders"])})
    return {"set": headers}


def cors(config: dict[str, Any], method: str, headers_lower: dict[str, str]) -> tuple[bool, Headers]:
    """A CORS filter on one request: (answer now with 204 and these headers, or else add them to the answer).
    The Gateway API's filter answers preflights (OPTIONS with Access-Control-Request-Method); ingress-nginx's
    enable-cors (config style "ingress-nginx") answers every OPTIONS from an allowed origin and sends its whole
    header set on every answer, "*" to any request at all."""
    if config.get("style") == "ingress-nginx":
        return _nginx_cors(config, method, headers_lower.get("origin"))
    origin = headers_lower.get("origin")
    if origin is None:
        return False, []
    asked = headers_lower.get("access-control-request-method")
    if method == "OPTIONS" and asked is not None:
        return True, cors_preflight(config, origin, asked, headers_lower.get("access-control-request-headers", ""))
    return False, [(h["name"], h["value"]) for h in cors_response(config, origin).get("set", ())]


def _nginx_cors(config: dict[str, Any], method: str, origin: str | None) -> tuple[bool, Headers]:
    origins: list[str] = config["allowOrigins"]
    if origins == ["*"]:
        allowed = "*"
    elif origin is not None and any(_nginx_origin(pattern, origin) for pattern in origins):
        allowed = origin
    else:
        return False, []
    out: Headers = [("Access-Control-Allow-Origin", allowed)]
    if config.get("allowCredentials"):
        out.append(("Access-Control-Allow-Credentials", "true"))
    out.append(("Access-Control-Allow-Methods", config["allowMethods"]))
    out.append(("Access-Control-Allow-Headers", config["allowHeaders"]))
    if config.get("exposeHeaders"):
        out.append(("Access-Control-Expose-Headers", config["exposeHeaders"]))
    out.append(("Access-Control-Max-Age", str(config["maxAge"])))
    if method == "OPTIONS":
        return True, [*out, ("Content-Type", "text/plain charset=UTF-8")]
    return False, out


def _nginx_origin(pattern: str, origin: str) -> bool:
    """ingress-nginx's origin match: case-insensitive, one "*" standing for one DNS label."""
    if "*" not in pattern:
        return pattern.lower() == origin.lower()
    prefix, _, suffix = pattern.lower().partition("*")
    origin = origin.lower()
    if not (origin.startswith(prefix) and origin.endswith(suffix)):
        return False
    label = origin[len(prefix):len(origin) - len(suffix)]
    return bool(label) and re.fullmatch(r"[a-z0-9-]+", label) is not None


def set_headers(response_mods: list[dict[str, Any]]) -> Headers:
    """The headers the response changes so far set, for an answer tidegate gives itself (a 401 carries the
    CORS headers, as ingress-nginx's more_set_headers do)."""
    return [(h["name"], h["value"]) for mod in response_mods for h in mod.get("set", ())]
