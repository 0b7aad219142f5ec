"""Addresses for LoadBalancer Services from MetalLB's IPAddressPools, by MetalLB's rules: a pure function.

`allocate(index, options)` reads pools, Services and Namespaces and returns each Service's addresses (or why it
has none) and each pool's counts. The rules are MetalLB's (its controller and `internal/allocator`):

- an address a Service already holds (`status.loadBalancer.ingress`, or the last translation's answer) is kept
  while it is still valid: in a pool that the Service may use, in the pool it asks for, equal to the addresses
  it asks for, and not taken by a Service that cannot share it;
- a Service asks for addresses with `metallb.io/loadBalancerIPs` (comma separated) or `spec.loadBalancerIP`
  (not both), and for a pool with `metallb.io/address-pool` (the old `metallb.universe.tf/` prefix works too);
- otherwise the pools given to its namespace or matching its labels (`serviceAllocation`) are tried in
  `priority` order (1 first, unset last), then every `autoAssign` pool without `serviceAllocation`;
- within a pool, ranges in the order written, the first free address of each family; `avoidBuggyIPs` skips
  IPv4 addresses ending in .0 and .255;
- Services share an address when they carry the same `metallb.io/allow-shared-ip` key, use different ports,
  and, under `externalTrafficPolicy: Local`, select the same pods.

Where MetalLB leaves an order to chance (Go map order, the order events arrive), tidegate fixes one: pools by
creation time then name; Services keeping the addresses they hold first, then the Gateway addresses set aside
(`reserved`), then Services asking for given addresses, then the rest, each group by creation time then name.
Where MetalLB refuses its whole configuration (two pools overlap), tidegate refuses the later pool only and
says why, so that one wrong object does not take addresses away from the others.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tidegate.resources.checks import AddressRange, IPAddress, parse_range
from tidegate.resources.model import Key, Resource
from tidegate.resources.selectors import selector_matches

if TYPE_CHECKING:
    from tidegate.translate.index import Index

ANNOTATION_PREFIXES = ("metallb.io/", "metallb.universe.tf/")
SERVICE_KEY = tuple[str, str]


def annotation(service: Resource, name: str) -> str | None:
    """A MetalLB annotation under its current prefix, else its old one."""
    for prefix in ANNOTATION_PREFIXES:
        value = service.annotations.get(prefix + name)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class Pool:
    resource: Resource
    ranges: tuple[AddressRange, ...]
    auto_assign: bool
    avoid_buggy: bool
    priority: int  # 0: unset (tried after those that set one)
    has_allocation: bool  # serviceAllocation given: the pool serves only what it selects
    # From serviceAllocation.namespaces and namespaceSelectors; None: any namespace. (A pool whose selectors
    # match no namespace serves none; MetalLB would then let any namespace ask for it by name.)
    namespaces: frozenset[str] | None
    service_selectors: tuple[dict[str, Any], ...]

    @property
    def name(self) -> str:
        return self.resource.name

    def holds(self, address: IPAddress) -> bool:
        if self.avoid_buggy and _buggy(address):
            return False
        return any(r.contains(address) for r in self.ranges)

    def serves(self, service: Resource) -> bool:
        """MetalLB's isPoolCompatibleWithService."""
        if self.namespaces is not None and service.namespace not in self.namespaces:
            return False
        if self.service_selectors:
            return any(selector_matches(s, service.labels) for s in self.service_selectors)
        return True

    def capacity(self) -> tuple[int, int]:
        """(IPv4, IPv6) addresses the pool can give."""
        counts = {4: 0, 6: 0}
        for r in self.ranges:
            counts[r.version] += r.size - (_buggy_count(r) if self.avoid_buggy else 0)
        return counts[4], counts[6]


def _buggy(address: IPAddress) -> bool:
    return address.version == 4 and int(address) & 0xFF in (0, 255)


