"""REST bars: request shapes, response parsing (hypothesis), windows, the request budget,
429 back-off and paging, all without I/O (an injected transport and clock)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_forwarder.alpaca.rest_bars import (
    BARS_ENDPOINTS,
    RestBarsError,
    bars_endpoint,
    bars_params,
    minute_window,
    parse_bars_page,
    rest_url,
    stream_bar,
)
from ray_forwarder.alpaca.streams import STREAMS
from ray_forwarder.runtime.backfill import (
    RETRY_MAX_S,
    BackfillConfig,
    BackfillFailed,
    BarsClient,
    RequestBudget,
    retry_delay,
)

BAR = {"t": "2026-01-05T14:31:00Z", "o": 1.0, "h": 2.0, "l": 0.5, "c": 1.5, "v": 100, "n": 3,
       "vw": 1.25}  # fmt: skip


def test_stock_bars_params() -> None:
    params = bars_params(
        BARS_ENDPOINTS["stocks"], ["SPY", "QQQ"], "2026-01-05T14:30:00Z", "2026-01-05T14:40:00Z",
        feed="iex", limit=50_000, page_token="abc",
    )  # fmt: skip
    assert params == {
        "symbols": "SPY,QQQ", "timeframe": "1Min", "start": "2026-01-05T14:30:00Z",
        "end": "2026-01-05T14:40:00Z", "limit": "10000", "sort": "asc", "feed": "iex",
        "adjustment": "raw", "page_token": "abc",
    }  # fmt: skip
    crypto = bars_params(BARS_ENDPOINTS["crypto"], ["BTC/USD"], "a", "b", feed="iex")
    assert "feed" not in crypto and "page_token" not in crypto


def test_a_page_becomes_stream_shaped_bars() -> None:
    body = orjson.dumps({"bars": {"SPY": [BAR]}, "next_page_token": "next"})
    page = parse_bars_page(body)
    assert page.next_page_token == "next" and not page.skipped
    [bar] = page.bars
    assert stream_bar(bar) == {**BAR, "T": "b", "S": "SPY", "t": "2026-01-05T14:31:00.000000000Z"}
    assert parse_bars_page(b'{"bars": null, "next_page_token": null}').bars == []


@pytest.mark.parametrize(
    ("bar", "reason"),
    [
        ({**BAR, "t": "2026-02-30T00:00:00Z"}, "bad_timestamp"),
        ({**BAR, "o": True}, "bad_field_type"),
        ({**BAR, "c": "1.5"}, "bad_field_type"),
        ({**BAR, "n": 1.5}, "bad_field_type"),
        ({k: v for k, v in BAR.items() if k != "v"}, "missing_field"),
        ([1, 2], "not_an_object"),
    ],
)
def test_bad_bars_are_skipped_with_a_reason(bar: object, reason: str) -> None:
    page = parse_bars_page(orjson.dumps({"bars": {"SPY": [bar, BAR]}}))
    assert page.skipped == [reason] and len(page.bars) == 1


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"bars": []}', b'{"bars": {}, "next_page_token": 5}']
)
def test_unusable_pages_raise(body: bytes) -> None:
    with pytest.raises(RestBarsError):
        parse_bars_page(body)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_bar_like = st.fixed_dictionaries(
    {},
    optional={k: _json | st.floats(allow_nan=True) for k in ("t", "o", "h", "l", "c", "v", "n",
                                                             "vw", "x")},
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["bars", "next_page_token", "other"]),
        st.dictionaries(st.text(max_size=40), st.lists(_bar_like | _json, max_size=4)) | _json,
    )
)
def test_any_response_parses_or_raises_the_one_error(doc: dict[str, object]) -> None:
    """Whatever the network sends: a page (each bar kept or skipped) or RestBarsError."""
    try:
        body = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return
    try:
        page = parse_bars_page(body)
    except RestBarsError:
        return
    for bar in page.bars:
        shaped = stream_bar(bar)
        orjson.dumps(shaped)  # embeddable in an envelope
        assert shaped["t"].endswith("Z") and len(shaped["t"]) == 30


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_the_one_error(body: bytes) -> None:
    with contextlib.suppress(RestBarsError):
        parse_bars_page(body)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_the_minute_window_of_a_gap() -> None:
    window = minute_window("2026-01-05T14:31:20.5Z", "2026-01-05T14:35:02.000000001Z", 3600)
    assert window.first == _utc("2026-01-05T14:30:00") and window.last == _utc("2026-01-05T14:35")
    assert window.minutes == 6 and not window.clipped
    handed_over = minute_window("2026-01-05T14:31:20Z", "2026-01-05T14:35:00Z", 3600,
                                "2026-01-05T14:31:00.000000000Z")  # fmt: skip
    assert handed_over.first == _utc("2026-01-05T14:31:00")  # not the minute before
    clipped = minute_window("2026-01-05T10:00:00Z", "2026-01-05T14:35:00Z", 600)
    assert clipped.clipped and clipped.first == _utc("2026-01-05T14:25:00")


def test_the_budget_allows_so_many_requests_in_any_minute() -> None:
    budget = RequestBudget(3)
    for now in (0.0, 1.0, 2.0):
        assert budget.wait(now) == 0.0
        budget.spend(now)
    assert budget.wait(30.0) == pytest.approx(30.0)  # the first ages out at 60
    assert budget.wait(60.0) == 0.0
    budget.spend(60.0)
    assert budget.wait(60.5) == pytest.approx(0.5)


def test_retry_delay_waits_for_the_reset_and_jitters() -> None:
    rng = random.Random(1)
    assert retry_delay(0, {"X-RateLimit-Reset": "1005"}, 1000.0, rng) == pytest.approx(5.0)
    first = retry_delay(0, {}, 1000.0, rng)
    assert 0.25 <= first <= 0.5
    assert retry_delay(20, {}, 0.0, rng) <= RETRY_MAX_S
    assert retry_delay(0, {"X-RateLimit-Reset": "junk"}, 0.0, rng) <= 0.5


class FakeClock:
    """Time that passes only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def _pages_server(pages: int, every_429: int | None = None, status: int = 200):
    """A transport answering `pages` pages of one bar each; every `every_429`-th request 429."""
    calls: list[Mapping[str, str]] = []

    async def get(url: str, params: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        calls.append(dict(params))
        if every_429 and len(calls) % every_429 == 0:
            return 429, {"X-RateLimit-Reset": "0"}, b"{}"
        if status != 200:
            return status, {}, b"{}"
        n = int(params.get("page_token", "0"))
        bar = {**BAR, "t": f"2026-01-05T14:{30 + n:02d}:00Z"}
        token = str(n + 1) if n + 1 < pages else None
        return 200, {}, orjson.dumps({"bars": {"SPY": [bar]}, "next_page_token": token})

    return get, calls


def _client(get, clock: FakeClock, per_minute: int = 100) -> BarsClient:
    config = BackfillConfig(base_url="http://sim", key="k", secret="s",
                            requests_per_minute=per_minute)  # fmt: skip
    return BarsClient(config, get, clock=clock, sleep=clock.sleep, rng=random.Random(0))


async def _collect(client: BarsClient, deadline: float = 600.0) -> list[str]:
    out = []
    async for page in client.pages(["SPY"], "a", "b", deadline):
        out.extend(bar.t for bar in page.bars)
    return out


async def test_paging_follows_next_page_token() -> None:
    clock = FakeClock()
    get, calls = _pages_server(4)
    bars = await _collect(_client(get, clock))
    assert [t[14:16] for t in bars] == ["30", "31", "32", "33"]
    assert [c.get("page_token") for c in calls] == [None, "1", "2", "3"]


async def test_429_on_every_second_request_completes_within_the_budget() -> None:
    clock = FakeClock()
    serve, calls = _pages_server(6, every_429=2)
    times: list[float] = []

    async def get(url: str, params: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        times.append(clock.now)
        return await serve(url, params)

    client = _client(get, clock, per_minute=4)
    bars = await _collect(client)
    assert len(bars) == 6 and client.rate_limited == 5 and len(calls) == 11
    for t in times:  # no 60 s window holds more than the budget (429s count too)
        assert sum(1 for u in times if t <= u < t + 60.0) <= 4
    assert clock.now >= 120.0  # 11 requests at 4 a minute had to wait


async def test_many_symbols_are_asked_in_chunks() -> None:
    clock = FakeClock()
    get, calls = _pages_server(1)
    config = BackfillConfig(base_url="http://sim", key="k", secret="s", symbols_per_request=2)
    client = BarsClient(config, get, clock=clock, sleep=clock.sleep)
    async for _ in client.pages(["A", "B", "C", "D", "E"], "a", "b", 100.0):
        pass
    assert [c["symbols"] for c in calls] == ["A,B", "C,D", "E"]


@pytest.mark.parametrize(
    ("status", "reason", "per_minute", "deadline"),
    [(403, "refused", 100, 600.0), (401, "refused", 100, 600.0),
     (503, "unavailable", 100, 600.0), (200, "budget", 1, 30.0)],
)  # fmt: skip
async def test_gaps_that_cannot_be_filled_say_why(
    status: int, reason: str, per_minute: int, deadline: float
) -> None:
    clock = FakeClock()
    get, _ = _pages_server(5, status=status)
    with pytest.raises(BackfillFailed) as failed:
        await _collect(_client(get, clock, per_minute), deadline)
    assert failed.value.reason == reason


async def test_a_secret_never_shows_in_the_config_repr() -> None:
    config = BackfillConfig(base_url="http://sim", key="k", secret="hunter2")
    assert "hunter2" not in repr(config)
    await asyncio.sleep(0)


def test_backfill_settings_are_checked_at_start() -> None:
    from ray_forwarder.config import ConfigError, load_settings
    from ray_forwarder.runtime.backfill import LIVE_DATA_URL, data_base_url

    assert load_settings().backfill_channels == ["bars"]
    assert load_settings(backfill_channels="").backfill_channels == []
    assert load_settings(backfill_channels="bars,trades,quotes").backfill_channels == [
        "bars", "trades", "quotes"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="BACKFILL_CHANNELS: cannot backfill updatedBars"):
        load_settings(backfill_channels="bars,updatedBars")
    with pytest.raises(ConfigError, match="ALPACA_DATA_URL"):
        load_settings(alpaca_data_url="http://data.example.com")  # the secret in clear
    with pytest.raises(ConfigError, match="BACKFILL_REQUESTS_PER_MINUTE"):
        load_settings(backfill_requests_per_minute=0)
    assert data_base_url(None, "wss://stream.data.alpaca.markets/v2/sip") == LIVE_DATA_URL
    assert data_base_url(None, "ws://127.0.0.1:8765/v2/sip") == "http://127.0.0.1:8765"
    assert data_base_url("https://data.sandbox.alpaca.markets/", "ws://x") == (
        "https://data.sandbox.alpaca.markets"
    )


# --- per stream: endpoint, parameters, URL encoding ----------------------------------------


def test_each_stream_asks_its_own_endpoint_with_its_own_parameters() -> None:
    assert bars_endpoint("stocks") == BARS_ENDPOINTS["stocks"]
    for loc in ("us", "us-1", "eu-1"):
        assert bars_endpoint("crypto", crypto_location=loc).path == f"/v1beta3/crypto/{loc}/bars"
    options = bars_endpoint("options")
    assert options is not None and options.path == "/v1beta1/options/bars"
    assert options.max_symbols == 100
    assert bars_endpoint("news") is None and bars_endpoint("trade_updates") is None
    for stream in ("crypto", "options"):
        endpoint = bars_endpoint(stream)
        assert endpoint is not None
        params = bars_params(endpoint, ["X"], "a", "b", feed="opra")
        assert "feed" not in params and "adjustment" not in params  # stocks only
        assert params["timeframe"] == "1Min" and params["sort"] == "asc"


def _symbols_of(stream: str) -> st.SearchStrategy[list[str]]:
    """Lists of symbols the stream's table accepts (a comma, which the stock pattern lets
    through, would split one symbol in two in `symbols=`: no real ticker has one)."""
    pattern = STREAMS[stream].symbol_pattern
    symbol = st.from_regex(pattern, fullmatch=True).filter(lambda s: "," not in s)
    return st.lists(symbol, min_size=1, max_size=6, unique=True)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["stocks", "crypto", "options"]), st.data())
