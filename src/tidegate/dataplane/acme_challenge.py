"""ACME challenge answers, from the store the ordering replica writes (acme/store.py), in every worker of
every replica, so that whichever one the CA reaches answers:

- HTTP-01 (RFC 8555 section 8.3), on every HTTP listener, before any route: a request for
  /.well-known/acme-challenge/TOKEN gets the key authorization put there for that token. A token with no
  answer goes on to the routes as any request does.
- TLS-ALPN-01 (RFC 8737), on every HTTPS listener, before TLS: a ClientHello that offers `acme-tls/1` alone
  gets the challenge certificate put there for its server name, and the connection is closed after the
  handshake. Without one, the handshake goes on as any other.

Answers are read at each request (a challenge is fetched a few times per order).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path
from typing import Final

PREFIX: Final = "/.well-known/acme-challenge/"
ALPN: Final = "acme-tls/1"
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,256}")
_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")

DIR: Path | None = None  # --acme-dir's challenges/ (set in each worker); None: no ACME in this run


def answer(path: str) -> str | None:
    """The key authorization for the token `path` names, if one is pending."""
    token = path[len(PREFIX):]
    if DIR is None or not _TOKEN.fullmatch(token):
        return None
    try:
        return (DIR / "http-01" / token).read_text("ascii")
    except (OSError, UnicodeDecodeError):
        return None


def tls_alpn_context(server_name: str) -> ssl.SSLContext | None:
    """A server context with the TLS-ALPN-01 certificate pending for `server_name`, if there is one."""
    if DIR is None or not _NAME.fullmatch(server_name):
        return None
    path = DIR / "tls-alpn-01" / f"{server_name}.pem"
    if not path.is_file():
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(path)
    except (OSError, ssl.SSLError):
        return None
    context.set_alpn_protocols([ALPN])
    return context


class AnsweredChallenge(asyncio.Protocol):
    """A TLS-ALPN-01 validation's connection: its handshake was the answer; closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
