"""Matching what reached Kafka against what the load generator sent. Pure: no I/O.

Latency per item is broker append time (the topic's `LogAppendTime`) minus the generator's
stamp of the first write of the item; an item is found in Kafka by the digest of the
envelope's `payload`, which is the original item (field order aside).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ray_forwarder_dev.loadgen.feed import item_key


@dataclass(frozen=True)
class Percentiles:
    min: float
    p50: float
    p99: float
    max: float
    count: int


def percentiles(values: Iterable[float]) -> Percentiles | None:
    """Min, nearest-rank p50/p99 and max, or None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * n) - 1)]

    return Percentiles(ordered[0], rank(0.50), rank(0.99), ordered[-1], n)


@dataclass
class Stream:
    """One connection's share of a run (one shard of the forwarder)."""

    sent: int = 0
    delivered: int = 0
    first_sent: float = 0.0
    last_acked: float = 0.0

    @property
    def rate(self) -> float:
        span = self.last_acked - self.first_sent
        return self.delivered / span if self.delivered and span > 0 else 0.0


#: The middle of a run that `Delivery.sustained_rate` looks at (fractions of the items).
STEADY_FROM, STEADY_TO = 0.1, 0.9


@dataclass
class Delivery:
    """What reached Kafka, matched item by item against what was sent."""

    latencies: list[float] = field(default_factory=list)  # seconds, one per delivered item
    sent: int = 0  # distinct items sent
    delivered: int = 0  # distinct items found in Kafka
    lost: int = 0  # sent, never found
    duplicates: int = 0  # Kafka records beyond the first for an item
    unexpected: int = 0  # Kafka data records that match no sent item
    first_sent: float = 0.0
    last_acked: float = 0.0
    last_sent: float = 0.0
    appended: list[float] = field(default_factory=list)  # first append per item, sorted
    streams: dict[int, Stream] = field(default_factory=dict)  # per connection number

    @property
    def rate(self) -> float:
        """End to end: distinct items delivered / (last broker append - first send)."""
        span = self.last_acked - self.first_sent
        return self.delivered / span if self.delivered and span > 0 else 0.0

    @property
    def send_rate(self) -> float:
        """What the generator achieved: distinct items sent / (last send - first send)."""
        span = self.last_sent - self.first_sent
        return self.sent / span if self.sent and span > 0 else 0.0

    @property
    def sustained_rate(self) -> float:
        """Appends per second over the middle of the run (items 10 %..90 % in append
        order): the rate the system held, without the start and the final drain. At a fixed
        rate it is that rate if the system kept up, and its capacity if it did not."""
        n = len(self.appended)
        lo, hi = int(n * STEADY_FROM), max(0, int(n * STEADY_TO) - 1)
        span = self.appended[hi] - self.appended[lo] if n else 0.0
        return (hi - lo) / span if hi > lo and span > 0 else self.rate


def match_deliveries(sent: Iterable[Sequence[Any]], acked: Iterable[tuple[str, float]]) -> Delivery:
    """`sent`: (item key, send time[, connection number]) per write, duplicates included;
    `acked`: (item key, broker append time) per Kafka record. Latency per item: first
    append - first send."""
    first_sent: dict[str, float] = {}
    connection: dict[str, int] = {}
    for key, at, *rest in sent:
        if key not in first_sent or at < first_sent[key]:
            first_sent[key] = at
            connection[key] = rest[0] if rest else 0
    first_acked: dict[str, float] = {}
    out = Delivery(sent=len(first_sent))
    for key, at in acked:
        if key not in first_sent:
            out.unexpected += 1
        elif key in first_acked:
            out.duplicates += 1
            first_acked[key] = min(first_acked[key], at)
        else:
            first_acked[key] = at
    out.delivered = len(first_acked)
    out.lost = out.sent - out.delivered
    out.latencies = [at - first_sent[key] for key, at in first_acked.items()]
    out.appended = sorted(first_acked.values())
    if first_sent:
        out.first_sent = min(first_sent.values())
        out.last_sent = max(first_sent.values())
    if first_acked:
        out.last_acked = max(first_acked.values())
    for key, at in first_sent.items():
        stream = out.streams.get(connection[key])
        if stream is None:
            stream = out.streams[connection[key]] = Stream(first_sent=at)
        stream.sent += 1
        stream.first_sent = min(stream.first_sent, at)
        acked_at = first_acked.get(key)
        if acked_at is not None:
            stream.delivered += 1
            stream.last_acked = max(stream.last_acked, acked_at)
    return out


def envelope_key(value: bytes) -> str | None:
    """The item key of a Kafka record value; None for a record the forwarder made itself
    (a status event or an `is_final` bar), which no send corresponds to."""
    envelope = orjson.loads(value)
    made_here = envelope["channel"] == "bars" and envelope["is_final"]
    if envelope.get("source") != "alpaca" or made_here:
        return None
    return item_key(envelope["payload"])
