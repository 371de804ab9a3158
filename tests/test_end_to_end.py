"""Simulator -> forwarder on a local Ray -> real Kafka, checked item by item."""

from __future__ import annotations

import pytest

from ray_forwarder.core.topics import topic_map
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import SIM_KEY, SIM_SECRET, forwarder_settings, read_back, run_until
from tests.stream_checks import (
    assert_exactly_once,
    assert_one_final_per_bar,
    assert_symbol_order,
    decode_and_check,
)

SYMBOLS = ["SPY", "QQQ", "AAPL", "MSFT", "NVDA", "AMZN"]

pytestmark = pytest.mark.usefixtures("ray_session")


def _sim(**overrides) -> SimulatorThread:
    values = dict(symbols=SYMBOLS, rate=2000, time_scale=600, keys={SIM_KEY: SIM_SECRET}, seed=7)
    values.update(overrides)
    return SimulatorThread(SimConfig(**values))


def _status_events(report) -> list[str]:
    return [e["payload"]["event"] for e in report.status]


@pytest.mark.parametrize("wire_format", ["msgpack", "json"])
async def test_every_event_arrives_exactly_once_in_order(
    kafka_broker, kafka_topics, wire_format
) -> None:
    with _sim(total_events=3000, duplicate_ratio=0.05) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_wire_format=wire_format,
            alpaca_symbols=",".join(SYMBOLS),
        )  # fmt: skip
        result = await run_until(settings, lambda: sim.finished)
        sent = sim.distinct_items()
        sim_stats = sim.stats()
    assert result.error is None and result.drained
    emitted = sum(result.snapshot.total("emitted").values())
    records = await read_back(kafka_broker, settings, emitted)
    assert len(records) == emitted
    report = decode_and_check(records, topic_map(settings))
    assert sim_stats["duplicates"] > 0
    assert sum(result.snapshot.total("deduplicated").values()) == sim_stats["duplicates"]
    assert_exactly_once(report, sent)
    assert_symbol_order(report, sent)
    assert {item["T"] for item in sent} >= {"t", "q", "b", "u", "d", "s", "l", "c", "x"}
    assert_one_final_per_bar(report, sent)
    assert _status_events(report)[:3] == ["connected", "authenticated", "subscribed"]


async def test_reconnect_after_a_dropped_connection_keeps_seq_increasing(
    kafka_broker, kafka_topics
) -> None:
    dropped: list[int] = []

    def drop_once(_elapsed: float) -> None:
        if not dropped and sim.stats()["items"] >= 800:
            dropped.append(sim.drop_connections())

    with _sim(total_events=3000, rate=1000) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS),
            alpaca_wire_format="json",
        )  # fmt: skip
        result = await run_until(settings, lambda: sim.finished, during=drop_once)
        sent = sim.distinct_items()
        sim_stats = sim.stats()
    assert dropped == [1]
    assert result.error is None and result.drained
    assert sim_stats["connections"] == 2
    [shard] = result.snapshot.shards
    assert shard["reconnects"] == 1
    emitted = sum(result.snapshot.total("emitted").values())
    records = await read_back(kafka_broker, settings, emitted)
    report = decode_and_check(records, topic_map(settings))  # seq strictly increasing
    assert_exactly_once(report, sent)
    assert_symbol_order(report, sent)
    events = _status_events(report)
    assert events[:8] == [
        "connected", "authenticated", "subscribed", "disconnected", "reconnecting",
        "connected", "authenticated", "subscribed",
    ]  # fmt: skip


async def test_auth_failure_stops_with_a_clear_error_and_no_retry_storm(
    kafka_broker, kafka_topics
) -> None:
    with _sim() as sim:
        sim.reject_auth(True)
        settings = forwarder_settings(kafka_broker, kafka_topics, sim)
        result = await run_until(settings, lambda: False, timeout=20)
        import time

        time.sleep(1.0)
        failures = sim.stats()["auth_failures"]
    assert result.error is not None
    assert "402" in result.error and "ALPACA_API_KEY_ID" in result.error
    assert SIM_SECRET not in result.error
    assert failures == 1


