"""HTTP-01 answers (RFC 8555 section 8.3), on every HTTP listener of every worker, before any route.

A request for /.well-known/acme-challenge/TOKEN gets the key authorization the ordering replica put in the
ACME store (acme/store.py) for that token, read from the store at each request (a challenge is fetched a few
times per order), so that whichever replica or worker the CA reaches answers it. A token with no answer goes
on to the routes as any request does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

PREFIX: Final = "/.well-known/acme-challenge/"
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,256}")

DIR: Path | None = None  # --acme-dir's challenges/http-01 (set in each worker); None: no ACME in this run


def answer(path: str) -> str | None:
    """The key authorization for the token `path` names, if one is pending."""
    token = path[len(PREFIX):]
    if DIR is None or not _TOKEN.fullmatch(token):
        return None
    try:
        return (DIR / token).read_text("ascii")
    except (OSError, UnicodeDecodeError):
        return None