def _buggy_count(r: AddressRange) -> int:
    if r.version != 4:
        return 0
    first_block, last_block = r.first >> 8, r.last >> 8
    if first_block == last_block:
        return sum(1 for v in (first_block << 8, (first_block << 8) | 255) if r.first <= v <= r.last)
    count = 2 * max(0, last_block - first_block - 1)  # whole /24s in between
    count += (r.first & 0xFF == 0) + 1  # the first block's .255 is always inside; its .0 maybe
    count += 1 + (r.last & 0xFF == 255)  # the last block's .0 always; its .255 maybe
    return count


@dataclass(frozen=True)
class Refusal:
    reason: str  # NoPool | PoolExhausted | AddressNotInPool | SharingRefused | InvalidRequest | FamilyMismatch
    message: str


@dataclass(frozen=True)
class Assignment:
    pool: str
    addresses: tuple[str, ...]


@dataclass
class PoolUsage:
    key: Key | None = None  # the pool's object (a refused pool of the same name is another one)
    assigned_v4: int = 0
    assigned_v6: int = 0
    available_v4: int = 0
    available_v6: int = 0
    services: int = 0


@dataclass
class Allocation:
    """What the address manager decided for one snapshot."""

    assignments: dict[SERVICE_KEY, Assignment] = field(default_factory=dict)
    # Gateway addresses (spec.addresses) inside a pool: address -> pool, and those another user holds -> why.
    reserved: dict[str, str] = field(default_factory=dict)
    reserve_refused: dict[str, str] = field(default_factory=dict)
    refusals: dict[SERVICE_KEY, Refusal] = field(default_factory=dict)
    pools: dict[str, PoolUsage] = field(default_factory=dict)  # by pool name (accepted pools only)
    pool_problems: dict[Key, str] = field(default_factory=dict)  # pools refused as a whole, and why
    not_ours: list[Key] = field(default_factory=list)  # LoadBalancer Services left to another controller


@dataclass(frozen=True)
class AllocationOptions:
    lb_class: str = "tidegate.io/lb"  # spec.loadBalancerClass that is tidegate's
    classless: bool = False  # also take LoadBalancer Services without a class (MetalLB is gone)
    held: tuple[tuple[SERVICE_KEY, tuple[str, ...]], ...] = ()  # the last translation's answer, kept


def is_ours(service: Resource, options: AllocationOptions) -> bool:
    if service.spec.get("type") != "LoadBalancer":
        return False
    cls = service.spec.get("loadBalancerClass")
    return cls == options.lb_class if cls else options.classless


# -- pools ------------------------------------------------------------------------------------------------
def _order(resource: Resource) -> tuple[int, str, str, str]:
    stamp = resource.creation_timestamp
    return (0 if stamp else 1, stamp, resource.namespace, resource.name)


def read_pools(index: Index) -> tuple[list[Pool], list[Pool], dict[Key, str]]:
    """The usable pools, oldest first; the refused ones, and why."""
    accepted: list[Pool] = []
    refused: list[Pool] = []
    problems: dict[Key, str] = {}
    namespace_labels = {ns: index.namespace_labels(ns) for ns in _namespaces(index)}
    for res in sorted(index.all("IPAddressPool"), key=_order):
        spec = res.spec
        same_name = next((p for p in accepted if p.name == res.name), None)
        if same_name is not None:
            problems[res.key] = (f"another IPAddressPool is named {res.name!r} (in namespace "
                                 f"{same_name.resource.namespace}): Services name pools by name only")
        ranges = tuple(parse_range(text) for text in spec.get("addresses") or [])
        clash = next(((r, p, o) for r in ranges for p in accepted for o in p.ranges if r.overlaps(o)), None)
        if clash is not None and res.key not in problems:
            mine, other_pool, other = clash
            problems[res.key] = (f"{mine.text!r} overlaps {other.text!r} of IPAddressPool {other_pool.name} "
                                 "(older): this pool is not used until the overlap is removed")
        allocation = spec.get("serviceAllocation")
        namespaces: set[str] | None = None
        if allocation and (allocation.get("namespaces") or allocation.get("namespaceSelectors")):
            namespaces = set(allocation.get("namespaces") or [])
            for selector in allocation.get("namespaceSelectors") or []:
                namespaces.update(ns for ns, labels in namespace_labels.items() if selector_matches(selector, labels))
        (refused if res.key in problems else accepted).append(Pool(
            resource=res, ranges=ranges, auto_assign=spec.get("autoAssign", True) is not False,
            avoid_buggy=bool(spec.get("avoidBuggyIPs")), priority=int((allocation or {}).get("priority") or 0),
            has_allocation=allocation is not None,
            namespaces=frozenset(namespaces) if namespaces is not None else None,
            service_selectors=tuple(allocation.get("serviceSelectors") or []) if allocation else ()))
    return accepted, refused, problems


