"""What one node says over BGP: a pure function of the objects, MetalLB's way.

`plan_bgp(index, node, services, nodes)` reads MetalLB's BGPPeer (v1beta2, or v1beta1), BGPAdvertisement and
Community objects and returns this node's sessions and, for each session, the routes to announce:

- a BGPPeer is a session from every node its `nodeSelectors` select (all without them): `myASN`, `peerASN`,
  `peerAddress`, `peerPort`, `sourceAddress`, `routerID`, `holdTime`/`keepaliveTime` (one given: the other is
  derived, keepalive a third of hold; hold 0 or at least 3 s), `password` or `passwordSecret` (a
  `kubernetes.io/basic-auth` Secret in the peer's namespace), `ebgpMultiHop`, `enableGracefulRestart`;
- an address is announced as its own /32 (/128), or the prefix `aggregationLength(V6)` rolls it into, through
  each BGPAdvertisement that selects its pool (by name or selector; neither: every pool), its Service
  (`serviceSelectors`) and this node (`nodeSelectors`), to the advertisement's `peers` (all: every peer);
  `localPref` on iBGP sessions only; `communities`: `A:B`, `large:A:B:C`, or the name of an entry of a
  Community object;
- as MetalLB does: under `externalTrafficPolicy: Cluster` from every node while the Service has a ready pod
  anywhere; under `Local` only from nodes with a ready pod of their own; a node that is excluded
  (`node.kubernetes.io/exclude-from-external-load-balancers`) or whose network is unavailable announces none;
- **weights** (tidegate's): with `tidegate.io/weighting: endpoints` on the Service or the advertisement, under
  `Local`, each route carries the BGP Link Bandwidth extended community, 1 Mbit/s per ready pod on this node,
  which routers such as FRR turn into weighted ECMP (the brief's three pods on one node and one on another:
  3:1, a quarter of the traffic per pod), and the standard community `ASN:COUNT` for routers that can only
  filter on communities (ASN: `tidegate.io/weight-community`, else the session's own when it fits 16 bits).

An object that cannot be used is reported (`Problem`) and left out; the others are planned as usual.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tidegate.resources.model import Problem, Resource
from tidegate.resources.selectors import selector_matches

if TYPE_CHECKING:
    from tidegate.translate.index import Index

WEIGHTING = "tidegate.io/weighting"
WEIGHT_COMMUNITY = "tidegate.io/weight-community"
BYTES_PER_POD = 125_000  # the Link Bandwidth of one pod: 1 Mbit/s, in the community's bytes per second
DEFAULT_HOLD = 90
AS_TRANS = 23456  # RFC 6793: the 2-octet stand-in for a 4-octet AS number


@dataclass(frozen=True)
class BGPSession:
    name: str  # the BGPPeer, "namespace/name"
    peer_address: str
    peer_asn: int
    my_asn: int
    peer_port: int = 179
    source_address: str = ""
    router_id: str = ""
    hold_time: int = DEFAULT_HOLD
    keepalive_time: int = DEFAULT_HOLD // 3
    password: str = field(default="", repr=False)
    ebgp_multihop: bool = False
    graceful_restart: bool = False

    @property
    def ibgp(self) -> bool:
        return self.my_asn == self.peer_asn


@dataclass(frozen=True)
class BGPRoute:
    prefix: str  # "198.18.0.100/32"
    local_pref: int | None = None
    communities: tuple[str, ...] = ()  # "64512:1"
    large_communities: tuple[str, ...] = ()  # "64512:1:2"
    link_bandwidth: tuple[int, int] | None = None  # (2-octet AS, bytes per second)
    services: tuple[str, ...] = ()  # the Services it carries, "namespace/name"
    pods: int | None = None  # with weighting: the ready pods on this node behind it


@dataclass
class BGPPlan:
    sessions: list[BGPSession] = field(default_factory=list)
    routes: dict[str, tuple[BGPRoute, ...]] = field(default_factory=dict)  # session name -> routes
    addresses: tuple[str, ...] = ()  # the Services' addresses behind those routes (this node accepts them)


@dataclass(frozen=True)
class BGPService:
    """What the planner needs of a LoadBalancer Service with addresses (or of a Gateway with a pool address:
    namespace "", name "Gateway ns/name", its pods the ones that serve Gateways)."""

    namespace: str
    name: str
    pool: str
    addresses: tuple[str, ...]
    local: bool
    pods_by_node: tuple[tuple[str, int], ...] = ()  # ready pods per node
    ready: int = 0  # ready pods anywhere (with or without a node)
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: Any) -> float | None:
    """A Kubernetes duration ("90s", "1m30s", "2h"), in seconds; None when it is not one."""
    if not isinstance(text, str) or not text:
        return None
    found = _DURATION.match(text.strip())
    if found is None or not any(found.groups()):
        return None
    hours, minutes, seconds = found.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


def parse_community(text: str) -> tuple[str, str] | None:
    """("standard", "A:B") or ("large", "A:B:C"); None when `text` is neither (it may name a Community)."""
    parts = text.split(":")
    try:
        if len(parts) == 2 and all(0 <= int(p) <= 0xFFFF for p in parts):
            return "standard", f"{int(parts[0])}:{int(parts[1])}"
        if len(parts) == 4 and parts[0] == "large" and all(0 <= int(p) <= 0xFFFFFFFF for p in parts[1:]):
            return "large", ":".join(str(int(p)) for p in parts[1:])
    except ValueError:
        return None
    return None


def _aliases(index: Index) -> dict[str, str]:
    """Community objects' entries: name -> value."""
    out: dict[str, str] = {}
    for res in sorted(index.all("Community"), key=lambda r: (r.namespace, r.name)):
        for entry in res.spec.get("communities") or []:
            if isinstance(entry, dict) and entry.get("name") and entry.get("value"):
                out.setdefault(str(entry["name"]), str(entry["value"]))
    return out


