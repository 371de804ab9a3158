"""The shard's outbound side: bounded buffers the read loop appends to, and ordered,
windowed senders that ship size- and time-bounded batches to the producer actors.

The read loop never awaits anything here: `put()` is synchronous. Each record goes to the
lane of its producer, chosen by a stable hash of the record key (the symbol), so a symbol
always goes to the same producer and per-symbol order holds through a pool of producers.
In a lane, batches leave in arrival order with at most `max_in_flight` unacknowledged. When
a send fails (producer actor gone, Kafka unavailable), the lane waits for everything in
flight to settle and re-sends every unacknowledged batch, oldest first, before anything
newer: at-least-once, in order.

A lane's memory buffer is bounded in records and bytes. Beyond it, records go to a disk
spool (`spool.py`) and come back in order once memory has room again; only when the spool
is full too are records dropped, counted per channel.

A record Kafka can never accept must not block its lane (`deadletter.py`): one above
`max_record_bytes` is replaced by its dead letter before it is buffered, and one the broker
refuses for good is, on the re-send, first sent alone (the broker's refusal names a whole
Kafka batch, not a record) and, refused alone too, replaced by its dead letter in place, so
the lane's order holds. A dead letter that is refused in turn is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ray_forwarder.core.deadletter import (
    DEAD_LETTER_CHANNEL,
    OVER_MAX_RECORD_BYTES,
    dead_letter_value,
    refusal_reason,
)
from ray_forwarder.core.pipeline import OutRecord
from ray_forwarder.runtime.spool import DiskSpool, SpoolFull
from ray_forwarder.runtime.wire import MAX_TOPICS, PackedBatch, WireRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a lane tells the producer about a batch, so that the producer keeps its order.

    Ray does not promise that an async actor starts one caller's calls in the order they
    were made (a call whose argument is still in the object store can be overtaken), so
    each batch names the lane's previous one and the producer admits them in that order.
    """

    lane: str  # unique per lane
    number: int  # this submission's number; increases with every submission
    after: int | None  # the previous submission to the same producer, if any in flight
    token: str | None  # the producer the lane's unacknowledged batches went to
    #: Records (indices) to send each in a Kafka batch of its own: they shared a batch
    #: the broker refused for good, and only alone does a refusal name the culprit.
    isolate: tuple[int, ...] = ()


#: send(records, ticket) -> (acked count, token of the producer that acknowledged them).
#: The lane hands over a `PackedBatch` (a Sequence of (topic, key, value)).
SendBatch = Callable[[PackedBatch, Ticket], Awaitable[tuple[int, str]]]
#: on_ack(records, oldest received, submitted, acked): monotonic seconds, called once per
#: acknowledged batch (latency metrics; see ray_forwarder/ops/metrics.py) with the first
#: record of each of its topics (what the metrics sample), not all. Must not raise.
AckObserver = Callable[[Sequence[WireRecord], float, float, float], None]


class StaleProducerError(RuntimeError):
    """The producer restarted since this lane last heard from it; nothing was sent."""


class RecordsRefused(RuntimeError):
    """Kafka refused records of a batch for good (`deadletter.refusal_reason`).

    `refused` maps a record's index in the batch to the reason. The producer was discarded
    (as after any failed record), so the lane re-sends in order: records that were sent
    alone (`Ticket.isolate`) are diverted to the dead-letter topic, the others sent alone.
    """

    def __init__(self, refused: dict[int, str], detail: str) -> None:
        super().__init__(refused, detail)  # args rebuild it when Ray pickles it
        self.refused = refused
        self.detail = detail

    def __str__(self) -> str:
        return f"Kafka refused {len(self.refused)} record(s) for good: {self.detail}"


MAX_RETRY_DELAY_S = 5.0


def stable_slot(key: bytes, slots: int) -> int:
    """A slot for a key that every process agrees on (unlike Python's salted `hash()`)."""
    return zlib.crc32(key) % slots