def _namespaces(index: Index) -> set[str]:
    """Every namespace a pool's namespaceSelectors may match: those declared, and those Services live in."""
    return {r.namespace for r in index.all("Service")} | {r.name for r in index.all("Namespace")}


# -- Services ---------------------------------------------------------------------------------------------
@dataclass
class _Request:
    service: Resource
    ports: tuple[tuple[str, int], ...]
    sharing: str
    backend: str
    pool: str
    wanted: tuple[IPAddress, ...] = ()
    families: tuple[int, ...] = ()  # (4,), (6,), (4, 6), (6, 4); () = one address, whichever family a pool has
    policy: str = "SingleStack"
    held: tuple[IPAddress, ...] = ()
    problem: Refusal | None = None

    @property
    def key(self) -> SERVICE_KEY:
        return (self.service.namespace, self.service.name)


def _request(service: Resource, held: Mapping[SERVICE_KEY, tuple[str, ...]]) -> _Request:
    spec = service.spec
    ports = tuple((p.get("protocol", "TCP"), int(p.get("port", 0))) for p in spec.get("ports") or [])
    backend = ""
    if spec.get("externalTrafficPolicy") == "Local":
        backend = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
    request = _Request(service, ports, annotation(service, "allow-shared-ip") or "", backend,
                       annotation(service, "address-pool") or "", policy=spec.get("ipFamilyPolicy") or "SingleStack")
    families = [_FAMILY.get(f) for f in spec.get("ipFamilies") or []]
    if not families:
        families = [_version(a) for a in spec.get("clusterIPs") or [spec.get("clusterIP")] if _version(a)]
    if request.policy in ("PreferDualStack", "RequireDualStack") and len(families) < 2:
        first = families[0] if families else 4
        families = [first, 10 - first]
    request.families = tuple(f for f in families if f)
    if request.policy == "RequireDualStack" and len(request.families) < 2:
        request.problem = Refusal("FamilyMismatch", "ipFamilyPolicy RequireDualStack needs both IP families")

    status_ips = [i.get("ip") for i in ((service.obj.get("status") or {}).get("loadBalancer") or {}).get("ingress")
                  or [] if isinstance(i, dict) and i.get("ip")]
    request.held = tuple(a for a in (_address(t) for t in status_ips or held.get(request.key, ())) if a)

    listed = annotation(service, "loadBalancerIPs")
    single = spec.get("loadBalancerIP")
    if listed and single:
        request.problem = Refusal("InvalidRequest", "both metallb.io/loadBalancerIPs and spec.loadBalancerIP are "
                                                    "set: use one")
    elif listed or single:
        texts = [t.strip() for t in (listed or single or "").split(",")]
        wanted = [_address(t) for t in texts]
        bad = [t for t, a in zip(texts, wanted) if a is None]
        if bad:
            what = "metallb.io/loadBalancerIPs" if listed else "spec.loadBalancerIP"
            request.problem = Refusal("InvalidRequest", f"{what}: {', '.join(map(repr, bad))} is not an IP address")
        elif len(wanted) > 2 or (len(wanted) == 2 and wanted[0].version == wanted[1].version):  # type: ignore[union-attr]
            request.problem = Refusal("InvalidRequest", "at most two addresses, one of each IP family, can be "
                                                        "requested")
        else:
            request.wanted = tuple(a for a in wanted if a is not None)
            families_wanted = {a.version for a in request.wanted}
            if request.families and families_wanted != set(request.families) and not (
                    request.policy == "PreferDualStack" and families_wanted <= set(request.families)):
                request.problem = Refusal("FamilyMismatch", f"the requested address(es) "
                                          f"{', '.join(map(str, request.wanted))} do not match the Service's IP "
                                          f"families ({', '.join(f'IPv{f}' for f in request.families)})")
    return request


