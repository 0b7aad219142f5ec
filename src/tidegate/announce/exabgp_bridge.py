"""ExaBGP's API process for tidegate: ExaBGP runs it and talks to it over stdin/stdout; it relays both ways to
the Unix socket where tidegate's speaker (announce/bgp.py) listens. Commands from tidegate go to stdout (ExaBGP
executes them); ExaBGP's messages on stdin (JSON events, "done" / "error" answers) go to tidegate.

It ends when either side closes, and with its parent (ExaBGP): a crash leaves nothing running.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import sys
import threading


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(path: str) -> int:
    _die_with_parent()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)

    def upstream() -> None:  # ExaBGP -> tidegate
        try:
            for line in sys.stdin.buffer:
                sock.sendall(line)
        except OSError:
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    threading.Thread(target=upstream, daemon=True).start()
    out = sys.stdout.buffer
    with sock.makefile("rb") as commands:  # tidegate -> ExaBGP
        for line in commands:
            out.write(line)
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
