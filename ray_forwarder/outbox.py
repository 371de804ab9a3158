"""The shard's outbound side: a bounded buffer the read loop appends to, and an ordered,
windowed sender that ships size- and time-bounded batches to a producer.

The read loop never awaits anything here: `put()` is synchronous. Batches leave in the
order their records arrived, at most `max_in_flight` at a time; a batch whose send failed
is re-sent (at-least-once) before anything newer is shipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ray_forwarder.pipeline import OutRecord

log = logging.getLogger(__name__)

WireRecord = tuple[str, bytes, bytes]  # (topic, key, value): cheap to pickle across Ray
SendBatch = Callable[[list[WireRecord]], Awaitable[int]]


@dataclass
class OutboxStats:
    buffered: int = 0
    in_flight: int = 0
    batches_sent: int = 0
    batches_failed: int = 0
    records_acked: int = 0
    acked_by_channel: Counter[str] = field(default_factory=Counter)
    dropped_by_channel: Counter[str] = field(default_factory=Counter)
    last_ack_latency_s: float = 0.0


@dataclass(slots=True)
class _Batch:
    records: list[WireRecord]
    channels: Counter[str]
    oldest_received: float
    attempts: int = 0


class Outbox:
    def __init__(
        self,
        send: SendBatch,
        *,
        max_events: int,
        batch_max_events: int,
        batch_max_ms: float,
        max_in_flight: int,
        retry_delay: float = 0.5,
    ) -> None:
        self._send = send
        self._max_events = max_events
        self._batch_max = batch_max_events
        self._linger = batch_max_ms / 1000
        self._window = asyncio.Semaphore(max_in_flight)
        self._retry_delay = retry_delay
        self._buffer: deque[tuple[OutRecord, float]] = deque()
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._retry_lock = asyncio.Lock()
        self._closed = False
        self.stats = OutboxStats()

    def put(self, records: list[OutRecord], received: float) -> None:
        """Buffer records (never blocks). Beyond the bound, records are dropped and counted."""
        room = self._max_events - len(self._buffer)
        if room < len(records):
            for record in records[max(room, 0) :]:
                self.stats.dropped_by_channel[record.channel] += 1
            log.warning("outbox full: dropped %d records", len(records) - max(room, 0))
            records = records[: max(room, 0)]
        self._buffer.extend((record, received) for record in records)
        if len(self._buffer) >= self._batch_max:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buffer) + len(self._inflight)

    async def run(self) -> None:
        """Ship batches until `close()`; then ship what is left and wait for the window."""
        while True:
            if not self._buffer:
                if self._closed:
                    break
                await self._sleep_unless_woken(self._linger)
                continue
            if len(self._buffer) < self._batch_max and not self._closed:
                age = time.monotonic() - self._buffer[0][1]
                if age < self._linger:
                    await self._sleep_unless_woken(self._linger - age)
                    continue
            await self._window.acquire()
            batch = self._take_batch()
            task = asyncio.create_task(self._deliver(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        if self._inflight:
            await asyncio.gather(*self._inflight)

    async def _sleep_unless_woken(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    def close(self) -> None:
        """Stop accepting the wait for more records: flush everything now."""
        self._closed = True
        self._wake.set()

    def _take_batch(self) -> _Batch:
        count = min(self._batch_max, len(self._buffer))
        records: list[WireRecord] = []
        channels: Counter[str] = Counter()
        oldest = self._buffer[0][1]
        popleft = self._buffer.popleft
        for _ in range(count):
            record, _received = popleft()
            records.append((record.topic, record.key, record.value))
            channels[record.channel] += 1
        return _Batch(records, channels, oldest)

    async def _deliver(self, batch: _Batch) -> None:
        try:
            while True:
                batch.attempts += 1
                try:
                    acked = await self._send(batch.records)
                except Exception as exc:  # producer gone or Kafka unavailable: resend
                    self.stats.batches_failed += 1
                    log.warning(
                        "batch of %d records failed (attempt %d): %s",
                        len(batch.records),
                        batch.attempts,
                        _short(exc),
                    )
                    await asyncio.sleep(min(self._retry_delay * batch.attempts, 5.0))
                    continue
                self.stats.batches_sent += 1
                self.stats.records_acked += acked
                self.stats.acked_by_channel.update(batch.channels)
                self.stats.last_ack_latency_s = time.monotonic() - batch.oldest_received
                return
        finally:
            self._window.release()

    def snapshot(self) -> OutboxStats:
        self.stats.buffered = len(self._buffer)
        self.stats.in_flight = len(self._inflight)
        return self.stats


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    first = text.splitlines()[0] if text else text
    return first[:300]
