"""The `tidegate` command and its subcommands (run, validate, status, routes, explain, simulate, echo): the\ncommand line and what each command prints. `tidegate run` itself is app.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import yaml

from tidegate import __version__, compiled
from tidegate.announce.election import assign
from tidegate.resources.loader import LoadResult, load_paths
from tidegate.router import Request, explain, routers_by_port
from tidegate.translate import TranslateOptions, Translation, translate
from tidegate.translate.loadbalancers import with_announcements

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> Any:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _str_presenter)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidegate",
        description="One program for Kubernetes load balancing: a Gateway API and Ingress controller with its "
                    "own data plane. Reads ordinary Kubernetes YAML from files, or watches a cluster.")
    # Printed by main, on one line (argparse's version action wraps it to the terminal's width).
    parser.add_argument("--version", action="store_true",
                        help="print the version, and whether the request path runs compiled, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser, positional: bool = True) -> None:
        if positional:
            p.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or directories (read recursively)")
        p.add_argument("--namespace", default="default",
                       help="namespace for namespaced resources that name none (default: %(default)s)")
        p.add_argument("--address", default="", help="address to report in Gateway and Ingress status")
        p.add_argument("--ingress-http-port", type=int, default=80, help="port serving Ingress over HTTP")
        p.add_argument("--ingress-https-port", type=int, default=443, help="port serving Ingress over HTTPS")
        p.add_argument("--watch-ingress-without-class", action="store_true",
                       help="also serve Ingresses that name no IngressClass (ingress-nginx's flag of that name; "
                            "without it, only when tidegate's IngressClass is the default)")
        lb = p.add_argument_group("LoadBalancer Services", "addresses from MetalLB's IPAddressPools (README: Bare metal)")
        lb.add_argument("--lb-class", default="tidegate.io/lb", metavar="CLASS",
                        help="take LoadBalancer Services whose spec.loadBalancerClass is CLASS (default: %(default)s)")
        lb.add_argument("--lb-classless", action="store_true",
                        help="also take LoadBalancer Services with no loadBalancerClass (as MetalLB does: once "
                             "MetalLB is gone)")
        lb.add_argument("--node", default=os.environ.get("NODE_NAME", ""), metavar="NAME",
                        help="the node this runs on: its pods are the local ones for externalTrafficPolicy: Local, "
                             "and it announces the addresses given to it (default: $NODE_NAME)")
        lb.add_argument("--gateway-pods", default="", metavar="NAMESPACE/SERVICE",
                        help="the Service whose pods serve the Gateways (deploy/bare-metal: tidegate-system/tidegate): "
                             "node agents relay a Gateway's pool address to them, and they listen on every "
                             "address for it")

    run = sub.add_parser("run", help="load resources, keep them translated, and watch for changes",
                         description="Load Kubernetes YAML, translate it and keep watching the files: each change "
                                     "is validated, and a broken edit keeps the last good version serving.")
    run.add_argument("-f", "--file", dest="paths", action="append", default=[], metavar="PATH",
                     help="file or directory to read (repeatable)")
    kube = run.add_argument_group("Kubernetes", "watch an API server (--kubernetes) instead of, or as well as, files")
    kube.add_argument("--kubernetes", action="store_true",
                      help="list and watch the cluster; write status (the leader only)")
    kube.add_argument("--kubeconfig", default=None, metavar="PATH",
                      help="kubeconfig file (default: in-cluster, then $KUBECONFIG, then ~/.kube/config)")
    kube.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    kube.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "tidegate-system"),
                      help="namespace of the leader-election Lease (default: $POD_NAMESPACE or %(default)s)")
    kube.add_argument("--lease-name", default="tidegate-leader", help="name of the Lease (default: %(default)s)")
    kube.add_argument("--identity", default=os.environ.get("POD_NAME") or socket.gethostname(),
                      help="this replica's name in the Lease (default: $POD_NAME or the host name)")
    kube.add_argument("--lease-duration", type=float, default=15.0,
                      help="seconds a leader's lease lasts without renewal (default: %(default)s)")
    kube.add_argument("--renew-deadline", type=float, default=10.0,
                      help="seconds the leader keeps trying to renew before it steps down (default: %(default)s)")
    kube.add_argument("--retry-period", type=float, default=2.0,
                      help="seconds between tries to take or renew the lease (default: %(default)s)")
    common(run, positional=False)
    run.add_argument("--once", action="store_true", help="translate once and exit instead of serving")
    run.add_argument("--admin", default="127.0.0.1:9900", metavar="ADDR:PORT",
                     help="admin listener: /healthz, /readyz, /metrics, /api/v1 (default: %(default)s; 'off' "
                          "for none)")
    run.add_argument("--admin-token-file", default="", metavar="PATH",
                     help="file holding the bearer token every admin client must send (kubelet probes excepted); "
                          "or set TIDEGATE_ADMIN_TOKEN. Without one, only loopback clients are answered")
    run.add_argument("--admin-trust-loopback", action="store_true",
                     help="with a token, let loopback clients in without it (not behind a mesh sidecar, which "
                          "relays remote clients from a loopback address)")
    run.add_argument("--admin-token", dest="admin_token_on_command_line", default=None, help=argparse.SUPPRESS)
    run.add_argument("--metrics", default="off", metavar="ADDR:PORT",
                     help="a listener for /metrics (and /healthz) alone, open to anyone: for Prometheus scrapes "
                          "that carry no token (default: off; /metrics is on the admin listener too)")
    run.add_argument("--access-log", default="off", choices=["off", "json", "clf", "combined"],
                     help="access log format: JSON lines, Common or Combined Log Format (default: %(default)s)")
    run.add_argument("--access-log-file", default="-", metavar="PATH", help="where access log lines go (default: "
                                                                            "stdout)")
    run.add_argument("--access-log-sample", type=float, default=1.0, metavar="FRACTION",
                     help="log this fraction of requests (default: all)")
    run.add_argument("--access-log-status", default="", metavar="N[-M]",
                     help="log only responses with these status codes, e.g. 400-599")
    run.add_argument("--grace", type=float, default=10.0,
                     help="seconds that in-flight requests get to finish on SIGTERM (default: %(default)s)")
    run.add_argument("--workers", type=int, default=1, metavar="N",
                     help="data-plane processes sharing the listening ports (SO_REUSEPORT; default: %(default)s)")
    limits = run.add_argument_group("global rate limits", "TrafficPolicy rules with scope: Global (README: Edge "
                                                          "protection)")
    limits.add_argument("--rate-limit-redis", default=os.environ.get("TIDEGATE_RATE_LIMIT_REDIS", ""),
                        metavar="URL", help="count Global rate limits in this Redis: redis://[:PASSWORD@]HOST:PORT/DB "
                                            "or rediss://... (default: $TIDEGATE_RATE_LIMIT_REDIS; none: Global "
                                            "rules count per replica)")
    limits.add_argument("--rate-limit-redis-timeout", type=float, default=0.05, metavar="SECONDS",
                        help="the longest a request waits on Redis before the rule's failMode decides "
                             "(default: %(default)s)")
    limits.add_argument("--rate-limit-replicas", type=int, default=1, metavar="N",
                        help="replicas sharing a Global limit: without Redis (or with Redis down under "
                             "FallBackToLocal) each admits 1/N of it (default: %(default)s)")
    acme = run.add_argument_group("ACME", "certificates ordered from an ACME CA (AcmeIssuer, ClusterAcmeIssuer)")
    acme.add_argument("--acme-dir", default="", metavar="DIR",
                      help="where ACME accounts, pending challenges and certificates are kept; replicas that "
                           "share it order one at a time and answer each other's challenges (file mode)")
    acme.add_argument("--acme-backoff", type=float, default=120.0, metavar="SECONDS",
                      help="the wait after a failed order, doubled after each further failure up to 6 hours "
                           "(default: %(default)s)")
    run.add_argument("--bind", default="0.0.0.0",
                     help="address for listeners whose Gateway has no spec.addresses (default: %(default)s)")
    limits = run.add_argument_group("deadlines", "defaults for every listener (README: Limits and defaults)")
    limits.add_argument("--request-head-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="a request head must be complete within this; else 408 (default: %(default)s)")
    limits.add_argument("--request-body-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="a request body must bring 1 KiB in every this many seconds; else 408 (default: "
                             "%(default)s)")
    limits.add_argument("--idle-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="a keep-alive or HTTP/2 connection with nothing to do is closed after this (default: "
                             "%(default)s)")
    limits.add_argument("--send-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="a client that reads nothing of its answer for this long is cut off (default: "
                             "%(default)s)")
    limits.add_argument("--tls-handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="an HTTPS client's TLS handshake must be done within this; else the connection is "
                             "closed (default: %(default)s)")
    limits.add_argument("--upstream-read-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="a pod that sends nothing for this long while its answer is awaited: 504 (default: "
                             "%(default)s)")
    run.add_argument("--serve", choices=["all", "loadbalancers"], default="all",
                     help="what this process serves: everything (default), or only LoadBalancer Services' "
                          "addresses, as the node agent of deploy/bare-metal does (it writes no status)")
    l2 = run.add_argument_group("Layer 2 announcement", "with --node: answer ARP and neighbour solicitations for "
                                "the LoadBalancer addresses this node announces (README: Bare metal)")
    l2.add_argument("--heartbeat-port", type=int, default=7473, metavar="PORT",
                    help="UDP port where each node's workers answer the other nodes' heartbeats; the port above "
                         "it sends them and hears goodbyes (default: %(default)s)")
    l2.add_argument("--node-timeout", type=float, default=2.0, metavar="SECONDS",
                    help="a node whose workers have not answered for this long is down, and its addresses move "
                         "(default: %(default)s)")
    l2.add_argument("--l2-refresh", type=float, default=10.0, metavar="SECONDS",
                    help="send gratuitous ARP / unsolicited neighbour advertisements this often while announcing, "
                         "not only at takeover (default: %(default)s)")
    run.add_argument("--node-ports", action="store_true",
                     help="serve NodePort and LoadBalancer Services' node ports on every address (--bind), straight "
                          "to the pods, and answer their healthCheckNodePorts as kube-proxy does: for clusters "
                          "without kube-proxy (README: NodePorts)")
    l2.add_argument("--no-transparent", action="store_true",
                    help="under externalTrafficPolicy: Local, do not connect to pods from the client's address "
                         "(which needs an nftables rule and a policy route on the node): pods then see the node's "
                         "address, unless the Service asks for the PROXY protocol")
    run.add_argument("--zone", default=os.environ.get("TIDEGATE_ZONE", ""),
                     help="the zone tidegate runs in, for EndpointSlice topology hints and zone-aware balancing "
                          "(default: $TIDEGATE_ZONE)")

    sim = sub.add_parser("simulate", help="show how a Service's traffic would spread over its pods: through "
                                           "tidegate, and through a node-level balancer with and without node "
                                           "weights")
    common(sim)
    sim.add_argument("--requests", type=int, default=10_000, help="requests to play (default: %(default)s)")
    sim.add_argument("--service", default="", metavar="NAMESPACE/NAME", help="only this Service")
    sim.add_argument("--json", action="store_true", help="print JSON instead of a table")

    echo = sub.add_parser("echo", help="run echo servers that answer like the Gateway API conformance echo server",
                          description="Answer every request with JSON describing it (path, host, method, "
                                      "headers, namespace, pod, ...), as the conformance suite's echo server.")
    echo.add_argument("--listen", action="append", required=True, metavar="ADDR:PORT[=NAMESPACE/POD]",
                      help="where to listen, and the pod identity to report; append +tls to serve TLS there "
                           "(repeatable)")
    echo.add_argument("--log-requests", action="store_true", help="print one line per request to stdout")
    echo.add_argument("--tls-cert", metavar="FILE", help="PEM certificate for listeners marked +tls")
    echo.add_argument("--tls-key", metavar="FILE", help="PEM private key for listeners marked +tls")
    echo.add_argument("--tls-client-ca", metavar="FILE", help="CA certificates to verify client certificates "
                                                              "against (when a client presents one)")

    nodeports = sub.add_parser("nodeports", help="NodePorts without conflicts: check a set of files (and a "
                                                 "cluster), or fill the missing ports (README: NodePorts)")
    nodeports_sub = nodeports.add_subparsers(dest="nodeports_command", metavar="check|allocate", required=True)
    for name, text in (("check", "report duplicate node ports, ports out of range or in the dynamic band, "
                                 "clashes with hostPorts, tidegate's own listeners and shared addresses; exit 1 "
                                 "on any"),
                       ("allocate", "give every Service port that needs a node port and has none a free one "
                                    "(the same on every run); print the Services' merge patches")):
        np = nodeports_sub.add_parser(name, help=text, description=text)
        np.add_argument("paths", nargs="*", metavar="PATH", help="YAML files or directories (read recursively)")
        common(np, positional=False)
        np.add_argument("--range", default="30000-32767", metavar="LOW-HIGH",
                        help="the cluster's --service-node-port-range (default: %(default)s)")
        np.add_argument("--kubernetes", action="store_true",
                        help="also read a cluster's Services and running Pods (the files' objects take the place "
                             "of the cluster's of the same name: what is about to be applied)")
        np.add_argument("--kubeconfig", default=None, metavar="PATH",
                        help="kubeconfig file (default: in-cluster, then $KUBECONFIG, then ~/.kube/config)")
        np.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
        if name == "allocate":
            np.add_argument("--kubectl", action="store_true",
                            help="print `kubectl patch` commands instead of YAML patches")

    validate = sub.add_parser("validate", help="check resources against the Gateway API and Kubernetes schemas",
                              description="Validate every document (schema, defaults, CEL rules). Exit 1 on errors.")
    common(validate)

    status = sub.add_parser("status", help="print the status tidegate computes for every resource, as YAML")
    common(status)

    routes = sub.add_parser("routes", help="print the route table: listeners, hostnames, matches, backends")
    common(routes)

    conv = sub.add_parser("convert", help="Ingress objects (with ingress-nginx's annotations) as Gateway API objects",
                          description="Convert the Ingresses among the resources to a Gateway, HTTPRoutes and "
                                      "ReferenceGrants, with a report per Ingress and field. Exit 1 when anything "
                                      "is unsupported or refused (or, with --fail-on approximated, approximated).")
    common(conv)
    conv.add_argument("-o", "--output", default="-", metavar="DIR|-",
                      help="where to write the objects: - (standard output, default) or a directory")
    conv.add_argument("--gateway", default="", metavar="NS/NAME",
                      help="attach the HTTPRoutes to this existing Gateway (listeners http and https) instead of "
                           "writing one")
    conv.add_argument("--report", default="", metavar="FILE", help="also write the report as JSON (.json) or YAML")
    conv.add_argument("--fail-on", choices=["unsupported", "approximated"], default="unsupported",
                      help="what makes the exit code 1 (default: %(default)s, and refused)")
    conv.add_argument("--all", action="store_true",
                      help="write the other resources too (Services, EndpointSlices, Secrets...), so that the output "
                           "alone serves as the input did: for tidegate diff and tidegate run")

    diff = sub.add_parser("diff", help="which requests change where they go between two configurations",
                          description="Answer, from the route tables alone, the requests that tell the rules of "
                                      "either side apart; print those answered differently. Exit 1 when any is.")
    diff.add_argument("old", metavar="OLD", help="a YAML file or directory: the configuration before")
    diff.add_argument("new", metavar="NEW", help="a YAML file or directory: the configuration after")
    common(diff, positional=False)

    exp = sub.add_parser("explain", help="show which listener, route and rule serve a request, and why others "
                                         "do not")
    common(exp)
    exp.add_argument("--url", required=True, help="request URL, e.g. http://app.example.com:8080/path?q=1")
    exp.add_argument("-X", "--request", dest="method", default="GET", help="HTTP method (default: GET)")
    exp.add_argument("--client-ip", default="", metavar="ADDRESS",
                     help="the client's address: say what the route's TrafficPolicy would decide for it")
    exp.add_argument("-H", "--header", dest="headers", action="append", default=[], metavar="'NAME: VALUE'",
                     help="request header (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"tidegate {__version__} (request path {compiled.describe()})")
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # errors without tracebacks, unless asked for
        if os.environ.get("TIDEGATE_DEBUG"):
            raise
        print(f"tidegate: error: {exc} (set TIDEGATE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 70


def options_for(args: argparse.Namespace, last: Translation | None = None) -> TranslateOptions:
    """The translator's options; `last` (the translation in force) gives the LoadBalancer addresses to keep."""
    # Without --address, a specific --bind address is the one clients reach.
    bind = getattr(args, "bind", "")
    address = args.address or (bind if bind not in ("", "0.0.0.0", "::") else "")
    held = tuple(sorted((key, a.addresses) for key, a in last.load_balancers.allocation.assignments.items())
                 ) if last is not None else ()
    # --gateway-pods: a node agent relays to those pods; one of those pods is reached through the agents
    agent = getattr(args, "serve", "all") == "loadbalancers"
    return TranslateOptions(address=address, ingress_http_port=args.ingress_http_port,
                            ingress_https_port=args.ingress_https_port, node=args.node, lb_class=args.lb_class,
                            lb_classless=args.lb_classless, lb_held=held,
                            gateway_pods=args.gateway_pods if agent else "",
                            gateway_addresses_relayed=bool(args.gateway_pods) and not agent,
                            node_ports=getattr(args, "node_ports", False),
                            ingress_without_class=getattr(args, "watch_ingress_without_class", False))


