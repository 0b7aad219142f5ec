"""External authentication: the ExternalAuth filter (ingress-nginx's `auth-url`, nginx's auth_request).

Before a request goes on, tidegate asks the authentication service: a GET (or `method`) to its URL with the
request's headers and no body, plus what ingress-nginx adds (X-Original-URL, X-Original-Method,
X-Auth-Request-Redirect, X-Real-IP, X-Forwarded-For, X-Sent-From; X-Original-URI and X-Scheme with a
method). Its answer decides:

- 2xx: the request goes on, with the headers `response_headers` names copied from the answer (one the answer
  lacks is removed from the request, as nginx's empty proxy_set_header does), and the answer's Set-Cookie
  added to the response (to error responses too with `always_set_cookie`);
- 401: 401 with the service's WWW-Authenticate, or with a `signin` URL, 302 there (its Set-Cookie too), the
  request's URL in the `rd` parameter (`signin_param`) unless the URL names it itself;
- 403: 403; anything else, or no answer: 500.

A URL may hold nginx's variables ($host, $http_host, $scheme, $request_uri, $escaped_request_uri, ...),
filled in per request. When the translator found the URL's host to be a Service of the cluster, `targets`
lists its ready pods and one is asked directly (no second hop through the Service); otherwise the host is
looked up in DNS. Connections are kept alive in pools of this module's own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
from typing import Any
from urllib.parse import quote, urlsplit

from tidegate.dataplane.upstream import ClosedUnanswered, EndpointPool, UpstreamConnection, backend_tls_context

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
ANSWER_TIMEOUT = 60.0  # nginx's proxy_read_timeout
VARIABLE = re.compile(r"\$([a-z_]+)")
# Not sent to the service: hop-by-hop fields, the body's framing, and what ingress-nginx clears.
NOT_SENT = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                      "upgrade", "content-length", "x-forwarded-proto", "host", "expect"})

# What check returns: (0, request header changes, cookies for the response) when the request may go on, or
# (status, response headers, []) for the answer to give.
Verdict = tuple[int, list[tuple[str, str]], list[str]]

_POOLS: dict[tuple[str, int, bool, str], EndpointPool] = {}


def expand(template: str, values: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: values.get(m[1], m[0]), template)


def _pool(address: str, port: int, tls: bool, server_name: str) -> EndpointPool:
    key = (address, port, tls, server_name)
    pool = _POOLS.get(key)
    if pool is None:
        if len(_POOLS) >= 256:
            for old in _POOLS.values():
                old.close()
            _POOLS.clear()
        ctx = backend_tls_context("", "", check_hostname=False, verify=False) if tls else None  # nginx's default
        pool = _POOLS[key] = EndpointPool(address, port, tls=ctx, server_hostname=server_name if tls else "")
    return pool


async def _target(config: dict[str, Any], host: str, port: int) -> tuple[str, int]:
    targets = config.get("targets")
    if targets is not None:
        if not targets:
            raise OSError(f"the Service of {config['url']} has no ready pod")
        address, target_port = random.choice(targets)
        return address, target_port
    try:
        ipaddress.ip_address(host)
        return host, port
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=1)  # SOCK_STREAM
        return infos[0][4][0], port


async def _ask(config: dict[str, Any], url: str, head: list[tuple[str, str]]) -> tuple[int, list[tuple[str, str]]]:
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    address, port = await _target(config, host, port)
    pool = _pool(address, port, tls, host)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    method = config.get("method") or "GET"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}"]
    lines += [f"{name}: {value}" for name, value in head]
    if method not in ("GET", "HEAD"):
        lines.append("Content-Length: 0")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    for attempt in (1, 2):
        upstream: UpstreamConnection = await pool.acquire(CONNECT_TIMEOUT)
        reused = upstream.idle_since > 0.0
        try:
            upstream.start_exchange(request)
            assert upstream.head_future is not None and upstream.done_future is not None
            answer = await upstream.head_future
            upstream.set_sink(lambda chunk: None)  # the body says nothing nginx would use
            if method != "HEAD" and answer.status not in (204, 304):
                await upstream.done_future
            elif method == "HEAD":
                upstream.reusable = False
            break
        except ClosedUnanswered:
            upstream.close()
            if reused and attempt == 1:
                continue  # a kept connection the service had closed: once more on a new one
            raise
        except BaseException:
            upstream.close()
            raise
    if not upstream.closed and upstream.reusable:
        pool.release(upstream)
    else:
        upstream.close()
    return answer.status, answer.headers


async def check(config: dict[str, Any], method: str, headers: list[tuple[str, str]], http_host: str,
                request_uri: str, scheme: str, client: str) -> Verdict:
    """Ask the service about one request (see the module's docstring)."""
    if config.get("problem"):
        return 503, [], []
    values = {"host": http_host.rpartition(":")[0] if http_host.count(":") == 1 else http_host,
              "http_host": http_host, "best_http_host": http_host, "scheme": scheme,
              "pass_access_scheme": scheme, "request_uri": request_uri,
              "escaped_request_uri": quote(request_uri, safe=""), "remote_addr": client}
    ours = [("X-Original-URL", f"{scheme}://{http_host}{request_uri}"), ("X-Original-Method", method),
            ("X-Sent-From", "nginx-ingress-controller"), ("X-Real-IP", client), ("X-Forwarded-For", client),
            ("X-Auth-Request-Redirect", expand(config.get("request_redirect") or "$request_uri", values))]
    if config.get("method"):
        ours += [("X-Original-URI", request_uri), ("X-Scheme", scheme)]
    ours += [(n, expand(v, values)) for n, v in config.get("proxy_set_headers", ())]  # auth-proxy-set-headers
    # Set, as nginx's proxy_set_header: a client's own copy of these (a forged X-Original-URL) is not sent.
    set_names = {name.lower() for name, _ in ours}
    head = [(n, v) for n, v in headers if n.lower() not in NOT_SENT and n.lower() not in set_names] + ours
    url = expand(config["url"], values)
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            status, answer = await _ask(config, url, head)
    except Exception as exc:  # noqa: BLE001 (no answer, for whatever reason, is a 500)
        log.warning("external authentication at %s failed: %s", url, exc)
        return 500, [], []
    cookies = [v for n, v in answer if n.lower() == "set-cookie"]
    if 200 <= status < 300:
        wanted = {name.lower(): name for name in config.get("response_headers", ())}
        changes = [(wanted[n.lower()], v) for n, v in answer if n.lower() in wanted]
        given = {n.lower() for n, _ in changes}
        changes += [(name, "") for lname, name in wanted.items() if lname not in given]  # "": removed
        return 0, changes, cookies
    if status == 401:
        signin = config.get("signin")
        if signin:
            location = expand(signin, values)
            param = config.get("signin_param") or "rd"
            if f"{param}=" not in (urlsplit(signin).query or ""):
                location += ("&" if "?" in location else "?") + \
                    f"{param}={scheme}://{http_host}{values['escaped_request_uri']}"
            return 302, [("Location", location), *(("Set-Cookie", c) for c in cookies)], []
        challenge = [("WWW-Authenticate", v) for n, v in answer if n.lower() == "www-authenticate"]
        return 401, [*challenge, *_always(config, cookies)], []
    if status == 403:
        return 403, _always(config, cookies), []
    log.warning("external authentication at %s answered %d: 500", url, status)
    return 500, [], []


def _always(config: dict[str, Any], cookies: list[str]) -> list[tuple[str, str]]:
    return [("Set-Cookie", c) for c in cookies] if config.get("always_set_cookie") else []
