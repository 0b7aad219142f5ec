"""Layer 2 announcement: answer ARP and IPv6 neighbour solicitations for the addresses this node announces,
from the interfaces chosen for them, and tell the segment when this node takes an address over.

Nothing is added to an interface. An announced address gets a `local` route (`ip route show table local proto
116`), so that the sockets bound to it (IP_FREEBIND) receive its packets; ARP requests are answered by this
module from an AF_PACKET socket per interface, neighbour solicitations from a raw ICMPv6 socket per interface
that has joined the address's solicited-node group. The kernel is kept from answering ARP for the routes
itself (`arp_ignore=1`, `arp_announce=2`, as kube-proxy's strict ARP does). A crash leaves at most the local
routes, which the next start removes; a clean stop removes them at once.

On takeover the node sends gratuitous ARP (request and reply forms) and unsolicited neighbour advertisements
several times, more than Linux's 1 s lock time apart, and then again every `refresh` seconds while it holds
the address, so switches and hosts that forgot do not have to wait for a failover (MetalLB issues 1761, 2910).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tidegate.l2")

ROUTE_PROTO = 116  # marks tidegate's routes: `ip route show table local proto 116`
LOCAL_TABLE = 255
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
BROADCAST = b"\xff" * 6
ICMP6_NS, ICMP6_NA = 135, 136
ICMP6_FILTER = 1  # <netinet/icmp6.h>, level IPPROTO_ICMPV6
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
ALL_NODES = "ff02::1"


def solicited_node(address: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | (int(address) & 0xFFFFFF))


# -- packets (pure: tested without sockets) ------------------------------------------------------------------
def parse_arp_request(frame: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(sender MAC, sender IPv4, target IPv4) of an Ethernet ARP request for IPv4; None for anything else."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if (htype, ptype, hlen, plen, op) != (1, ETH_P_IP, 6, 4, 1):
        return None
    return frame[22:28], frame[28:32], frame[38:42]


def arp_frame(op: int, src_mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes,
              eth_dst: bytes) -> bytes:
    return (eth_dst + src_mac + b"\x08\x06" + struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op)
            + src_mac + sender_ip + target_mac + target_ip)


def arp_reply(mac: bytes, request: tuple[bytes, bytes, bytes]) -> bytes:
    sender_mac, sender_ip, target_ip = request
    return arp_frame(2, mac, target_ip, sender_mac, sender_ip, sender_mac)


def gratuitous_arp(mac: bytes, address: bytes) -> list[bytes]:
    """Both forms hosts accept: a broadcast request and a broadcast reply, sender and target the address."""
    return [arp_frame(1, mac, address, b"\x00" * 6, address, BROADCAST),
            arp_frame(2, mac, address, BROADCAST, address, BROADCAST)]


def parse_neighbour_solicitation(packet: bytes) -> bytes | None:
    """The target address of an ICMPv6 neighbour solicitation (code 0); None for anything else."""
    if len(packet) < 24 or packet[0] != ICMP6_NS or packet[1] != 0:
        return None
    return packet[8:24]


def neighbour_advertisement(mac: bytes, target: bytes, solicited: bool) -> bytes:
    """An NA with the override flag (and solicited when answering), and the target link-layer address option.
    The kernel fills in the checksum of raw ICMPv6 sockets."""
    flags = 0x20000000 | (0x40000000 if solicited else 0)
    return struct.pack("!BBHI", ICMP6_NA, 0, 0, flags) + target + bytes([2, 1]) + mac


# -- the speaker -------------------------------------------------------------------------------------------
@dataclass
class Interface:
    name: str
    index: int
    mac: bytes
    up: bool
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)


@dataclass
class Held:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    interfaces: tuple[str, ...]
    since: float  # time.time() of the takeover
    gratuitous: int = 0


@dataclass
class L2Counts:
    gratuitous: int = 0  # gratuitous ARP / unsolicited NA packets sent
    replies: int = 0  # ARP replies and solicited NAs sent
    takeovers: int = 0


class L2Speaker:
    def __init__(self, refresh: float = 10.0, takeover_repeats: int = 3, takeover_gap: float = 1.1,
                 set_sysctls: bool = True, on_problem: Callable[[str], None] | None = None):
        self.refresh = refresh
        self.takeover_repeats = takeover_repeats
        self.takeover_gap = takeover_gap
        self.set_sysctls = set_sysctls
        self.on_problem = on_problem or (lambda message: log.warning("%s", message))
        self.held: dict[str, Held] = {}
        self.counts = L2Counts()
        self._interfaces: dict[str, Interface] = {}
        self._arp: dict[str, socket.socket] = {}  # interface -> AF_PACKET socket
        self._ndp: dict[str, socket.socket] = {}  # interface -> raw ICMPv6 socket
        self._groups: dict[str, set[bytes]] = {}  # interface -> solicited-node groups joined
        self._answer_v4: dict[str, dict[bytes, str]] = {}  # interface -> packed IPv4 -> address
        self._answer_v6: dict[str, dict[bytes, str]] = {}
        self._timers: list[asyncio.TimerHandle] = []
        self._refresher: asyncio.Task[None] | None = None
        self._lo_index = 1
        self._problems: set[str] = set()
        self.quiet = False  # quiesced: a clean stop is under way

    # -- life ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        # pyroute2's sync API in a thread: its asyncio one opens netlink sockets that uvloop cannot take.
        stale = await asyncio.to_thread(self._remove_stale_routes)
        if stale:
            log.info("removed %d local route(s) a previous run left behind: %s", len(stale), ", ".join(stale))
        if self.set_sysctls:
            for name, value in (("arp_ignore", "1"), ("arp_announce", "2")):
                try:
                    path = f"/proc/sys/net/ipv4/conf/all/{name}"
                    with open(path) as f:
                        if int(f.read().strip() or 0) >= int(value):
                            continue
                    with open(path, "w") as f:
                        f.write(value)
                    log.info("set net.ipv4.conf.all.%s=%s: the kernel must not answer ARP for announced "
                             "addresses itself", name, value)
                except OSError as exc:
                    self.on_problem(f"cannot set net.ipv4.conf.all.{name}={value}: {exc}")
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    def quiesce(self) -> None:
        """Stop answering and announcing (another node takes over), keeping the routes for the connections
        still open."""
        self._answer_v4, self._answer_v6 = {}, {}
        for timer in self._timers:
            timer.cancel()
        if self._refresher is not None:
            self._refresher.cancel()
        loop = asyncio.get_running_loop()
        for sockets in (self._arp, self._ndp):
            for sock in sockets.values():
                loop.remove_reader(sock.fileno())
                sock.close()
            sockets.clear()
        self._groups.clear()
        self.quiet = True

    async def close(self) -> None:
        """Stop announcing: routes removed, sockets closed (the next owner's gratuitous packets take over)."""
        await self.apply({})
        if self._refresher is not None:
            self._refresher.cancel()
        for timer in self._timers:
            timer.cancel()

    # -- what to announce ----------------------------------------------------------------------------------
    async def apply(self, wanted: dict[str, tuple[str, ...]], reannounce: bool = False) -> None:
        """Announce exactly these addresses (address -> interface names; () = the interfaces whose subnet
        holds the address). `reannounce`: send the takeover burst for the addresses held already, too."""
        if wanted:
            self._interfaces = await asyncio.to_thread(self._read_interfaces)
        resolved = {a: self._resolve(a, names) for a, names in wanted.items()}
        resolved = {a: names for a, names in resolved.items() if names}
        gone = [a for a in self.held if a not in resolved]
        new = [a for a in resolved if a not in self.held]
        for address in gone:
            del self.held[address]
        failed = await asyncio.to_thread(self._set_routes, new, gone)
        for address in gone:
            log.info("stopped announcing %s", address)
        now = time.time()
        for address in new:
            if address in failed:
                self.on_problem(f"cannot add a local route for {address}: {failed[address]}")
                continue
            self.held[address] = Held(ipaddress.ip_address(address), resolved[address], now)
        for address, names in resolved.items():
            if address in self.held:
                self.held[address].interfaces = names
        self._rebuild_answers()
        for address in new:
            if address in self.held:
                self.counts.takeovers += 1
                log.info("announcing %s from %s", address, ", ".join(self.held[address].interfaces))
                self._takeover(address)
        if reannounce:
            for address in self.held:
                if address not in new:
                    self._takeover(address)

    # -- netlink (in a thread) -----------------------------------------------------------------------------
    def _remove_stale_routes(self) -> list[str]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            self._lo_index = ipr.link_lookup(ifname="lo")[0]
            # Not metric 1: those are BGP's local routes (announce/bgp.py)
            stale = [(r.get("dst"), r["family"]) for r in ipr.get_routes(table=LOCAL_TABLE)
                     if r["proto"] == ROUTE_PROTO and r.get_attr("RTA_PRIORITY") != 1]
            for address, family in stale:
                self._route(ipr, "del", address, family)
        return [address for address, _ in stale]

    def _set_routes(self, add: list[str], remove: list[str]) -> dict[str, str]:
        """Local routes added and removed; the failures, by address."""
        from pyroute2 import IPRoute

        failed = {}
        with IPRoute() as ipr:
            for address in remove:
                try:
                    self._route(ipr, "del", address, 10 if ":" in address else 2)
                except Exception as exc:  # noqa: BLE001 (gone already: nothing to do)
                    log.debug("removing the route of %s: %s", address, exc)
            for address in add:
                try:
                    self._route(ipr, "replace", address, 10 if ":" in address else 2)
                except Exception as exc:  # noqa: BLE001 (netlink errors have several types)
                    failed[address] = str(exc)
        return failed

    def _route(self, ipr: Any, op: str, address: str, family: int) -> None:
        length = 128 if family == 10 else 32
        ipr.route(op, dst=f"{address}/{length}", type="local", table=LOCAL_TABLE, oif=self._lo_index,
                  proto=ROUTE_PROTO, family=family, **({} if family == 10 else {"scope": "host"}))

    def _read_interfaces(self) -> dict[str, Interface]:
        from pyroute2 import IPRoute

        out: dict[int, Interface] = {}
        with IPRoute() as ipr:
            for link in ipr.get_links():
                mac = bytes.fromhex((link.get("address") or "").replace(":", ""))
                out[link["index"]] = Interface(link.get("ifname") or "", link["index"], mac, bool(link["flags"] & 1))
            for addr in ipr.get_addr():
                iface = out.get(addr["index"])
                if iface is not None and addr.get("address"):
                    iface.networks.append(ipaddress.ip_network(f"{addr.get('address')}/{addr['prefixlen']}",
                                                               strict=False))
        return {i.name: i for i in out.values()}

    def _resolve(self, address: str, names: tuple[str, ...]) -> tuple[str, ...]:
        parsed = ipaddress.ip_address(address)
        if names:
            usable = tuple(n for n in names if n in self._interfaces and self._interfaces[n].up)
            missing = [n for n in names if n not in usable]
            if missing:
                self._problem(f"{address}: interface(s) {', '.join(missing)} named by the L2Advertisement are not "
                              "on this node or not up")
            return usable
        inside = tuple(sorted(i.name for i in self._interfaces.values() if i.up and i.name != "lo"
                              and any(parsed in net for net in i.networks)))
        if inside:
            return inside
        fallback = tuple(sorted(i.name for i in self._interfaces.values() if i.up and i.name != "lo" and i.mac
                                and any(net.version == parsed.version for net in i.networks)))
        self._problem(f"{address}: no interface of this node has a subnet that holds it; announcing from every "
                      f"interface with an IPv{parsed.version} address ({', '.join(fallback) or 'none'}); name them "
                      "in L2Advertisement interfaces to choose")
        return fallback

    def _problem(self, message: str) -> None:
        if message not in self._problems:
            self._problems.add(message)
            self.on_problem(message)

    def problems(self) -> list[str]:
        """What kept or keeps an address from being announced as asked (each said once in the log)."""
        return sorted(self._problems)

    # -- sockets ---------------------------------------------------------------------------------------------
    def _rebuild_answers(self) -> None:
        if self.quiet:
            return
        v4: dict[str, dict[bytes, str]] = {}
        v6: dict[str, dict[bytes, str]] = {}
        for address, held in self.held.items():
            table = v4 if held.address.version == 4 else v6
            for name in held.interfaces:
                table.setdefault(name, {})[held.address.packed] = address
        self._answer_v4, self._answer_v6 = v4, v6
        loop = asyncio.get_running_loop()
        for name in list(self._arp):
            if name not in v4:
                loop.remove_reader(self._arp[name].fileno())
                self._arp.pop(name).close()
        for name in v4:
            if name not in self._arp:
                try:
                    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
                    sock.bind((name, ETH_P_ARP))
                    sock.setblocking(False)
                except OSError as exc:
                    self._problem(f"cannot answer ARP on {name}: {exc}")
                    continue
                self._arp[name] = sock
                loop.add_reader(sock.fileno(), self._arp_readable, name)
        for name in list(self._ndp):
            if name not in v6:
                loop.remove_reader(self._ndp[name].fileno())
                self._ndp.pop(name).close()
                self._groups.pop(name, None)
        for name, addresses in v6.items():
            sock = self._ndp.get(name)
            if sock is None:
                try:
                    sock = self._open_ndp(name)
                except OSError as exc:
                    self._problem(f"cannot answer neighbour solicitations on {name}: {exc}")
                    continue
                self._ndp[name] = sock
                self._groups[name] = set()
                loop.add_reader(sock.fileno(), self._ndp_readable, name)
            wanted_groups = {solicited_node(ipaddress.IPv6Address(a)).packed for a in addresses}
            index = self._interfaces[name].index
            for group in wanted_groups - self._groups[name]:
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group + struct.pack("@I", index))
                except OSError as exc:
                    self._problem(f"cannot join {ipaddress.IPv6Address(group)} on {name}: {exc}")
                    continue
                self._groups[name].add(group)
            for group in self._groups[name] - wanted_groups:
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_LEAVE_GROUP, group + struct.pack("@I", index))
                except OSError:
                    pass
                self._groups[name].discard(group)

    def _open_ndp(self, name: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, name.encode())
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            # Pass neighbour solicitations only (a set bit blocks a type).
            blocked = [0xFFFFFFFF] * 8
            blocked[ICMP6_NS >> 5] &= ~(1 << (ICMP6_NS & 31))
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("@8I", *blocked))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _arp_readable(self, name: str) -> None:
        sock = self._arp.get(name)
        if sock is None:
            return
        iface = self._interfaces.get(name)
        for _ in range(64):
            try:
                frame = sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            request = parse_arp_request(frame)
            if request is None or iface is None or request[2] not in self._answer_v4.get(name, {}):
                continue
            if request[0] == iface.mac:
                continue  # our own gratuitous request
            try:
                sock.send(arp_reply(iface.mac, request))
                self.counts.replies += 1
            except OSError as exc:
                self._problem(f"cannot send ARP replies on {name}: {exc}")

    def _ndp_readable(self, name: str) -> None:
        sock = self._ndp.get(name)
        if sock is None:
            return
        iface = self._interfaces.get(name)
        for _ in range(64):
            try:
                packet, source = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            target = parse_neighbour_solicitation(packet)
            if target is None or iface is None or target not in self._answer_v6.get(name, {}):
                continue
            unspecified = source[0].split("%")[0] == "::"
            destination = (ALL_NODES, 0, 0, iface.index) if unspecified else (source[0], 0, 0, iface.index)
            try:
                sock.sendto(neighbour_advertisement(iface.mac, target, not unspecified), destination)
                self.counts.replies += 1
            except OSError as exc:
                self._problem(f"cannot send neighbour advertisements on {name}: {exc}")

    # -- telling the segment -----------------------------------------------------------------------------------
    def _takeover(self, address: str) -> None:
        if self.quiet:
            return
        loop = asyncio.get_running_loop()
        self._announce(address)
        for i in range(1, self.takeover_repeats):
            self._timers.append(loop.call_later(i * self.takeover_gap, self._announce, address))
        self._timers = [t for t in self._timers if not t.cancelled() and t.when() > loop.time()]

    def _announce(self, address: str) -> None:
        held = self.held.get(address)
        if held is None:
            return
        for name in held.interfaces:
            iface = self._interfaces.get(name)
            if iface is None:
                continue
            try:
                if held.address.version == 4:
                    sock = self._arp.get(name)
                    if sock is None:
                        continue
                    for frame in gratuitous_arp(iface.mac, held.address.packed):
                        sock.send(frame)
                        self.counts.gratuitous += 1
                        held.gratuitous += 1
                else:
                    sock = self._ndp.get(name)
                    if sock is None:
                        continue
                    sock.sendto(neighbour_advertisement(iface.mac, held.address.packed, False),
                                (ALL_NODES, 0, 0, iface.index))
                    self.counts.gratuitous += 1
                    held.gratuitous += 1
            except OSError as exc:
                self._problem(f"cannot announce {address} on {name}: {exc}")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            for address in list(self.held):
                self._announce(address)

    def status(self) -> dict[str, dict[str, Any]]:
        return {a: {"interfaces": list(h.interfaces), "since": h.since, "gratuitous": h.gratuitous}
                for a, h in sorted(self.held.items())}