def _load(args: argparse.Namespace) -> LoadResult:
    result = load_paths(args.paths, default_namespace=args.namespace)
    for problem in result.problems:
        print(f"{problem.severity}: {problem}", file=sys.stderr)
    return result


def _report_notes(translation: Translation) -> None:
    for note in translation.notes:
        print(f"{note.severity}: {note}", file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "echo":
        return asyncio.run(_echo(args.listen, args.log_requests, args.tls_cert, args.tls_key, args.tls_client_ca))
    if args.command == "nodeports":
        return _nodeports(args)
    if args.command == "diff":
        return _diff(args)
    if args.command == "convert":
        return _convert(args)
    result = _load(args)
    if args.command == "validate":
        # What only shows across objects (overlapping pools, a Service refused an address) comes from
        # translating what loaded.
        translation = translate(result.resources, options_for(args))
        _report_notes(translation)
        for (namespace, name), refusal in sorted(translation.load_balancers.allocation.refusals.items()):
            print(f"warning: Service {namespace}/{name}: no address ({refusal.reason}): {refusal.message}",
                  file=sys.stderr)
        errors = len(result.errors) + sum(1 for n in translation.notes if n.severity == "error")
        print(f"{len(result.resources)} resources valid, {errors} error(s)", file=sys.stderr if errors else sys.stdout)
        return EXIT_INVALID if errors else EXIT_OK
    translation = translate(result.resources, options_for(args))
    _report_notes(translation)
    if args.command == "status":
        # Offline: who would announce each Layer 2 address with every node up (a running node's admin API
        # says who does).
        chosen = assign(translation.load_balancers.l2, None)
        announcements = [{"address": c.address, "services": c.services, "node": chosen.get(c.address)}
                         for c in translation.load_balancers.l2]
        # With --node: the BGP routes that node would announce for each Service.
        from tidegate.observe.admin import planned_bgp

        print(dump_yaml(with_announcements(statuses_as_data(translation), announcements,
                                           planned_bgp(translation.load_balancers.bgp))), end="")
    elif args.command == "routes":
        print(format_routes(translation), end="")
    elif args.command == "explain":
        return _explain(args, translation)
    elif args.command == "simulate":
        return _simulate(args, result)
    return EXIT_INVALID if result.errors else EXIT_OK


def _convert(args: argparse.Namespace) -> int:
    from tidegate.convert import convert

    if args.gateway and args.gateway.count("/") != 1:
        print(f"tidegate: error: --gateway {args.gateway!r} is not NAMESPACE/NAME", file=sys.stderr)
        return EXIT_USAGE
    result = _load(args)
    if result.errors:
        print("tidegate: error: the input does not load (above): nothing converted", file=sys.stderr)
        return EXIT_USAGE
    objects, report = convert(result.resources, args.gateway, options_for(args))
    if args.all:
        objects += [r.obj for r in result.resources if r.kind not in ("Ingress", "IngressClass")]
    text = "".join("---\n" + dump_yaml(obj) for obj in objects)
    if args.output == "-":
        print(text, end="")
    else:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "converted.yaml"), "w") as out:
            out.write(text)
    for entry in report:
        print(f"{entry.verdict}: Ingress {entry.ingress}: {entry.field}" + (f": {entry.note}" if entry.note else ""),
              file=sys.stderr)
    if args.report:
        data = [{"ingress": e.ingress, "field": e.field, "verdict": e.verdict, "note": e.note} for e in report]
        with open(args.report, "w") as out:
            out.write(json.dumps(data, indent=1) + "\n" if args.report.endswith(".json") else dump_yaml(data))
    failing = {"unsupported", "refused"} | ({"approximated"} if args.fail_on == "approximated" else set())
    return EXIT_INVALID if any(e.verdict in failing for e in report) else EXIT_OK


