"""LoadBalancer Services served by `tidegate run` from files, on loopback (no announcement needed: every
127.0.0.0/8 address is this host's): an address from the pool serves the Service's TCP and UDP ports
straight to the pods; a Service added later does not renumber the others; wrong objects added beside them
(an overlapping pool, a malformed one, an impossible request) are reported and take nothing away."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.request

import pytest

from tests.harness import free_port, process, tidegate_run, wait_until
from tests.test_l4 import TCPPod, UDPPod, pods

POOL = "127.0.11.100-127.0.11.103"


def _objects(tcp: TCPPod, udp: UDPPod, port: int, extra: str = "") -> str:
    return f"""
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: lab, namespace: metallb-system}}
spec: {{addresses: [{POOL}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: mmm-shop, namespace: default}}
spec:
  type: LoadBalancer
  selector: {{app: shop}}
  ports: [{{name: tcp, port: {port}, targetPort: {tcp.port}}}, {{name: udp, port: {port}, protocol: UDP,
           targetPort: {udp.port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: shop-1, namespace: default, labels: {{kubernetes.io/service-name: mmm-shop}}}}
addressType: IPv4
ports: [{{name: tcp, port: {tcp.port}}}, {{name: udp, port: {udp.port}, protocol: UDP}}]
endpoints: [{{addresses: [127.0.0.1], targetRef: {{kind: Pod, name: shop-pod}}}}]
{extra}"""


def _tcp(address: str, port: int) -> str:
    with socket.create_connection((address, port), timeout=3) as s:
        return s.recv(100).decode()


def _udp(address: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"ping", (address, port))
        return s.recv(100).decode()


def _view(admin_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/api/v1/loadbalancers", timeout=5) as answer:
        return json.load(answer)


def test_a_loadbalancer_service_is_served_keeps_its_address_and_survives_wrong_neighbours(tmp_path):
    port = free_port("127.0.11.100")
    with pods(TCPPod("127.0.0.1", "shop-pod"), UDPPod("127.0.0.1", "shop-pod")) as (tcp, udp):
        config = tmp_path / "config"
        config.mkdir()
        (config / "shop.yaml").write_text(_objects(tcp, udp, port))
        with tidegate_run(config, ("127.0.11.100", port), tmp_path / "tidegate.log", "--lb-classless") as proxy:
            assert _tcp("127.0.11.100", port) == "hello from shop-pod\n"
            assert _udp("127.0.11.100", port) == "shop-pod: ping"
            view = _view(proxy.admin_port)
            assert view["services"][0]["addresses"] == ["127.0.11.100"]
            assert view["pools"]["lab"]["assignedIPv4"] == 1 and view["pools"]["lab"]["availableIPv4"] == 3

            # A Service whose name sorts first arrives later, with wrong objects beside it.
            (config / "later.yaml").write_text(f"""
apiVersion: v1
kind: Service
metadata: {{name: aaa-first-by-name, namespace: default}}
spec: {{type: LoadBalancer, ports: [{{port: {port}}}]}}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: overlapping, namespace: metallb-system}}
spec: {{addresses: [127.0.11.96/28]}}
---
apiVersion: v1
kind: Service
metadata: {{name: nowhere, namespace: default, annotations: {{metallb.io/loadBalancerIPs: 10.255.0.1}}}}
spec: {{type: LoadBalancer, ports: [{{port: 80}}]}}
""")
            (config / "broken.yaml").write_text("""
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: broken, namespace: metallb-system}
spec: {addresses: [127.0.11.200-127.0.11.199]}
""")
            view = wait_until(lambda: (v := _view(proxy.admin_port)) and len(v["services"]) == 2 and v,
                              what="the second Service")
            addresses = {s["name"]: s["addresses"] for s in view["services"]}
            assert addresses == {"mmm-shop": ["127.0.11.100"], "aaa-first-by-name": ["127.0.11.101"]}
            assert view["refused"] == [{"namespace": "default", "name": "nowhere", "reason": "AddressNotInPool",
                                        "message": "10.255.0.1: in no IPAddressPool"}]
            assert "overlaps" in view["refusedPools"]["IPAddressPool metallb-system/overlapping"]
            log = (tmp_path / "tidegate.log").read_text()
            assert "IPAddressPool metallb-system/broken spec.addresses[0]: invalid address range" in log
            assert _tcp("127.0.11.100", port) == "hello from shop-pod\n"  # still served, same address
            assert _udp("127.0.11.100", port) == "shop-pod: ping"


def test_tcp_and_udp_ports_of_one_number_reach_their_own_target_ports():
    """A DNS Service has TCP 53 and UDP 53 with different pod ports: TCPRoute and UDPRoute, and a LoadBalancer
    address, each reach the port of their own protocol."""
    from tidegate.resources.loader import load_text
    from tidegate.translate import TranslateOptions, translate

    from tests.manifests import gateway

    text = gateway("127.0.0.1", "[{name: tcp, port: 5300, protocol: TCP}, {name: udp, port: 5300, protocol: UDP}]") + """
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: dns-tcp, namespace: default}
spec: {parentRefs: [{name: gw, sectionName: tcp}], rules: [{backendRefs: [{name: dns, port: 53}]}]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: UDPRoute
metadata: {name: dns-udp, namespace: default}
spec: {parentRefs: [{name: gw, sectionName: udp}], rules: [{backendRefs: [{name: dns, port: 53}]}]}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab, namespace: metallb-system}
spec: {addresses: [192.0.2.10/32]}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  type: LoadBalancer
  loadBalancerClass: tidegate.io/lb
  ports: [{name: dns-udp, port: 53, protocol: UDP, targetPort: 5353}, {name: dns-tcp, port: 53, targetPort: 5354}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: default, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns-udp, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354}]
