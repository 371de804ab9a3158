"""Actor-side metrics: `ray.util.metrics` fed from each actor's own `stats()` dict.

Every `ShardActor` and `ProducerActor` runs one `StatsExporter`, a periodic asyncio task
that reads the same plain-data `stats()` the driver polls and turns it into Ray metrics:
counters are increased by the delta since the previous tick, gauges are set. Ray's
metrics agent on each node exports them (prefixed ``ray_``, counters suffixed ``_total``),
which is what Prometheus scrapes on KubeRay; see docs/observability.md.

Tags are shard, producer, channel, reason, code and state only — never a symbol — so the
number of series stays bounded by configuration, not by the market. Names, help texts and
tags come from `metric_catalogue.py`, the one list of every metric the forwarder exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from ray_forwarder.ops.metric_catalogue import (
    ACTOR_PREFIX,
    LATENCY_HELP,
    SCRAPED_PREFIX,
    MetricSpec,
    spec,
)

log = logging.getLogger(__name__)

#: Ray exports every application metric as ``ray_<name>``; all of ours start with this.
PREFIX = ACTOR_PREFIX
EXPORT_PREFIX = SCRAPED_PREFIX
DEFAULT_INTERVAL_S = 1.0

#: Connection states a shard reports (session.py), one-hot in `forwarder_shard_state`.
SHARD_STATES = (
    "starting",
    "connected",
    "authenticated",
    "subscribed",
    "subscription_changed",
    "disconnected",
    "reconnecting",
    "failed",
)
#: Histogram bucket bounds in seconds, shared by every latency histogram (the Ray export
#: and the driver's /metrics). Event-time latency of minute bars is >= 60 s by nature.
LATENCY_BOUNDARIES = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
]  # fmt: skip

#: Latency kinds: metric name (Ray: ``forwarder_<name>``; driver: ``ray_forwarder_<driver>``)
LATENCY_KINDS = {
    # batch handed to a producer actor -> Kafka acknowledged all of it (per attempt)
    "publish": ("shard_publish_latency_seconds", "publish_latency_seconds"),
    # the frame carrying the batch's oldest record was received -> Kafka ack
    "receive": ("shard_receive_to_ack_latency_seconds", "receive_to_ack_latency_seconds"),
    # the item's own timestamp (`event_ts`) -> Kafka ack, by channel
    "event": ("shard_event_to_ack_latency_seconds", "event_to_ack_latency_seconds"),
}
LATENCY_DOCS = LATENCY_HELP
#: At most this many raw observations wait for the Ray exporter between two ticks.
PENDING_OBSERVATIONS_MAX = 20_000


class LatencyRecorder:
    """Ack latencies, observed in the shard's event loop by the outbox's ack hook.

    Keeps cumulative bucket counts per (kind, channel) -- what `stats()` reports and the
    driver renders as Prometheus histograms -- and a bounded queue of raw observations that
    the actor's `StatsExporter` drains into Ray histograms every tick. One observation per
    acknowledged batch (and per topic in it for event time), never per record, so the cost
    is independent of throughput. No Ray in here.
    """

    def __init__(
        self,
        boundaries: Sequence[float] = LATENCY_BOUNDARIES,
        pending_max: int = PENDING_OBSERVATIONS_MAX,
    ) -> None:
        self.boundaries = list(boundaries)
        self._hist: dict[tuple[str, str], list[float]] = {}  # [count per bucket..., sum]
        self._pending: deque[tuple[str, str, float]] = deque(maxlen=pending_max)
        self.pending_lost = 0

    def observe(self, kind: str, channel: str, seconds: float) -> None:
        seconds = max(0.0, seconds)  # clock skew between the feed and us must not go negative
        row = self._hist.get((kind, channel))
        if row is None:
            row = self._hist[(kind, channel)] = [0.0] * (len(self.boundaries) + 2)
        bucket = len(self.boundaries)  # +Inf
        for index, bound in enumerate(self.boundaries):
            if seconds <= bound:
                bucket = index
                break
        row[bucket] += 1
        row[-1] += seconds
        if len(self._pending) == self._pending.maxlen:
            self.pending_lost += 1
        self._pending.append((kind, channel, seconds))

    def on_ack(
        self, records: Sequence[tuple[str, bytes, bytes]], received: float, submitted: float,
        acked: float,
    ) -> None:  # fmt: skip
        """The outbox's `AckObserver`: monotonic times of one acknowledged batch."""
        self.observe("publish", "", acked - submitted)
        self.observe("receive", "", acked - received)
        now = time.time()
        seen: set[str] = set()
        for topic, _key, value in records:
            if topic in seen:
                continue
            seen.add(topic)
            channel, event_time = envelope_event_time(value)
            if channel is not None and channel != "status" and event_time is not None:
                self.observe("event", channel, now - event_time)

    def snapshot(self) -> list[dict[str, Any]]:
        """Cumulative histograms as plain data (pickled to the driver with `stats()`)."""
        return [
            {
                "kind": kind,
                "channel": channel,
                "buckets": row[:-1],  # per bucket, not cumulative; the last is +Inf
                "sum": row[-1],
                "count": sum(row[:-1]),
            }
            for (kind, channel), row in sorted(self._hist.items())
        ]

    def drain(self) -> list[tuple[str, str, float]]:
        """The raw observations since the last drain (for Ray's histograms)."""
        out = list(self._pending)
        self._pending.clear()
        return out


