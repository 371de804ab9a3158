"""The Kafka side: one idempotent aiokafka producer that takes whole batches.

`KafkaSink.send_batch` enqueues a batch's records under a lock (so batches from one shard
land in the order they were submitted) and then waits for every acknowledgement; it
returns only when Kafka has all of them (acks=all), so the caller may forget the batch.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ray_forwarder.config import Settings

log = logging.getLogger(__name__)

WireRecord = tuple[str, bytes, bytes]


class KafkaStartError(RuntimeError):
    """The producer could not connect; the message is safe to show (no secrets)."""


@dataclass
class SinkStats:
    ready: bool = False
    batches: int = 0
    records: int = 0
    errors: int = 0
    last_error: str | None = None


def producer_options(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for the settings (idempotent, acks=all, compression)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": "ray-forwarder",
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": settings.producer_linger_ms,
        "compression_type": None
        if settings.kafka_compression == "none"
        else settings.kafka_compression,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
    }
    protocol = settings.kafka_auth_protocol
    options["security_protocol"] = protocol
    if settings.kafka_username:
        assert settings.kafka_password is not None
        options["sasl_mechanism"] = settings.kafka_mechanism
        options["sasl_plain_username"] = settings.kafka_username
        options["sasl_plain_password"] = settings.kafka_password.get_secret_value()
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context()
    return options


class KafkaSink:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._order = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self.stats = SinkStats()

    async def start(self) -> None:
        """Connect; raise KafkaStartError with a clear, secret-free message on failure."""
        producer = AIOKafkaProducer(**producer_options(self._settings))
        try:
            with _ClientErrors() as client_errors:
                await producer.start()
        except Exception as exc:
            await _quietly_stop(producer)
            # aiokafka reports SASL failures only in its log and then raises a generic
            # "unable to bootstrap"; surface the real cause.
            self.stats.last_error = client_errors.most_telling() or describe_kafka_error(exc)
            raise KafkaStartError(
                f"cannot connect to Kafka at {self._settings.kafka_bootstrap_servers} "
                f"({self._settings.kafka_auth_protocol}"
                + (
                    f", user {self._settings.kafka_username}"
                    if self._settings.kafka_username
                    else ""
                )
                + f"): {self.stats.last_error}"
            ) from None
        try:
            await self._warm_up(producer)
        except Exception:
            await _quietly_stop(producer)
            raise
        self._producer = producer
        self.stats.ready = True
        log.info("kafka producer connected to %s", self._settings.kafka_bootstrap_servers)

    async def _warm_up(self, producer: AIOKafkaProducer) -> None:
        """Learn every topic's partitions before the first record.

        Besides failing early and clearly on a missing topic, this keeps a topic's first
        batches from racing its (auto-)creation, when partition leaders are still moving.
        """
        from ray_forwarder.topics import topic_map

        for topic in sorted(set(topic_map(self._settings).values())):
            try:
                partitions = await asyncio.wait_for(
                    producer.partitions_for(topic), self._settings.kafka_request_timeout_ms / 1000
                )
            except Exception as exc:
                raise KafkaStartError(
                    f"topic {topic} is not available on {self._settings.kafka_bootstrap_servers}"
                    f" ({describe_kafka_error(exc)}); create it or allow auto-creation"
                ) from None
            if not partitions:
                raise KafkaStartError(f"topic {topic} has no partitions")

    async def send_batch(self, records: Sequence[WireRecord]) -> int:
        """Send a batch in order and wait until Kafka acknowledged all of it."""
        producer = self._producer
        if producer is None:
            raise KafkaStartError("producer is not started")
        try:
            async with self._order:
                futures = [
                    await producer.send(topic, value=value, key=key)
                    for topic, key, value in records
                ]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            self.stats.errors += 1
            self.stats.last_error = describe_kafka_error(exc)
            self._discard_producer(producer, exc)
            raise
        self.stats.batches += 1
        self.stats.records += len(records)
        return len(records)

    def _discard_producer(self, producer: AIOKafkaProducer, cause: KafkaError) -> None:
        """After a failed delivery the idempotent producer's sequence numbers may no longer
        match the broker's (seen after a broker restart: OutOfOrderSequenceNumber forever).
        Drop it; the next batch starts a fresh producer with a new producer id, and the
        shard re-sends what was not acknowledged."""
        if self._producer is not producer:
            return  # another batch already discarded it
        self._producer = None
        # Fail every record still queued in it, instead of letting stop() flush them: a
        # later batch delivered after an earlier one failed would overtake it in Kafka
        # (seen when one batch expired during a broker outage and the next one did not).
        # aiokafka has no public "abort", so this reaches into its accumulator.
        try:
            producer._message_accumulator.fail_all(cause)
        except Exception:  # a different aiokafka version: fall back to a plain stop
            log.warning("could not abort the discarded producer's queue", exc_info=True)
        self.stats.ready = False
        task = asyncio.create_task(_stop_within(producer, 5.0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        self.stats.ready = False


def describe_kafka_error(exc: BaseException) -> str:
    name = type(exc).__name__
    text = (str(exc) or name).splitlines()[0][:300]
    return text if text.startswith(name) else f"{name}: {text}"


class _ClientErrors(logging.Handler):
    """Collects aiokafka's own error log lines while the producer starts."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _ClientErrors:
        logging.getLogger("aiokafka").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("aiokafka").removeHandler(self)

    def most_telling(self) -> str | None:
        for message in self.messages:
            if "Authentication" in message or "SaslAuthenticationFailed" in message:
                return "SASL authentication failed: " + message.split(": ", 1)[-1][:300]
        return None


async def _stop_within(producer: AIOKafkaProducer, seconds: float) -> None:
    try:
        await asyncio.wait_for(_quietly_stop(producer), seconds)
    except TimeoutError:
        log.warning("discarded Kafka producer did not stop within %.0fs", seconds)


async def _quietly_stop(producer: AIOKafkaProducer) -> None:
    try:
        await producer.stop()
    except Exception:  # already broken; the start error is what matters
        log.debug("producer stop after failed start raised", exc_info=True)
