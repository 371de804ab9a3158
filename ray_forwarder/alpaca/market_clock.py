"""When is the market open? Alpaca's own answer, from its trading API's clock and calendar.

A stream that delivers no data for a minute is stuck when the market is open and normal
when it is closed, so the session's data-staleness check asks `MarketClock.is_open()`.

- `MarketHours` (no I/O) decides "open at t" from a `/v2/clock` reading (open now, next
  open, next close: exact up to the second boundary it names) and, beyond that, from the
  `/v2/calendar` trading days (regular hours, Eastern time, early closes included).
- `fetch_market_hours` is the thin aiohttp client for both endpoints.
- `MarketClock` keeps them fresh (at start, at each open/close boundary, every
  `MARKET_CLOCK_REFRESH_SECONDS`) and falls back to the documented assumption "always open"
  while Alpaca cannot be asked, announcing that once in a status event.

Secrets (the key pair) travel only in request headers; error texts name the endpoint and
the HTTP status or exception type, never the URL's userinfo, the headers or the body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from ipaddress import ip_address
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

log = logging.getLogger(__name__)

#: Alpaca's trading API (clock and calendar). Paper-trading keys need
#: ``https://paper-api.alpaca.markets`` (ALPACA_TRADING_URL).
LIVE_TRADING_URL = "https://api.alpaca.markets"
#: Feeds that stream around the clock (Alpaca's test stream, symbol FAKEPACA).
ALWAYS_OPEN_FEEDS = frozenset({"test"})
#: The exchange calendar's time zone (calendar `open`/`close` are local times there).
MARKET_TZ_NAME = "America/New_York"
#: Days of calendar fetched ahead, so a clock outage of a few days is still covered.
CALENDAR_DAYS_AHEAD = 7
REQUEST_TIMEOUT_S = 10.0
#: Retry delay after a failed fetch (capped by the refresh interval).
RETRY_AFTER_FAILURE_S = 60.0


class MarketClockError(RuntimeError):
    """Alpaca's clock or calendar could not be read; the text is safe to log."""


# --- wire models (pydantic at the edge) -------------------------------------------------


class ClockReply(BaseModel):
    """`GET /v2/clock`: `{"timestamp", "is_open", "next_open", "next_close"}`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    timestamp: datetime
    is_open: bool
    next_open: datetime
    next_close: datetime

    @field_validator("timestamp", "next_open", "next_close", mode="before")
    @classmethod
    def _instant(cls, value: object) -> datetime:
        return _parse_instant(value)

    @field_validator("is_open", mode="before")
    @classmethod
    def _strict_bool(cls, value: object) -> bool:
        if not isinstance(value, bool):
            raise ValueError("is_open must be a JSON boolean")
        return value


class CalendarDay(BaseModel):
    """One entry of `GET /v2/calendar`: a trading day with its regular session in Eastern
    time (`open`/`close` as ``HH:MM``; later API versions add session_open/close too)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    date: date
    open: time
    close: time

    @field_validator("date", mode="before")
    @classmethod
    def _day(cls, value: object) -> date:
        if not isinstance(value, str):
            raise ValueError("date must be a YYYY-MM-DD string")
        return date.fromisoformat(value)

    @field_validator("open", "close", mode="before")
    @classmethod
    def _hh_mm(cls, value: object) -> time:
        if not isinstance(value, str) or len(value) != 5 or value[2] != ":":
            raise ValueError("expected HH:MM")
        hours, minutes = value[:2], value[3:]
        if not (hours.isascii() and hours.isdigit() and minutes.isascii() and minutes.isdigit()):
            raise ValueError("expected HH:MM")
        return time(int(hours), int(minutes))


def _parse_instant(value: object) -> datetime:
    """RFC 3339 with an offset (Alpaca sends e.g. ``2026-01-05T09:30:00-05:00`` and up to
    nine fractional digits); naive or non-string values are refused."""
    if not isinstance(value, str) or not value.isascii():
        raise ValueError("expected an RFC 3339 timestamp string")
    moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("timestamp has no UTC offset")
    return moment.astimezone(UTC)


def parse_clock(body: object) -> ClockReply:
    try:
        return ClockReply.model_validate(body)
    except (ValidationError, ValueError, OverflowError) as exc:
        raise MarketClockError(f"/v2/clock: unexpected reply ({_first_error(exc)})") from None