@dataclass
class OutboxStats:
    buffered: int = 0
    buffered_bytes: int = 0
    spooled: int = 0
    spooled_bytes: int = 0
    spooled_total: int = 0
    in_flight: int = 0
    batches_sent: int = 0
    batches_failed: int = 0
    batches_resent: int = 0
    records_acked: int = 0
    acked_by_channel: Counter[str] = field(default_factory=Counter)
    dropped_by_channel: Counter[str] = field(default_factory=Counter)
    dead_lettered: Counter[str] = field(default_factory=Counter)  # diverted, by reason
    dead_letter_dropped: Counter[str] = field(default_factory=Counter)  # DLQ refused too
    spool_lost: int = 0  # spooled records that could not be read back (a cut segment)
    last_ack_latency_s: float = 0.0

    def merge(self, other: OutboxStats) -> None:
        self.buffered += other.buffered
        self.buffered_bytes += other.buffered_bytes
        self.spooled += other.spooled
        self.spooled_bytes += other.spooled_bytes
        self.spooled_total += other.spooled_total
        self.in_flight += other.in_flight
        self.batches_sent += other.batches_sent
        self.batches_failed += other.batches_failed
        self.batches_resent += other.batches_resent
        self.records_acked += other.records_acked
        self.acked_by_channel.update(other.acked_by_channel)
        self.dropped_by_channel.update(other.dropped_by_channel)
        self.dead_lettered.update(other.dead_lettered)
        self.dead_letter_dropped.update(other.dead_letter_dropped)
        self.spool_lost += other.spool_lost
        self.last_ack_latency_s = max(self.last_ack_latency_s, other.last_ack_latency_s)


@dataclass(slots=True)
class _Batch:
    records: PackedBatch
    channels: Counter[str]
    oldest_received: float
    record_channels: list[str] = field(default_factory=list)  # per record, for diversions
    isolate: tuple[int, ...] = ()  # see Ticket.isolate
    acked: bool = False
    attempts: int = 0
    submitted: float = 0.0  # monotonic time of the latest attempt (publish latency)


@dataclass(frozen=True)
class BatchLimits:
    max_events: int  # memory buffer bound per lane, in records
    batch_max_events: int
    batch_max_ms: float
    max_in_flight: int  # batches in flight per lane
    retry_delay: float = 0.2
    #: key + value bytes per batch (one Ray call's argument)
    batch_max_bytes: int = 1 << 62
    #: key + value bytes in flight per lane: the window that keeps acks pipelined
    max_in_flight_bytes: int = 1 << 62
    max_bytes: int = 1 << 62  # memory buffer bound per lane, in key + value bytes
    spool_dir: Path | None = None  # overflow to disk here (a directory per lane)
    spool_max_bytes: int = 0  # 0: no spool
    max_record_bytes: int = 1 << 20  # key + value; larger records go to the dead letters
    dead_letter_topic: str | None = None  # None: refused records are dropped, counted


class _Window:
    """What a lane has in flight, bounded in batches and in bytes.

    A batch is admitted while fewer than `max_batches` are in flight and the bytes in
    flight are below `max_bytes` (so the last one admitted may overshoot by one batch, and
    a batch bigger than the window still goes, alone). Sized in bytes, the window keeps
    acks pipelined whatever the batches' size: a lane's rate is its window over the ack
    round trip, and a few MB in flight are far beyond what one connection delivers."""

    def __init__(self, max_batches: int, max_bytes: int) -> None:
        self._max_batches = max_batches
        self._max_bytes = max_bytes
        self.batches = 0
        self.bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    def has_room(self) -> bool:
        return self.batches < self._max_batches and self.bytes < self._max_bytes

    async def wait_for_room(self) -> None:
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    def add(self, size: int) -> None:
        self.batches += 1
        self.bytes += size

    def release(self, size: int) -> None:
        self.batches -= 1
        self.bytes -= size
        self._room.set()


