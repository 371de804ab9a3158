"""PRODUCERS=0: every shard actor writes to Kafka itself (`ProducerHost` in its process).

The same guarantees as with producer actors, on a local Ray and the real broker."""

from __future__ import annotations

import pytest

from ray_forwarder.core.topics import topic_map
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import forwarder_settings, read_back, run_until
from tests.stream_checks import (
    assert_exactly_once,
    assert_one_final_per_bar,
    assert_symbol_order,
    decode_and_check,
)

pytestmark = pytest.mark.usefixtures("ray_session")

SYMBOLS = ["SPY", "QQQ", "AAPL", "MSFT", "NVDA", "AMZN", "META", "TSLA"]
KEYS = {"sim-key-0": "sim-secret-0", "sim-key-1": "sim-secret-1"}


def _sim(**overrides) -> SimulatorThread:
    values = dict(symbols=SYMBOLS, rate=2000, time_scale=600, keys=KEYS, seed=11)
    values.update(overrides)
    return SimulatorThread(SimConfig(**values))


def _settings(kafka_broker, kafka_topics, sim, **overrides):
    (first_key, first_secret), *rest = KEYS.items()
    values = dict(
        alpaca_symbols=",".join(SYMBOLS),
        alpaca_api_key_id=first_key, alpaca_secret_key=first_secret,
        alpaca_credentials=",".join(f"{k}:{s}" for k, s in rest),
        shards=2, producers=0,
    )  # fmt: skip
    values.update(overrides)
    return forwarder_settings(kafka_broker, kafka_topics, sim, **values)


async def test_two_shards_writing_to_kafka_themselves_keep_every_event_and_order(
    kafka_broker, kafka_topics
) -> None:
    forwarders = []
    ready_while_running = set()

    def note_ready(_elapsed: float) -> None:
        if forwarders:
            snap = forwarders[0].snapshot
            ready_while_running.update(p["name"] for p in snap.producers if p["ready"])

    with _sim(total_events=3000, duplicate_ratio=0.05) as sim:
        settings = _settings(kafka_broker, kafka_topics, sim)
        result = await run_until(
            settings, lambda: sim.finished, during=note_ready, on_forwarder=forwarders.append
        )
        sent = sim.distinct_items()
        sim_stats = sim.stats()
    assert result.error is None and result.drained
    [forwarder] = forwarders
    assert set(forwarder.actors()) == {"stocks-0", "stocks-1"}, "no producer actors"
    # each shard reports the producer it hosts: named after it, ready while running, used
    producers = {p["name"]: p for p in result.snapshot.producers}
    assert set(producers) == ready_while_running == {"stocks-0", "stocks-1"}
    assert all(p["records"] > 0 and p["errors"] == 0 for p in producers.values())
    assert sim_stats["connections"] == 2 and sim_stats["refused"] == 0
    emitted = sum(result.snapshot.total("emitted").values())
    records = await read_back(kafka_broker, settings, emitted)
    assert len(records) == emitted
    report = decode_and_check(records, topic_map(settings))
    assert sum(result.snapshot.total("deduplicated").values()) == sim_stats["duplicates"] > 0
    assert_exactly_once(report, sent)
    assert_symbol_order(report, sent)
    assert_one_final_per_bar(report, sent)


async def test_a_shard_that_cannot_reach_kafka_fails_the_start_clearly(
    kafka_broker, kafka_topics
) -> None:
    if kafka_broker.sasl_bootstrap_servers is None:
        pytest.fail("this test needs the local broker's SCRAM listener")
    with _sim() as sim:
        settings = _settings(
            kafka_broker, kafka_topics, sim, shards=1, alpaca_credentials="",
            kafka_bootstrap_servers=kafka_broker.sasl_bootstrap_servers,
            kafka_username=kafka_broker.username, kafka_password="wrong-password",
            kafka_request_timeout_ms=5000,
        )  # fmt: skip
        result = await run_until(settings, lambda: False, timeout=60)
    assert result.error is not None
    assert "stocks-0" in result.error and "SASL authentication failed" in result.error
    assert "wrong-password" not in result.error
