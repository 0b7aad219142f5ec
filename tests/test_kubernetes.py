"""`tidegate run --kubernetes` against an API server stand-in (tests/apiserver.py) that speaks the real HTTP
API: initial sync, events that change what is served, dropped watches and 410 Gone, status written once
per real change, and two replicas sharing one Lease."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.apiserver import FakeAPIServer, fake_apiserver
from tests.harness import TIDEGATE, free_port, process, request, wait_until
from tests.manifests import DEFAULT_INGRESS_CLASS, http_gateway, route, service
from tests.scripted import scripted_backends

GW = "127.0.0.1"
LEASE = ("--lease-namespace", "default", "--lease-duration", "2", "--renew-deadline", "1.5", "--retry-period", "0.2")


def _pod_of(port: int, host: str) -> str:
    status, _, body = request(GW, port, "/", headers={"Host": host}, timeout=2)
    return json.loads(body)["pod"] if status == 200 else str(status)


@contextmanager
def replica(api: FakeAPIServer, tmp: Path, name: str, ready: tuple[str, int], *extra: str, token: str = ""):
    config = json.loads(api.kubeconfig())
    if token:
        config["users"][0]["user"]["token"] = token
    kubeconfig = tmp / f"kubeconfig-{name}"
    kubeconfig.write_text(json.dumps(config))
    admin = free_port()
    args = [*TIDEGATE, "run", "--kubernetes", "--kubeconfig", str(kubeconfig), "--identity", name,
            "--admin", f"127.0.0.1:{admin}", *LEASE, *extra]
    with process(args, tmp / f"tidegate-{name}.log", ready=ready) as proc:
        proc.admin_port = admin  # type: ignore[attr-defined]
        yield proc


@pytest.fixture
def cluster(tmp_path):
    port, pod_port = free_port(GW), free_port("127.0.9.1")
    pods = [("127.0.9.1", pod_port, "pod-a"), ("127.0.9.2", pod_port, "pod-b")]
    with fake_apiserver() as api, scripted_backends(*pods) as backends:
        api.put_yaml(http_gateway(GW, port))
        api.put_yaml(service("app", pods[:1]))
        api.put_yaml(route("app", "app.test", "- backendRefs: [{name: app, port: 80}]"))
        yield api, port, pods, backends


def test_initial_sync_then_events_change_what_is_served(cluster, tmp_path):
    api, port, pods, _ = cluster
    with replica(api, tmp_path, "a", (GW, port)) as proc:
        assert _pod_of(port, "app.test") == "pod-a"
        ready = request("127.0.0.1", proc.admin_port, "/readyz")
        assert ready[0] == 200
        # add: a new route and the Service it uses
        api.put_yaml(service("other", pods[1:]))
        api.put_yaml(route("other", "other.test", "- backendRefs: [{name: other, port: 80}]"))
        wait_until(lambda: _pod_of(port, "other.test") == "pod-b", what="the new route serves")
        # modify: the EndpointSlice now names the other pod
        api.put_yaml(service("app", pods[1:]))
        wait_until(lambda: _pod_of(port, "app.test") == "pod-b", what="the endpoint change is served")
        # delete: the route goes, its host gets 404
        api.delete("HTTPRoute", "default", "other")
        wait_until(lambda: _pod_of(port, "other.test") == "404", what="the deleted route is gone")
    # Every event went through its watch: none needed an error, a back-off and a fresh list.
    log_text = (tmp_path / "tidegate-a.log").read_text()
    assert "retrying in" not in log_text and "listing again" not in log_text, log_text[-2000:]


def test_dropped_watches_and_410_gone_lose_no_event(cluster, tmp_path):
    api, port, pods, _ = cluster
    with replica(api, tmp_path, "a", (GW, port)):
        assert _pod_of(port, "app.test") == "pod-a"
        watches, lists = api.watch_requests, api.list_requests["HTTPRoute"]
        api.drop_watches()
        api.put_yaml(route("second", "second.test", "- backendRefs: [{name: app, port: 80}]"))
        wait_until(lambda: _pod_of(port, "second.test") == "pod-a", what="an event after a dropped watch")
        assert api.watch_requests > watches  # it came back through a new watch ...
        assert api.list_requests["HTTPRoute"] == lists  # ... resumed at its resourceVersion, no new list
        # ... from where it stopped. Now watches are cut and held back while one route is deleted and
        # another added, and history is compacted: resuming gets 410 Gone, and both changes must still
        # arrive through a fresh list.
        api.hold_watches(True)
        api.drop_watches()
        api.delete("HTTPRoute", "default", "second")
        api.put_yaml(route("third", "third.test", "- backendRefs: [{name: app, port: 80}]"))
        api.compact()
        time.sleep(0.3)
        assert _pod_of(port, "second.test") == "pod-a"  # nothing seen yet: the last config keeps serving
        api.hold_watches(False)
        wait_until(lambda: _pod_of(port, "third.test") == "pod-a", what="an addition made during the gap")
        wait_until(lambda: _pod_of(port, "second.test") == "404", what="a deletion made during the gap")
        assert api.list_requests["HTTPRoute"] > lists  # the 410 made it list again


def test_while_the_api_server_is_away_the_last_config_keeps_serving(cluster, tmp_path):
    api, port, pods, _ = cluster
    with replica(api, tmp_path, "a", (GW, port)):
        assert _pod_of(port, "app.test") == "pod-a"
        api.unavailable = True
        api.drop_watches()
        time.sleep(1.5)  # lists and watches fail, and back off
        assert [_pod_of(port, "app.test") for _ in range(5)] == ["pod-a"] * 5
        api.unavailable = False
        api.put_yaml(route("later", "later.test", "- backendRefs: [{name: app, port: 80}]"))
        wait_until(lambda: _pod_of(port, "later.test") == "pod-a", timeout=15, what="changes after it came back")


def test_a_status_write_that_conflicts_is_read_again_and_retried(cluster, tmp_path):
    api, port, pods, _ = cluster
    api.conflict_next_status_writes = 1
    with replica(api, tmp_path, "a", (GW, port)):
        for kind, name in (("GatewayClass", "tidegate"), ("Gateway", "gw"), ("HTTPRoute", "app")):
            wait_until(lambda kind=kind, name=name: (api.get(kind, "default" if kind != "GatewayClass" else "",
                                                             name) or {}).get("status"), what=f"{kind} status")
        assert api.conflict_next_status_writes == 0
        assert len(api.status_writes()) == 4  # three objects, one of them twice (the conflict, then the retry)


def _conditions(status: dict, kind: str) -> dict[str, str]:
    if kind == "HTTPRoute":
        entry = status["parents"][0]
        return {c["type"]: c["status"] for c in entry["conditions"]}
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_status_is_written_once_per_real_change(cluster, tmp_path):
    api, port, pods, _ = cluster
    other_parent = {"parentRef": {"name": "theirs", "group": "gateway.networking.k8s.io", "kind": "Gateway"},
                    "controllerName": "example.com/another-controller",
                    "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                                    "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}
    obj = api.get("HTTPRoute", "default", "app")
    obj["status"] = {"parents": [other_parent]}
    api.call(api._store, obj, True)
    with replica(api, tmp_path, "a", (GW, port)):
        for kind, name in (("GatewayClass", "tidegate"), ("Gateway", "gw"), ("HTTPRoute", "app")):
            wait_until(lambda kind=kind, name=name: api.status_writes(kind, name), what=f"{kind} status")
        time.sleep(1.0)  # a second write would come now, if any
        assert [len(api.status_writes(k, n)) for k, n in
                (("GatewayClass", "tidegate"), ("Gateway", "gw"), ("HTTPRoute", "app"))] == [1, 1, 1]
        gateway = api.get("Gateway", "default", "gw")["status"]
        assert _conditions(gateway, "Gateway") == {"Accepted": "True", "Programmed": "True"}
        assert all(c["lastTransitionTime"] and c["observedGeneration"] == 1 for c in gateway["conditions"])
        route_status = api.get("HTTPRoute", "default", "app")["status"]
        assert route_status["parents"][0] == other_parent  # another controller's entry is kept
        assert {p["controllerName"] for p in route_status["parents"]} == {
            "example.com/another-controller", "tidegate.io/gateway-controller"}

        # A change that alters no status: no write.
        api.put_yaml(service("app", pods[1:]))
        wait_until(lambda: _pod_of(port, "app.test") == "pod-b", what="the endpoint change")
        time.sleep(0.5)
        assert len(api.status_writes()) == 3

        # A change to the route's status: one write, for the route, with the new generation.
        api.put_yaml(route("app", "app.test", "- backendRefs: [{name: missing, port: 80}]"))
        wait_until(lambda: len(api.status_writes("HTTPRoute", "app")) == 2, what="the route's new status")
        time.sleep(0.5)
        assert len(api.status_writes()) == 4
        mine = next(p for p in api.get("HTTPRoute", "default", "app")["status"]["parents"]
                    if p["controllerName"] == "tidegate.io/gateway-controller")
        resolved = next(c for c in mine["conditions"] if c["type"] == "ResolvedRefs")
        assert resolved["status"] == "False" and resolved["reason"] == "BackendNotFound"
        assert resolved["observedGeneration"] == 2

        # The route leaves tidegate's Gateway for another controller's: tidegate's entry goes, theirs stays.
        moved = route("app", "app.test", "- backendRefs: [{name: app, port: 80}]").replace(
            "parentRefs: [{name: gw}]", "parentRefs: [{name: theirs}]")
        api.put_yaml(moved)
        wait_until(lambda: api.get("HTTPRoute", "default", "app")["status"]["parents"] == [other_parent],
                   what="tidegate's parent entry removed")
        time.sleep(0.5)
        assert len(api.status_writes("HTTPRoute", "app")) == 3


def test_ingress_status_gets_the_address(cluster, tmp_path):
    api, port, pods, _ = cluster
    api.put_yaml("""
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: tidegate}
spec: {controller: tidegate.io/ingress-controller}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: default}
spec:
  ingressClassName: tidegate
  rules: [{host: ing.test, http: {paths: [{path: /, pathType: Prefix,
          backend: {service: {name: app, port: {number: 80}}}}]}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: theirs, namespace: default}
spec:
  ingressClassName: nginx
  defaultBackend: {service: {name: app, port: {number: 80}}}
""")
    ingress_port = free_port(GW)
    with replica(api, tmp_path, "a", (GW, ingress_port), "--address", "203.0.113.7", "--bind", GW,
                 "--ingress-http-port", str(ingress_port)):
        wait_until(lambda: (api.get("Ingress", "default", "web") or {}).get("status"), what="the Ingress status")
        assert api.get("Ingress", "default", "web")["status"]["loadBalancer"] == {"ingress": [{"ip": "203.0.113.7"}]}
        status, _, body = request(GW, ingress_port, "/", headers={"Host": "ing.test"})
        assert status == 200 and json.loads(body)["pod"] == "pod-a"
        time.sleep(0.5)
        assert not api.status_writes("Ingress", "theirs")  # another controller's Ingress is not touched


def test_loadbalancer_services_get_pool_addresses_keep_metallbs_and_are_served(cluster, tmp_path):
    api, _, pods, _ = cluster
    lb_port = free_port("127.0.8.1")
    api.put_yaml(f"""
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: lab, namespace: metallb-system}}
spec: {{addresses: [127.0.8.1-127.0.8.4]}}
---
apiVersion: v1
kind: Service
metadata: {{name: fresh, namespace: default}}
spec:
  type: LoadBalancer
  loadBalancerClass: tidegate.io/lb
  ports: [{{name: http, port: {lb_port}, targetPort: {pods[0][1]}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: fresh-1, namespace: default, labels: {{kubernetes.io/service-name: fresh}}}}
addressType: IPv4
ports: [{{name: http, port: {pods[0][1]}}}]
endpoints: [{{addresses: [{pods[0][0]}], targetRef: {{name: {pods[0][2]}}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: from-metallb, namespace: default}}
spec:
  type: LoadBalancer
  loadBalancerClass: tidegate.io/lb
  ports: [{{name: http, port: {lb_port}, targetPort: {pods[0][1]}}}]
status:
  loadBalancer: {{ingress: [{{ip: 127.0.8.3, ipMode: VIP}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: metallbs, namespace: default}}
spec: {{type: LoadBalancer, ports: [{{port: 80}}]}}
""")
    with replica(api, tmp_path, "a", None):
        wait_until(lambda: ((api.get("Service", "default", "fresh") or {}).get("status") or {}).get("loadBalancer"),
                   what="the Service's address")
        fresh = api.get("Service", "default", "fresh")["status"]
        assert fresh["loadBalancer"] == {"ingress": [{"ip": "127.0.8.1", "ipMode": "Proxy"}]}
        assert fresh["conditions"][0]["type"] == "tidegate.io/AddressAssigned"
        wait_until(lambda: api.get("Service", "default", "from-metallb")["status"]["loadBalancer"]["ingress"][0]
                   .get("ipMode") == "Proxy", what="the kept address's status")
        assert api.get("Service", "default", "from-metallb")["status"]["loadBalancer"]["ingress"] == [
            {"ip": "127.0.8.3", "ipMode": "Proxy"}]  # the address MetalLB gave is kept
        wait_until(lambda: (api.get("IPAddressPool", "metallb-system", "lab") or {}).get("status"),
                   what="the pool's counts")
        assert api.get("IPAddressPool", "metallb-system", "lab")["status"] == {
            "assignedIPv4": 2, "assignedIPv6": 0, "availableIPv4": 2, "availableIPv6": 0}
        wait_until(lambda: request("127.0.8.1", lb_port, "/", timeout=2)[0] == 200, what="the address to serve")
        assert json.loads(request("127.0.8.1", lb_port, "/")[2])["pod"] == "pod-a"
        # A Service refused an address says why in its status, and in an Event as MetalLB's users expect.
        api.put_yaml("""
apiVersion: v1
kind: Service
metadata: {name: nowhere, namespace: default, annotations: {metallb.io/loadBalancerIPs: 10.255.0.1}}
spec: {type: LoadBalancer, loadBalancerClass: tidegate.io/lb, ports: [{port: 80}]}
""")
        event = wait_until(lambda: next((e for (kind, _, _), e in list(api.objects.items()) if kind == "Event"
                                         and e["involvedObject"]["name"] == "nowhere"), None), what="an Event")
        assert event["type"] == "Warning" and event["reason"] == "AddressNotInPool"
        assert event["message"] == "10.255.0.1: in no IPAddressPool"
        assert any(e["reason"] == "IPAllocated" and e["involvedObject"]["name"] == "fresh"
                   for (kind, _, _), e in list(api.objects.items()) if kind == "Event")
        time.sleep(0.5)
        assert not api.status_writes("Service", "metallbs")  # MetalLB's Service (no class) is not touched


def test_an_ingress_hears_in_events_what_tidegate_made_of_its_annotations(cluster, tmp_path):
    """In a cluster, the translator's reports on an Ingress (a snippet refused, a key unknown, a value out of
    its grammar) are Events on it, as `kubectl describe ingress` shows them; each once, however often the
    configuration is translated again, and again for a new object of the same name."""
    api, port, _, _ = cluster
    ingress = DEFAULT_INGRESS_CLASS + """---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: shop
  namespace: default
  annotations:
    nginx.ingress.kubernetes.io/configuration-snippet: "return 200 'owned';"
    nginx.ingress.kubernetes.io/no-such-thing: "1"
    nginx.ingress.kubernetes.io/load-balance: fastest
spec:
  rules: [{host: shop.test, http: {paths: [{path: /, pathType: Prefix,
                                            backend: {service: {name: app, port: {number: 80}}}}]}}]
"""

    def events() -> list[dict]:
        return [e for (kind, _, _), e in list(api.objects.items())
                if kind == "Event" and e["involvedObject"]["kind"] == "Ingress"]

    with replica(api, tmp_path, "a", (GW, port), "--ingress-http-port", str(free_port())):
        api.put_yaml(ingress)
        wait_until(lambda: len(events()) == 3, what="three Events on the Ingress")
        said = {(e["reason"], e["message"].split(":")[0].split(" ")[1]) for e in events()}
        assert said == {("Rejected", "nginx.ingress.kubernetes.io/configuration-snippet"),
                        ("Ignored", "nginx.ingress.kubernetes.io/no-such-thing"),
                        ("Ignored", "nginx.ingress.kubernetes.io/load-balance")}, events()
        assert all(e["type"] == "Warning" and e["involvedObject"]["name"] == "shop" for e in events())
        api.put_yaml(route("other", "other.test", "- backendRefs: [{name: app, port: 80}]"))  # translated again
        time.sleep(1.0)
        assert len(events()) == 3
        api.delete("Ingress", "default", "shop")
        time.sleep(0.5)
        api.put_yaml(ingress)
        wait_until(lambda: len(events()) == 6, what="the Events again, for the new object")


def test_a_node_agent_serves_loadbalancer_addresses_only_and_writes_nothing(cluster, tmp_path):
    api, port, pods, _ = cluster
    lb_port = free_port("127.0.8.9")
    api.put_yaml(f"""
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: lab, namespace: metallb-system}}
spec: {{addresses: [127.0.8.9/32]}}
---
apiVersion: v1
kind: Service
metadata: {{name: classless, namespace: default}}
spec:
  type: LoadBalancer
  ports: [{{name: http, port: {lb_port}, targetPort: {pods[0][1]}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: classless-1, namespace: default, labels: {{kubernetes.io/service-name: classless}}}}
addressType: IPv4
ports: [{{name: http, port: {pods[0][1]}}}]
endpoints: [{{addresses: [{pods[0][0]}], targetRef: {{name: {pods[0][2]}}}}}]
""")
    with replica(api, tmp_path, "agent", ("127.0.8.9", lb_port), "--serve", "loadbalancers", "--lb-classless",
                 token="agent-token") as agent:
        wait_until(lambda: request("127.0.8.9", lb_port, "/", timeout=2)[0] == 200, what="the address to serve")
        assert json.loads(request("127.0.8.9", lb_port, "/")[2])["pod"] == "pod-a"
        with pytest.raises(OSError):
            request(GW, port, "/", headers={"Host": "app.test"}, timeout=2)  # the Gateway is not its job
        time.sleep(1.0)
        assert not [w for w in api.writes if w.agent == "agent-token"]  # no status, no Lease, no Event
        assert "serving config version" in Path(agent.log_path).read_text()


def test_two_replicas_one_leader_and_failover(cluster, tmp_path):
    """Two replicas, each on its own address (as pods would be); one Lease. Only the holder writes status;
    when it dies without a word (SIGKILL), the other takes over within the lease duration and writes."""
    api, port, pods, _ = cluster
    api.put_yaml(gateway_without_addresses(port))
    with replica(api, tmp_path, "a", (GW, port), "--bind", GW, token="token-a") as first:
        wait_until(lambda: api.status_writes("Gateway", "gw"), what="the first replica leads and writes")
        with replica(api, tmp_path, "b", ("127.0.0.2", port), "--bind", "127.0.0.2", token="token-b"):
            assert _pod_of(port, "app.test") == "pod-a"  # both serve traffic
            status, _, body = request("127.0.0.2", port, "/", headers={"Host": "app.test"})
            assert status == 200 and json.loads(body)["pod"] == "pod-a"
            api.put_yaml(route("app", "app.test", """
                - backendRefs: [{name: app, port: 80}]
                  timeouts: {request: 5s}"""))  # a new generation: observedGeneration changes
            wait_until(lambda: len(api.status_writes("HTTPRoute", "app")) == 2, what="the leader's write")
            time.sleep(1.0)
            assert api.get("Lease", "default", "tidegate-leader")["spec"]["holderIdentity"] == "a"
            assert {w.agent for w in api.status_writes()} == {"token-a"}  # b never wrote
            first.kill()  # no goodbye: the lease must expire
            killed_at = time.monotonic()
            wait_until(lambda: api.get("Lease", "default", "tidegate-leader")["spec"]["holderIdentity"] == "b",
                       timeout=5, what="the other replica takes the lease")
            # The lease duration (2 s) from when the other replica last saw a renewal: a retry period or two
            # after the kill, plus scheduling slack on a busy machine.
            assert time.monotonic() - killed_at < 2 + 2
            api.put_yaml(route("app", "app.test", "- backendRefs: [{name: missing, port: 80}]"))
            wait_until(lambda: len(api.status_writes("HTTPRoute", "app")) == 3, what="the new leader writes")
            assert api.status_writes("HTTPRoute", "app")[-1].agent == "token-b"


def gateway_without_addresses(port: int) -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  gatewayClassName: tidegate
  listeners: [{{name: http, port: {port}, protocol: HTTP}}]
"""


def test_only_referenced_secrets_are_kept_and_versions_follow_what_the_cluster_serves(tmp_path):
    """In-process: the source against the stand-in. TCPRoute is served only as v1alpha2 and TLSRoute not at
    all (an older Gateway API install); Secrets are kept only while something references them."""
    import asyncio

    from tests.apiserver import KINDS
    from tidegate.resources.model import Key
    from tidegate.sources.kubernetes import KubernetesSource, connect
    from tidegate.store import Store

    kinds = [k for k in KINDS if k.kind != "TLSRoute"]
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
              "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"}}
    with fake_apiserver(kinds=kinds) as api:
        api.put_yaml("""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: tidegate
  listeners:
    - name: https
      port: 443
      protocol: HTTPS
      tls: {certificateRefs: [{name: site}]}
""")
        for name in ("site", "unrelated"):
            api.put({**secret, "metadata": {"name": name, "namespace": "default"}})

        async def main() -> None:
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(api.kubeconfig())
            reported: list = []
            source = KubernetesSource(connect(str(kubeconfig)), Store(), reported.append)
            source.start()
            await asyncio.wait_for(source.synced.wait(), 10)
            assert source.versions["TCPRoute"] == "v1alpha2" and "TLSRoute" not in source.versions
            secrets = lambda: {k.name for k in source.objects if k.kind == "Secret"}  # noqa: E731
            assert secrets() == {"site"}
            api.put_yaml("""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: default}
spec:
  tls: [{secretName: unrelated}]
  defaultBackend: {service: {name: x, port: {number: 80}}}
""")
            unrelated = Key("Secret", "default", "unrelated")
            for _ in range(100):  # the store takes it a moment after the source has it (updates are coalesced)
                stored = {r.key for r in source.store.snapshot().resources}
                if secrets() == {"site", "unrelated"} and unrelated in stored:
                    break
                await asyncio.sleep(0.05)
            assert secrets() == {"site", "unrelated"}  # fetched once it was referenced
            assert unrelated in {r.key for r in source.store.snapshot().resources}
            api.delete("Ingress", "default", "web")
            for _ in range(100):
                if secrets() == {"site"}:
                    break
                await asyncio.sleep(0.05)
            assert secrets() == {"site"}  # dropped when nothing references it

            # An object the API server took but tidegate's validation refuses: reported, last good kept.
            good = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                    "metadata": {"name": "r", "namespace": "default"},
                    "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["good.test"]}}
            api.put(good)
            key = Key("HTTPRoute", "default", "r")
            for _ in range(100):
                if key in source.objects:
                    break
                await asyncio.sleep(0.05)
            api.put({**good, "spec": {"parentRefs": [{"name": "gw", "port": 0}], "hostnames": ["bad.test"]}})
            await asyncio.sleep(0.5)
            assert source.objects[key].spec["hostnames"] == ["good.test"]
            assert any("HTTPRoute default/r" in str(p) and "port" in str(p) for p in reported)
            await source.close()

        asyncio.run(main())