def test_the_request_url_reads_back_as_the_same_symbols_and_parameters(
    stream: str, data: st.DataObject
) -> None:
    """What a server parses from the URL (Python's parse_qs; Go's url.ParseQuery reads it
    the same way) is exactly what was asked for: `BTC/USD`, and a `+`, `&`, `=`, `%` or `#`
    in a stock symbol, survive the trip."""
    symbols = data.draw(_symbols_of(stream))
    token = data.draw(st.none() | st.text(min_size=1, max_size=40))
    endpoint = bars_endpoint(stream, crypto_location="eu-1")
    assert endpoint is not None
    params = bars_params(endpoint, symbols, "2026-01-05T14:30:00Z", "2026-01-05T14:40:00Z",
                         feed="sip", page_token=token)  # fmt: skip
    url = rest_url("https://data.alpaca.markets/", endpoint.path, params)
    parts = urlsplit(url)
    assert parts.path == endpoint.path and not parts.fragment
    parsed = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
    assert {k: v for k, [v] in parsed.items()} == params
    assert parsed["symbols"][0].split(",") == symbols
    if stream == "crypto":
        assert "/" not in parts.query  # escaped like the Go SDK does it: BTC%2FUSD


async def test_options_ask_at_most_100_contracts_per_request() -> None:
    clock = FakeClock()
    get, calls = _pages_server(1)
    options = bars_endpoint("options")
    assert options is not None
    config = BackfillConfig(base_url="http://sim", key="k", secret="s", endpoint=options,
                            symbols_per_request=200)  # fmt: skip
    client = BarsClient(config, get, clock=clock, sleep=clock.sleep)
    contracts = [f"SPY260116C{strike:08d}" for strike in range(250)]
    async for _ in client.pages(contracts, "a", "b", 100.0):
        pass
    assert [len(c["symbols"].split(",")) for c in calls] == [100, 100, 50]


