"""trade_updates end to end: the trading simulator -> the forwarder on a local Ray -> real
Kafka, checked event by event (order, partition, exactly once, schema), and the trading
stream's failures (refused authorization, a listening reply without the stream, a drop)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import orjson
import pytest

from ray_forwarder_dev.sim.trading import TradingSimConfig, TradingSimulatorThread
from tests.forwarder_harness import SIM_KEY, SIM_SECRET, forwarder_settings, run_until
from tests.kafka_fixture import ConsumedRecord, consume_all
from tests.stream_checks import _VALIDATOR, canonical

pytestmark = pytest.mark.usefixtures("ray_session")


def _sim(**overrides: Any) -> TradingSimulatorThread:
    values: dict[str, Any] = dict(keys={SIM_KEY: SIM_SECRET}, rate=400, seed=11)
    values.update(overrides)
    return TradingSimulatorThread(TradingSimConfig(**values))


def _settings(kafka_broker: Any, kafka_topics: Any, sim: TradingSimulatorThread, **overrides: Any):
    return forwarder_settings(
        kafka_broker, kafka_topics, sim, alpaca_streams="trade_updates",
        alpaca_trading_stream_url=sim.url, **overrides,
    )  # fmt: skip


async def _read(kafka_broker: Any, settings: Any, expected: int) -> list[ConsumedRecord]:
    return await consume_all(
        kafka_broker.bootstrap_servers,
        [settings.topic_trade_updates, settings.topic_status],
        expected_count=expected,
        timeout=60,
        settle=1.0,
    )


def _check(records: list[ConsumedRecord], settings: Any) -> tuple[list[dict], list[dict]]:
    """Validate every envelope; per order id: one partition, record key = order id, seq
    strictly increasing in Kafka order. Returns (trade update envelopes, status envelopes)."""
    updates, status = [], []
    partition_of: dict[str, int] = {}
    last_seq: dict[str, int] = {}
    for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        envelope = orjson.loads(record.value)
        _VALIDATOR.validate(envelope)
        if envelope["channel"] == "status":
            status.append(envelope)
            continue
        assert record.topic == settings.topic_trade_updates
        assert envelope["channel"] == "trade_updates" and envelope["is_final"] is True
        assert envelope["source"] == "alpaca" and envelope["symbol"] is None
        order_id = envelope["payload"]["order"]["id"]
        assert record.key == order_id.encode()
        assert partition_of.setdefault(order_id, record.partition) == record.partition
        assert envelope["seq"] > last_seq.get(order_id, 0), (order_id, envelope["seq"])
        last_seq[order_id] = envelope["seq"]
        assert envelope["key"].startswith(f"trade_updates:{order_id}:{envelope['event_ts']}:")
        updates.append(envelope)
    return updates, status


def _per_order(datas: list[dict[str, Any]]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = defaultdict(list)
    for data in datas:
        out[data["order"]["id"]].append(canonical(data))
    return out


async def test_each_order_arrives_once_in_order_in_one_partition(kafka_broker, kafka_topics):
    with _sim(total_events=600, duplicate_ratio=0.1) as sim:
        settings = _settings(kafka_broker, kafka_topics, sim)
        result = await run_until(settings, lambda: sim.finished)
        sent = sim.distinct_events()
        sim_stats = sim.stats()
    assert result.error is None and result.drained
    assert len(sent) == 600 and sim_stats["duplicates"] > 0
    assert result.snapshot.total("deduplicated") == {"trade_updates": sim_stats["duplicates"]}
    emitted = sum(result.snapshot.total("emitted").values())
    updates, status = _check(await _read(kafka_broker, settings, emitted), settings)
    got = Counter(canonical(e["payload"]) for e in updates)
    assert got == Counter(canonical(d) for d in sent)  # exactly once: no loss, no duplicate
    assert _per_order([e["payload"] for e in updates]) == _per_order(sent)  # order per order id
    fills = Counter(d["order"]["id"] for d in sent if d["event"] in ("partial_fill", "fill"))
    assert max(fills.values()) >= 2  # distinct fills of one order were all kept
    events = {d["event"] for d in sent}
    assert events >= {"new", "partial_fill", "fill", "canceled", "replaced", "rejected"}
    handshake = [e["payload"]["event"] for e in status][:3]
    assert handshake == ["connected", "authenticated", "subscribed"]


async def test_text_frames_and_a_dropped_connection(kafka_broker, kafka_topics):
    dropped: list[int] = []

    def drop_once(_elapsed: float) -> None:
        if not dropped and sim.stats()["events"] >= 150:
            dropped.append(sim.drop_connections())

    with _sim(total_events=400, binary_frames=False, duplicate_ratio=0.05) as sim:
        settings = _settings(kafka_broker, kafka_topics, sim)
        result = await run_until(settings, lambda: sim.finished, during=drop_once)
        sent = sim.distinct_events()
        sim_stats = sim.stats()
    assert dropped == [1] and sim_stats["connections"] == 2
    assert result.error is None and result.drained
    [shard] = result.snapshot.shards
    assert shard["reconnects"] == 1
    emitted = sum(result.snapshot.total("emitted").values())
    updates, _ = _check(await _read(kafka_broker, settings, emitted), settings)
    assert Counter(canonical(e["payload"]) for e in updates) == Counter(canonical(d) for d in sent)
    assert _per_order([e["payload"] for e in updates]) == _per_order(sent)


async def test_refused_authorization_stops_with_one_clear_line(kafka_broker, kafka_topics):
    with _sim() as sim:
        sim.reject_auth(True)
        settings = _settings(kafka_broker, kafka_topics, sim)
        result = await run_until(settings, lambda: False, timeout=60)
        sim_stats = sim.stats()
    assert result.error is not None
    assert "authorization refused" in result.error and "ALPACA_TRADING_ENV" in result.error
    assert SIM_SECRET not in result.error
    assert sim_stats["auth_failures"] == 1 and sim_stats["connections"] == 1  # no retry loop


async def test_a_listening_reply_without_the_stream_degrades_health(kafka_broker, kafka_topics):
    with _sim() as sim:
        sim.omit_from_listening(replies=None)
        settings = _settings(kafka_broker, kafka_topics, sim)

        def reported() -> bool:
            return sim.stats()["listens"] >= 4  # the first listen and three re-sends

        result = await run_until(settings, reported, timeout=60, settle=2.0)
        sim_stats = sim.stats()
    assert result.error is None
    [shard] = result.snapshot.shards
    assert shard["unserved"] == 1 and shard["resubscribes"] == 3
    assert sim_stats["events"] == 0 and sim_stats["omitted_from_listening"] == 4
    emitted = sum(result.snapshot.total("emitted").values())
    _, status = _check(await _read(kafka_broker, settings, emitted), settings)
    [mismatch] = [e for e in status if e["payload"]["event"] == "subscription_mismatch"]
    assert mismatch["payload"]["missing"] == {"listen": ["trade_updates"]}


async def test_every_stream_together_and_a_drop_on_trade_updates_leaves_the_others_alone(
    kafka_broker, kafka_topics
):
    from contextlib import ExitStack

    from tests.stream_checks import assert_exactly_once, assert_symbol_order
    from tests.test_streams_end_to_end import _settings as streams_settings
    from tests.test_streams_end_to_end import _sim as market_sim
    from tests.test_streams_end_to_end import _stream_report

    market = ("stocks", "crypto", "options", "news")
    dropped: list[int] = []
    with ExitStack() as stack:
        sims = {
            s: stack.enter_context(market_sim(s, rate=500, duplicate_ratio=0.0)) for s in market
        }
        trading = stack.enter_context(_sim(total_events=300, rate=150, duplicate_ratio=0.05))

        def drop_trading_once(_elapsed: float) -> None:
            if not dropped and trading.stats()["events"] >= 100:
                dropped.append(trading.drop_connections())

        settings = streams_settings(
            kafka_broker, kafka_topics, sims, alpaca_wire_format="msgpack",
            alpaca_streams=",".join((*market, "trade_updates")),
            alpaca_trading_stream_url=trading.url,
        )  # fmt: skip
        result = await run_until(
            settings,
            lambda: trading.finished and all(sim.finished for sim in sims.values()),
            during=drop_trading_once,
            timeout=150,
        )
        sent = {s: sim.distinct_items() for s, sim in sims.items()}
        connections = {s: sim.stats()["connections"] for s, sim in sims.items()}
        trades_sent = trading.distinct_events()
        trading_connections = trading.stats()["connections"]
    assert dropped == [1] and trading_connections == 2
    assert result.error is None and result.drained
    shards = {shard["stream"]: shard for shard in result.snapshot.shards}
    assert set(shards) == {*market, "trade_updates"}
    assert shards["trade_updates"]["reconnects"] == 1
    for stream in market:
        assert shards[stream]["reconnects"] == 0 and connections[stream] == 1, stream
    emitted = sum(result.snapshot.total("emitted").values())
    records = await consume_all(
        kafka_broker.bootstrap_servers,
        sorted({t for s in settings.streams() for t in _topics_of(settings, s)}),
        expected_count=emitted,
        timeout=60,
        settle=1.0,
    )
    for stream in market:
        report = _stream_report(settings, stream, records)
        assert_exactly_once(report, sent[stream])
        assert_symbol_order(report, sent[stream])
    mine = [
        r
        for r in records
        if r.topic == settings.topic_trade_updates
        or (r.topic == settings.topic_status and b'"shard":"trade_updates-' in r.value)
    ]
    updates, status = _check(mine, settings)
    assert Counter(canonical(e["payload"]) for e in updates) == Counter(
        canonical(d) for d in trades_sent
    )
    assert _per_order([e["payload"] for e in updates]) == _per_order(trades_sent)
    assert [e["payload"]["event"] for e in status].count("subscribed") == 2


def _topics_of(settings: Any, stream: Any) -> list[str]:
    from ray_forwarder.core.topics import topic_map

    return list(topic_map(settings, stream).values())