_FAMILY = {"IPv4": 4, "IPv6": 6}


def _version(text: Any) -> int:
    address = _address(text) if isinstance(text, str) else None
    return address.version if address is not None else 0


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip())
    except (ValueError, AttributeError):
        return None


# -- the allocator ----------------------------------------------------------------------------------------
class _Ledger:
    """Who holds which address, with which sharing key and ports (MetalLB's allocator state)."""

    def __init__(self) -> None:
        self.keys: dict[IPAddress, tuple[str, str]] = {}  # address -> (sharing, backend)
        self.ports: dict[IPAddress, dict[tuple[str, int], SERVICE_KEY]] = {}
        self.users: dict[IPAddress, set[SERVICE_KEY]] = {}

    def conflict(self, request: _Request, address: IPAddress) -> str:
        """Why `request` cannot use `address` ("" when it can)."""
        users = self.users.get(address, set()) - {request.key}
        if not users:
            return ""
        sharing, backend = self.keys[address]
        others = ", ".join(_who(key) for key in sorted(users))
        if not sharing or not request.sharing:
            return f"{address} is used by {others}; sharing needs metallb.io/allow-shared-ip on both Services"
        if sharing != request.sharing:
            return f"{address} is used by {others} with sharing key {sharing!r}, not {request.sharing!r}"
        if backend != request.backend:
            return (f"{address} is used by {others} with externalTrafficPolicy: Local and other pods; Services "
                    "sharing an address under Local must select the same pods")
        for port in request.ports:
            holder = self.ports[address].get(port)
            if holder is not None and holder != request.key:
                return f"port {port[0]}/{port[1]} of {address} is already used by {_who(holder)}"
        return ""

    def take(self, request: _Request, addresses: Iterable[IPAddress]) -> None:
        for address in addresses:
            self.keys[address] = (request.sharing, request.backend)
            self.users.setdefault(address, set()).add(request.key)
            for port in request.ports:
                self.ports.setdefault(address, {})[port] = request.key


def _who(key: SERVICE_KEY) -> str:
    """A user of an address, for messages: a Service "ns/name", or a Gateway (namespace "", its label)."""
    return f"{key[0]}/{key[1]}" if key[0] else key[1]


