"""Control-plane benchmark: load (validate + default) and translate N HTTPRoutes; print time and peak memory.

    .venv/bin/python benchmarks/translate_routes.py [--routes 10000]

Not a test: it reports numbers. Each route has its own hostname, two path matches and a header match, and
points at one of 100 Services with an EndpointSlice each.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc

from tidegate.resources.loader import load_text
from tidegate.router import Request, routers_by_port
from tidegate.translate import translate


def manifests(routes: int, services: int = 100) -> str:
    docs = ["""apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: tidegate}
spec: {controllerName: tidegate.io/gateway-controller}
""", """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: tidegate
  listeners: [{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}]
"""]
    for s in range(services):
        docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: svc-{s}, namespace: default}}
spec: {{ports: [{{name: http, port: 80, targetPort: 8080}}]}}
""")
        docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc-{s}-x, namespace: default, labels: {{kubernetes.io/service-name: svc-{s}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.0.{s}.1]}}, {{addresses: [10.0.{s}.2]}}]
""")
    for r in range(routes):
        docs.append(f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: route-{r}, namespace: default}}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: [app-{r}.example.com]
  rules:
    - matches:
        - path: {{type: PathPrefix, value: /api/v{r % 7}}}
          headers: [{{name: x-tenant, value: t{r % 13}}}]
        - path: {{type: Exact, value: /health}}
      backendRefs: [{{name: svc-{r % services}, port: 80}}]
""")
    return "---\n".join(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=10_000)
    args = parser.parse_args()
    text = manifests(args.routes)
    load_text("apiVersion: v1\nkind: Service\nmetadata: {name: warm}\nspec: {ports: [{port: 1}]}\n", "warm-up")

    t0 = time.perf_counter()
    loaded = load_text(text, "bench")
    t1 = time.perf_counter()
    assert not loaded.errors, loaded.errors[:3]
    result = translate(loaded.resources)
    t2 = time.perf_counter()
    routers = routers_by_port(result.ir)
    t3 = time.perf_counter()
    # The process's peak so far: the interpreter, the manifests' text, and the loaded, translated and compiled
    # configuration, as a running tidegate holds them (before the second pass below adds a copy).
    serving_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # A second pass under tracemalloc (which slows Python down) for the memory figure only.
    del result, routers
    tracemalloc.start()
    loaded_again = load_text(text, "bench")
    routers = routers_by_port(translate(loaded_again.resources).ir)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    router = routers[("", 80)]
    lookups = 20_000
    t4 = time.perf_counter()
    for i in range(lookups):
        r = i % args.routes
        found = router.lookup(Request(host=f"app-{r}.example.com", path=f"/api/v{r % 7}/items",
                                      headers={"x-tenant": f"t{r % 13}"}))
        assert found is not None
    t5 = time.perf_counter()

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"routes                 {args.routes}")
    print(f"load+validate          {t1 - t0:8.3f} s  ({len(loaded.resources)} resources)")
    print(f"translate              {t2 - t1:8.3f} s")
    print(f"compile route table    {t3 - t2:8.3f} s")
    print(f"peak traced memory     {peak / 2**20:8.1f} MiB (Python allocations of load + translate + compile)")
    print(f"max RSS                {serving_rss_mb:8.1f} MiB (whole process, after load + translate + compile)")
    print(f"max RSS, second pass   {rss_mb:8.1f} MiB (the first pass still held, with tracemalloc's own records)")
    print(f"lookup                 {(t5 - t4) / lookups * 1e6:8.2f} µs per request ({lookups} lookups)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
