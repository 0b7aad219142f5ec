"""The request path's own shortcuts around httptools, checked against what they stand in for: the split of an
origin-form target against httptools.parse_url, the request's HTTP version against the parser's, and the
response-head split of the fast lane against a plain reading of RFC 9110's hop-by-hop rule. Random inputs from
a fixed seed, a few thousand each."""

from __future__ import annotations

import asyncio
import random

import httptools
import pytest

from tidegate.balancing.balancer import RouteBalancer
from tidegate.balancing.state import Registry
from tidegate.dataplane.http1 import ClientConnection, RequestRejected, _split_target
from tidegate.dataplane.server import PoolSet, Site
from tidegate.dataplane.upstream import split_head

TARGET_CHARS = "abcXYZ019/?#%:@!$&'()*+,;=-._~"


class _Sink:
    def on_url(self, url: bytes) -> None:
        pass


def _llhttp_accepts(target: bytes) -> bool:
    try:
        httptools.HttpRequestParser(_Sink()).feed_data(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    except httptools.HttpParserError:
        return False
    return True


def _by_parse_url(target: bytes) -> tuple[str, str, str] | None:
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return None
    host = url.host.decode("latin-1") if url.host else ""
    if host and url.port:
        host = f"{host}:{url.port}"
    return host, url.path.decode("latin-1") if url.path else "/", url.query.decode("latin-1") if url.query else ""


def test_an_origin_form_target_splits_as_parse_url_splits_it():
    rng = random.Random(7)
    targets = [b"/", b"/a?b", b"/a?", b"/a?b?c", b"/%2F?x=%20", b"//double", b"/x#frag", b"http://h:8/p?q",
               b"*", b"/a/../b;p?q=1&r"]
    targets += [("/" + "".join(rng.choice(TARGET_CHARS) for _ in range(rng.randint(0, 12)))).encode()
                for _ in range(3000)]
    compared = 0
    for target in targets:
        if not _llhttp_accepts(target):
            continue  # never reaches routing
        expected = _by_parse_url(target)
        try:
            got = _split_target(target)
        except RequestRejected:
            got = None
        assert got == expected, target
        compared += 1
    assert compared > 2000


class _Transport:
    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        raise AssertionError(f"nothing is answered here: {data!r}")

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _Busy:
    """A connection's `serving` slot taken: what comes next waits."""

    def done(self) -> bool:
        return False

    def cancel(self) -> None:
        pass


@pytest.mark.parametrize("version", [b"0.9", b"1.0", b"1.1", b"2.0"])
@pytest.mark.parametrize("connection", [None, b"close", b"keep-alive", b"Keep-Alive", b"upgrade", b"te, close",
                                        b"keep-alive, Upgrade", b""])
def test_the_request_version_is_the_parsers(version: bytes, connection: bytes | None):
    """The connection names the version itself when the parser keeps a request alive with no Connection
    header (it reads get_http_version otherwise): what the parser would say, for every version llhttp takes."""
    head = b"GET / HTTP/" + version + b"\r\nHost: a\r\n"
    if connection is not None:
        head += b"Connection: " + connection + b"\r\n"
    head += b"\r\n"
    said: list[tuple[str, bool]] = []

    class Reference:
        def on_headers_complete(self) -> None:  # where the connection reads them too
            said.append((parser.get_http_version(), parser.should_keep_alive()))

    parser = httptools.HttpRequestParser(Reference())
    parser.feed_data(head)

    async def received() -> tuple[str, bool]:
        site = Site(None, RouteBalancer(Registry()), PoolSet())  # no routes: the request is only parsed
        conn = ClientConnection(lambda: site, 8080)
        conn.connection_made(_Transport())
        conn.serving = _Busy()  # the request waits in the queue, where it is looked at
        try:
            conn.data_received(head)
            assert len(conn.queue) == 1
            return conn.queue[0].version, conn.queue[0].keep_alive
        finally:
            conn.connection_lost(None)

    assert said[0][0] == version.decode()
    assert asyncio.run(received()) == said[0]


def _reference_split(raw: bytes) -> tuple[list[bytes], int | None, bool]:
    """RFC 9110 §7.6.1 read plainly: hop-by-hop fields, and the fields Connection names, are not passed on."""
    hop = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
           b"proxy-authenticate", b"proxy-authorization"}
    fields = [line.partition(b":") for line in raw.split(b"\r\n")[1:]]
    named = {token.strip().lower() for name, _, value in fields if name.lower() == b"connection"
             for token in value.split(b",")} - {b"keep-alive", b"close", b""}
    kept = [name + b":" + value for name, _, value in fields if name.lower() not in hop | named]
    lengths = [int(value) for name, _, value in fields if name.lower() == b"content-length"]
    chunked = any(b"chunked" in value.lower() for name, _, value in fields if name.lower() == b"transfer-encoding")
    return kept, lengths[-1] if lengths else None, chunked


@pytest.mark.parametrize("seed", range(4))
def test_the_fast_response_head_split_follows_the_hop_by_hop_rule(seed: int):
    rng = random.Random(seed)
    names = [b"Server", b"Date", b"Content-Type", b"ETag", b"X-Private", b"x-other", b"Keep-Alive", b"TE",
             b"Trailer", b"Upgrade", b"Proxy-Connection", b"Proxy-Authenticate", b"Set-Cookie", b"Vary",
             b"Last-Modified", b"Accept-Ranges", b"Cache-Control", b"X-Fourteen-Chr", b"Proxy-Authorization",
             # names with a hop-by-hop name's first letter and length, which are passed on
             b"Cookie-Jar", b"Kept-Alive", b"Tracker", b"Unicorn", b"Proxy-Connexion", b"Pragma", b"To"]
    for _ in range(1500):
        lines = [b"HTTP/1.1 200 OK"]
        for _ in range(rng.randint(0, 8)):
            name = rng.choice(names)
            name = name.lower() if rng.random() < 0.3 else name
            lines.append(name + b":" + rng.choice([b" v", b"v", b" a, b ", b"\t1"]))
        if rng.random() < 0.7:
            lines.insert(rng.randint(1, len(lines)), rng.choice([b"Content-Length: 13", b"content-length:7"]))
        if rng.random() < 0.5:
            value = rng.choice([b" keep-alive", b" close", b" Keep-Alive, X-Private", b" x-other ,TE", b" Close"])
            lines.insert(rng.randint(1, len(lines)), rng.choice([b"Connection:", b"connection:"]) + value)
        if rng.random() < 0.2:
            lines.append(b"Transfer-Encoding: " + rng.choice([b"chunked", b"gzip, Chunked"]))
        raw = b"\r\n".join(lines)
        assert split_head(raw) == _reference_split(raw), raw