def _session(peer: Resource, index: Index, problems: list[Problem]) -> BGPSession | None:
    spec = peer.spec
    name = f"{peer.namespace}/{peer.name}"

    def refuse(message: str) -> None:
        problems.append(Problem("error", peer.origin, f"BGPPeer {name}: {message}; no session", peer.key))

    for unsupported in ("dynamicASN", "interface", "vrf", "localASN"):
        if spec.get(unsupported):
            refuse(f"{unsupported} is not supported")
            return None
    if not spec.get("myASN") or not spec.get("peerASN") or not spec.get("peerAddress"):
        refuse("myASN, peerASN and peerAddress are needed")
        return None
    try:
        ipaddress.ip_address(str(spec["peerAddress"]))
    except ValueError:
        refuse(f"peerAddress {spec['peerAddress']!r} is not an IP address")
        return None
    hold, keepalive = parse_duration(spec.get("holdTime")), parse_duration(spec.get("keepaliveTime"))
    for field_name, value in (("holdTime", hold), ("keepaliveTime", keepalive)):
        if spec.get(field_name) is not None and value is None:
            refuse(f"{field_name} {spec[field_name]!r} is not a duration")
            return None
    if hold is None and keepalive is None:
        hold, keepalive = DEFAULT_HOLD, DEFAULT_HOLD / 3
    elif hold is None:
        hold = keepalive * 3  # type: ignore[operator]
    elif keepalive is None:
        keepalive = hold / 3
    assert hold is not None and keepalive is not None
    if 0 < int(hold) < 3:
        refuse(f"holdTime {spec.get('holdTime')!r}: must be 0 or at least 3s")
        return None
    if keepalive > hold:
        refuse(f"keepaliveTime {spec.get('keepaliveTime')!r} is longer than holdTime")
        return None
    password = str(spec.get("password") or "")
    secret_ref = spec.get("passwordSecret") or {}
    if secret_ref.get("name"):
        if password:
            refuse("password and passwordSecret are both set")
            return None
        secret = index.get("Secret", secret_ref.get("namespace") or peer.namespace, secret_ref["name"])
        raw = None
        if secret is not None:
            from tidegate.translate.backends import decode_secret_field

            raw = decode_secret_field(secret.obj, "password")
        if raw is None:
            refuse(f"passwordSecret {secret_ref['name']!r}: no such Secret with a `password` key")
            return None
        password = raw.decode(errors="replace")
    if spec.get("bfdProfile"):
        problems.append(Problem("warning", peer.origin, f"BGPPeer {name}: bfdProfile {spec['bfdProfile']!r} is "
                                "not used (no BFD): failures are found by the hold time", peer.key))
    return BGPSession(name=name, peer_address=str(ipaddress.ip_address(str(spec["peerAddress"]))),
                      peer_asn=int(spec["peerASN"]), my_asn=int(spec["myASN"]),
                      peer_port=int(spec.get("peerPort") or 179), source_address=str(spec.get("sourceAddress") or ""),
                      router_id=str(spec.get("routerID") or ""), hold_time=int(hold), keepalive_time=int(keepalive),
                      password=password, ebgp_multihop=bool(spec.get("ebgpMultiHop")),
                      graceful_restart=bool(spec.get("enableGracefulRestart")))


def _peers(index: Index) -> list[Resource]:
    return sorted(index.all("BGPPeer"), key=lambda r: (r.namespace, r.name))


