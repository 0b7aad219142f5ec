"""The Kubernetes source: list and watch every kind tidegate reads, through lightkube, into the store.

Per kind, one task: list (which gives a resourceVersion), then watch from that version with bookmarks, so a
watch that ends or breaks resumes where it stopped and misses nothing. A 410 Gone (the version is too old)
means a fresh list, and whatever the list no longer has is deleted: no event is lost across the gap. Errors
back off (up to 30 s) and retry; while the API server is away, the last good configuration keeps serving.

Each kind is read at the first version the cluster serves, in the order tidegate prefers (v1 first), so an
older Gateway API install works. A kind the cluster does not serve at all is reported once and looked for
again every minute. Objects are validated like files are; an invalid one keeps its last good version.
`status` is dropped on the way in (tidegate writes it; the translator never reads it): the current status is
kept aside for the status writer, which compares before it writes.

Secrets and ConfigMaps are many and mostly irrelevant: only those that a Gateway, an Ingress or a
BackendTLSPolicy references are kept in memory. A newly referenced one is fetched at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable
from typing import Any

from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.core.resource_registry import resource_registry
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.types import OnErrorAction, OnErrorResult

from tidegate.resources import kinds
from tidegate.resources.loader import LoadResult, load_object
from tidegate.resources.model import Key, Origin, Problem, Resource
from tidegate.store import Store

log = logging.getLogger("tidegate.sources.kubernetes")

REFERENCED_ONLY = ("Secret", "ConfigMap")
MAX_BACKOFF = 30.0
ABSENT_RETRY = 60.0


def connect(kubeconfig: str | None = None, context: str | None = None) -> AsyncClient:
    """A client from a kubeconfig file (and context), or in-cluster / $KUBECONFIG / ~/.kube/config."""
    config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
    return AsyncClient(config=config.get(context_name=context) if context else config, field_manager="tidegate",
                       trust_env=False)


@functools.cache
def resource_class(info: kinds.KindInfo, version: str) -> Any:
    """lightkube's class for a kind: its own model for built-in kinds it knows, a generic resource else."""
    api_version = f"{info.group}/{version}" if info.group else version
    known = resource_registry.get(api_version, info.kind)
    if known is not None:
        return known
    make = create_namespaced_resource if info.namespaced else create_global_resource
    return make(info.group, version, info.kind, kinds.plural(info))


def version_preference(info: kinds.KindInfo) -> list[str]:
    served = list(kinds.served_versions(info))
    stored = kinds.storage_version(info)
    return sorted(served, key=lambda v: (v != "v1", v != stored, served.index(v)))


# ingress-nginx's annotations that name a Secret or a ConfigMap of the Ingress's namespace
REFERENCE_ANNOTATIONS = (("nginx.ingress.kubernetes.io/auth-secret", "Secret"),
                         ("nginx.ingress.kubernetes.io/proxy-ssl-secret", "Secret"),
                         ("nginx.ingress.kubernetes.io/custom-headers", "ConfigMap"),
                         ("nginx.ingress.kubernetes.io/auth-proxy-set-headers", "ConfigMap"))


