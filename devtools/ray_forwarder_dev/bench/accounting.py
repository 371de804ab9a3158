"""Matching what reached Kafka against what the load generator sent. Pure: no I/O.

Latency per item is broker append time (the topic's `LogAppendTime`) minus the generator's
stamp of the first write of the item; an item is found in Kafka by the digest of the
envelope's `payload`, which is the original item (field order aside).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

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

    @property
    def rate(self) -> float:
        """End to end: distinct items delivered / (last broker append - first send)."""
        span = self.last_acked - self.first_sent
        return self.delivered / span if self.delivered and span > 0 else 0.0


def match_deliveries(
    sent: Iterable[tuple[str, float]], acked: Iterable[tuple[str, float]]
) -> Delivery:
    """`sent`: (item key, send time) per write, duplicates included; `acked`: (item key,
    broker append time) per Kafka record. Latency per item: first append - first send."""
    first_sent: dict[str, float] = {}
    for key, at in sent:
        if key not in first_sent or at < first_sent[key]:
            first_sent[key] = at
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
    if first_acked:
        out.first_sent = min(first_sent.values())
        out.last_acked = max(first_acked.values())
    return out


def envelope_key(value: bytes) -> str | None:
    """The item key of a Kafka record value; None for a record the forwarder made itself
    (a status event or an `is_final` bar), which no send corresponds to."""
    envelope = orjson.loads(value)
    made_here = envelope["channel"] == "bars" and envelope["is_final"]
    if envelope.get("source") != "alpaca" or made_here:
        return None
    return item_key(envelope["payload"])
