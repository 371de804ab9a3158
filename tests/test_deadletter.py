"""Records Kafka can never accept do not block their lane: they go to the dead-letter topic
(or, refused there too, are dropped and counted) while everything else lands in order."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections import defaultdict

import orjson
import pytest

from ray_forwarder.config import load_settings
from ray_forwarder.core.deadletter import (
    DEAD_LETTER_CHANNEL,
    InvalidRecordError,
    dead_letter_value,
    refusal_reason,
)
from ray_forwarder.core.pipeline import OutRecord
from ray_forwarder.runtime.outbox import BatchLimits, Lane, Outbox, RecordsRefused
from ray_forwarder.runtime.producer import KafkaSink, request_options
from tests.kafka_fixture import ConsumedRecord, consume_all, create_topics

SYMBOLS = ("SPY", "QQQ", "AAPL", "MSFT")
NORMAL_RECORDS = 400
POISON_AFTER = 150  # the oversized record comes after this many normal ones
TOPIC_MAX_MESSAGE_BYTES = 50_000  # all normal records together stay below it


def _record(topic: str, n: int) -> OutRecord:
    symbol = SYMBOLS[n % len(SYMBOLS)]
    return OutRecord(topic, symbol.encode(), orjson.dumps({"s": symbol, "n": n}), "trades")


def _poison(topic: str) -> OutRecord:
    """Below MAX_RECORD_BYTES, above the topic's max.message.bytes, and incompressible."""
    pad = base64.b64encode(os.urandom(150_000)).decode()
    return OutRecord(topic, b"QQQ", orjson.dumps({"s": "QQQ", "n": -1, "pad": pad}), "trades")


def _limits(dead_letter_topic: str | None, **overrides) -> BatchLimits:
    values = dict(
        max_events=10_000, batch_max_events=40, batch_max_ms=5, max_in_flight=4,
        retry_delay=0.05, dead_letter_topic=dead_letter_topic,
    )  # fmt: skip
    values.update(overrides)
    return BatchLimits(**values)


async def _feed(outbox: Outbox, topic: str) -> None:
    """Normal traffic on several symbols, the poison record in the middle of it."""
    for n in range(NORMAL_RECORDS):
        if n == POISON_AFTER:
            outbox.put([_poison(topic)], received=0.0)
        outbox.put([_record(topic, n)], received=0.0)
        if n % 20 == 0:
            await asyncio.sleep(0.01)  # batches are in flight when the poison arrives


def _assert_every_normal_record_landed_in_order(records: list[ConsumedRecord]) -> None:
    first_seen: dict[str, list[int]] = defaultdict(list)
    seen: set[int] = set()
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = orjson.loads(record.value)
        assert value["n"] != -1, "the oversized record reached its topic"
        assert record.key == value["s"].encode()
        if value["n"] not in seen:  # re-sent batches may repeat records (at-least-once)
            seen.add(value["n"])
            first_seen[value["s"]].append(value["n"])
    assert seen == set(range(NORMAL_RECORDS))
    for symbol, numbers in first_seen.items():
        assert numbers == sorted(numbers), f"order differs for {symbol}"


async def _topics(kafka_broker, kafka_topics, dead_letter_config=None) -> tuple[str, str]:
    trades, dead = kafka_topics("trades"), kafka_topics("deadletter")
    bootstrap = kafka_broker.bootstrap_servers
    await create_topics(
        [trades],
        configs={"max.message.bytes": str(TOPIC_MAX_MESSAGE_BYTES)},
        bootstrap_servers=bootstrap,
    )
    await create_topics([dead], configs=dead_letter_config, bootstrap_servers=bootstrap)
    return trades, dead