def _diff(args: argparse.Namespace) -> int:
    from tidegate.diff import compare

    sides = []
    for path in (args.old, args.new):
        loaded = load_paths([path], default_namespace=args.namespace)
        for problem in loaded.problems:
            print(f"{problem.severity}: {problem}", file=sys.stderr)
        if loaded.errors:
            print(f"tidegate: error: {path} does not load (above): nothing compared", file=sys.stderr)
            return EXIT_USAGE
        sides.append(translate(loaded.resources, options_for(args)).ir)
    report = compare(*sides)
    print(report.text(), end="")
    return EXIT_INVALID if report.differences else EXIT_OK


def statuses_as_data(translation: Translation) -> list[dict[str, Any]]:
    return [{"kind": key.kind, "namespace": key.namespace or None, "name": key.name, "status": status}
            if key.namespace else {"kind": key.kind, "name": key.name, "status": status}
            for key, status in translation.statuses.items()]


def format_routes(translation: Translation) -> str:
    lines: list[str] = []
    for listener in translation.ir.listeners:
        addr = listener.address or "*"
        lines.append(f"LISTENER {listener.name}  {listener.protocol} {addr}:{listener.port}"
                     + (f"  hostname {listener.hostname}" if listener.hostname else ""))
        if listener.tls:
            certs = ", ".join(c.secret for c in listener.tls.certificates) or "-"
            lines.append(f"  tls {listener.tls.mode}  certificates: {certs}")
        for route in listener.http_routes:
            lines.append(f"  ROUTE {route.name}  ({route.source})")
            lines.append(f"    hosts    {', '.join(route.hostnames)}")
            for match in route.matches:
                parts = [f"{match.path.type} {match.path.value}"]
                if match.method:
                    parts.append(f"method={match.method}")
                parts += [f"header {h.name}{'=' if h.type == 'Exact' else '~'}{h.value}" for h in match.headers]
                parts += [f"query {q.name}{'=' if q.type == 'Exact' else '~'}{q.value}" for q in match.query]
                lines.append(f"    match    {'  '.join(parts)}")
            for f in route.filters:
                lines.append(f"    filter   {f.type} {_compact(f.config)}")
            if route.direct_status:
                lines.append(f"    answers  {route.direct_status}")
            if route.guard is not None:
                lines += [f"    guard    {line}" for line in guard_lines(route.guard)]
            lines += _backend_lines(route.backends)
        for l4 in listener.l4_routes:
            lines.append(f"  ROUTE {l4.name}  ({l4.source})")
            if l4.hostnames:
                lines.append(f"    sni      {', '.join(l4.hostnames)}")
            lines += _backend_lines(l4.backends)
    if not lines:
        lines.append("no listeners: no Gateway of tidegate's class, and no Ingress of tidegate's IngressClass")
    return "\n".join(lines) + "\n"


