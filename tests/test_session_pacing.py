"""The session's read loop lets other tasks run between frames while its owner is
backlogged, and reads a burst straight through otherwise (no Ray, no Kafka)."""

from __future__ import annotations

import asyncio
import time
from itertools import pairwise
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, serve

from ray_forwarder.runtime.session import AlpacaSession, SessionConfig

FRAMES = 20
TS = "2026-01-05T14:30:01.123456789Z"


def _frame(i: int) -> str:
    trade = {"T": "t", "S": "SPY", "i": i, "x": "V", "p": 470.5, "s": 100, "c": ["@"],
             "z": "B", "t": TS}  # fmt: skip
    return orjson.dumps([trade]).decode()


class Owner:
    """Notes, for each data frame, how often a busy neighbour task had run by then. The
    first frame blocks the loop, so that the rest arrive while nothing reads: a burst."""

    def __init__(self) -> None:
        self.ticks = 0
        self.seen: list[int] = []
        self.done = asyncio.Event()

    async def neighbour(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0)

    def on_items(self, items: list[Any], ingest_ts: str, received: float) -> None:
        if not self.seen:
            time.sleep(0.3)  # the server sends the whole burst meanwhile
        self.seen.append(self.ticks)
        if len(self.seen) == FRAMES:
            self.done.set()

    def on_skipped(self, skipped: Any) -> None:
        pass

    def on_state(self, state: str, info: dict[str, Any]) -> None:
        pass


async def _burst(backlogged: bool) -> list[int]:
    async def feed(ws: ServerConnection) -> None:
        await ws.send('[{"T":"success","msg":"connected"}]')
        await ws.recv()
        await ws.send('[{"T":"success","msg":"authenticated"}]')
        await ws.recv()
        await ws.send('[{"T":"subscription","trades":["SPY"]}]')
        for i in range(FRAMES):
            await ws.send(_frame(i))
        await ws.wait_closed()

    owner = Owner()
    async with serve(feed, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        config = SessionConfig(
            url=f"ws://127.0.0.1:{port}", key="k", secret="s",
            subscriptions={"trades": ["SPY"]}, wire_format="json",
        )  # fmt: skip
        session = AlpacaSession(config, owner, backlogged=lambda: backlogged)
        neighbour = asyncio.create_task(owner.neighbour())
        task = asyncio.create_task(session.run())
        await asyncio.wait_for(owner.done.wait(), 10)
        await session.stop()
        await asyncio.wait_for(task, 10)
        neighbour.cancel()
    return owner.seen


async def test_a_backlogged_owner_gets_the_loop_between_frames() -> None:
    seen = await _burst(backlogged=True)
    after_the_block = seen[1:]
    assert all(b > a for a, b in pairwise(after_the_block))


async def test_without_a_backlog_a_burst_is_read_straight_through() -> None:
    seen = await _burst(backlogged=False)
    # the queued frames were read without suspending: the neighbour did not run between most
    assert len(set(seen[1:])) < (FRAMES - 1) / 2