def parse_calendar(body: object) -> list[CalendarDay]:
    if not isinstance(body, list):
        raise MarketClockError("/v2/calendar: unexpected reply (not a list)")
    try:
        return [CalendarDay.model_validate(day) for day in body]
    except (ValidationError, ValueError, OverflowError) as exc:
        raise MarketClockError(f"/v2/calendar: unexpected reply ({_first_error(exc)})") from None


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        return f"{where}: {error['msg']}" if where else error["msg"]
    return type(exc).__name__


# --- the decision (no I/O) --------------------------------------------------------------


def market_zone() -> Any:
    """The exchange time zone, or None where the system has no time zone database."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(MARKET_TZ_NAME)
    except (ZoneInfoNotFoundError, ValueError):
        return None


@dataclass
class MarketHours:
    """What Alpaca said about market hours, and the answer for any instant it covers."""

    clock: ClockReply | None = None
    #: Regular sessions [open, close) in UTC, from the calendar.
    sessions: list[tuple[datetime, datetime]] = field(default_factory=list)
    #: Dates (exchange-local) the calendar reply covers; a date in it without a session
    #: is a holiday or weekend.
    calendar_span: tuple[date, date] | None = None
    zone: Any = None

    def update_clock(self, clock: ClockReply) -> None:
        self.clock = clock

    def update_calendar(self, days: Sequence[CalendarDay], start: date, end: date) -> bool:
        """Keep the calendar's sessions; False (calendar ignored) without a tz database."""
        zone = self.zone or market_zone()
        if zone is None:
            return False
        self.zone = zone
        self.sessions = sorted(
            (
                datetime.combine(day.date, day.open, tzinfo=zone).astimezone(UTC),
                datetime.combine(day.date, day.close, tzinfo=zone).astimezone(UTC),
            )
            for day in days
            if day.open < day.close
        )
        self.calendar_span = (start, end)
        return True

    def is_open(self, at: datetime) -> bool | None:
        """Open at `at` (aware)? None when neither the clock nor the calendar covers it."""
        clock = self.clock
        if clock is not None:
            first, second = sorted((clock.next_open, clock.next_close))
            if at < first:
                return clock.is_open
            if at < second:
                return not clock.is_open  # the one boundary the clock named has passed
        if self.calendar_span is not None and self.zone is not None:
            local_day = at.astimezone(self.zone).date()
            start, end = self.calendar_span
            if start <= local_day <= end:
                return any(opens <= at < closes for opens, closes in self.sessions)
        return None

    def next_change(self, at: datetime) -> datetime | None:
        """The next open/close boundary after `at` that the clock or calendar names."""
        candidates: list[datetime] = []
        if self.clock is not None:
            candidates += [self.clock.next_open, self.clock.next_close]
        for opens, closes in self.sessions:
            candidates += [opens, closes]
        later = [moment for moment in candidates if moment > at]
        return min(later) if later else None


# --- the fetcher (thin I/O) -------------------------------------------------------------


def trading_base_url(explicit: str | None, stream_url: str) -> str:
    """ALPACA_TRADING_URL, else: the simulator's own host when the stream URL is a loopback
    ws:// URL (the simulator serves `/v2/clock` and `/v2/calendar` on its port), else
    Alpaca's live trading API."""
    if explicit:
        return explicit.rstrip("/")
    parts = urlsplit(stream_url)
    if parts.scheme == "ws" and parts.hostname and _is_loopback(parts.hostname):
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"http://{host}:{parts.port or 80}"
    return LIVE_TRADING_URL


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class MarketReading:
    clock: ClockReply
    calendar: list[CalendarDay]
    start: date
    end: date


FetchHours = Callable[[date], Awaitable[MarketReading]]


def alpaca_fetcher(base_url: str, key: str, secret: str) -> FetchHours:
    """`fetch(today)`: GET /v2/clock and /v2/calendar?start=today&end=today+7 from Alpaca's
    trading API with the account's key pair in the APCA-API-* headers."""
    headers = {"APCA-API-KEY-ID": key, "APCA-API-SECRET-KEY": secret}

    async def fetch(today: date) -> MarketReading:
        import aiohttp

        end = today + timedelta(days=CALENDAR_DAYS_AHEAD)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
            clock = parse_clock(await _get_json(http, base_url, "/v2/clock", {}))
            params = {"start": today.isoformat(), "end": end.isoformat()}
            calendar = parse_calendar(await _get_json(http, base_url, "/v2/calendar", params))
        return MarketReading(clock, calendar, today, end)

    return fetch


