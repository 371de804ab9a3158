"""A subscription the feed serves only in part, seen from outside: the real forwarder (local
Ray, real Kafka) against a simulator that never subscribes one symbol. The shard asks again
(bounded), then `/healthz` says degraded (200; 503 with ?strict), `/metrics` counts the
unserved (channel, symbol) pairs per shard, and a `subscription_mismatch` status event in
Kafka names channel and symbols."""

from __future__ import annotations

import orjson

from tests.forwarder_harness import forwarder_settings, read_back
from tests.kafka_fixture import consume_all
from tests.test_observability import SYMBOLS, Running, _samples, _sim, _until

CHANNELS = ["trades", "quotes", "bars"]


async def test_healthz_is_degraded_and_the_gauge_counts_pairs_the_feed_never_serves(
    kafka_broker, kafka_topics, ray_session
) -> None:
    with _sim(rate=500) as sim:
        sim.omit_from_subscription("QQQ", replies=None)
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS),
            alpaca_channels=",".join(CHANNELS),
        )  # fmt: skip
        async with Running(settings) as run:
            [shard_id] = [spec.shard_id for spec in run.forwarder.shards]

            def unserved() -> float:
                for labels, value in samples.get("ray_forwarder_unserved_subscriptions", []):
                    if labels.get("shard") == shard_id:
                        return value
                return 0.0

            samples: dict = {}

            async def mismatch_seen() -> bool:
                nonlocal samples
                samples = _samples((await run.get("/metrics"))[1])
                return unserved() > 0

            await _until(mismatch_seen, 60, "the unserved gauge")
            assert unserved() == len(CHANNELS)  # QQQ on each channel: pairs, not symbols
            status, body = await run.get("/healthz")
            health = orjson.loads(body)
            assert status == 200, body
            assert health["status"] == "degraded" and health["problems"] == []
            [line] = health["degraded"]
            assert shard_id in line and "trades:QQQ" in line and "quotes:QQQ" in line
            assert (await run.get("/healthz?strict"))[0] == 503
            assert (await run.get("/livez"))[0] == 200
            assert samples["ray_forwarder_degraded"][0][1] == 1.0
            assert samples["ray_forwarder_healthy"][0][1] == 1.0
            resent = [v for labels, v in samples.get("ray_forwarder_resubscribes_total", [])
                      if labels.get("shard") == shard_id]  # fmt: skip
            assert resent == [3.0]  # bounded: three re-sends, then reported
            assert sim.stats()["omitted_from_subscription"] == 4  # the first ask + 3
    events = await consume_all(kafka_broker.bootstrap_servers, settings.topic_status)
    payloads = [orjson.loads(record.value)["payload"] for record in events]
    [mismatch] = [p for p in payloads if p["event"] == "subscription_mismatch"]
    assert mismatch["missing"] == {channel: ["QQQ"] for channel in CHANNELS}
    assert mismatch["unserved"] == len(CHANNELS) and mismatch["shard"] == shard_id
    records = await read_back(kafka_broker, settings, 1)
    assert records  # data for the served symbols flowed meanwhile
