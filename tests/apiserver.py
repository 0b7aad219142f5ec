"""A Kubernetes API server stand-in that speaks the real HTTP API, for `tidegate run --kubernetes` tests.

kmock (the maintained mock) serves lists and watches, but without resourceVersions: its watches replay every
object from the start, never expire (410 Gone), send no bookmarks, and its updates have no optimistic
concurrency. The tests here need exactly those: a watch resumed at a resourceVersion, a 410 that forces a
re-list, Lease updates that conflict, and the status subresource. So this small server does just that:

- discovery (/api, /apis, /api/v1, /apis/G/V) for the kinds it is told about;
- list (with metadata.resourceVersion), get, create, replace (PUT, with the resourceVersion precondition:
  409 on a stale one), merge patch, delete, on namespaced and cluster-scoped paths, and `/status`;
- watch: `?watch=1&resourceVersion=N` streams events after N as JSON lines; an N older than the last
  compaction gets an ERROR event with code 410; `allowWatchBookmarks` adds BOOKMARK events;
  `timeoutSeconds` ends the stream.

Tests change objects directly (`put`, `delete`), cut every watch (`drop_watches`), hold new watches back
(`hold_watches`), compact history (`compact`) and read what clients wrote (`writes`). It runs on its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from tests.threaded import ThreadedServer


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


def _gw(kind: str, plural: str, version: str = "v1", namespaced: bool = True) -> Kind:
    return Kind("gateway.networking.k8s.io", version, kind, plural, namespaced)


KINDS = [
    _gw("GatewayClass", "gatewayclasses", namespaced=False), _gw("Gateway", "gateways"),
    _gw("HTTPRoute", "httproutes"), _gw("GRPCRoute", "grpcroutes"), _gw("ReferenceGrant", "referencegrants"),
    _gw("BackendTLSPolicy", "backendtlspolicies"), _gw("TLSRoute", "tlsroutes"),
    _gw("TCPRoute", "tcproutes", "v1alpha2"), _gw("UDPRoute", "udproutes", "v1alpha2"),
    Kind("tidegate.io", "v1alpha1", "BackendPolicy", "backendpolicies"),
    Kind("tidegate.io", "v1alpha1", "TrafficPolicy", "trafficpolicies"),
    Kind("tidegate.io", "v1alpha1", "ClientPolicy", "clientpolicies"),
    Kind("tidegate.io", "v1alpha1", "HTTPRouteFilter", "httproutefilters"),
    Kind("tidegate.io", "v1alpha1", "AcmeIssuer", "acmeissuers"),
    Kind("tidegate.io", "v1alpha1", "ClusterAcmeIssuer", "clusteracmeissuers", namespaced=False),
    Kind("", "v1", "Namespace", "namespaces", namespaced=False), Kind("", "v1", "Service", "services"),
    Kind("", "v1", "Secret", "secrets"), Kind("", "v1", "ConfigMap", "configmaps"),
    Kind("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    Kind("networking.k8s.io", "v1", "Ingress", "ingresses"),
    Kind("networking.k8s.io", "v1", "IngressClass", "ingressclasses", namespaced=False),
    Kind("coordination.k8s.io", "v1", "Lease", "leases"),
    Kind("", "v1", "Node", "nodes", namespaced=False), Kind("", "v1", "Pod", "pods"),
    Kind("", "v1", "Event", "events"),
    Kind("metallb.io", "v1beta1", "IPAddressPool", "ipaddresspools"),
    Kind("metallb.io", "v1beta1", "L2Advertisement", "l2advertisements"),
    Kind("metallb.io", "v1beta1", "BGPAdvertisement", "bgpadvertisements"),
    Kind("metallb.io", "v1beta2", "BGPPeer", "bgppeers"),
    Kind("metallb.io", "v1beta1", "Community", "communities"),
    Kind("metallb.io", "v1beta1", "BFDProfile", "bfdprofiles"),
]


@dataclass
class Write:
    """A write a client made: method, kind, namespace/name, whether to /status, and who (its bearer token)."""

    method: str
    kind: str
    namespace: str
    name: str
    status: bool
    agent: str
    body: dict


class FakeAPIServer(ThreadedServer):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, kinds: list[Kind] | None = None,
                 bookmark_interval: float = 0.5):
        super().__init__(host, port)
        self.kinds = {(k.group, k.version, k.plural): k for k in (kinds or KINDS)}
        self.by_kind = {k.kind: k for k in self.kinds.values()}
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name) → object
        self.rv = 100
        self.compacted = 0  # watches from a resourceVersion at or below this get 410 Gone
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, kind, event type, object)
        self.writes: list[Write] = []
        self.bookmark_interval = bookmark_interval
        self.watch_requests = 0
        self.list_requests: dict[str, int] = {}  # kind → lists served
        self.fail_next: dict[str, int] = {}  # kind → how many lists/watches to answer 500
        self.unavailable = False  # every request answered 503, as while the API server restarts
        self.conflict_next_status_writes = 0  # answer this many status writes 409 Conflict
        self._changed: asyncio.Condition | None = None  # made on the server's own loop
        self._watchers: set[asyncio.StreamWriter] = set()
        self.lock = threading.RLock()

    # -- the test's side ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def kubeconfig(self) -> str:
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "tester", "namespace": "default"}}],
        })

    def put(self, obj: dict) -> dict:
        """Create or replace an object as a user would (spec changes bump metadata.generation)."""
        return self.call(self._store, copy.deepcopy(obj), False)

    def put_yaml(self, text: str) -> None:
        import yaml

        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {})
                if self.by_kind[doc["kind"]].namespaced:
                    doc["metadata"].setdefault("namespace", "default")
                self.put(doc)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.call(self._remove, kind, namespace, name)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self.lock:
            obj = self.objects.get((kind, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def status_writes(self, kind: str | None = None, name: str | None = None) -> list[Write]:
        with self.lock:
            return [w for w in self.writes if w.status and (kind is None or w.kind == kind)
                    and (name is None or w.name == name)]

    def drop_watches(self) -> None:
        """Cut every watch stream mid-way, as a restarting API server or a load balancer would."""
        async def cut() -> None:
            for writer in list(self._watchers):
                writer.transport.abort()

        self.call(cut)

    def hold_watches(self, held: bool) -> None:
        """While held, new watch requests wait (lists still answer): changes made meanwhile are a gap."""
        async def gate() -> None:
            (self._watch_gate.clear if held else self._watch_gate.set)()

        self.call(gate)

    def compact(self) -> None:
        """Forget history: a watch resumed from any version seen so far gets 410 Gone."""
        async def squash() -> None:
            self.compacted = self.rv
            self.history.clear()

        self.call(squash)

    # -- storage -------------------------------------------------------------------------------------
    async def _store(self, obj: dict, status_only: bool) -> dict:
        kind = self.by_kind[obj["kind"]]
        meta = obj.setdefault("metadata", {})
        namespace = meta.get("namespace", "") if kind.namespaced else ""
        key = (kind.kind, namespace, meta["name"])
        with self.lock:
            old = self.objects.get(key)
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            meta.setdefault("uid", f"uid-{self.rv}")
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            if old is None:
                meta["generation"] = 1
                event = "ADDED"
            else:
                old_meta = old["metadata"]
                meta["uid"], meta["creationTimestamp"] = old_meta["uid"], old_meta["creationTimestamp"]
                if status_only:
                    obj = {**old, "status": obj.get("status"), "metadata": {**old_meta, "resourceVersion": str(self.rv)}}
                else:
                    spec_changed = {k: v for k, v in obj.items() if k not in ("metadata", "status")} != {
                        k: v for k, v in old.items() if k not in ("metadata", "status")}
                    meta["generation"] = old_meta.get("generation", 1) + (1 if spec_changed else 0)
                    if "status" not in obj and "status" in old:
                        obj["status"] = old["status"]
                event = "MODIFIED"
            obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
            self.objects[key] = obj
            self.history.append((self.rv, kind.kind, event, copy.deepcopy(obj)))
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()
        return obj

    async def _remove(self, kind: str, namespace: str, name: str) -> dict | None:
        with self.lock:
            obj = self.objects.pop((kind, namespace, name), None)
            if obj is None:
                return None
            self.rv += 1
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
            self.history.append((self.rv, kind, "DELETED", copy.deepcopy(obj)))
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()
        return obj

    # -- HTTP ----------------------------------------------------------------------------------------
    def _on_loop(self) -> None:
        self._changed = asyncio.Condition()
        self._watch_gate = asyncio.Event()
        self._watch_gate.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        body += chunk[:-2]
                keep = await self._dispatch(method, target, headers, body, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._clients.discard(writer)
            self._watchers.discard(writer)
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter, status: int, payload: dict) -> bool:
        body = json.dumps(payload).encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                     % (status, len(body), body))
        await writer.drain()
        return True

    def _error(self, code: int, reason: str, message: str) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                "reason": reason, "code": code}

    async def _dispatch(self, method: str, target: str, headers: dict, body: bytes,
                        writer: asyncio.StreamWriter) -> bool:
        if self.unavailable:
            return await self._respond(writer, 503, self._error(503, "ServiceUnavailable", "the API server is away"))
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        if method == "GET" and parts in (["api"], ["apis"]) or (method == "GET" and len(parts) in (2, 3)
                                                                 and parts[0] in ("api", "apis")
                                                                 and self._is_group_version(parts)):
            return await self._respond(writer, 200, self._discovery(parts))
        parsed = self._parse(parts)
        if parsed is None:
            return await self._respond(writer, 404, self._error(404, "NotFound", f"no such path {url.path}"))
        kind, namespace, name, subresource = parsed
        if method == "GET" and name is None:
            failures = self.fail_next.get(kind.kind, 0)
            if failures:
                self.fail_next[kind.kind] = failures - 1
                return await self._respond(writer, 500, self._error(500, "InternalError", "try again"))
            if query.get("watch") in ("1", "true"):
                await self._watch(kind, namespace, query, writer)
                return False
            self.list_requests[kind.kind] = self.list_requests.get(kind.kind, 0) + 1
            return await self._respond(writer, 200, self._list(kind, namespace))
        if method == "GET":
            obj = self.get(kind.kind, namespace or "", name)
            if obj is None:
                return await self._respond(writer, 404, self._error(404, "NotFound", f"{kind.plural} {name} not found"))
            return await self._respond(writer, 200, obj)
        agent = headers.get("authorization", "").removeprefix("Bearer ")
        data = json.loads(body or b"{}")
        if method in ("POST", "PUT", "PATCH"):
            with self.lock:
                self.writes.append(Write(method, kind.kind, namespace or "", name or data.get("metadata", {}).get(
                    "name", ""), subresource == "status", agent, data))
        if method == "POST":
            data.setdefault("metadata", {})
            if not data["metadata"].get("name") and data["metadata"].get("generateName"):
                with self.lock:
                    self.rv += 1
                    data["metadata"]["name"] = f"{data['metadata']['generateName']}{self.rv:x}"
            if kind.namespaced:
                data["metadata"]["namespace"] = namespace
            data["kind"] = kind.kind
            if self.get(kind.kind, namespace or "", data["metadata"].get("name", "")) is not None:
                return await self._respond(writer, 409, self._error(409, "AlreadyExists", "already exists"))
            return await self._respond(writer, 201, await self._store(data, False))
        current = self.get(kind.kind, namespace or "", name)
        if current is None:
            return await self._respond(writer, 404, self._error(404, "NotFound", f"{kind.plural} {name} not found"))
        if method == "DELETE":
            return await self._respond(writer, 200, await self._remove(kind.kind, namespace or "", name) or {})
        if method == "PUT" and subresource == "status" and self.conflict_next_status_writes:
            self.conflict_next_status_writes -= 1
            with self.lock:  # someone else wrote in between: the object moved on
                self.rv += 1
                current["metadata"]["resourceVersion"] = str(self.rv)
                self.objects[(kind.kind, namespace or "", name)]["metadata"]["resourceVersion"] = str(self.rv)
            return await self._respond(writer, 409, self._error(409, "Conflict", "the object has been modified"))
        if method == "PUT":
            wanted = data.get("metadata", {}).get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                return await self._respond(writer, 409, self._error(
                    409, "Conflict", "the object has been modified; please apply your changes to the latest "
                                     "version and try again"))
            data["kind"] = kind.kind
            data.setdefault("metadata", {})["name"] = name
            if kind.namespaced:
                data["metadata"]["namespace"] = namespace
            if subresource == "status":
                return await self._respond(writer, 200, await self._store({**current, "status": data.get("status")},
                                                                          True))
            return await self._respond(writer, 200, await self._store(data, False))
        if method == "PATCH":
            wanted = data.get("metadata", {}).get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                return await self._respond(writer, 409, self._error(409, "Conflict", "stale resourceVersion"))
            merged = _merge(copy.deepcopy(current), data)
            if subresource == "status":
                return await self._respond(writer, 200, await self._store({**current, "status": merged.get("status")},
                                                                          True))
            return await self._respond(writer, 200, await self._store(merged, False))
        return await self._respond(writer, 405, self._error(405, "MethodNotAllowed", method))

    def _is_group_version(self, parts: list[str]) -> bool:
        if parts[0] == "api":
            return parts[1:] == ["v1"]
        return len(parts) == 3 and any(k.group == parts[1] and k.version == parts[2] for k in self.kinds.values())

    def _discovery(self, parts: list[str]) -> dict:
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"]}
        if parts == ["apis"]:
            groups: dict[str, set[str]] = {}
            for k in self.kinds.values():
                if k.group:
                    groups.setdefault(k.group, set()).add(k.version)
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in sorted(vs)],
                 "preferredVersion": {"groupVersion": f"{g}/{sorted(vs)[-1]}", "version": sorted(vs)[-1]}}
                for g, vs in sorted(groups.items())]}
        group, version = ("", "v1") if parts[0] == "api" else (parts[1], parts[2])
        resources = []
        for k in self.kinds.values():
            if k.group == group and k.version == version:
                verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
                resources.append({"name": k.plural, "singularName": k.kind.lower(), "namespaced": k.namespaced,
                                  "kind": k.kind, "verbs": verbs})
                resources.append({"name": f"{k.plural}/status", "singularName": "", "namespaced": k.namespaced,
                                  "kind": k.kind, "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}".lstrip("/"),
                "resources": resources}

    def _parse(self, parts: list[str]) -> tuple[Kind, str | None, str | None, str] | None:
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces" and (group, version, rest[2]) in self.kinds:
            namespace, rest = rest[1], rest[2:]
        kind = self.kinds.get((group, version, rest[0])) if rest else None
        if kind is None:
            return None
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else ""
        return kind, namespace, name, subresource

    def _matches(self, kind: Kind, namespace: str | None, obj: dict) -> bool:
        return obj["kind"] == kind.kind and (namespace is None or obj["metadata"].get("namespace") == namespace)

    def _list(self, kind: Kind, namespace: str | None) -> dict:
        with self.lock:
            items = [copy.deepcopy(o) for (k, _, _), o in sorted(self.objects.items()) if k == kind.kind
                     and self._matches(kind, namespace, o)]
            for item in items:  # as the real API server does: list items carry no apiVersion/kind
                item.pop("apiVersion", None)
                item.pop("kind", None)
            return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                    "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    async def _watch(self, kind: Kind, namespace: str | None, query: dict, writer: asyncio.StreamWriter) -> None:
        self.watch_requests += 1
        await self._watch_gate.wait()
        self._watchers.add(writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")

        def send(event: dict) -> None:
            line = json.dumps(event).encode() + b"\n"
            writer.write(b"%x\r\n%b\r\n" % (len(line), line))

        since = query.get("resourceVersion")
        deadline = time.monotonic() + float(query.get("timeoutSeconds", 3600))
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        try:
            if not since or since == "0":
                with self.lock:
                    current = [copy.deepcopy(o) for (k, _, _), o in sorted(self.objects.items())
                               if k == kind.kind and self._matches(kind, namespace, o)]
                    position = self.rv
                for obj in current:
                    send({"type": "ADDED", "object": obj})
            else:
                position = int(since)
                if position <= self.compacted and position < self.rv:
                    send({"type": "ERROR", "object": self._error(410, "Expired",
                                                                 f"too old resource version: {since}")})
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    return
            last_bookmark = time.monotonic()
            while time.monotonic() < deadline and not writer.is_closing():
                with self.lock:
                    fresh = [(rv, t, o) for rv, k, t, o in self.history if rv > position and k == kind.kind
                             and self._matches(kind, namespace, o)]
                    newest = self.rv
                for rv, event_type, obj in fresh:
                    send({"type": event_type, "object": obj})
                    position = rv
                if bookmarks and time.monotonic() - last_bookmark >= self.bookmark_interval:
                    position = max(position, newest)
                    send({"type": "BOOKMARK", "object": {"kind": kind.kind, "apiVersion": kind.api_version,
                                                         "metadata": {"resourceVersion": str(position)}}})
                    last_bookmark = time.monotonic()
                await writer.drain()
                assert self._changed is not None
                async with self._changed:
                    try:
                        async with asyncio.timeout(0.1):  # not wait_for: it can drop a cancellation in 3.11
                            await self._changed.wait()
                    except TimeoutError:
                        pass
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self._watchers.discard(writer)


def _merge(target: dict, patch: dict) -> dict:
    """JSON merge patch (RFC 7386)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


@contextmanager
def fake_apiserver(**kwargs) -> Iterator[FakeAPIServer]:
    server = FakeAPIServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()
