"""A shard: one Alpaca session feeding one pipeline and one outbox. No Ray in here.

`ShardActor` is a thin Ray shell around `ShardCore`; tests can drive `ShardCore` directly
with any `send` coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_forwarder.alpaca.events import DataItem, Skipped
from ray_forwarder.alpaca.market_clock import (
    ALWAYS_OPEN_FEEDS,
    FetchHours,
    MarketClock,
    alpaca_fetcher,
    trading_base_url,
)
from ray_forwarder.alpaca.streams import STREAMS, StreamDefinition
from ray_forwarder.config import Settings
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.gaps import Gap, GapLedger, Mark, cause_of
from ray_forwarder.core.pipeline import EventPipeline, OutRecord
from ray_forwarder.core.topics import topic_map
from ray_forwarder.runtime.backfill import Backfiller, backfiller_for
from ray_forwarder.runtime.outbox import BatchLimits, Outbox, SendBatch
from ray_forwarder.runtime.session import AlpacaSession, FatalSessionError, SessionConfig

log = logging.getLogger(__name__)


def outbox_limits(settings: Settings, spool_dir: Path | None) -> BatchLimits:
    """The outbox's bounds from the settings (the shard's, and the hand-off bench's)."""
    return BatchLimits(
        max_events=settings.buffer_max_events,
        max_bytes=settings.buffer_max_bytes,
        spool_dir=spool_dir,
        spool_max_bytes=settings.spool_max_bytes,
        batch_max_events=settings.batch_max_events,
        batch_max_ms=lane_linger_ms(settings),
        max_in_flight=settings.batch_max_in_flight,
        batch_max_bytes=settings.batch_max_bytes,
        max_in_flight_bytes=settings.batch_max_in_flight_bytes,
        max_record_bytes=settings.max_record_bytes,
        dead_letter_topic=settings.topic_deadletter,
    )


def lane_linger_ms(settings: Settings) -> float:
    """How long a lane waits to fill a batch: `BATCH_MAX_MS`, at most `PRODUCER_LINGER_MS`.

    The lane is the one linger on a record's way: the producer sends what it receives at
    once (a second linger there held every batch's ack back by as long, which capped a
    lane's throughput at its window over the linger). At least a millisecond, so that an
    idle lane does not spin."""
    return max(1.0, min(settings.batch_max_ms, float(settings.producer_linger_ms)))


def spool_directory(settings: Settings, spec: ShardSpec) -> Path:
    """Where a shard's lanes spool to disk: `<root>/<run>/<shard>/<lane>`.

    A shard restarted within a forwarder run clears its directory, which only a dead
    incarnation of itself can have left there (on this node). Without a run id (a
    `ShardCore` used on its own) the run part is random, so nothing is shared.
    """
    root = Path(settings.spool_dir or Path(tempfile.gettempdir()) / "ray-forwarder-spool")
    directory = root / (spec.run_id or f"solo-{uuid.uuid4().hex[:12]}") / spec.shard_id
    if spec.run_id:
        shutil.rmtree(directory, ignore_errors=True)
    return directory


_FINALIZE_INTERVAL_S = 0.1
#: Status records waiting for room in a full buffer; beyond this the oldest are dropped.
_STATUS_PENDING_MAX = 1000
#: `recovered` needs this long without a new drop (so a slow drain does not flap).
_RECOVERED_AFTER_S = 1.0
#: Session reports that are events, not connection states (the state stays as it was).
_EVENTS_NOT_STATES = frozenset(
    {"error", "subscription_mismatch", "subscription_repaired", "market_clock"}
)
#: A dead-letter episode ends after this long without a new diversion; the next one
#: starts a new episode (one `dead_letter` status event each, never one per record).
_DEAD_LETTER_EPISODE_S = 60.0
#: On a graceful stop, backfill still running gets this long to finish before the drain.
_BACKFILL_DRAIN_S = 10.0
#: Gaps a shard holds for backfill (queued or in progress) at most: they travel in its stats
#: and `stopped` record to a successor, so they are bounded; a gap beyond is `gap_unfilled`.
BACKFILL_BACKLOG_MAX = 32