def plan_bgp(index: Index, node: str, services: Iterable[BGPService], node_labels: dict[str, str],
             node_usable: bool, problems: list[Problem]) -> BGPPlan:
    """This node's sessions and routes (see the module's text); `problems` gets what cannot be used (every
    object is checked, with or without a node)."""
    plan = BGPPlan()
    peers = _peers(index)
    ads = sorted(index.all("BGPAdvertisement"), key=lambda r: (r.namespace, r.name))
    if not peers and not ads:
        return plan
    valid: dict[str, BGPSession] = {}  # by BGPPeer name
    by_name: dict[str, BGPSession] = {}  # this node's
    for peer in peers:
        session = _session(peer, index, problems)
        if session is None:
            continue
        valid[peer.name] = session
        selectors = peer.spec.get("nodeSelectors") or []
        if node and (not selectors or any(selector_matches(s, node_labels) for s in selectors)):
            plan.sessions.append(session)
            by_name[peer.name] = session
    aliases = _aliases(index)
    pools = {p.name: p for p in index.all("IPAddressPool")}
    usable_ads = [ad for ad in ads if _check_advertisement(ad, pools, aliases, valid, problems)]
    if not plan.sessions:
        return plan
    routes: dict[str, dict[str, BGPRoute]] = {s.name: {} for s in plan.sessions}
    announced: set[str] = set()
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        local_pods = dict(svc.pods_by_node).get(node, 0)
        if not node_usable or (svc.local and not local_pods) or (not svc.local and not svc.ready):
            continue
        pool = pools.get(svc.pool)
        labels = dict(svc.labels)
        for ad in usable_ads:
            spec = ad.spec
            if not _selects_pool(spec, pool):
                continue
            if spec.get("serviceSelectors") and not any(selector_matches(s, labels)
                                                        for s in spec["serviceSelectors"]):
                continue
            if spec.get("nodeSelectors") and not any(selector_matches(s, node_labels) for s in spec["nodeSelectors"]):
                continue
            weighted = "endpoints" in (dict(svc.annotations).get(WEIGHTING), ad.annotations.get(WEIGHTING))
            if weighted and not svc.local:
                problems.append(Problem("warning", ad.origin, f"{'Service ' if svc.namespace else ''}{svc.label}: "
                                        f"{WEIGHTING}: endpoints needs externalTrafficPolicy: Local (under Cluster "
                                        "each node spreads over every pod); no weights", ad.key))
                weighted = False
            targets = [by_name[p] for p in spec.get("peers") or [] if p in by_name] if spec.get("peers") \
                else plan.sessions
            for session in targets:
                for address in svc.addresses:
                    ip = ipaddress.ip_address(address)
                    if ip.version != ipaddress.ip_address(session.peer_address).version:
                        continue  # a session carries its own family
                    length = int(spec.get("aggregationLength", 32) if ip.version == 4
                                 else spec.get("aggregationLengthV6", 128))
                    prefix = str(ipaddress.ip_network(f"{address}/{length}", strict=False))
                    route = _route(prefix, spec, aliases, session, svc, weighted, local_pods,
                                   dict(svc.annotations).get(WEIGHT_COMMUNITY) or ad.annotations.get(WEIGHT_COMMUNITY))
                    have = routes[session.name].get(prefix)
                    routes[session.name][prefix] = route if have is None else _merge(have, route)
                    announced.add(address)
    plan.routes = {name: tuple(r for _, r in sorted(found.items(), key=lambda kv: _prefix_order(kv[0])))
                   for name, found in routes.items()}
    plan.addresses = tuple(sorted(announced, key=lambda a: _prefix_order(a)))
    return plan


def _prefix_order(prefix: str) -> tuple[int, int, int]:
    network = ipaddress.ip_network(prefix)
    return network.version, int(network.network_address), network.prefixlen


def _selects_pool(spec: dict, pool: Resource | None) -> bool:
    names, selectors = spec.get("ipAddressPools") or [], spec.get("ipAddressPoolSelectors") or []
    if not names and not selectors:
        return True
    return pool is not None and (pool.name in names or any(selector_matches(s, pool.labels) for s in selectors))


