"""Crypto, options and news (and all of them beside stocks): simulator -> forwarder on a local
Ray -> real Kafka, checked item by item: delivered exactly once after dedup, in order per
key, valid envelopes, on the right topics."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import pytest

from ray_forwarder.alpaca.streams import STREAMS
from ray_forwarder.config import Settings, load_settings
from ray_forwarder.core.topics import topic_map
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import ALL_CHANNELS, SIM_KEY, SIM_SECRET, run_until
from tests.kafka_fixture import ConsumedRecord, TopicNames, consume_all
from tests.stream_checks import (
    StreamReport,
    assert_exactly_once,
    assert_one_final_per_bar,
    assert_symbol_order,
    decode_and_check,
)

pytestmark = pytest.mark.usefixtures("ray_session")

SYMBOLS = {
    "stocks": ["SPY", "QQQ", "AAPL"],
    "crypto": ["BTC/USD", "ETH/USD", "SOL/USD"],
    "options": ["AAPL260116C00230000", "SPY260116P00590000", "QQQ260116C00520000"],
    "news": ["*"],
}
#: What the simulator's market is made of (news needs the trade ids as article ids).
SIM_SYMBOLS = {**SYMBOLS, "news": ["AAPL", "MSFT", "TSLA"]}
CHANNELS = {
    "stocks": ("alpaca_channels", ALL_CHANNELS),
    "crypto": ("alpaca_crypto_channels", "trades,quotes,bars,updatedBars,dailyBars,orderbooks"),
    "options": ("alpaca_options_channels", "trades,quotes"),
}
TOPIC_FIELDS = sorted(
    {c.topic.setting for s in STREAMS.values() for c in s.channels}
    | {"topic_status", "topic_deadletter", "topic_trade_updates"}
)


def _sim(stream: str, **overrides: Any) -> SimulatorThread:
    values: dict[str, Any] = dict(
        stream=stream, symbols=SIM_SYMBOLS[stream], rate=2000, time_scale=600,
        keys={SIM_KEY: SIM_SECRET}, seed=11, total_events=1500, duplicate_ratio=0.05,
    )  # fmt: skip
    values.update(overrides)
    return SimulatorThread(SimConfig(**values))


def _settings(
    kafka_broker: Any, topics: TopicNames, sims: dict[str, SimulatorThread], **overrides: Any
) -> Settings:
    values: dict[str, Any] = dict(
        alpaca_api_key_id=SIM_KEY,
        alpaca_secret_key=SIM_SECRET,
        alpaca_streams=",".join(sims),
        kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
        metrics_port=0,
        bar_final_delay_seconds=0.5,
        reconnect_initial=0.1,
        reconnect_max=0.5,
        connection_limit_backoff=1.0,
        producer_linger_ms=5,
    )
    for stream, sim in sims.items():
        definition = STREAMS[stream]
        values[definition.url_setting] = sim.url
        values[definition.symbols_setting] = ",".join(SYMBOLS[stream])
        if stream in CHANNELS:
            field, channels = CHANNELS[stream]
            values[field] = channels
    for field in TOPIC_FIELDS:
        values[field] = topics(field.removeprefix("topic_"))
    values.update(overrides)
    return load_settings(**values)


async def _read_back(kafka_broker: Any, settings: Settings, expected: int) -> list[ConsumedRecord]:
    topics = sorted({t for s in settings.streams() for t in topic_map(settings, s).values()})
    return await consume_all(
        kafka_broker.bootstrap_servers, topics, expected_count=expected, timeout=60, settle=1.0
    )


def _stream_report(settings: Settings, stream: str, records: list[ConsumedRecord]) -> StreamReport:
    """Check one stream's records (its own topics; the status topic is shared, so only
    its own shards' status records)."""
    topics = topic_map(settings, STREAMS[stream])
    mine = set(topics.values()) - {settings.topic_status}
    status_prefix = f'"shard":"{stream}-'.encode()
    own = [
        r
        for r in records
        if r.topic in mine or (r.topic == settings.topic_status and status_prefix in r.value)
    ]
    return decode_and_check(own, topics)