def envelope_event_time(value: bytes) -> tuple[str | None, float | None]:
    """(channel, event_ts as epoch seconds) of a serialised envelope; Nones if unreadable."""
    try:
        envelope = orjson.loads(value)
        channel = envelope.get("channel")
        ts = envelope["event_ts"]  # RFC 3339, nine fractional digits, Z
        moment = datetime.fromisoformat(ts[:26]).replace(tzinfo=UTC)
        return channel, moment.timestamp()
    except Exception:
        return None, None


StatsFn = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]


def _metrics() -> Any:
    from ray.util import metrics  # imported lazily: the module is importable without Ray

    return metrics


def _actor_spec(key: str, kind: str) -> MetricSpec:
    """The catalogue entry of an actor metric, checked to be of the kind the code makes."""
    entry = spec(key, "actor")
    if entry.kind != kind:
        raise ValueError(f"metric {key} is a {entry.kind} in the catalogue, not a {kind}")
    return entry


class _DeltaCounter:
    """A Ray Counter fed with cumulative values: increases by the delta since last time.

    A value that goes down (the source restarted) counts from zero again."""

    def __init__(self, key: str) -> None:
        entry = _actor_spec(key, "counter")
        self._counter = _metrics().Counter(entry.created_as, entry.help, tag_keys=entry.labels)
        self._last: dict[tuple[tuple[str, str], ...], float] = {}

    def update(self, value: float, tags: dict[str, str]) -> None:
        key = tuple(sorted(tags.items()))
        last = self._last.get(key, 0.0)
        delta = value - last if value >= last else value
        self._last[key] = value
        if delta > 0:
            self._counter.inc(delta, tags=tags)


class _Gauge:
    def __init__(self, key: str) -> None:
        entry = _actor_spec(key, "gauge")
        self._gauge = _metrics().Gauge(entry.created_as, entry.help, tag_keys=entry.labels)

    def update(self, value: float, tags: dict[str, str]) -> None:
        self._gauge.set(float(value), tags=tags)


