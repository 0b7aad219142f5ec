"""The ACME state replicas share, in a directory (`--acme-dir`), every write atomic (a new file renamed in):

    challenges/http-01/TOKEN     an HTTP-01 key authorization, while its order is pending
    challenges/tls-alpn-01/NAME.pem  a TLS-ALPN-01 certificate and its key, likewise
    accounts/ID.json             an account's key and registration, per directory, contact and binding
    orders/ID.json               an order in progress and its certificate key, per certificate
    secrets/NAMESPACE/NAME.yaml  an issued certificate, as the kubernetes.io/tls Secret the sources read
    order.lock                   held (flock) by the replica that is ordering

Replicas on one machine, or sharing the directory over a file system with working locks, see one state: a
challenge written by the replica that orders is answered by any replica, and the certificate it writes is
read back by every replica's file source.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tidegate.translate.acme import Issuer, Wanted

TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")  # base64url: never a path of its own
NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")  # a host name, lower case
ISSUER_ANNOTATION = "tidegate.io/acme-issuer"
NAMES_ANNOTATION = "tidegate.io/acme-names"


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


class FileStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        for sub in ("challenges/http-01", "challenges/tls-alpn-01", "accounts", "secrets"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    # HTTP-01
    def put_http01(self, token: str, key_authorization: str) -> None:
        if not TOKEN.fullmatch(token):
            raise ValueError(f"not an ACME token: {token!r}")
        _write(self.root / "challenges" / "http-01" / token, key_authorization.encode("ascii"), 0o644)

    def remove_http01(self, token: str) -> None:
        if TOKEN.fullmatch(token):
            with contextlib.suppress(FileNotFoundError):
                (self.root / "challenges" / "http-01" / token).unlink()

    # TLS-ALPN-01
    def put_tls_alpn01(self, name: str, cert_pem: str, key_pem: str) -> None:
        if not NAME.fullmatch(name):
            raise ValueError(f"not a host name: {name!r}")
        _write(self.root / "challenges" / "tls-alpn-01" / f"{name}.pem", (cert_pem + key_pem).encode("ascii"))

    def remove_tls_alpn01(self, name: str) -> None:
        if NAME.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                (self.root / "challenges" / "tls-alpn-01" / f"{name}.pem").unlink()

    # orders in progress (resumed by the replica that takes over when the one placing it dies)
    def _order_path(self, journal: str) -> Path:
        return self.root / "orders" / (hashlib.sha256(journal.encode()).hexdigest()[:24] + ".json")

    def order(self, journal: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._order_path(journal).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def save_order(self, journal: str, order: dict[str, Any]) -> None:
        _write(self._order_path(journal), json.dumps(order).encode())

    def forget_order(self, journal: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._order_path(journal).unlink()

    # accounts
    def account(self, issuer: Issuer) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / "accounts" / f"{issuer.account_id}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def save_account(self, issuer: Issuer, account: dict[str, Any]) -> None:
        _write(self.root / "accounts" / f"{issuer.account_id}.json", json.dumps(account, indent=1).encode())

    # certificates
    def _secret_path(self, wanted: Wanted) -> Path:
        return self.secrets_dir / wanted.namespace / f"{wanted.secret}.yaml"

    def certificate(self, wanted: Wanted) -> tuple[str, tuple[str, ...], str] | None:
        """The certificate chain (PEM) held for `wanted`, the names it was ordered for and its issuer."""
        try:
            secret = yaml.safe_load(self._secret_path(wanted).read_text())
            chain = base64.b64decode(secret["data"]["tls.crt"]).decode("ascii")
            annotations = secret["metadata"]["annotations"]
            names = tuple(annotations[NAMES_ANNOTATION].split(","))
        except (FileNotFoundError, KeyError, TypeError, ValueError, yaml.YAMLError):
            return None
        return chain, names, annotations.get(ISSUER_ANNOTATION, "")

    def save_certificate(self, wanted: Wanted, key_pem: str, chain_pem: str) -> None:
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                  "metadata": {"name": wanted.secret, "namespace": wanted.namespace,
                               "labels": {"app.kubernetes.io/managed-by": "tidegate"},
                               "annotations": {ISSUER_ANNOTATION: wanted.issuer.key,
                                               NAMES_ANNOTATION: ",".join(wanted.names)}},
                  "data": {"tls.crt": base64.b64encode(chain_pem.encode()).decode(),
                           "tls.key": base64.b64encode(key_pem.encode()).decode()}}
        _write(self._secret_path(wanted), yaml.safe_dump(secret, sort_keys=False).encode())

    # one orderer at a time
    @contextlib.contextmanager
    def ordering(self) -> Iterator[bool]:
        """Whether this process may order now: it holds the directory's lock until the block ends (the
        kernel lets it go if the process dies)."""
        fd = os.open(self.root / "order.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)