@pytest.mark.parametrize(
    ("stream", "wire_format"), [("crypto", "json"), ("options", "msgpack"), ("news", "msgpack")]
)
async def test_a_stream_arrives_exactly_once_in_order_on_its_own_topics(
    kafka_broker, kafka_topics, stream, wire_format
) -> None:
    with _sim(stream) as sim:
        settings = _settings(
            kafka_broker, kafka_topics, {stream: sim}, alpaca_wire_format=wire_format
        )
        result = await run_until(settings, lambda: sim.finished)
        sent = sim.distinct_items()
        sim_stats = sim.stats()
    assert result.error is None and result.drained
    [shard] = result.snapshot.shards
    assert shard["stream"] == stream and shard["shard_id"] == f"{stream}-0"
    emitted = sum(result.snapshot.total("emitted").values())
    records = await _read_back(kafka_broker, settings, emitted)
    assert len(records) == emitted
    report = _stream_report(settings, stream, records)
    assert sim_stats["duplicates"] > 0
    assert sum(result.snapshot.total("deduplicated").values()) == sim_stats["duplicates"]
    assert_exactly_once(report, sent)
    assert_symbol_order(report, sent)
    kinds = {item["T"] for item in sent}
    expected_topics = {getattr(settings, c.topic.setting) for c in STREAMS[stream].channels}
    assert {r.topic for r in records} == expected_topics | {settings.topic_status}
    if stream == "crypto":
        assert kinds == {"t", "q", "b", "u", "d", "o"}
        assert_one_final_per_bar(report, sent)
        books = [e for e in report.data if e["channel"] == "orderbooks"]
        assert books and not any(e["is_final"] for e in books)
    elif stream == "options":
        assert kinds == {"t", "q"} and all(e["is_final"] for e in report.data)
    else:  # news: keyed by article id, no symbol in the envelope
        assert kinds == {"n"}
        assert all(e["symbol"] is None and e["is_final"] for e in report.data)
        assert all(e["key"].startswith(f"news:{e['payload']['id']}:") for e in report.data)


async def test_all_market_data_streams_together_and_a_drop_on_one_leaves_the_others_alone(
    kafka_broker, kafka_topics
) -> None:
    streams = ("stocks", "crypto", "options", "news")
    dropped: list[int] = []
    with ExitStack() as stack:
        sims = {s: stack.enter_context(_sim(s, rate=800, duplicate_ratio=0.0)) for s in streams}

        def drop_crypto_once(_elapsed: float) -> None:
            if not dropped and sims["crypto"].stats()["items"] >= 300:
                dropped.append(sims["crypto"].drop_connections())

        settings = _settings(kafka_broker, kafka_topics, sims, alpaca_wire_format="msgpack")
        result = await run_until(
            settings,
            lambda: all(sim.finished for sim in sims.values()),
            during=drop_crypto_once,
            timeout=150,
        )
        sent = {s: sim.distinct_items() for s, sim in sims.items()}
        connections = {s: sim.stats()["connections"] for s, sim in sims.items()}
    assert dropped == [1]
    assert result.error is None and result.drained
    shards = {shard["stream"]: shard for shard in result.snapshot.shards}
    assert set(shards) == set(streams)
    assert shards["crypto"]["reconnects"] == 1 and connections["crypto"] == 2
    for stream in ("stocks", "options", "news"):
        assert shards[stream]["reconnects"] == 0 and connections[stream] == 1, stream
    emitted = sum(result.snapshot.total("emitted").values())
    records = await _read_back(kafka_broker, settings, emitted)
    for stream in streams:
        report = _stream_report(settings, stream, records)
        assert_exactly_once(report, sent[stream])
        assert_symbol_order(report, sent[stream])
        events = [e["payload"]["event"] for e in report.status]
        if stream == "crypto":
            assert "disconnected" in events and events.count("subscribed") == 2
        else:
            assert "disconnected" not in events, stream
