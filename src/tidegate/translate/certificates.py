"""TLS material from Secrets: checked here so that a broken certificate is a status condition, not a crash
in the data plane."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID

from tidegate import ir
from tidegate.resources.model import Resource
from tidegate.translate.backends import decode_secret_field


class CertificateError(ValueError):
    pass


def certificate_from_secret(secret: Resource) -> ir.Certificate:
    obj = secret.obj
    if obj.get("type") != "kubernetes.io/tls":
        raise CertificateError(f"Secret {secret.namespace}/{secret.name} is of type {obj.get('type')!r}, "
                               "not kubernetes.io/tls")
    cert_pem = decode_secret_field(obj, "tls.crt")
    key_pem = decode_secret_field(obj, "tls.key")
    if not cert_pem or not key_pem:
        raise CertificateError(f"Secret {secret.namespace}/{secret.name} lacks tls.crt or tls.key")
    try:
        certs = certificate_pair(cert_pem, key_pem)
    except CertificateError as exc:
        raise CertificateError(f"Secret {secret.namespace}/{secret.name}: {exc}") from exc
    leaf = certs[0]
    names: list[str] = []
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value).lower() for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return ir.Certificate(secret=f"{secret.namespace}/{secret.name}", cert_pem=cert_pem.decode(),
                          key_pem=key_pem.decode(), hostnames=tuple(names))


def certificate_pair(cert_pem: bytes, key_pem: bytes) -> list[x509.Certificate]:
    """The certificates of a tls.crt, checked to be PEM and to come with an unencrypted PEM tls.key."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CertificateError(f"tls.crt is not a PEM certificate ({exc})") from exc
    try:
        load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError("tls.key is not an unencrypted PEM private key") from exc
    return certs


def ca_bundle_is_valid(pem: bytes) -> bool:
    try:
        return bool(x509.load_pem_x509_certificates(pem))
    except ValueError:
        return False
