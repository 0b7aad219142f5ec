"""CPU per HTTP/2 stream in tidegate's HTTP/2 layer, with no sockets.

    .venv/bin/python benchmarks/h2_path.py [--streams-per-read 10] [--reads 300] [--rounds 5] [--profile]

An H2ServerConnection is fed requests as h2load sends them: a batch of HEADERS frames per read (framed with
hpack and hyperframe, outside the timing). A stand-in for `serve_exchange` answers each at once (a 200 with
three headers and a 13-byte body), so what is timed is the HTTP/2 layer alone: h2's frames, streams and
HPACK, the request header check (dataplane/h2request.py), and dataplane/http2.py's framing and writes. It
prints the best of --rounds in µs of CPU per stream; --profile prints a cProfile of one round instead
(compiled code shows up only as its callers' time).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time

import hpack
from hyperframe.frame import HeadersFrame, SettingsFrame

from tidegate.compiled import why_not_compiled
from tidegate.dataplane.http2 import PREFACE, H2ServerConnection

REQUEST = [(":method", "GET"), (":path", "/small"), (":scheme", "http"), (":authority", "bench.local"),
           ("user-agent", "h2load nghttp2/1.64.0")]


class Transport:
    """Just enough of an asyncio transport: writes are counted and dropped."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def get_extra_info(self, name: str) -> None:
        return None

    def close(self) -> None:
        pass


async def answer(stream, ex) -> None:
    stream.begin_response(ex, 200, [("Content-Type", "text/plain"), ("Content-Length", "13"), ("Server", "pod")],
                          13, False)
    stream.body(b"hello, world\n")
    stream.end_response()


def reads(count: int, per_read: int) -> list[bytes]:
    """The client's side: the preface and its SETTINGS, then `count` reads of `per_read` requests each."""
    encoder = hpack.Encoder()
    out = [PREFACE + SettingsFrame(0).serialize()]
    stream_id = 1
    for _ in range(count):
        frames = []
        for _ in range(per_read):
            frames.append(HeadersFrame(stream_id, data=encoder.encode(REQUEST),
                                       flags=["END_HEADERS", "END_STREAM"]).serialize())
            stream_id += 2
        out.append(b"".join(frames))
    return out


async def one_round(count: int, per_read: int, profile: cProfile.Profile | None) -> tuple[float, int]:
    server = H2ServerConnection(lambda: None, 80, "http", "127.0.0.1")
    server.serve = answer
    transport = Transport()
    server.connection_made(transport)
    data = reads(count, per_read)
    server.data_received(data[0])
    if profile is not None:
        profile.enable()
    started = time.process_time()
    for chunk in data[1:]:
        server.data_received(chunk)
        for _ in range(3):  # the answers' task steps, then the turn's write
            await asyncio.sleep(0)
    spent = time.process_time() - started
    if profile is not None:
        profile.disable()
    return spent / (count * per_read), transport.writes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams-per-read", type=int, default=10)
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    for name in ("streams_per_read", "reads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.streams_per_read > 100:
        parser.error("--streams-per-read must be at most 100 (the connection's concurrent-streams limit)")
    if args.profile:
        profile = cProfile.Profile()
        asyncio.run(one_round(args.reads, args.streams_per_read, profile))
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return 0
    results = [asyncio.run(one_round(args.reads, args.streams_per_read, None)) for _ in range(args.rounds)]
    best = min(seconds for seconds, _ in results)
    writes = results[0][1] / args.reads
    print(f"request path {why_not_compiled() or 'compiled with mypyc'}")
    print(f"{best * 1e6:.1f} µs of CPU per HTTP/2 stream ({args.streams_per_read} streams per read, "
          f"{writes:.2f} writes per read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
