"""Dedup, seq, is_final and the envelope, without any I/O."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import orjson
import pytest

from ray_forwarder.alpaca.events import DataItem
from ray_forwarder.config import Settings
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.envelope import dedup_key, json_schema
from ray_forwarder.core.pipeline import EventPipeline
from ray_forwarder.core.topics import topic_map

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "envelope.v1.json"
T0 = "2026-01-05T14:30:00.000000000Z"


def _pipeline(final_delay: float = 10.0, ttl: float = 60.0, max_keys: int = 1000):
    settings = Settings()
    return EventPipeline(
        topic_map(settings), DedupCache(ttl, max_keys), BarFinalizer(final_delay)
    ), settings


def _trade(i: int, symbol: str = "SPY", price: float = 1.0) -> DataItem:
    ts = f"2026-01-05T14:30:00.{i:09d}Z"
    return DataItem("trades", symbol, ts, {"T": "t", "S": symbol, "i": i, "p": price, "t": ts})


def _bar(kind: str, symbol: str, close: float) -> DataItem:
    channel = "bars" if kind == "b" else "updatedBars"
    return DataItem(channel, symbol, T0, {"T": kind, "S": symbol, "c": close, "t": T0})


def _values(records):
    return [orjson.loads(r.value) for r in records]


def test_shipped_schema_matches_the_model() -> None:
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema()


def test_envelopes_validate_and_route_with_symbol_keys() -> None:
    pipeline, settings = _pipeline()
    records = pipeline.process([_trade(1), _trade(2, "QQQ")], "2026-01-05T14:30:01.000000Z", 0.0)
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    for record, envelope in zip(records, _values(records), strict=True):
        validator.validate(envelope)
        assert record.topic == settings.topic_trades
        assert record.key == envelope["symbol"].encode()
        assert envelope["source"] == "alpaca" and envelope["is_final"] is True
    assert [e["seq"] for e in _values(records)] == [1, 1]


def test_schema_rejects_a_broken_envelope() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    pipeline, _ = _pipeline()
    envelope = _values(pipeline.process([_trade(1)], "x", 0.0))[0]
    del envelope["seq"]
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(envelope)


def test_redelivery_is_dropped_and_seq_stays_dense() -> None:
    pipeline, _ = _pipeline()
    out = pipeline.process([_trade(1), _trade(1), _trade(2), _trade(1)], "x", 0.0)
    assert [e["payload"]["i"] for e in _values(out)] == [1, 2]
    assert [e["seq"] for e in _values(out)] == [1, 2]
    assert pipeline.counters.deduplicated["trades"] == 2


def test_same_timestamp_different_content_is_not_a_duplicate() -> None:
    pipeline, _ = _pipeline()
    a = _trade(1, price=1.0)
    b = DataItem("trades", "SPY", a.event_ts, {**a.payload, "p": 2.0})
    assert len(pipeline.process([a, b], "x", 0.0)) == 2


def test_updated_bar_is_never_a_duplicate_of_its_bar_and_one_final_is_emitted() -> None:
    pipeline, settings = _pipeline(final_delay=10.0)
    bar, updated = _bar("b", "SPY", 1.0), _bar("u", "SPY", 1.1)
    same_content_update = DataItem("updatedBars", "SPY", T0, {**bar.payload, "T": "u"})
    out = pipeline.process([bar, updated, same_content_update, bar], "x", 0.0)
    assert [e["channel"] for e in _values(out)] == ["bars", "updatedBars", "updatedBars"]
    assert all(e["is_final"] is False for e in _values(out))
    assert pipeline.finalize_due(9.9) == []
    finals = pipeline.finalize_due(10.0)
    [final] = _values(finals)
    assert finals[0].topic == settings.topic_bars
    assert final["is_final"] is True and final["channel"] == "bars"
    assert final["payload"] == same_content_update.payload  # the latest revision
    assert final["seq"] == 2  # after the non-final bar on the same (channel, symbol)
    assert pipeline.finalize_due(100.0) == []
    # a revision after the window is forwarded but creates no second final record
    late = DataItem("updatedBars", "SPY", T0, {**bar.payload, "T": "u", "c": 9.9})
    assert len(pipeline.process([late], "x", 20.0)) == 1
    assert pipeline.finalize_due(1000.0) == [] and pipeline.finalize_all() == []
    assert pipeline.late_revisions == 1


def test_finalize_all_on_stop_emits_each_pending_bar_once() -> None:
    pipeline, _ = _pipeline(final_delay=100.0)
    pipeline.process([_bar("b", "SPY", 1.0), _bar("b", "QQQ", 2.0)], "x", 0.0)
    finals = _values(pipeline.finalize_all())
    assert sorted(e["symbol"] for e in finals) == ["QQQ", "SPY"]
    assert pipeline.finalize_all() == []


def test_dedup_cache_ttl_and_bound() -> None:
    cache = DedupCache(ttl=10.0, max_keys=3)
    assert not cache.seen("a", 0.0)
    assert cache.seen("a", 5.0)
    assert not cache.seen("a", 10.0)  # expired exactly at the TTL
    for key in "bcd":
        cache.seen(key, 11.0)
    assert len(cache) == 3 and cache.evicted == 1
    assert not cache.seen("a", 11.0)  # evicted by the size bound
    with pytest.raises(ValueError):
        DedupCache(0, 1)


def test_dedup_key_shape() -> None:
    payload = {"T": "t", "S": "SPY", "p": 1.0}
    key = dedup_key("trades", "SPY", T0, payload)
    assert key.startswith(f"trades:SPY:{T0}:")
    assert key == dedup_key("trades", "SPY", T0, dict(reversed(payload.items())))


def test_status_records_go_to_the_status_topic() -> None:
    pipeline, settings = _pipeline()
    record = pipeline.status_record("stocks-0", "connected", {"url": "ws://x"})
    envelope = orjson.loads(record.value)
    assert record.topic == settings.topic_status and record.key == b"stocks-0"
    assert envelope["source"] == "forwarder" and envelope["channel"] == "status"
    assert envelope["payload"] == {"event": "connected", "shard": "stocks-0", "url": "ws://x"}
    assert envelope["symbol"] is None and envelope["seq"] == 1


def test_every_channel_has_a_topic() -> None:
    from ray_forwarder.alpaca.channels import ALL_CHANNELS
    from ray_forwarder.alpaca.streams import STREAMS

    settings = Settings()
    routed = {channel for s in STREAMS.values() for channel in topic_map(settings, s)}
    assert routed == set(ALL_CHANNELS)