def allocate(index: Index, options: AllocationOptions = AllocationOptions(),
             reserved: Mapping[str, str] | None = None) -> Allocation:
    """`reserved`: addresses Gateways ask for in spec.addresses -> "Gateway ns/name". Those inside a pool are
    kept from Services (after the addresses Services already hold)."""
    result = Allocation()
    pools, refused, result.pool_problems = read_pools(index)
    by_name = {p.name: p for p in pools}
    held = dict(options.held)
    requests = []
    for service in sorted(index.all("Service"), key=_order):
        if service.spec.get("type") != "LoadBalancer":
            continue
        if not is_ours(service, options):
            result.not_ours.append(service.key)
            continue
        requests.append(_request(service, held))
    ledger = _Ledger()
    # Services keep the addresses they hold first: no one takes an address another already had. Then Gateways'
    # addresses are set aside, then Services that ask for given addresses are served, before automatic
    # allocation can hand those out.
    fresh = []
    for request in [r for r in requests if r.held]:
        kept = _keep(request, pools, ledger) if request.problem is None else None
        if kept is None:
            fresh.append(request)
            continue
        ledger.take(request, [ipaddress.ip_address(a) for a in kept.addresses])
        result.assignments[request.key] = kept
    _reserve(reserved or {}, pools, ledger, result)
    fresh += [r for r in requests if not r.held and r.wanted] + [r for r in requests if not r.held and not r.wanted]
    for request in fresh:
        outcome = request.problem or _new(request, by_name, pools, refused, ledger)
        if isinstance(outcome, Refusal):
            result.refusals[request.key] = outcome
            continue
        ledger.take(request, [ipaddress.ip_address(a) for a in outcome.addresses])
        result.assignments[request.key] = outcome

    for pool in pools:
        usage = PoolUsage(pool.resource.key)
        used = {a for a in ledger.users if pool.holds(a)}
        usage.assigned_v4 = sum(1 for a in used if a.version == 4)
        usage.assigned_v6 = sum(1 for a in used if a.version == 6)
        cap4, cap6 = pool.capacity()
        usage.available_v4, usage.available_v6 = cap4 - usage.assigned_v4, cap6 - usage.assigned_v6
        usage.services = sum(1 for a in result.assignments.values() if a.pool == pool.name)
        result.pools[pool.name] = usage
    return result


def _reserve(reserved: Mapping[str, str], pools: list[Pool], ledger: _Ledger, result: Allocation) -> None:
    for text, owner in sorted(reserved.items()):
        address = _address(text)
        pool = _pool_of((address,), pools) if address is not None else None
        if pool is None or address is None:
            continue  # not a pool address: the Gateway binds it as it would anyway
        holders = ledger.users.get(address)
        if holders:
            result.reserve_refused[text] = (f"{text} of IPAddressPool {pool.name} is held by "
                                            f"{', '.join(_who(k) for k in sorted(holders))}")
            continue
        ledger.users[address] = {("", owner)}
        ledger.keys[address] = ("", "")  # not shared
        result.reserved[text] = pool.name


def _pool_of(addresses: tuple[IPAddress, ...], pools: list[Pool]) -> Pool | None:
    return next((p for p in pools if all(p.holds(a) for a in addresses)), None)


def _keep(request: _Request, pools: list[Pool], ledger: _Ledger) -> Assignment | None:
    """The held addresses, if they are still valid."""
    pool = _pool_of(request.held, pools)
    if pool is None or not pool.serves(request.service):
        return None
    if request.pool and pool.name != request.pool:
        return None
    if request.wanted and sorted(map(str, request.wanted)) != sorted(map(str, request.held)):
        return None
    held_families = {a.version for a in request.held}
    if request.families and not held_families <= set(request.families):
        return None
    if len(request.held) != len(held_families):
        return None
    if any(ledger.conflict(request, a) for a in request.held):
        return None
    return Assignment(pool.name, tuple(str(a) for a in request.held))