@pytest.mark.usefixtures("ray_session")
async def test_an_oversized_record_goes_to_the_dead_letters_and_the_lane_keeps_flowing(
    kafka_broker, kafka_topics
) -> None:
    """Through a real producer actor: the broker refuses one record (its topic's
    max.message.bytes); every other record lands in order, the refused one is in the
    dead-letter topic with its reason, and the producer never reports Kafka as down."""
    from ray_forwarder.ray.actors import ProducerActor, _sender

    trades, dead = await _topics(kafka_broker, kafka_topics)
    settings = load_settings(
        kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
        topic_trades=trades,
        topic_deadletter=dead,
        producer_linger_ms=5,
    )
    producer = ProducerActor.options(name=f"dlq-test-{uuid.uuid4().hex[:8]}").remote(
        settings, "producer-0"
    )
    try:
        await producer.start.remote()
        # Two lanes on one producer, as two shards with PRODUCERS=1.
        outbox = Outbox([_sender(producer)] * 2, _limits(dead))
        runner = asyncio.create_task(outbox.run())
        ready_seen: list[bool] = []

        async def watch_ready() -> None:
            while not runner.done():
                ready_seen.append((await producer.stats.remote())["ready"])
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_ready())
        await _feed(outbox, trades)
        outbox.close()
        await asyncio.wait_for(runner, 60)
        await watcher
        stats = outbox.snapshot()
        producer_stats = await producer.stats.remote()
    finally:
        await producer.close.remote()
    assert stats.dead_lettered == {"message_too_large": 1}
    assert not stats.dead_letter_dropped and not stats.dropped_by_channel
    assert stats.batches_failed < 20, "the lane kept re-sending"
    assert stats.acked_by_channel["trades"] >= NORMAL_RECORDS
    assert stats.acked_by_channel[DEAD_LETTER_CHANNEL] == 1
    assert ready_seen and all(ready_seen), "the producer reported Kafka down for a bad record"
    assert producer_stats["refused"] >= 1 and producer_stats["ready"]

    landed = await consume_all(kafka_broker.bootstrap_servers, trades, NORMAL_RECORDS, settle=1)
    _assert_every_normal_record_landed_in_order(landed)
    letters = await consume_all(kafka_broker.bootstrap_servers, dead, 1, settle=1)
    assert letters, "nothing in the dead-letter topic"
    for letter in letters:  # a re-sent batch may repeat it, never another record
        document = orjson.loads(letter.value)
        assert letter.key == b"QQQ"
        assert document["reason"] == "message_too_large"
        assert "MessageSizeTooLarge" in document["detail"]
        assert document["topic"] == trades and document["truncated"] is True
        assert document["envelope_head"].startswith('{"s":"QQQ","n":-1,')


async def test_a_dead_letter_refused_too_is_dropped_and_counted(kafka_broker, kafka_topics) -> None:
    trades, dead = await _topics(
        kafka_broker, kafka_topics, dead_letter_config={"max.message.bytes": "2000"}
    )
    sink = KafkaSink(
        load_settings(
            kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
            topic_trades=trades,
            topic_deadletter=dead,
            producer_linger_ms=5,
        )
    )
    await sink.start()
    try:
        outbox = Outbox([sink.send_batch], _limits(dead))
        runner = asyncio.create_task(outbox.run())
        await _feed(outbox, trades)
        outbox.close()
        await asyncio.wait_for(runner, 60)
    finally:
        await sink.stop()
    stats = outbox.snapshot()
    assert stats.dead_letter_dropped == {"message_too_large": 1}
    assert stats.dead_lettered == {"message_too_large": 1}  # diverted, then refused there
    landed = await consume_all(kafka_broker.bootstrap_servers, trades, NORMAL_RECORDS, settle=1)
    _assert_every_normal_record_landed_in_order(landed)
    assert await consume_all(kafka_broker.bootstrap_servers, dead, idle_timeout=2) == []


async def test_refused_records_are_named_and_batch_mates_only_suspected(
    kafka_broker, kafka_topics
) -> None:
    """The broker refuses a whole Kafka batch; only a record sent alone is the culprit."""
    trades, dead = await _topics(kafka_broker, kafka_topics)
    sink = KafkaSink(
        load_settings(
            kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
            topic_trades=trades,
            topic_deadletter=dead,
        )
    )
    await sink.start()
    poison = _poison(trades)
    batch = [(r.topic, r.key, r.value) for r in (_record(trades, 1), poison)]
    try:
        with pytest.raises(RecordsRefused) as shared:
            await sink.send_batch(batch)
        assert set(shared.value.refused) == {0, 1}
        # Re-sent with each record alone: only the poison one is refused.
        from ray_forwarder.runtime.outbox import Ticket

        with pytest.raises(RecordsRefused) as alone:
            await sink.send_batch(batch, Ticket("lane", 1, None, None, isolate=(0, 1)))
        assert alone.value.refused == {1: "message_too_large"}
        assert sink.stats.ready, "a refused record is no sign of a broken Kafka"
    finally:
        await sink.stop()
    landed = await consume_all(kafka_broker.bootstrap_servers, trades, 1, settle=1)
    assert {r.value for r in landed} == {batch[0][2]}


