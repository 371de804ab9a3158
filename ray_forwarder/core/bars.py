"""Decide when a minute bar is final and emit exactly one final record for it.

Alpaca sends a bar just after each minute mark and, if late trades arrive, an updated bar
(same `t`) after the following half-minute mark. The forwarder cannot know that no further
revision will come, so it waits `delay` seconds from the first time it saw the bar (default
35 s, past the half-minute mark) and then emits the latest revision once more with
`is_final: true`. Revisions that arrive after that are forwarded as non-final and counted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class PendingBar:
    symbol: str
    bar_ts: str
    payload: dict[str, Any]
    due: float
    #: The gap whose REST bar is the latest revision (its final carries the backfill
    #: marker); None while the stream's revision is the latest.
    gap_id: str | None = None


class BarFinalizer:
    def __init__(self, delay: float, remember: int = 100_000) -> None:
        self._delay = delay
        self._pending: OrderedDict[tuple[str, str], PendingBar] = OrderedDict()
        self._finalized: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remember = remember
        self.late_revisions = 0
        self.latest_seen: str | None = None  # the latest `t` observed (hand-overs)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def observe(self, symbol: str, bar_ts: str, payload: dict[str, Any], now: float) -> None:
        """Record a bar or an updated bar; the latest revision wins."""
        key = (symbol, bar_ts)
        entry = self._pending.get(key)
        if entry is not None:
            entry.payload = payload
            entry.gap_id = None
        elif key in self._finalized:
            self.late_revisions += 1
        else:
            self._pending[key] = PendingBar(symbol, bar_ts, payload, now + self._delay)
            if self.latest_seen is None or bar_ts > self.latest_seen:
                self.latest_seen = bar_ts

    def due(self, now: float) -> list[PendingBar]:
        """Bars whose window has passed, oldest first (insertion order = due order)."""
        ready: list[PendingBar] = []
        pending = self._pending
        while pending:
            key, entry = next(iter(pending.items()))
            if entry.due > now:
                break
            del pending[key]
            self._mark_finalized(key)
            ready.append(entry)
        return ready

    def drain(self) -> list[PendingBar]:
        """Everything still pending, for a graceful stop: finalise with what is known."""
        ready = list(self._pending.values())
        for key in self._pending:
            self._mark_finalized(key)
        self._pending.clear()
        return ready

    def _mark_finalized(self, key: tuple[str, str]) -> None:
        self._finalized[key] = None
        if len(self._finalized) > self._remember:
            self._finalized.popitem(last=False)

    # --- backfill (see runtime/backfill.py) ---------------------------------------------

    def state(self, symbol: str, bar_ts: str) -> str | None:
        """`pending`, `final` or None (never seen, or forgotten): what a backfilled bar
        for (symbol, bar_ts) meets."""
        key = (symbol, bar_ts)
        if key in self._pending:
            return "pending"
        return "final" if key in self._finalized else None

    def revise_pending(
        self, symbol: str, bar_ts: str, payload: dict[str, Any], gap_id: str
    ) -> bool:
        """A backfilled bar for a pending one: Alpaca's REST bar includes late trades the
        stream may have sent as an updated bar during the gap, so where its content
        differs it becomes the latest revision (keeping the pending revision's `T`), and
        the one final record carries it, marked. True if it changed the bar."""
        entry = self._pending[(symbol, bar_ts)]
        if _content(entry.payload) == _content(payload):
            return False
        entry.payload = {**payload, "T": entry.payload.get("T", payload.get("T"))}
        entry.gap_id = gap_id
        return True

    def observe_backfilled(
        self, symbol: str, bar_ts: str, payload: dict[str, Any], now: float, gap_id: str
    ) -> None:
        """A backfilled bar the stream may still send (or revise): pending like a streamed
        one, so the stream's copy merges with it and one final follows."""
        self._pending[(symbol, bar_ts)] = PendingBar(
            symbol, bar_ts, payload, now + self._delay, gap_id
        )

    def mark_final(self, symbol: str, bar_ts: str) -> None:
        """A backfilled final was emitted: a streamed revision after it is a late one."""
        self._mark_finalized((symbol, bar_ts))

    def oldest_pending(self) -> str | None:
        """The earliest `t` of the bars not final yet (O(pending): for hand-overs only)."""
        return min((bar.bar_ts for bar in self._pending.values()), default=None)

    def resume_from(self) -> str | None:
        """Where a successor's backfill starts: the oldest bar not final yet, else the
        minute after the latest bar seen (every earlier one was finalised), else None."""
        oldest = self.oldest_pending()
        if oldest is not None or self.latest_seen is None:
            return oldest
        from datetime import datetime, timedelta

        after = datetime.fromisoformat(self.latest_seen[:19]) + timedelta(minutes=1)
        return after.strftime("%Y-%m-%dT%H:%M:%S") + self.latest_seen[19:]


def _content(payload: dict[str, Any]) -> dict[str, Any]:
    """A bar's content: a REST bar is a `b`, the stream's latest revision may be a `u`."""
    return {k: v for k, v in payload.items() if k != "T"}