def _backfill_settings(**overrides: object) -> Any:
    from ray_forwarder.config import load_settings

    values: dict[str, object] = dict(
        alpaca_api_key_id="k", alpaca_secret_key="s", kafka_bootstrap_servers="127.0.0.1:9",
        alpaca_streams="stocks,crypto,options",
        alpaca_crypto_symbols="BTC/USD,ETH/USD", alpaca_crypto_channels="trades,bars",
        alpaca_options_symbols="SPY260116C00590000", alpaca_options_channels="trades,quotes",
    )  # fmt: skip
    values.update(overrides)
    return load_settings(**values)


def test_backfiller_for_builds_each_streams_endpoint() -> None:
    """Stocks ask /v2/stocks/bars with the stream's feed, crypto its location's endpoint
    (no feed); the options stream streams no bars, so it has nothing to backfill."""
    from ray_forwarder.ray.driver import plan_shards
    from ray_forwarder.runtime.backfill import LIVE_DATA_URL, BackfillSink, backfiller_for

    settings = _backfill_settings(alpaca_feed="iex", alpaca_crypto_location="us-1")
    specs = {spec.stream: spec for spec in plan_shards(settings)}
    stocks = backfiller_for(settings, specs["stocks"], BackfillSink())
    crypto = backfiller_for(settings, specs["crypto"], BackfillSink())
    assert stocks is not None and crypto is not None
    assert backfiller_for(settings, specs["options"], BackfillSink()) is None
    assert stocks.client.config.endpoint.path == "/v2/stocks/bars"
    assert stocks.client.config.feed == "iex"
    assert crypto.client.config.endpoint.path == "/v1beta3/crypto/us-1/bars"
    assert crypto.client.config.base_url == LIVE_DATA_URL
    assert crypto.client.config.key == "k"  # crypto needs none; the pair does no harm
    overridden = _backfill_settings(alpaca_data_url="https://data.sandbox.alpaca.markets")
    [spec] = [s for s in plan_shards(overridden) if s.stream == "crypto"]
    again = backfiller_for(overridden, spec, BackfillSink())
    assert again is not None
    assert again.client.config.base_url == "https://data.sandbox.alpaca.markets"
    assert again.client.config.endpoint.path == "/v1beta3/crypto/us/bars"
    no_bars = _backfill_settings(alpaca_crypto_channels="trades,quotes")
    [spec] = [s for s in plan_shards(no_bars) if s.stream == "crypto"]
    assert backfiller_for(no_bars, spec, BackfillSink()) is None


