"""The benchmark's latency accounting: percentiles, matching Kafka records to simulator
sends, and the simulator's opt-in send times. No Ray, no Kafka."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from websockets.asyncio.client import connect

from ray_forwarder.bench import (
    BenchResult,
    Delivery,
    envelope_key,
    format_row,
    item_key,
    match_deliveries,
    percentiles,
)
from ray_forwarder.envelope import dedup_key, encode_envelope, final_bar_key
from ray_forwarder.sim import SimConfig, Simulator


def test_percentiles_are_nearest_rank() -> None:
    assert percentiles([]) is None
    one = percentiles([0.5])
    assert one is not None and (one.min, one.p50, one.p99, one.max, one.count) == (
        0.5,
        0.5,
        0.5,
        0.5,
        1,
    )
    values = [i / 1000 for i in range(1000, 0, -1)]  # 1 ms .. 1000 ms, unsorted
    pct = percentiles(values)
    assert pct is not None
    assert pct.min == 0.001 and pct.max == 1.0 and pct.count == 1000
    assert pct.p50 == 0.5  # the 500th of 1000
    assert pct.p99 == 0.99  # the 990th of 1000
    small = percentiles([3.0, 1.0, 2.0])
    assert small is not None and small.p50 == 2.0 and small.p99 == 3.0


def test_match_uses_first_send_and_first_append() -> None:
    sent = [("a", 10.0), ("b", 10.5), ("a", 11.0), ("c", 12.0)]  # "a" re-sent (a duplicate)
    acked = [("a", 10.2), ("b", 10.9), ("b", 10.8), ("x", 13.0)]  # "b" twice, "x" unknown
    got = match_deliveries(sent, acked)
    assert got.sent == 3 and got.delivered == 2
    assert got.lost == 1  # "c"
    assert got.duplicates == 1 and got.unexpected == 1
    assert sorted(round(x, 6) for x in got.latencies) == [0.2, 0.3]
    assert got.first_sent == 10.0 and got.last_acked == 10.8
    assert got.rate == pytest.approx(2 / 0.8)


def test_match_of_nothing() -> None:
    got = match_deliveries([], [])
    assert (got.sent, got.delivered, got.lost, got.rate, got.latencies) == (0, 0, 0, 0.0, [])


def _envelope(item: dict, channel: str, *, is_final: bool, key: str | None = None) -> bytes:
    return encode_envelope(
        ingest_ts="2026-01-05T14:30:00.000001Z",
        event_ts=item["t"],
        channel=channel,
        symbol=item["S"],
        seq=1,
        payload=item,
        is_final=is_final,
        source="alpaca",
        key=key or dedup_key(channel, item["S"], item["t"], item),
    )


def test_envelope_matches_the_item_it_carries_whatever_the_key_order() -> None:
    trade = {"T": "t", "S": "SPY", "i": 7, "p": 590.1, "s": 100, "t": "2026-01-05T14:30:01Z"}
    reordered = dict(reversed(list(trade.items())))
    assert envelope_key(_envelope(reordered, "trades", is_final=True)) == item_key(trade)
    other = {**trade, "i": 8}
    assert envelope_key(_envelope(other, "trades", is_final=True)) != item_key(trade)


def test_forwarder_made_records_are_not_feed_items() -> None:
    bar = {"T": "b", "S": "SPY", "o": 1, "h": 2, "l": 1, "c": 2, "v": 9, "vw": 1.5, "n": 3,
           "t": "2026-01-05T14:30:00Z"}  # fmt: skip
    assert envelope_key(_envelope(bar, "bars", is_final=False)) == item_key(bar)
    final = _envelope(bar, "bars", is_final=True, key=final_bar_key("SPY", bar["t"]))
    assert envelope_key(final) is None
    status = orjson.loads(_envelope(bar, "bars", is_final=False))
    status.update(channel="status", symbol=None, source="forwarder")
    assert envelope_key(orjson.dumps(status)) is None


def test_row_flags_suspicious_numbers() -> None:
    result = BenchResult("ray S=1 P=1", events=10, seconds=1.0)
    result.delivery = Delivery(latencies=[-0.01, 0.02], sent=3, delivered=2, lost=1,
                               unexpected=1)  # fmt: skip
    result.create_time_records = 4
    row = format_row(result)
    assert "ray S=1 P=1" in row
    assert "1 records matched no sent item" in row
    assert "clocks disagree" in row
    assert "4 records lacked LogAppendTime" in row
    assert "-" in format_row(BenchResult("empty")).splitlines()[0]


@pytest.mark.parametrize("stamped", [True, False])
async def test_simulator_stamps_send_times_only_when_asked(stamped: bool) -> None:
    config = SimConfig(symbols=["SPY", "QQQ"], rate=None, total_events=200,
                       time_scale=600.0, record_send_times=stamped)  # fmt: skip
    before = time.time()
    async with Simulator(config) as sim:
        async with connect(sim.url) as ws:
            await ws.recv()  # connected
            await ws.send(orjson.dumps({"action": "auth", "key": "sim-key",
                                        "secret": "sim-secret"}).decode())  # fmt: skip
            await ws.recv()  # authenticated
            await ws.send(orjson.dumps({"action": "subscribe", "trades": ["*"]}).decode())
            assert await sim.wait_finished(10)
            await asyncio.sleep(0)
        records = sim.sent
    after = time.time()
    assert records
    if stamped:
        assert all(before <= r.sent_at <= after for r in records)
        assert [r.sent_at for r in records] == sorted(r.sent_at for r in records)
    else:
        assert all(r.sent_at == 0.0 for r in records)
