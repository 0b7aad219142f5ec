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
