"""The driver's HTTP endpoints: `/metrics` (Prometheus text), `/healthz`, `/livez`."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ray_forwarder.metrics import LATENCY_BOUNDARIES, LATENCY_DOCS, LATENCY_KINDS
from ray_forwarder.stats import ForwarderSnapshot

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


#: Per-shard gauges on the driver's /metrics: (name, help, value from the shard's stats).
_SHARD_GAUGES: list[tuple[str, str, Callable[[dict[str, Any]], float]]] = [
    (
        "ray_forwarder_shard_subscribed",
        "1 once the feed acknowledged the shard's subscription, else 0.",
        lambda shard: 1.0 if shard.get("subscribed") else 0.0,
    ),
    (
        "ray_forwarder_shard_symbols",
        "Symbols a shard subscribes to.",
        lambda shard: shard.get("symbols", 0),
    ),
    (
        "ray_forwarder_buffer_events",
        "Records buffered or in flight to a producer (not yet acknowledged).",
        lambda shard: shard.get("buffered", 0) + shard.get("in_flight", 0),
    ),
    (
        "ray_forwarder_spool_events",
        "Records in a shard's disk spool (memory buffer full, waiting for Kafka).",
        lambda shard: shard.get("spooled", 0),
    ),
    (
        "ray_forwarder_shard_overflowing",
        "1 while the shard's buffer is full and records are being dropped.",
        lambda shard: 1.0 if shard.get("overflowing") else 0.0,
    ),
    (
        "ray_forwarder_dedup_window_seconds",
        "Age of a shard's oldest dedup key: how far back redeliveries are recognised now "
        "(below DEDUP_TTL_SECONDS when DEDUP_MAX_KEYS is too small for the item rate).",
        lambda shard: shard.get("dedup_window_s", 0.0),
    ),
    (
        "ray_forwarder_dedup_keys",
        "Keys in a shard's dedup cache (bounded by DEDUP_MAX_KEYS).",
        lambda shard: shard.get("dedup_keys", 0),
    ),
    (
        "ray_forwarder_shard_unserved_subscriptions",
        "(channel, symbol) pairs the shard asked for that the feed's subscription reply still "
        "lacks after every re-send (see the subscription_mismatch status event).",
        lambda shard: shard.get("unserved", 0),
    ),
    (
        "ray_forwarder_shard_market_open",
        "1 while the shard considers the market open (Alpaca's clock, or assumed), else 0.",
        lambda shard: 1.0 if shard.get("market_open", True) else 0.0,
    ),
    (
        "ray_forwarder_last_ack_latency_seconds",
        "Receipt-to-Kafka-ack latency of the shard's latest acknowledged batch.",
        lambda shard: shard.get("last_ack_latency_s", 0.0),
    ),
]


class SnapshotCollector(Collector):
    """Renders the latest actor snapshot; labels are channel, shard, producer or code —
    never symbol, so cardinality stays bounded."""

    def __init__(self, snapshot: Callable[[], ForwarderSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        for name, key, doc in (
            ("events_received", "received", "Data items decoded from the Alpaca feed."),
            ("events_emitted", "emitted", "Records produced by the pipeline (after dedup)."),
            ("events_forwarded", "acked", "Records acknowledged by Kafka (acks=all)."),
            ("events_deduplicated", "deduplicated", "Redelivered items dropped as duplicates."),
            ("events_dropped", "dropped", "Records dropped because a shard's buffer was full."),
        ):
            family = CounterMetricFamily(
                f"ray_forwarder_{name}", doc + " Summed over shards.", labels=["channel"]
            )
            for channel, value in sorted(snap.total(key).items()):
                family.add_metric([channel], value)
            yield family
        skipped = CounterMetricFamily(
            "ray_forwarder_items_skipped",
            "Malformed frames or unknown items skipped, by reason.",
            labels=["reason"],
        )
        for reason, value in sorted(snap.total("skipped").items()):
            skipped.add_metric([reason], value)
        yield skipped
        for name, key, doc in (
            (
                "records_dead_lettered",
                "dead_lettered",
                "Records Kafka refused for good (or above MAX_RECORD_BYTES), diverted to the "
                "dead-letter topic, by reason.",
            ),
            (
                "dead_letters_dropped",
                "dead_letter_dropped",
                "Refused records dropped because the dead-letter topic refused them too.",
            ),
        ):
            family = CounterMetricFamily(f"ray_forwarder_{name}", doc, labels=["reason"])
            for reason, value in sorted(snap.total(key).items()):
                family.add_metric([reason], value)
            yield family
        errors = CounterMetricFamily(
            "ray_forwarder_feed_errors", "Alpaca error messages, by error code.", labels=["code"]
        )
        codes: Counter[str] = Counter()
        for shard in snap.shards:
            for code, value in shard.get("errors_by_code", {}).items():
                codes[str(code)] += value
        for code, value in sorted(codes.items()):
            errors.add_metric([code], value)
        yield errors
        per_shard = {
            "reconnects": CounterMetricFamily(
                "ray_forwarder_reconnects", "Reconnects of a shard's session.", labels=["shard"]
            ),
            "stale_reconnects": CounterMetricFamily(
                "ray_forwarder_stale_reconnects",
                "Reconnects of a shard whose stream went silent (STALE_STREAM_SECONDS).",
                labels=["shard"],
            ),
            "stale_data_reconnects": CounterMetricFamily(
                "ray_forwarder_stale_data_reconnects",
                "Reconnects of a shard that received no data item for DATA_STALE_SECONDS "
                "while the market was open.",
                labels=["shard"],
            ),
            "resubscribes": CounterMetricFamily(
                "ray_forwarder_resubscribes",
                "Re-sent subscribe messages for pairs a subscription reply left out.",
                labels=["shard"],
            ),
            "restarts": CounterMetricFamily(
                "ray_forwarder_shard_restarts",
                "Times a shard actor died and was restarted (process killed, node lost).",
                labels=["shard"],
            ),
            "dedup_evicted": CounterMetricFamily(
                "ray_forwarder_dedup_evictions",
                "Dedup keys evicted before their TTL because DEDUP_MAX_KEYS was reached.",
                labels=["shard"],
            ),
            "batches_failed": CounterMetricFamily(
                "ray_forwarder_batches_failed",
                "Batches a producer failed to acknowledge (they are re-sent).",
                labels=["shard"],
            ),
            "spool_lost": CounterMetricFamily(
                "ray_forwarder_spool_lost_records",
                "Spooled records that could not be read back (a segment cut by a full disk).",
                labels=["shard"],
            ),
        }
        state = GaugeMetricFamily(
            "ray_forwarder_shard_state",
            "1 for the shard's current connection state.",
            labels=["shard", "state"],
        )
        gauges = [
            (GaugeMetricFamily(name, doc, labels=["shard"]), value)
            for name, doc, value in _SHARD_GAUGES
        ]
        for shard in snap.shards:
            sid = shard["shard_id"]
            for key, family in per_shard.items():
                family.add_metric([sid], shard.get(key, 0))
            state.add_metric([sid, str(shard.get("state"))], 1.0)
            for family, value in gauges:
                family.add_metric([sid], value(shard))
        yield from per_shard.values()
        yield state
        yield from (family for family, _ in gauges)
        yield from _latency_histograms(snap)
        ready = GaugeMetricFamily(
            "ray_forwarder_producer_ready",
            "1 while the producer has a working Kafka connection, else 0.",
            labels=["producer"],
        )
        kafka_errors = CounterMetricFamily(
            "ray_forwarder_kafka_errors", "Failed Kafka deliveries.", labels=["producer"]
        )
        for producer in snap.producers:
            ready.add_metric([producer["name"]], 1.0 if producer.get("ready") else 0.0)
            kafka_errors.add_metric([producer["name"]], producer.get("errors", 0))
        yield ready
        yield kafka_errors
        unreachable = GaugeMetricFamily(
            "ray_forwarder_actors_unreachable",
            "Actors that did not answer the driver's last stats poll.",
        )
        unreachable.add_metric([], len(snap.unreachable))
        yield unreachable
        healthy = GaugeMetricFamily(
            "ray_forwarder_healthy", "1 when /healthz answers 200 (see docs/observability.md)."
        )
        ok, body = snap.health()
        healthy.add_metric([], 1.0 if ok else 0.0)
        yield healthy
        degraded = GaugeMetricFamily(
            "ray_forwarder_degraded",
            "1 when /healthz answers 200 but degraded (a shard's subscription is incomplete).",
        )
        degraded.add_metric([], 1.0 if body["status"] == "degraded" else 0.0)
        yield degraded


def _latency_histograms(snap: ForwarderSnapshot) -> Iterator[Metric]:
    """The shards' cumulative latency histograms (`LatencyRecorder.snapshot()`), per shard
    (and channel for event time), with the same buckets as the Ray export."""
    bounds = [floatToGoString(b) for b in LATENCY_BOUNDARIES] + ["+Inf"]
    for kind, (_ray_name, name) in LATENCY_KINDS.items():
        labels = ["shard", "channel"] if kind == "event" else ["shard"]
        family = HistogramMetricFamily(f"ray_forwarder_{name}", LATENCY_DOCS[kind], labels=labels)
        for shard in snap.shards:
            for row in shard.get("latency", []):
                if row["kind"] != kind or len(row["buckets"]) != len(bounds):
                    continue
                cumulative, buckets = 0.0, []
                for bound, count in zip(bounds, row["buckets"], strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                values = (
                    [shard["shard_id"], row["channel"]] if kind == "event" else [shard["shard_id"]]
                )
                family.add_metric(values, buckets, row["sum"])
        yield family


class HealthServer:
    def __init__(self, snapshot: Callable[[], ForwarderSnapshot], port: int) -> None:
        self._snapshot = snapshot
        self._port = port
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(SnapshotCollector(snapshot))
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", self._livez)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "0.0.0.0", self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("serving /metrics /healthz /livez on port %s", self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._registry),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type": CONTENT_TYPE},
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        """Ready: 200 only once every producer has a working Kafka connection and every
        shard has an acknowledged subscription; else 503 with the problems as JSON.
        Degraded (a subscription the feed serves only in part) is 200 with
        ``"status": "degraded"``, or 503 with ``?strict`` for those who gate on it."""
        ok, body = self._snapshot().health()
        if "strict" in request.query and body["status"] == "degraded":
            ok = False
        return web.json_response(body, status=200 if ok else 503)

    async def _livez(self, _request: web.Request) -> web.Response:
        """Liveness: the driver's event loop answers; independent of Kafka and the feed."""
        return web.json_response({"status": "alive"})