class ShardMetrics:
    """Ray metrics for one shard, updated from `ShardCore.stats()`."""

    #: stats() key -> catalogue key of the per-channel counters.
    SHARD_COUNTERS = (
        ("received", "shard_events_received"),
        ("emitted", "shard_events_emitted"),
        ("acked", "shard_events_forwarded"),
        ("deduplicated", "shard_events_deduplicated"),
        ("dropped", "shard_events_dropped"),
    )
    #: stats() key -> catalogue key of the per-shard counters.
    PLAIN_COUNTERS = (
        ("connects", "shard_connects"),
        ("reconnects", "shard_reconnects"),
        ("stale_reconnects", "shard_stale_reconnects"),
        ("stale_data_reconnects", "shard_stale_data_reconnects"),
        ("resubscribes", "shard_resubscribes"),
        ("batches_failed", "shard_batches_failed"),
        ("batches_resent", "shard_batches_resent"),
        ("finals", "shard_final_bars"),
        ("late_bar_revisions", "shard_late_bar_revisions"),
        ("dedup_evicted", "shard_dedup_evictions"),
        ("seq_evicted", "shard_seq_evictions"),
        ("spool_lost", "shard_spool_lost_records"),
    )
    #: stats() key -> catalogue key of the per-reason counters.
    REASON_COUNTERS = (
        ("dead_lettered", "shard_records_dead_lettered"),
        ("dead_letter_dropped", "shard_dead_letters_dropped"),
    )

    def __init__(
        self, shard_id: str, recorder: LatencyRecorder | None = None, stream: str = "stocks"
    ) -> None:
        self.shard_id = shard_id
        self.stream = stream
        self._by_channel = [(key, _DeltaCounter(name)) for key, name in self.SHARD_COUNTERS]
        self._skipped = _DeltaCounter("shard_items_skipped")
        self._gaps = GapMetrics(shard_id)
        self._errors = _DeltaCounter("shard_feed_errors")
        self._by_reason = [(key, _DeltaCounter(name)) for key, name in self.REASON_COUNTERS]
        self._plain = [(key, _DeltaCounter(name)) for key, name in self.PLAIN_COUNTERS]
        self._subscribed = _Gauge("shard_subscribed")
        self._state = _Gauge("shard_state")
        self._buffered = _Gauge("shard_buffered_events")
        self._in_flight = _Gauge("shard_in_flight_events")
        self._spooled = _Gauge("shard_spooled_events")
        self._spooled_bytes = _Gauge("shard_spooled_bytes")
        self._symbols = _Gauge("shard_symbols")
        self._dedup_window = _Gauge("shard_dedup_window_seconds")
        self._dedup_keys = _Gauge("shard_dedup_keys")
        self._unserved = _Gauge("shard_unserved_subscriptions")
        self._market_open = _Gauge("shard_market_open")
        self._overflowing = _Gauge("shard_overflowing")
        self._last_latency = _Gauge("shard_last_ack_latency_seconds")
        self._histograms: dict[str, Any] = {}
        for kind, (name, _driver_name) in LATENCY_KINDS.items():
            entry = _actor_spec(name, "histogram")
            self._histograms[kind] = _metrics().Histogram(
                entry.created_as,
                entry.help,
                boundaries=LATENCY_BOUNDARIES,
                tag_keys=entry.labels,
            )
        self._recorder = recorder

    def drain(self) -> None:
        """Feed the recorder's new observations into Ray's histograms."""
        if self._recorder is None:
            return
        shard = {"shard": self.shard_id, "stream": self.stream}
        for kind, channel, seconds in self._recorder.drain():
            tags = {**shard, "channel": channel} if kind == "event" else shard
            self._histograms[kind].observe(seconds, tags=tags)

    def update(self, stats: Mapping[str, Any]) -> None:
        shard = {"shard": self.shard_id, "stream": self.stream}
        for key, counter in self._by_channel:
            for channel, value in (stats.get(key) or {}).items():
                counter.update(value, {**shard, "channel": str(channel)})
        for reason, value in (stats.get("skipped") or {}).items():
            self._skipped.update(value, {**shard, "reason": str(reason)})
        for code, value in (stats.get("errors_by_code") or {}).items():
            self._errors.update(value, {**shard, "code": str(code)})
        for key, counter in self._by_reason:
            for reason, value in (stats.get(key) or {}).items():
                counter.update(value, {**shard, "reason": str(reason)})
        for key, counter in self._plain:
            counter.update(stats.get(key) or 0, shard)
        self._subscribed.update(1.0 if stats.get("subscribed") else 0.0, shard)
        current = stats.get("state")
        for state in SHARD_STATES:
            self._state.update(1.0 if state == current else 0.0, {**shard, "state": state})
        self._buffered.update(stats.get("buffered") or 0, shard)
        self._in_flight.update(stats.get("in_flight") or 0, shard)
        self._spooled.update(stats.get("spooled") or 0, shard)
        self._spooled_bytes.update(stats.get("spooled_bytes") or 0, shard)
        self._symbols.update(stats.get("symbols") or 0, shard)
        self._dedup_window.update(stats.get("dedup_window_s") or 0, shard)
        self._dedup_keys.update(stats.get("dedup_keys") or 0, shard)
        self._unserved.update(stats.get("unserved") or 0, shard)
        self._market_open.update(1.0 if stats.get("market_open", True) else 0.0, shard)
        self._overflowing.update(1.0 if stats.get("overflowing") else 0.0, shard)
        latency = stats.get("last_ack_latency_s")
        if latency is not None:
            self._last_latency.update(latency, shard)
        self._gaps.update(stats)
        self.drain()


