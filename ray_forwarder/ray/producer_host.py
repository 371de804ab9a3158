"""One Kafka producer as a process hosts it: a `KafkaSink`, the idle probe that keeps its
`ready` honest, its stats and its metrics.

A `ProducerActor` is a thin shell around one (`PRODUCERS` >= 1, shared by the shards). With
`PRODUCERS=0` each shard actor hosts its own, in its own event loop: its lanes call
`send_batch` directly, with no Ray call between the shard and Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from ray_forwarder.config import Settings
from ray_forwarder.core.deadletter import refusal_reason
from ray_forwarder.ops.metrics import ProducerMetrics, StatsExporter
from ray_forwarder.runtime.outbox import RecordsRefused, StaleProducerError, Ticket
from ray_forwarder.runtime.producer import KafkaSink
from ray_forwarder.runtime.wire import PackedBatch

log = logging.getLogger(__name__)

#: An idle producer asks Kafka for metadata this often, so `ready` notices a dead broker.
KAFKA_PROBE_INTERVAL_S = 2.0
KAFKA_PROBE_TIMEOUT_S = 5.0


class ProducerHost:
    """Owns one idempotent aiokafka producer (`KafkaSink`); takes whole batches."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.name = name
        self._sink = KafkaSink(settings, name=uuid.uuid4().hex)
        self._kafka_ok = True  # the latest probe's verdict; a failed send also clears it
        self._last_ok = time.monotonic()
        self._probe_failures = 0
        self._probe_error: str | None = None
        self._probe: asyncio.Task[None] | None = None
        self._metrics = StatsExporter(self.stats, ProducerMetrics(name).update)

    def ensure_background(self) -> None:
        """Start the metrics exporter and the Kafka probe in the running event loop."""
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
                        "producer %s: Kafka not answering: %s", self.name, self._probe_error
                    )
                self._kafka_ok = False
            else:
                if not self._kafka_ok:
                    log.info("producer %s: Kafka answering again", self.name)
                self._kafka_ok = True
                self._probe_error = None
                self._last_ok = time.monotonic()

    async def start(self) -> bool:
        """Connect to Kafka (idempotent); raises KafkaStartError with a clear message."""
        self.ensure_background()
        await self._sink.start()
        return True

    async def send_batch(self, records: PackedBatch, ticket: Ticket) -> tuple[int, str]:
        """Send and await acks; returns (count, the producer's token).

        The token names this host and its current Kafka producer. A batch addressed to an
        earlier one (the actor restarted, or its producer was discarded after a failed
        delivery) is refused unsent, so the shard re-sends everything that one had not
        acknowledged, in order, before anything newer gets through.
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

    def stats(self) -> dict[str, Any]:
        s = self._sink.stats
        return {
            "name": self.name,
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
            self._probe = None
        await self._metrics.stop()
        await self._sink.stop()
