"""The gap ledger: every interruption of a shard's data path, as data. No I/O.

Alpaca's streams do not replay, so whatever the feed sent while a connection was down is
missing from Kafka. The ledger says exactly what was missed: a gap opens when the data
path is interrupted (a disconnect, a reconnect after 406/407/stale, a shard actor restart,
a graceful stop followed by a start) and closes with the first data item after it. A gap
is bounded by two `Mark`s: the last data item before it and the first one after, each with
its receive time (the forwarder's clock) and its event time (the feed's clock). Backfill
uses the event times; `seconds` (how long the data path was down) uses the receive times.

The hot path costs two attribute stores per frame (`note`); everything else happens on
the rare transitions.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeGuard

from ray_forwarder.alpaca import timestamps
from ray_forwarder.alpaca.events import DataItem

#: Causes a gap can have (the `cause` label of the gap metrics: a closed set).
GAP_CAUSES = (
    "disconnect",  # the connection dropped or the server closed it
    "server_error",  # an error message that ends the connection (500, 401, 404, ...)
    "connection_limit",  # 406: another session held the slot
    "slow_client",  # 407: the feed dropped us for reading too slowly
    "stale_stream",  # no frame at all: the session reconnected
    "stale_data",  # no data item while the market was open: the session reconnected
    "restart",  # the shard actor died and Ray restarted it
    "stop_start",  # a graceful stop, then a start (a deploy, a driver restart)
)
#: A gap event names at most this many symbols; beyond, it refers to the shard's set.
SYMBOLS_IN_EVENT = 50
#: Channels whose `t` is no event time of the moment they were sent (a daily bar's `t` is
#: the day's start), so they never mark where data stopped or resumed.
_UNMARKED_CHANNELS = frozenset({"dailyBars"})


def cause_of(reason: str) -> str:
    """The gap cause for a session's `disconnected` reason text."""
    if reason.startswith("stale stream"):
        return "stale_stream"
    if reason.startswith("stale data"):
        return "stale_data"
    if reason.startswith("alpaca error 406"):
        return "connection_limit"
    if reason.startswith("alpaca error 407"):
        return "slow_client"
    if reason.startswith("alpaca error"):
        return "server_error"
    return "disconnect"


@dataclass(frozen=True, slots=True)
class Mark:
    """One data item's place in time: when we received it and its event time."""

    received_at: str  # UTC ISO-8601 (the frame's ingest_ts)
    event_ts: str  # the item's `t`, canonical UTC ISO-8601
    #: Only in a mark handed to a successor: where its bar backfill starts (the oldest bar
    #: not final yet, which dies with the incarnation, or the minute after the last bar).
    bars_from: str | None = None

    def as_dict(self) -> dict[str, str]:
        out = {"received_at": self.received_at, "event_ts": self.event_ts}
        if self.bars_from is not None:
            out["bars_from"] = self.bars_from
        return out

    @classmethod
    def from_dict(cls, value: object) -> Mark | None:
        """A mark from a status event's `from`/`to` (None if it does not hold one)."""
        if not isinstance(value, Mapping):
            return None
        received, event = value.get("received_at"), value.get("event_ts")
        bars_from = value.get("bars_from")
        if not isinstance(received, str) or not isinstance(event, str):
            return None
        if bars_from is not None and not isinstance(bars_from, str):
            return None
        try:
            _instant(received), _instant(event)
            if bars_from is not None:
                _instant(bars_from)
        except ValueError:
            return None
        return cls(received, event, bars_from)


