"""The way back for relays that keep the client's address (`externalTrafficPolicy: Local`).

A relay to a pod on this node connects from the client's own address (IP_TRANSPARENT, dataplane/l4.py), so
the pod sees who the client is, as it would behind kube-proxy. The pod's replies are addressed to the client,
and the node would route them out towards it. Three pieces turn them back to the relay's socket, the recipe
of the kernel's TPROXY documentation and of Envoy's and Istio's transparent modes:

- an nftables rule (`table inet tidegate`, chain `return-path`) that marks a packet in prerouting when it
  belongs to a transparent socket of this host (`socket transparent 1`): only those replies, never a pod's
  other traffic;
- a policy rule, `fwmark MARK/MARK lookup TABLE`, for IPv4 and IPv6;
- in that table, `local default dev lo` (`proto 116`), which delivers the marked packets locally.

Installing replaces whatever a previous run left (the nftables table is deleted and made again in one
transaction; the rule and routes are replaced). Removing takes all three away. A run killed with SIGKILL leaves
them, which is harmless: they match transparent sockets only, and there are none without tidegate.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
from typing import Any

log = logging.getLogger("tidegate.announce")

MARK = 0x80  # one bit, or'ed in: kube-proxy uses 0x4000/0x8000, Cilium 0xf00, Calico 0xffff0000
TABLE = 116  # the policy routing table; and the routes' proto, as for the Layer 2 local routes
RULE_PRIORITY = 116  # ahead of the main table (32766)
NFT_TABLE = "tidegate"


def nft_ruleset(mark: int = MARK) -> str:
    """The nftables script: the table replaced in one transaction."""
    return (f"table inet {NFT_TABLE}\n"
            f"delete table inet {NFT_TABLE}\n"
            f"table inet {NFT_TABLE} {{\n"
            "  chain return-path {\n"
            "    type filter hook prerouting priority mangle; policy accept;\n"
            f"    meta l4proto {{ tcp, udp }} socket transparent 1 meta mark set meta mark or {mark:#x} accept\n"
            "  }\n"
            "}\n")


class ReturnPath:
    def __init__(self, mark: int = MARK, table: int = TABLE):
        self.mark = mark
        self.table = table
        self.installed = False

    def install(self) -> None:
        """Set up the three pieces (in a thread: netlink and a child process). Raises RuntimeError saying what
        is missing (no nft, no privilege)."""
        if shutil.which("nft") is None:
            raise RuntimeError("the nft command (Debian package nftables) is not installed")
        self._nft(nft_ruleset(self.mark))
        try:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                for family, default in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                    self._rules(ipr, family, "del")
                    ipr.rule("add", family=family, table=self.table, priority=RULE_PRIORITY, fwmark=self.mark,
                             fwmask=self.mark)
                    ipr.route("replace", family=family, dst=default, dst_len=0, type="local", oif=lo,
                              table=self.table, proto=TABLE,
                              **({} if family == socket.AF_INET6 else {"scope": "host"}))
        except Exception as exc:  # noqa: BLE001 (netlink errors have several types)
            raise RuntimeError(f"cannot add the policy rule and route: {exc}") from exc
        self.installed = True

    def remove(self) -> None:
        try:
            self._nft(f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
        except RuntimeError as exc:
            log.warning("removing the nftables table %s: %s", NFT_TABLE, exc)
        try:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                for family in (socket.AF_INET, socket.AF_INET6):
                    self._rules(ipr, family, "del")
                    ipr.flush_routes(family=family, table=self.table)
        except Exception as exc:  # noqa: BLE001
            log.warning("removing the return path's policy rule: %s", exc)
        self.installed = False

    def _rules(self, ipr: Any, family: int, op: str) -> None:
        for rule in ipr.get_rules(family=family):
            if rule.get("table") == self.table or rule.get_attr("FRA_TABLE") == self.table:
                if rule.get_attr("FRA_PRIORITY") == RULE_PRIORITY:
                    ipr.rule(op, family=family, table=self.table, priority=RULE_PRIORITY,
                             fwmark=rule.get_attr("FRA_FWMARK"), fwmask=rule.get_attr("FRA_FWMASK"))

    @staticmethod
    def _nft(script: str) -> None:
        done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"nft: {done.stderr.strip() or done.returncode}")
