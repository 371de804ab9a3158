"""Market hours from Alpaca's clock and calendar: the sans-I/O decision (`MarketHours`), the
reply parsers, the refresh schedule and fallback of `MarketClock` with an injected clock and
fetcher. Nothing here touches the network."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import pytest

from ray_forwarder.alpaca.market_clock import (
    LIVE_TRADING_URL,
    ClockReply,
    MarketClock,
    MarketClockError,
    MarketHours,
    MarketReading,
    parse_calendar,
    parse_clock,
    trading_base_url,
)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


#: A real-shaped reply: Eastern offsets, nine fractional digits.
CLOSED_FRIDAY_NIGHT = {
    "timestamp": "2026-01-09T18:01:02.584498443-05:00",
    "is_open": False,
    "next_open": "2026-01-12T09:30:00-05:00",
    "next_close": "2026-01-12T16:00:00-05:00",
}
OPEN_MONDAY = {
    "timestamp": "2026-01-12T10:00:00-05:00",
    "is_open": True,
    "next_open": "2026-01-13T09:30:00-05:00",
    "next_close": "2026-01-12T16:00:00-05:00",
}


def test_the_clock_decides_up_to_the_second_boundary_it_names() -> None:
    hours = MarketHours(clock=parse_clock(CLOSED_FRIDAY_NIGHT))
    assert hours.is_open(at("2026-01-10T12:00:00-05:00")) is False  # Saturday
    assert hours.is_open(at("2026-01-12T09:29:59-05:00")) is False
    assert hours.is_open(at("2026-01-12T09:30:00-05:00")) is True  # next_open passed
    assert hours.is_open(at("2026-01-12T15:59:59-05:00")) is True
    assert hours.is_open(at("2026-01-12T16:00:00-05:00")) is None  # beyond: unknown

    hours = MarketHours(clock=parse_clock(OPEN_MONDAY))
    assert hours.is_open(at("2026-01-12T15:00:00-05:00")) is True
    assert hours.is_open(at("2026-01-12T20:00:00-05:00")) is False  # closed after 16:00
    assert hours.is_open(at("2026-01-13T09:30:00-05:00")) is None


def test_the_calendar_covers_the_days_after_the_clock_in_eastern_time() -> None:
    days = parse_calendar(
        [
            {"date": "2026-03-06", "open": "09:30", "close": "16:00"},  # before DST (EST)
            {"date": "2026-03-09", "open": "09:30", "close": "16:00"},  # after DST (EDT)
            {"date": "2026-03-10", "open": "09:30", "close": "13:00", "session_open": "0400"},
        ]
    )
    hours = MarketHours()
    assert hours.update_calendar(days, date(2026, 3, 6), date(2026, 3, 11))
    assert hours.is_open(at("2026-03-06T14:30:00+00:00")) is True  # 09:30 EST
    assert hours.is_open(at("2026-03-06T14:29:59+00:00")) is False
    assert hours.is_open(at("2026-03-09T13:30:00+00:00")) is True  # 09:30 EDT
    assert hours.is_open(at("2026-03-09T20:00:00+00:00")) is False  # 16:00 EDT
    assert hours.is_open(at("2026-03-07T15:00:00+00:00")) is False  # Saturday: no entry
    assert hours.is_open(at("2026-03-10T17:30:00+00:00")) is False  # early close 13:00
    assert hours.is_open(at("2026-03-11T15:00:00+00:00")) is False  # in span, no session
    assert hours.is_open(at("2026-03-12T15:00:00+00:00")) is None  # outside the span
    assert hours.next_change(at("2026-03-09T12:00:00+00:00")) == at("2026-03-09T13:30:00+00:00")


def test_the_clock_wins_over_the_calendar_where_both_answer() -> None:
    """An unscheduled closure shows in the clock first."""
    hours = MarketHours(clock=parse_clock(CLOSED_FRIDAY_NIGHT))
    hours.update_calendar(
        parse_calendar([{"date": "2026-01-09", "open": "00:00", "close": "23:59"}]),
        date(2026, 1, 9), date(2026, 1, 9),
    )  # fmt: skip
    assert hours.is_open(at("2026-01-09T20:00:00-05:00")) is False


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {},
        {**OPEN_MONDAY, "is_open": "true"},  # a string is not a boolean
        {**OPEN_MONDAY, "is_open": 1},
        {**OPEN_MONDAY, "timestamp": "2026-01-12T10:00:00"},  # no offset
        {**OPEN_MONDAY, "next_open": "2026-99-99T09:30:00Z"},
        {**OPEN_MONDAY, "next_close": 1768251600},
        {**OPEN_MONDAY, "next_close": "\uff12\uff10\uff12\uff16-01-12T16:00:00Z"},  # fullwidth
        {k: v for k, v in OPEN_MONDAY.items() if k != "next_open"},
    ],
)
def test_a_malformed_clock_reply_is_a_clear_error(body: object) -> None:
    with pytest.raises(MarketClockError, match=r"^/v2/clock: unexpected reply"):
        parse_clock(body)


@pytest.mark.parametrize(
    "body",
    [
        {"date": "2026-01-12"},
        [{"date": "2026-01-12", "open": "9:30", "close": "16:00"}],
        [{"date": "2026-01-12", "open": "09:30", "close": "25:00"}],
        [{"date": "2026-13-12", "open": "09:30", "close": "16:00"}],
        [{"date": 20260112, "open": "09:30", "close": "16:00"}],
        [{"date": "2026-01-12", "open": "٠٩:٣٠", "close": "16:00"}],
    ],
)
def test_a_malformed_calendar_reply_is_a_clear_error(body: object) -> None:
    with pytest.raises(MarketClockError, match=r"^/v2/calendar: unexpected reply"):
        parse_calendar(body)


def test_the_trading_url_follows_the_stream_url_only_for_a_local_simulator() -> None:
    assert trading_base_url(None, "wss://stream.data.alpaca.markets/v2/sip") == LIVE_TRADING_URL
    assert trading_base_url(None, "ws://127.0.0.1:8765/v2/sip") == "http://127.0.0.1:8765"
    assert trading_base_url(None, "ws://localhost:80/v2/iex") == "http://localhost:80"
    assert trading_base_url(None, "ws://[::1]:9/v2/iex") == "http://[::1]:9"
    assert trading_base_url(None, "ws://10.0.0.5:8765/v2/sip") == LIVE_TRADING_URL
    explicit = "https://paper-api.alpaca.markets/"
    assert trading_base_url(explicit, "ws://127.0.0.1:1/v2/sip") == explicit.rstrip("/")


class FakeTime:
    def __init__(self, start: str) -> None:
        self.now = at(start)

    def __call__(self) -> datetime:
        return self.now


def _reading(body: dict[str, object]) -> MarketReading:
    clock = ClockReply.model_validate(body)
    return MarketReading(clock, [], clock.timestamp.date(), clock.timestamp.date())


async def test_refreshes_at_the_named_boundary_and_falls_back_only_when_nothing_covers_now():
    now = FakeTime("2026-01-12T10:00:00-05:00")
    answers: list[object] = [_reading(OPEN_MONDAY)]
    events: list[tuple[str, dict[str, object]]] = []

    async def fetch(_today: date) -> MarketReading:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, MarketReading)
        return answer

    clock = MarketClock(fetch, lambda e, i: events.append((e, i)), refresh_s=300, now=now)
    assert clock.is_open() and clock.source == "pending"  # unknown yet: assumed open, quietly
    await clock.refresh()
    assert clock.source == "alpaca" and clock.is_open() and events == []
    assert clock.next_refresh_in() == 300  # the close is hours away
    now.now = at("2026-01-12T15:58:00-05:00")
    assert clock.next_refresh_in() == 121  # at the close, plus a second
    now.now = at("2026-01-12T16:30:00-05:00")
    assert clock.is_open() is False  # closed per the earlier reading, no fetch needed

    answers.append(MarketClockError("GET /v2/clock: HTTP 500"))
    await clock.refresh()  # the earlier reading still covers now: no fallback, no event
    assert clock.source == "alpaca" and clock.is_open() is False and events == []
    assert clock.next_refresh_in() == 60

    now.now = at("2026-01-13T10:00:00-05:00")  # beyond the reading: now unknown
    answers.append(MarketClockError("GET /v2/clock: HTTP 500"))
    await clock.refresh()
    assert clock.source == "assumed_open" and clock.is_open() is True
    assert [(e, i["source"], i["reason"]) for e, i in events] == [
        ("market_clock", "assumed_open", "GET /v2/clock: HTTP 500")
    ]
    answers.append(RuntimeError("a client bug"))  # unforeseen: the same fallback, no raise
    await clock.refresh()
    assert len(events) == 1 and clock.failures == 3


async def test_a_feed_that_never_closes_needs_no_clock() -> None:
    clock = MarketClock(None, lambda e, i: pytest.fail("no event expected"))
    assert clock.is_open() and clock.source == "always_open"
    await asyncio.wait_for(clock.run(), 1)  # returns at once: nothing to refresh


def test_next_change_is_none_without_data() -> None:
    assert MarketHours().next_change(datetime.now(UTC)) is None
    assert MarketHours().is_open(datetime.now(UTC) + timedelta(days=1)) is None


# --- property-based: the parsers take network input -----------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: A shared 2-core machine: no per-example deadline, no "generation too slow" failure.
_patient = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
_instant = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 30), timezones=st.just(UTC)
).map(lambda moment: moment.isoformat())
_field = _instant | _json


@given(
    st.one_of(
        _json,
        st.fixed_dictionaries(
            {"timestamp": _field, "is_open": st.booleans() | _json,
             "next_open": _field, "next_close": _field}
        ),
    )
)  # fmt: skip
@_patient
def test_any_clock_reply_parses_or_is_a_clear_error(body: object) -> None:
    try:
        clock = parse_clock(body)
    except MarketClockError as exc:
        assert str(exc).startswith("/v2/clock: unexpected reply")
        return
    assert isinstance(clock.is_open, bool)
    assert all(m.tzinfo is UTC for m in (clock.timestamp, clock.next_open, clock.next_close))
    hours = MarketHours(clock=clock)
    assert hours.is_open(clock.timestamp) in (True, False, None)


_hhmm = st.tuples(st.integers(0, 30), st.integers(0, 70)).map(lambda t: f"{t[0]:02d}:{t[1]:02d}")


@given(
    st.one_of(
        _json,
        st.lists(
            st.fixed_dictionaries(
                {"date": st.dates().map(date.isoformat) | _json,
                 "open": _hhmm | _json, "close": _hhmm | _json}
            ),
            max_size=5,
        ),
    )
)  # fmt: skip
@_patient
def test_any_calendar_reply_parses_or_is_a_clear_error(body: object) -> None:
    try:
        days = parse_calendar(body)
    except MarketClockError as exc:
        assert str(exc).startswith("/v2/calendar: unexpected reply")
        return
    hours = MarketHours()
    if days and hours.update_calendar(days, min(d.date for d in days), max(d.date for d in days)):
        for opens, closes in hours.sessions:
            assert opens < closes and hours.is_open(opens) is True
