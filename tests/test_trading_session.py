"""The session pump driving the trading family's connection against the trading simulator,
over real sockets (no Kafka, no Ray)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ray_forwarder.alpaca.events import DataItem, Skipped
from ray_forwarder.alpaca.streams import TRADE_UPDATES
from ray_forwarder.runtime.session import AlpacaSession, FatalSessionError, SessionConfig
from ray_forwarder_dev.sim.trading import TradingSimConfig, TradingSimulator

KEY, SECRET = "sim-key", "sim-secret"


class Collector:
    def __init__(self) -> None:
        self.updates: list[DataItem] = []
        self.skipped: list[Skipped] = []
        self.states: list[tuple[str, dict[str, Any]]] = []
        self.changed = asyncio.Event()

    def on_items(self, items: list[Any], ingest_ts: str, received: float) -> None:
        self.updates += items
        self.changed.set()

    def on_skipped(self, skipped: Skipped) -> None:
        self.skipped.append(skipped)
        self.changed.set()

    def on_state(self, state: str, info: dict[str, object]) -> None:
        self.states.append((state, info))
        self.changed.set()

    def names(self) -> list[str]:
        return [name for name, _ in self.states]

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def _session(sim: TradingSimulator, handler: Collector, **overrides: Any) -> AlpacaSession:
    values: dict[str, Any] = dict(
        url=sim.url, key=KEY, secret=SECRET, subscriptions={}, stream=TRADE_UPDATES,
        reconnect_initial=0.05, reconnect_max=0.2,
    )  # fmt: skip
    values.update(overrides)
    return AlpacaSession(SessionConfig(**values), handler)


@pytest.mark.parametrize("binary_frames", [True, False], ids=["paper-binary", "live-text"])
async def test_every_event_arrives_in_order_over_binary_and_text_frames(
    binary_frames: bool,
) -> None:
    config = TradingSimConfig(keys={KEY: SECRET}, total_events=300, rate=0, seed=3)
    config = config.model_copy(update={"binary_frames": binary_frames})
    async with asyncio.timeout(60):
        sim = await TradingSimulator(config).start()
        try:
            handler = Collector()
            session = _session(sim, handler)
            task = asyncio.create_task(session.run())
            await handler.wait_for(lambda: len(handler.updates) >= 300)
            await session.stop()
            await task
        finally:
            await sim.stop()
    assert [u.payload for u in handler.updates] == sim.distinct_events()
    assert handler.names()[:3] == ["connected", "authenticated", "subscribed"]
    assert not handler.skipped


async def test_refused_authorization_is_fatal_after_one_attempt() -> None:
    sim = await TradingSimulator(TradingSimConfig(keys={KEY: SECRET})).start()
    try:
        handler = Collector()
        session = _session(sim, handler, secret="wrong-secret")
        with pytest.raises(FatalSessionError) as failure:
            await asyncio.wait_for(session.run(), 20)
    finally:
        await sim.stop()
    message = str(failure.value)
    assert "access key verification failed" in message and "ALPACA_TRADING_ENV" in message
    assert "wrong-secret" not in message
    assert sim.stats()["connections"] == 1 and sim.stats()["auth_failures"] == 1
    assert session.reconnects == 0


async def test_a_listening_reply_without_the_stream_is_asked_again() -> None:
    sim = await TradingSimulator(TradingSimConfig(keys={KEY: SECRET}, rate=500)).start()
    sim.omit_from_listening(replies=1)
    try:
        handler = Collector()
        session = _session(sim, handler, resubscribe_delays=(0.05, 0.1))
        task = asyncio.create_task(session.run())
        await handler.wait_for(lambda: len(handler.updates) >= 20)
        await session.stop()
        await task
    finally:
        await sim.stop()
    assert session.resubscribes == 1 and not session.unserved
    assert sim.stats()["omitted_from_listening"] == 1
    assert "subscription_mismatch" not in handler.names()


async def test_a_stream_never_granted_is_reported_unserved() -> None:
    sim = await TradingSimulator(TradingSimConfig(keys={KEY: SECRET})).start()
    sim.omit_from_listening(replies=None)
    try:
        handler = Collector()
        session = _session(sim, handler, resubscribe_delays=(0.05, 0.1))
        task = asyncio.create_task(session.run())
        await handler.wait_for(lambda: "subscription_mismatch" in handler.names())
        await session.stop()
        await task
    finally:
        await sim.stop()
    assert session.unserved == {("listen", "trade_updates")}
    assert session.resubscribes == 2
    [info] = [info for name, info in handler.states if name == "subscription_mismatch"]
    assert info["missing"] == {"listen": ["trade_updates"]}


async def test_malformed_frames_are_counted_and_the_stream_goes_on() -> None:
    sim = await TradingSimulator(TradingSimConfig(keys={KEY: SECRET}, rate=300)).start()
    try:
        handler = Collector()
        session = _session(sim, handler)
        task = asyncio.create_task(session.run())
        await handler.wait_for(lambda: len(handler.updates) >= 5)
        sim.inject_malformed(7)
        await handler.wait_for(lambda: len(handler.skipped) >= 7)
        before = len(handler.updates)
        await handler.wait_for(lambda: len(handler.updates) > before + 5)
        await session.stop()
        await task
    finally:
        await sim.stop()
    reasons = sorted(s.reason for s in handler.skipped)
    assert reasons == sorted(["malformed_frame"] * 3 + ["unknown_type"] + ["invalid_item"] * 3), (
        reasons
    )
    assert session.reconnects == 0


async def test_a_dropped_connection_reconnects_and_loses_nothing_sent() -> None:
    config = TradingSimConfig(keys={KEY: SECRET}, rate=400, total_events=400)
    sim = await TradingSimulator(config).start()
    try:
        handler = Collector()
        session = _session(sim, handler)
        task = asyncio.create_task(session.run())
        await handler.wait_for(lambda: len(handler.updates) >= 100)
        assert await sim.drop_connections() == 1
        await handler.wait_for(lambda: len(handler.updates) >= 400)
        await session.stop()
        await task
    finally:
        await sim.stop()
    assert session.reconnects == 1 and sim.stats()["connections"] == 2
    assert [u.payload for u in handler.updates] == sim.distinct_events()
