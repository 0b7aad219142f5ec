"""One ACME order, start to end, with the `acme` library (RFC 8555). Blocking: the manager runs it in a thread.

The account key is ECDSA P-256 (ES256), kept in the store per directory, contact and external account
binding, so that every replica orders as the same account. The certificate's key is new for each order
(ECDSA P-256, or RSA 2048). The first of the issuer's solvers the CA offers answers each authorization:
HTTP-01 (the key authorization, by token) or TLS-ALPN-01 (a certificate, by name) is put in the store before
the CA is told to validate, and removed when the order ends, whatever its outcome.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import josepy as jose
from acme import challenges, client as acme_client, errors, messages
from acme import crypto_util
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tidegate import __version__
from tidegate.acme.store import FileStore
from tidegate.translate.acme import Issuer

log = logging.getLogger("tidegate.acme")


BAD_NONCE_TRIES = 8  # goes at an order again after a request's nonce was refused twice (RFC 8555 6.5)


class OrderFailed(Exception):
    """An order that did not give a certificate, and why."""


@dataclass(frozen=True)
class Issued:
    key_pem: str
    chain_pem: str


def _certificate_key(algorithm: str) -> str:
    key = rsa.generate_private_key(65537, 2048) if algorithm == "RSA" else ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode("ascii")


def _kind(challenge: messages.ChallengeBody) -> str:
    """A challenge's type: the acme library knows HTTP-01 and DNS-01; TLS-ALPN-01 comes unrecognised."""
    jobj = getattr(challenge.chall, "jobj", None)
    return str(jobj.get("type", "")) if isinstance(jobj, dict) else str(challenge.chall.typ)


def _token(challenge: messages.ChallengeBody) -> str:
    jobj = getattr(challenge.chall, "jobj", None)
    return str(jobj["token"]) if isinstance(jobj, dict) else challenge.chall.encode("token")


ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # id-pe-acmeIdentifier (RFC 8737)


def tls_alpn01_certificate(name: str, key_authorization: str) -> tuple[str, str]:
    """The self-signed certificate a TLS-ALPN-01 validation is answered with (RFC 8737 section 3): the name
    as its only subjectAltName, and the critical acmeIdentifier extension holding the SHA-256 of the key
    authorization (DER: an OCTET STRING). (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode("ascii"))


def _ca_file(issuer: Issuer, store: FileStore) -> str | bool:
    """What requests checks the directory's TLS certificate with: the issuer's caBundle, else the system's."""
    if not issuer.ca_bundle:
        return True
    path = store.root / "ca" / (hashlib.sha256(issuer.ca_bundle.encode()).hexdigest()[:24] + ".pem")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(issuer.ca_bundle)
    return str(path)


def _client(issuer: Issuer, store: FileStore) -> tuple[acme_client.ClientV2, jose.JWK]:
    """A client logged in as the issuer's account (registered now when the store has none)."""
    saved = store.account(issuer)
    if saved is not None:
        key = jose.JWK.json_loads(saved["key"])
        # Its URL is what requests are signed for (the "kid"); the rest stays at the CA.
        account = messages.RegistrationResource(uri=saved["uri"], body=messages.Registration())
    else:
        key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        account = None
    net = acme_client.ClientNetwork(key, account=account, alg=jose.ES256, verify_ssl=_ca_file(issuer, store),
                                    user_agent=f"tidegate/{__version__}", timeout=30)
    directory = acme_client.ClientV2.get_directory(issuer.server, net)
    client = acme_client.ClientV2(directory, net)
    if account is None:
        binding = messages.ExternalAccountBinding.from_data(
            account_public_key=key.public_key(), kid=issuer.eab_key_id, hmac_key=issuer.eab_hmac_key,
            directory=directory) if issuer.eab_key_id else None
        registration = messages.NewRegistration.from_data(email=issuer.email or None, terms_of_service_agreed=True,
                                                          external_account_binding=binding)
        account = client.new_account(registration)
        store.save_account(issuer, {"key": key.json_dumps(), "uri": account.uri, "server": issuer.server,
                                    "email": issuer.email})
        log.info("ACME account %s registered at %s", account.uri, issuer.server)
    return client, key


