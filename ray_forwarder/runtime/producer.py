"""The Kafka side: one idempotent aiokafka producer that takes whole batches.

`KafkaSink.send_batch` enqueues a batch's records under a lock (so batches from one shard
land in the order they were submitted) and then waits for every acknowledgement; it
returns only when Kafka has all of them (acks=all), so the caller may forget the batch.
When Kafka refuses records for good (`deadletter.refusal_reason`), it says which ones
(`RecordsRefused`), so that the lane can divert them instead of re-sending them forever.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import TopicPartition
from pydantic import SecretStr

from ray_forwarder.config import Settings
from ray_forwarder.core.deadletter import refusal_reason
from ray_forwarder.runtime.kafka_lz4 import use_fast_lz4
from ray_forwarder.runtime.kafka_tls import (
    KafkaTlsError,
    client_certificate_hint,
    describe_handshake_failure,
    ssl_context,
)
from ray_forwarder.runtime.outbox import RecordsRefused, StaleProducerError, Ticket
from ray_forwarder.runtime.partitioning import (
    KeyPartitioner,
    Run,
    partition_packed,
    split_by_partition,
)
from ray_forwarder.runtime.wire import PackedBatch, WireRecord

log = logging.getLogger(__name__)

#: aiokafka's own default `max_request_size`.
DEFAULT_MAX_REQUEST_SIZE = 1024 * 1024
#: What a record costs in a produce request besides its key and value (record and batch
#: headers, varints); `MAX_RECORD_BYTES` + this must fit the producer's `max_request_size`.
RECORD_OVERHEAD_BYTES = 1024


class KafkaStartError(RuntimeError):
    """The producer could not connect; the message is safe to show (no secrets)."""


@dataclass
class SinkStats:
    ready: bool = False
    batches: int = 0
    records: int = 0
    errors: int = 0
    refused: int = 0  # records Kafka refused for good (reported to the shard to divert)
    last_error: str | None = None


@dataclass(frozen=True)
class ProducerOptions:
    """aiokafka producer settings that are safe to log: the SASL password is kept apart (a
    SecretStr, masked in every repr) and joins the keyword arguments only inside
    `create_producer`, so no plain dict holding it is ever returned or kept.

    Deliberately not a Mapping: `AIOKafkaProducer(**options)` would silently drop the
    password; use `create_producer()`.
    """

    kwargs: Mapping[str, Any]
    sasl_password: SecretStr | None = field(default=None, repr=False)

    def create_producer(self) -> AIOKafkaProducer:
        if self.kwargs.get("compression_type") == "lz4":
            use_fast_lz4()  # Kafka's own default, not aiokafka's LZ4 HC (kafka_lz4.py)
        return AIOKafkaProducer(**self.kwargs, **self._secret())

    def create_admin(self) -> AIOKafkaAdminClient:
        """An admin client that connects exactly as the producers will (bootstrap,
        security, SASL, TLS): the options an admin client accepts, and the password."""
        accepted = inspect.signature(AIOKafkaAdminClient.__init__).parameters
        options = {k: v for k, v in self.kwargs.items() if k in accepted}
        return AIOKafkaAdminClient(**options, **self._secret())

    def with_options(self, **options: Any) -> ProducerOptions:
        return ProducerOptions(MappingProxyType({**self.kwargs, **options}), self.sasl_password)

    def _secret(self) -> dict[str, Any]:
        if self.sasl_password is None:
            return {}
        return {"sasl_plain_password": self.sasl_password.get_secret_value()}


def request_options(settings: Settings) -> ProducerOptions:
    """`producer_options` plus a `max_request_size` that fits `MAX_RECORD_BYTES`.

    The record limit is checked before buffering, so that a record aiokafka would refuse
    in `send()` never reaches it; raises KafkaStartError if the options set a smaller one.
    """
    options = producer_options(settings)
    needed = settings.max_record_bytes + RECORD_OVERHEAD_BYTES
    size = options.kwargs.get("max_request_size", max(DEFAULT_MAX_REQUEST_SIZE, needed))
    if size < needed:
        raise KafkaStartError(
            f"MAX_RECORD_BYTES ({settings.max_record_bytes}) must stay below the producer's "
            f"max_request_size ({size}) by {RECORD_OVERHEAD_BYTES}"
        )
    return options.with_options(max_request_size=size)


def producer_options(settings: Settings) -> ProducerOptions:
    """aiokafka settings (idempotent, acks=all, compression, SASL and TLS) for `settings`.

    Raises KafkaTlsError (one line naming the variable) when a TLS file cannot be loaded
    here, e.g. not mounted on this node.
    """
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
    password: SecretStr | None = None
    if settings.kafka_username:
        assert settings.kafka_password is not None
        options["sasl_mechanism"] = settings.kafka_mechanism
        options["sasl_plain_username"] = settings.kafka_username
        password = settings.kafka_password
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl_context(settings.kafka_tls)
    return ProducerOptions(MappingProxyType(options), password)


class LaneOrder:
    """Admits each lane's batches in the order the lane numbered them (see `Ticket`).

    A batch that arrives before its predecessor waits on a future of its own, which the
    predecessor's admission resolves: with a lane's whole window (dozens of calls) in
    flight, waking every waiter on every admission cost a coroutine resumption per
    waiter and batch."""

    def __init__(self) -> None:
        self._admitted: dict[str, int] = {}
        #: (lane, number awaited) -> resolved once the lane admitted that number
        self._waiting: dict[tuple[str, int], asyncio.Future[None]] = {}

    async def wait_turn(self, ticket: Ticket, timeout_s: float) -> None:
        after = ticket.after
        if after is None or self._admitted.get(ticket.lane, -1) >= after:
            return  # nothing else in flight to this producer, or its predecessor is in
        key = (ticket.lane, after)
        turn = self._waiting.get(key)
        if turn is None:
            turn = self._waiting[key] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(turn), timeout_s)
        except TimeoutError:
            if self._waiting.get(key) is turn:
                del self._waiting[key]
            raise StaleProducerError(
                f"batch {after} of {ticket.lane} never arrived; re-send in order"
            ) from None

    async def admitted(self, ticket: Ticket) -> None:
        lane = ticket.lane
        previous = self._admitted.get(lane, -1)
        if ticket.number <= previous:
            return
        self._admitted[lane] = ticket.number
        waiting = self._waiting
        if not waiting:
            return
        if ticket.number - previous <= len(waiting):
            keys = [(lane, n) for n in range(previous + 1, ticket.number + 1)]
        else:  # the lane's numbers jumped (a re-send after a restart): look at the waiters
            keys = [key for key in waiting if key[0] == lane and key[1] <= ticket.number]
        for key in keys:
            turn = waiting.pop(key, None)
            if turn is not None and not turn.done():
                turn.set_result(None)


@dataclass(eq=False)
class _Incarnation:
    """One aiokafka producer and the fate it shares with every record queued in it."""

    producer: AIOKafkaProducer
    token: str  # what shards address: a batch for another token is refused unsent
    dead: asyncio.Future[None]
    cause: BaseException | None = None
    in_flight: set[_InFlight] = field(default_factory=set)
    partition_of: KeyPartitioner = field(default_factory=KeyPartitioner)
    feeds: dict[tuple[str, int], _PartitionFeed] = field(default_factory=dict)


@dataclass(eq=False)
class _InFlight:
    """One `send_batch` call's Kafka batches while it waits for their acks."""

    #: each Kafka batch's future and the indices (in the call's records) of its records
    batches: list[tuple[asyncio.Future[Any], list[int]]] = field(default_factory=list)
    #: Set when the producer is discarded: the records Kafka itself refused for good,
    #: index -> (reason, detail); the rest failed only because the producer was discarded.
    refused: dict[int, tuple[str, str]] = field(default_factory=dict)