endpoints: [{addresses: [10.0.0.1]}]
"""
    loaded = load_text(text, "dns.yaml")
    assert not loaded.errors, [str(e) for e in loaded.errors]
    listeners = translate(loaded.resources, TranslateOptions()).ir.listeners
    ports = {(l.protocol, l.address): [e.port for r in l.l4_routes for b in r.backends for e in b.endpoints]
             for l in listeners}
    assert ports == {("TCP", "127.0.0.1"): [5354], ("UDP", "127.0.0.1"): [5353], ("TCP", "192.0.2.10"): [5354],
                     ("UDP", "192.0.2.10"): [5353]}



def test_relays_keep_the_client_address_under_local_to_pods_off_the_hosts_network():
    """Under externalTrafficPolicy: Local on a named node, relays connect from the client's address, except
    to a pod on the host's network (its replies would not come back through the return path), when the
    Service asks for the PROXY protocol instead, and under Cluster (pods on other nodes answer directly)."""
    from tidegate.resources.loader import load_text
    from tidegate.translate import TranslateOptions, translate

    def service(name: str, policy: str, pod: str, annotations: str = "{}") -> str:
        return f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, annotations: {annotations}}}
spec: {{type: LoadBalancer, loadBalancerClass: tidegate.io/lb, externalTrafficPolicy: {policy},
        ports: [{{name: tcp, port: 80}}, {{name: udp, port: 53, protocol: UDP}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: tcp, port: 80}}, {{name: udp, port: 53, protocol: UDP}}]
endpoints: [{{addresses: ['{pod}'], nodeName: node-a}}]
"""
    text = """apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 192.0.2.1}, {type: Hostname, address: node-a}]}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab, namespace: metallb-system}
spec: {addresses: [198.51.100.0/28]}
""" + service("local", "Local", "10.244.1.2") + service("hostnet", "Local", "192.0.2.1") \
        + service("header", "Local", "10.244.1.3", "{tidegate.io/proxy-protocol: v2}") \
        + service("cluster", "Cluster", "10.244.1.4")
    loaded = load_text(text, "lb.yaml")
    assert not loaded.errors, [str(e) for e in loaded.errors]

    def kept(node: str) -> dict[str, bool]:
        listeners = translate(loaded.resources, TranslateOptions(node=node)).ir.listeners
        return {f"{b.name}": b.keep_client_address for l in listeners for r in l.l4_routes for b in r.backends}

    assert kept("node-a") == {"default/local:80": True, "default/local:53/UDP": True,
                              "default/hostnet:80": False, "default/hostnet:53/UDP": False,
                              "default/header:80": False, "default/header:53/UDP": True,
                              "default/cluster:80": False, "default/cluster:53/UDP": False}
    assert not any(kept("").values())  # no node named: nothing is known to be local

