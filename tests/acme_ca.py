"""Let's Encrypt's test CA for the ACME tests: Debian's pebble, with pebble-challtestsrv as the DNS server that
points every name at 127.0.0.1 (or where a test says), both on loopback ports of their own."""

from __future__ import annotations

import json
import shutil
import ssl
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.certs import ca_and_leaf
from tests.harness import free_port, process

PEBBLE = shutil.which("pebble")
CHALLTESTSRV = shutil.which("pebble-challtestsrv")
EAB_KEYS = {"kid-1": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"}  # base64url HMAC keys


@dataclass
class Pebble:
    directory: str  # the ACME directory URL
    api_ca: str  # PEM: what pebble's own TLS certificate is checked with (an AcmeIssuer's caBundle)
    management: str  # https://localhost:PORT: roots, intermediates
    dns_management: str  # http://127.0.0.1:PORT: pebble-challtestsrv's

    def _get(self, url: str) -> bytes:
        context = ssl.create_default_context(cadata=self.api_ca)
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:
            return answer.read()

    def root(self) -> str:
        """The root that signs what pebble issues (a new one each start)."""
        return self._get(f"{self.management}/roots/0").decode()

    def point(self, host: str, address: str) -> None:
        """Validation of `host` goes to `address` (a loopback address of another replica)."""
        request = urllib.request.Request(f"{self.dns_management}/add-a", method="POST",
                                         data=json.dumps({"host": host, "addresses": [address]}).encode())
        urllib.request.urlopen(request, timeout=10).read()


@contextmanager
def pebble(tmp: Path, http_port: int, tls_port: int, validity: int = 0, env: dict[str, str] | None = None
           ) -> Iterator[Pebble]:
    """pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of the names' addresses,
    issuing certificates of `validity` seconds (0: its default), without its artificial validation delays."""
    ca, leaf, key = ca_and_leaf(["localhost"])
    (tmp / "pebble-cert.pem").write_bytes(leaf)
    (tmp / "pebble-key.pem").write_bytes(key)
    api, management, dns, dns_management = (free_port() for _ in range(4))
    config = {"pebble": {"listenAddress": f"127.0.0.1:{api}", "managementListenAddress": f"127.0.0.1:{management}",
                         "certificate": str(tmp / "pebble-cert.pem"), "privateKey": str(tmp / "pebble-key.pem"),
                         "httpPort": http_port, "tlsPort": tls_port, "ocspResponderURL": "",
                         "externalAccountBindingRequired": False, "externalAccountMACKeys": EAB_KEYS,
                         **({"certificateValidityPeriod": validity} if validity else {})}}
    (tmp / "pebble.json").write_text(json.dumps(config))
    environment = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", **(env or {})}
    with process([CHALLTESTSRV, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-dns01", f"127.0.0.1:{dns}",
                  "-http01", "", "-https01", "", "-tlsalpn01", "",
                  "-management", f"127.0.0.1:{dns_management}"], tmp / "challtestsrv.log",
                 ready=("127.0.0.1", dns_management)), \
            process([PEBBLE, "-config", str(tmp / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns}"],
                    tmp / "pebble.log", ready=("127.0.0.1", api), env=environment):
        yield Pebble(f"https://localhost:{api}/dir", ca.decode(), f"https://localhost:{management}",
                     f"http://127.0.0.1:{dns_management}")
