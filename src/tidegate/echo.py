"""An echo server that answers like the Gateway API conformance echo server (echo-basic).

Every request gets JSON with path (the request URI), host, method, proto, headers (canonical names, Host
left out, as Go's net/http has them), httpPort, namespace, ingress, service and pod; `X-Echo-Set-Header:
name:value,...` sets response headers; `/status/NNN` answers with that status; `/health` answers OK;
`?delay=1s` waits first; `/retry/...?uuid=U&succeedAfter=N[&responseCode=C]` fails the first N requests
for U (with C, or by resetting the connection), as echo-basic's retry simulation does. For tidegate's own tests it also has `/stream/N` (N bytes of zeros, streamed with
backpressure) and reports `bodySize` when a request had a body. One process can serve many "pods", each on
its own address. `/ws` is a WebSocket echo, as echo-basic's. Over h2c, `X-Echo-Trailer: name:value,...` sends
trailers after the body, and `X-Echo-Trailers-Only: name:value,...` answers with those fields in a single
HEADERS frame that ends the stream (gRPC's Trailers-Only). A port can serve TLS (with echo-basic's "tls"
fields: version, serverName, negotiatedProtocol, cipherSuite).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import socket
import ssl
import struct
from dataclasses import dataclass
from urllib.parse import parse_qs

import httptools

_STATUS = re.compile(r"^/status/(\d\d\d)$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class PodIdentity:
    namespace: str = ""
    pod: str = ""
    service: str = ""
    ingress: str = ""


def _fields(specs: list[str], lower: bool = False) -> list[tuple[str, str]]:
    """The fields of "name:value,name:value" headers (X-Echo-Set-Header's form); `lower`: names in lower case,
    as HTTP/2 sends them."""
    out = []
    for spec in specs:
        for item in spec.split(","):
            name, _, value = item.strip().partition(":")
            if name:
                out.append((name.lower() if lower else name, value.strip()))
    return out


def canonical_header(name: str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey: x-foo-bar → X-Foo-Bar."""
    if not all(c.isalnum() or c == "-" for c in name):
        return name
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def _duration(text: str) -> float:
    return sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))


_RETRY_ATTEMPTS: dict[str, int] = {}
_SNI: dict[int, str] = {}  # server names seen in handshakes, until the connection reads its own