async def test_a_crypto_gap_on_a_weekend_night_is_backfilled() -> None:
    """Crypto trades around the clock: a gap at 03:00 UTC on a Sunday is asked for like any
    other (no market-hours rule keeps it from REST)."""
    from ray_forwarder.core.gaps import Gap, Mark
    from ray_forwarder.runtime.backfill import Backfiller, BackfillSink

    clock = FakeClock()
    asked: list[tuple[str, dict[str, str]]] = []

    async def get(url: str, params: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        asked.append((url, dict(params)))
        bar = {**BAR, "t": "2026-01-04T03:02:00Z"}
        return 200, {}, orjson.dumps({"bars": {"BTC/USD": [bar]}, "next_page_token": None})

    filled: list[dict[str, Any]] = []

    class Sink(BackfillSink):
        def on_gap_filled(self, gap: Gap, info: dict[str, Any]) -> None:
            filled.append(info)

    endpoint = bars_endpoint("crypto", crypto_location="eu-1")
    assert endpoint is not None
    config = BackfillConfig(base_url="http://sim", key="k", secret="s", endpoint=endpoint)
    backfiller = Backfiller(BarsClient(config, get, clock=clock, sleep=clock.sleep), Sink(),
                            clock=clock)  # fmt: skip
    runner = asyncio.create_task(backfiller.run())
    backfiller.submit(Gap(
        "crypto-0:0:1", "crypto", "crypto-0", ("trades", "bars"), ("BTC/USD",), "disconnect",
        Mark("2026-01-04T03:01:10Z", "2026-01-04T03:01:10Z"),
        Mark("2026-01-04T03:04:20Z", "2026-01-04T03:04:20Z"),
    ))  # fmt: skip
    assert await backfiller.wait_idle(10)
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    [(url, params)] = asked
    assert url == "http://sim/v1beta3/crypto/eu-1/bars" and params["symbols"] == "BTC/USD"
    assert (params["start"], params["end"]) == ("2026-01-04T03:00:00Z", "2026-01-04T03:04:00Z")
    assert filled and filled[0]["bars"] == 1
