"""kube-proxy's health check answers on `healthCheckNodePort`s (`tidegate run --node-ports`, for clusters without
kube-proxy): an external balancer asks each node whether it has a ready pod of a `Local` Service, and how many.

Any request gets, as kube-proxy answers it: `200` with at least one ready local pod, else `503`; the header
`X-Load-Balancing-Endpoint-Weight: N` (the local pods, for balancers that weight nodes); and the JSON body
`{"service": {"namespace": ..., "name": ...}, "localEndpoints": N, "serviceProxyHealthy": true}`.
Served by the control process, which knows the counts from each translation.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger("tidegate.health_check_ports")

READ_LIMIT = 8192  # bytes of request head read before answering
READ_TIMEOUT = 5.0


def answer(namespace: str, name: str, local_endpoints: int) -> bytes:
    body = json.dumps({"service": {"namespace": namespace, "name": name}, "localEndpoints": local_endpoints,
                       "serviceProxyHealthy": True}).encode()
    status = "200 OK" if local_endpoints > 0 else "503 Service Unavailable"
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n"
            f"X-Load-Balancing-Endpoint-Weight: {local_endpoints}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class HealthCheckPorts:
    def __init__(self, bind: str = "0.0.0.0"):
        self.bind = bind
        self.servers: dict[int, asyncio.base_events.Server] = {}
        self.answers: dict[int, tuple[str, str, int]] = {}
        self.failed: dict[int, str] = {}

    async def update(self, checks: list[Any]) -> None:
        """`checks`: translate.loadbalancers.HealthCheck entries."""
        self.answers = {c.port: (c.namespace, c.name, c.local_endpoints) for c in checks}
        for port in [p for p in self.servers if p not in self.answers]:
            self.servers.pop(port).close()
        self.failed = {}
        for port in self.answers:
            if port in self.servers:
                continue
            try:
                self.servers[port] = await asyncio.start_server(
                    lambda r, w, port=port: self._serve(port, r, w), host=self.bind, port=port, reuse_address=True)
            except OSError as exc:
                self.failed[port] = str(exc)
                namespace, name, _ = self.answers[port]
                log.error("healthCheckNodePort %d of Service %s/%s: cannot listen: %s", port, namespace, name, exc)

    async def _serve(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                await reader.readuntil(b"\r\n\r\n")
            namespace, name, count = self.answers.get(port, ("", "", 0))
            writer.write(answer(namespace, name, count))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers = {}