def tls_context(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file:  # as echo-basic with TLS_CLIENT_CACERTS: verify a client certificate when one is given
        ctx.load_verify_locations(client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL

    def remember(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        if len(_SNI) > 10_000:
            _SNI.clear()
        _SNI[id(sock)] = name or ""

    ctx.sni_callback = remember
    return ctx


class EchoProtocol(asyncio.Protocol):
    def __init__(self, identity: PodIdentity, http_port: str, log_requests: bool = False):
        self.identity = identity
        self.log_requests = log_requests
        self.http_port = http_port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body_size = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self.tls: dict[str, str] | None = None  # echo-basic's "tls" assertions, on a TLS port
        self.ws_buffer: bytes | None = None  # set once upgraded to WebSocket
        self.h2 = None  # an h2 connection once the client spoke HTTP/2
        self.seen_bytes = False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        self.transport = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            peer = ssl_object.getpeercert(binary_form=True)
            self.tls = {"version": ssl_object.version() or "", "serverName": _SNI.pop(id(ssl_object), ""),
                        "negotiatedProtocol": ssl_object.selected_alpn_protocol() or "",
                        "cipherSuite": cipher[0] if cipher else "",
                        "peerCertificates": [ssl.DER_cert_to_PEM_cert(peer)] if peer else []}

    def data_received(self, data: bytes) -> None:
        if self.ws_buffer is not None:
            self._ws_feed(data)
            return
        if self.h2 is not None:
            self._h2_feed(data)
            return
        if not self.seen_bytes:
            self.seen_bytes = True
            if data[:3] == b"PRI":  # HTTP/2 with prior knowledge (h2c), as echo-basic's H2C port answers
                self._h2_start()
                self._h2_feed(data)
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._ws_upgrade(data[exc.args[0]:])
        except httptools.HttpParserError:
            if self.transport:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body_size = b"", [], 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)

    def _h2_start(self) -> None:
        import h2.config
        import h2.connection

        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.h2_streams: dict[int, tuple[list, int]] = {}

    def _h2_feed(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.h2_streams[event.stream_id] = (event.headers, 0)
                if event.stream_ended is not None:
                    self._h2_answer(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                headers, size = self.h2_streams.get(event.stream_id, ([], 0))
                self.h2_streams[event.stream_id] = (headers, size + len(event.data))
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_ended is not None:
                    self._h2_answer(event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._h2_answer(event.stream_id)
        if self.transport is not None:
            self.transport.write(self.h2.data_to_send())

    def _h2_answer(self, stream_id: int) -> None:
        if stream_id not in self.h2_streams:
            return  # already answered (h2 reports the end of a stream twice: with the data and on its own)
        headers, size = self.h2_streams.pop(stream_id)
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        grouped: dict[str, list[str]] = {}
        for name, value in headers:
            if not name.startswith(":"):
                grouped.setdefault(canonical_header(name), []).append(value)
        payload = {"path": pseudo.get(":path", "/"), "host": pseudo.get(":authority", ""),
                   "method": pseudo.get(":method", "GET"), "proto": "HTTP/2.0", "headers": grouped,
                   "httpPort": self.http_port, "namespace": self.identity.namespace,
                   "ingress": self.identity.ingress, "service": self.identity.service, "pod": self.identity.pod}
        if size:
            payload["bodySize"] = size
        if self.log_requests:
            print(f"request {self.identity.namespace}/{self.identity.pod} {payload['method']} {payload['path']}",
                  flush=True)
        only = _fields(grouped.get("X-Echo-Trailers-Only", []), lower=True)
        if only:  # gRPC's Trailers-Only: one HEADERS frame that ends the stream
            self.h2.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc"), *only],
                                 end_stream=True)
            return
        body = json.dumps(payload, indent=1).encode()
        trailers = _fields(grouped.get("X-Echo-Trailer", []), lower=True)
        self.h2.send_headers(stream_id, [(":status", "200"), ("content-type", "application/json"),
                                         ("content-length", str(len(body)))])
        self.h2.send_data(stream_id, body, end_stream=not trailers)  # small: within the default window
        if trailers:
            self.h2.send_headers(stream_id, trailers, end_stream=True)

    def _ws_upgrade(self, rest: bytes) -> None:
        headers = {k.lower(): v for k, v in self.headers}
        key = headers.get("sec-websocket-key", "")
        if headers.get("upgrade", "").lower() != "websocket" or not key or self.transport is None:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.ws_buffer = b""
        if rest:
            self._ws_feed(rest)

    def _ws_feed(self, data: bytes) -> None:
        """Echo each complete frame back unmasked, with its opcode; answer a close with a close."""
        assert self.ws_buffer is not None
        buf = self.ws_buffer + data
        while len(buf) >= 2:
            opcode, masked, length = buf[0] & 0x0F, buf[1] & 0x80, buf[1] & 0x7F
            pos = 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, pos = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, pos = int.from_bytes(buf[2:10], "big"), 10
            mask = buf[pos:pos + 4] if masked else b""
            pos += 4 if masked else 0
            if len(buf) < pos + length:
                break
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buf[pos:pos + length])) if masked else \
                buf[pos:pos + length]
            buf = buf[pos + length:]
            if length < 126:
                head = bytes([0x80 | opcode, length])
            elif length < 65536:
                head = bytes([0x80 | opcode, 126]) + length.to_bytes(2, "big")
            else:
                head = bytes([0x80 | opcode, 127]) + length.to_bytes(8, "big")
            if self.transport is None:
                return
            if opcode == 0x9:  # ping → pong
                head = bytes([0x8A]) + head[1:]
            self.transport.write(head + payload)
            if opcode == 0x8:
                self.transport.close()
                return
        self.ws_buffer = buf

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # answered in data_received once the upgrade is seen
        method = self.parser.get_method().decode()
        version = self.parser.get_http_version()
        keep_alive = self.parser.should_keep_alive()
        asyncio.get_running_loop().create_task(
            self._answer(method, version, keep_alive, self.url, self.headers, self.body_size))

    async def _stream(self, size: int, keep_alive: bool) -> None:
        assert self.transport is not None
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
        self.transport.write((head + ("" if keep_alive else "Connection: close\r\n") + "\r\n").encode())
        chunk = bytes(65536)
        left = size
        while left > 0 and self.transport is not None:
            await self._writable.wait()
            if self.transport is None:
                return
            self.transport.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        if not keep_alive and self.transport is not None:
            self.transport.close()

    async def _answer(self, method: str, version: str, keep_alive: bool, url: bytes,
                      headers: list[tuple[str, str]], body_size: int) -> None:
        target = url.decode("latin-1")
        if self.log_requests:
            print(f"request {self.identity.namespace}/{self.identity.pod} {method} {target}", flush=True)
        parsed = httptools.parse_url(url)
        path = (parsed.path or b"/").decode("latin-1").replace("//", "/")
        query = parse_qs((parsed.query or b"").decode("latin-1"))
        if "delay" in query:
            await asyncio.sleep(_duration(query["delay"][0]))
        host = ""
        grouped: dict[str, list[str]] = {}
        for name, value in headers:
            if name.lower() == "host":
                host = value
                continue
            grouped.setdefault(canonical_header(name), []).append(value)
        extra = _fields(grouped.get("X-Echo-Set-Header", []))
        status_match = _STATUS.match(path)
        if path.startswith("/retry/"):
            uuid, after = query.get("uuid", [""])[0], query.get("succeedAfter", [""])[0]
            if not uuid or not after.isdigit():
                self._write(400, b"uuid and succeedAfter are required", "text/plain", [], keep_alive, method)
                return
            if _RETRY_ATTEMPTS.get(uuid, 0) < int(after):
                _RETRY_ATTEMPTS[uuid] = _RETRY_ATTEMPTS.get(uuid, 0) + 1
                if "delayRetry" in query:
                    await asyncio.sleep(_duration(query["delayRetry"][0]))
                code = query.get("responseCode", [""])[0]
                if code.isdigit():
                    self._write(int(code), b"", "text/plain", [], keep_alive, method)
                elif self.transport is not None:
                    sock = self.transport.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.transport.abort()  # a reset, as the Go server's hijack-and-close does
                return
        if path.startswith("/stream/") and path[8:].isdigit() and method == "GET":
            await self._stream(int(path[8:]), keep_alive)
            return
        if path == "/health":
            status, body, ctype = 200, b"OK", "text/plain"
        elif status_match:
            status, body, ctype = int(status_match.group(1)), b"", "text/plain"
        else:
            payload = {
                "path": target, "host": host, "method": method, "proto": f"HTTP/{version}",
                "headers": grouped, "httpPort": self.http_port, "namespace": self.identity.namespace,
                "ingress": self.identity.ingress, "service": self.identity.service, "pod": self.identity.pod,
            }
            if body_size:
                payload["bodySize"] = body_size
            if self.tls is not None:
                payload["tls"] = self.tls
            status, body, ctype = 200, json.dumps(payload, indent=1).encode(), "application/json"
        self._write(status, body, ctype, extra, keep_alive, method)

    def _write(self, status: int, body: bytes, ctype: str, extra: list[tuple[str, str]], keep_alive: bool,
               method: str) -> None:
        lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Status'}", f"Content-Type: {ctype}",
                 "X-Content-Type-Options: nosniff", f"Content-Length: {len(body)}"]
        lines += [f"{n}: {v}" for n, v in extra]
        if not keep_alive:
            lines.append("Connection: close")
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if method == "HEAD" else body))
        if not keep_alive:
            self.transport.close()


async def start_echo(host: str, port: int, identity: PodIdentity, log_requests: bool = False,
                     tls: ssl.SSLContext | None = None) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: EchoProtocol(identity, str(port), log_requests), host=host, port=port,
                                    reuse_address=True, ssl=tls)
