"""The control process's channel to its workers: messages of any size arrive whole and in order, both ways."""

from __future__ import annotations

import asyncio
import socket

from tidegate.channel import Channel


def test_large_and_small_messages_arrive_whole_and_in_order_both_ways():
    async def scenario() -> tuple[list, list]:
        left_sock, right_sock = socket.socketpair()
        at_right: list = []
        at_left: list = []
        done = asyncio.Event()

        async def right_got(message) -> None:
            at_right.append(message)
            if message == "end":
                done.set()

        async def left_got(message) -> None:
            at_left.append(message)

        left = await Channel.open(left_sock, left_got, lambda: None)
        right = await Channel.open(right_sock, right_got, lambda: None)
        big = {"routes": [f"route-{i}" * 10 for i in range(300_000)]}  # about 25 MB pickled
        sends = [left.send(("config", big), large=True)] + [left.send(("health", i)) for i in range(1000)]
        await asyncio.gather(*sends, left.send("end"), right.send(("applied", 1)))
        await asyncio.wait_for(done.wait(), 30)
        await asyncio.sleep(0.05)
        left.close()
        right.close()
        return at_right, at_left

    at_right, at_left = asyncio.run(scenario())
    assert at_right[0][0] == "config" and len(at_right[0][1]["routes"]) == 300_000
    assert at_right[1:] == [("health", i) for i in range(1000)] + ["end"]
    assert at_left == [("applied", 1)]