class KafkaSink:
    """Sends whole batches through one idempotent producer, and fences failures.

    Per partition, aiokafka sends batches one at a time and in order, so records of one
    symbol land in order as long as none fails. When one does (a batch expired during a
    broker outage), every later record in the producer could still land and overtake it
    once the broker is back. So the first failed record aborts the whole producer at
    once: its queue is failed, its sender stops, and its token changes, so that batches
    still addressed to it are refused and the shard re-sends everything unacknowledged,
    oldest first, through a fresh producer.
    """

    def __init__(self, settings: Settings, name: str | None = None) -> None:
        self._settings = settings
        self._name = name or uuid.uuid4().hex[:12]
        self._generation = 0
        self._current: _Incarnation | None = None
        self._starting = asyncio.Lock()
        self._order = asyncio.Lock()
        self._lanes = LaneOrder()
        self._closing: set[asyncio.Task[None]] = set()
        self._max_request_size = DEFAULT_MAX_REQUEST_SIZE
        self.stats = SinkStats()

    @property
    def token(self) -> str:
        """Names the current producer generation; it changes whenever one is discarded."""
        return f"{self._name}.{self._generation}"

    @property
    def started(self) -> bool:
        return self._current is not None

    async def start(self) -> None:
        """Connect (once); raise KafkaStartError with a clear, secret-free message."""
        # A record limit the producer cannot take fails here, before connecting.
        try:
            self._max_request_size = request_options(self._settings).kwargs["max_request_size"]
        except KafkaTlsError as exc:  # e.g. the CA file is not mounted on this node
            self.stats.last_error = str(exc)
            raise KafkaStartError(f"{self._describe_target()}: {exc}") from None
        async with self._starting:
            if self._current is None:
                self._current = await self._connect()
                self.stats.ready = True

    async def _connect(self) -> _Incarnation:
        try:
            producer = request_options(self._settings).create_producer()
        except KafkaTlsError as exc:  # e.g. the CA file is not mounted on this node
            self.stats.last_error = str(exc)
            raise KafkaStartError(f"{self._describe_target()}: {exc}") from None
        try:
            with ClientErrors() as client_errors:
                await producer.start()
        except Exception as exc:
            await _quietly_stop(producer)
            # aiokafka reports SASL failures only in its log and then raises a generic
            # "unable to bootstrap"; surface the real cause.
            self.stats.last_error = client_errors.most_telling() or describe_kafka_error(exc)
            if self._settings.kafka_auth_protocol == "SSL":
                hint = client_certificate_hint(self._settings.kafka_tls, client_errors.messages)
                self.stats.last_error += hint or ""
            raise KafkaStartError(f"{self._describe_target()}: {self.stats.last_error}") from None
        try:
            await self._warm_up(producer)
        except Exception:
            await _quietly_stop(producer)
            raise
        log.info("kafka producer connected to %s", self._settings.kafka_bootstrap_servers)
        dead = asyncio.get_running_loop().create_future()
        return _Incarnation(producer, self.token, dead)

    def _describe_target(self) -> str:
        """`cannot connect to Kafka at HOSTS (PROTOCOL, user U)`: no password, ever."""
        settings = self._settings
        user = f", user {settings.kafka_username}" if settings.kafka_username else ""
        return (
            f"cannot connect to Kafka at {settings.kafka_bootstrap_servers} "
            f"({settings.kafka_auth_protocol}{user})"
        )

    async def _warm_up(self, producer: AIOKafkaProducer) -> None:
        """Learn every topic's partitions before the first record.

        Besides failing early and clearly on a missing topic, this keeps a topic's first
        batches from racing its (auto-)creation, when partition leaders are still moving.
        """
        from ray_forwarder.core.topics import routed_topics

        for topic in routed_topics(self._settings):
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

    async def send_batch(
        self, records: Sequence[WireRecord], ticket: Ticket | None = None
    ) -> tuple[int, str]:
        """Send a batch in order; return (count, token) once Kafka acknowledged all of it.

        With a ticket, the lane's batches are enqueued in the lane's order, and a batch
        addressed to a producer that was discarded meanwhile (`ticket.token`) is refused
        unsent (StaleProducerError), so that it cannot overtake the lane's earlier ones.
        """
        records = PackedBatch.pack(records)  # a lane's batch already is one
        if ticket is None:
            incarnation, delivered, flight = await self._enqueue(records, None, ())
        else:
            if ticket.token is not None and ticket.token != self.token:
                # Addressed to a producer that is gone (or to an earlier actor process,
                # whose admissions this one never saw): refuse at once, unsent.
                raise StaleProducerError("the Kafka producer was replaced; re-send in order")
            await self._lanes.wait_turn(ticket, self._admission_timeout_s)
            try:
                incarnation, delivered, flight = await self._enqueue(
                    records, ticket.token, ticket.isolate
                )
            finally:
                await self._lanes.admitted(ticket)
        try:
            if not incarnation.dead.done():
                await asyncio.wait((delivered, incarnation.dead), return_when=FIRST_COMPLETED)
        finally:
            incarnation.in_flight.discard(flight)
        if incarnation.dead.done():
            assert incarnation.cause is not None
            if flight.refused:
                refused = {index: reason for index, (reason, _) in flight.refused.items()}
                detail = next(iter(flight.refused.values()))[1]
                raise RecordsRefused(refused, detail)
            raise incarnation.cause
        self.stats.batches += 1
        self.stats.records += len(records)
        return len(records), incarnation.token

    @property
    def _admission_timeout_s(self) -> float:
        # Enqueueing the predecessor may itself wait up to a request timeout for room.
        return self._settings.kafka_request_timeout_ms / 1000 + 30.0

    async def _enqueue(
        self, records: PackedBatch, expected_token: str | None, isolate: Sequence[int]
    ) -> tuple[_Incarnation, asyncio.Future[None], _InFlight]:
        """Hand the records to aiokafka; the future resolves once Kafka acknowledged all.

        The records go as whole Kafka batches, one per partition (more when one fills),
        closed so that aiokafka sends them at once: the lane has already lingered for
        them, and a second linger here would hold every batch's ack back by as long.
        Records named in `isolate` go in a Kafka batch of their own, so that a refusal of
        that batch is theirs alone."""
        if expected_token is not None and expected_token != self.token:
            raise StaleProducerError("the Kafka producer was replaced; re-send in order")
        if self._current is None:
            await self.start()
        async with self._order:
            incarnation = self._current
            if incarnation is None or (
                expected_token is not None and expected_token != incarnation.token
            ):
                raise StaleProducerError("the Kafka producer was replaced; re-send in order")
            delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            flight = _InFlight()
            incarnation.in_flight.add(flight)
            acks = _Acks(self, incarnation, delivered)
            try:
                await self._hand_over_all(incarnation, records, isolate, flight, acks)
            finally:
                acks.enqueued()
        return incarnation, delivered, flight

    async def _hand_over_all(
        self,
        incarnation: _Incarnation,
        records: PackedBatch,
        isolate: Sequence[int],
        flight: _InFlight,
        acks: _Acks,
    ) -> None:
        """Split the records by partition and add them to each partition's feed, in order.

        A partition's feed hands its Kafka batches to aiokafka one after the other, so a
        partition's records keep the batch's order, isolated ones included."""
        if records.largest + RECORD_OVERHEAD_BYTES > self._max_request_size:
            for index, (_topic, key, value) in enumerate(records):
                size = len(key) + len(value)
                if size + RECORD_OVERHEAD_BYTES > self._max_request_size:  # its own fault
                    self._fail(incarnation, [(flight, [index])], MessageSizeTooLargeError(
                        f"the record is {size} bytes, above max_request_size"
                    ))  # fmt: skip
                    return
        producer = incarnation.producer
        partition_of = incarnation.partition_of
        try:
            for topic in records.topics:
                partition_of.use(topic, await producer.partitions_for(topic))
        except Exception as exc:  # no metadata for the topic: nothing was queued
            self._fail(incarnation, [(flight, list(range(len(records))))], exc)
            return
        if incarnation.dead.done():
            return
        feeds = incarnation.feeds
        if not isolate:  # the common case: one run per partition, read off the buffer
            for slot, indices in partition_packed(records, partition_of).items():
                feed = feeds.get(slot)
                if feed is None:
                    feed = feeds[slot] = _PartitionFeed(self, incarnation, *slot)
                feed.append_packed(records, indices, flight, acks)
                feed.start()
            return
        for slot, runs in split_by_partition(records, partition_of, frozenset(isolate)).items():
            feed = feeds.get(slot)
            if feed is None:
                feed = feeds[slot] = _PartitionFeed(self, incarnation, *slot)
            for run in runs:
                feed.append(records, run, flight, acks)
            feed.start()

    def _fail(
        self,
        incarnation: _Incarnation,
        parts: Sequence[tuple[_InFlight, list[int]]],
        exc: BaseException,
    ) -> None:
        """Records that could not be queued: abort the producer, as a failed ack would."""
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(exc)
        failed.exception()  # retrieved: `_note_refusals` and the abort speak for it
        for flight, indices in parts:
            flight.batches.append((failed, indices))
        self._abort(incarnation, exc)

    def _abort(self, incarnation: _Incarnation, cause: BaseException) -> None:
        """Discard a producer at its first failed record, before it can send anything more.

        This runs as a done-callback of the failed record's future, so it comes before
        aiokafka's sender gets back to draining the queue. After a failed delivery the
        idempotent producer's sequence numbers may no longer match the broker's either
        (seen after a broker restart: OutOfOrderSequenceNumber forever); a fresh one
        starts with a new producer id.
        """
        if incarnation.dead.done():
            return
        incarnation.cause = cause
        incarnation.dead.set_result(None)
        refusals = self._note_refusals(incarnation)
        self.stats.errors += 1
        self.stats.last_error = describe_kafka_error(cause)
        if self._current is incarnation:
            self._current = None
            self._generation += 1
            # A refused record says nothing about Kafka's health: the next batch starts a
            # fresh producer at once, so `ready` stays (no /healthz flap per poison record).
            self.stats.ready = self.stats.ready and refusals > 0
        log.warning(
            "kafka producer discarded after a failed delivery%s: %s",
            f" ({refusals} record(s) refused for good)" if refusals else "",
            self.stats.last_error,
        )
        producer = incarnation.producer
        # aiokafka has no public abort; this reaches into it. Failing the accumulator
        # fails queued and in-flight batches alike; cancelling the sender keeps retried
        # batches from being drained again.
        try:
            producer._message_accumulator.fail_all(cause)
            producer._sender.sender_task.cancel()
        except Exception:  # a different aiokafka version: fall back to a plain stop
            log.warning("could not abort the discarded producer's queue", exc_info=True)
        task = asyncio.ensure_future(_stop_within(producer, 5.0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _note_refusals(self, incarnation: _Incarnation) -> int:
        """Before the queue is failed wholesale: which records did Kafka itself refuse?

        Runs first thing in `_abort`, so every Kafka batch that has failed by now failed
        on Kafka's answer (aiokafka fails the batches of one produce response all at once,
        before any callback runs); the later ones fail only because of the abort."""
        count = 0
        for flight in incarnation.in_flight:
            for future, indices in flight.batches:
                if not future.done() or future.cancelled():
                    continue
                exc = future.exception()
                reason = refusal_reason(exc)
                if reason is not None and exc is not None:
                    for index in indices:
                        flight.refused[index] = (reason, describe_kafka_error(exc))
                    count += len(indices)
        self.stats.refused += count
        return count

    async def probe(self, timeout_s: float) -> None:
        """Ask Kafka for cluster metadata, off the send path; raises if it does not answer."""
        incarnation = self._current
        if incarnation is None:
            raise KafkaStartError("producer is not started")
        await asyncio.wait_for(incarnation.producer.client.fetch_all_metadata(), timeout_s)

    async def stop(self) -> None:
        incarnation, self._current = self._current, None
        if incarnation is not None:
            # Hand aiokafka what the feeds still hold; its stop() then flushes everything.
            feeding = [feed.task for feed in incarnation.feeds.values() if feed.task]
            await asyncio.gather(*feeding, return_exceptions=True)
            await incarnation.producer.stop()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self.stats.ready = False


class _Acks:
    """Counts one `send_batch` call's Kafka batches until all are acknowledged.

    The first failed Kafka batch aborts the producer from its future's done-callback;
    `delivered` resolves once the call has queued everything and each batch succeeded."""

    def __init__(
        self, sink: KafkaSink, incarnation: _Incarnation, delivered: asyncio.Future[None]
    ) -> None:
        self._sink = sink
        self._incarnation = incarnation
        self._delivered = delivered
        self._pending = 1  # the queueing itself, until `enqueued()`

    def expect(self) -> None:
        """One more Kafka batch to wait for; `watch` it once it is queued."""
        self._pending += 1

    def watch(self, future: asyncio.Future[Any]) -> None:
        future.add_done_callback(self._on_done)

    def enqueued(self) -> None:
        self._settle_one()

    def _on_done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self._sink._abort(self._incarnation, KafkaError("record send was cancelled"))
        elif (exc := future.exception()) is not None:
            self._sink._abort(self._incarnation, exc)
        else:
            self._settle_one()

    def _settle_one(self) -> None:
        self._pending -= 1
        if not self._pending and not self._delivered.done():
            self._delivered.set_result(None)


@dataclass(eq=False)
class _Pending:
    """A Kafka batch of one partition, filled while it waits for its turn in aiokafka."""

    builder: BatchBuilder
    #: per `send_batch` call with records in it: its flight, its acks, their indices
    parts: list[tuple[_InFlight, _Acks, list[int]]] = field(default_factory=list)

    def add(self, flight: _InFlight, acks: _Acks, index: int) -> None:
        self.indices_of(flight, acks).append(index)

    def indices_of(self, flight: _InFlight, acks: _Acks) -> list[int]:
        """The list of this batch's indices from `flight` (the call's Kafka batch count
        grows by one the first time)."""
        if not self.parts or self.parts[-1][0] is not flight:
            acks.expect()
            self.parts.append((flight, acks, []))
        return self.parts[-1][2]


class _PartitionFeed:
    """Hands one partition's Kafka batches to aiokafka one at a time, oldest first.

    aiokafka keeps at most one batch per partition queued behind the request in flight
    (`send_batch` waits for room), and the records that arrive meanwhile gather here in
    the next batch: each produce request carries what came in during the previous one,
    the batching a linger would give without waiting one out, and nothing in this actor
    waits for a partition's turn. Batches are closed when handed over, so that aiokafka
    sends them at once and never adds to them."""

    def __init__(
        self, sink: KafkaSink, incarnation: _Incarnation, topic: str, partition: int
    ) -> None:
        self._sink = sink
        self._incarnation = incarnation
        self._topic = topic
        self._partition = partition
        self._queue: deque[_Pending] = deque()
        self.task: asyncio.Task[None] | None = None

    def append(
        self, records: Sequence[WireRecord], run: Run, flight: _InFlight, acks: _Acks
    ) -> None:
        create = self._incarnation.producer.create_batch
        queue = self._queue
        if run.alone:  # in a Kafka batch of its own, between its neighbours
            if queue:
                queue[-1].builder.close()
            [index] = run.indices
            _, key, value = records[index]
            alone = _Pending(create())
            alone.builder.append(key=key, value=value, timestamp=None)
            alone.builder.close()
            alone.add(flight, acks, index)
            queue.append(alone)
            return
        tail = queue[-1] if queue else None
        for index in run.indices:
            _, key, value = records[index]
            if tail is None or tail.builder.append(key=key, value=value, timestamp=None) is None:
                tail = _Pending(create())  # the first record always fits
                tail.builder.append(key=key, value=value, timestamp=None)
                queue.append(tail)
            tail.add(flight, acks, index)

    def append_packed(
        self, records: PackedBatch, indices: list[int], flight: _InFlight, acks: _Acks
    ) -> None:
        """Append records (indices into `records`, in order) to the partition's open
        Kafka batch, and to new ones as each fills: the per-record work is two slices of
        the buffer and one append."""
        queue = self._queue
        tail = queue[-1] if queue else None
        if tail is None:
            tail = _Pending(self._incarnation.producer.create_batch())
            queue.append(tail)
        noted = tail.indices_of(flight, acks)
        append = tail.builder.append
        data, bounds = records.data, records.bounds
        for index in indices:
            start = 2 * index
            middle = bounds[start + 1]
            key, value = data[bounds[start] : middle], data[middle : bounds[start + 2]]
            if append(key=key, value=value, timestamp=None) is None:  # full (or closed)
                tail = _Pending(self._incarnation.producer.create_batch())
                tail.builder.append(key=key, value=value, timestamp=None)  # always fits
                queue.append(tail)
                noted = tail.indices_of(flight, acks)
                append = tail.builder.append
            noted.append(index)

    def start(self) -> None:
        if self._queue and (self.task is None or self.task.done()):
            self.task = asyncio.get_running_loop().create_task(self._feed())

    async def _feed(self) -> None:
        incarnation, queue = self._incarnation, self._queue
        producer = incarnation.producer
        while queue:
            if incarnation.dead.done():  # every waiting call fails with the producer
                queue.clear()
                return
            pending = queue.popleft()
            pending.builder.close()  # closed: sent at once, never added to by aiokafka
            try:
                shielded = await producer.send_batch(
                    pending.builder, self._topic, partition=self._partition
                )
            except Exception as exc:  # no room in time, or the producer failed meanwhile
                parts = [(f, indices) for p in (pending, *queue) for f, _, indices in p.parts]
                queue.clear()
                self._sink._fail(incarnation, parts, exc)
                return
            future = _queued_batch_future(producer, self._topic, self._partition, pending.builder)
            if future is None:
                future = shielded
            else:  # the shielded copy fails too; nobody else looks at it
                shielded.add_done_callback(_retrieve)
            for flight, acks, indices in pending.parts:
                flight.batches.append((future, indices))
                acks.watch(future)


def _queued_batch_future(
    producer: AIOKafkaProducer, topic: str, partition: int, builder: BatchBuilder
) -> asyncio.Future[Any] | None:
    """The future of the batch `send_batch` just queued, not the shielded copy it returns.

    Its done-callbacks run as soon as aiokafka fails the batch, one loop turn before the
    shielded copy's, and so before aiokafka's sender is woken to drain the partition's
    next batch: the abort then comes first, as it did with per-record futures. Reaches
    into aiokafka (right after `send_batch`, the batch is the last of its partition's
    queue); None if that does not hold, and the caller falls back to the shielded copy."""
    try:
        queue = producer._message_accumulator._batches.get(TopicPartition(topic, partition))
        batch = queue[-1] if queue else None
        if batch is not None and batch._builder is builder:
            return batch.future  # type: ignore[no-any-return]
    except Exception:  # a different aiokafka version
        log.debug("cannot reach aiokafka's queued batch", exc_info=True)
    return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def describe_kafka_error(exc: BaseException) -> str:
    name = type(exc).__name__
    text = (str(exc) or name).splitlines()[0][:300]
    return text if text.startswith(name) else f"{name}: {text}"


class ClientErrors(logging.Handler):
    """Collects aiokafka's own error log lines while a client starts: aiokafka logs why it
    could not connect (SASL, TLS) and then raises a generic "unable to bootstrap"."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> ClientErrors:
        logging.getLogger("aiokafka").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("aiokafka").removeHandler(self)

    def most_telling(self) -> str | None:
        for message in self.messages:
            if "Authentication" in message or "SaslAuthenticationFailed" in message:
                return "SASL authentication failed: " + message.split(": ", 1)[-1][:300]
            if tls := describe_handshake_failure(message):
                return tls
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
