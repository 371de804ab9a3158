"""Every market-data stream through a real `ShardCore` (no Ray, no Kafka): the simulator over
real sockets, the shard's session, pipeline and outbox, and a receiver in place of the
producer. Each item the simulator sent arrives once (duplicates dropped), in order per key,
in a valid envelope, on its stream's topics. The end-to-end tests with Ray and Kafka are in
tests/test_streams_end_to_end.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ray_forwarder.alpaca.streams import STREAMS
from ray_forwarder.config import load_settings
from ray_forwarder.core.topics import topic_map
from ray_forwarder.ray.planning import plan
from ray_forwarder.ray.shard import ShardCore
from ray_forwarder_dev.sim import SimConfig, Simulator
from tests.kafka_fixture import ConsumedRecord
from tests.stream_checks import assert_exactly_once, assert_symbol_order, decode_and_check
from tests.test_streams_end_to_end import CHANNELS, SIM_SYMBOLS, SYMBOLS

KEY, SECRET = "sim-key", "sim-secret"


async def _until(check: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("stream", "wire_format"),
    [("stocks", "json"), ("crypto", "msgpack"), ("options", "msgpack"), ("news", "json")],
)
async def test_a_shard_forwards_its_stream_exactly_once_in_order(stream, wire_format) -> None:
    delivered: list[tuple[str, bytes, bytes]] = []

    async def send(records: list[tuple[str, bytes, bytes]], _ticket: Any) -> tuple[int, str]:
        delivered.extend(records)
        return len(records), "receiver"

    config = SimConfig(
        stream=stream, symbols=SIM_SYMBOLS[stream], rate=3000, time_scale=600,
        keys={KEY: SECRET}, seed=5, total_events=1200, duplicate_ratio=0.05,
    )  # fmt: skip
    async with Simulator(config) as sim:
        definition = STREAMS[stream]
        values: dict[str, Any] = {
            "alpaca_api_key_id": KEY,
            "alpaca_secret_key": SECRET,
            "alpaca_streams": stream,
            "alpaca_wire_format": wire_format,
            definition.url_setting: sim.url,
            definition.symbols_setting: ",".join(SYMBOLS[stream]),
            "kafka_bootstrap_servers": "127.0.0.1:9",
            "bar_final_delay_seconds": 0.3,
            "data_stale_seconds": 0,
        }
        if stream in CHANNELS:
            values[CHANNELS[stream][0]] = CHANNELS[stream][1]
        settings = load_settings(**values)
        [planned] = plan(settings)
        core = ShardCore(settings, planned.spec, [send])
        runner = asyncio.create_task(core.run())
        try:
            await _until(lambda: sim.finished, 60, "the simulator to finish")
            await _until(
                lambda: (
                    core.stats()["received"]
                    and sum(core.stats()["received"].values())
                    + sum(core.stats()["deduplicated"].values())
                    >= sim.stats()["items"]
                ),
                30,
                "the shard to take in every item",
            )
        finally:
            assert await core.stop(10)
            await asyncio.wait_for(runner, 10)
        sent = sim.distinct_items()
        duplicates = sim.stats()["duplicates"]
    stats = core.stats()
    assert stats["stream"] == stream and stats["skipped"] == {}
    assert sum(stats["deduplicated"].values()) == duplicates > 0
    records = [ConsumedRecord(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(delivered)]
    topics = topic_map(settings, definition)
    report = decode_and_check(records, topics)
    assert {t for t, _k, _v in delivered} <= set(topics.values())
    assert_exactly_once(report, sent)
    assert_symbol_order(report, sent)
    if stream == "news":
        assert all(e["symbol"] is None for e in report.data)
