"""An HTTP/2 request's header block: checked by the rules of RFC 9113 section 8 and turned into an Exchange, in one
pass over its fields.

The `h2` library can check and normalise header blocks itself, through a chain of seven generators over every
field and a decoding pass after them: about a sixth of the CPU of a small HTTP/2 request. http2.py turns that
off and calls `read_request` instead, which applies the same rules (and RFC 9113's rule on the form of :path)
while it fills the Exchange. Field bytes are decoded as Latin-1, as HTTP/1.1 heads are, so that any bytes the
client sent reach the endpoint unchanged.
"""

from __future__ import annotations

from typing import Final

from tidegate.dataplane.http1 import Exchange

# The bytes a field name may hold: RFC 9110's token characters without upper-case letters (RFC 9113 8.2.1).
_NAME_BYTES: Final = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
# Connection-specific fields are malformed in HTTP/2 (RFC 9113 8.2.2); TE may only say "trailers".
_CONNECTION_SPECIFIC: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                         b"upgrade"})
# The request pseudo-header fields (RFC 9113 8.3.1, RFC 8441 4), each with a bit of its own.
_METHOD: Final = 1
_SCHEME: Final = 2
_PATH: Final = 4
_AUTHORITY: Final = 8
_PROTOCOL: Final = 16
_PSEUDO: Final = {b":method": _METHOD, b":scheme": _SCHEME, b":path": _PATH, b":authority": _AUTHORITY,
                  b":protocol": _PROTOCOL}


def read_request(ex: Exchange, fields: list[tuple[bytes, bytes]], ended: bool) -> str:
    """Fill `ex` from a request's header fields, as h2 decoded them; `ended`: the HEADERS frame ended the
    stream (no body). Returns "" when the request is well formed, else what makes it malformed (RFC 9113
    8.1.1: a stream error), and `ex` is then not to be used."""
    seen = 0
    regular = False
    method = b""
    path = b""
    authority = b""
    host: bytes | None = None
    cookies: list[bytes] = []
    headers: list[tuple[str, str]] = []
    lnames: list[str] = []
    lower: dict[str, str] = {}
    for name, value in fields:
        if value:
            if 0 in value or 0x0A in value or 0x0D in value:
                return f"a NUL, CR or LF in the value of {name!r}"
            first = value[0]
            last = value[-1]
            if first == 0x20 or first == 0x09 or last == 0x20 or last == 0x09:
                return f"white space around the value of {name!r}"
        if not name:
            return "an empty field name"
        if name[0] == 0x3A:  # ":"
            bit = _PSEUDO.get(name, 0)
            if not bit:
                return f"the pseudo-header field {name!r}, which a request may not have"
            if regular:
                return f"the pseudo-header field {name!r} after a regular field"
            if seen & bit:
                return f"a second {name!r}"
            seen |= bit
            if bit == _METHOD:
                method = value
            elif bit == _PATH:
                path = value
            elif bit == _AUTHORITY:
                authority = value
            continue
        regular = True
        if name.translate(None, _NAME_BYTES):
            return f"the field name {name!r}, which is not lower-case token characters"
        if name in _CONNECTION_SPECIFIC:
            return f"the connection-specific field {name!r}"
        if name == b"cookie":
            cookies.append(value)  # HTTP/2 may split cookies; HTTP/1.1 wants one field
            continue
        if name == b"te":
            if value.lower() != b"trailers":
                return "a TE field other than \"trailers\""
        elif name == b"host":
            if host is not None:
                return "a second Host field"
            host = value
        elif name == b"content-length":
            if value.isdigit():
                ex.content_length = int(value)
        elif name == b"expect":
            ex.expect_continue = value.lower() == b"100-continue"
        lname = name.decode("latin-1")
        text = value.decode("latin-1")
        headers.append((lname, text))
        lnames.append(lname)
        lower[lname] = f"{lower[lname]},{text}" if lname in lower else text
    problem = _pseudo_problem(seen, method, path)
    if problem:
        return problem
    if host is None:
        if not seen & _AUTHORITY:
            return "neither :authority nor Host"
        text = authority.decode("latin-1")
        headers.insert(0, ("host", text))
        lnames.insert(0, "host")
        lower["host"] = text
    elif seen & _AUTHORITY and host != authority:
        return "a Host field that differs from :authority"
    if cookies:
        text = b"; ".join(cookies).decode("latin-1")
        headers.append(("cookie", text))
        lnames.append("cookie")
        lower["cookie"] = text
    ex.method = method.decode("latin-1")
    ex.target = path
    ex.headers = headers
    ex.lnames = lnames
    ex.lower = lower
    ex.version = "2"
    ex.keep_alive = True
    if not ended and ex.content_length is None:
        ex.chunked = True  # a body of unknown length: sent upstream with chunked encoding
    ex.body_done = ended
    return ""


def _pseudo_problem(seen: int, method: bytes, path: bytes) -> str:
    """What the request's pseudo-header fields lack or should not have (RFC 9113 8.3.1 and 8.5, RFC 8441 4)."""
    if not seen & _METHOD:
        return "no :method"
    if method == b"CONNECT" and not seen & _PROTOCOL:
        if seen & (_SCHEME | _PATH):
            return "a CONNECT request with :scheme or :path"
        return ""
    if seen & _PROTOCOL and method != b"CONNECT":
        return ":protocol in a request other than CONNECT"
    if not seen & _SCHEME:
        return "no :scheme"
    if not seen & _PATH:
        return "no :path"
    if not path.startswith(b"/") and not (path == b"*" and method == b"OPTIONS"):
        return "a :path that is neither an absolute path nor \"*\" for OPTIONS"
    return ""