class GapMetrics:
    """Gaps and backfill of one shard (ShardCore.stats(): `gaps`, `gap_seconds`,
    `backfill`), labelled by stream."""

    def __init__(self, shard_id: str) -> None:
        self.shard_id = shard_id
        self._gaps = _DeltaCounter("shard_gaps")
        self._seconds = _DeltaCounter("shard_gap_seconds")
        self._unfilled = _DeltaCounter("shard_gaps_unfilled")
        self._bars = _DeltaCounter("shard_backfill_bars")
        self._ticks = _DeltaCounter("shard_backfill_ticks")
        self._requests = _DeltaCounter("shard_backfill_requests")
        self._limited = _DeltaCounter("shard_backfill_rate_limited")

    def update(self, stats: Mapping[str, Any]) -> None:
        tags = {"shard": self.shard_id, "stream": str(stats.get("stream") or "stocks")}
        for cause, value in (stats.get("gaps") or {}).items():
            self._gaps.update(value, {**tags, "cause": str(cause)})
        for cause, value in (stats.get("gap_seconds") or {}).items():
            self._seconds.update(value, {**tags, "cause": str(cause)})
        backfill = stats.get("backfill") or {}
        for reason, value in (backfill.get("gaps_unfilled") or {}).items():
            self._unfilled.update(value, {**tags, "reason": str(reason)})
        for outcome in ("final", "open", "merged", "same", "already_final"):
            if outcome in backfill:
                self._bars.update(backfill[outcome], {**tags, "outcome": outcome})
        for name, value in (backfill.get("tick_records") or {}).items():
            channel, _, outcome = str(name).partition("_")  # trades_emitted, ...
            self._ticks.update(value, {**tags, "channel": channel, "outcome": outcome})
        self._requests.update(backfill.get("requests") or 0, tags)
        self._limited.update(backfill.get("rate_limited") or 0, tags)


class ProducerMetrics:
    """Ray metrics for one producer actor, updated from `ProducerActor.stats()`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._counters = [
            (key, _DeltaCounter(metric))
            for key, metric in (
                ("batches", "producer_batches"),
                ("records", "producer_records"),
                ("errors", "producer_kafka_errors"),
                ("refused", "producer_records_refused"),
                ("probe_failures", "producer_probe_failures"),
            )
        ]
        self._ready = _Gauge("producer_ready")
        self._ack_age = _Gauge("producer_last_ack_age_seconds")

    def update(self, stats: Mapping[str, Any]) -> None:
        tags = {"producer": self.name}
        for key, counter in self._counters:
            counter.update(stats.get(key) or 0, tags)
        self._ready.update(1.0 if stats.get("ready") else 0.0, tags)
        age = stats.get("last_ok_age_s")
        if age is not None:
            self._ack_age.update(age, tags)


class StatsExporter:
    """Runs `update(stats())` every `interval` seconds in the actor's event loop."""

    def __init__(
        self,
        stats: StatsFn,
        update: Callable[[Mapping[str, Any]], None],
        interval: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self._stats = stats
        self._update = update
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0

    def start(self) -> None:
        """Start the loop (idempotent); call from inside the actor's running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="metrics-exporter"
            )

    async def tick(self) -> None:
        """One export; failures are logged, never raised (metrics must not stop a shard)."""
        try:
            stats = self._stats()
            if inspect.isawaitable(stats):
                stats = await stats
            self._update(stats)
            self.ticks += 1
        except Exception:
            log.warning("metrics export failed", exc_info=True)

    async def _loop(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        """Cancel the loop and export once more, so final counts are not lost."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.tick()
