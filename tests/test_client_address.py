"""`externalTrafficPolicy: Local` keeps the client's address, on a lab of network namespaces (tests/netns.py):
a node running `tidegate run --node`, a client on its segment, and a pod namespace behind the node as a CNI
wires one (a veth pair, its own network). The pod is a stock nginx that answers with the address it sees
(`$remote_addr`), and a UDP server that answers with the datagram's source.

Under Local, the relay connects to the pod from the client's own address (IP_TRANSPARENT), and the pod's
replies come back to the relay through the return path (an nftables rule, a policy rule, a local route:
announce/return_path.py). Under Cluster the pod sees the node's address, as behind any proxy: the difference
is what this test proves. A clean stop takes the return path away.

The same relay brings a Gateway's pool address to the pods that serve Gateways in a cluster (--gateway-pods).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.harness import TIDEGATE, process, wait_until
from tests.manifests import gateway
from tests.netns import CommandFailed, can_make_namespaces, lab

WHY_NOT = can_make_namespaces() or ("" if shutil.which("nginx") else "Debian's nginx is not installed") \
    or ("" if shutil.which("nft") else "nft (Debian package nftables) is not installed; scripts/test installs it")
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)

ADMIN = "http://127.0.0.1:9900"
LOCAL4, LOCAL6, CLUSTER4 = "198.18.0.100", "2001:db8::100", "198.18.0.101"

# A pod's UDP side: answers each datagram with the address it came from.
UDP_SOURCE = r"""
import socket, sys
for family, address in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((address, 5353))
    globals().setdefault("sockets", []).append(s)
import selectors
sel = selectors.DefaultSelector()
for s in sockets:
    sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        _, peer = key.fileobj.recvfrom(512)
        key.fileobj.sendto(peer[0].encode(), peer)
"""

# The client: an HTTP GET over TCP and a UDP datagram to an address; prints what the pod saw.
ASK = r"""
import socket, sys, urllib.request
host = sys.argv[1]
url = f"http://[{host}]/" if ":" in host else f"http://{host}/"
print(urllib.request.urlopen(url, timeout=5).read().decode().strip())
with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(5)
    s.sendto(b"who am I", (host, 53))
    print(s.recv(512).decode())
"""


def _service(name: str, family: str, address: str, policy: str, pod: str) -> str:
    return f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, annotations: {{metallb.io/loadBalancerIPs: "{address}"}}}}
spec:
  type: LoadBalancer
  loadBalancerClass: tidegate.io/lb
  externalTrafficPolicy: {policy}
  ipFamilies: [{family}]
  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: {family}
ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints: [{{addresses: ['{pod}'], nodeName: node-a, targetRef: {{kind: Pod, name: web}}}}]
"""


def _nginx_conf(tmp: Path) -> Path:
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{
    listen 8080;
    listen [::]:8080;
    location / {{ return 200 "$remote_addr\\n"; }}
  }}
}}
""")
    return conf


def _announced(world) -> int:
    try:
        return len(world.get_json("a", f"{ADMIN}/api/v1/loadbalancers")["announcements"])
    except CommandFailed:  # the admin listener is not open yet
        return 0


def _ruleset(world) -> str:
    return world.run("a", "nft", "list", "tables") + world.run("a", "ip", "rule") + world.run("a", "ip", "-6", "rule")


def test_local_pods_see_the_client_address_and_cluster_pods_the_nodes(tmp_path):
    with ExitStack() as stack:
        world = stack.enter_context(lab({"a": 1, "client": 10}, pods={"web": "a"}))
        config = tmp_path / "config"
        config.mkdir()
        (config / "lab.yaml").write_text(f"""apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status: {{addresses: [{{type: InternalIP, address: {world.v4("a")}}}]}}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: lab, namespace: metallb-system}}