class Lane:
    """The ordered, windowed path to one producer."""

    def __init__(self, send: SendBatch, limits: BatchLimits, name: str = "lane") -> None:
        self._send = send
        self._limits = limits
        self._linger = limits.batch_max_ms / 1000
        self._name = name
        self._window = _Window(limits.max_in_flight, limits.max_in_flight_bytes)
        self._batch_full_bytes = min(limits.batch_max_bytes, limits.max_in_flight_bytes)
        self._buffer: deque[tuple[OutRecord, float]] = deque()
        self._buffered_bytes = 0
        self._spool: DiskSpool | None = None
        self._spool_error = False
        self._unacked: deque[_Batch] = deque()
        self._inflight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._failed = False
        self._consecutive_failures = 0
        self._closed = False
        self._instance: str | None = None  # the producer incarnation this lane talks to
        self._uid = f"{name}-{uuid.uuid4().hex[:12]}"
        if limits.spool_dir is not None and limits.spool_max_bytes > 0:
            self._spool = DiskSpool(limits.spool_dir / self._uid, limits.spool_max_bytes)
        self._submissions = 0
        self._refused = False  # the latest failure was a refusal, not an outage
        self.stats = OutboxStats()
        self.observer: AckObserver | None = None

    def put_many(self, records: list[OutRecord], received: float) -> None:
        """`put` for each record; the common case (memory has room) without a call each."""
        buffer, limits = self._buffer, self._limits
        append = buffer.append
        max_record, max_events, max_bytes = (
            limits.max_record_bytes, limits.max_events, limits.max_bytes
        )  # fmt: skip
        buffered_bytes = self._buffered_bytes
        for position, record in enumerate(records):
            size = len(record.key) + len(record.value)
            if (
                size > max_record
                or self._spool
                or len(buffer) >= max_events
                or buffered_bytes >= max_bytes
            ):
                self._buffered_bytes = buffered_bytes
                for rest in records[position:]:
                    self.put(rest, received)
                return
            append((record, received))
            buffered_bytes += size
        self._buffered_bytes = buffered_bytes
        if len(buffer) >= limits.batch_max_events or buffered_bytes >= self._batch_full_bytes:
            self._wake.set()

    def put(self, record: OutRecord, received: float) -> None:
        """Buffer in memory; when that is full, spool to disk; when both are, drop (counted).

        Once anything is spooled, newer records go to the spool too, until it has drained
        into memory: the memory buffer always holds the oldest records. A record above
        `max_record_bytes` never enters: its dead letter takes its place.
        """
        size = len(record.key) + len(record.value)
        if size > self._limits.max_record_bytes and record.channel != DEAD_LETTER_CHANNEL:
            detail = f"{size} bytes > MAX_RECORD_BYTES {self._limits.max_record_bytes}"
            diverted = self._dead_letter(
                (record.topic, record.key, record.value), OVER_MAX_RECORD_BYTES, detail
            )
            if diverted is None:
                self._count_dead_letter_drop(OVER_MAX_RECORD_BYTES, record.topic)
                return
            self.stats.dead_lettered[OVER_MAX_RECORD_BYTES] += 1
            record = OutRecord(*diverted, DEAD_LETTER_CHANNEL)
            size = len(record.key) + len(record.value)
        if not self._spool and self._memory_has_room():
            self._buffer.append((record, received))
            self._buffered_bytes += size
            if (
                len(self._buffer) >= self._limits.batch_max_events
                or self._buffered_bytes >= self._batch_full_bytes
            ):
                self._wake.set()
            return
        if self._spool is not None:
            try:
                self._spool.append(record, received)
                return
            except SpoolFull:
                pass
            except OSError as exc:  # a full or read-only disk: drop (counted) like a full spool
                if not self._spool_error:
                    log.error("%s cannot spool to disk: %s", self._name, exc)
                self._spool_error = True
        self.stats.dropped_by_channel[record.channel] += 1
        dropped = sum(self.stats.dropped_by_channel.values())
        if dropped == 1 or dropped % 10_000 == 0:
            log.warning("%s buffer full: %d records dropped so far", self._name, dropped)

    def _dead_letter(self, record: WireRecord, reason: str, detail: str) -> WireRecord | None:
        """The dead letter standing in for a refused record; None when it cannot have one
        (it is a dead letter itself, or no dead-letter topic is configured)."""
        topic, key, value = record
        target = self._limits.dead_letter_topic
        if target is None or topic == target:
            return None
        # The envelope's head is kept below the record limit the dead letter must obey too.
        envelope_max = self._limits.max_record_bytes // 2
        return (target, key, dead_letter_value(topic, key, value, reason, detail, envelope_max))

    def _count_dead_letter_drop(self, reason: str, topic: str) -> None:
        self.stats.dead_letter_dropped[reason] += 1
        dropped = sum(self.stats.dead_letter_dropped.values())
        if dropped <= 10 or dropped % 1000 == 0:  # logged, never one line per record
            log.error(
                "%s: a record for %s was refused (%s) and has no dead letter to go to: "
                "dropped (%d so far)", self._name, topic, reason, dropped,
            )  # fmt: skip

    def has_room(self) -> bool:
        """Whether a record put now would be kept (in memory or in the spool)."""
        if not self._spool and self._memory_has_room():
            return True
        spool = self._spool
        return spool is not None and spool.bytes < self._limits.spool_max_bytes * 0.99

    def backlogged(self) -> bool:
        """More than two full batches waiting in memory, or anything spooled."""
        return bool(self._spool) or len(self._buffer) > 2 * self._limits.batch_max_events

    def _memory_has_room(self) -> bool:
        return (
            len(self._buffer) < self._limits.max_events
            and self._buffered_bytes < self._limits.max_bytes
        )

    def _refill_from_spool(self) -> None:
        """Move the spool's oldest records into memory while memory has room."""
        spool = self._spool
        while spool and self._memory_has_room():
            room = self._limits.max_events - len(self._buffer)
            for record, received in spool.pop_many(min(room, self._limits.batch_max_events)):
                self._buffer.append((record, received))
                self._buffered_bytes += len(record.key) + len(record.value)

    def close(self) -> None:
        """Flush what is buffered without waiting for the linger, then let `run()` end."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._spool is not None:
                self._spool.close()

    async def _run(self) -> None:
        while True:
            if self._failed:
                await self._recover()
                continue
            if self._spool:
                self._refill_from_spool()
            if not self._buffer:
                if self._closed:
                    if self._inflight:
                        await asyncio.gather(*self._inflight, return_exceptions=True)
                        continue  # a failure may have happened meanwhile
                    return
                await self._sleep_unless_woken(self._linger)
                continue
            if (
                len(self._buffer) < self._limits.batch_max_events
                and self._buffered_bytes < self._batch_full_bytes
                and not self._closed
            ):
                age = time.monotonic() - self._buffer[0][1]
                if age < self._linger:
                    await self._sleep_unless_woken(self._linger - age)
                    continue
            if self._instance is None and self._inflight:
                # Until an ack names the producer, one batch at a time: otherwise a newer
                # batch could reach a replacement producer ahead of an older failed one.
                await asyncio.gather(*self._inflight, return_exceptions=True)
                continue
            await self._window.wait_for_room()
            if self._failed:
                continue
            self._submit(self._take_batch())

    async def _sleep_unless_woken(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    def _take_batch(self) -> _Batch:
        """The oldest records, packed for the wire: up to `batch_max_events` records and
        `batch_max_bytes` (the first record always goes, whatever its size)."""
        buffer = self._buffer
        count = min(self._limits.batch_max_events, len(buffer))
        max_bytes = self._limits.batch_max_bytes
        oldest = buffer[0][1]
        popleft = buffer.popleft
        topic_ids: dict[str, int] = {}
        topic_of = bytearray()
        parts: list[bytes] = []
        bounds = array("I", [0])
        record_channels: list[str] = []
        end = largest = 0
        for _ in range(count):
            record = buffer[0][0]
            key, value = record.key, record.value
            size = len(key) + len(value)
            if end + size > max_bytes and end:
                break
            index = topic_ids.get(record.topic)
            if index is None:
                if len(topic_ids) == MAX_TOPICS:
                    break
                index = topic_ids[record.topic] = len(topic_ids)
            popleft()
            topic_of.append(index)
            parts.append(key)
            parts.append(value)
            bounds.append(end + len(key))
            end += size
            bounds.append(end)
            if size > largest:
                largest = size
            record_channels.append(record.channel)
        self._buffered_bytes -= end
        records = PackedBatch(
            tuple(topic_ids), bytes(topic_of), b"".join(parts), bounds, largest
        )  # fmt: skip
        return _Batch(records, Counter(record_channels), oldest, record_channels)

    def _submit(self, batch: _Batch) -> asyncio.Task[None]:
        """Start sending (the window had room); calls start in submit order."""
        size = batch.records.nbytes
        self._window.add(size)
        self._unacked.append(batch)
        batch.attempts += 1
        batch.submitted = time.monotonic()
        self._submissions += 1
        after = self._submissions - 1 if self._instance is not None else None
        ticket = Ticket(self._uid, self._submissions, after, self._instance, batch.isolate)
        task = asyncio.create_task(self._deliver(batch, ticket, size))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    async def _deliver(self, batch: _Batch, ticket: Ticket, size: int) -> None:
        try:
            acked, instance_now = await self._send(batch.records, ticket)
        except RecordsRefused as exc:  # (Ray's wrapper is an instance of it too)
            self.stats.batches_failed += 1
            self._divert(batch, exc.refused, exc.detail)
            self._refused = True
            self._failed = True
            return
        except Exception as exc:  # producer gone or Kafka unavailable: the lane re-sends
            if refusal_reason(exc) is not None:  # failed with another batch's refused record
                self._refused = True
            self.stats.batches_failed += 1
            if not self._failed:
                log.warning(
                    "%s: batch of %d records failed (attempt %d), will re-send in order: %s",
                    self._name, len(batch.records), batch.attempts, _short(exc),
                )  # fmt: skip
            self._failed = True
            return
        finally:
            self._window.release(size)
        batch.acked = True
        if self._instance is None:
            self._instance = instance_now
        self._consecutive_failures = 0
        stats = self.stats
        stats.batches_sent += 1
        stats.records_acked += acked
        stats.acked_by_channel.update(batch.channels)
        now = time.monotonic()
        stats.last_ack_latency_s = now - batch.oldest_received
        if self.observer is not None:
            try:
                sample = list(batch.records.first_per_topic())
                self.observer(sample, batch.oldest_received, batch.submitted, now)
            except Exception:  # metrics must never break delivery
                log.warning("%s: ack observer failed", self._name, exc_info=True)
        while self._unacked and self._unacked[0].acked:
            self._unacked.popleft()

    def _divert(self, batch: _Batch, refused: dict[int, str], detail: str) -> None:
        """Act on Kafka's refusal of some of a batch's records before it is re-sent.

        A refused record that had been sent alone is the culprit: its dead letter takes
        its place (or, a dead letter itself, it is dropped and counted). One that shared a
        Kafka batch may be innocent: it is re-sent alone.
        """
        records: list[WireRecord] = []
        record_channels: list[str] = []
        isolate: list[int] = []
        for index, (record, channel) in enumerate(
            zip(batch.records, batch.record_channels, strict=True)
        ):
            reason = refused.get(index)
            if reason is not None and index in batch.isolate:
                diverted = self._dead_letter(record, reason, detail)
                if diverted is None:
                    self._count_dead_letter_drop(reason, record[0])
                    continue
                self.stats.dead_lettered[reason] += 1
                if self.stats.dead_lettered.total() <= 10:
                    log.warning(
                        "%s: Kafka refused a record for %s for good (%s): dead-lettered",
                        self._name, record[0], detail,
                    )  # fmt: skip
                record, channel = diverted, DEAD_LETTER_CHANNEL
            elif reason is not None or index in batch.isolate:  # refused, or not yet tried
                isolate.append(len(records))
            records.append(record)
            record_channels.append(channel)
        batch.records, batch.record_channels = PackedBatch.pack(records), record_channels
        batch.channels = Counter(record_channels)
        batch.isolate = tuple(isolate)

    async def _recover(self) -> None:
        """Wait for in-flight sends to settle, back off, then re-send the unacked in order.

        After a refusal (a poison record, not an outage) the delay stays at its minimum:
        the re-send makes progress by itself, it need not wait for Kafka to come back."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        retry = [batch for batch in self._unacked if not batch.acked]
        self._unacked.clear()
        if self._refused:
            self._refused = False
            delay = self._limits.retry_delay
        else:
            self._consecutive_failures += 1
            delay = min(
                self._limits.retry_delay * 2 ** (self._consecutive_failures - 1),
                MAX_RETRY_DELAY_S,
            )
        await asyncio.sleep(delay)
        self._failed = False
        # Talk to whichever producer incarnation answers now: the oldest batch goes alone
        # and its ack pins the incarnation, so that no newer batch can reach a further
        # restarted one ahead of an older batch.
        self._instance = None
        if retry:
            await self._window.wait_for_room()
            self.stats.batches_resent += 1
            await self._submit(retry[0])
            if self._failed:
                self._unacked.extend(retry[1:])
                return
            retry = retry[1:]
        for position, batch in enumerate(retry):
            await self._window.wait_for_room()
            if self._failed:  # failed again while re-sending: keep the rest for next time
                self._unacked.extend(retry[position:])
                return
            self.stats.batches_resent += 1
            self._submit(batch)

    def snapshot(self) -> OutboxStats:
        self.stats.buffered = len(self._buffer)
        self.stats.buffered_bytes = self._buffered_bytes
        if self._spool is not None:
            self.stats.spooled = self._spool.records
            self.stats.spooled_bytes = self._spool.bytes
            self.stats.spooled_total = self._spool.written_total
            self.stats.spool_lost = self._spool.lost_total
        self.stats.in_flight = sum(len(b.records) for b in self._unacked if not b.acked)
        return self.stats


