"""deploy/: kustomize builds it, every manifest passes its schema, `kubectl apply --dry-run=client -k`
works against an API server stand-in, and RBAC grants what the Kubernetes source uses and no more."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.apiserver import KINDS, Kind, fake_apiserver
from tidegate.resources import kinds
from tidegate.resources.loader import load_text

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (scripts/test installs it)")


def _built(overlay: str = "") -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", ["", "bare-metal"])
def test_every_manifest_passes_its_schema(overlay):
    docs = _built(overlay)
    assert len(docs) > 20
    for doc in docs:
        if kinds.lookup(doc["apiVersion"], doc["kind"]) is not None:  # Gateway API, tidegate's and core kinds
            result = load_text(yaml.safe_dump(doc), f"deploy:{doc['kind']}/{doc['metadata']['name']}")
            assert not result.errors, [str(e) for e in result.errors]
        if doc["apiVersion"].split("/")[0] not in ("gateway.networking.k8s.io", "tidegate.io"):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_a_typo_in_a_manifest_fails_the_schema_check():
    deployment = next(d for d in _built() if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_the_deployable_tidegate_crds_are_the_ones_tidegate_validates_with():
    for name in ("tidegate.io_backendpolicies.yaml", "tidegate.io_trafficpolicies.yaml",
                 "tidegate.io_clientpolicies.yaml", "tidegate.io_httproutefilters.yaml", "tidegate.io_acmeissuers.yaml",
                 "tidegate.io_clusteracmeissuers.yaml"):
        shipped = DEPLOY / "crds" / name
        bundled = ROOT / "src" / "tidegate" / "resources" / "crds" / name
        assert shipped.read_text() == bundled.read_text()


def test_metallbs_crds_ship_unchanged_with_their_license_and_the_validator_uses_them():
    shipped = sorted((DEPLOY / "crds" / "metallb").glob("metallb.io_*.yaml"))
    assert [p.name for p in shipped] == [f"metallb.io_{k}.yaml" for k in (
        "bfdprofiles", "bgpadvertisements", "bgppeers", "communities", "ipaddresspools", "l2advertisements")]
    for path in shipped:
        assert path.read_text() == (ROOT / "src" / "tidegate" / "resources" / "crds" / path.name).read_text()
    assert "Apache License" in (DEPLOY / "crds" / "metallb" / "LICENSE").read_text()
    assert "MetalLB" in (DEPLOY / "crds" / "metallb" / "NOTICE").read_text()
    kustomization = (DEPLOY / "crds" / "kustomization.yaml").read_text()
    assert all(f"metallb/{p.name}" in kustomization for p in shipped)


DEPLOY_KINDS = [
    Kind("", "v1", "ServiceAccount", "serviceaccounts"),
    Kind("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", namespaced=False),
    Kind("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", namespaced=False),
    Kind("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    Kind("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
    Kind("apps", "v1", "Deployment", "deployments"),
    Kind("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Kind("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", namespaced=False),
    Kind("admissionregistration.k8s.io", "v1", "ValidatingAdmissionPolicy", "validatingadmissionpolicies",
         namespaced=False),
    Kind("admissionregistration.k8s.io", "v1", "ValidatingAdmissionPolicyBinding",
         "validatingadmissionpolicybindings", namespaced=False),
]


def test_kubectl_apply_dry_run_client(tmp_path):
    docs = _built()
    with fake_apiserver(kinds=KINDS + DEPLOY_KINDS) as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(api.kubeconfig())
        out = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), "apply", "--dry-run=client",
                              "--validate=false", "-k", str(DEPLOY)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("(dry run)") == len(docs), out.stdout
        assert not api.writes  # a dry run writes nothing


def test_rbac_grants_what_the_source_reads_and_writes_only_status_and_the_lease():
    docs = _built()
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in cluster_role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for info in kinds.KINDS.values():
        assert {"get", "list", "watch"} <= granted.get((info.group, kinds.plural(info)), set()), info.kind
    for (group, resource), verbs in granted.items():
        writes = verbs - {"get", "list", "watch"}
        assert not writes or resource.endswith("/status") or (resource, writes) == ("events", {"create", "patch"}), \
            (resource, verbs)
        if resource == "events":
            assert verbs == {"create", "patch"}  # Events are written, never read
        assert "*" not in verbs and resource != "*"
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["metadata"]["namespace"] == "tidegate-system"
    assert [(r["resources"], sorted(r["verbs"])) for r in role["rules"]] == [(["leases"], ["create", "get", "update"])]


def test_the_deployment_runs_two_probed_replicas_of_the_kubernetes_mode():
    docs = _built()
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["run", "--kubernetes"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]
    assert any(d["kind"] == "PodDisruptionBudget" for d in docs)
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["type"] == "LoadBalancer"
    classes = {d["kind"]: d for d in docs if d["kind"] in ("GatewayClass", "IngressClass")}
    assert classes["GatewayClass"]["spec"]["controllerName"] == "tidegate.io/gateway-controller"
    assert classes["IngressClass"]["spec"]["controller"] == "tidegate.io/ingress-controller"
    assert deployment["metadata"]["namespace"] == "tidegate-system"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}  # lease identity


def test_the_deployed_admin_api_needs_its_token_and_prometheus_scrapes_a_port_of_its_own():
    deployment = next(d for d in _built() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = dict(arg.split("=", 1) for arg in container["args"] if "=" in arg)
    assert not any(arg.startswith("--admin-token=") for arg in container["args"])  # `ps` would show it
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "admin-token"]
    assert args["--admin-token-file"].startswith(mount["mountPath"] + "/")
    [volume] = [v for v in pod["volumes"] if v["name"] == "admin-token"]
    assert volume["secret"]["secretName"] == "tidegate-admin-token"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    scrape_port = int(deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
    assert scrape_port == ports["metrics"] == int(args["--metrics"].rsplit(":", 1)[1])


def test_the_bare_metal_overlay_adds_a_node_agent_on_the_host_network_that_serves_loadbalancers_only():
    plain, bare = _built(), _built("bare-metal")
    assert {(d["kind"], d["metadata"]["name"]) for d in bare} - {(d["kind"], d["metadata"]["name"]) for d in plain} \
        == {("DaemonSet", "tidegate-node-agent")}
    agent = next(d for d in bare if d["kind"] == "DaemonSet")
    pod = agent["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == "tidegate"
    assert container["args"][:2] == ["run", "--kubernetes"]
    assert {"--serve=loadbalancers", "--lb-classless", "--node=$(NODE_NAME)",
            "--gateway-pods=tidegate-system/tidegate"} <= set(container["args"])
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}["NODE_NAME"] == \
        "spec.nodeName"
    assert set(container["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"}
    assert not container["securityContext"].get("privileged")  # only the init container's one sysctl step is
    [init] = pod["initContainers"]
    assert "arp_ignore" in init["command"][-1] and init["securityContext"]["privileged"] is True
    # The Deployment's leader writes the Services' status, so it takes the same Services as the agents.
    deployment = next(d for d in bare if d["kind"] == "Deployment")
    assert {"--lb-classless", "--gateway-pods=tidegate-system/tidegate"} <= set(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert container["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "ghcr.io/tidegate/tidegate:0.1.0"
