"""Where the previous forwarder run stopped, read back from the status topic at start.

A shard's graceful stop writes one `stopped` status record (keyed by shard id) naming its
last data item (`last`: a `core.gaps.Mark`). The next run's driver reads the tail of the
status topic once, before it creates the shards, and hands each shard the `last` of its
predecessor, so the shard opens a `stop_start` gap and backfills it. The status topic is
the one place that survives a deploy, a driver restart or a node loss, and it is already
keyed and ordered per shard. `last` also carries the gaps whose backfill the stop left
unfinished (`backlog`), which the next run submits again under their ids.

When a shard's latest status record is not a `stopped` one, the previous run ended without
a graceful stop (killed, crashed): where its data stopped is unknown, so the gap is opened
without a start and reported unfilled (`no_start`) rather than guessed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from ray_forwarder.config import Settings
from ray_forwarder.core.pipeline import SEQ_EPOCH_BITS

log = logging.getLogger(__name__)

#: Records read back per status-topic partition (the latest ones).
TAIL_RECORDS = 2000
READ_TIMEOUT_S = 15.0


def _status_records(
    values: Iterable[bytes | None], shard_ids: Iterable[str]
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(envelope, payload) of each well-formed status record of one of the shards, in
    topic order; anything else on the topic is passed over."""
    wanted = set(shard_ids)
    for value in values:
        try:
            envelope = orjson.loads(value or b"")
        except orjson.JSONDecodeError:
            continue
        if not isinstance(envelope, dict) or envelope.get("channel") != "status":
            continue
        payload = envelope.get("payload")
        if isinstance(payload, dict) and payload.get("shard") in wanted:
            yield envelope, payload


def last_words(values: Iterable[bytes | None], shard_ids: Iterable[str]) -> dict[str, Any]:
    """From status records in topic order: each shard's hand-over mark (its latest
    record is `stopped`), or `{}` (it has records, but did not stop gracefully)."""
    latest: dict[str, Any] = {}
    for _envelope, payload in _status_records(values, shard_ids):
        last = payload.get("last") if payload.get("event") == "stopped" else None
        latest[payload["shard"]] = last if isinstance(last, dict) else {}
    return latest


def last_epochs(values: Iterable[bytes | None], shard_ids: Iterable[str]) -> dict[str, int]:
    """Each shard's highest seq epoch in its status records (`seq >> SEQ_EPOCH_BITS`): a new
    run numbers from the next one, so seq keeps growing across a stop and start."""
    epochs: dict[str, int] = {}
    for envelope, payload in _status_records(values, shard_ids):
        seq = envelope.get("seq")
        if type(seq) is int and seq > 0:
            shard = payload["shard"]
            epochs[shard] = max(epochs.get(shard, 0), seq >> SEQ_EPOCH_BITS)
    return epochs


async def read_previous_run(
    settings: Settings, shard_ids: Iterable[str]
) -> tuple[dict[str, Any], dict[str, int]]:
    """Each shard's hand-over mark and highest seq epoch from earlier runs (see the module
    doc); empty when the topic holds nothing of theirs or cannot be read (logged: start
    goes on without)."""
    shard_ids = list(shard_ids)
    try:
        values = await asyncio.wait_for(_tail(settings), READ_TIMEOUT_S)
    except Exception as exc:  # never a reason not to start
        log.warning("could not read the status topic for hand-over marks: %s",
                    type(exc).__name__)  # fmt: skip
        return {}, {}
    return last_words(values, shard_ids), last_epochs(values, shard_ids)


async def read_handover_marks(settings: Settings, shard_ids: Iterable[str]) -> dict[str, Any]:
    """Each shard's hand-over mark from the previous run (`read_previous_run`)."""
    marks, _epochs = await read_previous_run(settings, shard_ids)
    return marks


async def _tail(settings: Settings) -> list[bytes | None]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from ray_forwarder.runtime.producer import producer_options

    options = producer_options(settings)
    accepted = inspect.signature(AIOKafkaConsumer.__init__).parameters
    kwargs = {k: v for k, v in options.kwargs.items() if k in accepted and k != "client_id"}
    if options.sasl_password is not None:
        kwargs["sasl_plain_password"] = options.sasl_password.get_secret_value()
    consumer = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, client_id="ray-forwarder-resume", **kwargs
    )
    await consumer.start()
    try:
        topic = settings.topic_status
        # `topics()` keeps the metadata it fetched to itself; this is the same request
        # (all topics: naming one could auto-create it on a broker that allows that).
        cluster = await consumer._client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(begins[tp], ends[tp] - TAIL_RECORDS))
        out: list[bytes | None] = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in tps]
            if all(position >= ends[tp] for position, tp in zip(positions, tps, strict=True)):
                break
            batches = await consumer.getmany(*tps, timeout_ms=200)
            for records in batches.values():
                out.extend(record.value for record in records)
        return out
    finally:
        await consumer.stop()
