"""trade_updates through a real `ShardCore` (no Ray, no Kafka): the trading simulator over
real sockets, the shard's session, pipeline and outbox, a receiver in place of the producer.
Every event arrives once (duplicates dropped, distinct fills kept), keyed by order id, in
order per order, in a valid envelope. The Ray + Kafka version is
tests/test_trade_updates_end_to_end.py."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from ray_forwarder.config import load_settings
from ray_forwarder.ray.planning import plan
from ray_forwarder.ray.shard import ShardCore
from ray_forwarder_dev.sim.trading import TradingSimConfig, TradingSimulator
from tests.kafka_fixture import ConsumedRecord
from tests.stream_checks import canonical
from tests.test_trade_updates_end_to_end import _check, _per_order

KEY, SECRET = "sim-key", "sim-secret"


async def _until(check: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_trade_updates_shard_forwards_every_event_once_in_order() -> None:
    delivered: list[tuple[str, bytes, bytes]] = []

    async def send(records: list[tuple[str, bytes, bytes]], _ticket: Any) -> tuple[int, str]:
        delivered.extend(records)
        return len(records), "receiver"

    config = TradingSimConfig(
        keys={KEY: SECRET}, rate=0, total_events=800, duplicate_ratio=0.1, seed=4
    )
    async with asyncio.timeout(90):
        sim = await TradingSimulator(config).start()
        try:
            settings = load_settings(
                alpaca_api_key_id=KEY, alpaca_secret_key=SECRET,
                alpaca_streams="trade_updates", alpaca_trading_stream_url=sim.url,
                kafka_bootstrap_servers="127.0.0.1:9",
            )  # fmt: skip
            [planned] = plan(settings)
            core = ShardCore(settings, planned.spec, [send])
            runner = asyncio.create_task(core.run())
            try:
                await _until(lambda: sim.finished, 60, "the simulator to finish")
                await _until(
                    lambda: sum(core.stats()["received"].values()) >= sim.stats()["events"],
                    30,
                    "the shard to take in every event",
                )
            finally:
                assert await core.stop(10)
                await asyncio.wait_for(runner, 10)
        finally:
            await sim.stop()
    sent = sim.distinct_events()
    stats = core.stats()
    assert stats["stream"] == "trade_updates" and stats["skipped"] == {}
    assert stats["deduplicated"] == {"trade_updates": sim.stats()["duplicates"]}
    assert sim.stats()["duplicates"] > 0
    records = [ConsumedRecord(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(delivered)]
    updates, status = _check(records, settings)
    assert Counter(canonical(e["payload"]) for e in updates) == Counter(canonical(d) for d in sent)
    assert _per_order([e["payload"] for e in updates]) == _per_order(sent)
    assert [e["payload"]["event"] for e in status][:3] == [
        "connected",
        "authenticated",
        "subscribed",
    ]
