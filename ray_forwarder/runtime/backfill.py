"""Backfill: fetch the minute bars a gap missed from Alpaca's REST API, beside the stream.

`Backfiller` takes closed gaps from the shard (`submit`), fetches their bars one gap at a
time on its own task (the live stream never waits for it), and hands each page's bars back
to the shard, which turns them into records through the same pipeline and outbox. A gap it
cannot fill (REST refused it, the request budget or the gap's deadline ran out, nothing is
known about where it started) is reported as unfilled, with the reason.

Opt-in trades and quotes (BACKFILL_CHANNELS) follow the bars of each gap: `TicksClient` is
the same client (budget, retries, paging) on another endpoint, and their items reach the
shard already in the stream's shape (`rest_ticks.stream_tick`), for the pipeline's dedup.

Rate limit, in two layers: `RequestBudget` spends at most BACKFILL_REQUESTS_PER_MINUTE
requests in any 60 s (429s included: Alpaca counts them too), and a `429` waits until
`X-RateLimit-Reset` (or a jittered exponential back-off without it) and asks again.
`RequestBudget` and `retry_delay` are pure (injected clock), so they are tested without I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ray_forwarder.alpaca.events import DataItem
from ray_forwarder.alpaca.rest_bars import (
    BARS_ENDPOINTS,
    BarsEndpoint,
    BarsPage,
    RestBar,
    RestBarsError,
    bars_endpoint,
    bars_params,
    minute_window,
    parse_bars_page,
    rest_url,
    rfc3339,
)
from ray_forwarder.alpaca.rest_ticks import (
    TicksEndpoint,
    parse_ticks_page,
    stream_tick,
    tick_window,
    ticks_endpoint,
    ticks_params,
)
from ray_forwarder.core.gaps import Gap

log = logging.getLogger(__name__)

#: Alpaca's market-data REST API.
LIVE_DATA_URL = "https://data.alpaca.markets"
REQUEST_TIMEOUT_S = 30.0
#: Back-off after a 429 without a usable reset header, or a 5xx / timeout.
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
#: A 5xx or transport failure is retried this often per request before the gap is given up.
MAX_TRANSIENT_FAILURES = 5
#: HTTP statuses that refuse the request for good (credentials, plan, bad request).
REFUSED = frozenset({400, 401, 403, 404, 422})


class BackfillFailed(RuntimeError):
    """A gap cannot be filled; `reason` is one of the `gap_unfilled` reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class RequestBudget:
    """At most `per_minute` requests in any 60 s window. Pure: `now` is passed in."""

    def __init__(self, per_minute: int) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self.per_minute = per_minute
        self._sent: deque[float] = deque()
        self.spent = 0

    def wait(self, now: float) -> float:
        """Seconds until one more request fits the budget (0: now)."""
        while self._sent and self._sent[0] <= now - 60.0:
            self._sent.popleft()
        if len(self._sent) < self.per_minute:
            return 0.0
        return self._sent[0] + 60.0 - now

    def spend(self, now: float) -> None:
        self._sent.append(now)
        self.spent += 1


def retry_delay(
    attempt: int, headers: Mapping[str, str], wall_now: float, rng: random.Random
) -> float:
    """How long to wait after the `attempt`-th (0-based) 429 in a row: until the window
    Alpaca names in `X-RateLimit-Reset` (Unix seconds) opens, and at least a jittered
    exponential back-off (so many shards do not retry in lockstep), at most RETRY_MAX_S."""
    ceiling = min(RETRY_MAX_S, RETRY_INITIAL_S * 2**attempt)
    delay = rng.uniform(ceiling / 2, ceiling)
    reset = headers.get("X-RateLimit-Reset")
    if reset is not None:
        with contextlib.suppress(ValueError):
            delay = max(delay, float(reset) - wall_now)
    return max(0.0, min(delay, RETRY_MAX_S))