def order(issuer: Issuer, names: tuple[str, ...], store: FileStore, timeout: float = 90.0, journal: str = "") -> Issued:
    """Order a certificate for `names` and wait for it (at most `timeout` seconds). `journal`: the store's
    name for this certificate's order in progress, which a replica that takes over resumes."""
    try:
        for attempt in range(BAD_NONCE_TRIES):
            try:
                return _order(issuer, names, store, timeout, journal)
            except messages.Error as exc:
                # A nonce refused twice in a row (the library tries each request twice): the order goes on
                # where it stood (its journal), not counted as a failure.
                if exc.code != "badNonce" or attempt == BAD_NONCE_TRIES - 1:
                    raise
                log.info("ACME: %s refused a nonce twice; going on with the order", issuer.server)
        raise AssertionError("unreachable")
    except OrderFailed:
        raise
    except messages.Error as exc:  # a problem document from the CA
        raise OrderFailed(f"{issuer.server} answered {exc.typ}: {exc.detail}") from exc
    except errors.ValidationError as exc:
        details = "; ".join(f"{a.body.identifier.value}: {c.error.detail if c.error else c.status}"
                            for a in exc.failed_authzrs for c in a.body.challenges if c.status != messages.STATUS_VALID)
        raise OrderFailed(f"validation failed ({details})") from exc
    except errors.TimeoutError as exc:
        raise OrderFailed(f"no certificate within {timeout:.0f} s") from exc
    except (errors.Error, OSError, ValueError) as exc:  # the network, TLS, a malformed answer
        raise OrderFailed(f"{type(exc).__name__}: {exc}") from exc


def _order(issuer: Issuer, names: tuple[str, ...], store: FileStore, timeout: float, journal: str) -> Issued:
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    client, account_key = _client(issuer, store)
    resumed = _resumed(client, issuer, names, store, journal) if journal else None
    if resumed is not None:
        placed, key_pem = resumed
        log.info("ACME: resuming the order for %s placed before (%s)", ", ".join(names), placed.uri)
        if placed.body.status == messages.STATUS_VALID and placed.body.certificate:
            chain = client._post_as_get(placed.body.certificate).text  # issued: only its fetch was missing
            store.forget_order(journal)
            return Issued(key_pem, chain)
    else:
        key_pem = _certificate_key(issuer.key_algorithm)

        def placed_at(uri: str) -> None:  # kept at once: a replica that takes over (or a retry) goes on with it
            if journal:
                store.save_order(journal, {"uri": uri, "key": key_pem, "names": list(names), "issuer": issuer.key,
                                           "account": issuer.account_id})

        placed = _new_order(client, crypto_util.make_csr(key_pem.encode("ascii"), list(names)), names,
                            issuer.profile, placed_at)
    answered: list[tuple[str, str]] = []  # (kind, token or name)
    try:
        for authorization in placed.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # validated for this account recently: the CA reuses it
            offered = {_kind(c): c for c in authorization.body.challenges}
            kind = next((s for s in issuer.solvers if s in offered), "")
            name = authorization.body.identifier.value
            if not kind:
                raise OrderFailed(f"{name}: the CA offers {', '.join(sorted(offered))}; the issuer's solvers are "
                                  f"{', '.join(issuer.solvers)}")
            chosen = offered[kind]
            log.info("ACME: answering %s for %s", kind, name)
            token = _token(chosen)
            key_authorization = f"{token}.{jose.b64encode(account_key.thumbprint()).decode('ascii')}"
            if kind == "http-01":
                store.put_http01(token, key_authorization)
                answered.append(("http-01", token))
            else:
                store.put_tls_alpn01(name, *tls_alpn01_certificate(name, key_authorization))
                answered.append(("tls-alpn-01", name))
            if chosen.status != messages.STATUS_PENDING:
                continue  # answered before (a resumed order): the CA is validating it
            # The answer's body is "{}" (RFC 8555 section 7.5.1). An empty response object would be sent as an
            # empty body, a POST-as-GET that only reads the challenge; this one writes "{}" for any type.
            client.answer_challenge(chosen, challenges.KeyAuthorizationChallengeResponse(
                key_authorization=key_authorization))
        done = client.poll_and_finalize(placed, deadline)
    except (errors.ValidationError, messages.Error) as exc:
        if journal and getattr(exc, "code", "") != "badNonce":
            store.forget_order(journal)  # over at the CA: the next try places a new order
        raise
    finally:
        for kind, what in answered:
            (store.remove_http01 if kind == "http-01" else store.remove_tls_alpn01)(what)
    if journal:
        store.forget_order(journal)
    if not done.fullchain_pem:
        raise OrderFailed("the order ended without a certificate")
    return Issued(key_pem, done.fullchain_pem)


