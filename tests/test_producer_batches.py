"""The producer's Kafka batches against the real broker: no second linger, order kept
when a partition's records span several Kafka batches and several concurrent calls."""

from __future__ import annotations

import asyncio
import time

import orjson

from ray_forwarder.config import load_settings
from ray_forwarder.runtime.producer import KafkaSink
from tests.kafka_fixture import consume_all, create_topics


async def test_a_batch_is_acknowledged_without_waiting_out_the_linger(
    kafka_broker, kafka_topics
) -> None:
    """The lane has already lingered for a batch; the producer must not linger on it again
    (with 4 batches in flight, a 50 ms linger per batch capped a lane near 24k records/s)."""
    topic = kafka_topics("trades")
    await create_topics([topic], bootstrap_servers=kafka_broker.bootstrap_servers)
    linger_s = 10.0
    sink = KafkaSink(
        load_settings(
            kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
            producer_linger_ms=int(linger_s * 1000),
        )
    )
    await sink.start()
    try:
        await sink.send_batch([(topic, b"SPY", b"warm-up")])  # metadata, producer id
        started = time.monotonic()
        count, _token = await sink.send_batch([(topic, b"QQQ", b"{}"), (topic, b"SPY", b"{}")])
        elapsed = time.monotonic() - started
    finally:
        await sink.stop()
    assert count == 2
    assert elapsed < linger_s * 0.8, f"acknowledged after {elapsed:.1f}s: it lingered"


async def test_partitions_spanning_many_kafka_batches_and_calls_keep_their_order(
    kafka_broker, kafka_topics
) -> None:
    """Records of a partition that fill several Kafka batches (256 KiB each), from calls
    that overlap, land in call order and, within a call, in batch order."""
    trades, quotes = kafka_topics("trades"), kafka_topics("quotes")
    await create_topics([trades, quotes], bootstrap_servers=kafka_broker.bootstrap_servers)
    sink = KafkaSink(load_settings(kafka_bootstrap_servers=kafka_broker.bootstrap_servers))
    symbols = [b"SPY", b"QQQ", b"AAPL", b"MSFT", b"TSLA"]
    padding = "x" * 900
    calls, per_call = 6, 600

    def batch(call: int) -> list[tuple[str, bytes, bytes]]:
        return [
            (
                trades if n % 3 else quotes,
                symbol,
                orjson.dumps({"call": call, "n": n, "s": symbol.decode(), "pad": padding}),
            )
            for n in range(per_call)
            for symbol in symbols
        ]

    await sink.start()
    try:
        results = await asyncio.gather(*(sink.send_batch(batch(call)) for call in range(calls)))
    finally:
        await sink.stop()
    assert [count for count, _ in results] == [per_call * len(symbols)] * calls
    total = calls * per_call * len(symbols)
    records = await consume_all(kafka_broker.bootstrap_servers, [trades, quotes], total)
    assert len(records) == total
    by_stream: dict[tuple[str, bytes], list[tuple[int, int]]] = {}
    for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        value = orjson.loads(record.value)
        assert record.key == value["s"].encode()
        by_stream.setdefault((record.topic, record.key), []).append((value["call"], value["n"]))
    assert len(by_stream) == 2 * len(symbols)
    for order in by_stream.values():
        assert order == sorted(order)
