"""YAML snippets the end-to-end tests share: a GatewayClass of tidegate's, a Gateway, a Service with pods."""

from __future__ import annotations

import textwrap


def gateway(address: str, listeners: str, name: str = "gw") -> str:
    """tidegate's GatewayClass and a Gateway bound to `address` (listeners: a YAML flow list)."""
    return textwrap.dedent(f"""
    apiVersion: gateway.networking.k8s.io/v1
    kind: GatewayClass
    metadata: {{name: tidegate}}
    spec: {{controllerName: tidegate.io/gateway-controller}}
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: {{name: {name}, namespace: default}}
    spec:
      gatewayClassName: tidegate
      addresses: [{{value: {address}}}]
      listeners: {listeners}
    """)


def http_gateway(address: str, port: int) -> str:
    return gateway(address, f"[{{name: http, port: {port}, protocol: HTTP}}]")


def service(name: str, pods: list[tuple[str, int, str]], app_protocol: str = "") -> str:
    """A Service and the EndpointSlice a cluster would make for it: pods are (address, port, pod name)."""
    endpoints = "".join(f"\n  - addresses: [{ip}]\n    targetRef: {{kind: Pod, name: {pod}}}" for ip, _, pod in pods)
    port = pods[0][1] if pods else 9
    protocol = f", appProtocol: {app_protocol}" if app_protocol else ""
    return textwrap.dedent(f"""
    ---
    apiVersion: v1
    kind: Service
    metadata: {{name: {name}, namespace: default}}
    spec: {{ports: [{{name: http, port: 80, targetPort: {port}{protocol}}}]}}
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
    addressType: IPv4
    ports: [{{name: http, port: {port}}}]
    endpoints:""") + (endpoints if pods else " []") + "\n"


def route(name: str, host: str, rule: str) -> str:
    """An HTTPRoute on Gateway "gw" for one hostname (any when empty); `rule` is the YAML of its rules list."""
    hostnames = f"hostnames: [{host}]" if host else ""
    return textwrap.dedent(f"""
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{name: {name}, namespace: default}}
    spec:
      parentRefs: [{{name: gw}}]
      {hostnames}
      rules:
    """) + textwrap.indent(textwrap.dedent(rule).strip("\n"), "    ") + "\n"


# tidegate's IngressClass, the default one (Ingresses that name no class are served)
DEFAULT_INGRESS_CLASS = """---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: tidegate
  annotations: {ingressclass.kubernetes.io/is-default-class: "true"}
spec: {controller: tidegate.io/ingress-controller}
"""


def backend_policy(name: str, service_name: str, spec: str) -> str:
    """A BackendPolicy on one Service; `spec` is the YAML of its settings besides targetRefs."""
    return textwrap.dedent(f"""
    ---
    apiVersion: tidegate.io/v1alpha1
    kind: BackendPolicy
    metadata: {{name: {name}, namespace: default}}
    spec:
      targetRefs: [{{group: "", kind: Service, name: {service_name}}}]
    """) + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n"


def actively_checked_app(gateway_address: str, port: int, pods: list[tuple[str, int, str]]) -> str:
    """Gateway, Service "app" on host app.test, and a BackendPolicy checking /healthz every 100 ms, one
    failure or success being enough to change an endpoint's health."""
    return (http_gateway(gateway_address, port) + service("app", pods)
            + route("app", "app.test", "- backendRefs: [{name: app, port: 80}]")
            + backend_policy("app", "app", """
                healthCheck:
                  active: {type: HTTP, http: {path: /healthz}, interval: 100ms, timeout: 500ms,
                           unhealthyThreshold: 1, healthyThreshold: 1, jitterPercent: 0}"""))
