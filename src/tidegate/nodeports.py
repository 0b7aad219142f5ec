"""`tidegate nodeports check|allocate`: NodePorts without conflicts, across the Services of a set of files.

The brief: "Curating Node ports to prevent conflicts across the cluster can be challenging". Kubernetes
refuses a duplicate when a Service is created, one at a time; a set of manifests is only found wrong when it
is applied. `check` reads every document (any kind) and reports, with the objects involved:

- `Duplicate`: a port number used by two Services (any protocol: the API server allocates numbers, not
  number and protocol), or twice with one protocol in one Service; `healthCheckNodePort`s count too;
- `OutOfRange`: outside the node port range (`--range`, default 30000-32767);
- `DynamicBand`: a fixed port above the range's static band (KEP-3668, Kubernetes 1.29+: the lowest
  min(max(16, size/32), 128) ports are left to fixed choices; the rest is where the API server allocates, so a
  fixed port there may already be another Service's by the time it is applied);
- `HostPort`: a container's `hostPort` (Pods and the pod templates of Deployments, DaemonSets, StatefulSets,
  ReplicaSets, Jobs, CronJobs) on a node port, same protocol: whichever binds first wins on that node;
- `TidegateListener`: a port tidegate itself listens on (its Gateways, Ingresses, LoadBalancer addresses), for a
  tidegate on the host network;
- `SharedAddress`: Services on one address (`spec.externalIPs`, `spec.loadBalancerIP`,
  `metallb.io/loadBalancerIPs`) whose ports overlap.

`allocate` gives every port that needs a node port and has none (NodePort and LoadBalancer Services, unless
`allocateLoadBalancerNodePorts: false`; `healthCheckNodePort` under `externalTrafficPolicy: Local`) one from
the dynamic band, away from every port in use: the first free port from a place that a hash of the Service's
name and port chooses, so the answer is the same on every run and a new Service does not move the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_RANGE = (30000, 32767)
TEMPLATE_KINDS = ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "ReplicationController")


@dataclass(frozen=True)
class Finding:
    kind: str
    port: int
    protocol: str  # "" for a port number across protocols
    message: str
    objects: tuple[str, ...]


@dataclass(frozen=True)
class Use:
    owner: str  # "Service default/web", "Pod default/db", "Gateway default/gw" ...
    port: int
    protocol: str
    what: str  # "nodePort of port http", "healthCheckNodePort", "hostPort of container db" ...
    where: str = ""  # file:line


@dataclass
class Document:
    obj: dict[str, Any]
    where: str


@dataclass
class Allocation:
    patches: list[dict[str, Any]] = field(default_factory=list)  # one merge patch per Service changed
    given: list[Use] = field(default_factory=list)
    full: list[str] = field(default_factory=list)  # what found no free port


def parse_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"--range {text!r}: expected LOW-HIGH, e.g. 30000-32767")
    first, last = int(low), int(high)
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"--range {text!r}: ports 1-65535, the first not above the last")
    return first, last


def static_band(port_range: tuple[int, int]) -> tuple[int, int]:
    """KEP-3668: the lowest ports of the range, kept for fixed choices."""
    size = port_range[1] - port_range[0] + 1
    band = min(max(16, size // 32), 128)
    return port_range[0], min(port_range[1], port_range[0] + band - 1)


def read_documents(paths: Iterable[str | Path]) -> tuple[list[Document], list[str]]:
    """Every YAML document of the files (any kind), and what could not be read."""
    from tidegate.resources.bounded_yaml import load_document, read_text
    from tidegate.resources.loader import expand_paths, split_documents

    docs, problems = [], []
    missing = [str(p) for p in paths if not Path(p).exists()]
    problems += [f"{p}: no such file or directory" for p in missing]
    for path in expand_paths(paths):
        try:
            text = read_text(path)
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        for line, chunk in split_documents(text):
            try:
                obj = load_document(chunk)
            except Exception as exc:  # noqa: BLE001 (YAML errors have many types)
                problems.append(f"{path}:{line}: {exc}")
                continue
            if isinstance(obj, dict) and obj.get("kind") == "List":
                docs += [Document(item, f"{path}:{line}") for item in obj.get("items") or [] if isinstance(item, dict)]
            elif isinstance(obj, dict) and obj.get("kind"):
                docs.append(Document(obj, f"{path}:{line}"))
    return docs, problems


def read_cluster(kubeconfig: str | None = None, context: str | None = None) -> tuple[list[Document], list[str]]:
    """The Services and the running Pods (their hostPorts) of a cluster, as documents, and what could not be
    read. Pods that have finished hold no port and are left out."""
    import asyncio

    return asyncio.run(_read_cluster(kubeconfig, context))


async def _read_cluster(kubeconfig: str | None, context: str | None) -> tuple[list[Document], list[str]]:
    from lightkube.resources.core_v1 import Pod, Service

    from tidegate.sources.kubernetes import connect, describe

    docs: list[Document] = []
    problems: list[str] = []
    client = connect(kubeconfig, context)
    try:
        for kind, resource in (("Service", Service), ("Pod", Pod)):
            try:
                async for item in client.list(resource, namespace="*"):
                    obj = item.to_dict()
                    if kind == "Pod" and (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                        continue
                    obj.update(apiVersion="v1", kind=kind)
                    docs.append(Document(obj, "cluster"))
            except Exception as exc:  # noqa: BLE001 (connection and API errors alike: said, not raised)
                problems.append(f"the cluster's {kind}s: {describe(exc)}")
    finally:
        await client.close()
    return docs, problems


def overlay(cluster: list[Document], files: list[Document], namespace: str = "default") -> list[Document]:
    """The cluster's objects with the files' in their place where both have one (the files are what is about
    to be applied), and the files' new objects."""
    def key(doc: Document) -> tuple[str, str, str]:
        meta = doc.obj.get("metadata") or {}
        return doc.obj.get("kind", ""), meta.get("namespace") or namespace, meta.get("name", "")

    replaced = {key(d) for d in files}
    return [d for d in cluster if key(d) not in replaced] + files