def referenced(resources: dict[Key, Resource]) -> set[Key]:
    """Secrets and ConfigMaps that Gateways, Ingresses (their TLS, and ingress-nginx's auth-secret,
    proxy-ssl-secret and custom-headers), BackendTLSPolicies and HTTPRouteFilters point at."""
    wanted: set[Key] = set()

    def add(ref: dict, namespace: str, default_kind: str = "Secret") -> None:
        if ref.get("group", "") == "" and ref.get("name"):
            wanted.add(Key(ref.get("kind") or default_kind, ref.get("namespace") or namespace, ref["name"]))

    for key, res in resources.items():
        spec = res.spec
        if key.kind == "Gateway":
            for listener in spec.get("listeners") or []:
                for ref in (listener.get("tls") or {}).get("certificateRefs") or []:
                    add(ref, key.namespace)
            tls = spec.get("tls") or {}
            if (tls.get("backend") or {}).get("clientCertificateRef"):
                add(tls["backend"]["clientCertificateRef"], key.namespace)
            frontend = tls.get("frontend") or {}
            for validation in [frontend.get("default") or {}] + [p.get("tls") or {} for p in frontend.get(
                    "perPort") or []]:
                for ref in (validation.get("validation") or {}).get("caCertificateRefs") or []:
                    add(ref, key.namespace, "ConfigMap")
        elif key.kind == "Ingress":
            for tls in spec.get("tls") or []:
                if tls.get("secretName"):
                    wanted.add(Key("Secret", key.namespace, tls["secretName"]))
            for annotation, kind in REFERENCE_ANNOTATIONS:
                namespace, _, name = str(res.annotations.get(annotation, "")).strip().rpartition("/")
                if name and namespace in ("", key.namespace):  # (another namespace's is refused: never read)
                    wanted.add(Key(kind, key.namespace, name))
        elif key.kind == "BackendTLSPolicy":
            for ref in (spec.get("validation") or {}).get("caCertificateRefs") or []:
                add(ref, key.namespace, "ConfigMap")
        elif key.kind == "HTTPRouteFilter":
            if (spec.get("basicAuth") or {}).get("secretName"):
                wanted.add(Key("Secret", key.namespace, spec["basicAuth"]["secretName"]))
            if (spec.get("externalAuth") or {}).get("proxySetHeadersConfigMap"):
                wanted.add(Key("ConfigMap", key.namespace, spec["externalAuth"]["proxySetHeadersConfigMap"]))
    return wanted


class _Gone(Exception):
    pass


def _watch_with_bookmarks(client: AsyncClient, res: Any, namespaced: bool, resource_version: str,
                          on_error: Callable[[Exception, int], OnErrorResult]):
    """AsyncClient.watch, plus allowWatchBookmarks (which its public signature does not take): the
    generic client it wraps builds the same request with one more parameter. Bookmarks move the
    resourceVersion on while nothing changes, so that a resumed watch is not too old."""
    generic = client._client
    request = generic.prepare_request(
        "list", res=res, namespace="*" if namespaced else None, watch=True,
        params={"resourceVersion": resource_version, "allowWatchBookmarks": "true", "timeoutSeconds": 300})
    return generic.watch(request, on_error=on_error)


