"""The subscription the server confirms is the one we asked for (`AlpacaSession` against the
simulator, no Ray, no Kafka): a symbol left out of a reply is asked for again with back-off
and its data arrives; one the feed never serves is reported unserved."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ray_forwarder.ray.stats import ForwarderSnapshot
from ray_forwarder.runtime.session import AlpacaSession, SessionConfig
from ray_forwarder_dev.sim import SimConfig, Simulator

KEY, SECRET = "sim-key", "sim-secret"
QUICK_RETRIES = (0.05, 0.1, 0.2)


class Recorder:
    """Session handler that turns arrivals into events a test can await."""

    def __init__(self) -> None:
        self.symbols: dict[str, int] = {}
        self.states: list[tuple[str, dict[str, Any]]] = []
        self._arrival = asyncio.Event()

    def on_items(self, items: list[Any], ingest_ts: str, received: float) -> None:
        for item in items:
            self.symbols[item.symbol] = self.symbols.get(item.symbol, 0) + 1
        self._wake()

    def on_skipped(self, skipped: Any) -> None:
        pass

    def on_state(self, state: str, info: dict[str, Any]) -> None:
        self.states.append((state, info))
        self._wake()

    def named(self, state: str) -> list[dict[str, Any]]:
        return [info for name, info in self.states if name == state]

    async def until(self, check: Any, timeout: float = 10.0) -> None:
        """Wait for `check()`: re-checked at every arrival, and every 50 ms for conditions
        that no arrival signals (a counter of the session's)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check():
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout}s; states: {self.states}")
            self._arrival.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), 0.05)

    def _wake(self) -> None:
        self._arrival.set()


def _session(url: str, subscriptions: dict[str, list[str]], handler: Recorder) -> AlpacaSession:
    config = SessionConfig(
        url=url, key=KEY, secret=SECRET, subscriptions=subscriptions, wire_format="json",
        reconnect_initial=0.05, reconnect_max=0.1, resubscribe_delays=QUICK_RETRIES,
    )  # fmt: skip
    return AlpacaSession(config, handler)


async def test_a_symbol_left_out_of_the_first_reply_is_asked_for_again_and_arrives() -> None:
    sim_config = SimConfig(symbols=["SPY", "QQQ"], rate=500, keys={KEY: SECRET})
    async with Simulator(sim_config) as sim:
        sim.omit_from_subscription("QQQ", replies=1)
        handler = Recorder()
        session = _session(sim.url, {"trades": ["SPY", "QQQ"], "quotes": ["SPY"]}, handler)
        task = asyncio.create_task(session.run())
        try:
            await handler.until(lambda: handler.symbols.get("QQQ", 0) >= 5)
        finally:
            await session.stop()
            await asyncio.wait_for(task, 5)
    [subscribed] = handler.named("subscribed")
    assert subscribed["missing"] == {"trades": ["QQQ"]}  # the first reply lacked it
    assert session.resubscribes == 1 and session.missing == {} and session.unserved == set()
    assert sim.stats()["omitted_from_subscription"] == 1
    assert session.connects == 1 and session.reconnects == 0
    # The re-send's reply is ours, not a change made by the server.
    assert not handler.named("subscription_changed")
    assert not handler.named("subscription_mismatch")


async def test_a_symbol_the_feed_never_serves_is_reported_unserved() -> None:
    sim_config = SimConfig(symbols=["SPY", "QQQ"], rate=500, keys={KEY: SECRET})
    async with Simulator(sim_config) as sim:
        sim.omit_from_subscription("QQQ", replies=None)
        handler = Recorder()
        session = _session(sim.url, {"trades": ["SPY", "QQQ"], "quotes": ["QQQ"]}, handler)
        task = asyncio.create_task(session.run())
        try:
            await handler.until(lambda: bool(handler.named("subscription_mismatch")))
            await handler.until(lambda: handler.symbols.get("SPY", 0) >= 5)  # SPY flows
        finally:
            await session.stop()
            await asyncio.wait_for(task, 5)
    [mismatch] = handler.named("subscription_mismatch")
    assert mismatch["missing"] == {"trades": ["QQQ"], "quotes": ["QQQ"]}
    assert mismatch["unserved"] == 2 and mismatch["resubscribes"] == len(QUICK_RETRIES)
    assert session.unserved == {("trades", "QQQ"), ("quotes", "QQQ")}
    assert session.resubscribes == len(QUICK_RETRIES)  # bounded: no more asking after that
    assert "QQQ" not in handler.symbols
    assert session.connects == 1 and session.subscribed is False  # stopped


async def test_a_wildcard_reply_covers_every_symbol() -> None:
    """`*` in the reply serves any symbol asked for: nothing to ask again."""
    async with Simulator(SimConfig(symbols=["SPY"], rate=200, keys={KEY: SECRET})) as sim:
        handler = Recorder()
        session = _session(sim.url, {"trades": ["*"]}, handler)
        task = asyncio.create_task(session.run())
        try:
            await handler.until(lambda: handler.symbols.get("SPY", 0) >= 3)
        finally:
            await session.stop()
            await asyncio.wait_for(task, 5)
    assert handler.named("subscribed")[0]["missing"] == {}
    assert session.resubscribes == 0 and session.unserved == set()


def test_health_is_degraded_not_unavailable_when_a_shard_is_missing_pairs() -> None:
    """Readiness stays 200 (the forwarder serves what the feed serves); the body says
    degraded and names the shard and the pairs."""
    shard = {"shard_id": "stocks-0", "state": "subscribed", "subscribed": True}
    producer = {"name": "producer-0", "ready": True}
    ok, body = ForwarderSnapshot([dict(shard, unserved=0)], [producer]).health()
    assert ok and body["status"] == "ok" and body["degraded"] == []
    unserved = dict(shard, unserved=2, unserved_sample=["quotes:QQQ", "trades:QQQ"])
    ok, body = ForwarderSnapshot([unserved], [producer]).health()
    assert ok and body["status"] == "degraded" and body["problems"] == []
    [line] = body["degraded"]
    assert "stocks-0" in line and "2 (channel, symbol)" in line and "trades:QQQ" in line
    # A real problem still wins: unavailable, 503.
    ok, body = ForwarderSnapshot([dict(unserved, subscribed=False)], [producer]).health()
    assert not ok and body["status"] == "unavailable" and body["degraded"]