def _backend_lines(backends: Sequence[Any]) -> list[str]:
    lines = []
    for b in backends:
        if b.invalid:
            lines.append(f"    backend  {b.name}  weight {b.weight}  INVALID: {b.invalid}")
            continue
        eps = ", ".join(f"{e.address}:{e.port}" + ("" if e.ready else " (not ready)")
                        + ("" if e.weight == 1 else f" (weight {e.weight})") for e in b.endpoints)
        lines.append(f"    backend  {b.name}  weight {b.weight}  endpoints: {eps or 'none'}")
        if b.policy is not None:
            lines += [f"      policy {line}" for line in policy_lines(b.policy)]
    return lines


def policy_lines(policy: Any) -> list[str]:
    """Each section of a backend's BackendPolicy in force, in words, with where it came from."""
    def seconds(value: float | None) -> str:
        return "none" if value is None else (f"{value * 1000:g}ms" if value < 1 else f"{value:g}s")

    said: dict[str, str] = {}
    algorithm = policy.algorithm
    if policy.hash is not None:
        h = policy.hash
        algorithm += f" by {h.type}" + (f" {h.name}" if h.name else "")
        if h.cookie_ttl is not None:
            algorithm += (f" (sticky cookie for {h.cookie_path}, "
                          + (f"ttl {seconds(h.cookie_ttl)}" if h.cookie_ttl else "a session cookie") + ")")
    if policy.slow_start:
        algorithm += f", slow start {seconds(policy.slow_start)}"
    if policy.zone_aware is not None:
        algorithm += f", zone-aware (at least {policy.zone_aware[0]} local, spill at {policy.zone_aware[1]}× load)"
    said["loadBalancer"] = algorithm
    if policy.health_check is not None:
        c = policy.health_check
        what = f"{c.method} {c.path}" if c.type == "HTTP" else "TCP connect"
        said["healthCheck.active"] = (f"{what} every {seconds(c.interval)}, timeout {seconds(c.timeout)}, "
                                      f"down after {c.unhealthy_threshold}, up after {c.healthy_threshold}")
    if policy.outlier is not None:
        o = policy.outlier
        counts = [f"{o.consecutive_5xx} 5xx" if o.consecutive_5xx else "",
                  f"{o.consecutive_gateway_errors} gateway errors" if o.consecutive_gateway_errors else ""]
        said["healthCheck.passive"] = (f"eject after {' or '.join(c for c in counts if c)} in a row, for "
                                       f"{seconds(o.base_ejection_time)} × the ejections in a row (max "
                                       f"{seconds(o.max_ejection_time)}), at most {o.max_ejection_percent}%")
    if policy.retry is not None:
        r = policy.retry
        said["retry"] = (f"{r.attempts} on {', '.join(r.retry_on)}"
                         + (f" {list(r.status_codes)}" if r.status_codes else "")
                         + f", per try {seconds(r.per_try_timeout)}, budget {r.budget_percent}% + "
                           f"{r.budget_min_per_second}/s")
    timeouts = {"connect": policy.connect_timeout, "request": policy.request_timeout, "idle": policy.idle_timeout,
                "read": policy.read_timeout}
    said["timeouts"] = ", ".join(f"{k} {seconds(v)}" for k, v in timeouts.items() if v is not None)
    if policy.circuit_breaker is not None:
        cb = policy.circuit_breaker
        limits = {"connections": cb.max_connections, "pending": cb.max_pending_requests,
                  "requests": cb.max_requests, "retries": cb.max_retries}
        said["circuitBreaker"] = "max " + ", ".join(f"{k} {v}" for k, v in limits.items() if v is not None)
    return [f"{section}: {said.get(section, '')}  <- {origin}" for section, origin in policy.origins]