spec: {{addresses: [198.18.0.100-198.18.0.109, 2001:db8::100-2001:db8::109]}}
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {{name: lab, namespace: metallb-system}}
"""
            + _service("local4", "IPv4", LOCAL4, "Local", world.pod_v4("web"))
            + _service("local6", "IPv6", LOCAL6, "Local", world.pod_v6("web"))
            + _service("cluster4", "IPv4", CLUSTER4, "Cluster", world.pod_v4("web")))
        stack.enter_context(process(world.exec_args("web", shutil.which("nginx"), "-p", str(tmp_path), "-c",
                                                    str(_nginx_conf(tmp_path)), "-g", "daemon off;"),
                                    tmp_path / "nginx.log"))
        stack.enter_context(process(world.exec_args("web", sys.executable, "-c", UDP_SOURCE, world.pod_v4("web"),
                                                    world.pod_v6("web")), tmp_path / "udp.log"))
        log = tmp_path / "tidegate.log"
        node = stack.enter_context(process(world.exec_args(
            "a", *TIDEGATE, "run", "-f", str(config), "--node", "node-a", "--admin", "127.0.0.1:9900", "--bind",
            "127.0.0.1"), log))
        wait_until(lambda: _announced(world) == 3, timeout=30, what="the three addresses announced")
        assert "relays to local pods keep the client's address" in log.read_text()
        assert "table inet tidegate" in _ruleset(world)

        def seen(address: str) -> list[str]:
            def ask() -> list[str] | None:
                try:
                    return world.run("client", sys.executable, "-c", ASK, address).split()
                except CommandFailed:
                    return None
            return wait_until(ask, timeout=15, what=f"answers through {address}")

        # Local: the pod sees the client, over TCP and UDP, IPv4 and IPv6.
        assert seen(LOCAL4) == [world.v4("client")] * 2
        assert seen(LOCAL6) == [world.v6("client")] * 2
        # Cluster: the node's address (its end of the pod's link), as behind any proxy.
        assert seen(CLUSTER4) == ["10.244.1.1"] * 2
        # Many connections in a row: each gets its own port from the client's address, and all come back.
        for _ in range(20):
            assert world.run("client", sys.executable, "-c", ASK, LOCAL4).split() == [world.v4("client")] * 2

        node.terminate()
        node.wait(15)
        time.sleep(0.1)
        left = _ruleset(world)
        assert "tidegate" not in left and "lookup 116" not in left, left


EDGE = "198.18.0.110"  # a Gateway's address, from the pool


def test_a_gateways_pool_address_is_relayed_by_the_node_agent_to_the_gateway_pods(tmp_path):
    """In a cluster the Gateways are served by the Deployment's pods, not by the node agents that announce:
    with --gateway-pods, the agent on a node with a Gateway pod announces the Gateway's pool address and
    relays its ports to that pod (from the client's address), and the pod listens on every address for them.
    The pod's HTTPRoute reaches a stock nginx that answers with the X-Forwarded-For it was sent."""
    with ExitStack() as stack:
        world = stack.enter_context(lab({"a": 1, "client": 10}, pods={"gw": "a"}))
        config = tmp_path / "config"
        config.mkdir()
        (config / "lab.yaml").write_text(f"""apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status: {{addresses: [{{type: InternalIP, address: {world.v4("a")}}}]}}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: lab, namespace: metallb-system}}
spec: {{addresses: [198.18.0.100-198.18.0.119]}}
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {{name: lab, namespace: metallb-system}}
---
apiVersion: v1
kind: Service
metadata: {{name: tidegate, namespace: tidegate-system}}
spec: {{selector: {{app: tidegate}}, ports: [{{name: http, port: 80, targetPort: 8081}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: tidegate-1, namespace: tidegate-system, labels: {{kubernetes.io/service-name: tidegate}}}}
addressType: IPv4
ports: [{{name: http, port: 8081}}]
endpoints: [{{addresses: ['{world.pod_v4("gw")}'], nodeName: node-a, targetRef: {{kind: Pod, name: tidegate-1}}}}]
---
{gateway(EDGE, "[{name: http, port: 8081, protocol: HTTP}]", name="edge")}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: edge, namespace: default}}
spec:
  parentRefs: [{{name: edge}}]
  rules: [{{backendRefs: [{{name: web, port: 80}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec: {{ports: [{{name: http, port: 80, targetPort: 9000}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 9000}}]
endpoints: [{{addresses: [127.0.0.1], targetRef: {{kind: Pod, name: web}}}}]
""")
        conf = _nginx_conf(tmp_path)
        conf.write_text(conf.read_text().replace("listen 8080;\n    listen [::]:8080;", "listen 127.0.0.1:9000;")
                        .replace("$remote_addr", "$http_x_forwarded_for"))
        stack.enter_context(process(world.exec_args("gw", shutil.which("nginx"), "-p", str(tmp_path), "-c",
                                                    str(conf), "-g", "daemon off;"), tmp_path / "nginx.log"))
        pod_log = tmp_path / "gateway-pod.log"
        stack.enter_context(process(world.exec_args(
            "gw", *TIDEGATE, "run", "-f", str(config), "--gateway-pods", "tidegate-system/tidegate", "--admin",
            "127.0.0.1:9901"), pod_log))
        log = tmp_path / "agent.log"
        stack.enter_context(process(world.exec_args(
            "a", *TIDEGATE, "run", "-f", str(config), "--node", "node-a", "--serve", "loadbalancers",
            "--gateway-pods", "tidegate-system/tidegate", "--admin", "127.0.0.1:9900", "--bind", "127.0.0.1"), log))
        wait_until(lambda: _announced(world) == 1, timeout=30, what="the Gateway's address announced")
        view = world.get_json("a", f"{ADMIN}/api/v1/loadbalancers")
        assert [a["address"] for a in view["announcements"]] == [EDGE], view
        # The pod listens on every address for the Gateway, not on the pool address it could not receive.
        wait_until(lambda: "listening on 0.0.0.0:8081" in pod_log.read_text(), timeout=15,
                   what="the Gateway pod to listen on every address")

        def forwarded_for() -> str | None:
            try:
                return world.python("client", "import urllib.request;print(urllib.request.urlopen("
                                              f"'http://{EDGE}:8081/', timeout=5).read().decode().strip())").strip()
            except CommandFailed:
                return None

        assert wait_until(forwarded_for, timeout=15, what="an answer through the Gateway's address") \
            == world.v4("client")


def test_node_ports_and_health_check_node_ports_without_kube_proxy(tmp_path):
    """--node-ports: a NodePort Service under Local is served on the node's own address at its node port,
    straight to the local pod, which sees the client; a LoadBalancer Service's healthCheckNodePort answers as
    kube-proxy's does (200 and the local pod count with a pod here, 503 without)."""
    with ExitStack() as stack:
        world = stack.enter_context(lab({"a": 1, "client": 10}, pods={"web": "a"}))
        config = tmp_path / "config"
        config.mkdir()
        pod = world.pod_v4("web")
        (config / "lab.yaml").write_text(f"""apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status: {{addresses: [{{type: InternalIP, address: {world.v4("a")}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: ['{pod}'], nodeName: node-a}}]
---
apiVersion: v1
kind: Service
metadata: {{name: shop, namespace: default}}
spec:
  type: LoadBalancer
  loadBalancerClass: someone-else
  externalTrafficPolicy: Local
  healthCheckNodePort: 30900
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30081}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: shop-1, namespace: default, labels: {{kubernetes.io/service-name: shop}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: ['{pod}'], nodeName: node-a}}, {{addresses: [10.9.9.9], nodeName: node-b}}]
---
apiVersion: v1
kind: Service
metadata: {{name: elsewhere, namespace: default}}
spec:
  type: LoadBalancer
  loadBalancerClass: someone-else
  externalTrafficPolicy: Local
  healthCheckNodePort: 30901
  ports: [{{name: http, port: 80, nodePort: 30082}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: elsewhere-1, namespace: default, labels: {{kubernetes.io/service-name: elsewhere}}}}
addressType: IPv4
ports: [{{name: http, port: 80}}]
endpoints: [{{addresses: [10.9.9.8], nodeName: node-b}}]
""")
        stack.enter_context(process(world.exec_args("web", shutil.which("nginx"), "-p", str(tmp_path), "-c",
                                                    str(_nginx_conf(tmp_path)), "-g", "daemon off;"),
                                    tmp_path / "nginx.log"))
        stack.enter_context(process(world.exec_args(
            "a", *TIDEGATE, "run", "-f", str(config), "--node", "node-a", "--node-ports", "--admin",
            "127.0.0.1:9900"), tmp_path / "tidegate.log"))
        node = world.v4("a")

        def get(port: int) -> tuple[int, dict, str] | None:
            code = ("import json, urllib.request, urllib.error\n"
                    f"try:\n    r = urllib.request.urlopen('http://{node}:{port}/', timeout=5)\n"
                    "except urllib.error.HTTPError as e:\n    r = e\n"
                    "print(json.dumps([r.status, dict(r.headers), r.read().decode()]))")
            try:
                return tuple(json.loads(world.python("client", code)))  # type: ignore[return-value]
            except CommandFailed:
                return None

        status, _, body = wait_until(lambda: get(30080), timeout=15, what="the node port to answer")
        assert status == 200 and body.strip() == world.v4("client")  # the pod sees the client
        status, headers, body = wait_until(lambda: get(30900), timeout=15, what="the health check node port")
        assert status == 200 and headers["X-Load-Balancing-Endpoint-Weight"] == "1"
        assert json.loads(body) == {"service": {"namespace": "default", "name": "shop"}, "localEndpoints": 1,
                                    "serviceProxyHealthy": True}
        status, headers, body = get(30901)
        assert status == 503 and json.loads(body)["localEndpoints"] == 0