@dataclass(frozen=True)
class BackfillConfig:
    base_url: str
    key: str
    secret: str = field(repr=False)
    feed: str = "sip"
    endpoint: BarsEndpoint = BARS_ENDPOINTS["stocks"]
    requests_per_minute: int = 150
    symbols_per_request: int = 200
    page_limit: int = 10_000
    max_seconds: float = 6 * 3600.0
    #: A gap not filled within this long is given up (`gap_unfilled`, reason `timeout`).
    timeout_seconds: float = 300.0
    #: Trades/quotes: at most this many per gap and channel (`gap_unfilled`, `item_cap`).
    ticks_max_items: int = 100_000
    #: The stream's wire format: REST ticks are given the stream's payload shape for it.
    wire_format: str = "msgpack"

    def __repr__(self) -> str:  # the secret must never reach a log line
        return f"BackfillConfig(base_url={self.base_url!r}, key=<masked>, feed={self.feed!r})"


#: (status, headers, body) of one GET; the transport is injectable for tests.
Response = tuple[int, Mapping[str, str], bytes]
Get = Callable[[str, Mapping[str, str]], Awaitable[Response]]


class BarsClient:
    """Pages of 1-minute bars over HTTP, within the budget, retrying 429s and 5xx."""

    def __init__(
        self,
        config: BackfillConfig,
        get: Get | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
        budget: RequestBudget | None = None,
    ) -> None:
        self.config = config
        #: one budget per shard: the bars and tick clients of a shard share it
        self.budget = budget or RequestBudget(config.requests_per_minute)
        #: what is asked and how a page is read (TicksClient asks another endpoint)
        self.path = config.endpoint.path
        self.parse: Callable[[bytes], Any] = parse_bars_page
        self.max_symbols = config.endpoint.max_symbols
        self._get = get
        self._session: Any = None
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.requests = 0
        self.rate_limited = 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def pages(
        self, symbols: Sequence[str], start: str, end: str, deadline: float
    ) -> Any:  # AsyncIterator[BarsPage]
        """Every page of bars for `symbols` from `start` to `end`, following
        `next_page_token`; raises BackfillFailed when the gap cannot be filled."""
        cfg = self.config
        per_request = cfg.symbols_per_request
        if self.max_symbols is not None:  # options: 100 contracts at most
            per_request = min(per_request, self.max_symbols)
        for offset in range(0, len(symbols), per_request):
            chunk = symbols[offset : offset + per_request]
            token: str | None = None
            while True:
                page = await self._page(self.params(chunk, start, end, token), deadline)
                yield page
                token = page.next_page_token
                if not token:
                    break

    def params(
        self, symbols: Sequence[str], start: str, end: str, token: str | None
    ) -> dict[str, str]:
        cfg = self.config
        return bars_params(
            cfg.endpoint, symbols, start, end,
            feed=cfg.feed, limit=cfg.page_limit, page_token=token,
        )  # fmt: skip

    async def _page(self, params: Mapping[str, str], deadline: float) -> BarsPage:
        limited = failures = 0
        while True:
            wait = self.budget.wait(self._clock())
            if self._clock() + wait > deadline:
                raise BackfillFailed("budget", "the request budget ran out before the deadline")
            if wait > 0:
                await self._sleep(wait)
            self.budget.spend(self._clock())
            self.requests += 1
            try:
                status, headers, body = await self._fetch(params)
            except (OSError, TimeoutError) as exc:
                status, headers, body = 0, {}, type(exc).__name__.encode()
            if status == 200:
                try:
                    return self.parse(body)
                except RestBarsError as exc:
                    raise BackfillFailed("bad_response", str(exc)) from None
            if status in REFUSED:
                raise BackfillFailed("refused", f"GET {self.path}: HTTP {status}")
            if status == 429:
                self.rate_limited += 1
                delay = retry_delay(limited, headers, time.time(), self._rng)
                limited += 1
            else:  # 5xx, other statuses, transport failures: transient, a few times
                failures += 1
                if failures > MAX_TRANSIENT_FAILURES:
                    what = f"HTTP {status}" if status else body.decode(errors="replace")
                    raise BackfillFailed("unavailable", f"GET {self.path}: {what}")
                delay = retry_delay(failures - 1, {}, time.time(), self._rng)
            if self._clock() + delay > deadline:
                raise BackfillFailed(
                    "budget" if status == 429 else "timeout",
                    "rate limited past the deadline" if status == 429 else "deadline passed",
                )
            await self._sleep(delay)

    async def _fetch(self, params: Mapping[str, str]) -> Response:
        url = self.config.base_url.rstrip("/") + self.path
        if self._get is not None:
            return await self._get(url, params)
        import aiohttp
        from yarl import URL  # aiohttp's URL type: `encoded=True` sends rest_url's query as is

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                headers={
                    "APCA-API-KEY-ID": self.config.key,
                    "APCA-API-SECRET-KEY": self.config.secret,
                },
            )
        request = URL(rest_url(self.config.base_url, self.path, params), encoded=True)
        try:
            async with self._session.get(request, allow_redirects=False) as response:
                return response.status, dict(response.headers), await response.read()
        except aiohttp.ClientError as exc:
            # Only the type: aiohttp's texts can carry the URL, and a URL can carry userinfo.
            raise OSError(type(exc).__name__) from None


