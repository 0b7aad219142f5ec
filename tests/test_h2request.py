"""HTTP/2 request header blocks (dataplane/h2request.py): what a well-formed block fills in, what makes a block
malformed, and a comparison with the `h2` library's own checks, which tidegate turns off in their favour."""

from __future__ import annotations

import random

import h2.exceptions
import h2.utilities
import pytest

from tidegate.dataplane.h2request import read_request
from tidegate.dataplane.http1 import Exchange

BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a?b=1"), (b":authority", b"site.test")]


def _read(fields: list[tuple[bytes, bytes]], ended: bool = True) -> tuple[str, Exchange]:
    ex = Exchange()
    return read_request(ex, fields, ended), ex


def test_a_well_formed_request_fills_the_exchange():
    fields = BASE + [(b"cookie", b"a=1"), (b"x-tag", b"one"), (b"cookie", b"b=2"), (b"x-tag", b"two"),
                     (b"content-length", b"12"), (b"expect", b"100-Continue"), (b"x-bytes", b"caf\xc3\xa9")]
    problem, ex = _read(fields, ended=False)
    assert problem == ""
    assert ex.method == "GET" and ex.target == b"/a?b=1" and ex.version == "2" and ex.keep_alive
    assert ex.headers == [("host", "site.test"), ("x-tag", "one"), ("x-tag", "two"), ("content-length", "12"),
                          ("expect", "100-Continue"), ("x-bytes", "caf\xc3\xa9"), ("cookie", "a=1; b=2")]
    assert ex.headers[5][1].encode("latin-1") == b"caf\xc3\xa9"  # the client's bytes, unchanged
    assert ex.content_length == 12 and ex.expect_continue and not ex.chunked and not ex.body_done
    # The lower-case view is filled at once, as Exchange.lowered would compute it.
    assert ex.lnames == [name for name, _ in ex.headers]
    assert ex.lowered() == {"host": "site.test", "x-tag": "one,two", "content-length": "12",
                            "expect": "100-Continue", "x-bytes": "caf\xc3\xa9", "cookie": "a=1; b=2"}


def test_bodies_and_hosts():
    problem, ex = _read(BASE, ended=False)
    assert problem == "" and ex.chunked and not ex.body_done  # a body of unknown length
    problem, ex = _read(BASE, ended=True)
    assert problem == "" and not ex.chunked and ex.body_done
    no_authority = [field for field in BASE if field[0] != b":authority"]
    problem, ex = _read(no_authority + [(b"host", b"other.test")])
    assert problem == "" and ex.lowered()["host"] == "other.test"
    problem, ex = _read(BASE + [(b"host", b"site.test")])
    assert problem == "" and [name for name, _ in ex.headers] == ["host"]
    problem, ex = _read([(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":path", b"*"), (b":authority", b"a")])
    assert problem == "" and ex.target == b"*"
    problem, ex = _read([(b":method", b"CONNECT"), (b":authority", b"a:443")])
    assert problem == ""


