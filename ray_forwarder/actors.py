"""Ray actors: thin shells that host a `ShardCore` or a `KafkaSink` in their own process.

Both are async actors, so a long-running `run()` and the driver's `stats()` polls share
one event loop. They ask for a fraction of a CPU: they wait on sockets, not compute.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import ray

from ray_forwarder import logs
from ray_forwarder.config import Settings
from ray_forwarder.outbox import SendBatch, StaleProducerError, WireRecord
from ray_forwarder.producer import KafkaSink
from ray_forwarder.shard import ShardCore, ShardSpec

IO_ACTOR_CPUS = 0.25


@ray.remote(num_cpus=IO_ACTOR_CPUS, max_restarts=-1, max_task_retries=0)
class ProducerActor:
    """Owns one idempotent aiokafka producer; takes whole batches from shards."""

    def __init__(self, settings: Settings, name: str) -> None:
        logs.configure(settings.log_level, actor="producer", producer=name)
        self._name = name
        self._instance = uuid.uuid4().hex
        self._sink = KafkaSink(settings)
        self._started = asyncio.Lock()

    async def start(self) -> bool:
        """Connect to Kafka (idempotent); raises KafkaStartError with a clear message."""
        async with self._started:
            if not self._sink.stats.ready:
                await self._sink.start()
        return True

    async def send_batch(
        self, records: list[WireRecord], expected_instance: str | None = None
    ) -> tuple[int, str]:
        """Send and await acks; returns (count, this incarnation's id).

        A batch addressed to an earlier incarnation (the actor restarted since the shard
        last heard from it) is refused unsent, so the shard re-sends everything that
        incarnation had not acknowledged, in order, before anything newer gets through.
        """
        if expected_instance is not None and expected_instance != self._instance:
            raise StaleProducerError(f"{self._name} restarted; re-send from the oldest unacked")
        if not self._sink.stats.ready:
            await self.start()  # after an actor restart the producer starts lazily
        try:
            return await self._sink.send_batch(records), self._instance
        except Exception:
            if not self._sink.started:
                # The sink dropped its producer: batches addressed to this incarnation
                # must not overtake the ones that failed with it.
                self._instance = uuid.uuid4().hex
            raise

    async def stats(self) -> dict[str, Any]:
        s = self._sink.stats
        return {
            "name": self._name,
            "ready": s.ready,
            "batches": s.batches,
            "records": s.records,
            "errors": s.errors,
            "last_error": s.last_error,
        }

    async def close(self) -> None:
        await self._sink.stop()


def _sender(producer: Any) -> SendBatch:
    async def send(records: list[WireRecord], instance: str | None) -> tuple[int, str]:
        return await producer.send_batch.remote(records, instance)

    return send


@ray.remote(num_cpus=IO_ACTOR_CPUS, max_restarts=0)
class ShardActor:
    """Owns one Alpaca session, its dedup cache and seq counters, and its outbox."""

    def __init__(self, settings: Settings, spec: ShardSpec, producers: list[Any]) -> None:
        logs.configure(
            settings.log_level, actor="shard", shard=spec.shard_id, symbols=len(spec.symbols)
        )
        self._core = ShardCore(settings, spec, [_sender(p) for p in producers])

    async def run(self) -> dict[str, Any]:
        """Runs until `stop()`; a fatal feed error fails this call with the reason."""
        await self._core.run()
        return self._core.stats()

    async def stop(self, timeout: float = 30.0) -> bool:
        return await self._core.stop(timeout)

    async def stats(self) -> dict[str, Any]:
        return self._core.stats()