def _name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')} {meta.get('namespace') or 'default'}/{meta.get('name', '?')}"


def _services(docs: list[Document]) -> list[Document]:
    return sorted((d for d in docs if d.obj.get("kind") == "Service" and str(d.obj.get("apiVersion", "v1")) == "v1"),
                  key=lambda d: _name(d.obj))


def _port_label(port: dict[str, Any], index: int) -> str:
    return f"port {port.get('name') or port.get('port') or index}"


def node_port_uses(docs: list[Document]) -> list[Use]:
    uses = []
    for doc in _services(docs):
        spec = doc.obj.get("spec") or {}
        for index, port in enumerate(spec.get("ports") or []):
            if isinstance(port, dict) and isinstance(port.get("nodePort"), int):
                uses.append(Use(_name(doc.obj), port["nodePort"], port.get("protocol", "TCP"),
                                f"nodePort of {_port_label(port, index)}", doc.where))
        if isinstance(spec.get("healthCheckNodePort"), int):
            uses.append(Use(_name(doc.obj), spec["healthCheckNodePort"], "TCP", "healthCheckNodePort", doc.where))
    return uses


def host_port_uses(docs: list[Document]) -> list[Use]:
    uses = []
    for doc in docs:
        kind = doc.obj.get("kind")
        spec = doc.obj.get("spec") or {}
        if kind == "Pod":
            pod = spec
        elif kind in TEMPLATE_KINDS:
            pod = (spec.get("template") or {}).get("spec") or {}
        elif kind == "CronJob":
            pod = ((((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {})
        else:
            continue
        for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            for port in (container or {}).get("ports") or []:
                if isinstance(port, dict) and isinstance(port.get("hostPort"), int):
                    uses.append(Use(_name(doc.obj), port["hostPort"], port.get("protocol", "TCP"),
                                    f"hostPort of container {container.get('name', '?')}", doc.where))
    return uses


def _addresses(spec: dict[str, Any], meta: dict[str, Any]) -> set[str]:
    annotations = meta.get("annotations") or {}
    out = set(spec.get("externalIPs") or [])
    if spec.get("loadBalancerIP"):
        out.add(str(spec["loadBalancerIP"]))
    for prefix in ("metallb.io/", "metallb.universe.tf/"):
        out.update(a.strip() for a in str(annotations.get(prefix + "loadBalancerIPs", "")).split(",") if a.strip())
    return out


def check(docs: list[Document], port_range: tuple[int, int] = DEFAULT_RANGE,
          listeners: Iterable[Use] = ()) -> list[Finding]:
    findings: list[Finding] = []
    uses = node_port_uses(docs)
    low, high = port_range
    band = static_band(port_range)
    by_number: dict[int, list[Use]] = {}
    for use in uses:
        by_number.setdefault(use.port, []).append(use)
    for number, group in sorted(by_number.items()):
        owners = {u.owner for u in group}
        same_protocol_twice = any(sum(1 for v in group if v.owner == u.owner and v.protocol == u.protocol) > 1
                                  for u in group)
        if len(owners) > 1 or same_protocol_twice:
            findings.append(Finding("Duplicate", number, "", f"node port {number} is used by "
                                    + "; ".join(f"{u.owner} ({u.what}, {u.where})" for u in group),
                                    tuple(sorted(owners))))
    for use in uses:
        if not low <= use.port <= high:
            findings.append(Finding("OutOfRange", use.port, use.protocol, f"{use.owner}: {use.what} {use.port} is "
                                    f"outside the node port range {low}-{high} ({use.where})", (use.owner,)))
        elif use.port > band[1]:
            findings.append(Finding("DynamicBand", use.port, use.protocol, f"{use.owner}: {use.what} {use.port} is "
                                    f"fixed in the dynamic band ({band[1] + 1}-{high}), where the API server hands "
                                    f"out ports: another Service may hold it already; fixed ports belong in "
                                    f"{band[0]}-{band[1]} (KEP-3668) ({use.where})", (use.owner,)))
    for kind, others in (("HostPort", host_port_uses(docs)), ("TidegateListener", list(listeners))):
        for other in others:
            for use in by_number.get(other.port, []):
                if use.protocol == other.protocol:
                    findings.append(Finding(kind, use.port, use.protocol, f"{use.owner}: {use.what} {use.port}/"
                                            f"{use.protocol} is also the {other.what} of {other.owner}"
                                            + (f" ({other.where})" if other.where else ""), (use.owner, other.owner)))
    findings += _shared_addresses(docs)
    return findings


def _shared_addresses(docs: list[Document]) -> list[Finding]:
    found = []
    by_address: dict[str, list[Document]] = {}
    for doc in _services(docs):
        for address in _addresses(doc.obj.get("spec") or {}, doc.obj.get("metadata") or {}):
            by_address.setdefault(address, []).append(doc)
    for address, group in sorted(by_address.items()):
        taken: dict[tuple[int, str], str] = {}
        for doc in group:
            for port in (doc.obj.get("spec") or {}).get("ports") or []:
                if not isinstance(port, dict) or not isinstance(port.get("port"), int):
                    continue
                key = (port["port"], port.get("protocol", "TCP"))
                owner = _name(doc.obj)
                if key in taken and taken[key] != owner:
                    found.append(Finding("SharedAddress", key[0], key[1], f"{owner} and {taken[key]} both serve "
                                         f"{address} port {key[0]}/{key[1]}", (taken[key], owner)))
                taken.setdefault(key, owner)
    return found


def _needs_node_ports(spec: dict[str, Any]) -> bool:
    kind = spec.get("type", "ClusterIP")
    return kind == "NodePort" or (kind == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is not False)


def allocate(docs: list[Document], port_range: tuple[int, int] = DEFAULT_RANGE,
             listeners: Iterable[Use] = ()) -> Allocation:
    result = Allocation()
    band = static_band(port_range)
    dynamic = (band[1] + 1, port_range[1]) if band[1] < port_range[1] else port_range
    size = dynamic[1] - dynamic[0] + 1
    used = {u.port for u in node_port_uses(docs)} | {u.port for u in host_port_uses(docs)} \
        | {u.port for u in listeners}

    def pick(seed: str) -> int | None:
        start = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") % size
        for step in range(size):
            port = dynamic[0] + (start + step) % size
            if port not in used:
                used.add(port)
                return port
        return None

    for doc in _services(docs):
        spec = doc.obj.get("spec") or {}
        meta = doc.obj.get("metadata") or {}
        owner = _name(doc.obj)
        ports = [dict(p) for p in spec.get("ports") or [] if isinstance(p, dict)]
        changed = False
        if _needs_node_ports(spec):
            for index, port in enumerate(ports):
                if isinstance(port.get("nodePort"), int):
                    continue
                label = _port_label(port, index)
                given = pick(f"{owner}/{label}/{port.get('protocol', 'TCP')}")
                if given is None:
                    result.full.append(f"{owner} {label}")
                    continue
                port["nodePort"] = given
                result.given.append(Use(owner, given, port.get("protocol", "TCP"), f"nodePort of {label}",
                                        doc.where))
                changed = True
        patch_spec: dict[str, Any] = {}
        if spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local" \
                and not isinstance(spec.get("healthCheckNodePort"), int):
            given = pick(f"{owner}/healthCheckNodePort")
            if given is None:
                result.full.append(f"{owner} healthCheckNodePort")
            else:
                patch_spec["healthCheckNodePort"] = given
                result.given.append(Use(owner, given, "TCP", "healthCheckNodePort", doc.where))
        if changed:
            patch_spec["ports"] = ports
        if patch_spec:
            result.patches.append({"apiVersion": "v1", "kind": "Service",
                                   "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace") or
                                                "default"}, "spec": patch_spec})
    return result
