"""Structural OpenAPI v3 schemas as the Kubernetes API server uses them: defaulting, then validation.

Covers what CRD schemas use: types, int-or-string, properties/additionalProperties, required, enum,
pattern (RE2, as the API server), formats, length/size/range limits, list types (set, map with keys),
value validations (allOf/anyOf/oneOf/not) and CEL rules. Unknown fields are errors, as with
`kubectl apply` under strict field validation.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import re2

from tidegate.resources.cel import CelRule, compile_rule, context_for


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def _format_ok(fmt: str, value: Any) -> bool:
    if fmt == "int32":
        return isinstance(value, int) and _INT32[0] <= value <= _INT32[1]
    if fmt == "int64":
        return isinstance(value, int) and _INT64[0] <= value <= _INT64[1]
    if not isinstance(value, str):
        return True
    try:
        if fmt == "ipv4":
            ipaddress.IPv4Address(value)
        elif fmt == "ipv6":
            ipaddress.IPv6Address(value)
        elif fmt == "date-time":
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


class Schema:
    """A compiled schema node tree. Patterns and CEL rules compile lazily, once, on first use."""

    def __init__(self, node: dict[str, Any]):
        self.node = node
        self._patterns: dict[int, Any] = {}
        self._rules: dict[int, list[CelRule]] = {}
        self._verdicts: dict[tuple[int, str], list[tuple[str, str]]] = {}

    # -- defaulting ---------------------------------------------------------------------------
    def apply_defaults(self, value: Any) -> Any:
        return self._default(self.node, value)

    def _default(self, node: dict[str, Any], value: Any) -> Any:
        if isinstance(value, dict):
            props = node.get("properties")
            if props:
                for key, sub in props.items():
                    if key in value and value[key] is None and not sub.get("nullable"):
                        del value[key]  # the API server drops nulls for non-nullable fields
                    if key not in value and "default" in sub:
                        value[key] = copy.deepcopy(sub["default"])
                    if key in value:
                        value[key] = self._default(sub, value[key])
            addl = node.get("additionalProperties")
            if isinstance(addl, dict):
                for key in list(value):
                    if not props or key not in props:
                        value[key] = self._default(addl, value[key])
        elif isinstance(value, list):
            items = node.get("items")
            if isinstance(items, dict):
                for i, item in enumerate(value):
                    value[i] = self._default(items, item)
        return value

    # -- validation ---------------------------------------------------------------------------
    def validate(self, value: Any, path: str = "") -> list[FieldError]:
        errors: list[FieldError] = []
        self._check(self.node, value, path, errors, strict=True)
        return errors

    def _pattern(self, node: dict[str, Any]) -> Any:
        compiled = self._patterns.get(id(node))
        if compiled is None:
            compiled = re2.compile(node["pattern"])
            self._patterns[id(node)] = compiled
        return compiled

    def _cel(self, node: dict[str, Any]) -> list[CelRule]:
        rules = self._rules.get(id(node))
        if rules is None:
            rules = [compile_rule(r) for r in node.get("x-kubernetes-validations", [])]
            self._rules[id(node)] = rules
        return rules

    def _check(self, node: dict[str, Any], value: Any, path: str, errors: list[FieldError], strict: bool) -> None:
        start = len(errors)
        if value is None:
            if not node.get("nullable") and strict:
                errors.append(FieldError(path, "must not be null"))
            return
        typ = node.get("type")
        if node.get("x-kubernetes-int-or-string"):
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                errors.append(FieldError(path, f"must be an integer or a string, not {_type_name(value)}"))
                return
        elif typ == "object":
            if not isinstance(value, dict):
                errors.append(FieldError(path, f"must be an object, not {_type_name(value)}"))
                return
            self._check_object(node, value, path, errors, strict)
        elif typ == "array":
            if not isinstance(value, list):
                errors.append(FieldError(path, f"must be a list, not {_type_name(value)}"))
                return
            self._check_array(node, value, path, errors, strict)
        elif typ == "string":
            if not isinstance(value, str):
                errors.append(FieldError(path, f"must be a string, not {_type_name(value)}"))
                return
        elif typ == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                errors.append(FieldError(path, f"must be an integer, not {_type_name(value)}"))
                return
        elif typ == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                errors.append(FieldError(path, f"must be a number, not {_type_name(value)}"))
                return
        elif typ == "boolean":
            if not isinstance(value, bool):
                errors.append(FieldError(path, f"must be true or false, not {_type_name(value)}"))
                return
        elif typ is None and isinstance(value, dict) and "properties" in node:
            self._check_object(node, value, path, errors, strict=False)  # a value validation (oneOf branch)

        if isinstance(value, str):
            if "minLength" in node and len(value) < node["minLength"]:
                errors.append(FieldError(path, f"must be at least {node['minLength']} characters long"))
            if "maxLength" in node and len(value) > node["maxLength"]:
                errors.append(FieldError(path, f"may not be longer than {node['maxLength']} characters"))
            if "pattern" in node and not self._pattern(node).search(value):
                errors.append(FieldError(path, f"{value!r} does not match the pattern {node['pattern']!r}"))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in node and value < node["minimum"]:
                errors.append(FieldError(path, f"must be greater than or equal to {node['minimum']}"))
            if "maximum" in node and value > node["maximum"]:
                errors.append(FieldError(path, f"must be less than or equal to {node['maximum']}"))
        if "format" in node and not _format_ok(node["format"], value):
            errors.append(FieldError(path, f"{value!r} is not a valid {node['format']}"))
        if "enum" in node and value not in node["enum"]:
            allowed = ", ".join(json.dumps(v) for v in node["enum"])
            errors.append(FieldError(path, f"unsupported value {json.dumps(value)}: supported values are {allowed}"))

        for sub in node.get("allOf", []):
            self._check(sub, value, path, errors, strict=False)
        if "anyOf" in node and not any(self._passes(sub, value) for sub in node["anyOf"]):
            errors.append(FieldError(path, "does not match any of the allowed forms"))
        if "oneOf" in node and sum(self._passes(sub, value) for sub in node["oneOf"]) != 1:
            errors.append(FieldError(path, "must match exactly one of the allowed forms"))
        if "not" in node and self._passes(node["not"], value):
            errors.append(FieldError(path, "matches a form that is not allowed"))

        # CEL rules see well-typed data only: the API server also skips them where the schema failed.
        if len(errors) == start and "x-kubernetes-validations" in node:
            for field_path, message in self._cel_verdicts(node, value):
                errors.append(FieldError(path + field_path if field_path else path, message))

    def _cel_verdicts(self, node: dict[str, Any], value: Any) -> list[tuple[str, str]]:
        """Failed rules of one node as (fieldPath, message). Objects repeat the same sub-values a lot
        (parentRefs, backendRefs, matches), so verdicts are memoised by node and canonical value."""
        memo_key = (id(node), json.dumps(value, sort_keys=True, separators=(",", ":")))
        verdicts = self._verdicts.get(memo_key)
        if verdicts is None:
            context = context_for(value)
            verdicts = []
            for rule in self._cel(node):
                message = rule.check(value, context)
                if message is not None:
                    verdicts.append((rule.field_path, message))
            if len(self._verdicts) >= 100_000:
                self._verdicts.clear()
            self._verdicts[memo_key] = verdicts
        return verdicts

    def _passes(self, node: dict[str, Any], value: Any) -> bool:
        probe: list[FieldError] = []
        self._check(node, value, "", probe, strict=False)
        return not probe

    def _check_object(
        self, node: dict[str, Any], value: dict[str, Any], path: str, errors: list[FieldError], strict: bool
    ) -> None:
        props = node.get("properties") or {}
        addl = node.get("additionalProperties")
        open_ended = node.get("x-kubernetes-preserve-unknown-fields") or addl is True
        for key, item in value.items():
            sub = props.get(key)
            if sub is not None:
                self._check(sub, item, _join(path, key), errors, strict)
            elif isinstance(addl, dict):
                self._check(addl, item, _join(path, key), errors, strict)
            elif strict and not open_ended and (props or addl is False):
                errors.append(FieldError(_join(path, key), "unknown field"))
        for key in node.get("required", []):
            if key not in value:
                errors.append(FieldError(_join(path, key), "required value"))
        if "maxProperties" in node and len(value) > node["maxProperties"]:
            errors.append(FieldError(path, f"must have at most {node['maxProperties']} items"))
        if "minProperties" in node and len(value) < node["minProperties"]:
            errors.append(FieldError(path, f"must have at least {node['minProperties']} items"))

    def _check_array(
        self, node: dict[str, Any], value: list[Any], path: str, errors: list[FieldError], strict: bool
    ) -> None:
        if "maxItems" in node and len(value) > node["maxItems"]:
            errors.append(FieldError(path, f"must have at most {node['maxItems']} items"))
        if "minItems" in node and len(value) < node["minItems"]:
            errors.append(FieldError(path, f"must have at least {node['minItems']} items"))
        items = node.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                self._check(items, item, f"{path}[{i}]", errors, strict)
        list_type = node.get("x-kubernetes-list-type")
        if list_type == "set":
            seen: set[str] = set()
            for i, item in enumerate(value):
                token = json.dumps(item, sort_keys=True)
                if token in seen:
                    errors.append(FieldError(f"{path}[{i}]", f"duplicate value {token}"))
                seen.add(token)
        elif list_type == "map":
            keys = node.get("x-kubernetes-list-map-keys", [])
            seen_keys: set[str] = set()
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                token = json.dumps([item.get(k) for k in keys])
                if token in seen_keys:
                    shown = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
                    errors.append(FieldError(f"{path}[{i}]", f"duplicate entry with {shown}"))
                seen_keys.add(token)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