class TicksClient(BarsClient):
    """Pages of one channel's trades or quotes: the bars client's budget, retries and
    paging, another endpoint and page reader."""

    def __init__(
        self, config: BackfillConfig, endpoint: TicksEndpoint, get: Get | None = None, **kw: Any
    ) -> None:
        super().__init__(config, get, **kw)
        self.endpoint = endpoint
        self.channel = endpoint.channel
        self.path = endpoint.path
        self.parse = partial(parse_ticks_page, endpoint.channel, endpoint=endpoint)
        self.max_symbols = endpoint.max_symbols

    def params(
        self, symbols: Sequence[str], start: str, end: str, token: str | None
    ) -> dict[str, str]:
        cfg = self.config
        feed = cfg.feed if self.endpoint.takes_feed else None
        return ticks_params(symbols, start, end, feed=feed, limit=cfg.page_limit, page_token=token)


@dataclass
class BackfillCounts:
    gaps_filled: int = 0
    gaps_unfilled: dict[str, int] = field(default_factory=dict)  # by reason
    bars: int = 0  # REST bars received
    requests: int = 0
    rate_limited: int = 0
    skipped: int = 0  # REST bars that failed validation
    ticks: dict[str, int] = field(default_factory=dict)  # REST trades/quotes by channel


class BackfillSink:
    """What the backfiller reports to its shard."""

    def on_backfill_bars(self, gap: Gap, bars: list[RestBar]) -> None: ...

    def on_gap_filled(self, gap: Gap, info: dict[str, Any]) -> None: ...

    def on_gap_unfilled(self, gap: Gap, reason: str, info: dict[str, Any]) -> None: ...

    def on_backfill_ticks(self, gap: Gap, channel: str, items: list[DataItem]) -> None: ...