def test_a_gateway_address_from_a_pool_is_kept_from_services_and_served(tmp_path):
    """A Gateway whose spec.addresses names a pool address: the address manager keeps it from Services (a
    Service asking for it is refused, and the pool counts it), and the Gateway serves on it."""
    from tests.harness import request
    from tests.manifests import http_gateway, route, service
    from tests.scripted import scripted_backends

    gw_port, pod_port = free_port("127.0.12.5"), free_port("127.0.12.1")
    pods = [("127.0.12.1", pod_port, "pod-a")]
    with scripted_backends(*pods):
        config = tmp_path / "config"
        config.mkdir()
        (config / "all.yaml").write_text(http_gateway("127.0.12.5", gw_port) + service("app", pods)
                                         + route("app", "app.test", "- backendRefs: [{name: app, port: 80}]") + """
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab, namespace: metallb-system}
spec: {addresses: [127.0.12.4-127.0.12.7]}
---
apiVersion: v1
kind: Service
metadata: {name: wants-it, namespace: default, annotations: {metallb.io/loadBalancerIPs: 127.0.12.5}}
spec: {type: LoadBalancer, loadBalancerClass: tidegate.io/lb, ports: [{port: 80}]}
""")
        with tidegate_run(config, ("127.0.12.5", gw_port), tmp_path / "tidegate.log") as proxy:
            status, _, body = request("127.0.12.5", gw_port, "/", headers={"Host": "app.test"})
            assert status == 200 and json.loads(body)["pod"] == "pod-a"
            view = _view(proxy.admin_port)
            assert view["refused"][0]["name"] == "wants-it" and view["refused"][0]["reason"] == "SharingRefused"
            assert "Gateway default/gw" in view["refused"][0]["message"]
            assert view["pools"]["lab"]["assignedIPv4"] == 1


def test_proxy_protocol_headers_follow_haproxys_spec():
    from tidegate.dataplane.proxy_protocol import V2_SIGNATURE, header

    assert header("v1", ("192.0.2.7", 51000), ("198.51.100.1", 443)) == \
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n"
    assert header("v1", ("2001:db8::7", 51000), ("2001:db8::1", 80)) == b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 80\r\n"
    assert header("v1", ("::ffff:192.0.2.7", 1), ("192.0.2.1", 2)).startswith(b"PROXY TCP4 192.0.2.7 192.0.2.1")
    v2 = header("v2", ("192.0.2.7", 51000), ("198.51.100.1", 443))
    assert v2[:12] == V2_SIGNATURE and v2[12] == 0x21 and v2[13] == 0x11 and v2[14:16] == b"\x00\x0c"
    assert v2[16:20] == bytes([192, 0, 2, 7]) and v2[20:24] == bytes([198, 51, 100, 1])
    assert v2[24:28] == (51000).to_bytes(2, "big") + (443).to_bytes(2, "big") and len(v2) == 28
    v6 = header("v2", ("2001:db8::7", 1), ("2001:db8::1", 2))
    assert v6[13] == 0x21 and v6[14:16] == b"\x00\x24" and len(v6) == 16 + 36


NGINX = shutil.which("nginx")