def guard_lines(guard: Any, client_ip: str = "", request: Any = None) -> list[str]:
    """Each section of a rule's TrafficPolicy in force, in words, with where it came from; with a client
    address (and the request), what it would decide."""
    from tidegate.dataplane.guard import AddressSet, RateRule

    if guard.problem:
        return [f"invalid: {guard.problem} (the rule answers 500)"]
    said: dict[str, str] = {}
    access = []
    if guard.allow:
        access.append(f"allow {', '.join(guard.allow)}")
    if guard.deny:
        access.append(f"deny {', '.join(guard.deny)}")
    if client_ip and access:
        denied = bool(guard.deny) and client_ip in AddressSet(guard.deny)
        refused = denied or (bool(guard.allow) and client_ip not in AddressSet(guard.allow))
        access.append(f"→ {client_ip}: " + ("403 (denied)" if denied else "403 (not allowed)" if refused
                                            else "let in"))
    said["ipAccess"] = "; ".join(access)
    limits = []
    if guard.max_body is not None:
        limits.append(f"body at most {guard.max_body} bytes (413)")
    if guard.max_in_flight_per_client is not None:
        limits.append(f"{guard.max_in_flight_per_client} in flight per client (429)")
    said["requestLimits"] = ", ".join(limits)
    rules = []
    for rule in guard.rate_limits:
        short = rule.name.rpartition(": ")[2]
        text = f"{short}: exempt" if rule.exempt else (
            f"{short}: {rule.requests} per {rule.period:g}s, burst {rule.burst}, by {'+'.join(rule.key)}"
            + ("" if rule.scope == "Local" else f" ({rule.scope})"))
        if client_ip and request is not None:
            matched = RateRule(rule).matches(client_ip, request.method, request.path, request.headers)
            text += " [counts this request]" if matched and not rule.exempt else \
                " [exempts this request]" if matched else " [does not match]"
        rules.append(text)
    said["rateLimit"] = "; ".join(rules) + (", RateLimit headers" if guard.rate_limit_headers else "")
    return [f"{section}: {said.get(section, '')}  <- {origin}" for section, origin in guard.origins]


