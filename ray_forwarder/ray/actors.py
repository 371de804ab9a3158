"""Ray actors: thin shells that host a `ShardCore` or a `ProducerHost` in their own process.

Both are async actors, so a long-running `run()` and the driver's `stats()` polls share
one event loop. They ask for a fraction of a CPU: they wait on sockets, not compute.
With `PRODUCERS=0` there are no producer actors: each shard actor hosts its own producer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray

from ray_forwarder.config import Settings
from ray_forwarder.ops import logs
from ray_forwarder.ops.metrics import LatencyRecorder, ShardMetrics, StatsExporter
from ray_forwarder.ray.gc_tuning import tune_for_hot_path
from ray_forwarder.ray.producer_host import ProducerHost
from ray_forwarder.ray.shard import ShardCore, ShardSpec
from ray_forwarder.runtime.outbox import SendBatch, Ticket
from ray_forwarder.runtime.wire import PackedBatch

log = logging.getLogger(__name__)

IO_ACTOR_CPUS = 0.25


@ray.remote(num_cpus=IO_ACTOR_CPUS, max_restarts=-1, max_task_retries=0)
class ProducerActor:
    """Hosts one Kafka producer (`ProducerHost`) that takes whole batches from shards."""

    def __init__(self, settings: Settings, name: str) -> None:
        logs.configure(settings.log_level, actor="producer", producer=name)
        self._host = ProducerHost(settings, name)
        tune_for_hot_path()  # it allocates per record too, building Kafka batches

    async def start(self) -> bool:
        """Connect to Kafka (idempotent); raises KafkaStartError with a clear message."""
        return await self._host.start()

    async def send_batch(self, records: PackedBatch, ticket: Ticket) -> tuple[int, str]:
        """Send and await acks; returns (count, the producer's token) (`ProducerHost`).

        `records` is one buffer plus offsets (`PackedBatch`): Ray pickles it as a handful
        of objects whatever the batch holds (up to `BATCH_MAX_BYTES`)."""
        return await self._host.send_batch(records, ticket)

    async def stats(self) -> dict[str, Any]:
        self._host.ensure_background()
        return self._host.stats()

    async def close(self) -> None:
        await self._host.close()


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

    Without `producer_names` (`PRODUCERS=0`) it hosts its own Kafka producer: its lane
    calls it in this event loop, and its stats carry the producer's (`producer`).
    """

    def __init__(self, settings: Settings, spec: ShardSpec, producer_names: list[str]) -> None:
        logs.configure(
            settings.log_level, actor="shard", shard=spec.shard_id, symbols=len(spec.symbols)
        )
        self._producer: ProducerHost | None = None
        if producer_names:
            producers = [ray.get_actor(name) for name in producer_names]
            senders = [_sender(p) for p in producers]
        else:
            self._producer = ProducerHost(settings, spec.shard_id)
            senders = [self._producer.send_batch]
        self._core = ShardCore(settings, spec, senders)
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
            if self._producer is not None:
                if restarted:  # Kafka was reachable at start: connect when first needed
                    self._producer.ensure_background()
                else:  # a first run fails with a clear error, as producer actors do
                    await self._producer.start()
            await self._core.run(epoch, resume_from, restarted)
        finally:
            await self._metrics.stop()  # export the final counts
            if self._producer is not None:
                await self._producer.close()  # after the core drained its lanes into it
        return self._core.stats()

    async def pid(self) -> int:
        return os.getpid()

    async def stop(self, timeout: float = 30.0) -> bool:
        if self._running is None:  # a restarted incarnation that never ran: nothing to drain
            return True
        return await self._core.stop(timeout)

    async def stats(self) -> dict[str, Any]:
        stats = {**self._core.stats(), "latency": self._latency.snapshot()}
        if self._producer is not None:
            stats["producer"] = self._producer.stats()
        return stats
