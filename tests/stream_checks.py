"""Checks that what the forwarder wrote to Kafka accounts for what the simulator sent."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import orjson

from tests.kafka_fixture import ConsumedRecord

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[1] / "schemas" / "envelope.v1.json").read_text()
)
_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def canonical(item: dict[str, Any]) -> bytes:
    return orjson.dumps(item, option=orjson.OPT_SORT_KEYS)


def item_key(item: dict[str, Any]) -> str:
    """What an item is keyed by: its symbol, or (news) its article id."""
    return item["S"] if "S" in item else str(item["id"])


@dataclass
class StreamReport:
    data: list[dict[str, Any]] = field(default_factory=list)  # non-final market data
    finals: list[dict[str, Any]] = field(default_factory=list)
    status: list[dict[str, Any]] = field(default_factory=list)
    # final bars whose content came from REST (the `backfill` marker): not streamed items
    backfilled: list[dict[str, Any]] = field(default_factory=list)
    # trades and quotes fetched from REST to fill a gap (opt-in `BACKFILL_CHANNELS`)
    backfilled_ticks: list[dict[str, Any]] = field(default_factory=list)
    resent: int = 0  # records whose seq did not advance (re-sent batches)


def decode_and_check(
    records: list[ConsumedRecord], topics: dict[str, str], *, allow_resends: bool = False
) -> StreamReport:
    """Validate every envelope, its topic and key, and seq order per (channel, symbol) in
    Kafka order (per partition, by offset)."""
    report = StreamReport()
    last_seq: dict[tuple[str, str], int] = {}
    seen_keys: set[str] = set()
    for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        envelope = orjson.loads(record.value)
        _VALIDATOR.validate(envelope)
        channel, symbol = envelope["channel"], envelope["symbol"]
        assert record.topic == topics[channel], (record.topic, channel)
        if channel == "status":
            assert envelope["source"] == "forwarder"
            assert record.key == envelope["payload"]["shard"].encode()
            seq_key = ("status", envelope["payload"]["shard"])
            report.status.append(envelope)
        else:
            assert envelope["source"] == "alpaca"
            key = item_key(envelope["payload"])
            assert record.key == key.encode(), (record.key, key)
            assert symbol == envelope["payload"].get("S")  # null for news
            seq_key = (channel, key)
            is_final_bar = channel == "bars" and envelope["is_final"]
            if "backfill" in envelope and is_final_bar:
                report.backfilled.append(envelope)
            elif "backfill" in envelope:
                assert channel in ("trades", "quotes") and envelope["is_final"], (
                    "backfill emits final bars, trades and quotes only"
                )
                report.backfilled_ticks.append(envelope)
            else:
                (report.finals if is_final_bar else report.data).append(envelope)
        previous = last_seq.get(seq_key, 0)
        if allow_resends and envelope["seq"] <= previous and envelope["key"] in seen_keys:
            report.resent += 1  # an at-least-once re-send of an earlier batch
            continue
        assert envelope["seq"] > previous, (seq_key, previous, envelope["seq"])
        last_seq[seq_key] = envelope["seq"]
        seen_keys.add(envelope["key"])
    return report


def assert_exactly_once(report: StreamReport, sent_items: list[dict[str, Any]]) -> None:
    """Every distinct item sent arrived exactly once; nothing arrived that was not sent."""
    got = Counter(canonical(e["payload"]) for e in report.data)
    want = Counter(canonical(item) for item in sent_items)
    duplicated = {k: n for k, n in got.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} items arrived more than once"
    missing = want - got
    extra = got - want
    assert not missing, f"{sum(missing.values())} of {len(want)} items missing"
    assert not extra, f"{sum(extra.values())} items arrived that were not sent"


def assert_symbol_order(report: StreamReport, sent_items: list[dict[str, Any]]) -> None:
    """Per (channel, symbol), Kafka order equals the simulator's send order."""
    sent_order: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    for item in sent_items:
        sent_order[(item["T"], item_key(item))].append(canonical(item))
    got_order: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    for envelope in report.data:  # already in per-partition offset order
        payload = envelope["payload"]
        got_order[(payload["T"], item_key(payload))].append(canonical(payload))
    for key, order in sent_order.items():
        assert got_order[key] == order, f"order differs for {key}"


def assert_one_final_per_bar(report: StreamReport, sent_items: list[dict[str, Any]]) -> None:
    """Exactly one is_final bar per (symbol, minute), carrying the latest revision sent."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for item in sent_items:
        if item["T"] in ("b", "u"):
            latest[(item["S"], item["t"])] = item
    finals = Counter((e["symbol"], e["payload"]["t"]) for e in report.finals)
    assert all(n == 1 for n in finals.values()), "a bar was finalised twice"
    assert set(finals) == set(latest), "some bars got no final record"
    for envelope in report.finals:
        assert envelope["payload"] == latest[(envelope["symbol"], envelope["payload"]["t"])]


def assert_at_least_once(report: StreamReport, sent_items: list[dict[str, Any]]) -> int:
    """Nothing lost, nothing foreign; returns how many duplicates arrived (at-least-once)."""
    got = Counter(canonical(e["payload"]) for e in report.data)
    want = Counter(canonical(item) for item in sent_items)
    missing = want - Counter(dict.fromkeys(got, 1))
    assert not missing, f"{sum(missing.values())} of {len(want)} items missing"
    extra = set(got) - set(want)
    assert not extra, f"{len(extra)} items arrived that were not sent"
    return sum(got.values()) - len(got)


def assert_first_occurrence_order(report: StreamReport, sent_items: list[dict[str, Any]]) -> None:
    """Per (channel, symbol), the first arrival of each item follows the send order."""
    sent_order: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    for item in sent_items:
        sent_order[(item["T"], item_key(item))].append(canonical(item))
    got_order: dict[tuple[str, str], dict[bytes, None]] = defaultdict(dict)
    for envelope in report.data:
        payload = envelope["payload"]
        got_order[(payload["T"], item_key(payload))].setdefault(canonical(payload), None)
    for key, order in sent_order.items():
        assert list(got_order[key]) == order, f"order differs for {key}"
