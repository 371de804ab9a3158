"""Ray actors: thin shells that host a `ShardCore` or a `KafkaSink` in their own process.

Both are async actors, so a long-running `run()` and the driver's `stats()` polls share
one event loop. They ask for a fraction of a CPU: they wait on sockets, not compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from typing import Any

import ray

from ray_forwarder.config import Settings
from ray_forwarder.core.deadletter import refusal_reason
from ray_forwarder.ops import logs
from ray_forwarder.ops.metrics import LatencyRecorder, ProducerMetrics, ShardMetrics, StatsExporter
from ray_forwarder.ray.gc_tuning import tune_for_hot_path
from ray_forwarder.ray.shard import ShardCore, ShardSpec
from ray_forwarder.runtime.outbox import (
    RecordsRefused,
    SendBatch,
    StaleProducerError,
    Ticket,
)
from ray_forwarder.runtime.producer import KafkaSink
from ray_forwarder.runtime.wire import PackedBatch

log = logging.getLogger(__name__)

IO_ACTOR_CPUS = 0.25
#: An idle producer asks Kafka for metadata this often, so `ready` notices a dead broker.
KAFKA_PROBE_INTERVAL_S = 2.0
KAFKA_PROBE_TIMEOUT_S = 5.0


@ray.remote(num_cpus=IO_ACTOR_CPUS, max_restarts=-1, max_task_retries=0)
class ProducerActor:
    """Owns one idempotent aiokafka producer; takes whole batches from shards."""

    def __init__(self, settings: Settings, name: str) -> None:
        logs.configure(settings.log_level, actor="producer", producer=name)
        self._name = name
        self._instance = uuid.uuid4().hex
        self._sink = KafkaSink(settings, name=self._instance)
        self._kafka_ok = True  # the latest probe's verdict; a failed send also clears it
        self._last_ok = time.monotonic()
        self._probe_failures = 0
        self._probe_error: str | None = None
        self._probe: asyncio.Task[None] | None = None
        self._metrics = StatsExporter(self.stats, ProducerMetrics(name).update)
        tune_for_hot_path()  # it allocates per record too, building Kafka batches

    def _ensure_background(self) -> None:
        """Start the metrics exporter and the Kafka probe in the actor's event loop."""
        self._metrics.start()
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        """Ask Kafka for metadata when nothing was acknowledged lately. Only the sink's
        `probe()` (a metadata request): it never touches the send path or its ordering."""
        while True:
            await asyncio.sleep(KAFKA_PROBE_INTERVAL_S)
            if not self._sink.started or time.monotonic() - self._last_ok < KAFKA_PROBE_INTERVAL_S:
                continue  # not started, or a batch was acknowledged just now
            try:
                await self._sink.probe(KAFKA_PROBE_TIMEOUT_S)
            except Exception as exc:
                self._probe_failures += 1
                self._probe_error = f"metadata probe failed: {type(exc).__name__}: {exc}"[:300]
                if self._kafka_ok:  # one line per state change, not per probe
                    log.warning(
                        "producer %s: Kafka not answering: %s", self._name, self._probe_error
                    )
                self._kafka_ok = False
            else:
                if not self._kafka_ok:
                    log.info("producer %s: Kafka answering again", self._name)
                self._kafka_ok = True
                self._probe_error = None
                self._last_ok = time.monotonic()

    async def start(self) -> bool:
        """Connect to Kafka (idempotent); raises KafkaStartError with a clear message."""
        self._ensure_background()
        await self._sink.start()
        return True

    async def send_batch(self, records: PackedBatch, ticket: Ticket) -> tuple[int, str]:
        """Send and await acks; returns (count, the producer's token).

        `records` is one buffer plus offsets (`PackedBatch`): Ray pickles it as a handful
        of objects whatever the batch holds (up to `BATCH_MAX_BYTES`).

        The token names this actor incarnation and its current Kafka producer. A batch
        addressed to an earlier one (the actor restarted, or its producer was discarded
        after a failed delivery) is refused unsent, so the shard re-sends everything that
        one had not acknowledged, in order, before anything newer gets through.
        """
        try:
            count, token = await self._sink.send_batch(records, ticket)
        except (StaleProducerError, RecordsRefused):
            raise
        except Exception as exc:
            if refusal_reason(exc) is None:  # not another batch's refused record: Kafka
                self._kafka_ok = False
            raise
        self._kafka_ok, self._probe_error, self._last_ok = True, None, time.monotonic()
        return count, token

    async def stats(self) -> dict[str, Any]:
        self._ensure_background()
        s = self._sink.stats
        return {
            "name": self._name,
            # Ready = connected and Kafka answered lately (the last send or idle probe).
            "ready": s.ready and self._kafka_ok,
            "batches": s.batches,
            "records": s.records,
            "errors": s.errors,
            "refused": s.refused,
            "probe_failures": self._probe_failures,
            "last_ok_age_s": round(time.monotonic() - self._last_ok, 3),
            "last_error": self._probe_error or s.last_error,
        }

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self._metrics.stop()
        await self._sink.stop()