def _compact(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, default_flow_style=True, width=10_000).strip() if config else ""


def _nodeports(args: argparse.Namespace) -> int:
    import json

    from tidegate import nodeports

    try:
        port_range = nodeports.parse_range(args.range)
    except ValueError as exc:
        print(f"tidegate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.paths and not args.kubernetes:
        print("tidegate: error: say what to read: PATH... (files) and/or --kubernetes (a cluster)", file=sys.stderr)
        return EXIT_USAGE
    docs, problems = nodeports.read_documents(args.paths)
    if args.kubernetes:
        cluster, unread = nodeports.read_cluster(args.kubeconfig, args.context)
        docs, problems = nodeports.overlay(cluster, docs, args.namespace), problems + unread
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    # tidegate's own listeners, for a tidegate on the host network
    loaded = load_paths(args.paths, default_namespace=args.namespace)
    listeners = [nodeports.Use(f"tidegate listener {listener.name}", listener.port,
                               "UDP" if listener.protocol == "UDP" else "TCP", "listening port")
                 for listener in translate(loaded.resources, options_for(args)).ir.listeners]
    if args.nodeports_command == "check":
        findings = nodeports.check(docs, port_range, listeners)
        for finding in findings:
            print(f"{finding.kind}: {finding.message}")
        services = sum(1 for d in docs if d.obj.get("kind") == "Service")
        print(f"{services} Service(s), {len(findings)} conflict(s)", file=sys.stderr if findings else sys.stdout)
        return EXIT_INVALID if findings or problems else EXIT_OK
    allocation = nodeports.allocate(docs, port_range, listeners)
    for patch in allocation.patches:
        if args.kubectl:
            meta = patch["metadata"]
            print(f"kubectl patch service {meta['name']} -n {meta['namespace']} --type=merge -p "
                  f"'{json.dumps({'spec': patch['spec']}, separators=(',', ':'))}'")
        else:
            print("---\n" + dump_yaml(patch), end="")
    for use in allocation.given:
        print(f"{use.owner}: {use.what} = {use.port}", file=sys.stderr)
    for missing in allocation.full:
        print(f"error: {missing}: no free node port left in {args.range}", file=sys.stderr)
    return EXIT_INVALID if allocation.full or problems else EXIT_OK


def _simulate(args: argparse.Namespace, loaded: LoadResult) -> int:
    import json

    from tidegate.simulate import simulate

    if args.requests <= 0:
        print("tidegate: error: --requests must be positive", file=sys.stderr)
        return EXIT_USAGE
    results = simulate(loaded.resources, args.requests, args.service)
    if not results:
        print("no Service with ready endpoints" + (f" named {args.service}" if args.service else ""), file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(json.dumps({name: [vars(share) for share in shares] for name, shares in results.items()}, indent=1))
        return EXIT_OK
    for name, shares in results.items():
        l2 = shares[0].l2_node
        print(f"Service {name}: {args.requests} requests")
        print(f"  {'pod':24s} {'node':16s} {'tidegate':>9s} {'node LB':>9s} {'node LB, weighted':>18s}"
              + (f" {'L2 Cluster':>11s} {'L2 Local':>9s} {'BGP ECMP':>9s} {'BGP weighted':>13s}" if l2 else ""))
        for s in shares:
            print(f"  {s.pod:24s} {s.node:16s} {s.tidegate:9.1%} {s.node_balancer:9.1%} "
                  f"{s.node_balancer_weighted:18.1%}" + (f" {s.l2_cluster:11.1%} {s.l2_local:9.1%} "
                                                         f"{s.bgp_ecmp:9.1%} {s.bgp_weighted:13.1%}" if l2 else ""))
        if l2:
            print(f"  L2: one node announces the address and relays to the pods; under Local only its own pods "
                  f"serve ({l2} announces here), the others wait for a failover")
            print("  BGP (Local): every node with a pod announces it; the router splits evenly over the nodes "
                  "(ECMP), or by pods per node with tidegate.io/weighting: endpoints")
    return EXIT_OK


def _explain(args: argparse.Namespace, translation: Translation) -> int:
    headers: dict[str, str] = {}
    for raw in args.headers:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            print(f"tidegate: error: header {raw!r} is not 'Name: value'", file=sys.stderr)
            return EXIT_USAGE
        key = name.strip().lower()
        headers[key] = f"{headers[key]},{value.strip()}" if key in headers else value.strip()
    url = args.url if "://" in args.url else "http://" + args.url
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    request = Request.from_url(url, args.method, headers)
    routers = routers_by_port(translation.ir)
    candidates = [(addr, router) for (addr, p), router in routers.items() if p == port]
    if not candidates:
        ports = sorted({p for _, p in routers}) or ["none"]
        print(f"no HTTP listener on port {port} (HTTP ports: {', '.join(map(str, ports))})")
        return EXIT_INVALID
    hostname = (parts.hostname or "")
    candidates.sort(key=lambda item: (item[0] not in (hostname, ""), item[0]))
    router = candidates[0][1]
    result = explain(router, request)
    print(f"request   {request.method} {request.host}{request.path}" + (f"?{parts.query}" if parts.query else ""))
    if not result.listener:
        print(f"listener  none: no listener on port {port} takes host {request.host}")
        return EXIT_INVALID
    print(f"listener  {result.listener}")
    if result.chosen is None:
        print("route     none: the request matches no route (404)")
    else:
        route = result.chosen.route
        print(f"route     {route.name}  ({route.source}), hostname {result.host_pattern}")
        print(f"match     {result.chosen.describe()}")
        for f in route.filters:
            print(f"filter    {f.type} {_compact(f.config)}")
        if route.direct_status:
            print(f"answers   {route.direct_status}")
        if route.guard is not None:
            for line in guard_lines(route.guard, args.client_ip, request):
                print(f"guard     {line}")
        for line in _backend_lines(route.backends):
            line = line.strip()
            if line.startswith("policy "):
                print("  policy  " + line[len("policy"):].strip())
            else:
                print("backend   " + line[len("backend"):].strip())
    if result.passed_over:
        print("not chosen:")
        for name, what, why in result.passed_over:
            print(f"  {name}  [{what}]: {why}")
    return EXIT_OK if result.chosen else EXIT_INVALID


def _run_args_problem(args: argparse.Namespace) -> str:
    """Bad `run` options, found before anything starts (a usage error, not a crash later)."""
    from tidegate.observe.accesslog import parse_status_filter

    try:
        parse_status_filter(args.access_log_status)
    except ValueError as exc:
        return str(exc)
    if args.rate_limit_redis:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(args.rate_limit_redis)
            _ = parts.port
        except ValueError as exc:
            return f"--rate-limit-redis {args.rate_limit_redis!r}: {exc}"
        if parts.scheme not in ("redis", "rediss") or not parts.hostname \
                or not parts.path.strip("/").isdigit() and parts.path.strip("/"):
            return (f"--rate-limit-redis {args.rate_limit_redis!r}: a Redis URL is "
                    "redis://[:PASSWORD@]HOST:PORT/DB or rediss://...")
    if not 0 < args.rate_limit_redis_timeout <= 10:
        return "--rate-limit-redis-timeout must be in (0, 10] seconds"
    if args.rate_limit_replicas < 1:
        return "--rate-limit-replicas must be 1 or more"
    if not 0.0 < args.access_log_sample <= 1.0:
        return "--access-log-sample must be in (0, 1]"
    if args.access_log_file != "-":
        folder = os.path.dirname(os.path.abspath(args.access_log_file))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            return f"--access-log-file {args.access_log_file!r}: {folder} is not a writable directory"
    for flag, value in (("--admin", args.admin), ("--metrics", args.metrics)):
        if value != "off":
            host, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
                return f"{flag} {value!r} is not ADDR:PORT (or off)"
    if args.admin_token_on_command_line is not None:
        return ("--admin-token would show the token to anyone who can list processes: put it in a file "
                "(--admin-token-file) or in the TIDEGATE_ADMIN_TOKEN environment variable")
    if args.admin_token_file and os.path.isdir(args.admin_token_file):
        return f"--admin-token-file {args.admin_token_file!r} is a directory"
    if args.grace < 0:
        return "--grace must not be negative"
    for flag in ("request_head_timeout", "request_body_timeout", "idle_timeout", "send_timeout",
                 "upstream_read_timeout", "tls_handshake_timeout"):
        if not getattr(args, flag) > 0:
            return f"--{flag.replace('_', '-')} must be positive"
    if not 1 <= args.workers <= 256:
        return "--workers must be between 1 and 256"
    if args.acme_dir and os.path.exists(args.acme_dir) and not os.path.isdir(args.acme_dir):
        return f"--acme-dir {args.acme_dir!r} is not a directory"
    if not args.acme_backoff > 0:
        return "--acme-backoff must be positive"
    if not args.paths and not args.kubernetes:
        return "say where resources come from: -f PATH (files) and/or --kubernetes (a cluster)"
    if args.kubernetes and not args.lease_duration > args.renew_deadline > args.retry_period > 0:
        return "--lease-duration > --renew-deadline > --retry-period > 0 is needed"
    if not 1 <= args.heartbeat_port <= 65534:
        return "--heartbeat-port must be a port number"
    if not args.node_timeout > 0 or not args.l2_refresh > 0:
        return "--node-timeout and --l2-refresh must be positive"
    if args.kubeconfig and not os.path.isfile(args.kubeconfig):
        return f"--kubeconfig {args.kubeconfig!r}: no such file"
    if args.gateway_pods and args.gateway_pods.count("/") != 1:
        return "--gateway-pods takes NAMESPACE/SERVICE"
    if args.gateway_pods and args.node and args.serve == "all":
        return ("--gateway-pods with --node and --serve all: this process serves the Gateways' pool addresses "
                "itself; --gateway-pods is for the Deployment's pods and the node agents (--serve loadbalancers)")
    return ""


def _run(args: argparse.Namespace) -> int:
    from tidegate.app import serve

    problem = _run_args_problem(args)
    if problem:
        print(f"tidegate: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(chatty).setLevel(logging.WARNING)  # a line per API request is noise
    try:
        import uvloop

        return uvloop.run(serve(args))
    except ImportError:
        return asyncio.run(serve(args))


async def _echo(specs: list[str], log_requests: bool, cert: str | None, key: str | None,
                client_ca: str | None = None) -> int:
    from tidegate.echo import PodIdentity, start_echo, tls_context

    servers = []
    for spec in specs:
        use_tls = spec.endswith("+tls")
        spec = spec.removesuffix("+tls")
        if use_tls and not (cert and key):
            print("tidegate: error: +tls listeners need --tls-cert and --tls-key", file=sys.stderr)
            return EXIT_USAGE
        where, _, who = spec.partition("=")
        host, _, port = where.rpartition(":")
        namespace, _, pod = who.partition("/")
        if not port.isdigit():
            print(f"tidegate: error: --listen {spec!r} is not ADDR:PORT[=NAMESPACE/POD]", file=sys.stderr)
            return EXIT_USAGE
        servers.append(await start_echo(host.strip("[]") or "127.0.0.1", int(port), PodIdentity(namespace, pod),
                                        log_requests, tls_context(cert, key, client_ca) if use_tls else None))
        print(f"echo on {host}:{port} as {namespace}/{pod}", flush=True)
    await asyncio.Event().wait()
    return EXIT_OK


def explain_as_data(translation: Translation | None, url: str, method: str, headers: dict[str, str]) -> dict:
    """The `tidegate explain` answer as data, for the admin API."""
    if translation is None:
        return {"error": "no configuration yet"}
    target = url if "://" in url else "http://" + url
    parts = urlsplit(target)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    request = Request.from_url(target, method, headers)
    routers = [router for (_, p), router in routers_by_port(translation.ir).items() if p == port]
    if not routers:
        return {"request": url, "listener": None, "error": f"no HTTP listener on port {port}"}
    result = explain(routers[0], request)
    chosen = result.chosen
    return {
        "request": f"{request.method} {request.host}{request.path}",
        "listener": result.listener or None,
        "route": chosen.route.name if chosen else None,
        "source": chosen.route.source if chosen else None,
        "match": chosen.describe() if chosen else None,
        "backends": [{"name": b.name, "weight": b.weight, "invalid": b.invalid or None,
                      "endpoints": [f"{e.address}:{e.port}" for e in b.endpoints],
                      "policy": policy_lines(b.policy) if b.policy is not None else []}
                     for b in (chosen.route.backends if chosen else ())],
        "notChosen": [{"route": name, "match": what, "why": why} for name, what, why in result.passed_over],
    }


if __name__ == "__main__":
    sys.exit(main())
