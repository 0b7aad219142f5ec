"""HTTPRoute filters as pure functions over header lists and paths (no I/O, so each rule is unit-testable)."""

from __future__ import annotations

from typing import Any

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
    return out


def replace_path(path: str, config: dict[str, Any], matched_prefix: str | None) -> str:
    """The path of an HTTPPathModifier. ReplacePrefixMatch swaps whole leading segments: with prefix /foo and
    replacement /xyz, /foo/bar → /xyz/bar and /foo → /xyz; trailing slashes of either side do not matter."""
    kind = config.get("type")
    if kind == "ReplaceFullPath":
        return config.get("replaceFullPath") or "/"
    if kind == "ReplacePrefixMatch" and matched_prefix is not None:
        prefix = matched_prefix.rstrip("/")
        rest = path[len(prefix):] if path.startswith(prefix) else path
        return ((config.get("replacePrefixMatch") or "/").rstrip("/") + rest) or "/"
    return path


def strip_port(host: str) -> str:
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def redirect_location(config: dict[str, Any], scheme: str, host: str, listener_port: int, path: str,
                      query: str, matched_prefix: str | None) -> str:
    """The Location of a RequestRedirect, with the spec's port rules: an explicit port wins; a changed scheme
    means that scheme's default port; otherwise the listener's port. Default ports are not written."""
    new_scheme = config.get("scheme") or scheme
    hostname = config.get("hostname") or strip_port(host)
    if config.get("port"):
        port = int(config["port"])
    elif config.get("scheme"):
        port = 443 if new_scheme == "https" else 80
    else:
        port = listener_port
    default = 443 if new_scheme == "https" else 80
    netloc = hostname if port == default else f"{hostname}:{port}"
    new_path = replace_path(path, config["path"], matched_prefix) if config.get("path") else path
    return f"{new_scheme}://{netloc}{new_path}" + (f"?{query}" if query else "")
