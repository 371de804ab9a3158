"""The driver's HTTP endpoints: `/metrics` (Prometheus text), `/healthz`, `/livez`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ray_forwarder.stats import ForwarderSnapshot

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SnapshotCollector(Collector):
    """Renders the latest actor snapshot; labels are channel, shard, producer or code —
    never symbol, so cardinality stays bounded."""

    def __init__(self, snapshot: Callable[[], ForwarderSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        for name, key, doc in (
            ("events_received", "received", "Items decoded from the feed."),
            ("events_forwarded", "acked", "Records acknowledged by Kafka."),
            ("events_deduplicated", "deduplicated", "Items dropped as duplicates."),
            ("events_dropped", "dropped", "Records dropped because buffers were full."),
        ):
            family = CounterMetricFamily(f"ray_forwarder_{name}", doc, labels=["channel"])
            for channel, value in sorted(snap.total(key).items()):
                family.add_metric([channel], value)
            yield family
        skipped = CounterMetricFamily(
            "ray_forwarder_items_skipped", "Malformed frames or items skipped.", labels=["reason"]
        )
        for reason, value in sorted(snap.total("skipped").items()):
            skipped.add_metric([reason], value)
        yield skipped
        errors = CounterMetricFamily(
            "ray_forwarder_feed_errors", "Alpaca error messages by code.", labels=["code"]
        )
        codes: dict[str, int] = {}
        for shard in snap.shards:
            for code, value in shard.get("errors_by_code", {}).items():
                codes[str(code)] = codes.get(str(code), 0) + value
        for code, value in sorted(codes.items()):
            errors.add_metric([code], value)
        yield errors
        reconnects = CounterMetricFamily(
            "ray_forwarder_reconnects", "Reconnects per shard.", labels=["shard"]
        )
        subscribed = GaugeMetricFamily(
            "ray_forwarder_shard_subscribed", "1 if the shard is subscribed.", labels=["shard"]
        )
        buffered = GaugeMetricFamily(
            "ray_forwarder_buffer_events", "Records waiting for a producer.", labels=["shard"]
        )
        for shard in snap.shards:
            sid = shard["shard_id"]
            reconnects.add_metric([sid], shard.get("reconnects", 0))
            subscribed.add_metric([sid], 1.0 if shard.get("subscribed") else 0.0)
            buffered.add_metric([sid], shard.get("buffered", 0) + shard.get("in_flight", 0))
        yield reconnects
        yield subscribed
        yield buffered
        ready = GaugeMetricFamily(
            "ray_forwarder_producer_ready", "1 if the producer has Kafka.", labels=["producer"]
        )
        for producer in snap.producers:
            ready.add_metric([producer["name"]], 1.0 if producer.get("ready") else 0.0)
        yield ready


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

    async def _healthz(self, _request: web.Request) -> web.Response:
        ok, body = self._snapshot().health()
        return web.json_response(body, status=200 if ok else 503)

    async def _livez(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})
