"""HTTP Basic authentication against an htpasswd file: the BasicAuth filter (ingress-nginx's `auth-type: basic`).

The file is read as nginx's auth_basic_user_file reads it: `user:hash` lines, `#` comments; the hashes that
nginx takes on Debian (crypt(3): `$apr1$` and `$1$` MD5, `$5$`/`$6$` SHA-crypt, bcrypt `$2y$`/`$2b$`, DES;
`{SHA}`, `{SSHA}` and `{PLAIN}`) are checked with passlib (libpass). A line whose hash no scheme reads never
matches (an empty hash included: nginx's crypt of any password differs from ""), and `unreadable` says which,
for the translator's report.

A check that is not cached runs in a thread (bcrypt takes milliseconds by design, and releases the GIL), so
the event loop never waits for it. Verdicts are kept per Authorization value (bounded), so a client that sends
the same credentials again costs a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
from typing import Any

from passlib.context import CryptContext

SCHEMES = ["apr_md5_crypt", "md5_crypt", "bcrypt", "sha256_crypt", "sha512_crypt", "ldap_salted_sha1", "ldap_sha1",
           "des_crypt"]
_CONTEXT = CryptContext(schemes=SCHEMES)
REMEMBERED = 4096  # verdicts kept per user file
PLAIN = "{PLAIN}"

Refusal = tuple[int, str, list[tuple[str, str]]]


class Users:
    """One htpasswd file, read once, and the verdicts given on it."""

    def __init__(self, text: str):
        self.hashes: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or ":" not in line:
                continue
            user, _, rest = line.partition(":")
            self.hashes.setdefault(user, rest.split(":", 1)[0])  # nginx: the first line of a user; "user:hash:..."
        self.verdicts: dict[str, bool] = {}

    def verify(self, user: str, password: str) -> bool:
        stored = self.hashes.get(user)
        if stored is None:
            return False
        if stored.startswith(PLAIN):
            return hmac.compare_digest(stored[len(PLAIN):].encode(), password.encode())
        try:
            return bool(_CONTEXT.verify(password, stored))
        except (ValueError, TypeError):  # no scheme reads it
            return False

    def remember(self, authorization: str, verdict: bool) -> None:
        if len(self.verdicts) >= REMEMBERED:
            del self.verdicts[next(iter(self.verdicts))]  # the oldest
        self.verdicts[authorization] = verdict


_FILES: dict[str, Users] = {}  # by the file's text: a new configuration with the same Secret keeps its verdicts


def users_of(text: str) -> Users:
    users = _FILES.get(text)
    if users is None:
        if len(_FILES) >= 1024:
            _FILES.clear()
        users = _FILES[text] = Users(text)
    return users


def credentials(authorization: str) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic ...` value, or None."""
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


async def check(config: dict[str, Any], authorization: str | None) -> Refusal | None:
    """None when the request may go on; else the answer: 401 with the challenge, or 503 when the filter could
    not be set up (its Secret is missing or wrong)."""
    if config.get("problem"):
        return 503, f"authentication is not available: {config['problem']}", []
    challenge = [("WWW-Authenticate", f'Basic realm="{config.get("realm", "")}"')]
    if not authorization:
        return 401, "authorization required", challenge
    users = users_of(config["htpasswd"])
    verdict = users.verdicts.get(authorization)
    if verdict is None:
        found = credentials(authorization)
        if found is None:
            verdict = False
        elif found[0] not in users.hashes:
            verdict = False
        else:
            verdict = await asyncio.get_running_loop().run_in_executor(None, users.verify, *found)
        users.remember(authorization, verdict)
    return None if verdict else (401, "authorization required", challenge)


def unreadable(text: str) -> list[str]:
    """What in an htpasswd file never lets anyone in: lines whose hash no scheme reads."""
    out = []
    for user, stored in Users(text).hashes.items():
        if stored.startswith(PLAIN):
            continue
        if not stored or _CONTEXT.identify(stored, required=False) is None:
            out.append(f"user {user!r}: its password hash is empty or of a kind tidegate does not read (never "
                       "matches)")
    return out
