"""Status conditions with the Gateway API's types and reasons, built as plain values (never written into
the snapshot)."""

from __future__ import annotations

from typing import Any

CONTROLLER_NAME = "tidegate.io/gateway-controller"
INGRESS_CONTROLLER = "tidegate.io/ingress-controller"


def condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def find(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c["type"] == type_), None)


def policy_status(policy: Any, verdict: tuple[bool, str, str], gateways: Any) -> dict[str, Any]:
    """A tidegate policy's status (BackendPolicy, TrafficPolicy, ClientPolicy): its Accepted condition under
    each Gateway ("ns/name") where some section of it is in force. In force through none (yet), the status
    still has to say why: it is reported against the first target, as Envoy Gateway does for policies on
    unreached targets. `policy` is the policy's Resource."""
    ok, reason, message = verdict
    cond = [condition("Accepted", ok, reason, message, policy.generation)]
    ancestors = []
    for gateway in sorted(gateways):
        namespace, _, name = gateway.partition("/")
        if name:  # the Ingress front door is not a Gateway
            ancestors.append({"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": namespace,
                              "name": name})
    if not ancestors:
        ref = policy.spec["targetRefs"][0]
        ancestors.append({"group": ref.get("group", ""), "kind": ref["kind"], "namespace": policy.namespace,
                          "name": ref["name"]})
    return {"ancestors": [{"ancestorRef": a, "controllerName": CONTROLLER_NAME, "conditions": cond}
                          for a in ancestors]}
