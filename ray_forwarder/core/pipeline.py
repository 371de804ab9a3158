"""Decoded items -> deduplicated, sequenced, enveloped Kafka records. No I/O.

The shard actor feeds every decoded frame through one `EventPipeline`; what comes out is a
list of `OutRecord`s ready for a producer. Counters live here so they can be tested and
exported without the actor.

Each item is handled on its own and validated before it touches any state: its payload is
serialised first (the bytes feed both the dedup digest and the envelope), so an item that
cannot become JSON (`unencodable`: msgpack bin/ext values, maps with non-string keys,
nesting beyond orjson's 254 levels) or holds NaN/±Inf (`non_finite_number`; orjson would
write `null`) is skipped and counted before it is marked seen or consumes a seq number.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import partial
from hashlib import blake2b as _blake2b
from typing import Any, NamedTuple

import orjson

from ray_forwarder.alpaca.events import DataItem, Skipped
from ray_forwarder.alpaca.streams import StreamDefinition
from ray_forwarder.core.bars import BarFinalizer, PendingBar
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.envelope import (
    encode_backfilled_envelope,
    encode_envelope,
    final_bar_key,
    item_dedup_key,
    json_default,
    serialise_payload,
    utc_now_iso,
)

log = logging.getLogger(__name__)

_dumps = orjson.dumps
_Fragment = orjson.Fragment
_SORT_KEYS = orjson.OPT_SORT_KEYS

#: Channels whose records are not final when emitted (they may still be revised).
REVISABLE_CHANNELS = frozenset({"bars", "updatedBars", "dailyBars"})
#: Channels whose revisions feed the minute-bar finalizer.
MINUTE_BAR_CHANNELS = frozenset({"bars", "updatedBars"})


class OutRecord(NamedTuple):
    """One Kafka record: topic, record key (the symbol), serialised envelope.

    A NamedTuple (immutable, attribute access, positional construction like the frozen
    dataclass it replaces): built once per event, and a tuple is the cheapest thing to
    build and to pickle."""

    topic: str
    key: bytes
    value: bytes
    channel: str


#: `OutRecord((topic, key, value, channel))` without the Python-level `__new__`.
_new_record = partial(tuple.__new__, OutRecord)


@dataclass
class PipelineCounters:
    received: Counter[str] = field(default_factory=Counter)
    emitted: Counter[str] = field(default_factory=Counter)
    deduplicated: Counter[str] = field(default_factory=Counter)
    unrouted: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # by reason, decode skips included
    finals: int = 0


#: seq = epoch << SEQ_EPOCH_BITS | n: 2**40 numbers per (channel, symbol) and incarnation,
#: and 8191 restarts before seq leaves JSON's exact-integer range (2**53).
SEQ_EPOCH_BITS = 40


#: Sequencer bound for a `*` subscription: the US equity universe (~12k symbols) times the
#: channels, with room to spare. An explicit symbol list needs no bound (see EventPipeline).
SEQ_MAX_KEYS_WILDCARD = 250_000


class Sequencer:
    """Strictly increasing numbers per (channel, symbol).

    With `max_keys`, the least recently used key is forgotten when a new one would exceed
    the bound, and numbering continues from the highest number ever forgotten (`_base`), so
    a forgotten key that comes back still gets numbers above everything it had: seq stays
    strictly increasing per key but is no longer dense for that key (it jumps).
    """

    def __init__(
        self, start: dict[tuple[str, str], int] | None = None, max_keys: int | None = None
    ) -> None:
        self._last: dict[tuple[str, str], int] = dict(start or {})
        self._base = 0
        self._max_keys = max_keys
        self.evicted = 0  # keys forgotten because of max_keys

    def __len__(self) -> int:
        return len(self._last)

    def next(self, channel: str, symbol: str) -> int:
        key = (channel, symbol)
        last = self._last.pop(key, None)  # pop + insert keeps the dict in LRU order
        value = (self._base if last is None else last) + 1
        self._last[key] = value
        if last is None and self._max_keys is not None and len(self._last) > self._max_keys:
            oldest = next(iter(self._last))
            self._base = max(self._base, self._last.pop(oldest))
            self.evicted += 1
        return value

    def snapshot(self) -> dict[tuple[str, str], int]:
        return dict(self._last)

    def start_epoch(self, epoch: int) -> None:
        """Number from `epoch << SEQ_EPOCH_BITS` on: a restarted shard incarnation gets a
        higher epoch than every earlier one, so its seqs exceed everything they issued."""
        if self._last:
            raise RuntimeError("start_epoch() after numbers were issued")
        self._base = epoch << SEQ_EPOCH_BITS


def has_non_finite(value: object) -> bool:
    """Whether a decoded JSON/msgpack value holds NaN or ±Inf anywhere (depth <= 254: only
    called on values orjson already serialised)."""
    value_type = type(value)
    if value_type is float:
        return not math.isfinite(value)  # type: ignore[arg-type]
    if value_type is dict:
        return any(has_non_finite(v) for v in value.values())  # type: ignore[attr-defined]
    if value_type is list:
        return any(has_non_finite(v) for v in value)  # type: ignore[attr-defined]
    return False


#: Skips are logged, but never one line per bad item: the first few, then every 1000th.
_LOG_FIRST = 10
_LOG_EVERY = 1000


class EventPipeline:
    """Items -> records. `allowed_symbols` (None = `*`) is the shard's subscription: items
    for other symbols are skipped (`unsubscribed_symbol`), which bounds every per-symbol
    table here by the subscribed universe."""

    def __init__(
        self,
        topics: dict[str, str],
        dedup: DedupCache,
        bars: BarFinalizer,
        sequencer: Sequencer | None = None,
        *,
        allowed_symbols: Collection[str] | None = None,
        name: str = "pipeline",
        stream: StreamDefinition | None = None,
    ) -> None:
        self._topics = topics
        # per stream (None: stocks): which channels may be revised / feed the finaliser,
        # and whether an item's key is a symbol (news: the article id, `symbol` null)
        self._revisable = REVISABLE_CHANNELS if stream is None else stream.revisable
        self._minute_bars = MINUTE_BAR_CHANNELS if stream is None else stream.minute_bars
        self._key_is_symbol = stream is None or stream.key_is_symbol
        self._dedup = dedup
        self._bars = bars
        self._allowed = frozenset(allowed_symbols) if allowed_symbols is not None else None
        self._seq = sequencer or Sequencer(
            max_keys=SEQ_MAX_KEYS_WILDCARD if self._allowed is None else None
        )
        self.start_seq_epoch = self._seq.start_epoch
        self.counters = PipelineCounters()
        self._name = name

    @property
    def late_revisions(self) -> int:
        return self._bars.late_revisions

    @property
    def dedup(self) -> DedupCache:
        return self._dedup

    @property
    def sequencer(self) -> Sequencer:
        return self._seq

    def skip(self, skipped: Skipped) -> None:
        """Count a skipped frame or item (decode's or ours) and log it, rate-limited."""
        self.counters.skipped[skipped.reason] += 1
        count = self.counters.skipped[skipped.reason]
        if count <= _LOG_FIRST or count % _LOG_EVERY == 0:
            detail = skipped.detail
            log.warning("%s skipped %s (#%d): %s", self._name, skipped.reason, count, detail)

    def process(self, items: list[DataItem], ingest_ts: str, now: float) -> list[OutRecord]:
        """Records for the items of one frame, in arrival order; duplicates are dropped.

        Never raises for an item's content: an item that cannot be forwarded is skipped and
        counted, before it is marked seen or numbered, and its frame-mates go on.

        Hot path: per item one serialisation (`serialise_payload`, inlined), one digest,
        one dedup `setdefault`, one seq number and one `orjson.dumps` of the envelope
        (what `_record` builds, inlined; tests/test_pipeline_fast.py compares the two)."""
        out: list[OutRecord] = []
        append = out.append
        counters = self.counters
        received, emitted = counters.received, counters.emitted
        allowed = self._allowed
        topics = self._topics
        seen = self._dedup.seen
        next_seq = self._seq.next
        # per stream: news and trade_updates key by article / order id (`symbol` null)
        minute_bars, revisable = self._minute_bars, self._revisable
        key_is_symbol = self._key_is_symbol
        for item in items:
            channel, symbol = item.channel, item.symbol
            event_ts, payload = item.event_ts, item.payload
            if allowed is not None and symbol not in allowed:
                self.skip(Skipped("unsubscribed_symbol", f"{channel} item for {symbol[:40]!r}"))
                continue
            try:
                body = _dumps(payload, default=json_default, option=_SORT_KEYS)
            except TypeError as exc:  # orjson.JSONEncodeError: bin, ext, non-str keys, depth
                self.skip(Skipped("unencodable", f"{channel} {symbol} item: {exc}"))
                continue
            if b"null" in body and has_non_finite(payload):  # orjson writes NaN as null
                self.skip(Skipped("non_finite_number", f"{channel} {symbol} item: NaN or Inf"))
                continue
            received[channel] += 1
            topic = topics.get(channel)
            if topic is None:
                counters.unrouted[channel] += 1
                continue
            key = f"{channel}:{symbol}:{event_ts}:{_blake2b(body, digest_size=8).hexdigest()}"
            if seen(key, now):
                counters.deduplicated[channel] += 1
                continue
            if channel in minute_bars:
                self._bars.observe(symbol, event_ts, payload, now)
            seq = next_seq(channel, symbol)
            emitted[channel] += 1
            value = _dumps(
                {
                    "ingest_ts": ingest_ts,
                    "event_ts": event_ts,
                    "channel": channel,
                    "symbol": symbol if key_is_symbol else None,
                    "seq": seq,
                    "payload": _Fragment(body),
                    "is_final": channel not in revisable,
                    "source": "alpaca",
                    "key": key,
                }
            )
            append(_new_record((topic, symbol.encode(), value, channel)))
        return out

    def finalize_due(self, now: float) -> list[OutRecord]:
        """One `is_final: true` bars record for each bar whose revision window passed."""
        return self._finals(self._bars.due(now))

    def finalize_all(self) -> list[OutRecord]:
        """On a graceful stop: finalise every pending bar with its latest revision."""
        return self._finals(self._bars.drain())

    def _finals(self, bars: list[PendingBar]) -> list[OutRecord]:
        if not bars:
            return []
        topic = self._topics["bars"]
        ingest_ts = utc_now_iso()
        self.counters.finals += len(bars)
        return [
            self._backfilled_final(
                topic, ingest_ts, bar.symbol, bar.bar_ts, bar.payload, bar.gap_id
            )
            if bar.gap_id is not None
            else self._record(
                topic,
                ingest_ts=ingest_ts,
                event_ts=bar.bar_ts,
                channel="bars",
                symbol=bar.symbol,
                # validated when it arrived; serialised like every item (msgpack Timestamps
                # outside `t` included), so the hot path's envelope needs no `default` hook
                payload=orjson.Fragment(serialise_payload(bar.payload)),
                is_final=True,
                key=final_bar_key(bar.symbol, bar.bar_ts),
            )
            for bar in bars
        ]

    def bars_resume_from(self) -> str | None:
        """Where a successor's bar backfill starts (`BarFinalizer.resume_from`)."""
        return self._bars.resume_from()

    def backfill_bars(
        self, bars: list[dict[str, Any]], gap_id: str, open_from: str, now: float
    ) -> tuple[list[OutRecord], Counter[str]]:
        """Records for backfilled minute bars (stream-shaped payloads, `t` canonical),
        merged with what the stream delivered so that each (symbol, minute) still gets
        exactly one final record:

        - a bar the finaliser holds as pending: where the REST bar's content differs (it
          counts late trades) it becomes the latest revision, and the finaliser's one final
          carries it with the backfill marker (`merged`; else `same`);
        - a bar already finalised is left out (`already_final`);
        - a bar the stream may still send or revise (`t` less than BAR_REVISABLE_FOR_S
          before `open_from`, the event time data resumed at) is handed to the finaliser as
          pending (`open`): no record now, one final later, whichever source revised last;
        - otherwise one final record now (key `bars:S:t:final`, backfill marker: `final`).

        So each (symbol, minute) still gets exactly one final, and the stream's records
        are never dropped or repeated because of backfill."""
        out: list[OutRecord] = []
        outcome: Counter[str] = Counter()
        topic = self._topics.get("bars")
        if topic is None:
            return out, outcome
        ingest_ts = utc_now_iso()
        for payload in bars:
            symbol, bar_ts = payload["S"], payload["t"]
            if self._allowed is not None and symbol not in self._allowed:
                outcome["unsubscribed"] += 1
                continue
            state = self._bars.state(symbol, bar_ts)
            if state == "pending":
                merged = self._bars.revise_pending(symbol, bar_ts, payload, gap_id)
                outcome["merged" if merged else "same"] += 1
                continue
            if state == "final":
                outcome["already_final"] += 1
                continue
            if _revisable_until(bar_ts) > open_from:
                self._bars.observe_backfilled(symbol, bar_ts, payload, now, gap_id)
                outcome["open"] += 1
                continue
            self._bars.mark_final(symbol, bar_ts)
            self.counters.finals += 1
            outcome["final"] += 1
            out.append(self._backfilled_final(topic, ingest_ts, symbol, bar_ts, payload, gap_id))
        return out, outcome

    def backfill_ticks(
        self, items: list[DataItem], gap_id: str, now: float
    ) -> tuple[list[OutRecord], Counter[str]]:
        """Records for backfilled trades or quotes (`stream_tick` payloads: the stream's
        shape). Their dedup key is computed exactly as `process` computes a streamed item's,
        through the same cache, so a tick the stream delivered (at the gap's edges) is
        `duplicate` here, and one REST repeats is not emitted twice. Not revisable: each
        becomes one final record now (`emitted`), marked `backfill`, seq continuing the
        (channel, symbol) sequence, through the caller's outbox after the live records
        already in it (README § Gaps and backfill: order)."""
        out: list[OutRecord] = []
        outcome: Counter[str] = Counter()
        ingest_ts = utc_now_iso()
        for item in items:
            channel, symbol, event_ts, payload = (
                item.channel, item.symbol, item.event_ts, item.payload
            )  # fmt: skip
            topic = self._topics.get(channel)
            if topic is None:
                outcome["unrouted"] += 1
                continue
            if self._allowed is not None and symbol not in self._allowed:
                outcome["unsubscribed"] += 1
                continue
            try:
                body = serialise_payload(payload)
            except TypeError:
                outcome["unencodable"] += 1
                continue
            key = item_dedup_key(channel, symbol, event_ts, body)
            if self._dedup.seen(key, now):
                outcome["duplicate"] += 1
                continue
            self.counters.emitted[channel] += 1
            value = encode_backfilled_envelope(
                ingest_ts=ingest_ts,
                event_ts=event_ts,
                channel=channel,
                symbol=symbol,
                seq=self._seq.next(channel, symbol),
                payload=orjson.Fragment(body),
                is_final=channel not in self._revisable,
                key=key,
                gap_id=gap_id,
            )
            out.append(OutRecord(topic, symbol.encode(), value, channel))
            outcome["emitted"] += 1
        return out, outcome

    def _backfilled_final(
        self,
        topic: str,
        ingest_ts: str,
        symbol: str,
        bar_ts: str,
        payload: dict[str, Any],
        gap_id: str,
    ) -> OutRecord:
        self.counters.emitted["bars"] += 1
        value = encode_backfilled_envelope(
            ingest_ts=ingest_ts,
            event_ts=bar_ts,
            channel="bars",
            symbol=symbol,
            seq=self._seq.next("bars", symbol),
            payload=orjson.Fragment(serialise_payload(payload)),
            is_final=True,
            key=final_bar_key(symbol, bar_ts),
            gap_id=gap_id,
        )
        return OutRecord(topic, symbol.encode(), value, "bars")

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
        payload: dict[str, Any] | orjson.Fragment,
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


#: How long after its `t` the stream may still send a minute bar or its updated bar: the
#: bar comes after the minute, an updated bar after the following half-minute mark.
BAR_REVISABLE_FOR_S = 120


def _revisable_until(bar_ts: str) -> str:
    """`t` + BAR_REVISABLE_FOR_S, canonical (same layout as event times, so string order
    is time order)."""
    from datetime import datetime, timedelta

    start = datetime.fromisoformat(bar_ts[:19]) + timedelta(seconds=BAR_REVISABLE_FOR_S)
    return start.strftime("%Y-%m-%dT%H:%M:%S") + bar_ts[19:]
