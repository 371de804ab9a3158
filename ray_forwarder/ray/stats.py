"""Aggregating actor stats into one picture for health, metrics and summaries."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ForwarderSnapshot:
    """What the driver knows about all actors at one moment."""

    shards: list[dict[str, Any]] = field(default_factory=list)
    producers: list[dict[str, Any]] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)

    def total(self, name: str) -> Counter[str]:
        """Sum a per-channel counter over all shards."""
        total: Counter[str] = Counter()
        for shard in self.shards:
            total.update(shard.get(name, {}))
        return total

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Ready (``/healthz`` 200) only when every producer has a working Kafka connection
        (`ready`: connected, and the last send or idle metadata probe succeeded) and every
        shard has an acknowledged subscription; otherwise the body lists the problems.

        Ready but *degraded* (still 200, ``"status": "degraded"`` and a ``degraded`` list)
        when a shard's subscription lacks (channel, symbol) pairs the feed would not serve
        after every re-send: the forwarder does all it can, and neither taking it out of
        service nor restarting it would serve them (see docs/observability.md)."""
        problems: list[str] = list(f"actor unreachable: {name}" for name in self.unreachable)
        for producer in self.producers:
            if not producer.get("ready"):
                problems.append(
                    f"producer {producer.get('name')} has no Kafka connection"
                    + (f" ({producer['last_error']})" if producer.get("last_error") else "")
                )
        for shard in self.shards:
            if shard.get("fatal"):
                problems.append(f"shard {shard['shard_id']} failed: {shard['fatal']}")
            elif not shard.get("subscribed"):
                problems.append(f"shard {shard['shard_id']} is {shard.get('state')}")
        if not self.shards:
            problems.append("no shards running")
        if not self.producers:
            problems.append("no producers running")
        degraded = [
            f"shard {shard['shard_id']}: {shard['unserved']} (channel, symbol) pair(s) "
            f"not served by the feed: {', '.join(shard.get('unserved_sample', []))}"
            + (" …" if shard["unserved"] > len(shard.get("unserved_sample", [])) else "")
            for shard in self.shards
            if shard.get("unserved")
        ]
        body = {
            "status": "unavailable" if problems else "degraded" if degraded else "ok",
            "problems": problems,
            "degraded": degraded,
            "shards": {s["shard_id"]: s.get("state") for s in self.shards},
            "streams": self._streams(),
            "producers": {p["name"]: p.get("ready") for p in self.producers},
        }
        return not problems, body

    def _streams(self) -> dict[str, dict[str, int]]:
        """Per stream (stocks, crypto, ...): its shards and how many are subscribed."""
        streams: dict[str, dict[str, int]] = {}
        for shard in self.shards:
            entry = streams.setdefault(
                shard.get("stream", "stocks"), {"shards": 0, "subscribed": 0}
            )
            entry["shards"] += 1
            entry["subscribed"] += 1 if shard.get("subscribed") else 0
        return streams
