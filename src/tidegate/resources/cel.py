"""CEL rules (`x-kubernetes-validations`) compiled once and evaluated with `common-expression-language`.

That package wraps the Rust CEL interpreter: a rule evaluates in microseconds, with CEL's own error absorbing
`&&`/`||`. The Kubernetes CEL library adds functions that plain CEL lacks; the ones the Gateway API CRDs and
tidegate's built-in schemas use are registered here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cel


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_cidr(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def _split(value: str, sep: str, limit: int | None = None) -> list[str]:
    return value.split(sep) if limit is None or limit < 0 else value.split(sep, max(limit - 1, 0))


def _substring(value: str, start: int, end: int | None = None) -> str:
    return value[start:] if end is None else value[start:end]


def _join(values: list[str], sep: str = "") -> str:
    return sep.join(values)


# The Kubernetes extension functions (strings library and the IP/CIDR helpers) that CRD rules call.
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "isIP": is_ip,
    "isCIDR": _is_cidr,
    "split": _split,
    "substring": _substring,
    "indexOf": lambda value, needle: value.find(needle),
    "lastIndexOf": lambda value, needle: value.rfind(needle),
    "replace": lambda value, old, new: value.replace(old, new),
    "trim": lambda value: value.strip(),
    "lowerAscii": lambda value: value.lower(),
    "upperAscii": lambda value: value.upper(),
    "join": _join,
}


class CelCompileError(Exception):
    pass


@dataclass
class CelRule:
    """One compiled `x-kubernetes-validations` entry."""

    rule: str
    message: str
    field_path: str
    program: Any
    message_program: Any
    transition: bool  # uses oldSelf: only checked on updates, which a file source never makes

    def check(self, value: Any, context: Any = None) -> str | None:
        """Evaluate against a JSON-like value; None when the rule holds, else the error message. Pass a
        `context_for(value)` to share its conversion between the rules of one schema node."""
        if self.transition:
            return None
        if context is None:
            context = context_for(value)
        try:
            result = self.program.execute(context)
        except Exception as exc:  # the interpreter raises for runtime errors (no such key, no overload)
            return f"rule could not be evaluated ({_first_line(exc)}): {self.rule}"
        if result is True:
            return None
        if result is not False:
            return f"rule did not give true or false ({result!r}): {self.rule}"
        if self.message_program is not None:
            try:
                return str(self.message_program.execute(context))
            except Exception:
                pass
        return self.message or f"failed rule: {self.rule}"


def context_for(value: Any) -> Any:
    return cel.Context(variables={"self": value}, functions=FUNCTIONS)


def _first_line(exc: Exception) -> str:
    return str(exc).split(". ")[0].splitlines()[0][:200]


def compile_rule(spec: dict[str, Any]) -> CelRule:
    rule = spec["rule"]
    try:
        program = cel.compile(rule)
        message_expr = spec.get("messageExpression")
        message_program = cel.compile(message_expr) if message_expr else None
    except Exception as exc:
        raise CelCompileError(f"cannot compile CEL rule {rule!r}: {_first_line(exc)}") from exc
    return CelRule(
        rule=rule,
        message=spec.get("message", ""),
        field_path=spec.get("fieldPath", ""),
        program=program,
        message_program=message_program,
        transition="oldSelf" in rule,
    )
