"""ACME: which certificates the configuration asks tidegate to order, and from which issuer (pure).

A Gateway listener asks with `tls.mode: Terminate`, a `hostname`, no `certificateRefs` and
`tls.options: {tidegate.io/acme-issuer: NAME}`: an AcmeIssuer of the Gateway's namespace, else the
ClusterAcmeIssuer NAME. Its certificate lives in the Secret `acme-GATEWAY-LISTENER` of the Gateway's namespace;
until that exists the listener is not programmed (reason CertificatePending) and serves nothing. An Ingress
asks with the `tidegate.io/acme-issuer` annotation (or `kubernetes.io/tls-acme: "true"` and an issuer marked
`tidegate.io/default-acme-issuer: "true"`): each `tls` entry's `secretName` receives the certificate for its
hosts. The acme package orders what is asked (acme/manager.py) and writes those Secrets, which come back
through the sources like any other.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from tidegate.resources.model import Resource
from tidegate.translate.backends import decode_secret_field
from tidegate.translate.index import Index

ISSUER_OPTION = "tidegate.io/acme-issuer"  # a listener's tls.options key, and an Ingress's annotation
TLS_ACME = "kubernetes.io/tls-acme"  # cert-manager's and kube-lego's annotation: the default issuer
DEFAULT_ISSUER = "tidegate.io/default-acme-issuer"  # an issuer's annotation: the one TLS_ACME means
SOLVERS = {"http01": "http-01", "tlsAlpn01": "tls-alpn-01"}
BASE64URL = re.compile(r"[A-Za-z0-9_-]+=*")


@dataclass(frozen=True)
class Issuer:
    """An AcmeIssuer or ClusterAcmeIssuer, resolved: what the ACME client needs."""

    key: str  # "AcmeIssuer ns/name" or "ClusterAcmeIssuer name"
    server: str
    email: str = ""
    ca_bundle: str = ""
    eab_key_id: str = ""
    eab_hmac_key: str = ""  # base64url, as CAs hand it out
    key_algorithm: str = "ECDSA"
    profile: str = ""
    solvers: tuple[str, ...] = ("http-01",)

    @property
    def account_id(self) -> str:
        """The account's file name in the store: one account per directory, contact and binding."""
        return hashlib.sha256(f"{self.server}|{self.email}|{self.eab_key_id}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Wanted:
    """One certificate to keep: its names, its issuer, and the Secret it goes to."""

    issuer: Issuer
    names: tuple[str, ...]
    namespace: str
    secret: str
    source: str  # "Gateway ns/name listener x" or "Ingress ns/name"
    listener: tuple[str, str, str] | None = None  # (namespace, Gateway, listener) that waits for it

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.secret}"


def listener_secret(gateway: str, listener: str) -> str:
    """The Secret of a Gateway listener's ACME certificate (a DNS subdomain name, at most 253 characters)."""
    name = f"acme-{gateway}-{listener}"
    if len(name) <= 253:
        return name
    return name[:236] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def find_issuer(index: Index, namespace: str, name: str) -> Issuer | str:
    """An AcmeIssuer NAME of `namespace`, else the ClusterAcmeIssuer NAME; or why neither can be used."""
    found = index.get("AcmeIssuer", namespace, name)
    if found is None:
        found = index.get("ClusterAcmeIssuer", "", name)
    if found is None:
        return f"no AcmeIssuer {namespace}/{name} or ClusterAcmeIssuer {name}"
    return read_issuer(index, found)


def default_issuer(index: Index, namespace: str) -> Issuer | str:
    """The issuer `kubernetes.io/tls-acme: "true"` means: one marked as the default (an AcmeIssuer of the
    namespace first)."""
    for kind, ns in (("AcmeIssuer", namespace), ("ClusterAcmeIssuer", "")):
        marked = sorted((r for r in index.all(kind) if r.namespace == ns
                         and str(r.annotations.get(DEFAULT_ISSUER, "")).lower() == "true"), key=lambda r: r.name)
        if marked:
            return read_issuer(index, marked[0])
    return f"{TLS_ACME} asks for the default issuer, and no AcmeIssuer or ClusterAcmeIssuer is marked {DEFAULT_ISSUER}"


def read_issuer(index: Index, found: Resource) -> Issuer | str:
    spec = found.spec
    key = f"{found.kind} {found.namespace}/{found.name}" if found.namespace else f"{found.kind} {found.name}"
    eab_id = eab_key = ""
    binding = spec.get("externalAccountBinding")
    if binding:
        ref = binding["keySecretRef"]
        secret = index.get("Secret", found.namespace or ref.get("namespace") or "default", ref["name"])
        raw = decode_secret_field(secret.obj, ref.get("key") or "secret") if secret is not None else None
        if raw is None:
            return f"{key}: externalAccountBinding Secret {ref['name']} (key {ref.get('key') or 'secret'}) not found"
        eab_id, eab_key = binding["keyID"], raw.decode("ascii", "replace").strip()
        # (base64's decoders skip characters outside the alphabet: the key is checked whole)
        if not BASE64URL.fullmatch(eab_key):
            return f"{key}: the externalAccountBinding key is not base64url (A-Z, a-z, 0-9, - and _)"
    solvers = tuple(SOLVERS[name] for solver in spec.get("solvers") or [] for name in solver if name in SOLVERS)
    return Issuer(key=key, server=spec["server"], email=spec.get("email", ""), ca_bundle=spec.get("caBundle", ""),
                  eab_key_id=eab_id, eab_hmac_key=eab_key,
                  key_algorithm=(spec.get("privateKey") or {}).get("algorithm", "ECDSA"),
                  profile=spec.get("profile", ""), solvers=solvers or ("http-01",))