#: Record keys (symbols) whose lane is memoised; beyond it the memo starts over.
_ROUTE_CACHE_MAX = 100_000


class Outbox:
    """Routes records to per-producer lanes by a stable hash of the record key."""

    def __init__(self, senders: Sequence[SendBatch], limits: BatchLimits) -> None:
        if not senders:
            raise ValueError("an outbox needs at least one producer")
        per_lane = BatchLimits(
            max_events=max(1, limits.max_events // len(senders)),
            max_bytes=max(1, limits.max_bytes // len(senders)),
            spool_dir=limits.spool_dir,
            spool_max_bytes=limits.spool_max_bytes // len(senders),
            batch_max_events=limits.batch_max_events,
            batch_max_ms=limits.batch_max_ms,
            max_in_flight=limits.max_in_flight,
            batch_max_bytes=limits.batch_max_bytes,
            max_in_flight_bytes=limits.max_in_flight_bytes,
            retry_delay=limits.retry_delay,
            max_record_bytes=limits.max_record_bytes,
            dead_letter_topic=limits.dead_letter_topic,
        )
        self._lanes = [Lane(send, per_lane, f"lane-{i}") for i, send in enumerate(senders)]
        self._route: dict[bytes, Lane] = {}

    def lane_for(self, key: bytes) -> Lane:
        lane = self._route.get(key)
        if lane is None:
            lane = self._lanes[stable_slot(key, len(self._lanes))]
            if len(self._route) >= _ROUTE_CACHE_MAX:  # a pure cache of stable_slot: bounded
                self._route.clear()
            self._route[key] = lane
        return lane

    def observe_acks(self, observer: AckObserver | None) -> None:
        """Call `observer` for every acknowledged batch of every lane (latency metrics)."""
        for lane in self._lanes:
            lane.observer = observer

    def has_room(self) -> bool:
        """Whether every lane would keep a record put now (in memory or its spool)."""
        return all(lane.has_room() for lane in self._lanes)

    def backlogged(self) -> bool:
        """Whether a lane holds more than two full batches in memory, or spools: records
        arrive faster than its sends take them."""
        return any(lane.backlogged() for lane in self._lanes)

    def put(self, records: list[OutRecord], received: float) -> None:
        """Buffer records (never blocks); beyond a lane's bound they are dropped and counted."""
        if len(self._lanes) == 1:
            self._lanes[0].put_many(records, received)
            return
        for record in records:
            self.lane_for(record.key).put(record, received)

    async def run(self) -> None:
        await asyncio.gather(*(lane.run() for lane in self._lanes))

    def close(self) -> None:
        for lane in self._lanes:
            lane.close()

    def snapshot(self) -> OutboxStats:
        total = OutboxStats()
        for lane in self._lanes:
            total.merge(lane.snapshot())
        return total


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0][:300]
