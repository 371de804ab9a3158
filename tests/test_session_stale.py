"""Stale-stream detection in `AlpacaSession`, against the simulator (no Ray, no Kafka): a
quiet but healthy stream answers the probe and is kept; a stalled one is reconnected."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ray_forwarder.runtime.session import AlpacaSession, SessionConfig
from ray_forwarder_dev.sim import SimConfig, Simulator

KEY, SECRET = "sim-key", "sim-secret"


class Recorder:
    def __init__(self) -> None:
        self.items = 0
        self.states: list[tuple[str, dict[str, Any]]] = []

    def on_items(self, items: list[Any], ingest_ts: str, received: float) -> None:
        self.items += len(items)

    def on_skipped(self, skipped: Any) -> None:
        pass

    def on_state(self, state: str, info: dict[str, Any]) -> None:
        self.states.append((state, info))


def _session(url: str, symbols: list[str], handler: Recorder) -> AlpacaSession:
    config = SessionConfig(
        url=url, key=KEY, secret=SECRET, subscriptions={"trades": symbols},
        wire_format="json", reconnect_initial=0.05, reconnect_max=0.1,
        connection_limit_backoff=0.2, stale_stream_seconds=0.3,
    )  # fmt: skip
    return AlpacaSession(config, handler)


async def test_a_quiet_stream_answers_the_probe_and_is_kept() -> None:
    """No data for ten silence periods (a symbol nobody trades): every probe is answered
    by a subscription reply, so the session neither reconnects nor reports anything."""
    async with Simulator(SimConfig(symbols=["SPY"], rate=200, keys={KEY: SECRET})) as sim:
        handler = Recorder()
        session = _session(sim.url, ["ZZZZ"], handler)
        task = asyncio.create_task(session.run())
        await asyncio.sleep(3.0)
        await session.stop()
        await asyncio.wait_for(task, 5)
    assert handler.items == 0
    assert session.connects == 1 and session.reconnects == 0 and session.stale_reconnects == 0
    assert [s for s, _ in handler.states] == ["connected", "authenticated", "subscribed"]


async def test_a_stalled_stream_is_reconnected_with_a_stale_reason() -> None:
    async with Simulator(SimConfig(symbols=["SPY"], rate=500, keys={KEY: SECRET})) as sim:
        handler = Recorder()
        session = _session(sim.url, ["SPY"], handler)
        task = asyncio.create_task(session.run())
        assert await sim.wait_sent(100, 5)
        assert sim.stall_connections() == 1
        for _ in range(50):
            await asyncio.sleep(0.1)
            if session.connects >= 2 and session.subscribed:
                break
        before = handler.items
        await asyncio.sleep(0.5)
        await session.stop()
        await asyncio.wait_for(task, 5)
    assert session.stale_reconnects >= 1 and session.connects >= 2
    assert handler.items > before  # data flows again on the new socket
    reasons = [i["reason"] for s, i in handler.states if s == "disconnected"]
    assert reasons and reasons[0].startswith("stale stream: no frame for")


def test_seq_epochs_continue_above_every_earlier_incarnation() -> None:
    """A restarted shard numbers from its epoch: above anything epoch 0 could issue, and
    epoch 0 keeps the plain 1, 2, 3 … numbering."""
    from ray_forwarder.core.pipeline import SEQ_EPOCH_BITS, Sequencer

    first = Sequencer()
    first.start_epoch(0)
    assert [first.next("trades", "SPY") for _ in range(3)] == [1, 2, 3]
    second = Sequencer()
    second.start_epoch(1)
    assert second.next("trades", "SPY") == (1 << SEQ_EPOCH_BITS) + 1
    assert second.next("quotes", "QQQ") == (1 << SEQ_EPOCH_BITS) + 1  # a key new to it too
    assert (8191 << SEQ_EPOCH_BITS) + (1 << SEQ_EPOCH_BITS) - 1 < 2**53  # exact in JSON
    with pytest.raises(RuntimeError):
        second.start_epoch(2)  # numbers were issued already