def _check_advertisement(ad: Resource, pools: dict[str, Resource], aliases: dict[str, str],
                         sessions: dict[str, BGPSession], problems: list[Problem]) -> bool:
    spec = ad.spec
    name = f"{ad.namespace}/{ad.name}"

    def refuse(message: str) -> bool:
        problems.append(Problem("error", ad.origin, f"BGPAdvertisement {name}: {message}; not announced", ad.key))
        return False

    v4, v6 = spec.get("aggregationLength", 32), spec.get("aggregationLengthV6", 128)
    if not (isinstance(v4, int) and 0 <= v4 <= 32) or not (isinstance(v6, int) and 0 <= v6 <= 128):
        return refuse("aggregationLength must be 0-32 and aggregationLengthV6 0-128")
    if spec.get("serviceSelectors") and (v4 != 32 or v6 != 128):
        return refuse("serviceSelectors and aggregationLength(V6) cannot both be set")
    for community in spec.get("communities") or []:
        if parse_community(str(community)) is None and parse_community(aliases.get(str(community), "")) is None:
            return refuse(f"community {community!r} is neither A:B, large:A:B:C, nor the name of a Community entry")
    for pool in pools.values():
        if not _selects_pool(spec, pool):
            continue
        for text in pool.spec.get("addresses") or []:
            shortest = _shortest_prefix(str(text))
            if shortest is None:
                continue
            version, length = shortest
            limit = v4 if version == 4 else v6
            if limit < length:
                return refuse(f"aggregation length {limit} is shorter than /{length} in IPAddressPool {pool.name} "
                              f"({text}): it would announce addresses outside the pool")
    unknown = [p for p in spec.get("peers") or [] if p not in sessions]
    if unknown:
        problems.append(Problem("warning", ad.origin, f"BGPAdvertisement {name}: peers {', '.join(unknown)}: no "
                                "such usable BGPPeer, nothing announced to them", ad.key))
    return True


def _shortest_prefix(text: str) -> tuple[int, int] | None:
    """The version and shortest prefix length of the CIDRs that make up a pool entry (a CIDR or a range)."""
    try:
        if "-" in text:
            first, last = (ipaddress.ip_address(part.strip()) for part in text.split("-", 1))
            networks = list(ipaddress.summarize_address_range(first, last))  # type: ignore[type-var]
        else:
            networks = [ipaddress.ip_network(text.strip(), strict=False)]
    except (ValueError, TypeError):
        return None
    return networks[0].version, min(n.prefixlen for n in networks)


def _route(prefix: str, spec: dict, aliases: dict[str, str], session: BGPSession, svc: BGPService,
           weighted: bool, local_pods: int, weight_asn: str | None) -> BGPRoute:
    standard: set[str] = set()
    large: set[str] = set()
    for text in spec.get("communities") or []:
        parsed = parse_community(str(text)) or parse_community(aliases.get(str(text), ""))
        if parsed is not None:
            (standard if parsed[0] == "standard" else large).add(parsed[1])
    bandwidth = None
    if weighted:
        asn16 = session.my_asn if session.my_asn <= 0xFFFF else AS_TRANS
        bandwidth = (asn16, local_pods * BYTES_PER_POD)
        tag = int(weight_asn) if weight_asn and weight_asn.isdigit() and int(weight_asn) <= 0xFFFF \
            else (session.my_asn if session.my_asn <= 0xFFFF else None)
        if tag is not None:
            standard.add(f"{tag}:{min(local_pods, 0xFFFF)}")
    local_pref = spec.get("localPref") if session.ibgp and spec.get("localPref") is not None else None
    return BGPRoute(prefix=prefix, local_pref=local_pref, communities=tuple(sorted(standard, key=_community_order)),
                    large_communities=tuple(sorted(large, key=_community_order)), link_bandwidth=bandwidth,
                    services=(svc.label,), pods=local_pods if weighted else None)


def _community_order(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(":"))


def _merge(a: BGPRoute, b: BGPRoute) -> BGPRoute:
    """Two Services or advertisements on one prefix: one route with everything both say. Pods (and the
    bandwidth) of different Services add up; one Service through two advertisements counts once."""
    new_service = bool(set(b.services) - set(a.services))

    def combine(x: int | None, y: int | None) -> int | None:
        if x is None or y is None:
            return y if x is None else x
        return x + y if new_service else max(x, y)

    bandwidth = a.link_bandwidth or b.link_bandwidth
    if bandwidth is not None:
        bandwidth = (bandwidth[0], combine(a.link_bandwidth[1] if a.link_bandwidth else None,
                                           b.link_bandwidth[1] if b.link_bandwidth else None) or 0)
    local_pref = a.local_pref if b.local_pref is None else b.local_pref if a.local_pref is None \
        else max(a.local_pref, b.local_pref)
    return replace(a, local_pref=local_pref,
                   communities=tuple(sorted(set(a.communities) | set(b.communities), key=_community_order)),
                   large_communities=tuple(sorted(set(a.large_communities) | set(b.large_communities),
                                                  key=_community_order)),
                   link_bandwidth=bandwidth, services=tuple(sorted(set(a.services) | set(b.services))),
                   pods=combine(a.pods, b.pods))