@dataclass(frozen=True)
class ShardSpec:
    """What one shard serves: an endpoint, a credential, and its share of the symbols."""

    shard_id: str
    url: str
    key_id: str
    secret: str = field(repr=False)
    symbols: tuple[str, ...]
    channels: tuple[str, ...]
    run_id: str = ""  # set by the driver: one forwarder run (names the spool directory)
    stream: str = "stocks"  # a key of alpaca/streams.py STREAMS

    @property
    def definition(self) -> StreamDefinition:
        return STREAMS[self.stream]

    def subscriptions(self) -> dict[str, list[str]]:
        return {channel: list(self.symbols) for channel in self.channels}


@dataclass
class ShardState:
    state: str = "starting"
    subscribed: bool = False
    fatal: str | None = None
    errors_by_code: Counter[int] = field(default_factory=Counter)
    state_changes: int = 0


class ShardCore:
    def __init__(self, settings: Settings, spec: ShardSpec, senders: Sequence[SendBatch]) -> None:
        self.spec = spec
        stream = spec.definition
        self.pipeline = EventPipeline(
            topic_map(settings, stream),
            DedupCache(settings.dedup_ttl_seconds, settings.dedup_max_keys),
            BarFinalizer(settings.bar_final_delay_seconds),
            # The feed sends only subscribed symbols; anything else is skipped, which keeps
            # per-symbol tables within the subscription (`*`: see Sequencer's bound).
            allowed_symbols=(
                None if "*" in spec.symbols or not stream.filter_by_symbol else spec.symbols
            ),
            name=f"shard {spec.shard_id}",
            stream=stream,
        )
        self.outbox = Outbox(senders, outbox_limits(settings, spool_directory(settings, spec)))
        self.market_clock = MarketClock(
            market_fetcher(settings, spec), self._put_market_status,
            refresh_s=settings.market_clock_refresh_seconds,
        )  # fmt: skip
        self.session = AlpacaSession(
            SessionConfig(
                url=spec.url,
                key=spec.key_id,
                secret=spec.secret,
                subscriptions=spec.subscriptions(),
                wire_format=settings.alpaca_wire_format,
                reconnect_initial=settings.reconnect_initial,
                reconnect_max=settings.reconnect_max,
                connection_limit_backoff=settings.connection_limit_backoff,
                stale_stream_seconds=settings.stale_stream_seconds,
                data_stale_seconds=settings.data_stale_seconds,
                stream=stream,
            ),
            self,
            market_open=self.market_clock.is_open,
            backlogged=self.outbox.backlogged,
        )
        self.state = ShardState()
        self.epoch = 0
        self.gaps = GapLedger(spec.stream, spec.shard_id, spec.channels, spec.symbols)
        self.backfill: Backfiller | None = backfiller_for(settings, spec, self)
        self._dead_letter_topic = settings.topic_deadletter
        self._stopped = asyncio.Event()
        # Status events never compete with data for a full buffer: they wait here, in
        # order, until their lane has room (so `overflow` itself is not dropped).
        self._buffer_bound = max(1, settings.buffer_max_events // len(senders)) * len(senders)
        self._last_drop = 0.0
        self._status_pending: deque[OutRecord] = deque(maxlen=_STATUS_PENDING_MAX)
        self._dropped_seen: Counter[str] = Counter()  # drops already reported
        self._overflow: tuple[float, Counter[str]] | None = None  # (since, drops at start)
        self._dead_letters_seen: Counter[str] = Counter()  # diversions already reported
        self._last_dead_letter: float | None = None  # open episode: latest diversion
        self._backfill_outcome: Counter[str] = Counter()  # backfilled bars: final, merged, ...
        self._backfill_ticks: Counter[str] = Counter()  # trades_emitted, quotes_duplicate, ...
        #: gaps submitted to the backfiller and not yet reported filled or unfilled (what a
        #: successor re-submits, by gap id, in submission order)
        self._backlog: dict[str, Gap] = {}
        self._handed_over: frozenset[str] = frozenset()  # on stop: in the `stopped` record

    # --- SessionHandler -----------------------------------------------------------------

    def on_items(self, items: list[DataItem], ingest_ts: str, received: float) -> None:
        records = self.pipeline.process(items, ingest_ts, received)
        if records:
            self.outbox.put(records, received)
        closed = self.gaps.note(items, ingest_ts)
        if closed is not None:
            self._gap_closed(closed)

    def on_skipped(self, skipped: Skipped) -> None:
        """Decode's skips and the pipeline's share one counter and one rate-limited log."""
        self.pipeline.skip(skipped)

    def on_state(self, state: str, info: dict[str, object]) -> None:
        st = self.state
        st.state_changes += 1
        if state == "error":
            code = info.get("code")
            if isinstance(code, int):
                st.errors_by_code[code] += 1
        elif state not in _EVENTS_NOT_STATES:
            st.state = state
        st.subscribed = self.session.subscribed or state == "subscribed"
        if state in ("disconnected", "reconnecting"):
            st.subscribed = False
        if state == "disconnected":
            self.gaps.interrupt(cause_of(str(info.get("reason", ""))))
        log.info("shard %s %s %s", self.spec.shard_id, state, _safe(info))
        self._put_status(state, info)

    # --- gaps and backfill (core/gaps.py, runtime/backfill.py) ---------------------------

    def _gap_closed(self, gap: Gap) -> None:
        """One `gap` status event per closed gap, then its backfill (beside the stream)."""
        info = gap.event()
        log.warning("shard %s gap %s", self.spec.shard_id, _safe(info))
        self._put_status("gap", info)
        self._submit(gap)

    def _submit(self, gap: Gap) -> None:
        """To the backfiller (and the backlog a successor takes over), within the bound."""
        if self.backfill is None:
            return
        if len(self._backlog) >= BACKFILL_BACKLOG_MAX:
            unfilled = self.backfill.counts.gaps_unfilled
            unfilled["backlog"] = unfilled.get("backlog", 0) + 1
            detail = f"{BACKFILL_BACKLOG_MAX} gaps were already waiting for backfill"
            self.on_gap_unfilled(gap, "backlog", {"detail": detail})
            return
        self._backlog[gap.gap_id] = gap
        self.backfill.submit(gap)

    def _take_over(self, bodies: object) -> None:
        """A predecessor's unfinished backfill (`backlog` of its hand-over mark): each gap is
        submitted again under its own id, so its `gap_filled`/`gap_unfilled` names it."""
        if not isinstance(bodies, list):
            return
        for body in bodies[:BACKFILL_BACKLOG_MAX]:
            gap = Gap.from_event(body, self.spec.shard_id, self.spec.symbols)
            if gap is None:
                log.warning("shard %s: a handed-over gap is malformed, skipped: %.200s",
                            self.spec.shard_id, body)  # fmt: skip
                continue
            if gap.gap_id in self._backlog:
                continue
            if self.backfill is None:  # the settings changed: nothing can fill it now
                self.on_gap_unfilled(gap, "disabled", {"detail": "no backfill for this shard"})
                continue
            log.info("shard %s takes over the backfill of gap %s", self.spec.shard_id,
                     gap.gap_id)  # fmt: skip
            self._submit(gap)

    def _holding_finals(self) -> bool:
        """No bar is finalised while a gap is open or being backfilled: the REST bar (late
        trades included) may still revise it, and a final cannot be taken back."""
        return self.backfill is not None and (
            self.gaps.open_cause is not None or self.backfill.busy
        )

    def on_backfill_bars(self, gap: Gap, bars: list[Any]) -> None:
        from ray_forwarder.alpaca.rest_bars import stream_bar

        records, outcome = self.pipeline.backfill_bars(
            [stream_bar(bar) for bar in bars], gap.gap_id, gap.end.event_ts, time.monotonic()
        )
        self._backfill_outcome.update(outcome)
        if records:
            self.outbox.put(records, time.monotonic())

    def on_backfill_ticks(self, gap: Gap, channel: str, items: list[DataItem]) -> None:
        """Backfilled trades or quotes (opt-in): through the pipeline's dedup, then the
        same outbox as the live records, after those already in it."""
        records, outcome = self.pipeline.backfill_ticks(items, gap.gap_id, time.monotonic())
        self._backfill_ticks.update({f"{channel}_{k}": n for k, n in outcome.items()})
        if records:
            self.outbox.put(records, time.monotonic())

    def on_gap_filled(self, gap: Gap, info: dict[str, Any]) -> None:
        self._backlog.pop(gap.gap_id, None)
        body = {"gap_id": gap.gap_id, "stream": gap.stream, **info}
        log.info("shard %s gap_filled %s", self.spec.shard_id, _safe(body))
        self._put_status("gap_filled", body)

    def on_gap_unfilled(self, gap: Gap, reason: str, info: dict[str, Any]) -> None:
        self._backlog.pop(gap.gap_id, None)
        body = {**gap.event(), "reason": reason, **info}
        if reason == "stopped" and gap.gap_id in self._handed_over:
            body["handed_over"] = True  # the `stopped` record carries it to the next run
        log.warning("shard %s gap_unfilled %s", self.spec.shard_id, _safe(body))
        self._put_status("gap_unfilled", body)

    def _put_stopped(self, backlog: list[Gap]) -> None:
        """Where this incarnation stopped, for whoever takes over (the driver passes it to
        the next `run()`; a new forwarder run reads it back from the status topic)."""
        body: dict[str, Any] = {
            "stream": self.spec.stream,
            "channels": list(self.spec.channels),
            "last": self._handover(backlog),
        }
        self._put_status("stopped", body)

    def _handover(self, backlog: list[Gap] | None = None) -> dict[str, Any] | None:
        """Where a successor resumes (the driver's `resume_from` for the next `run()`), and
        the gaps whose backfill it takes over (`backlog`: `gap` event bodies)."""
        mark = self.gaps.handover(self.pipeline.bars_resume_from())
        if mark is None:
            return None
        out: dict[str, Any] = mark.as_dict()
        gaps = list(self._backlog.values()) if backlog is None else backlog
        if gaps:
            out["backlog"] = [gap.event() for gap in gaps]
        return out

    # --- status events ------------------------------------------------------------------

    def _put_market_status(self, event: str, info: dict[str, object]) -> None:
        log.info("shard %s %s %s", self.spec.shard_id, event, _safe(info))
        self._put_status(event, info)

    def _put_status(self, event: str, info: dict[str, object]) -> None:
        self._status_pending.append(self.pipeline.status_record(self.spec.shard_id, event, info))
        self._flush_status()

    def _flush_status(self, force: bool = False) -> None:
        """Hand pending status records to the outbox, in order, while their lane has room."""
        while self._status_pending:
            record = self._status_pending[0]
            if not force and not self.outbox.lane_for(record.key).has_room():
                return
            self.outbox.put([self._status_pending.popleft()], time.monotonic())

    def _check_overflow(self) -> None:
        """One `overflow` status event when records start being dropped, one `recovered`
        once no record was dropped for `_RECOVERED_AFTER_S` and the buffer is below its
        bound: per transition, never per record. Runs every `_FINALIZE_INTERVAL_S`."""
        outbox = self.outbox.snapshot()
        dropped = Counter(outbox.dropped_by_channel)
        new = dropped - self._dropped_seen
        self._dropped_seen = dropped
        limit = self._buffer_bound
        now = time.monotonic()
        if new:
            self._last_drop = now
            if self._overflow is None:
                self._overflow = (now, dropped - new)
                info: dict[str, object] = {
                    "dropped": new.total(),
                    "dropped_by_channel": dict(new),
                    "buffered": outbox.buffered,
                    "buffer_max_events": limit,
                    "spooled": outbox.spooled,
                }
                log.warning("shard %s overflow %s", self.spec.shard_id, _safe(info))
                self._put_status("overflow", info)
        elif (
            self._overflow is not None
            and now - self._last_drop >= _RECOVERED_AFTER_S
            and self.outbox.has_room()
        ):
            since, before = self._overflow
            self._overflow = None
            episode = dropped - before
            info = {
                "dropped": episode.total(),
                "dropped_by_channel": dict(episode),
                "overflow_s": round(now - since, 3),
                "buffered": outbox.buffered,
            }
            log.warning("shard %s recovered %s", self.spec.shard_id, _safe(info))
            self._put_status("recovered", info)
        self._flush_status()

    def _check_dead_letters(self) -> None:
        """One `dead_letter` status event when records start being diverted to the
        dead-letter topic (or dropped, the dead-letter topic refusing them too), per
        episode: a new one starts after `_DEAD_LETTER_EPISODE_S` without a diversion."""
        outbox = self.outbox.snapshot()
        diverted = outbox.dead_lettered + outbox.dead_letter_dropped
        new = diverted - self._dead_letters_seen
        self._dead_letters_seen = diverted
        now = time.monotonic()
        if not new:
            if self._last_dead_letter and now - self._last_dead_letter > _DEAD_LETTER_EPISODE_S:
                self._last_dead_letter = None
            return
        opened = self._last_dead_letter is None
        self._last_dead_letter = now
        if opened:
            info: dict[str, object] = {
                "dead_lettered": dict(outbox.dead_lettered),
                "dropped": dict(outbox.dead_letter_dropped),
                "topic": self._dead_letter_topic,
            }
            log.warning("shard %s dead_letter %s", self.spec.shard_id, _safe(info))
            self._put_status("dead_letter", info)

    # --- lifecycle ----------------------------------------------------------------------

    async def run(
        self,
        epoch: int = 0,
        resume_from: dict[str, Any] | None = None,
        restarted: bool | None = None,
    ) -> None:
        """Read and forward until `stop()`; raises FatalSessionError when the feed refuses us.

        `epoch` numbers this shard incarnation (0 first, higher after each restart): seq
        continues above everything an earlier incarnation issued (see `Sequencer`).
        `resume_from` is where a predecessor stopped (a `Mark` as a dict): the data path was
        interrupted since, so a gap is open until the first item arrives: `restart` when
        `restarted` (None: `epoch > 0`; a new run numbers above an earlier run's epochs
        too, so the driver says which it is), else `stop_start`."""
        self.epoch = epoch
        self.pipeline.start_seq_epoch(epoch)
        self.gaps.start_epoch(epoch)
        if resume_from is not None:
            self.gaps.resume_from(
                Mark.from_dict(resume_from),
                "restart" if (epoch > 0 if restarted is None else restarted) else "stop_start",
            )
            self._take_over(resume_from.get("backlog"))
        sender = asyncio.create_task(self.outbox.run(), name="outbox")
        finalizer = asyncio.create_task(self._finalize_loop(), name="bar-finalizer")
        clock = asyncio.create_task(self.market_clock.run(), name="market-clock")
        backfill = asyncio.create_task(
            self.backfill.run() if self.backfill is not None else asyncio.sleep(0),
            name="backfill",
        )
        try:
            await self.session.run()
        except FatalSessionError as exc:
            self.state.fatal = str(exc)
            self.state.state = "failed"
            log.error("shard %s stopped: %s", self.spec.shard_id, exc)
            raise
        finally:
            clock.cancel()
            finalizer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clock
            with contextlib.suppress(asyncio.CancelledError):
                await finalizer
            if self.backfill is not None and self.state.fatal is None:
                await self.backfill.wait_idle(_BACKFILL_DRAIN_S)
            backlog = list(self._backlog.values())  # unfinished: the next run takes over
            self._handed_over = frozenset(self._backlog)
            backfill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await backfill
            self._emit(self.pipeline.finalize_all())
            self._put_stopped(backlog)
            self._check_overflow()
            self._flush_status(force=True)
            self.outbox.close()
            await sender
            self._stopped.set()

    async def stop(self, timeout: float = 30.0) -> bool:
        """Stop reading, flush everything to the producer; True if it drained in time."""
        await self.session.stop()
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _finalize_loop(self) -> None:
        while True:
            await asyncio.sleep(_FINALIZE_INTERVAL_S)
            if not self._holding_finals():
                self._emit(self.pipeline.finalize_due(time.monotonic()))
            self._check_overflow()
            self._check_dead_letters()

    def _emit(self, records: list[Any]) -> None:
        if records:
            self.outbox.put(records, time.monotonic())

    def stats(self) -> dict[str, Any]:
        """A plain-data snapshot for the driver (health, metrics, summaries)."""
        counters = self.pipeline.counters
        dedup = self.pipeline.dedup
        outbox = self.outbox.snapshot()
        return {
            "shard_id": self.spec.shard_id,
            "stream": self.spec.stream,
            "symbols": len(self.spec.symbols),
            "state": self.state.state,
            "subscribed": self.state.subscribed,
            "fatal": self.state.fatal,
            "connects": self.session.connects,
            "reconnects": self.session.reconnects,
            "stale_reconnects": self.session.stale_reconnects,
            "stale_data_reconnects": self.session.stale_data_reconnects,
            "resubscribes": self.session.resubscribes,
            "unserved": len(self.session.unserved),
            "unserved_sample": _sample(self.session.unserved),
            "market_open": self.market_clock.is_open(),
            "market_clock": self.market_clock.source,
            "epoch": self.epoch,
            "errors_by_code": dict(self.state.errors_by_code),
            "skipped": dict(counters.skipped),
            "received": dict(counters.received),
            "emitted": dict(counters.emitted),
            "deduplicated": dict(counters.deduplicated),
            "finals": counters.finals,
            "dedup_keys": len(dedup),
            "dedup_evicted": dedup.evicted,
            "dedup_window_s": round(dedup.window(time.monotonic()), 3),
            "seq_keys": len(self.pipeline.sequencer),
            "seq_evicted": self.pipeline.sequencer.evicted,
            "late_bar_revisions": self.pipeline.late_revisions,
            "buffered": outbox.buffered,
            "buffered_bytes": outbox.buffered_bytes,
            "spooled": outbox.spooled,
            "spooled_bytes": outbox.spooled_bytes,
            "spooled_total": outbox.spooled_total,
            "in_flight": outbox.in_flight,
            "overflowing": self._overflow is not None,
            "acked": dict(outbox.acked_by_channel),
            "dropped": dict(outbox.dropped_by_channel),
            "dead_lettered": dict(outbox.dead_lettered),
            "dead_letter_dropped": dict(outbox.dead_letter_dropped),
            "dead_lettering": self._last_dead_letter is not None,  # an episode is open
            "spool_lost": outbox.spool_lost,
            "batches_failed": outbox.batches_failed,
            "batches_resent": outbox.batches_resent,
            "last_ack_latency_s": outbox.last_ack_latency_s,
            "gaps": dict(self.gaps.counts.gaps),
            "gap_seconds": {k: round(v, 3) for k, v in self.gaps.counts.seconds.items()},
            "gap_open": self.gaps.open_cause,
            "gap_mark": self._handover(),
            "backfill": {
                **(self.backfill.stats() if self.backfill is not None else {}),
                **self._backfill_outcome,
                "tick_records": dict(self._backfill_ticks),  # trades_emitted, ..._duplicate
            },
        }


def market_fetcher(settings: Settings, spec: ShardSpec) -> FetchHours | None:
    """The shard's market-hours source: none (always open) for streams and feeds that
    stream around the clock (crypto, news, the stock `test` feed) or when data staleness is
    off, else Alpaca's clock with the shard's key."""
    if settings.data_stale_seconds <= 0 or spec.definition.always_open:
        return None
    if spec.stream == "stocks" and settings.alpaca_feed in ALWAYS_OPEN_FEEDS:
        return None
    base = trading_base_url(settings.alpaca_trading_url, spec.url)
    return alpaca_fetcher(base, spec.key_id, spec.secret)


def _sample(pairs: set[tuple[str, str]], limit: int = 10) -> list[str]:
    """A few unserved pairs as ``channel:symbol``, for /healthz (the count is the metric)."""
    return [f"{channel}:{symbol}" for channel, symbol in sorted(pairs)[:limit]]


def _safe(info: dict[str, object]) -> str:
    """Log form of state info; it never carries secrets (the session never puts them in)."""
    return " ".join(f"{k}={v}" for k, v in info.items())
