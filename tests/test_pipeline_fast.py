"""`EventPipeline.process` (inlined hot path) builds exactly what the reference builds.

The reference below is the straightforward construction from the envelope module's public
pieces (`serialise_payload`, `item_dedup_key`, `encode_envelope`) with its own dedup cache
and sequencer. Whatever the items (duplicates, bars, symbols that JSON must escape, NaN,
unencodable content, unrouted channels, unsubscribed symbols), both must produce the same
records byte for byte, the same counters and the same dedup/seq state.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import msgpack
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_forwarder.alpaca.events import DataItem
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.envelope import encode_envelope, item_dedup_key, serialise_payload
from ray_forwarder.core.pipeline import (
    REVISABLE_CHANNELS,
    EventPipeline,
    OutRecord,
    Sequencer,
    has_non_finite,
)

TOPICS = {"trades": "t", "quotes": "q", "bars": "b", "updatedBars": "b", "status": "s"}
INGEST = "2026-01-05T14:30:02.000000Z"
SYMBOLS = ["SPY", 'A"B', "C\\D", "E/F", "G"]


def reference(
    items: list[DataItem], allowed: frozenset[str], dedup: DedupCache, seq: Sequencer, now: float
) -> tuple[list[OutRecord], Counter[str]]:
    out: list[OutRecord] = []
    counts: Counter[str] = Counter()
    for item in items:
        if item.symbol not in allowed:
            counts["skip:unsubscribed_symbol"] += 1
            continue
        try:
            body = serialise_payload(item.payload)
        except TypeError:
            counts["skip:unencodable"] += 1
            continue
        if b"null" in body and has_non_finite(item.payload):
            counts["skip:non_finite_number"] += 1
            continue
        counts["received:" + item.channel] += 1
        topic = TOPICS.get(item.channel)
        if topic is None:
            counts["unrouted:" + item.channel] += 1
            continue
        key = item_dedup_key(item.channel, item.symbol, item.event_ts, body)
        if dedup.seen(key, now):
            counts["deduplicated:" + item.channel] += 1
            continue
        value = encode_envelope(
            ingest_ts=INGEST,
            event_ts=item.event_ts,
            channel=item.channel,
            symbol=item.symbol,
            seq=seq.next(item.channel, item.symbol),
            payload=orjson.Fragment(body),
            is_final=item.channel not in REVISABLE_CHANNELS,
            source="alpaca",
            key=key,
        )
        counts["emitted:" + item.channel] += 1
        out.append(OutRecord(topic, item.symbol.encode(), value, item.channel))
    return out, counts


_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),  # NaN and ±Inf included
    st.text(max_size=4),
    st.none(),
    st.lists(st.text(max_size=2), max_size=2),
    st.binary(max_size=2),  # unencodable
    st.just(msgpack.Timestamp(1767623400, 5)),  # rendered like `t`
)
_ITEMS = st.builds(
    lambda channel, symbol, second, fields: DataItem(
        channel, symbol, f"2026-01-05T14:30:0{second}.000000000Z", {"S": symbol, **fields}
    ),
    st.sampled_from(["trades", "quotes", "bars", "updatedBars", "lulds"]),
    st.sampled_from([*SYMBOLS, "NOT_SUBSCRIBED"]),
    st.integers(0, 2),
    st.dictionaries(st.sampled_from(["p", "s", "c", "z"]), _VALUES, max_size=3),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.lists(_ITEMS, max_size=8), max_size=6), max_keys=st.integers(1, 20))
def test_process_matches_the_reference(frames: list[list[DataItem]], max_keys: int) -> None:
    pipeline = EventPipeline(
        TOPICS, DedupCache(5.0, max_keys), BarFinalizer(10.0), allowed_symbols=SYMBOLS
    )
    dedup, seq = DedupCache(5.0, max_keys), Sequencer()
    want_counts: Counter[str] = Counter()
    now = 100.0
    for frame in frames:
        # the same payload dicts feed both sides: each gets its own copies
        mine = [DataItem(i.channel, i.symbol, i.event_ts, dict(i.payload)) for i in frame]
        got = pipeline.process(mine, INGEST, now)
        want, counts = reference(frame, frozenset(SYMBOLS), dedup, seq, now)
        assert got == want
        assert all(type(r) is OutRecord for r in got)
        want_counts.update(counts)
        now += 1.0
    c = pipeline.counters
    got_counts: Counter[str] = Counter()
    for name in ("received", "emitted", "deduplicated", "unrouted"):
        for channel, n in getattr(c, name).items():
            got_counts[f"{name}:{channel}"] += n
    for reason, n in c.skipped.items():
        got_counts[f"skip:{reason}"] += n
    assert +got_counts == +want_counts
    assert pipeline.sequencer.snapshot() == seq.snapshot()
    assert len(pipeline.dedup) == len(dedup) and pipeline.dedup.evicted == dedup.evicted


def test_records_are_tuples_with_named_fields() -> None:
    record = OutRecord("t", b"SPY", b"{}", "trades")
    assert (record.topic, record.key, record.value, record.channel) == (
        "t",
        b"SPY",
        b"{}",
        "trades",
    )
    assert OutRecord(*("t", b"SPY", b"{}"), "trades") == record
    items: list[Any] = [DataItem("trades", 'A"B', "2026-01-05T14:30:00.000000000Z", {"p": 1.5})]
    pipeline = EventPipeline(TOPICS, DedupCache(5.0, 10), BarFinalizer(10.0))
    (out,) = pipeline.process(items, INGEST, 0.0)
    envelope = orjson.loads(out.value)
    assert envelope["symbol"] == 'A"B' and envelope["key"].startswith('trades:A"B:')
    assert not math.isnan(envelope["payload"]["p"])