@pytest.mark.parametrize("fields, why", [
    (BASE + [(b"X-Upper", b"1")], "not lower-case token"),
    (BASE + [(b"x y", b"1")], "not lower-case token"),
    (BASE + [(b"x:y", b"1")], "not lower-case token"),
    (BASE + [(b"", b"1")], "empty field name"),
    (BASE + [(b"x-a", b"1\r\nx-b: 2")], "NUL, CR or LF"),
    (BASE + [(b"x-a", b"1\x00")], "NUL, CR or LF"),
    (BASE + [(b"x-a", b" 1")], "white space"),
    (BASE + [(b"x-a", b"1\t")], "white space"),
    (BASE + [(b"connection", b"close")], "connection-specific"),
    (BASE + [(b"transfer-encoding", b"chunked")], "connection-specific"),
    (BASE + [(b"upgrade", b"websocket")], "connection-specific"),
    (BASE + [(b"te", b"gzip")], "TE"),
    (BASE + [(b"host", b"a"), (b"host", b"a")], "second Host"),
    (BASE + [(b"host", b"elsewhere.test")], "differs from :authority"),
    (BASE + [(b":method", b"GET")], "second"),
    (BASE + [(b":status", b"200")], "may not have"),
    (BASE + [(b":custom", b"1")], "may not have"),
    ([(b":method", b"GET"), (b"x-a", b"1"), (b":scheme", b"http"), (b":path", b"/")], "after a regular"),
    (BASE[1:], "no :method"),
    ([BASE[0], BASE[2], BASE[3]], "no :scheme"),
    ([BASE[0], BASE[1], BASE[3]], "no :path"),
    ([BASE[0], BASE[1], (b":path", b""), BASE[3]], "absolute path"),
    ([BASE[0], BASE[1], (b":path", b"a/b"), BASE[3]], "absolute path"),
    ([BASE[0], BASE[1], (b":path", b"*"), BASE[3]], "absolute path"),  # "*" is for OPTIONS only
    ([BASE[1], BASE[2], BASE[3]], "no :method"),
    (BASE[:1] + [(b":method", b"CONNECT")] + BASE[2:], "second"),
    ([(b":method", b"CONNECT"), (b":path", b"/"), (b":authority", b"a")], "CONNECT request with"),
    (BASE + [(b":protocol", b"websocket")], ":protocol"),
    ([BASE[0], BASE[1], BASE[2]], "neither :authority nor Host"),
])
def test_a_malformed_request_is_named(fields, why):
    problem, _ = _read(fields)
    assert why in problem


def _h2_accepts(fields: list[tuple[bytes, bytes]]) -> bool:
    flags = h2.utilities.HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False,
                                               is_push_promise=False)
    try:
        list(h2.utilities.validate_headers(fields, flags))
    except h2.exceptions.ProtocolError:
        return False
    return True


def _beyond_h2(fields: list[tuple[bytes, bytes]], problem: str) -> bool:
    """Rules tidegate adds to h2's: field names of token characters only, and the form of :path."""
    return "token characters" in problem or "absolute path" in problem


def test_every_block_h2_would_refuse_is_refused():
    """Random blocks from pieces that are each right or wrong: tidegate refuses whatever h2 refuses, and what it
    refuses beyond that is only by its two added rules."""
    rng = random.Random(11)
    pieces = [
        (b":method", b"GET"), (b":method", b"POST"), (b":method", b"CONNECT"), (b":scheme", b"https"),
        (b":path", b"/x"), (b":path", b""), (b":path", b"x"), (b":authority", b"a.test"), (b":status", b"200"),
        (b":protocol", b"websocket"), (b":other", b"1"), (b"host", b"a.test"), (b"host", b"b.test"),
        (b"x-ok", b"v"), (b"x-ok", b""), (b"X-Up", b"v"), (b"x-sp", b" v"), (b"x-nl", b"a\nb"), (b"x-nul", b"\x00"),
        (b"te", b"trailers"), (b"te", b"TRAILERS"), (b"te", b"gzip"), (b"connection", b"close"),
        (b"keep-alive", b"1"), (b"cookie", b"c=1"), (b"", b"v"), (b"x(y", b"v"), (b"x:y", b"v"), (b"x\x7f", b"v"),
    ]
    valid = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/x"), (b":authority", b"a.test")]
    agreed = refused_alike = 0
    for _ in range(4000):
        fields = valid[:rng.randint(0, 4)] + [rng.choice(pieces) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.3:
            rng.shuffle(fields)
        problem, _ = _read(fields)
        if not _h2_accepts(fields):
            assert problem, fields
            refused_alike += 1
        elif problem:
            assert _beyond_h2(fields, problem), (fields, problem)
        else:
            agreed += 1
    assert agreed > 100 and refused_alike > 1000
