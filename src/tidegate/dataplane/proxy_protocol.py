"""The PROXY protocol header (HAProxy's spec, versions 1 and 2) that a relay sends first to a pod that asked
for it, so that the pod learns the client's address and the address the client reached.

Pure: addresses in, bytes out. Only the TCP forms are built (UDP pods rarely read version 2's DGRAM form).
"""

from __future__ import annotations

import ipaddress
import struct

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
