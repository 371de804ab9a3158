"""Every metric the forwarder exports, in one place: name, type, help, labels and source.

Two sources feed Prometheus, and a Prometheus that scrapes both (the PodMonitors do) must
never see one series name from both, or every `sum()` over it counts twice:

- ``actor``: `ray.util.metrics` in the shard and producer actors (`metrics.py`), exported by
  Ray's agent on every node. Created as ``forwarder_<key>``; Ray prefixes ``ray_`` (and
  appends ``_total`` to counters), so they are scraped as ``ray_forwarder_<key>``. Every
  actor key starts with ``shard_`` or ``producer_``.
- ``driver``: the driver's ``/metrics`` (`http.py`), rendered from its latest poll of all
  actors. Scraped as ``ray_forwarder_<key>``; no driver key starts with ``shard_`` or
  ``producer_``.

So the scraped family name is ``ray_forwarder_<key>`` for both, and a key is unique across
the catalogue: that is what keeps the two sources apart (checked on import, and against a
real scrape in tests/test_observability.py). `metrics.py`, `http.py`, the Grafana dashboard
and its test all take names from here.

To add a metric: add one `MetricSpec` below (mind the prefix rule), then create it in
`metrics.py` (actor) or render it in `http.py` (driver) with `spec(key)`; document it in
docs/observability.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
Source = Literal["actor", "driver"]

#: What every scraped forwarder series starts with, whichever the source.
SCRAPED_PREFIX = "ray_forwarder_"
#: The name an actor metric is created with; Ray's export adds ``ray_`` in front.
ACTOR_PREFIX = "forwarder_"
ACTOR_KEY_PREFIXES = ("shard_", "producer_")

SHARD = ("shard",)
SHARD_CHANNEL = ("shard", "channel")
PRODUCER = ("producer",)


@dataclass(frozen=True)
class MetricSpec:
    key: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    source: Source

    @property
    def name(self) -> str:
        """The family name as scraped (without a counter's ``_total``)."""
        return SCRAPED_PREFIX + self.key

    @property
    def created_as(self) -> str:
        """The name the code creates: ``forwarder_…`` for Ray, the scraped name otherwise."""
        return ACTOR_PREFIX + self.key if self.source == "actor" else self.name

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The sample names a scrape holds for this metric."""
        if self.kind == "counter":
            return (self.name + "_total",)
        if self.kind == "histogram":
            return tuple(self.name + suffix for suffix in ("_bucket", "_count", "_sum"))
        return (self.name,)


def _with_stream(labels: tuple[str, ...]) -> tuple[str, ...]:
    """Every per-shard series is also labelled with its stream (stocks, crypto, ...: the
    shard's `alpaca/streams.py` name), right after `shard`."""
    return ("shard", "stream", *labels[1:]) if labels[:1] == ("shard",) else labels


def _actor(key: str, kind: Kind, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(key, kind, _with_stream(labels), help, "actor")


def _driver(key: str, kind: Kind, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(key, kind, _with_stream(labels), help, "driver")


LATENCY_HELP = {
    "publish": "Batch handed to a producer actor -> acknowledged by Kafka, per batch.",
    "receive": "Frame received (the batch's oldest record) -> acknowledged by Kafka, per batch.",
    "event": "Event timestamp (event_ts) -> acknowledged by Kafka, per batch and channel "
    "(the first record of each topic in the batch).",
}

CATALOGUE: tuple[MetricSpec, ...] = (
    # ---- actor: per shard (ShardMetrics, from ShardCore.stats())
    _actor("shard_events_received", "counter", SHARD_CHANNEL,
           "Data items decoded from the feed, by channel."),
    _actor("shard_events_emitted", "counter", SHARD_CHANNEL,
           "Records the pipeline produced, by channel."),
    _actor("shard_events_forwarded", "counter", SHARD_CHANNEL,
           "Records acknowledged by Kafka, by channel."),
    _actor("shard_events_deduplicated", "counter", SHARD_CHANNEL,
           "Redelivered items dropped, by channel."),
    _actor("shard_events_dropped", "counter", SHARD_CHANNEL,
           "Records dropped on buffer overflow, by channel."),
    _actor("shard_items_skipped", "counter", ("shard", "reason"),
           "Malformed frames or items skipped."),
    _actor("shard_feed_errors", "counter", ("shard", "code"), "Alpaca error messages by code."),
    _actor("shard_records_dead_lettered", "counter", ("shard", "reason"),
           "Records Kafka refused for good, diverted to the dead-letter topic."),
    _actor("shard_dead_letters_dropped", "counter", ("shard", "reason"),
           "Refused records dropped: the dead-letter topic refused them too."),
    _actor("shard_connects", "counter", SHARD, "WebSocket connections opened."),
    _actor("shard_reconnects", "counter", SHARD, "Reconnects after a lost or refused session."),
    _actor("shard_stale_reconnects", "counter", SHARD, "Reconnects of a silent stream."),
    _actor("shard_stale_data_reconnects", "counter", SHARD,
           "Reconnects of a stream without data while the market was open."),
    _actor("shard_resubscribes", "counter", SHARD, "Re-sends of a subscription's gaps."),
    _actor("shard_batches_failed", "counter", SHARD, "Batches a producer failed to ack."),
    _actor("shard_batches_resent", "counter", SHARD, "Batches re-sent after a failure."),
    _actor("shard_final_bars", "counter", SHARD, "Final minute-bar records emitted."),
    _actor("shard_late_bar_revisions", "counter", SHARD, "Revisions after a final."),
    _actor("shard_dedup_evictions", "counter", SHARD,
           "Dedup keys evicted before their TTL (DEDUP_MAX_KEYS reached)."),
    _actor("shard_seq_evictions", "counter", SHARD,
           "(channel, symbol) seq counters forgotten at the `*` bound (seq jumps)."),
    _actor("shard_spool_lost_records", "counter", SHARD, "Spooled records unreadable on disk."),
    _actor("shard_subscribed", "gauge", SHARD, "1 once the feed acknowledged the subscription."),
    _actor("shard_state", "gauge", ("shard", "state"),
           "1 for the shard's current connection state."),
    _actor("shard_buffered_events", "gauge", SHARD, "Records waiting for a producer."),
    _actor("shard_in_flight_events", "gauge", SHARD, "Records sent but not yet acknowledged."),
    _actor("shard_spooled_events", "gauge", SHARD, "Records in the shard's disk spool."),
    _actor("shard_spooled_bytes", "gauge", SHARD, "Bytes in the shard's disk spool."),
    _actor("shard_symbols", "gauge", SHARD, "Symbols this shard subscribes to."),
    _actor("shard_dedup_window_seconds", "gauge", SHARD,
           "Age of the oldest dedup key: how far back redeliveries are recognised now."),
    _actor("shard_dedup_keys", "gauge", SHARD, "Keys in the dedup cache."),
    _actor("shard_unserved_subscriptions", "gauge", SHARD,
           "(channel, symbol) pairs the feed left out of the subscription after every re-send."),
    _actor("shard_market_open", "gauge", SHARD, "1 while the market is open (or assumed open)."),
    _actor("shard_overflowing", "gauge", SHARD,
           "1 while the shard's buffer is full and records are dropped (see status events)."),
    _actor("shard_last_ack_latency_seconds", "gauge", SHARD,
           "Receipt-to-ack latency of the latest acknowledged batch."),
    _actor("shard_publish_latency_seconds", "histogram", SHARD, LATENCY_HELP["publish"]),
    _actor("shard_receive_to_ack_latency_seconds", "histogram", SHARD, LATENCY_HELP["receive"]),
    _actor("shard_event_to_ack_latency_seconds", "histogram", SHARD_CHANNEL,
           LATENCY_HELP["event"]),
    # gaps and backfill (GapMetrics; core/gaps.py, runtime/backfill.py)
    _actor("shard_gaps", "counter", ("shard", "stream", "cause"),
           "Closed gaps in a shard's data path (one `gap` status event each), by cause."),
    _actor("shard_gap_seconds", "counter", ("shard", "stream", "cause"),
           "Seconds without data in closed gaps (receive clock), by cause."),
    _actor("shard_gaps_unfilled", "counter", ("shard", "stream", "reason"),
           "Gaps backfill could not fill (one `gap_unfilled` status event each), by reason."),
    _actor("shard_backfill_bars", "counter", ("shard", "stream", "outcome"),
           "Backfilled minute bars: final, open (handed to the finaliser), merged into "
           "a pending bar (or the same as it), already_final."),
    _actor("shard_backfill_ticks", "counter", ("shard", "stream", "channel", "outcome"),
           "Backfilled trades and quotes (opt-in): emitted, or duplicate (the stream "
           "delivered it: same dedup key)."),
    _actor("shard_backfill_requests", "counter", ("shard", "stream"),
           "REST requests made by backfill (429s included)."),
    _actor("shard_backfill_rate_limited", "counter", ("shard", "stream"),
           "REST requests answered 429."),
    # ---- actor: per producer (ProducerMetrics, from ProducerActor.stats())
    _actor("producer_batches", "counter", PRODUCER, "Batches fully acknowledged by Kafka."),
    _actor("producer_records", "counter", PRODUCER, "Records acknowledged by Kafka."),
    _actor("producer_kafka_errors", "counter", PRODUCER, "Failed Kafka deliveries."),
    _actor("producer_records_refused", "counter", PRODUCER, "Records Kafka refused for good."),
    _actor("producer_probe_failures", "counter", PRODUCER, "Failed Kafka liveness probes."),
    _actor("producer_ready", "gauge", PRODUCER, "1 while the producer has working Kafka."),
    _actor("producer_last_ack_age_seconds", "gauge", PRODUCER,
           "Seconds since Kafka last acknowledged a batch or answered a probe."),
    # ---- driver: /metrics, from the driver's latest poll (sums over shards by channel)
    _driver("events_received", "counter", ("channel",),
            "Data items decoded from the Alpaca feed. Summed over shards."),
    _driver("events_emitted", "counter", ("channel",),
            "Records produced by the pipeline (after dedup). Summed over shards."),
    _driver("events_forwarded", "counter", ("channel",),
            "Records acknowledged by Kafka (acks=all). Summed over shards."),
    _driver("events_deduplicated", "counter", ("channel",),
            "Redelivered items dropped as duplicates. Summed over shards."),
    _driver("events_dropped", "counter", ("channel",),
            "Records dropped because a shard's buffer was full. Summed over shards."),
    _driver("items_skipped", "counter", ("reason",),
            "Malformed frames or unknown items skipped, by reason."),
    _driver("records_dead_lettered", "counter", ("reason",),
            "Records Kafka refused for good (or above MAX_RECORD_BYTES), diverted to the "
            "dead-letter topic, by reason."),
    _driver("dead_letters_dropped", "counter", ("reason",),
            "Refused records dropped because the dead-letter topic refused them too."),
    _driver("feed_errors", "counter", ("code",), "Alpaca error messages, by error code."),
    _driver("reconnects", "counter", SHARD, "Reconnects of a shard's session."),
    _driver("stale_reconnects", "counter", SHARD,
            "Reconnects of a shard whose stream went silent (STALE_STREAM_SECONDS)."),
    _driver("stale_data_reconnects", "counter", SHARD,
            "Reconnects of a shard that received no data item for DATA_STALE_SECONDS "
            "while the market was open."),
    _driver("resubscribes", "counter", SHARD,
            "Re-sent subscribe messages for pairs a subscription reply left out."),
    _driver("actor_restarts", "counter", SHARD,
            "Times a shard actor died and was restarted (process killed, node lost)."),
    _driver("dedup_evictions", "counter", SHARD,
            "Dedup keys evicted before their TTL because DEDUP_MAX_KEYS was reached."),
    _driver("batches_failed", "counter", SHARD,
            "Batches a producer failed to acknowledge (they are re-sent)."),
    _driver("spool_lost_records", "counter", SHARD,
            "Spooled records that could not be read back (a segment cut by a full disk)."),
    _driver("connection_state", "gauge", ("shard", "state"),
            "1 for the shard's current connection state."),
    _driver("subscribed", "gauge", SHARD,
            "1 once the feed acknowledged the shard's subscription, else 0."),
    _driver("symbols", "gauge", SHARD, "Symbols a shard subscribes to."),
    _driver("buffer_events", "gauge", SHARD,
            "Records buffered or in flight to a producer (not yet acknowledged)."),
    _driver("spool_events", "gauge", SHARD,
            "Records in a shard's disk spool (memory buffer full, waiting for Kafka)."),
    _driver("overflowing", "gauge", SHARD,
            "1 while the shard's buffer is full and records are being dropped."),
    _driver("dedup_window_seconds", "gauge", SHARD,
            "Age of a shard's oldest dedup key: how far back redeliveries are recognised now "
            "(below DEDUP_TTL_SECONDS when DEDUP_MAX_KEYS is too small for the item rate)."),
    _driver("dedup_keys", "gauge", SHARD,
            "Keys in a shard's dedup cache (bounded by DEDUP_MAX_KEYS)."),
    _driver("unserved_subscriptions", "gauge", SHARD,
            "(channel, symbol) pairs the shard asked for that the feed's subscription reply "
            "still lacks after every re-send (see the subscription_mismatch status event)."),
    _driver("market_open", "gauge", SHARD,
            "1 while the shard considers the market open (Alpaca's clock, or assumed), else 0."),
    _driver("last_ack_latency_seconds", "gauge", SHARD,
            "Receipt-to-Kafka-ack latency of the shard's latest acknowledged batch."),
    _driver("publish_latency_seconds", "histogram", SHARD, LATENCY_HELP["publish"]),
    _driver("receive_to_ack_latency_seconds", "histogram", SHARD, LATENCY_HELP["receive"]),
    _driver("event_to_ack_latency_seconds", "histogram", SHARD_CHANNEL, LATENCY_HELP["event"]),
    _driver("kafka_ready", "gauge", PRODUCER,
            "1 while the producer has a working Kafka connection, else 0."),
    _driver("kafka_errors", "counter", PRODUCER, "Failed Kafka deliveries."),
    _driver("actors_unreachable", "gauge", (),
            "Actors that did not answer the driver's last stats poll."),
    _driver("healthy", "gauge", (), "1 when /healthz answers 200 (see docs/observability.md)."),
    _driver("degraded", "gauge", (),
            "1 when /healthz answers 200 but degraded (a shard's subscription is incomplete)."),
)  # fmt: skip

BY_KEY: dict[str, MetricSpec] = {m.key: m for m in CATALOGUE}
BY_NAME: dict[str, MetricSpec] = {m.name: m for m in CATALOGUE}


def spec(key: str, source: Source | None = None) -> MetricSpec:
    """The catalogue entry for `key`; with `source`, also checks it belongs there."""
    entry = BY_KEY[key]
    if source is not None and entry.source != source:
        raise ValueError(f"metric {key} is a {entry.source} metric, not a {source} one")
    return entry


def check_catalogue(catalogue: tuple[MetricSpec, ...] = CATALOGUE) -> None:
    """Raise ValueError when two entries would scrape under one name, or a key breaks the
    prefix rule that keeps actor and driver series apart."""
    seen: set[str] = set()
    for entry in catalogue:
        if entry.key in seen:
            raise ValueError(f"metric {entry.key} is in the catalogue twice")
        seen.add(entry.key)
        if entry.key.startswith(ACTOR_KEY_PREFIXES) != (entry.source == "actor"):
            raise ValueError(
                f"metric {entry.key} ({entry.source}): actor keys, and only they, start with "
                f"{' or '.join(ACTOR_KEY_PREFIXES)}"
            )
    samples = [name for entry in catalogue for name in entry.sample_names]
    clashes = {name for name in samples if samples.count(name) > 1}
    if clashes:
        raise ValueError(f"sample names exported twice: {sorted(clashes)}")


check_catalogue()
