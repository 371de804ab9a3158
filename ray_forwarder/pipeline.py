"""Decoded items -> deduplicated, sequenced, enveloped Kafka records. No I/O.

The shard actor feeds every decoded frame through one `EventPipeline`; what comes out is a
list of `OutRecord`s ready for a producer. Counters live here so they can be tested and
exported without the actor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ray_forwarder.bars import BarFinalizer, PendingBar
from ray_forwarder.dedup import DedupCache
from ray_forwarder.envelope import dedup_key, encode_envelope, final_bar_key, utc_now_iso
from ray_forwarder.protocol.events import DataItem

#: Channels whose records are not final when emitted (they may still be revised).
REVISABLE_CHANNELS = frozenset({"bars", "updatedBars", "dailyBars"})
#: Channels whose revisions feed the minute-bar finalizer.
MINUTE_BAR_CHANNELS = frozenset({"bars", "updatedBars"})


@dataclass(slots=True, frozen=True)
class OutRecord:
    """One Kafka record: topic, record key (the symbol), serialised envelope."""

    topic: str
    key: bytes
    value: bytes
    channel: str


@dataclass
class PipelineCounters:
    received: Counter[str] = field(default_factory=Counter)
    emitted: Counter[str] = field(default_factory=Counter)
    deduplicated: Counter[str] = field(default_factory=Counter)
    unrouted: Counter[str] = field(default_factory=Counter)
    finals: int = 0


#: seq = epoch << SEQ_EPOCH_BITS | n: 2**40 numbers per (channel, symbol) and incarnation,
#: and 8191 restarts before seq leaves JSON's exact-integer range (2**53).
SEQ_EPOCH_BITS = 40


class Sequencer:
    """Strictly increasing numbers per (channel, symbol)."""

    def __init__(self, start: dict[tuple[str, str], int] | None = None) -> None:
        self._last: dict[tuple[str, str], int] = dict(start or {})
        self._base = 0

    def next(self, channel: str, symbol: str) -> int:
        key = (channel, symbol)
        value = self._last.get(key, self._base) + 1
        self._last[key] = value
        return value

    def snapshot(self) -> dict[tuple[str, str], int]:
        return dict(self._last)

    def start_epoch(self, epoch: int) -> None:
        """Number from `epoch << SEQ_EPOCH_BITS` on: a restarted shard incarnation gets a
        higher epoch than every earlier one, so its seqs exceed everything they issued."""
        if self._last:
            raise RuntimeError("start_epoch() after numbers were issued")
        self._base = epoch << SEQ_EPOCH_BITS


class EventPipeline:
    def __init__(
        self,
        topics: dict[str, str],
        dedup: DedupCache,
        bars: BarFinalizer,
        sequencer: Sequencer | None = None,
    ) -> None:
        self._topics = topics
        self._dedup = dedup
        self._bars = bars
        self._seq = sequencer or Sequencer()
        self.start_seq_epoch = self._seq.start_epoch
        self.counters = PipelineCounters()

    @property
    def late_revisions(self) -> int:
        return self._bars.late_revisions

    def process(self, items: list[DataItem], ingest_ts: str, now: float) -> list[OutRecord]:
        """Records for the items of one frame, in arrival order; duplicates are dropped."""
        out: list[OutRecord] = []
        counters = self.counters
        for item in items:
            channel, symbol = item.channel, item.symbol
            counters.received[channel] += 1
            topic = self._topics.get(channel)
            if topic is None:
                counters.unrouted[channel] += 1
                continue
            key = dedup_key(channel, symbol, item.event_ts, item.payload)
            if self._dedup.seen(key, now):
                counters.deduplicated[channel] += 1
                continue
            if channel in MINUTE_BAR_CHANNELS:
                self._bars.observe(symbol, item.event_ts, item.payload, now)
            out.append(
                self._record(
                    topic,
                    ingest_ts=ingest_ts,
                    event_ts=item.event_ts,
                    channel=channel,
                    symbol=symbol,
                    payload=item.payload,
                    is_final=channel not in REVISABLE_CHANNELS,
                    key=key,
                )
            )
        return out

    def finalize_due(self, now: float) -> list[OutRecord]:
        """One `is_final: true` bars record for each bar whose revision window passed."""
        return self._finals(self._bars.due(now))

    def finalize_all(self) -> list[OutRecord]:
        """On a graceful stop: finalise every pending bar with its latest revision."""
        return self._finals(self._bars.drain())

    def _finals(self, bars: list[PendingBar]) -> list[OutRecord]:
        topic = self._topics["bars"]
        if not bars:
            return []
        ingest_ts = utc_now_iso()
        self.counters.finals += len(bars)
        return [
            self._record(
                topic,
                ingest_ts=ingest_ts,
                event_ts=bar.bar_ts,
                channel="bars",
                symbol=bar.symbol,
                payload=bar.payload,
                is_final=True,
                key=final_bar_key(bar.symbol, bar.bar_ts),
            )
            for bar in bars
        ]

    def status_record(self, shard: str, event: str, body: dict[str, Any]) -> OutRecord:
        """A forwarder status event (`channel: status`), keyed by shard for per-shard order."""
        payload = {"event": event, "shard": shard, **body}
        ingest_ts = utc_now_iso()
        return self._record(
            self._topics["status"],
            ingest_ts=ingest_ts,
            event_ts=ingest_ts,
            channel="status",
            symbol=None,
            seq_symbol=shard,
            payload=payload,
            is_final=True,
            key=f"status:{shard}:{ingest_ts}:{event}",
            source="forwarder",
            record_key=shard,
        )

    def _record(
        self,
        topic: str,
        *,
        ingest_ts: str,
        event_ts: str,
        channel: str,
        symbol: str | None,
        payload: dict[str, Any],
        is_final: bool,
        key: str,
        source: str = "alpaca",
        seq_symbol: str | None = None,
        record_key: str | None = None,
    ) -> OutRecord:
        seq = self._seq.next(channel, seq_symbol or symbol or "")
        self.counters.emitted[channel] += 1
        value = encode_envelope(
            ingest_ts=ingest_ts,
            event_ts=event_ts,
            channel=channel,
            symbol=symbol,
            seq=seq,
            payload=payload,
            is_final=is_final,
            source=source,
            key=key,
        )
        return OutRecord(topic, (record_key or symbol or "").encode(), value, channel)