@dataclass(frozen=True)
class Gap:
    """A closed gap: what the shard did not receive between `start` and `end`."""

    gap_id: str
    stream: str
    shard: str
    channels: tuple[str, ...]
    symbols: tuple[str, ...]
    cause: str
    start: Mark | None  # None: nothing was received before it (nothing known to resume)
    end: Mark

    @property
    def seconds(self) -> float:
        """How long the data path was down, on the forwarder's clock (0 without a start)."""
        if self.start is None:
            return 0.0
        return max(0.0, (_instant(self.end.received_at) - _instant(self.start.received_at)))

    def event(self) -> dict[str, Any]:
        """The `gap` status event's body (machine-readable; see README § Gaps)."""
        return {
            "gap_id": self.gap_id,
            "stream": self.stream,
            "cause": self.cause,
            "channels": list(self.channels),
            **symbols_field(self.symbols, self.shard),
            "from": None if self.start is None else self.start.as_dict(),
            "to": self.end.as_dict(),
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_event(cls, body: object, shard: str, shard_symbols: Sequence[str]) -> Gap | None:
        """A gap back from its `event()` body (a predecessor's unfinished backfill, handed
        over), or None if `body` is not one: a `symbols_ref` means the shard's own set."""
        if not isinstance(body, Mapping):
            return None
        gap_id, stream, cause = body.get("gap_id"), body.get("stream"), body.get("cause")
        channels, symbols = body.get("channels"), body.get("symbols")
        if symbols is None and isinstance(body.get("symbols_ref"), Mapping):
            symbols = list(shard_symbols)
        end = Mark.from_dict(body.get("to"))
        start = Mark.from_dict(body.get("from"))
        if (
            not isinstance(gap_id, str)
            or not isinstance(stream, str)
            or cause not in GAP_CAUSES
            or not _strings(channels)
            or not _strings(symbols)
            or end is None
            or (body.get("from") is not None and start is None)
        ):
            return None
        return cls(gap_id, stream, shard, tuple(channels), tuple(symbols), cause, start, end)


def _strings(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def symbols_field(symbols: Sequence[str], shard: str) -> dict[str, Any]:
    """`symbols` itself when short, else a reference to the shard's symbol set."""
    if len(symbols) <= SYMBOLS_IN_EVENT:
        return {"symbols": list(symbols)}
    return {"symbols": None, "symbols_ref": {"shard": shard, "count": len(symbols)}}


@dataclass
class LedgerCounts:
    """Closed gaps and their seconds, by cause (the shard's stats and metrics)."""

    gaps: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)


class GapLedger:
    """One shard's ledger. `note()` per frame (hot path), `interrupt()` / `resume_from()`
    on transitions; `note()` returns the gap it closed, if any."""

    def __init__(
        self, stream: str, shard: str, channels: Sequence[str], symbols: Sequence[str]
    ) -> None:
        self.stream = stream
        self.shard = shard
        self.channels = tuple(channels)
        self.symbols = tuple(symbols)
        self.counts = LedgerCounts()
        self._last_received: str | None = None
        self._last_event: str | None = None
        self._open_cause: str | None = None
        self._open_start: Mark | None = None
        self._ids = itertools.count(1)
        self._epoch = 0

    @property
    def last(self) -> Mark | None:
        """The last data item received (where a successor would resume from)."""
        if self._last_received is None or self._last_event is None:
            return None
        return Mark(self._last_received, self._last_event)

    @property
    def open_cause(self) -> str | None:
        return self._open_cause

    def start_epoch(self, epoch: int) -> None:
        """Gap ids name the incarnation, so a restarted shard's ids never repeat."""
        self._epoch = epoch

    def note(self, items: Sequence[DataItem], ingest_ts: str) -> Gap | None:
        """A frame's data items arrived; closes the open gap, if any (returned), at the
        frame's first item."""
        event_ts = _last_event_ts(items)
        if event_ts is None:
            return None
        self._last_received, self._last_event = ingest_ts, event_ts
        if self._open_cause is None:
            return None
        return self._close(Mark(ingest_ts, _first_event_ts(items) or event_ts))

    def interrupt(self, cause: str) -> None:
        """The data path is interrupted: open a gap from the last item (the first cause of
        an interruption wins: a drop followed by a 406 on reconnect stays a drop). Before
        the first item of a fresh run nothing was missed that anyone could name: the run
        starts when data first flows, so no gap opens (a run that takes over from a
        predecessor opened its gap in `resume_from`)."""
        if self._open_cause is None and self.last is not None:
            self._open_cause, self._open_start = cause, self.last

    def resume_from(self, mark: Mark | None, cause: str) -> None:
        """A new incarnation (restart) or run (stop/start) takes over where its predecessor
        stopped: a gap from `mark` opens now and closes with the first item."""
        self._open_cause, self._open_start = cause, mark
        if mark is not None and self._last_received is None:
            self._last_received, self._last_event = mark.received_at, mark.event_ts

    def handover(self, bars_from: str | None) -> Mark | None:
        """The mark a successor resumes from: the last item, and the oldest bar not final
        yet or the minute after the last bar seen (`bars_from`), or, while a gap is open,
        where that gap's window starts."""
        last = self.last
        if last is None:
            return None
        start = self._open_start
        if start is not None and start.bars_from is not None:
            bars_from = min(bars_from or start.bars_from, start.bars_from)
        if self._open_cause is not None and start is not None:
            last = Mark(start.received_at, start.event_ts)  # the gap is not over yet
        return Mark(last.received_at, last.event_ts, bars_from)

    def _close(self, end: Mark) -> Gap:
        assert self._open_cause is not None
        gap = Gap(
            gap_id=f"{self.shard}:{self._epoch}:{next(self._ids)}",
            stream=self.stream,
            shard=self.shard,
            channels=self.channels,
            symbols=self.symbols,
            cause=self._open_cause,
            start=self._open_start,
            end=end,
        )
        self._open_cause, self._open_start = None, None
        self.counts.gaps[gap.cause] += 1
        self.counts.seconds[gap.cause] += gap.seconds
        return gap


def _last_event_ts(items: Sequence[DataItem]) -> str | None:
    """The event time a frame ends at: its last item's, skipping daily bars (their `t` is
    the day's start). O(1) for every frame that does not end in a daily bar."""
    for item in reversed(items):
        if item.channel not in _UNMARKED_CHANNELS:
            return item.event_ts
    return None


def _first_event_ts(items: Sequence[DataItem]) -> str | None:
    """The event time of a frame's first item (daily bars skipped): where data resumed."""
    for item in items:
        if item.channel not in _UNMARKED_CHANNELS:
            return item.event_ts
    return None


def _instant(value: str) -> float:
    """Seconds since the epoch for an RFC 3339 UTC string (nanoseconds beyond µs dropped)."""
    # canonical() refuses what is no real instant and gives nine digits and `Z`; datetime
    # reads at most six fractional digits.
    text = timestamps.canonical(value)
    return datetime.fromisoformat(text[:26] + "+00:00").timestamp()