async def test_wrong_kafka_password_fails_the_start_clearly(kafka_broker, kafka_topics) -> None:
    if kafka_broker.sasl_bootstrap_servers is None:
        pytest.fail("this test needs the local broker's SCRAM listener")
    with _sim() as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim,
            kafka_bootstrap_servers=kafka_broker.sasl_bootstrap_servers,
            kafka_username=kafka_broker.username, kafka_password="wrong-password",
            kafka_request_timeout_ms=5000,
        )  # fmt: skip
        result = await run_until(settings, lambda: False, timeout=30)
    assert result.error is not None
    assert "SASL authentication failed" in result.error
    assert "wrong-password" not in result.error


MANY_SYMBOLS = [*SYMBOLS, "META", "TSLA", "IWM", "DIA", "GOOG", "AMD", "NFLX", "INTC"]
SHARD_KEYS = {f"sim-key-{i}": f"sim-secret-{i}" for i in range(4)}


async def test_four_shards_and_three_producers_keep_every_event_and_order(
    kafka_broker, kafka_topics
) -> None:
    first, *rest = SHARD_KEYS.items()
    with _sim(symbols=MANY_SYMBOLS, keys=SHARD_KEYS, total_events=4000, rate=3000,
              duplicate_ratio=0.02) as sim:  # fmt: skip
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim,
            alpaca_symbols=",".join(MANY_SYMBOLS),
            alpaca_api_key_id=first[0], alpaca_secret_key=first[1],
            alpaca_credentials=",".join(f"{k}:{s}" for k, s in rest),
            shards=4, producers=3,
        )  # fmt: skip
        result = await run_until(settings, lambda: sim.finished)
        sent = sim.distinct_items()
        sim_stats = sim.stats()
    assert result.error is None and result.drained
    assert len(result.snapshot.shards) == 4 and len(result.snapshot.producers) == 3
    assert sim_stats["connections"] == 4 and sim_stats["refused"] == 0
    assert all(p["records"] > 0 for p in result.snapshot.producers)
    shard_symbols = [set() for _ in range(4)]
    emitted = sum(result.snapshot.total("emitted").values())
    records = await read_back(kafka_broker, settings, emitted)
    report = decode_and_check(records, topic_map(settings))
    assert_exactly_once(report, sent)
    assert_symbol_order(report, sent)
    assert_one_final_per_bar(report, sent)
    for shard in result.snapshot.shards:
        shard_symbols[int(shard["shard_id"].rsplit("-", 1)[1])] = shard["symbols"]
    assert sum(shard_symbols) == len(MANY_SYMBOLS)
    shards_seen = {
        e["payload"]["shard"] for e in report.status if e["payload"]["event"] == "subscribed"
    }
    assert shards_seen == {f"stocks-{i}" for i in range(4)}


async def test_connection_limit_backs_off_and_never_holds_two_sockets(
    kafka_broker, kafka_topics
) -> None:
    most_sockets: list[int] = [0]
    refusing = [True]

    def watch(elapsed: float) -> None:
        most_sockets[0] = max(most_sockets[0], sim.active_connections(SIM_KEY))
        if refusing[0] and sim.stats()["refused"] >= 2:
            sim.refuse_connections(False)
            refusing[0] = False

    with _sim(total_events=1500, rate=1000) as sim:
        sim.refuse_connections(True)
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS),
            connection_limit_backoff=1.0,
        )  # fmt: skip
        result = await run_until(settings, lambda: sim.finished, during=watch)
        sent = sim.distinct_items()
        sim_stats = sim.stats()
    assert result.error is None and result.drained
    assert not refusing[0], "the forwarder never tried to connect"
    assert sim_stats["refused"] == 2  # it waited CONNECTION_LIMIT_BACKOFF between attempts
    assert most_sockets[0] == 1
    [shard] = result.snapshot.shards
    assert shard["errors_by_code"].get(406, 0) == sim_stats["refused"]
    emitted = sum(result.snapshot.total("emitted").values())
    records = await read_back(kafka_broker, settings, emitted)
    report = decode_and_check(records, topic_map(settings))
    assert_exactly_once(report, sent)
