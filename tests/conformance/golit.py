"""Read the official conformance cases (Go) as data: ShortName, Features, Manifests, the Gateways they use and
their `http.ExpectedResponse` literals, so the Python harness applies the official expectations unchanged.

A small reader of Go composite literals: strings, numbers, struct/slice/map literals, `&`, `ptr.To(...)`, and
the suite's named constants. Anything else makes the case "not portable" with the reason, never a silent skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INFRA, WEB, APP = "gateway-conformance-infra", "gateway-conformance-web-backend", "gateway-conformance-app-backend"

CONSTANTS = {
    "ns": INFRA, "namespace": INFRA,
    "confsuite.InfrastructureNamespace": INFRA, "suite.InfrastructureNamespace": INFRA,
    "confsuite.AppBackendNamespace": APP, "suite.AppBackendNamespace": APP,
    "confsuite.WebBackendNamespace": WEB, "suite.WebBackendNamespace": WEB,
    "confsuite.InfraBackendServiceNameV1": "infra-backend-v1", "suite.InfraBackendServiceNameV1": "infra-backend-v1",
    "confsuite.InfraBackendServiceNameV2": "infra-backend-v2", "suite.InfraBackendServiceNameV2": "infra-backend-v2",
    "confsuite.InfraBackendServiceNameV3": "infra-backend-v3", "suite.InfraBackendServiceNameV3": "infra-backend-v3",
    "confsuite.AppBackendServiceNameV1": "app-backend-v1", "confsuite.AppBackendServiceNameV2": "app-backend-v2",
    "confsuite.WebBackendServiceName": "web-backend",
    "roundtripper.H2CPriorKnowledgeProtocol": "H2C", "roundtripper.H2Protocol": "HTTP/2",
    "serverStr": "abc.example.com",  # a local of the BackendTLSPolicy cases, always this value
    "expectedClientCert": "@tls-checks-client-certificate",  # the harness puts that Secret's PEM here
    "true": True, "false": False, "nil": None,
}


class Unportable(Exception):
    pass


_TOKEN = re.compile(r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<raw>`[^`]*`)
  | (?P<str>"(?:\\.|[^"\\])*")
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<punct>[{}\[\]():,&*+])
""", re.DOTALL | re.VERBOSE)