def _sender(producer: Any) -> SendBatch:
    async def send(records: PackedBatch, ticket: Ticket) -> tuple[int, str]:
        return await producer.send_batch.remote(records, ticket)

    return send


@ray.remote(num_cpus=IO_ACTOR_CPUS, max_restarts=-1, max_task_retries=0)
class ShardActor:
    """Owns one Alpaca session, its dedup cache and seq counters, and its outbox.

    Ray restarts a dead shard actor (its process killed, its node gone) with the same
    arguments, on any node with room; the driver notices the failed `run()` call and calls
    `run()` again with the next seq epoch. `max_task_retries=0`: a `run()` is never
    replayed by Ray itself, only by the driver, which owns the epoch count.
    """

    def __init__(self, settings: Settings, spec: ShardSpec, producer_names: list[str]) -> None:
        logs.configure(
            settings.log_level, actor="shard", shard=spec.shard_id, symbols=len(spec.symbols)
        )
        producers = [ray.get_actor(name) for name in producer_names]
        self._core = ShardCore(settings, spec, [_sender(p) for p in producers])
        self._latency = LatencyRecorder()  # fed by the outbox's ack hook, in this event loop
        self._core.outbox.observe_acks(self._latency.on_ack)
        self._metrics = StatsExporter(
            self._core.stats, ShardMetrics(spec.shard_id, self._latency, spec.stream).update
        )
        self._running: asyncio.Task[dict[str, Any]] | None = None
        tune_for_hot_path()

    async def run(
        self,
        epoch: int = 0,
        resume_from: dict[str, Any] | None = None,
        restarted: bool | None = None,
    ) -> dict[str, Any]:
        """Runs until `stop()`; a fatal feed error fails this call with the reason.

        Called once per incarnation; a repeated call (the driver lost track of a live one)
        waits for the running one instead of opening a second socket for the slot.
        `resume_from`: where the predecessor stopped (see `ShardCore.run`)."""
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(
                self._run(epoch, resume_from, restarted)
            )
        return await asyncio.shield(self._running)

    async def _run(
        self, epoch: int, resume_from: dict[str, Any] | None, restarted: bool | None
    ) -> dict[str, Any]:
        self._metrics.start()
        try:
            await self._core.run(epoch, resume_from, restarted)
        finally:
            await self._metrics.stop()  # export the final counts
        return self._core.stats()

    async def pid(self) -> int:
        return os.getpid()

    async def stop(self, timeout: float = 30.0) -> bool:
        if self._running is None:  # a restarted incarnation that never ran: nothing to drain
            return True
        return await self._core.stop(timeout)

    async def stats(self) -> dict[str, Any]:
        return {**self._core.stats(), "latency": self._latency.snapshot()}
