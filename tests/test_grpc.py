"""gRPC through a GRPCRoute with stock grpcio servers and clients (not the project's echo): every call shape,
metadata and trailers, error statuses with messages, deadlines and cancels that reach the pod, the standard
health and reflection services, large messages, and the errors tidegate answers itself as gRPC statuses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.harness import free_port, tidegate_run
from tests.manifests import http_gateway, service

GW = "127.0.0.1"
POD = "127.0.14.1"
HOST = "grpc.test"
MIB = 1024 * 1024


class EchoPod:
    """A grpcio server with a service of bytes in, bytes out (no generated code needed), the standard health
    service and reflection. It notes the calls it saw end by cancellation."""

    def __init__(self, port: int):
        self.cancelled: list[str] = []
        self.seen_metadata: dict[str, str] = {}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                  options=[("grpc.max_receive_message_length", 8 * MIB),
                                           ("grpc.max_send_message_length", 8 * MIB)])
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Hang": grpc.unary_stream_rpc_method_handler(self.hang),
        }
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", handlers)])
        health_servicer = health.HealthServicer()
        health_servicer.set("test.Echo", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        reflection.enable_server_reflection(["test.Echo", health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.server.add_insecure_port(f"{POD}:{port}")

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen_metadata = dict(context.invocation_metadata())
        context.set_trailing_metadata((("x-pod", "echo-pod"),))
        return b"echo:" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"+".join(requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in requests:
            yield message.upper()

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())

    def hang(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        done = threading.Event()
        context.add_callback(done.set)
        yield b"started"
        if not done.wait(30):
            return
        if context.code() is None and not context.is_active():
            self.cancelled.append(request.decode())

    def __enter__(self) -> EchoPod:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None)


def _grpc_route(name: str, service_name: str, backend: str, rules: str = "") -> str:
    return f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: {name}, namespace: default}}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: [{HOST}]
  rules:
    - matches: [{{method: {{service: {service_name}}}}}]
      backendRefs: [{{name: {backend}, port: 80}}]
{rules}"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("grpc")
    port, pod_port, dead_port = free_port(GW), free_port(POD), free_port(POD)
    config = tmp / "config"
    config.mkdir()
    # "echo" names no appProtocol; "echo-helm" says appProtocol: grpc, as Helm charts commonly do.
    (config / "all.yaml").write_text(
        http_gateway(GW, port)
        + service("echo", [(POD, pod_port, "echo-pod")]) + service("echo-helm", [(POD, pod_port, "echo-pod")], "grpc")
        + service("dead", [(POD, dead_port, "dead-pod")])
        + _grpc_route("echo", "test.Echo", "echo")
        + _grpc_route("helm", "test.HelmEcho", "echo-helm")
        + _grpc_route("health", "grpc.health.v1.Health", "echo")
        + _grpc_route("reflection", "grpc.reflection.v1alpha.ServerReflection", "echo")
        + _grpc_route("dead", "test.Dead", "dead"))
    with EchoPod(pod_port) as pod, tidegate_run(config, (GW, port), tmp / "tidegate.log"):
        channel = grpc.insecure_channel(f"{GW}:{port}", options=[("grpc.default_authority", HOST),
                                                                  ("grpc.max_receive_message_length", 8 * MIB)])
        try:
            yield {"pod": pod, "channel": channel, "port": port}
        finally:
            channel.close()


def _method(stack: dict, kind: str, name: str, service_name: str = "test.Echo"):
    return getattr(stack["channel"], kind)(f"/{service_name}/{name}")


def test_unary_with_metadata_and_trailers(stack):
    call = _method(stack, "unary_unary", "Unary")
    answer, state = call.with_call(b"hello", metadata=(("x-tenant", "blue"),), timeout=5)
    assert answer == b"echo:hello"
    assert state.code() == grpc.StatusCode.OK
    assert ("x-pod", "echo-pod") in state.trailing_metadata()
    assert stack["pod"].seen_metadata["x-tenant"] == "blue"


def test_every_streaming_shape(stack):
    assert list(_method(stack, "unary_stream", "ServerStream")(b"100", timeout=5)) == [b"%d" % i for i in range(100)]
    assert _method(stack, "stream_unary", "ClientStream")(iter([b"a", b"b", b"c"]), timeout=5) == b"a+b+c"
    assert list(_method(stack, "stream_stream", "Bidi")(iter([b"x", b"y"] * 50), timeout=5)) == [b"X", b"Y"] * 50


def test_four_mebibyte_messages_both_ways(stack):
    payload = bytes(range(256)) * (4 * MIB // 256)
    assert _method(stack, "unary_unary", "Unary")(payload, timeout=10) == b"echo:" + payload


def test_a_pods_error_status_and_message_reach_the_client(stack):
    with pytest.raises(grpc.RpcError) as failed:
        _method(stack, "unary_unary", "Fail")(b"widget-7", timeout=5)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "no such thing: widget-7"


def test_a_deadline_ends_the_call_on_both_sides(stack):
    started = time.monotonic()
    call = _method(stack, "unary_stream", "Hang")(b"deadline", timeout=0.5)
    with pytest.raises(grpc.RpcError) as failed:
        list(call)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


def test_a_clients_cancel_reaches_the_pod(stack):
    call = _method(stack, "unary_stream", "Hang")(b"cancel-me")  # no deadline: only the cancel can end it
    assert next(call) == b"started"
    call.cancel()
    deadline = time.monotonic() + 5
    while "cancel-me" not in stack["pod"].cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cancel-me" in stack["pod"].cancelled


def test_the_standard_health_service(stack):
    stub = health_pb2_grpc.HealthStub(stack["channel"])
    answer = stub.Check(health_pb2.HealthCheckRequest(service="test.Echo"), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_pods_services(stack):
    database = ProtoReflectionDescriptorDatabase(stack["channel"])
    assert {"test.Echo", "grpc.health.v1.Health"} <= set(database.get_services())


def test_a_service_port_with_app_protocol_grpc_is_reached_over_http2(stack):
    # The pod serves test.Echo only; the call reaching it at all (an UNIMPLEMENTED from grpcio itself, with
    # its own message) shows that tidegate spoke HTTP/2 to it.
    with pytest.raises(grpc.RpcError) as failed:
        _method(stack, "unary_unary", "Unary", "test.HelmEcho")(b"x", timeout=5)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Method not found" in (failed.value.details() or "")


def test_what_tidegate_answers_itself_is_a_grpc_status(stack):
    with pytest.raises(grpc.RpcError) as no_route:
        _method(stack, "unary_unary", "Call", "test.Nowhere")(b"x", timeout=5)
    assert no_route.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no route" in no_route.value.details()
    with pytest.raises(grpc.RpcError) as down:
        _method(stack, "unary_unary", "Call", "test.Dead")(b"x", timeout=5)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert down.value.details()


def _log(stack: dict) -> str:
    return Path(stack["log"]).read_text()