def tokenize(text: str, start: int) -> list[tuple[str, Any, int]]:
    tokens, pos, depth = [], start, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise Unportable(f"cannot read Go near {text[pos:pos + 40]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        value: Any = m.group()
        if kind == "raw":
            value, kind = value[1:-1], "str"
        elif kind == "str":
            value = bytes(value[1:-1], "utf-8").decode("unicode_escape")
        elif kind == "num":
            value = float(value) if "." in value else int(value)
        tokens.append((kind, value, m.start()))
        if kind == "punct" and value == "{":
            depth += 1
        elif kind == "punct" and value == "}":
            depth -= 1
            if depth == 0:
                break
    return tokens


class _Reader:
    def __init__(self, tokens: list[tuple[str, Any, int]]):
        self.tokens = tokens
        self.i = 0

    def peek(self, k: int = 0) -> tuple[str, Any]:
        if self.i + k >= len(self.tokens):
            return ("eof", None)
        kind, value, _ = self.tokens[self.i + k]
        return kind, value

    def take(self, expect: str | None = None) -> Any:
        kind, value = self.peek()
        if expect is not None and value != expect:
            raise Unportable(f"expected {expect!r}, found {value!r}")
        self.i += 1
        return value

    def skip_type(self) -> None:
        """A type: []T, map[K]V, *T, pkg.T, with generic brackets."""
        kind, value = self.peek()
        if value == "[":
            self.take("[")
            self.take("]")
            self.skip_type()
        elif value == "map":
            self.take("map")
            self.take("[")
            self.skip_type()
            self.take("]")
            self.skip_type()
        elif value == "*":
            self.take("*")
            self.skip_type()
        elif kind == "ident":
            self.take()
        else:
            raise Unportable(f"unexpected {value!r} in a type")

    def value(self) -> Any:
        kind, value = self.peek()
        if value == "&":
            self.take("&")
            return self.value()
        if value in ("[", "map"):
            self.skip_type()
            return self.composite()
        if value == "{":
            return self.composite()
        if kind in ("str", "num"):
            self.take()
            result = value
            while self.peek()[1] == "+":
                self.take("+")
                result = result + self.value()
            return result
        if kind == "ident":
            self.take()
            nxt = self.peek()[1]
            if nxt == "{":
                literal = self.composite()
                if isinstance(literal, dict):
                    literal["__type"] = value
                return literal
            if nxt == "(":
                self.take("(")
                args = []
                while self.peek()[1] != ")":
                    args.append(self.value())
                    if self.peek()[1] == ",":
                        self.take(",")
                self.take(")")
                if value in ("ptr.To", "new", "int32", "int64", "int", "string", "float64") and len(args) == 1:
                    return args[0]
                raise Unportable(f"call to {value}()")
            if nxt == "[" and value == "ptr.To":  # ptr.To[int32](50)
                self.take("[")
                self.skip_type()
                self.take("]")
                self.take("(")
                arg = self.value()
                self.take(")")
                return arg
            if value in CONSTANTS:
                return CONSTANTS[value]
            raise Unportable(f"unknown identifier {value}")
        raise Unportable(f"unexpected {value!r}")

    def composite(self) -> Any:
        self.take("{")
        items: list[Any] = []
        fields: dict[str, Any] = {}
        while self.peek()[1] != "}":
            if self.peek(1)[1] == ":" and self.peek()[0] in ("ident", "str", "num"):
                key = self.take()
                self.take(":")
                fields[str(key)] = self.value()
            else:
                items.append(self.value())
            if self.peek()[1] == ",":
                self.take(",")
        self.take("}")
        if fields and items:
            raise Unportable("mixed keyed and positional literal")
        return fields if fields or not items else items


@dataclass
class Expectation:
    literal: dict
    gateway: str  # the Gateway whose address the request goes to
    helper: str  # the suite helper that sends it (MakeRequestAndExpectEventuallyConsistentResponse, ...)
    server_name: str = ""  # TLS SNI, for the tls.* helpers ("@host": the request's Host)
    client_cert: str = ""  # which client certificate to present ("" none)
    port: int = 0  # a listener port other than the Gateway's first one
    expect_failure: bool = False  # MakeTLSRequestAndExpectFailureResponse: refused or not 200


@dataclass
class GoCase:
    short_name: str
    features: list[str]
    manifests: list[str]
    source: str
    gateways: list[str] = field(default_factory=list)
    expectations: list[Expectation] = field(default_factory=list)
    unportable: str = ""
    helpers: list[str] = field(default_factory=list)  # suite helpers the Test func calls


_CASE = re.compile(r"var\s+(\w+)\s*=\s*(?:conf)?suite\.ConformanceTest\{")
_NN = re.compile(r'(\w+)\s*:?=\s*types\.NamespacedName\{(?:Namespace:\s*[\w.]+,\s*)?Name:\s*"([^"]+)"')
_ADDR = re.compile(r"(\w+)\s*:?=\s*kubernetes\.Gateway\w*MustBeAccepted\w*\(.*?NewGatewayRef\((\w+)")
_SEND = re.compile(r"\b(http|h|tls|grpc)\.(Make\w+)\(([^\n]*)")
_SEND_BEFORE = re.compile(r"\b(http|h|tls|grpc)\.(Make\w+)\(([^;{}]*)$")


def _gateway_addresses(body: str) -> dict[str, list[tuple[int, str]]]:
    """gwAddr variables → [(position, Gateway name)], following reassignments of the NamespacedName vars."""
    events = sorted([(m.start(), "nn", m) for m in _NN.finditer(body)] +
                    [(m.start(), "addr", m) for m in _ADDR.finditer(body)], key=lambda e: e[0])
    names: dict[str, str] = {}
    addrs: dict[str, list[tuple[int, str]]] = {}
    for pos, kind, m in events:
        if kind == "nn":
            names[m.group(1)] = m.group(2)
        elif m.group(2) in names:
            addrs.setdefault(m.group(1), []).append((pos, names[m.group(2)]))
    return addrs


def read_cases(path: Path) -> list[GoCase]:
    text = path.read_text()
    starts = [m.start() for m in _CASE.finditer(text)] + [len(text)]
    cases = []
    for a, b in zip(starts, starts[1:]):
        body = text[a:b]
        short = re.search(r'ShortName:\s*"([^"]+)"', body)
        if not short:
            continue
        block = re.search(r"Features:\s*\[\]features\.FeatureName\{([^}]*)\}", body)
        features = re.findall(r"features\.Support(\w+)", block.group(1)) if block else []
        manifests = re.findall(r'"(tests/[^"]+\.yaml)"', body)
        test_ref = re.search(r"Test:\s*(\w+)\.Test\b", body)
        if test_ref:  # shares another case's test function
            other = re.search(rf"var\s+{test_ref.group(1)}\s*=.*?(?=\nvar\s|\Z)", text, re.DOTALL)
            body = body + (other.group(0) if other else "")
        case = GoCase(short.group(1), features, manifests, path.name)
        addrs = _gateway_addresses(body)
        case.gateways = list(dict.fromkeys(name for seen in addrs.values() for _, name in seen))
        case.helpers = sorted(set(re.findall(r"\b(?:http|weight|tls|grpc|kubernetes)\.(\w+)\(", body)))
        try:
            for m in re.finditer(r"(\[\])?(?:http|h)\.ExpectedResponse\{", body):
                reader = _Reader(tokenize(body, m.start() + (2 if m.group(1) else 0)))
                if m.group(1):
                    reader.skip_type()
                    literal = reader.composite()
                    found = [e for e in literal if isinstance(e, dict)]
                else:
                    reader.take()  # http.ExpectedResponse (or h.ExpectedResponse)
                    found = [reader.composite()]
                end = reader.tokens[reader.i - 1][2]
                # The literal is either an argument of the call that sends it, or sent by the next call.
                send = _SEND_BEFORE.search(body[max(0, m.start() - 300):m.start()]) or _SEND.search(body, end)
                helper, gateway = "", ""
                if send:
                    helper = f"{'http' if send.group(1) == 'h' else send.group(1)}.{send.group(2)}"
                    for arg in re.split(r"[,\s()]+", send.group(3)):
                        if arg in addrs:
                            before = [name for pos, name in addrs[arg] if pos < m.start()]
                            gateway = before[-1] if before else addrs[arg][0][1]
                            break
                server_name = ""
                if send and send.group(1) == "tls":
                    quoted = re.findall(r'"([^"]*)"', send.group(3))
                    server_name = quoted[0] if quoted else "@host"
                failure = bool(send and send.group(2) == "MakeRequestAndExpectFailure")
                case.expectations += [Expectation(e, gateway, helper, server_name, expect_failure=failure)
                                      for e in found]
        except Unportable as exc:
            case.unportable = str(exc)
        cases.append(case)
    return cases
