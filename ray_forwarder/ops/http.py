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

from ray_forwarder.ops.metric_catalogue import spec
from ray_forwarder.ops.metrics import LATENCY_BOUNDARIES, LATENCY_KINDS
from ray_forwarder.ray.stats import ForwarderSnapshot

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


#: Per-shard gauges on the driver's /metrics: (catalogue key, value from the shard's stats).
_SHARD_GAUGES: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
    ("subscribed", lambda shard: 1.0 if shard.get("subscribed") else 0.0),
    ("symbols", lambda shard: shard.get("symbols", 0)),
    ("buffer_events", lambda shard: shard.get("buffered", 0) + shard.get("in_flight", 0)),
    ("spool_events", lambda shard: shard.get("spooled", 0)),
    ("overflowing", lambda shard: 1.0 if shard.get("overflowing") else 0.0),
    ("dedup_window_seconds", lambda shard: shard.get("dedup_window_s", 0.0)),
    ("dedup_keys", lambda shard: shard.get("dedup_keys", 0)),
    ("unserved_subscriptions", lambda shard: shard.get("unserved", 0)),
    ("market_open", lambda shard: 1.0 if shard.get("market_open", True) else 0.0),
    ("last_ack_latency_seconds", lambda shard: shard.get("last_ack_latency_s", 0.0)),
]
#: Per-shard counters: (stats key, catalogue key).
_SHARD_COUNTERS = [
    ("reconnects", "reconnects"),
    ("stale_reconnects", "stale_reconnects"),
    ("stale_data_reconnects", "stale_data_reconnects"),
    ("resubscribes", "resubscribes"),
    ("restarts", "actor_restarts"),
    ("dedup_evicted", "dedup_evictions"),
    ("batches_failed", "batches_failed"),
    ("spool_lost", "spool_lost_records"),
]
#: Per-reason sums over shards: (stats key, catalogue key).
_REASON_COUNTERS = [
    ("dead_lettered", "records_dead_lettered"),
    ("dead_letter_dropped", "dead_letters_dropped"),
]
#: Per-channel sums over shards: (stats key, catalogue key).
_CHANNEL_COUNTERS = [
    ("received", "events_received"),
    ("emitted", "events_emitted"),
    ("acked", "events_forwarded"),
    ("deduplicated", "events_deduplicated"),
    ("dropped", "events_dropped"),
]
_FAMILIES = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
    "histogram": HistogramMetricFamily,
}


def family(key: str) -> Any:
    """An empty metric family for the catalogue's driver metric `key` (name, type, help and
    labels from `metric_catalogue.py`)."""
    entry = spec(key, "driver")
    return _FAMILIES[entry.kind](entry.name, entry.help, labels=list(entry.labels))


class SnapshotCollector(Collector):
    """Renders the latest actor snapshot; labels are channel, shard, producer or code —
    never symbol, so cardinality stays bounded. Every family is a driver entry of the
    metric catalogue; none shares a name with the actors' Ray export."""

    def __init__(self, snapshot: Callable[[], ForwarderSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        for stats_key, key in _CHANNEL_COUNTERS:
            by_channel = family(key)
            for channel, value in sorted(snap.total(stats_key).items()):
                by_channel.add_metric([channel], value)
            yield by_channel
        skipped = family("items_skipped")
        for reason, value in sorted(snap.total("skipped").items()):
            skipped.add_metric([reason], value)
        yield skipped
        for stats_key, key in _REASON_COUNTERS:
            by_reason = family(key)
            for reason, value in sorted(snap.total(stats_key).items()):
                by_reason.add_metric([reason], value)
            yield by_reason
        errors = family("feed_errors")
        codes: Counter[str] = Counter()
        for shard in snap.shards:
            for code, value in shard.get("errors_by_code", {}).items():
                codes[str(code)] += value
        for code, value in sorted(codes.items()):
            errors.add_metric([code], value)
        yield errors
        per_shard = {stats_key: family(key) for stats_key, key in _SHARD_COUNTERS}
        state = family("connection_state")
        gauges = [(family(key), value) for key, value in _SHARD_GAUGES]
        for shard in snap.shards:
            sid = [shard["shard_id"], shard.get("stream", "stocks")]
            for stats_key, counter in per_shard.items():
                counter.add_metric(sid, shard.get(stats_key, 0))
            state.add_metric([*sid, str(shard.get("state"))], 1.0)
            for gauge, value in gauges:
                gauge.add_metric(sid, value(shard))
        yield from per_shard.values()
        yield state
        yield from (gauge for gauge, _ in gauges)
        yield from _latency_histograms(snap)
        ready = family("kafka_ready")
        kafka_errors = family("kafka_errors")
        for producer in snap.producers:
            ready.add_metric([producer["name"]], 1.0 if producer.get("ready") else 0.0)
            kafka_errors.add_metric([producer["name"]], producer.get("errors", 0))
        yield ready
        yield kafka_errors
        unreachable = family("actors_unreachable")
        unreachable.add_metric([], len(snap.unreachable))
        yield unreachable
        ok, body = snap.health()
        healthy = family("healthy")
        healthy.add_metric([], 1.0 if ok else 0.0)
        yield healthy
        degraded = family("degraded")
        degraded.add_metric([], 1.0 if body["status"] == "degraded" else 0.0)
        yield degraded


def _latency_histograms(snap: ForwarderSnapshot) -> Iterator[Metric]:
    """The shards' cumulative latency histograms (`LatencyRecorder.snapshot()`), per shard
    (and channel for event time), with the same buckets as the Ray export."""
    bounds = [floatToGoString(b) for b in LATENCY_BOUNDARIES] + ["+Inf"]
    for kind, (_ray_name, name) in LATENCY_KINDS.items():
        histogram = family(name)
        for shard in snap.shards:
            for row in shard.get("latency", []):
                if row["kind"] != kind or len(row["buckets"]) != len(bounds):
                    continue
                cumulative, buckets = 0.0, []
                for bound, count in zip(bounds, row["buckets"], strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                sid = [shard["shard_id"], shard.get("stream", "stocks")]
                values = [*sid, row["channel"]] if kind == "event" else sid
                histogram.add_metric(values, buckets, row["sum"])
        yield histogram


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