class Backfiller:
    """One shard's backfill: gaps in, bars (and opt-in trades/quotes) out, one gap at a
    time, beside the stream."""

    def __init__(
        self,
        client: BarsClient,
        sink: BackfillSink,
        *,
        clock: Callable[[], float] = time.monotonic,
        ticks: Sequence[TicksClient] = (),
        bars: bool = True,
    ) -> None:
        self.client = client
        #: opt-in trades/quotes (BACKFILL_CHANNELS), filled after the bars, same budget
        self.ticks = tuple(ticks)
        self.fill_bars = bars
        self._sink = sink
        self._clock = clock
        self._queue: asyncio.Queue[Gap] = asyncio.Queue()
        self._busy = 0  # gaps submitted and not yet done
        self._idle = asyncio.Event()
        self._idle.set()
        self.counts = BackfillCounts()

    @property
    def busy(self) -> bool:
        return self._busy > 0

    def submit(self, gap: Gap) -> None:
        self._busy += 1
        self._idle.clear()
        self._queue.put_nowait(gap)

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        current: Gap | None = None
        try:
            while True:
                current = await self._queue.get()
                try:
                    await self._fill(current)
                except Exception as exc:  # a bug must cost a gap, never the shard
                    log.exception("backfill of gap %s failed", current.gap_id)
                    self._unfilled(current, "error", {"detail": type(exc).__name__})
                finally:
                    self._done()
                current = None
        except asyncio.CancelledError:  # the shard stops: say which gaps stay unfilled
            left = [current] if current is not None else []
            while not self._queue.empty():
                left.append(self._queue.get_nowait())
            for gap in left:
                self._unfilled(gap, "stopped", {"detail": "the shard stopped first"})
            raise
        finally:
            await self.client.close()
            for tick_client in self.ticks:
                await tick_client.close()

    def _done(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    async def _fill(self, gap: Gap) -> None:
        """Bars (unless only ticks are backfilled), then each tick channel; the first part
        that fails makes the gap `gap_unfilled`, a clipped window `too_old` at the end."""
        if gap.start is None:
            self._unfilled(gap, "no_start", {"detail": "nothing is known before the gap"})
            return
        info: dict[str, Any] = {}
        clipped_from: str | None = None
        if self.fill_bars:
            bars = await self._fill_bars(gap)
            if bars is None:
                return
            info, clipped_from = bars
        for client in self.ticks:
            ticks = await self._fill_ticks(gap, client)
            if ticks is None:
                return
            part, clipped = ticks
            info = {**part, **info, client.channel: part[client.channel],
                    "requests": info.get("requests", 0) + part["requests"]}  # fmt: skip
            clipped_from = clipped_from or clipped
        if clipped_from is not None:
            self._unfilled(gap, "too_old", {"detail": "older than BACKFILL_MAX_SECONDS",
                                            "filled_from": clipped_from})  # fmt: skip
            return
        self.counts.gaps_filled += 1
        self._sink.on_gap_filled(gap, info)

    async def _fill_bars(self, gap: Gap) -> tuple[dict[str, Any], str | None] | None:
        """The gap's minute bars; (info, where a clipped window starts) or None when the
        gap was reported unfilled."""
        cfg = self.client.config
        assert gap.start is not None
        window = minute_window(
            gap.start.event_ts, gap.end.event_ts, cfg.max_seconds, gap.start.bars_from
        )
        start, end = rfc3339(window.first), rfc3339(window.last)
        deadline = self._clock() + cfg.timeout_seconds
        before = (self.client.requests, self.client.rate_limited)
        bars = skipped = 0
        symbols = [s for s in gap.symbols if s != "*"]
        try:
            if not symbols:
                raise BackfillFailed("wildcard", "a `*` subscription names no symbols to ask for")
            async for page in self.client.pages(symbols, start, end, deadline):
                bars += len(page.bars)
                skipped += len(page.skipped)
                if page.bars:
                    self._sink.on_backfill_bars(gap, page.bars)
        except BackfillFailed as failed:
            self._account(before, bars, skipped)
            self._unfilled(gap, failed.reason, {"detail": failed.detail, "start": start,
                                               "end": end, "bars": bars})  # fmt: skip
            return None
        self._account(before, bars, skipped)
        info: dict[str, Any] = {"start": start, "end": end, "bars": bars,
                                "requests": self.client.requests - before[0]}  # fmt: skip
        return info, start if window.clipped else None

    async def _fill_ticks(
        self, gap: Gap, client: TicksClient
    ) -> tuple[dict[str, Any], str | None] | None:
        """One channel's trades or quotes from the last item before the gap to the first
        after it, at most BACKFILL_TICKS_MAX_ITEMS of them; (info, where a clipped window
        starts) or None when the gap was reported unfilled."""
        cfg = client.config
        assert gap.start is not None
        channel = client.channel
        window = tick_window(gap.start.event_ts, gap.end.event_ts, cfg.max_seconds)
        deadline = self._clock() + cfg.timeout_seconds
        requests, limited = client.requests, client.rate_limited
        count = skipped = 0
        symbols = [s for s in gap.symbols if s != "*"]
        try:
            if not symbols:
                raise BackfillFailed("wildcard", "a `*` subscription names no symbols to ask for")
            async for page in client.pages(symbols, window.start, window.end, deadline):
                count += len(page.ticks)
                skipped += len(page.skipped)
                if page.ticks:
                    items = [
                        DataItem(channel, tick.symbol, tick.t,
                                 stream_tick(channel, tick, cfg.wire_format))
                        for tick in page.ticks
                    ]  # fmt: skip
                    self._sink.on_backfill_ticks(gap, channel, items)
                if count >= cfg.ticks_max_items and page.next_page_token:
                    raise BackfillFailed(
                        "item_cap", f"{channel}: stopped at BACKFILL_TICKS_MAX_ITEMS ({count})"
                    )
        except BackfillFailed as failed:
            self._account_ticks(client, requests, limited, count, skipped)
            self._unfilled(gap, failed.reason, {"detail": failed.detail, "channel": channel,
                                               "start": window.start, "end": window.end,
                                               channel: count})  # fmt: skip
            return None
        self._account_ticks(client, requests, limited, count, skipped)
        info: dict[str, Any] = {"start": window.start, "end": window.end, channel: count,
                                "requests": client.requests - requests}  # fmt: skip
        return info, window.start if window.clipped else None

    def _account_ticks(
        self, client: TicksClient, requests: int, limited: int, count: int, skipped: int
    ) -> None:
        c = self.counts
        c.requests += client.requests - requests
        c.rate_limited += client.rate_limited - limited
        c.ticks[client.channel] = c.ticks.get(client.channel, 0) + count
        c.skipped += skipped

    def _account(self, before: tuple[int, int], bars: int, skipped: int) -> None:
        c = self.counts
        c.requests += self.client.requests - before[0]
        c.rate_limited += self.client.rate_limited - before[1]
        c.bars += bars
        c.skipped += skipped

    def _unfilled(self, gap: Gap, reason: str, info: dict[str, Any]) -> None:
        self.counts.gaps_unfilled[reason] = self.counts.gaps_unfilled.get(reason, 0) + 1
        self._sink.on_gap_unfilled(gap, reason, info)

    def stats(self) -> dict[str, Any]:
        c = self.counts
        return {
            "gaps_filled": c.gaps_filled,
            "gaps_unfilled": dict(c.gaps_unfilled),
            "bars": c.bars,
            "requests": c.requests,
            "rate_limited": c.rate_limited,
            "skipped": c.skipped,
            "ticks": dict(c.ticks),
            "busy": self.busy,
        }


def data_base_url(explicit: str | None, stream_url: str) -> str:
    """ALPACA_DATA_URL, else the simulator's port for a loopback ws:// stream URL (it
    serves the REST bars too), else Alpaca's market-data API."""
    from ray_forwarder.alpaca.market_clock import LIVE_TRADING_URL, trading_base_url

    if explicit:
        return explicit.rstrip("/")
    derived = trading_base_url(None, stream_url)
    return LIVE_DATA_URL if derived == LIVE_TRADING_URL else derived


def backfiller_for(settings: Any, spec: Any, sink: BackfillSink) -> Backfiller | None:
    """The shard's backfiller, or None when neither BACKFILL_CHANNELS' bars nor its trades
    or quotes are among the shard's channels with a REST endpoint. Stocks and crypto have
    bars endpoints; the options stream streams no bars (trades and quotes only), news and
    trade_updates none. Trades: stocks, crypto and options; quotes: stocks and crypto
    (Alpaca keeps no historical options quotes; `rest_ticks.TICKS_ENDPOINTS`).
    No market-hours rule: REST answers for whatever minutes had data, so a crypto gap is
    filled at any hour and a stock gap over a closed market simply finds none."""
    location = settings.alpaca_crypto_location
    endpoint = bars_endpoint(spec.stream, crypto_location=location)
    bars = "bars" in settings.backfill_channels and "bars" in spec.channels
    tick_endpoints = [
        tick_endpoint
        for channel in settings.backfill_channels
        if channel in spec.channels
        and (tick_endpoint := ticks_endpoint(spec.stream, channel, crypto_location=location))
    ]
    if endpoint is None or not (bars or tick_endpoints):
        return None
    config = BackfillConfig(
        base_url=data_base_url(settings.alpaca_data_url, spec.url),
        key=spec.key_id,
        secret=spec.secret,
        feed=settings.alpaca_feed,
        endpoint=endpoint,
        requests_per_minute=settings.backfill_requests_per_minute,
        symbols_per_request=settings.backfill_symbols_per_request,
        page_limit=settings.backfill_page_limit,
        max_seconds=settings.backfill_max_seconds,
        timeout_seconds=settings.backfill_timeout_seconds,
        ticks_max_items=settings.backfill_ticks_max_items,
        wire_format=settings.alpaca_wire_format,
    )
    client = BarsClient(config)
    ticks = [TicksClient(config, e, budget=client.budget) for e in tick_endpoints]
    return Backfiller(client, sink, ticks=ticks, bars=bars)