class KubernetesSource:
    name = "kubernetes"

    def __init__(self, client: AsyncClient, store: Store, report: Callable[[Problem], None] | None = None):
        self.client = client
        self.store = store
        self.report = report or (lambda p: log.warning("%s", p))
        self.objects: dict[Key, Resource] = {}
        self.statuses: dict[Key, dict] = {}  # current status of each object, for the status writer
        self.resource_versions: dict[Key, str] = {}
        self.versions: dict[str, str] = {}  # kind → API version in use
        self.synced = asyncio.Event()  # every kind listed once (or found absent)
        self._synced_kinds: set[str] = set()
        self._unkept: set[Key] = set()  # Secrets/ConfigMaps seen but not referenced (not kept)
        self._referenced: set[Key] = set()
        self._publish_scheduled = False
        self._tasks: list[asyncio.Task] = []
        self._fetches: set[asyncio.Task] = set()
        self._finishing = False

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for info in kinds.KINDS.values():
            self._tasks.append(loop.create_task(self._follow(info), name=f"watch {info.kind}"))

    async def close(self) -> None:
        tasks = [*self._tasks, *self._fetches]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    # -- list and watch ---------------------------------------------------------------------------------
    async def _follow(self, info: kinds.KindInfo) -> None:
        failures = 0
        while True:
            try:
                version = await self._choose_version(info)
                if version is None:
                    self._mark_synced(info.kind)
                    await asyncio.sleep(ABSENT_RETRY)
                    continue
                res = resource_class(info, version)
                resource_version = await self._list(info, version, res)
                self._mark_synced(info.kind)
                failures = 0
                await self._watch(info, version, res, resource_version)
            except asyncio.CancelledError:
                raise
            except _Gone:
                log.info("%s: watch expired (410 Gone): listing again", info.kind)
                continue
            except Exception as exc:  # the API server is away or answered badly: keep serving, retry later
                if isinstance(exc, ApiError) and exc.status.code == 404 and info.kind in self.versions:
                    # The version in use went away (a CRD upgraded or removed): find one again.
                    log.warning("%s: the cluster no longer serves %s", info.kind, self.versions.pop(info.kind))
                    continue
                failures += 1
                delay = min(MAX_BACKOFF, 0.2 * 2 ** min(failures, 8)) * random.uniform(0.8, 1.2)
                log.warning("%s: %s; retrying in %.1f s", info.kind, describe(exc), delay)
                await asyncio.sleep(delay)

    async def _choose_version(self, info: kinds.KindInfo) -> str | None:
        """The version to read a kind at: the one in use (a list that finds it gone asks again), else the
        first the cluster serves, found by a one-item list per candidate."""
        known = self.versions.get(info.kind)
        if known:
            return known
        for version in version_preference(info):
            try:
                async for _ in self.client.list(resource_class(info, version), namespace="*" if info.namespaced
                                                else None, chunk_size=1):
                    break
            except ApiError as exc:
                if exc.status.code == 404:
                    continue
                raise
            log.info("reading %s as %s", info.kind, f"{info.group}/{version}" if info.group else version)
            self.versions[info.kind] = version
            return version
        if info.kind not in self._synced_kinds:
            log.warning("the cluster serves no version of %s that tidegate reads (%s): skipping it for now",
                        info.kind, ", ".join(version_preference(info)))
        return None

    async def _list(self, info: kinds.KindInfo, version: str, res: Any) -> str:
        listing = self.client.list(res, namespace="*" if info.namespaced else None, chunk_size=500)
        seen: set[Key] = set()
        async for obj in listing:
            key = self._apply(info, version, "ADDED", obj)
            if key is not None:
                seen.add(key)
        # What the list no longer has was deleted while we were not watching.
        for key in [k for k in self.objects if k.kind == info.kind and k not in seen]:
            self._forget(key)
        for key in [k for k in self._unkept if k.kind == info.kind and k not in seen]:
            self._unkept.discard(key)
        self._schedule_publish()
        return listing.resourceVersion

    async def _watch(self, info: kinds.KindInfo, version: str, res: Any, resource_version: str) -> None:
        """Watch from `resource_version` for good. A broken watch resumes from the last version seen (events
        and bookmarks move it on); only a 410 Gone, or errors that go on, lead back to a fresh list."""
        failures = 0
        while True:
            failure: list[Exception] = []

            def on_error(exc: Exception, count: int, failure: list[Exception] = failure) -> OnErrorResult:
                failure.append(exc)
                return OnErrorResult(OnErrorAction.STOP)

            async for event_type, obj in _watch_with_bookmarks(self.client, res, info.namespaced, resource_version,
                                                                on_error):
                failures = 0
                # Built-in kinds come as lightkube's models, CRDs as generic dicts: one shape from here on.
                obj = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    resource_version = rv
                if event_type != "BOOKMARK":
                    self._apply(info, version, event_type, obj)
            if not failure:
                continue  # lightkube resumes by itself after a watch's normal end
            exc = failure[0]
            code = exc.status.code if isinstance(exc, ApiError) else getattr(getattr(exc, "response", None),
                                                                               "status_code", 0)
            if code == 410:
                raise _Gone() from exc
            failures += 1
            if failures > 5:
                raise exc  # something is wrong beyond a dropped connection: back off and list again
            delay = min(MAX_BACKOFF, 0.1 * 2 ** failures) * random.uniform(0.8, 1.2)
            log.info("%s: watch broke (%s); resuming from version %s in %.1f s", info.kind, describe(exc),
                     resource_version, delay)
            await asyncio.sleep(delay)

    # -- objects ----------------------------------------------------------------------------------------
    def _apply(self, info: kinds.KindInfo, version: str, event_type: str, raw: Any) -> Key | None:
        obj = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
        meta = obj.get("metadata") or {}
        key = Key(info.kind, meta.get("namespace", "") if info.namespaced else "", meta.get("name", ""))
        if event_type == "DELETED":
            self._forget(key)
            self._unkept.discard(key)
            self._schedule_publish()
            return None
        if info.kind in REFERENCED_ONLY and key not in self._referenced:
            self._unkept.add(key)
            return key
        self.resource_versions[key] = meta.get("resourceVersion", "")
        self.statuses[key] = obj.get("status") or {}
        doc = {k: v for k, v in obj.items() if k != "status"}
        held = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") if info.kind == "Service" else None
        if held:
            # The addresses a LoadBalancer Service holds (MetalLB's or tidegate's): kept while still valid.
            doc["status"] = {"loadBalancer": {"ingress": held}}
        doc["apiVersion"] = f"{info.group}/{version}" if info.group else version
        doc["kind"] = info.kind
        # Server-set bookkeeping is kept aside: a status-only change must not look like a new configuration.
        doc["metadata"] = {k: v for k, v in meta.items() if k not in ("managedFields", "resourceVersion")}
        result = LoadResult()
        load_object(doc, Origin(f"kubernetes:{key}"), "default", result)
        if result.errors:
            for problem in result.problems:
                self.report(problem)
            if key in self.objects:
                self.report(Problem("warning", Origin(f"kubernetes:{key}"), "keeping the last good version", key))
            return key
        for problem in result.problems:
            self.report(problem)
        self.objects[key] = result.resources[0]
        self._schedule_publish()
        return key

    def _forget(self, key: Key) -> None:
        self.objects.pop(key, None)
        self.statuses.pop(key, None)
        self.resource_versions.pop(key, None)

    def _mark_synced(self, kind: str) -> None:
        self._synced_kinds.add(kind)
        if len(self._synced_kinds) == len(kinds.KINDS) and not self.synced.is_set() and not self._finishing:
            self._finishing = True
            self._tasks.append(asyncio.get_running_loop().create_task(self._finish_sync()))

    async def _finish_sync(self) -> None:
        """Every kind is listed; Secrets listed before the Gateways that use them are still being fetched.
        Only when they are here is the first configuration complete (no listener may look certificate-less)."""
        self._publish()
        while self._fetches:
            await asyncio.gather(*list(self._fetches), return_exceptions=True)
            self._publish()
        log.info("initial sync done: %d objects", len(self.objects))
        self.synced.set()

    def _schedule_publish(self) -> None:
        """Publish once per burst of events (one pass of the event loop), not once per event."""
        if not self._publish_scheduled:
            self._publish_scheduled = True
            asyncio.get_running_loop().call_soon(self._publish)

    def _publish(self) -> None:
        self._publish_scheduled = False
        wanted = referenced(self.objects)
        if wanted != self._referenced:
            added = wanted - self._referenced
            self._referenced = wanted
            for key in [k for k in self.objects if k.kind in REFERENCED_ONLY and k not in wanted]:
                self._forget(key)  # no longer referenced: not kept
                self._unkept.add(key)
            for key in added:
                if key in self._unkept:
                    fetch = asyncio.get_running_loop().create_task(self._fetch(key))
                    self._fetches.add(fetch)
                    fetch.add_done_callback(self._fetches.discard)
        self.store.replace_source(self.name, self.objects)

    async def _fetch(self, key: Key) -> None:
        info = kinds.by_name(key.kind)
        version = self.versions.get(key.kind, "v1")
        try:
            obj = await self.client.get(resource_class(info, version), key.name, namespace=key.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                log.warning("cannot read %s: %s", key, describe(exc))
            return
        except Exception as exc:
            log.warning("cannot read %s: %s", key, describe(exc))
            return
        self._unkept.discard(key)
        self._apply(info, version, "ADDED", obj)


def describe(exc: Exception) -> str:
    if isinstance(exc, ApiError):
        return f"API error {exc.status.code}: {exc.status.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
