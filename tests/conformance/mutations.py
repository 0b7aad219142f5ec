"""Conformance cases whose Go test edits resources and watches status change, run through the same file
source and translator as `tidegate run`: the edit is written to the file, the source re-reads it (and numbers
the generation, as the API server would), and the computed status is checked as the Go test checks it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.certs import ca_and_leaf, tls_secret_yaml
from tests.conformance.golit import INFRA, WEB
from tidegate.dataplane.server import DataPlane
from tidegate.resources.model import Key
from tidegate.sources.file import FileSource
from tidegate.store import Store
from tidegate.translate import TranslateOptions, translate
from tidegate.translate.gateways import mark_unbindable

CONTROLLER = "tidegate.io/gateway-controller"


class FileCluster:
    """Base manifests plus one case in a folder, loaded by a FileSource; edits go through the files."""

    def __init__(self, folder: Path, suite: Path, case: str, gateway_class: str,
                 substitute: dict[str, str] | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "class.yaml").write_text(
            f"apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {gateway_class}}}\n"
            f"spec: {{controllerName: {CONTROLLER}}}\n")
        cas = [f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {INFRA}}}\ndata:\n"
               "  ca.crt: |\n" + "".join(f"    {line}\n" for line in ca_and_leaf(["x"])[0].decode().splitlines())
               for name in ("tls-validity-checks-ca-certificate", "tls-validity-checks-per-port-ca-certificate",
                            "tls-checks-ca-certificate", "mismatch-ca-certificate")]
        (folder / "secrets.yaml").write_text("---\n".join([
            tls_secret_yaml(INFRA, "tls-validity-checks-certificate", ["*", "*.org", "*.wildcard.org"]),
            tls_secret_yaml(INFRA, "tls-checks-client-certificate", ["gateway.client"]),
            tls_secret_yaml(WEB, "certificate", ["*"]), *cas]))
        substitute = {"{GATEWAY_CLASS_NAME}": gateway_class, "{GATEWAY_CONTROLLER_NAME}": CONTROLLER,
                      **(substitute or {})}
        texts = {"base.yaml": (suite / "base" / "manifests.yaml").read_text(),
                 "case.yaml": (suite / "tests" / case).read_text()}
        for name, text in texts.items():
            for old, new in substitute.items():
                text = text.replace(old, new)
            (folder / name).write_text(text)
        self.case_file = folder / "case.yaml"
        self.store = Store()
        self.source = FileSource([folder], self.store)
        problems = [p for p in self.source.load() if p.severity == "error"]
        assert not problems, [str(p) for p in problems]

    def status(self, key: Key, address: str = "") -> dict[str, Any]:
        return translate(self.store.snapshot().resources, TranslateOptions(address=address)).statuses[key]

    def served_status(self, key: Key) -> dict[str, Any]:
        """The status after the data plane tried to open the sockets (as `tidegate run` reports it)."""

        async def serve() -> dict[str, Any]:
            translation = translate(self.store.snapshot().resources)
            dataplane = DataPlane(bind="127.0.0.1")
            try:
                errors = await dataplane.apply(translation.ir)
            finally:
                await dataplane.close()
            return mark_unbindable(translation.statuses, list(translation.ir.listeners), errors, "127.0.0.1")[key]

        return asyncio.run(serve())

    def generation(self, key: Key) -> int:
        found = self.store.snapshot().get(key)
        assert found is not None, key
        return found.generation

    def add(self, doc: dict) -> None:
        docs = [d for d in yaml.safe_load_all(self.case_file.read_text()) if d] + [doc]
        self.case_file.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        problems = [p for p in self.source.reload([self.case_file]) if p.severity == "error"]
        assert not problems, [str(p) for p in problems]

    def patch(self, kind: str, name: str, change: Callable[[dict], None]) -> None:
        docs = [d for d in yaml.safe_load_all(self.case_file.read_text()) if d]
        target = next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
        change(target)
        self.case_file.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        problems = [p for p in self.source.reload([self.case_file]) if p.severity == "error"]
        assert not problems, [str(p) for p in problems]


def _latest(conditions: list[dict], generation: int, what: str) -> list[str]:
    stale = [c["type"] for c in conditions if c["observedGeneration"] != generation]
    return [f"{what}: conditions {stale} do not carry generation {generation}"] if stale else []


def _has(conditions: list[dict], type_: str, status: str) -> bool:
    return any(c["type"] == type_ and c["status"] == status for c in conditions)


def httproute_observed_generation_bump(folder: Path, suite: Path, gateway_class: str) -> list[str]:
    cluster = FileCluster(folder, suite, "httproute-observed-generation-bump.yaml", gateway_class)
    key = Key("HTTPRoute", INFRA, "observed-generation-bump")

    def parent() -> list[dict]:
        return next(p for p in cluster.status(key)["parents"]
                    if p["parentRef"]["name"] == "same-namespace")["conditions"]

    original = cluster.generation(key)
    failures = _latest(parent(), original, "before the edit")
    cluster.patch("HTTPRoute", "observed-generation-bump",
                  lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(name="infra-backend-v2"))
    updated = cluster.generation(key)
    if updated == original:
        failures.append("generation did not change after an update")
    for type_ in ("Accepted", "ResolvedRefs"):
        if not _has(parent(), type_, "True"):
            failures.append(f"{type_} is not True after the update")
    return failures + _latest(parent(), updated, "after the edit")


def gateway_observed_generation_bump(folder: Path, suite: Path, gateway_class: str) -> list[str]:
    cluster = FileCluster(folder, suite, "gateway-observed-generation-bump.yaml", gateway_class)
    key = Key("Gateway", INFRA, "gateway-observed-generation-bump")
    original = cluster.generation(key)
    failures = _latest(cluster.status(key)["conditions"], original, "before the edit")
    cluster.patch("Gateway", key.name, lambda d: d["spec"]["listeners"].append(
        {"name": "alternate", "hostname": "foo.com", "port": 80, "protocol": "HTTP",
         "allowedRoutes": {"namespaces": {"from": "All"}}}))
    updated = cluster.generation(key)
    if updated == original:
        failures.append("generation did not change after an update")
    return failures + _latest(cluster.status(key)["conditions"], updated, "after the edit")


def gatewayclass_observed_generation_bump(folder: Path, suite: Path, gateway_class: str) -> list[str]:
    cluster = FileCluster(folder, suite, "gatewayclass-observed-generation-bump.yaml", gateway_class)
    key = Key("GatewayClass", "", "gatewayclass-observed-generation-bump")
    original = cluster.generation(key)
    failures = _latest(cluster.status(key)["conditions"], original, "before the edit")
    if not any(c["type"] == "Accepted" for c in cluster.status(key)["conditions"]):
        failures.append("no Accepted condition")
    cluster.patch("GatewayClass", key.name, lambda d: d["spec"].update(description="the description was changed"))
    updated = cluster.generation(key)
    if updated == original:
        failures.append("generation did not change after an update")
    return failures + _latest(cluster.status(key)["conditions"], updated, "after the edit")


def gateway_modify_listeners(folder: Path, suite: Path, gateway_class: str) -> list[str]:
    failures: list[str] = []
    cluster = FileCluster(folder, suite, "gateway-modify-listeners.yaml", gateway_class)

    def listeners_ok(name: str, expected: dict[str, int]) -> None:
        listeners = cluster.status(Key("Gateway", INFRA, name))["listeners"]
        got = {entry["name"]: entry for entry in listeners}
        if set(got) != set(expected):
            failures.append(f"{name}: listeners {sorted(got)}, expected {sorted(expected)}")
            return
        for section, attached in expected.items():
            entry = got[section]
            if entry["attachedRoutes"] != attached:
                failures.append(f"{name}/{section}: attachedRoutes {entry['attachedRoutes']}, expected {attached}")
            for type_ in ("Accepted", "ResolvedRefs"):
                if not _has(entry["conditions"], type_, "True"):
                    failures.append(f"{name}/{section}: {type_} is not True")
            if not any(k["kind"] == "HTTPRoute" for k in entry["supportedKinds"]):
                failures.append(f"{name}/{section}: HTTPRoute missing from supportedKinds")

    cluster.patch("Gateway", "gateway-add-listener", lambda d: d["spec"]["listeners"].append(
        {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "data.test.com",
         "allowedRoutes": {"namespaces": {"from": "All"}}}))
    listeners_ok("gateway-add-listener", {"https": 1, "http": 1})
    cluster.patch("Gateway", "gateway-remove-listener", lambda d: d["spec"].update(
        listeners=[entry for entry in d["spec"]["listeners"] if entry["name"] == "http"]))
    listeners_ok("gateway-remove-listener", {"http": 1})
    return failures


def _condition(conditions: list[dict], type_: str, status: str, reason: str) -> bool:
    return any(c["type"] == type_ and c["status"] == status and c["reason"] == reason for c in conditions)


def gateway_static_addresses(folder: Path, suite: Path, gateway_class: str) -> list[str]:
    """The suite's usable and unusable addresses: 127.0.3.1 is a loopback address this host can bind;
    192.0.2.77 (TEST-NET-1) is on no interface here, so binding to it fails."""
    usable, unusable = "127.0.3.1", "192.0.2.77"
    cluster = FileCluster(folder, suite, "gateway-static-addresses.yaml", gateway_class,
                          {'value: "PLACEHOLDER_UNUSABLE_ADDRS"': f'value: "{unusable}"',
                           'value: "PLACEHOLDER_USABLE_ADDRS"': f'value: "{usable}"'})
    key = Key("Gateway", INFRA, "gateway-static-addresses")
    failures = []
    if not _condition(cluster.status(key)["conditions"], "Accepted", "False", "UnsupportedAddress"):
        failures.append("an unsupported address type did not make the Gateway Accepted=False UnsupportedAddress")
    cluster.patch("Gateway", key.name, lambda d: d["spec"].update(
        addresses=[a for a in d["spec"]["addresses"] if a.get("type", "IPAddress") == "IPAddress"]))
    status = cluster.served_status(key)
    if not _condition(status["conditions"], "Accepted", "True", "Accepted"):
        failures.append("without the invalid address the Gateway is not Accepted")
    if not _condition(status["conditions"], "Programmed", "False", "AddressNotUsable"):
        failures.append(f"an address that cannot be bound did not give Programmed=False AddressNotUsable: "
                        f"{status['conditions']}")
    cluster.patch("Gateway", key.name, lambda d: d["spec"].update(
        addresses=[a for a in d["spec"]["addresses"] if a.get("value") != unusable]))
    status = cluster.served_status(key)
    if not _condition(status["conditions"], "Programmed", "True", "Programmed"):
        failures.append("with only the usable address the Gateway is not Programmed")
    if [a["value"] for a in status["addresses"]] != [usable]:
        failures.append(f"status addresses {status['addresses']}, expected only {usable}")
    listener = next((entry for entry in status["listeners"] if entry["name"] == "http"), None)
    if listener is None or not _has(listener["conditions"], "Accepted", "True") \
            or not _has(listener["conditions"], "ResolvedRefs", "True") or listener["attachedRoutes"] != 0:
        failures.append(f"listener http is not as expected: {listener}")
    return failures


def gateway_optional_address_value(folder: Path, suite: Path, gateway_class: str) -> list[str]:
    """An address entry without a value asks the implementation for one: tidegate gives the address it was
    told to report (--address)."""
    cluster = FileCluster(folder, suite, "gateway-optional-address-value.yaml", gateway_class)
    status = cluster.status(Key("Gateway", INFRA, "gateway-without-address-value"), address="127.0.3.2")
    if [a["value"] for a in status.get("addresses", [])] != ["127.0.3.2"]:
        return [f"no address assigned: {status.get('addresses')}"]
    if not _has(status["conditions"], "Accepted", "True"):
        return ["the Gateway is not Accepted"]
    return []


_LISTENER_ROW = re.compile(r'lName:\s*"([^"]+)",\s*expectedConditions:\s*\[\]metav1\.Condition\{(.*?)\n\t{4,5}\},',
                           re.DOTALL)
_CONDITION = re.compile(r"Type:\s*string\(gatewayv1\.ListenerCondition(\w+)\),\s*Status:\s*metav1\.Condition(\w+),"
                        r"\s*Reason:\s*(?:string\(gatewayv1\.ListenerReason(\w+)\)|\"\")")


def listener_condition_table(go_file: Path) -> dict[str, list[tuple[str, str, str]]]:
    """The (listener → expected conditions) table of a Go case, read from its source."""
    text = go_file.read_text()
    return {name: [(t, st, reason or "") for t, st, reason in _CONDITION.findall(body)]
            for name, body in _LISTENER_ROW.findall(text)}


# GatewayFrontendInvalidDefaultClientCertificateValidation writes its expectations inline, not as a table.
INVALID_DEFAULT_VALIDATION = {
    "http": [("ResolvedRefs", "True", ""), ("Accepted", "True", ""), ("Programmed", "True", "")],
    "https": [("ResolvedRefs", "False", "InvalidCACertificateRef"), ("Accepted", "False", "NoValidCACertificate"),
              ("Programmed", "False", "")],
}


def _listener_conditions_case(manifest: str, go_name: str, gateway_name: str,
                              table: dict | None = None) -> Callable[[Path, Path, str], list[str]]:
    def run(folder: Path, suite: Path, gateway_class: str) -> list[str]:
        expected_table = table or listener_condition_table(suite / "tests" / go_name)
        if not expected_table:
            return [f"read no listener conditions from {go_name}"]
        cluster = FileCluster(folder, suite, manifest, gateway_class)
        listeners = {e["name"]: e for e in cluster.status(Key("Gateway", INFRA, gateway_name))["listeners"]}
        failures = []
        for name, expected in expected_table.items():
            got = listeners.get(name)
            if got is None:
                failures.append(f"no status for listener {name}")
                continue
            for type_, status, reason in expected:
                if not any(c["type"] == type_ and c["status"] == status and (not reason or c["reason"] == reason)
                           for c in got["conditions"]):
                    failures.append(f"listener {name}: expected {type_}={status} {reason}, got "
                                    f"{[(c['type'], c['status'], c['reason']) for c in got['conditions']]}")
        return failures
    return run


OK = ("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")
ACCEPTED = (("Accepted", "True", "Accepted"),)
CONFLICTED = (("Accepted", "False", "Conflicted"),)
INVALID_CA = ("Accepted", "False", "NoValidCACertificate"), ("ResolvedRefs", "False", "InvalidCACertificateRef")

# BackendTLSPolicyMustHaveCondition calls of each case: policy → conditions on its ancestor same-namespace.
POLICY_CONDITIONS: dict[str, tuple[str, dict[str, tuple]]] = {
    "BackendTLSPolicy": ("backendtlspolicy.yaml", {
        "normative-test": OK, "host-mismatch": OK, "cert-mismatch": OK, "reconcile-test": OK}),
    "BackendTLSPolicyConflictResolution": ("backendtlspolicy-conflict-resolution.yaml", {
        "conflicted-without-section-name-1": ACCEPTED, "conflicted-without-section-name-2": CONFLICTED,
        "conflicted-with-section-name-1": ACCEPTED, "conflicted-with-section-name-2": CONFLICTED,
        "not-conflicted-with-section-name": ACCEPTED, "not-conflicted-without-section-name": ACCEPTED}),
    "BackendTLSPolicyInvalidCACertificateRef": ("backendtlspolicy-invalid-ca-certificate-ref.yaml", {
        "nonexistent-ca-certificate-ref": INVALID_CA, "malformed-ca-certificate-ref": INVALID_CA}),
    "BackendTLSPolicyInvalidKind": ("backendtlspolicy-invalid-kind.yaml", {
        "invalid-kind": (("Accepted", "False", "NoValidCACertificate"), ("ResolvedRefs", "False", "InvalidKind"))}),
    "BackendTLSPolicySANValidation": ("backendtlspolicy-san.yaml", {
        name: ACCEPTED for name in ("san-dns", "san-dns-mismatch", "san-uri", "san-uri-mismatch", "multiple-sans",
                                    "multiple-mismatch-sans")}),
}


def _policy_conditions(cluster: FileCluster, policy: str, gateway: str = "same-namespace") -> list[dict]:
    status = cluster.status(Key("BackendTLSPolicy", INFRA, policy))
    for ancestor in status.get("ancestors", []):
        if ancestor["ancestorRef"]["name"] == gateway:
            return ancestor["conditions"]
    return []


def _check_policies(cluster: FileCluster, expected: dict[str, tuple]) -> list[str]:
    failures = []
    for policy, conditions in expected.items():
        got = _policy_conditions(cluster, policy)
        for type_, status, reason in conditions:
            if not _condition(got, type_, status, reason):
                failures.append(f"BackendTLSPolicy {policy}: expected {type_}={status} {reason}, got "
                                f"{[(c['type'], c['status'], c['reason']) for c in got] or 'no ancestor status'}")
    return failures


def _policy_case(name: str) -> Callable[[Path, Path, str], list[str]]:
    manifest, expected = POLICY_CONDITIONS[name]

    def run(folder: Path, suite: Path, gateway_class: str) -> list[str]:
        cluster = FileCluster(folder, suite, manifest, gateway_class)
        failures = _check_policies(cluster, expected)
        if name == "BackendTLSPolicy" and not failures:
            failures += _reconcile_ca_configmap(cluster)
        return failures
    return run


def _reconcile_ca_configmap(cluster: FileCluster) -> list[str]:
    """The main case's last step: the policy moves to a ConfigMap that does not exist yet (invalid), which is
    then created (valid), emptied (invalid) and restored (valid)."""
    failures: list[str] = []
    ca_doc = next(d for d in yaml.safe_load_all((cluster.case_file.parent / "secrets.yaml").read_text())
                  if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tls-checks-ca-certificate")
    original = ca_doc["data"]["ca.crt"]

    def expect(step: str, conditions: tuple) -> None:
        failures.extend(f"{step}: {f}" for f in _check_policies(cluster, {"reconcile-test": conditions}))

    cluster.patch("BackendTLSPolicy", "reconcile-test", lambda d: d["spec"]["validation"].update(
        caCertificateRefs=[{"group": "", "kind": "ConfigMap", "name": "tls-checks-ca-certificate-reconcile-test"}]))
    expect("pointing at a missing ConfigMap", INVALID_CA)
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "tls-checks-ca-certificate-reconcile-test", "namespace": INFRA},
                 "data": {"ca.crt": original}}
    cluster.add(configmap)
    expect("after the ConfigMap was created", OK)
    cluster.patch("ConfigMap", "tls-checks-ca-certificate-reconcile-test", lambda d: d["data"].update({"ca.crt": ""}))
    expect("after ca.crt was emptied", INVALID_CA)
    cluster.patch("ConfigMap", "tls-checks-ca-certificate-reconcile-test",
                  lambda d: d["data"].update({"ca.crt": original}))
    expect("after ca.crt was restored", OK)
    return failures


def backendtlspolicy_observed_generation_bump(folder: Path, suite: Path, gateway_class: str) -> list[str]:
    cluster = FileCluster(folder, suite, "backendtlspolicy-observed-generation-bump.yaml", gateway_class)
    key = Key("BackendTLSPolicy", INFRA, "observed-generation-bump")
    original = cluster.generation(key)
    failures = _latest(_policy_conditions(cluster, key.name), original, "before the edit")
    cluster.patch("BackendTLSPolicy", key.name, lambda d: d["spec"]["validation"].update(hostname="foo.example.com"))
    updated = cluster.generation(key)
    conditions = _policy_conditions(cluster, key.name)
    if updated == original:
        failures.append("generation did not change after an update")
    if not _has(conditions, "Accepted", "True"):
        failures.append(f"not Accepted after the edit: {conditions}")
    return failures + _latest(conditions, updated, "after the edit")


_GATEWAY_ROW = re.compile(r'gatewayNamespacedName:\s*types\.NamespacedName\{Name:\s*"([^"]+)"[^}]*\},\s*'
                          r'resolveRefsReason:\s*gatewayv1\.GatewayReason(\w+)')


def gateway_invalid_tls_backend_configuration(folder: Path, suite: Path, gateway_class: str) -> list[str]:
    """Each Gateway with a broken spec.tls.backend.clientCertificateRef: ResolvedRefs=False with the row's
    reason, and still Accepted."""
    rows = _GATEWAY_ROW.findall((suite / "tests" / "gateway-invalid-tls-backend-configuration.go").read_text())
    if len(rows) < 3:
        return [f"read only {len(rows)} rows from gateway-invalid-tls-backend-configuration.go"]
    cluster = FileCluster(folder, suite, "gateway-invalid-tls-backend-configuration.yaml", gateway_class)
    failures = []
    for name, reason in rows:
        conditions = cluster.status(Key("Gateway", INFRA, name))["conditions"]
        if not _condition(conditions, "ResolvedRefs", "False", reason):
            failures.append(f"{name}: expected ResolvedRefs=False {reason}, got {conditions}")
        if not _condition(conditions, "Accepted", "True", "Accepted"):
            failures.append(f"{name}: expected Accepted=True")
    return failures


def gateway_tls_backend_client_certificate(folder: Path, suite: Path, gateway_class: str) -> list[str]:
    """The status half of GatewayTLSBackendClientCertificate (the request half runs against tidegate)."""
    cluster = FileCluster(folder, suite, "gateway-tls-backend-client-certificate.yaml", gateway_class)
    name = "gateway-tls-backend-client-certificate"
    failures = []
    if not _condition(cluster.status(Key("Gateway", INFRA, name))["conditions"], "ResolvedRefs", "True",
                      "ResolvedRefs"):
        failures.append("the Gateway is not ResolvedRefs=True")
    if not _has(_policy_conditions(cluster, "gateway-tls-backend-client-certificate-test", name), "Accepted", "True"):
        failures.append("the BackendTLSPolicy is not Accepted on the Gateway")
    return failures


MUTATION_CASES: dict[str, Callable[[Path, Path, str], list[str]]] = {
    "HTTPRouteObservedGenerationBump": httproute_observed_generation_bump,
    "GatewayObservedGenerationBump": gateway_observed_generation_bump,
    "GatewayClassObservedGenerationBump": gatewayclass_observed_generation_bump,
    "GatewayModifyListeners": gateway_modify_listeners,
    "GatewayStaticAddresses": gateway_static_addresses,
    "GatewayOptionalAddressValue": gateway_optional_address_value,
    **{name: _policy_case(name) for name in POLICY_CONDITIONS},
    "BackendTLSPolicyObservedGenerationBump": backendtlspolicy_observed_generation_bump,
    "GatewayInvalidTLSBackendConfiguration": gateway_invalid_tls_backend_configuration,
    "GatewayTLSBackendClientCertificate": gateway_tls_backend_client_certificate,
    "GatewayInvalidFrontendClientCertificateValidation": _listener_conditions_case(
        "gateway-with-invalid-clientcertificate-validation.yaml", "gateway-with-invalid-clientcertificate-validation.go",
        "gateway-with-invalid-client-cert-validation"),
    "GatewayFrontendInvalidDefaultClientCertificateValidation": _listener_conditions_case(
        "gateway-invalid-default-frontend-client-certificate-validation.yaml",
        "gateway-invalid-default-frontend-client-certificate-validation.go", "invalid-default-client-validation-config",
        INVALID_DEFAULT_VALIDATION),
}