async def _get_json(http: Any, base_url: str, path: str, params: Mapping[str, str]) -> object:
    import aiohttp

    try:
        async with http.get(base_url + path, params=params, allow_redirects=False) as response:
            if response.status != 200:
                raise MarketClockError(f"GET {path}: HTTP {response.status}")
            return await response.json(content_type=None)
    except MarketClockError:
        raise
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
        # Only the type: aiohttp's texts can carry the URL, and a URL can carry userinfo.
        raise MarketClockError(f"GET {path}: {type(exc).__name__}") from None


# --- keeping it fresh -------------------------------------------------------------------


ReportFn = Callable[[str, dict[str, object]], None]


class MarketClock:
    """The shard's view of market hours. `is_open()` is cheap (no I/O); `run()` refreshes.

    Sources: `alpaca` (the clock/calendar answered), `always_open` (a feed that streams
    around the clock, or no fetcher), `assumed_open` (Alpaca could not be asked and nothing
    it said earlier covers now: the documented fallback, announced once per episode with a
    `market_clock` status event; another one says when Alpaca answers again).
    """

    def __init__(
        self,
        fetch: FetchHours | None,
        report: ReportFn,
        *,
        refresh_s: float = 300.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._fetch = fetch
        self._report = report
        self._refresh_s = refresh_s
        self._now = now
        self.hours = MarketHours()
        self.source = "always_open" if fetch is None else "pending"
        self.last_error: str | None = None
        self.fetches = 0
        self.failures = 0
        self.refreshed = asyncio.Event()  # set after every refresh attempt (tests wait on it)

    def is_open(self) -> bool:
        """Open now? Unknown (not fetched yet, or Alpaca unreachable) counts as open."""
        if self._fetch is None:
            return True
        answer = self.hours.is_open(self._now())
        return True if answer is None else answer

    async def refresh(self) -> None:
        """One fetch of clock and calendar; never raises (failures become the fallback)."""
        if self._fetch is None:
            return
        now = self._now()
        self.fetches += 1
        try:
            reading = await self._fetch(now.date())
        except MarketClockError as exc:
            self._failed(str(exc), now)
        except Exception as exc:  # a bug or an unforeseen client error: same fallback
            log.warning("market clock fetch failed unexpectedly", exc_info=True)
            self._failed(f"{type(exc).__name__}", now)
        else:
            self.hours.update_clock(reading.clock)
            if not self.hours.update_calendar(reading.calendar, reading.start, reading.end):
                log.warning("no time zone database: using the market clock without calendar")
            self.last_error = None
            if self.source != "alpaca":
                if self.source == "assumed_open":
                    self._report("market_clock", self._describe("alpaca", now))
                self.source = "alpaca"
                log.info("market clock: %s", self._describe("alpaca", now))
        finally:
            self.refreshed.set()

    def _failed(self, reason: str, now: datetime) -> None:
        self.failures += 1
        self.last_error = reason
        if self.hours.is_open(now) is not None:
            log.warning("market clock refresh failed (%s); earlier answer still covers now", reason)
            return
        if self.source != "assumed_open":
            self.source = "assumed_open"
            info = self._describe("assumed_open", now)
            info["reason"] = reason
            log.warning("market clock unavailable, assuming the market is open: %s", reason)
            self._report("market_clock", info)

    def _describe(self, source: str, now: datetime) -> dict[str, object]:
        info: dict[str, object] = {"source": source, "is_open": self.is_open()}
        clock = self.hours.clock
        if source == "alpaca" and clock is not None:
            info["next_open"] = clock.next_open.isoformat()
            info["next_close"] = clock.next_close.isoformat()
        return info

    def next_refresh_in(self) -> float:
        """Seconds until the next fetch: the refresh interval, sooner at a named open/close
        boundary (plus a second, so the clock has flipped), or a minute after a failure."""
        if self.last_error is not None:
            return max(1.0, min(self._refresh_s, RETRY_AFTER_FAILURE_S))
        now = self._now()
        delay = self._refresh_s
        boundary = self.hours.next_change(now)
        if boundary is not None:
            delay = min(delay, (boundary - now).total_seconds() + 1.0)
        return max(1.0, delay)

    async def run(self) -> None:
        """Refresh at start and then on schedule, until cancelled."""
        if self._fetch is None:
            return
        while True:
            await self.refresh()
            await asyncio.sleep(self.next_refresh_in())

    def stats(self) -> dict[str, object]:
        return {
            "source": self.source,
            "open": self.is_open(),
            "fetches": self.fetches,
            "failures": self.failures,
        }
