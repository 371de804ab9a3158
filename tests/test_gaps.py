"""The gap ledger and the pipeline's merge of backfilled bars: no I/O."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ray_forwarder.alpaca.events import DataItem
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.gaps import SYMBOLS_IN_EVENT, Gap, GapLedger, Mark, cause_of
from ray_forwarder.core.pipeline import EventPipeline

T0 = "2026-01-05T14:30:"


def _trade(second: int, symbol: str = "SPY") -> DataItem:
    ts = f"{T0}{second:02d}.000000000Z"
    return DataItem("trades", symbol, ts, {"T": "t", "S": symbol, "i": second, "t": ts})


def _daily(symbol: str = "SPY") -> DataItem:
    ts = "2026-01-05T05:00:00.000000000Z"
    return DataItem("dailyBars", symbol, ts, {"T": "d", "S": symbol, "t": ts})


def _ingest(second: int) -> str:
    return f"2026-11-27T10:00:{second:02d}.000000Z"


def test_no_gap_without_an_interruption() -> None:
    ledger = GapLedger("stocks", "stocks-0", ["trades"], ["SPY"])
    assert ledger.note([_trade(1)], _ingest(1)) is None
    assert ledger.note([_trade(2)], _ingest(2)) is None
    assert ledger.last == Mark(_ingest(2), f"{T0}02.000000000Z")
    assert not ledger.counts.gaps


def test_a_disconnect_opens_a_gap_that_the_first_item_after_closes() -> None:
    ledger = GapLedger("stocks", "stocks-0", ["trades", "bars"], ["SPY", "QQQ"])
    ledger.note([_trade(1), _trade(3, "QQQ"), _daily()], _ingest(3))
    ledger.interrupt(cause_of("ConnectionClosedError: no close frame received or sent"))
    ledger.interrupt(cause_of("alpaca error 406: connection limit exceeded"))  # same gap
    assert ledger.note([], _ingest(9)) is None  # a frame without data closes nothing
    gap = ledger.note([_daily(), _trade(20), _trade(21)], _ingest(13))
    assert gap is not None
    assert gap.cause == "disconnect"  # the first cause wins
    assert gap.start == Mark(_ingest(3), f"{T0}03.000000000Z")  # daily bars mark nothing
    assert gap.end == Mark(_ingest(13), f"{T0}20.000000000Z")  # the first item after
    assert gap.seconds == pytest.approx(10.0)
    event = gap.event()
    assert event["from"] == {"received_at": _ingest(3), "event_ts": f"{T0}03.000000000Z"}
    assert event["to"]["event_ts"] == f"{T0}20.000000000Z"
    assert event["symbols"] == ["SPY", "QQQ"] and event["channels"] == ["trades", "bars"]
    assert event["stream"] == "stocks" and event["gap_id"] == "stocks-0:0:1"
    assert orjson.loads(orjson.dumps(event)) == event  # machine-readable as it stands
    assert ledger.counts.gaps == Counter({"disconnect": 1})
    assert ledger.counts.seconds["disconnect"] == pytest.approx(10.0)
    assert ledger.note([_trade(22)], _ingest(14)) is None  # closed once


def test_a_fresh_run_interrupted_before_its_first_item_opens_no_gap() -> None:
    """A 406 or a drop before any data flowed (a slow start, a feed that refuses the first
    connections) missed nothing the run had begun forwarding: no gap, and the first gap
    opens only once data has flowed."""
    ledger = GapLedger("stocks", "stocks-0", ["trades"], ["SPY"])
    ledger.interrupt(cause_of("alpaca error 406: connection limit exceeded"))
    assert ledger.open_cause is None
    assert ledger.note([_trade(1)], _ingest(1)) is None
    ledger.interrupt(cause_of("ConnectionClosedError: no close frame received or sent"))
    gap = ledger.note([_trade(5)], _ingest(5))
    assert gap is not None and gap.cause == "disconnect" and gap.start is not None
    assert ledger.counts.gaps == Counter({"disconnect": 1})


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        ("stale stream: no frame for 61.0s", "stale_stream"),
        ("stale data: no data item for 60.0s while the market is open", "stale_data"),
        ("alpaca error 406: connection limit exceeded (another ...)", "connection_limit"),
        ("alpaca error 407: slow client", "slow_client"),
        ("alpaca error 500: internal error", "server_error"),
        ("server closed the connection", "disconnect"),
    ],
)
def test_causes_from_the_sessions_reasons(reason: str, cause: str) -> None:
    assert cause_of(reason) == cause


def test_a_restarted_incarnation_resumes_from_its_predecessors_mark() -> None:
    ledger = GapLedger("stocks", "stocks-0", ["trades"], ["SPY"])
    ledger.start_epoch(2)
    mark = Mark.from_dict({"received_at": _ingest(5), "event_ts": f"{T0}05.5Z"})
    assert mark == Mark(_ingest(5), f"{T0}05.5Z")
    ledger.resume_from(mark, "restart")
    assert ledger.last == mark  # reported again if this one dies before any data
    gap = ledger.note([_trade(30)], _ingest(30))
    assert gap is not None and gap.cause == "restart" and gap.start == mark
    assert gap.gap_id == "stocks-0:2:1"


def test_a_restart_with_nothing_known_opens_a_gap_without_start() -> None:
    ledger = GapLedger("stocks", "stocks-0", ["trades"], ["SPY"])
    ledger.resume_from(Mark.from_dict({}), "restart")
    gap = ledger.note([_trade(30)], _ingest(30))
    assert gap is not None and gap.start is None and gap.seconds == 0.0
    assert gap.event()["from"] is None


@pytest.mark.parametrize(
    "value",
    [None, [], {"received_at": 1, "event_ts": "x"}, {"received_at": "nope", "event_ts": "x"},
     {"received_at": _ingest(1), "event_ts": "2026-13-01T00:00:00Z"}],
)  # fmt: skip
def test_marks_from_untrusted_records_are_checked(value: object) -> None:
    assert Mark.from_dict(value) is None


def test_many_symbols_are_referred_to_by_shard() -> None:
    symbols = [f"S{i}" for i in range(SYMBOLS_IN_EVENT + 1)]
    ledger = GapLedger("stocks", "stocks-3", ["bars"], symbols)
    ledger.note([_trade(1)], _ingest(1))
    ledger.interrupt("disconnect")
    gap = ledger.note([_trade(2)], _ingest(2))
    assert gap is not None
    event = gap.event()
    assert event["symbols"] is None
    assert event["symbols_ref"] == {"shard": "stocks-3", "count": SYMBOLS_IN_EVENT + 1}


def _closed_gap(symbols: list[str]) -> Gap:
    ledger = GapLedger("stocks", "stocks-3", ["trades", "bars"], symbols)
    ledger.start_epoch(1)
    ledger.resume_from(Mark(_ingest(1), f"{T0}01.000000000Z", f"{T0[:-3]}29:00Z"), "restart")
    gap = ledger.note([_trade(9)], _ingest(9))
    assert gap is not None
    return gap


@pytest.mark.parametrize("count", [2, SYMBOLS_IN_EVENT + 1])
def test_a_handed_over_gap_is_the_same_gap_again(count: int) -> None:
    """A successor rebuilds a predecessor's unfinished gap from its event body (what travels
    in the hand-over mark's `backlog`), through JSON; a symbol reference is the shard's set."""
    symbols = [f"S{i}" for i in range(count)]
    gap = _closed_gap(symbols)
    body = orjson.loads(orjson.dumps(gap.event()))
    assert Gap.from_event(body, "stocks-3", symbols) == gap


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    ),
    st.sampled_from(["gap_id", "stream", "cause", "channels", "symbols", "from", "to"]),
)
def test_a_malformed_handed_over_gap_is_refused_never_raised(junk: object, field: str) -> None:
    """The backlog comes back from the status topic: anything that is not a gap's event
    body (a field replaced by junk) is None, never an exception."""
    body = orjson.loads(orjson.dumps(_closed_gap(["SPY"]).event()))
    assert Gap.from_event(junk, "stocks-3", ["SPY"]) is None
    body[field] = junk
    gap = Gap.from_event(body, "stocks-3", ["SPY"])
    assert gap is None or gap.event()[field] == junk or field == "from"


# --- backfilled bars through the pipeline ---------------------------------------------------


def _pipeline() -> EventPipeline:
    topics = {"bars": "b", "updatedBars": "b", "status": "s", "trades": "t"}
    return EventPipeline(topics, DedupCache(900, 1000), BarFinalizer(1.0), allowed_symbols=["SPY"])


def _bar(minute: int, close: float, kind: str = "b") -> dict[str, object]:
    ts = f"2026-01-05T14:{minute:02d}:00.000000000Z"
    return {"T": kind, "S": "SPY", "o": 1.0, "h": 2.0, "l": 0.5, "c": close, "v": 10, "t": ts}


def _item(bar: dict[str, object]) -> DataItem:
    channel = "bars" if bar["T"] == "b" else "updatedBars"
    return DataItem(channel, "SPY", str(bar["t"]), bar)


def test_backfilled_bars_merge_with_what_the_stream_delivered() -> None:
    pipeline = _pipeline()
    ingest = "2026-11-27T10:00:00.000000Z"
    # minute 30 streamed and finalised; 31 and 33 streamed, still pending
    pipeline.process([_item(_bar(30, 1.0))], ingest, 0.0)
    assert len(pipeline.finalize_due(5.0)) == 1
    pipeline.process([_item(_bar(31, 1.1)), _item(_bar(33, 1.3, "u"))], ingest, 10.0)
    rest = [_bar(30, 9.0), _bar(31, 1.5), _bar(32, 1.2), _bar(33, 1.3), _bar(35, 1.35),
            _bar(36, 1.4)]  # fmt: skip
    resumed = "2026-01-05T14:37:10.000000000Z"  # data resumed in minute 37
    records, outcome = pipeline.backfill_bars(rest, "stocks-0:0:1", resumed, 10.5)
    assert outcome == Counter(already_final=1, merged=1, same=1, final=2, open=1)
    envelopes = [orjson.loads(r.value) for r in records]
    assert [e["payload"]["t"][14:16] for e in envelopes] == ["32", "35"]
    for envelope in envelopes:
        assert envelope["is_final"] and envelope["channel"] == "bars"
        assert envelope["backfill"] == {"gap_id": "stocks-0:0:1", "via": "rest"}
        assert envelope["source"] == "alpaca" and envelope["payload"]["T"] == "b"
    assert envelopes[0]["key"] == "bars:SPY:2026-01-05T14:32:00.000000000Z:final"
    assert [e["seq"] for e in envelopes] == sorted(e["seq"] for e in envelopes)
    # the stream's records stay as they are: a late copy of 32 is a late revision, 36's
    # bar and update merge with the backfilled pending bar
    late = pipeline.process([_item(_bar(32, 1.2))], ingest, 11.0)
    assert len(late) == 1 and not orjson.loads(late[0].value)["is_final"]
    assert pipeline.late_revisions == 1
    assert (
        len(pipeline.process([_item(_bar(36, 1.4)), _item(_bar(36, 1.45, "u"))], ingest, 11.0)) == 2
    )
    finals = [orjson.loads(r.value) for r in pipeline.finalize_due(20.0)]
    assert [(f["payload"]["t"][14:16], f["payload"]["c"], f["payload"]["T"], "backfill" in f)
            for f in finals] == [
        ("31", 1.5, "b", True),  # REST's revision of a streamed bar: marked
        ("33", 1.3, "u", False),  # REST equal to the stream's revision: unchanged
        ("36", 1.45, "u", False),  # the stream revised the backfilled bar last
    ]  # fmt: skip


def test_a_backfilled_bar_the_stream_never_sends_is_finalised_marked() -> None:
    pipeline = _pipeline()
    resumed = "2026-01-05T14:37:10.000000000Z"
    records, outcome = pipeline.backfill_bars([_bar(36, 1.4)], "g", resumed, 0.0)
    assert records == [] and outcome == Counter(open=1)
    [final] = [orjson.loads(r.value) for r in pipeline.finalize_due(5.0)]
    assert final["is_final"] and final["backfill"]["gap_id"] == "g"


# --- hand-over marks read back from the status topic ----------------------------------------


def _status(shard: str, event: str, **body: object) -> bytes:
    payload = {"event": event, "shard": shard, **body}
    return orjson.dumps({"channel": "status", "source": "forwarder", "payload": payload})


def test_each_shard_resumes_from_its_last_word() -> None:
    from ray_forwarder.runtime.resume import last_words

    mark = {"received_at": _ingest(5), "event_ts": f"{T0}05.000000000Z"}
    values = [
        _status("stocks-0", "connected"),
        _status("stocks-0", "stopped", last=mark),  # a graceful stop
        _status("stocks-1", "stopped", last=mark),
        _status("stocks-1", "connected"),  # ... then a run that never stopped gracefully
        _status("stocks-2", "stopped", last=None),  # stopped before any data
        b"not json",
        orjson.dumps({"channel": "trades", "payload": {"shard": "stocks-0"}}),
        _status("other-0", "stopped", last=mark),
        None,
    ]
    marks = last_words(values, ["stocks-0", "stocks-1", "stocks-2", "stocks-3"])
    assert marks == {"stocks-0": mark, "stocks-1": {}, "stocks-2": {}}


def test_a_new_run_numbers_above_every_epoch_an_earlier_run_used() -> None:
    """seq keeps growing across a stop and start: the next run's epoch is above the
    highest one in each shard's status records."""
    from ray_forwarder.core.pipeline import SEQ_EPOCH_BITS
    from ray_forwarder.runtime.resume import last_epochs

    def status(shard: str, seq: object) -> bytes:
        payload = {"event": "stopped", "shard": shard}
        return orjson.dumps({"channel": "status", "seq": seq, "payload": payload})

    values = [
        status("stocks-0", 3),  # epoch 0
        status("stocks-0", (2 << SEQ_EPOCH_BITS) | 7),  # a restarted incarnation
        status("stocks-0", (1 << SEQ_EPOCH_BITS) | 9),
        status("stocks-1", 1),
        status("stocks-2", "x"),  # not a number: ignored
        status("other-0", 5 << SEQ_EPOCH_BITS),
        b"not json",
        None,
    ]
    assert last_epochs(values, ["stocks-0", "stocks-1", "stocks-2"]) == {
        "stocks-0": 2,
        "stocks-1": 0,
    }


def test_a_successor_starts_where_the_bars_are_not_final() -> None:
    finalizer = BarFinalizer(1.0)
    assert finalizer.resume_from() is None
    finalizer.observe("SPY", "2026-01-05T14:30:00.000000000Z", {}, 0.0)
    finalizer.observe("QQQ", "2026-01-05T14:31:00.000000000Z", {}, 0.5)
    assert finalizer.resume_from() == "2026-01-05T14:30:00.000000000Z"
    finalizer.drain()  # a graceful stop finalises everything it saw
    assert finalizer.resume_from() == "2026-01-05T14:32:00.000000000Z"
