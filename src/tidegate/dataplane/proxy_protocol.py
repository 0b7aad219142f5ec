"""The PROXY protocol header (HAProxy's spec, versions 1 and 2) that a relay sends first to a pod that asked
for it, so that the pod learns the client's address and the address the client reached.

Pure: addresses in, bytes out. Only the TCP forms are built (UDP pods rarely read version 2's DGRAM form).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NoReturn

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSIONS = ("v1", "v2")


def _plain(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    parsed = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def header(version: str, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The header for a TCP connection from `source` (the client) to `destination` (the address it reached)."""
    src, dst = _plain(source[0]), _plain(destination[0])
    if version == "v1":
        if src.version != dst.version:
            return b"PROXY UNKNOWN\r\n"
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode()
    if version != "v2":
        raise ValueError(f"PROXY protocol version {version!r}: use v1 or v2")
    if src.version != dst.version:  # LOCAL command, no addresses: the pod uses the connection's own
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    family = 0x11 if src.version == 4 else 0x21  # TCP over IPv4 / IPv6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


V1_MAX = 107  # the longest version 1 header, CRLF included
V2_MAX = 16 + 65535


class BadHeader(ValueError):
    pass


def parse(data: bytes) -> tuple[int, str] | None:
    """A PROXY header at the start of `data` (from a trusted peer): (its length, the client's address; "" for
    LOCAL / UNKNOWN, where the peer speaks for itself), or None when more bytes are needed. Raises BadHeader
    when the bytes are no PROXY header."""
    if data[:1] == b"P":
        if len(data) < 6:
            return None if b"PROXY "[:len(data)] == data else _bad("not a PROXY header")
        if not data.startswith(b"PROXY "):
            _bad("not a PROXY header")
        end = data.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            return None if len(data) < V1_MAX else _bad("a version 1 header longer than 107 bytes")
        parts = data[:end].decode("ascii", "replace").split(" ")
        if parts[1] == "UNKNOWN":
            return end + 2, ""
        if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
            _bad(f"version 1 header {data[:end]!r}")
        try:
            source = ipaddress.ip_address(parts[2])
        except ValueError:
            _bad(f"version 1 source {parts[2]!r}")
        if (source.version == 4) != (parts[1] == "TCP4"):
            _bad(f"version 1 source {parts[2]!r} is not {parts[1]}")
        return end + 2, str(source)
    if len(data) < 16:
        return None if V2_SIGNATURE[:len(data)] == data[:12] else _bad("not a PROXY header")
    if data[:12] != V2_SIGNATURE:
        _bad("not a PROXY header")
    version_command, family, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if version_command >> 4 != 2:
        _bad(f"version 2 header of version {version_command >> 4}")
    if len(data) < 16 + length:
        return None
    command = version_command & 0xF
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return 16 + length, ""
    if command != 1:
        _bad(f"version 2 command {command}")
    body = data[16:16 + length]
    if family >> 4 == 1 and length >= 12:
        return 16 + length, str(ipaddress.IPv4Address(body[:4]))
    if family >> 4 == 2 and length >= 36:
        return 16 + length, str(ipaddress.IPv6Address(body[:16]))
    if family >> 4 == 0:  # UNSPEC
        return 16 + length, ""
    _bad(f"version 2 address family {family >> 4} (length {length})")
    return None


def _bad(why: str) -> NoReturn:
    raise BadHeader(why)
