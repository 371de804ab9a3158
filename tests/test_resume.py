"""Hand-over marks read back from a real Kafka status topic (`runtime/resume.py`)."""

from __future__ import annotations

import orjson
from aiokafka import AIOKafkaProducer

from ray_forwarder.config import load_settings
from ray_forwarder.runtime.resume import read_handover_marks
from tests.kafka_fixture import create_topics


def _status(shard: str, event: str, **body: object) -> bytes:
    payload = {"event": event, "shard": shard, **body}
    return orjson.dumps({"channel": "status", "source": "forwarder", "payload": payload})


async def test_the_previous_runs_last_words_are_read_back(kafka_broker, kafka_topics) -> None:
    topic = kafka_topics("status")
    await create_topics([topic], partitions=3, **kafka_broker.client_kwargs())
    mark = {"received_at": "2026-11-27T10:00:05.000000Z",
            "event_ts": "2026-01-05T14:30:05.000000000Z"}  # fmt: skip
    producer = AIOKafkaProducer(**kafka_broker.client_kwargs())
    await producer.start()
    try:
        for shard, event, body in [
            ("stocks-0", "connected", {}),
            ("stocks-0", "stopped", {"last": mark}),
            ("stocks-1", "stopped", {"last": mark}),
            ("stocks-1", "subscribed", {}),  # a later run that was killed
        ]:
            await producer.send_and_wait(topic, _status(shard, event, **body), key=shard.encode())
    finally:
        await producer.stop()
    settings = load_settings(kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
                             topic_status=topic)  # fmt: skip
    marks = await read_handover_marks(settings, ["stocks-0", "stocks-1", "stocks-2"])
    assert marks == {"stocks-0": mark, "stocks-1": {}}
    empty = load_settings(kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
                          topic_status=kafka_topics("never-created"))  # fmt: skip
    assert await read_handover_marks(empty, ["stocks-0"]) == {}