@pytest.mark.skipif(NGINX is None, reason="Debian's nginx is not installed (scripts/test installs it)")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_pod_that_speaks_the_proxy_protocol_learns_the_client_address(tmp_path, version):
    """tidegate.io/proxy-protocol on a LoadBalancer Service: the relay tells the pod (a stock nginx with
    `listen ... proxy_protocol`) who the client is, though the connection comes from tidegate."""
    pod_port, lb_port = free_port("127.0.13.1"), free_port("127.0.13.100")
    (tmp_path / "nginx.conf").write_text(f"""
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy; fastcgi_temp_path {tmp_path}/fcgi;
  uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;
  server {{
    listen 127.0.13.1:{pod_port} proxy_protocol;
    location / {{ return 200 "client=$proxy_protocol_addr:$proxy_protocol_port seen-from=$remote_addr\\n"; }}
  }}
}}
""")
    config = tmp_path / "config"
    config.mkdir()
    (config / "shop.yaml").write_text(f"""
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: lab, namespace: metallb-system}}
spec: {{addresses: [127.0.13.100/32]}}
---
apiVersion: v1
kind: Service
metadata: {{name: shop, namespace: default, annotations: {{tidegate.io/proxy-protocol: {version}}}}}
spec:
  type: LoadBalancer
  loadBalancerClass: tidegate.io/lb
  ports: [{{name: http, port: {lb_port}, targetPort: {pod_port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: shop-1, namespace: default, labels: {{kubernetes.io/service-name: shop}}}}
addressType: IPv4
ports: [{{name: http, port: {pod_port}}}]
endpoints: [{{addresses: [127.0.13.1]}}]
""")
    with process([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
                 tmp_path / "nginx.log", ready=("127.0.13.1", pod_port)), \
            tidegate_run(config, ("127.0.13.100", lb_port), tmp_path / "tidegate.log"):
        with socket.socket() as client:
            client.bind(("127.0.0.77", 0))  # an address of its own, not tidegate's
            client.settimeout(5)
            client.connect(("127.0.13.100", lb_port))
            client.sendall(b"GET / HTTP/1.0\r\nHost: shop\r\n\r\n")
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
            port = client.getsockname()[1]
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert f"client=127.0.0.77:{port} seen-from=127.0.0.1".encode() in answer


def test_with_gateway_pods_agents_relay_a_gateways_pool_address_and_the_pods_listen_everywhere():
    """--gateway-pods: a node agent's translation relays each of the Gateway's ports on its pool address to
    its own node's Gateway pods (Local: only nodes with such a pod are candidates); the pods' translation
    listens on every address for that Gateway. A Service that is not there is an error, not a silent gap."""
    from tidegate.resources.loader import load_text
    from tidegate.translate import TranslateOptions, translate

    from tests.manifests import gateway

    text = gateway("192.0.2.50", "[{name: http, port: 80, protocol: HTTP}, {name: dns, port: 53, protocol: UDP}]") \
        + """---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab, namespace: metallb-system}
spec: {addresses: [192.0.2.50/32]}
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: lab, namespace: metallb-system}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Node
metadata: {name: node-c}
---
apiVersion: v1
kind: Service
metadata: {name: tidegate, namespace: tidegate-system}
spec: {ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: tidegate-1, namespace: tidegate-system, labels: {kubernetes.io/service-name: tidegate}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-a}
- {addresses: [10.244.2.5], nodeName: node-b}
- {addresses: [10.244.2.6], nodeName: node-b, conditions: {ready: false}}
"""
    loaded = load_text(text, "gw.yaml")
    assert not loaded.errors, [str(e) for e in loaded.errors]
    agent = translate(loaded.resources, TranslateOptions(node="node-b", gateway_pods="tidegate-system/tidegate"))
    relays = {l.name: [(e.address, e.port) for r in l.l4_routes for b in r.backends for e in b.endpoints]
              for l in agent.ir.listeners if l.gateway.startswith("service:")}
    assert relays == {"service:default/gw:53/UDP@192.0.2.50": [("10.244.2.5", 53)],
                      "service:default/gw:80/TCP@192.0.2.50": [("10.244.2.5", 80)]}
    [candidacy] = agent.load_balancers.l2
    assert candidacy.nodes == ("node-a", "node-b") and candidacy.services == ("Gateway default/gw",)
    pods = translate(loaded.resources, TranslateOptions(gateway_addresses_relayed=True))
    assert {(l.address, l.port, l.freebind) for l in pods.ir.listeners if l.gateway == "default/gw"} == {
        ("", 80, False), ("", 53, False)}
    gateway_status = next(s for k, s in pods.statuses.items() if k.kind == "Gateway")
    assert gateway_status["addresses"] == [{"type": "IPAddress", "value": "192.0.2.50"}]
    missing = translate(loaded.resources, TranslateOptions(node="node-b", gateway_pods="tidegate-system/nope"))
    assert any("no Service tidegate-system/nope" in n.message for n in missing.notes)
    assert not missing.load_balancers.l2
