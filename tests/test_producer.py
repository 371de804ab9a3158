"""The Kafka sink against the real broker: batches in order, SCRAM right and wrong."""

from __future__ import annotations

import time

import orjson
import pytest

from ray_forwarder.config import load_settings
from ray_forwarder.producer import KafkaSink, KafkaStartError, producer_options
from tests.kafka_fixture import consume_all


def test_producer_options_are_idempotent_acks_all_and_compressed() -> None:
    options = producer_options(load_settings(producer_linger_ms=7))
    assert options["enable_idempotence"] is True
    assert options["acks"] == "all"
    assert options["linger_ms"] == 7
    assert options["compression_type"] == "lz4"


async def test_batches_arrive_in_order_with_symbol_keys(kafka_broker, kafka_topics) -> None:
    topic = kafka_topics("trades")
    sink = KafkaSink(load_settings(kafka_bootstrap_servers=kafka_broker.bootstrap_servers))
    await sink.start()
    try:
        for batch_no in range(5):
            batch = [
                (topic, symbol.encode(), orjson.dumps({"n": batch_no * 100 + i, "s": symbol}))
                for i in range(100)
                for symbol in ("SPY", "QQQ")
            ]
            assert await sink.send_batch(batch) == 200
    finally:
        await sink.stop()
    records = await consume_all(kafka_broker.bootstrap_servers, topic, expected_count=1000)
    assert len(records) == 1000
    by_partition: dict[int, list[dict]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = orjson.loads(record.value)
        assert record.key == value["s"].encode()
        by_partition.setdefault(record.partition, []).append(value)
    for values in by_partition.values():
        for symbol in ("SPY", "QQQ"):
            numbers = [v["n"] for v in values if v["s"] == symbol]
            assert numbers == sorted(numbers)


async def test_scram_sha_512_with_the_right_password(kafka_broker, kafka_topics) -> None:
    if kafka_broker.sasl_bootstrap_servers is None:
        pytest.fail("this test needs the local broker's SCRAM listener")
    topic = kafka_topics("scram")
    settings = load_settings(
        kafka_bootstrap_servers=kafka_broker.sasl_bootstrap_servers,
        kafka_username=kafka_broker.username,
        kafka_password=kafka_broker.password,
    )
    assert settings.kafka_auth_protocol == "SASL_PLAINTEXT"
    sink = KafkaSink(settings)
    await sink.start()
    try:
        await sink.send_batch([(topic, b"SPY", b"{}")])
    finally:
        await sink.stop()
    records = await consume_all(kafka_broker.bootstrap_servers, topic, expected_count=1)
    assert [r.value for r in records] == [b"{}"]


async def test_scram_with_a_wrong_password_fails_clearly(kafka_broker) -> None:
    if kafka_broker.sasl_bootstrap_servers is None:
        pytest.fail("this test needs the local broker's SCRAM listener")
    wrong = "definitely-not-the-password"
    sink = KafkaSink(
        load_settings(
            kafka_bootstrap_servers=kafka_broker.sasl_bootstrap_servers,
            kafka_username=kafka_broker.username,
            kafka_password=wrong,
            kafka_request_timeout_ms=5000,
        )
    )
    started = time.monotonic()
    with pytest.raises(KafkaStartError) as info:
        await sink.start()
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert kafka_broker.sasl_bootstrap_servers in message
    assert kafka_broker.username in message
    assert wrong not in message
    assert "auth" in message.lower()