def renewal_window(issuer: Issuer, chain_pem: str, store: FileStore) -> tuple[float | None, float]:
    """ACME Renewal Information (RFC 9773) for a certificate, when the CA's directory offers it: (a time in
    the window the CA suggests for its renewal, or None without one; when to ask again)."""
    net = acme_client.ClientNetwork(None, verify_ssl=_ca_file(issuer, store), user_agent=f"tidegate/{__version__}",
                                    timeout=30)
    later = time.time() + 6 * 3600
    try:
        client = acme_client.ClientV2(acme_client.ClientV2.get_directory(issuer.server, net), net)
        suggested, check = client.renewal_time(chain_pem.encode("ascii"))
    except errors.ARIError as exc:
        log.info("ACME: no renewal information from %s (%s)", issuer.server, exc.__cause__ or exc)
        return None, exc.retry_after.timestamp() if exc.retry_after else later
    except (errors.Error, messages.Error, OSError, ValueError) as exc:
        log.info("ACME: no renewal information from %s (%s)", issuer.server, exc)
        return None, later
    return (suggested.timestamp() if suggested is not None else None), check.timestamp()


def _new_order(client: acme_client.ClientV2, csr_pem: bytes, names: tuple[str, ...], profile: str,
               placed_at: Callable[[str], None]) -> messages.OrderResource:
    """ClientV2.new_order, telling `placed_at` the order's URL as soon as the CA gives it (before its
    authorizations are read, a request that may fail on its own)."""
    request = messages.NewOrder(identifiers=[messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=name)
                                             for name in names], profile=profile)
    response = client._post(client.directory["newOrder"], request)
    uri = response.headers["Location"]
    placed_at(uri)
    body = messages.Order.from_json(response.json())
    authorizations = [client._authzr_from_response(client._post_as_get(url), uri=url) for url in body.authorizations]
    return messages.OrderResource(body=body, uri=uri, csr_pem=csr_pem, authorizations=authorizations)


def _resumed(client: acme_client.ClientV2, issuer: Issuer, names: tuple[str, ...], store: FileStore,
             journal: str) -> tuple[messages.OrderResource, str] | None:
    """The order a replica that died placed for the same names, as the CA has it now, and its key; None when
    there is none to go on with (then a new one is placed). (The acme library reads an order back only
    through its private helpers: acme is pinned.)"""
    saved = store.order(journal)
    if saved is None or saved.get("names") != list(names) or saved.get("issuer") != issuer.key \
            or saved.get("account") != issuer.account_id:
        return None
    try:
        body = messages.Order.from_json(client._post_as_get(saved["uri"]).json())
        if body.status not in (messages.STATUS_PENDING, messages.STATUS_READY, messages.STATUS_PROCESSING,
                               messages.STATUS_VALID):
            raise ValueError(f"the order is {body.status}")
        authorizations = [client._authzr_from_response(client._post_as_get(url), uri=url)
                          for url in body.authorizations]
    except messages.Error as exc:
        if exc.code == "badNonce":
            raise  # not the order's fault: read it back again (order's retry)
        log.info("ACME: the order %s cannot be resumed (%s): placing a new one", saved.get("uri"), exc)
        store.forget_order(journal)
        return None
    except (errors.Error, OSError, ValueError, KeyError) as exc:
        log.info("ACME: the order %s cannot be resumed (%s): placing a new one", saved.get("uri"), exc)
        store.forget_order(journal)
        return None
    csr = crypto_util.make_csr(saved["key"].encode("ascii"), list(names))
    return messages.OrderResource(body=body, uri=saved["uri"], csr_pem=csr, authorizations=authorizations), \
        saved["key"]