def _new(request: _Request, by_name: dict[str, Pool], pools: list[Pool], refused: list[Pool], ledger: _Ledger
         ) -> Assignment | Refusal:
    if request.wanted:
        pool = _pool_of(request.wanted, pools)
        if pool is None:
            wanted = ", ".join(map(str, request.wanted))
            in_refused = _pool_of(request.wanted, refused)
            if in_refused is not None:
                return Refusal("AddressNotInPool", f"{wanted}: in IPAddressPool {in_refused.resource.namespace}/"
                                                   f"{in_refused.name}, which is refused (see its problem)")
            return Refusal("AddressNotInPool", f"{wanted}: in no IPAddressPool"
                           + (" (avoidBuggyIPs excludes .0 and .255)" if any(_buggy(a) for a in request.wanted)
                              else ""))
        if not pool.serves(request.service):
            return Refusal("AddressNotInPool", f"IPAddressPool {pool.name} holds {', '.join(map(str, request.wanted))}"
                           " but its serviceAllocation does not give it to this Service")
        if request.pool and pool.name != request.pool:
            return Refusal("InvalidRequest", f"the requested address(es) are in IPAddressPool {pool.name}, not in "
                           f"{request.pool} (metallb.io/address-pool)")
        for address in request.wanted:
            why = ledger.conflict(request, address)
            if why:
                return Refusal("SharingRefused", why)
        return Assignment(pool.name, tuple(str(a) for a in request.wanted))
    if request.pool:
        pool = by_name.get(request.pool)
        if pool is None:
            return Refusal("NoPool", f"metallb.io/address-pool names {request.pool!r}: no such usable IPAddressPool")
        if not pool.serves(request.service):
            return Refusal("NoPool", f"IPAddressPool {pool.name}'s serviceAllocation does not give it to this Service")
        return _from_pools(request, [pool], ledger) or _exhausted(request, [pool], ledger)
    pinned = sorted((p for p in pools if p.has_allocation and p.auto_assign and p.serves(request.service)
                     and (p.namespaces is not None or p.service_selectors)),
                    key=lambda p: (p.priority == 0, p.priority))
    found = _from_pools(request, pinned, ledger)
    if found is not None:
        return found
    general = [p for p in pools if p.auto_assign and not p.has_allocation]
    found = _from_pools(request, general, ledger)
    if found is not None:
        return found
    if not pinned and not general:
        return Refusal("NoPool", "no IPAddressPool gives addresses to this Service automatically (autoAssign, "
                                 "serviceAllocation)")
    return _exhausted(request, pinned + general, ledger)


def _exhausted(request: _Request, tried: list[Pool], ledger: _Ledger) -> Refusal:
    families = " and ".join(f"IPv{f}" for f in request.families)
    names = ", ".join(p.name for p in tried)
    sharing = " (shared addresses need the same allow-shared-ip key and free ports)" if request.sharing else ""
    return Refusal("PoolExhausted", f"no free {families + ' ' if families else ''}address in IPAddressPool "
                                    f"{names}{sharing}")


def _from_pools(request: _Request, pools: list[Pool], ledger: _Ledger) -> Assignment | None:
    """MetalLB's findBestPoolForService: the first pool that gives every family asked for; under
    PreferDualStack, failing that, the first that gives the primary family, then the secondary one."""
    primary_only: Assignment | None = None
    secondary_only: Assignment | None = None
    for pool in pools:
        free = {version: _first_free(request, pool, version, ledger) for version in (4, 6)}
        if not request.families:
            address = next((free[r.version] for r in pool.ranges if free[r.version] is not None), None)
            if address is not None:
                return Assignment(pool.name, (str(address),))
            continue
        picked = [free[f] for f in request.families]
        if all(a is not None for a in picked):
            return Assignment(pool.name, tuple(str(a) for a in picked))
        if request.policy == "PreferDualStack" and len(request.families) == 2:
            if picked[0] is not None and primary_only is None:
                primary_only = Assignment(pool.name, (str(picked[0]),))
            if picked[1] is not None and secondary_only is None:
                secondary_only = Assignment(pool.name, (str(picked[1]),))
    return primary_only or secondary_only


def _first_free(request: _Request, pool: Pool, version: int, ledger: _Ledger) -> IPAddress | None:
    for r in pool.ranges:
        if r.version != version:
            continue
        value = r.first
        while value <= r.last:
            address = r.address(value)
            value += 1
            if pool.avoid_buggy and _buggy(address):
                continue
            if address in ledger.users and ledger.conflict(request, address):
                continue
            return address
    return None


INT64_MAX = 2**63 - 1


def pool_status(usage: PoolUsage) -> dict[str, int]:
    """IPAddressPool status, in MetalLB's fields (int64: an IPv6 /64 counts as the largest int64)."""
    return {"assignedIPv4": usage.assigned_v4, "assignedIPv6": usage.assigned_v6,
            "availableIPv4": min(usage.available_v4, INT64_MAX), "availableIPv6": min(usage.available_v6, INT64_MAX)}