# --- without Kafka ----------------------------------------------------------------------


class Receiver:
    """Acknowledges every batch at once and keeps what it was given."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, bytes, bytes]] = []

    async def send(self, records, ticket) -> tuple[int, str]:
        self.delivered.extend(records)
        return len(records), "receiver"


async def test_a_record_above_max_record_bytes_never_enters_the_lane() -> None:
    receiver = Receiver()
    lane = Lane(receiver.send, _limits("dead", max_record_bytes=2000))
    runner = asyncio.create_task(lane.run())
    big = OutRecord("trades", b"SPY", orjson.dumps({"s": "SPY", "pad": "x" * 5000}), "trades")
    lane.put(_record("trades", 0), received=0.0)
    lane.put(big, received=0.0)
    assert lane.snapshot().buffered_bytes < 2000  # the big one was not buffered
    lane.put(_record("trades", 4), received=0.0)
    lane.close()
    await asyncio.wait_for(runner, 10)
    assert [topic for topic, _, _ in receiver.delivered] == ["trades", "dead", "trades"]
    _topic, key, value = receiver.delivered[1]
    letter = orjson.loads(value)
    assert key == b"SPY"
    assert letter["reason"] == "over_max_record_bytes" and letter["topic"] == "trades"
    assert letter["truncated"] is True and len(letter["envelope_head"]) <= 1000
    assert letter["bytes"] == len(big.key) + len(big.value)
    stats = lane.snapshot()
    assert stats.dead_lettered == {"over_max_record_bytes": 1}
    assert stats.acked_by_channel == {"trades": 2, DEAD_LETTER_CHANNEL: 1}


async def test_without_a_dead_letter_topic_an_oversized_record_is_dropped_and_counted() -> None:
    receiver = Receiver()
    lane = Lane(receiver.send, _limits(None, max_record_bytes=2000))
    runner = asyncio.create_task(lane.run())
    lane.put(OutRecord("trades", b"SPY", b"x" * 3000, "trades"), received=0.0)
    lane.put(_record("trades", 0), received=0.0)
    lane.close()
    await asyncio.wait_for(runner, 10)
    assert len(receiver.delivered) == 1
    assert lane.snapshot().dead_letter_dropped == {"over_max_record_bytes": 1}


def test_a_small_envelope_is_kept_whole_in_its_dead_letter() -> None:
    envelope = orjson.dumps({"channel": "trades", "symbol": "SPY", "seq": 7})
    letter = orjson.loads(dead_letter_value("t", b"SPY", envelope, "invalid_record", "why"))
    assert letter["envelope"] == orjson.loads(envelope) and letter["truncated"] is False


def test_only_errors_that_refuse_a_record_for_good_are_refusals() -> None:
    from aiokafka import errors

    assert refusal_reason(errors.MessageSizeTooLargeError()) == "message_too_large"
    assert refusal_reason(errors.TopicAuthorizationFailedError("t")) == (
        "topic_authorization_failed"
    )
    assert refusal_reason(errors.CorruptRecordException()) == "corrupt_record"
    assert errors.for_code(87) is InvalidRecordError  # aiokafka alone says UnknownError
    assert refusal_reason(errors.for_code(87)()) == "invalid_record"
    for retriable in (
        errors.KafkaTimeoutError(),
        errors.NotLeaderForPartitionError(),
        errors.UnknownError(),
        errors.KafkaConnectionError(),
    ):
        assert refusal_reason(retriable) is None


def test_the_producer_request_limit_leaves_room_for_the_largest_record() -> None:
    options = request_options(load_settings(max_record_bytes=4 * 1024 * 1024))
    assert options.kwargs["max_request_size"] > 4 * 1024 * 1024
    assert request_options(load_settings()).kwargs["max_request_size"] > 1024 * 1024


async def test_one_dead_letter_status_event_per_episode_and_counted_in_metrics(
    monkeypatch,
) -> None:
    """A ShardCore reading the real simulator (no Ray, no Kafka): oversized records put
    among its traffic are counted per reason in its stats and the driver's /metrics, with
    one `dead_letter` status event per episode, never one per record."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ray_forwarder.ops.http import SnapshotCollector
    from ray_forwarder.ray import shard as shard_module
    from ray_forwarder.ray.driver import plan_shards
    from ray_forwarder.ray.shard import ShardCore
    from ray_forwarder.ray.stats import ForwarderSnapshot
    from ray_forwarder_dev.sim import SimConfig, SimulatorThread
    from tests.forwarder_harness import SIM_KEY, SIM_SECRET

    monkeypatch.setattr(shard_module, "_DEAD_LETTER_EPISODE_S", 0.5)
    receiver = Receiver()

    def oversized() -> OutRecord:
        return OutRecord("alpaca.trades.v1", b"SPY", b"x" * 4096, "trades")

    async def until(check, what: str) -> None:
        for _ in range(400):
            if check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    config = SimConfig(symbols=list(SYMBOLS), rate=500, time_scale=600, total_events=1500,
                       keys={SIM_KEY: SIM_SECRET}, seed=5)  # fmt: skip
    with SimulatorThread(config) as sim:
        settings = load_settings(
            alpaca_api_key_id=SIM_KEY, alpaca_secret_key=SIM_SECRET, alpaca_stream_url=sim.url,
            alpaca_symbols=",".join(SYMBOLS), kafka_bootstrap_servers="127.0.0.1:9",
            max_record_bytes=2048, spool_max_bytes=0,
        )  # fmt: skip
        [spec] = plan_shards(settings)
        core = ShardCore(settings, spec, [receiver.send])
        runner = asyncio.create_task(core.run())
        try:
            await until(lambda: core.stats()["subscribed"], "the subscription")
            for _ in range(3):  # one episode, three records
                core.outbox.put([oversized()], received=0.0)
                await asyncio.sleep(0)
            await until(lambda: core.stats()["dead_lettering"], "the episode to open")
            core.outbox.put([oversized()], received=0.0)  # still the same episode
            await until(lambda: not core.stats()["dead_lettering"], "the episode to close")
            core.outbox.put([oversized()], received=0.0)  # a new episode
            await until(lambda: core.stats()["dead_lettering"], "the second episode")
        finally:
            assert await core.stop(10)
            await asyncio.wait_for(runner, 10)
    stats = core.stats()
    assert stats["dead_lettered"] == {"over_max_record_bytes": 5}
    status = [
        orjson.loads(value)["payload"]
        for topic, _key, value in receiver.delivered
        if topic == settings.topic_status
    ]
    episodes = [event for event in status if event["event"] == "dead_letter"]
    assert len(episodes) == 2, [event["event"] for event in status]
    assert episodes[0]["topic"] == settings.topic_deadletter
    assert episodes[0]["dead_lettered"]["over_max_record_bytes"] >= 1
    letters = [v for t, _k, v in receiver.delivered if t == settings.topic_deadletter]
    assert len(letters) == 5

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: ForwarderSnapshot(shards=[stats])))
    text = generate_latest(registry).decode()
    assert 'ray_forwarder_records_dead_lettered_total{reason="over_max_record_bytes"} 5.0' in text
    assert 'ray_forwarder_spool_lost_records_total{shard="' in text


def test_a_refusal_survives_the_trip_through_ray_from_the_producer_actor() -> None:
    """The lane tells a refusal from an outage by type and reads which records: both must
    survive pickling and Ray's wrapping of an actor's exception."""
    import pickle

    from ray.exceptions import RayTaskError

    sent = RecordsRefused({3: "message_too_large"}, "MessageSizeTooLargeError: [Error 10]")
    received = RayTaskError("send_batch", "traceback", pickle.loads(pickle.dumps(sent)))
    wrapped = received.as_instanceof_cause()
    assert isinstance(wrapped, RecordsRefused)
    assert wrapped.refused == {3: "message_too_large"} and "Error 10" in wrapped.detail
