"""Per-run topics (with the broker's append time as record timestamp) and reading them back."""

from __future__ import annotations

import time
from collections.abc import Iterable

from ray_forwarder.core.topics import ensure_topics
from ray_forwarder_dev.bench.accounting import envelope_key

DATA_TOPICS = ("trades", "quotes", "bars")
TOPIC_CONFIGS = {"message.timestamp.type": "LogAppendTime"}
TOPIC_PARTITIONS = 3
_LOG_APPEND_TIME = 1  # aiokafka's ConsumerRecord.timestamp_type for LogAppendTime


def topic_env(prefix: str) -> dict[str, str]:
    """TOPIC_* variables giving a run fresh topics under `prefix`."""
    names = {name: f"{prefix}.{name}" for name in (*DATA_TOPICS, "status", "other")}
    return {
        "TOPIC_TRADES": names["trades"],
        "TOPIC_QUOTES": names["quotes"],
        "TOPIC_BARS": names["bars"],
        "TOPIC_STATUS": names["status"],
        "TOPIC_DAILY_BARS": names["other"],
        "TOPIC_STATUSES": names["other"],
        "TOPIC_LULDS": names["other"],
        "TOPIC_IMBALANCES": names["other"],
        "TOPIC_TRADE_UPDATES": names["other"],
    }


async def create_topics(bootstrap: str, prefix: str) -> list[str]:
    names = sorted(set(topic_env(prefix).values()))
    await ensure_topics(bootstrap, names, partitions=TOPIC_PARTITIONS, configs=TOPIC_CONFIGS)
    return names


async def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(names))
    finally:
        await admin.close()


async def read_back(
    bootstrap: str, topics: Iterable[str], timeout: float = 120.0
) -> tuple[list[tuple[str, float]], int]:
    """(item key, append time in s) for every feed record in the topics, read up to the end
    offsets as of now, plus the number of records that carry no LogAppendTime."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    acked: list[tuple[str, float]] = []
    create_time = 0
    try:
        await consumer.topics()  # refreshes the metadata
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or range(TOPIC_PARTITIONS))
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        pending = {tp for tp in partitions if ends[tp] > 0}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            batches = await consumer.getmany(*pending, timeout_ms=500)
            for tp, messages in batches.items():
                for msg in messages:
                    if msg.timestamp_type != _LOG_APPEND_TIME:
                        create_time += 1
                        continue
                    key = envelope_key(msg.value)
                    if key is not None:
                        acked.append((key, msg.timestamp / 1000))
                if messages and messages[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
        if pending:
            raise TimeoutError(f"could not read back {sorted(map(str, pending))} in {timeout}s")
    finally:
        await consumer.stop()
    return acked, create_time
