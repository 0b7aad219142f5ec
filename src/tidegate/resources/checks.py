"""Checks that a schema cannot express, made when an object is loaded (MetalLB's admission webhook makes the
same ones): an object that fails them is refused like a schema error, so a source keeps its last good version.

One object at a time; checks across objects (overlapping pools, say) belong to the translator.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, order=True)
class AddressRange:
    """An inclusive range of addresses of one family, from a CIDR or a `start-end` entry."""

    version: int  # 4 | 6
    first: int
    last: int
    text: str = ""  # as written

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, address: IPAddress) -> bool:
        return address.version == self.version and self.first <= int(address) <= self.last

    def overlaps(self, other: AddressRange) -> bool:
        return self.version == other.version and self.first <= other.last and other.first <= self.last

    def address(self, value: int) -> IPAddress:
        return ipaddress.IPv4Address(value) if self.version == 4 else ipaddress.IPv6Address(value)


def parse_range(text: str) -> AddressRange:
    """`192.0.2.0/24`, `192.0.2.10-192.0.2.20` (spaces allowed around the dash), IPv6 alike; ValueError says
    what is wrong."""
    text = text.strip()
    if "/" in text:
        try:
            network = ipaddress.ip_network(text, strict=False)  # host bits are allowed, as MetalLB allows them
        except ValueError:
            raise ValueError(f"invalid CIDR {text!r}") from None
        return AddressRange(network.version, int(network.network_address), int(network.broadcast_address), text)
    start_text, dash, end_text = text.partition("-")
    if not dash:
        raise ValueError(f"invalid address range {text!r}: neither a CIDR nor START-END")
    try:
        start = ipaddress.ip_address(start_text.strip())
    except ValueError:
        raise ValueError(f"invalid address range {text!r}: invalid start address {start_text.strip()!r}") from None
    try:
        end = ipaddress.ip_address(end_text.strip())
    except ValueError:
        raise ValueError(f"invalid address range {text!r}: invalid end address {end_text.strip()!r}") from None
    if start.version != end.version:
        raise ValueError(f"invalid address range {text!r}: start and end are of different IP families")
    if int(start) > int(end):
        raise ValueError(f"invalid address range {text!r}: the start address is after the end address")
    return AddressRange(start.version, int(start), int(end), text)


def _ipaddresspool(obj: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    ranges: list[tuple[int, AddressRange]] = []
    for i, text in enumerate((obj.get("spec") or {}).get("addresses") or []):
        try:
            parsed = parse_range(text)
        except ValueError as exc:
            problems.append((f"spec.addresses[{i}]", str(exc)))
            continue
        for j, earlier in ranges:
            if parsed.overlaps(earlier):
                problems.append((f"spec.addresses[{i}]", f"{text!r} overlaps {earlier.text!r} (spec.addresses[{j}])"))
        ranges.append((i, parsed))
    if not problems and not ranges:
        problems.append(("spec.addresses", "a pool needs at least one CIDR or address range"))
    allocation = (obj.get("spec") or {}).get("serviceAllocation") or {}
    namespaces = allocation.get("namespaces") or []
    if len(set(namespaces)) != len(namespaces):
        problems.append(("spec.serviceAllocation.namespaces", "a namespace is listed twice"))
    return problems


CHECKS: dict[str, Callable[[dict[str, Any]], list[tuple[str, str]]]] = {
    "IPAddressPool": _ipaddresspool,
}


def check(kind: str, obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, message) for each problem of a schema-valid object."""
    checker = CHECKS.get(kind)
    return checker(obj) if checker else []
