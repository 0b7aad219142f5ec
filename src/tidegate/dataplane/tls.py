"""TLS termination: one server-side SSL context per bound port, choosing the certificate by SNI.

The SNI callback reads the current `TLSSite` on every handshake, so certificates change on reload without
closing the listening socket. A listener is chosen by hostname (most specific first), then among its
certificates the one whose names cover the SNI, else its first.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable

from tidegate import ir
from tidegate.translate.hostnames import matches, specificity


def _require_client_certificates(ctx: ssl.SSLContext, client_ca_pem: str, mode: str) -> None:
    """AllowValidOnly: a client certificate signed by one of the CAs is required. AllowInsecureFallback lets
    every client in, so no certificate is asked for (Python's ssl cannot accept a failed verification)."""
    if client_ca_pem and mode == "AllowValidOnly":
        ctx.load_verify_locations(cadata=client_ca_pem)
        ctx.verify_mode = ssl.CERT_REQUIRED


HTTP_ALPN = ("h2", "http/1.1")


def context_for(cert: ir.Certificate, client_ca_pem: str = "", client_mode: str = "",
                alpn: tuple[str, ...] = HTTP_ALPN) -> ssl.SSLContext:
    """`alpn`: the protocols offered; none for a TLS listener that relays bytes (a TLSRoute)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    _require_client_certificates(ctx, client_ca_pem, client_mode)
    load_certificate(ctx, cert)
    return ctx


def load_certificate(ctx: ssl.SSLContext, cert: ir.Certificate) -> None:
    """ctx.load_cert_chain reads files only: write the PEMs to a private temporary file, removed at once."""
    fd, path = tempfile.mkstemp(prefix="tidegate-cert-", suffix=".pem")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(cert.cert_pem.rstrip() + "\n" + cert.key_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


class TLSSite:
    """The certificates of the HTTPS (or TLS Terminate) listeners on one bound port."""

    def __init__(self, listeners: list[ir.Listener], cache: dict[tuple[str, str, str, str], ssl.SSLContext],
                 alpn: tuple[str, ...] = HTTP_ALPN):
        self.entries: list[tuple[str, list[tuple[ir.Certificate, ssl.SSLContext]]]] = []
        self.client_validation = ("", "")  # (CA PEM, mode) of the port: the same for all its listeners
        for listener in sorted(listeners, key=lambda l: specificity(l.hostname)):
            if listener.tls is None or not listener.tls.certificates:
                continue
            client = (listener.tls.client_ca_pem, listener.tls.client_validation)
            if client[0]:
                self.client_validation = client
            contexts = []
            for cert in listener.tls.certificates:
                key = (cert.cert_pem, cert.key_pem, *client)
                if key not in cache:
                    cache[key] = context_for(cert, *client, alpn=alpn)
                contexts.append((cert, cache[key]))
            self.entries.append((listener.hostname, contexts))

    def select(self, server_name: str | None) -> ssl.SSLContext | None:
        name = (server_name or "").lower()
        for hostname, contexts in self.entries:
            if name and not matches(hostname, name):
                continue
            for cert, ctx in contexts:
                if any(matches(h, name) for h in cert.hostnames):
                    return ctx
            return contexts[0][1]
        return self.entries[0][1][0][1] if self.entries else None


# SNI seen during handshakes, by id() of the server-side SSLObject, until the connection picks it up (the
# server side of an SSLObject does not keep the name it was asked for).
SERVER_NAMES: dict[int, str] = {}


def take_server_name(ssl_object: object) -> str:
    return SERVER_NAMES.pop(id(ssl_object), "")


def server_context(current: Callable[[], TLSSite | None], client_ca_pem: str = "",
                   client_mode: str = "", alpn: tuple[str, ...] = HTTP_ALPN) -> ssl.SSLContext:
    """The context a listening socket is created with; its SNI callback swaps in the chosen certificate. Client
    certificate checks are set here too (the handshake keeps the first context's verification settings), so a
    change of them reopens the socket."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    _require_client_certificates(ctx, client_ca_pem, client_mode)

    def on_sni(sock: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        site = current()
        if server_name:
            if len(SERVER_NAMES) > 10_000:  # handshakes that failed after SNI never collect theirs
                SERVER_NAMES.clear()
            SERVER_NAMES[id(sock)] = server_name.lower()
        chosen = site.select(server_name) if site else None
        if chosen is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sock.context = chosen
        return None

    ctx.sni_callback = on_sni
    return ctx
