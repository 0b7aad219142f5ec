"""Self-signed certificates and kubernetes.io/tls Secrets for tests, like the conformance suite makes."""

from __future__ import annotations

import base64
import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(hosts: list[str]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def tls_secret_yaml(namespace: str, name: str, hosts: list[str]) -> str:
    return tls_secret_pem_yaml(namespace, name, *self_signed(hosts))


def tls_secret_pem_yaml(namespace: str, name: str, cert: bytes, key: bytes) -> str:
    return (f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            f"type: kubernetes.io/tls\ndata:\n  tls.crt: {base64.b64encode(cert).decode()}\n"
            f"  tls.key: {base64.b64encode(key).decode()}\n")


def ca_and_leaf(hosts: list[str]) -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a leaf certificate it signed: (CA PEM, leaf PEM, leaf key PEM)."""
    ca, ((leaf, key),) = ca_and_leaves([hosts])
    return ca, leaf, key


def ca_and_leaves(host_lists: list[list[str]]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A throwaway CA and one leaf per host list, all signed by it: (CA PEM, [(leaf PEM, key PEM)])."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tidegate test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaves = []
    for hosts in host_lists:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(h) if "://" in h else x509.DNSName(h)
                                         for h in hosts]
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .sign(ca_key, hashes.SHA256()))
        leaves.append((leaf.public_bytes(serialization.Encoding.PEM),
                       key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())))
    return ca.public_bytes(serialization.Encoding.PEM), leaves
