"""The simulator's REST endpoints over real HTTP (bars for stocks, crypto at its location
and options; trades and quotes for stocks and crypto, trades for options): the same market
it streams, paged, rate-limited on request, refusable."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from ray_forwarder.alpaca.rest_bars import bars_endpoint, stream_bar
from ray_forwarder.alpaca.rest_ticks import stream_tick, ticks_endpoint
from ray_forwarder.runtime.backfill import BackfillConfig, BackfillFailed, BarsClient, TicksClient
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import SIM_KEY, SIM_SECRET

SYMBOLS = ["SPY", "QQQ", "AAPL"]
#: Each stream's symbols and the feed (crypto: the location) its simulator serves.
STREAMS = {
    "stocks": (SYMBOLS, "sip"),
    "crypto": (["BTC/USD", "ETH/USD", "SOL/USD"], "us-1"),
    "options": (["AAPL260116C00230000", "SPY260116P00590000", "QQQ260116C00520000"], "opra"),
}
EVERY_STREAM = pytest.mark.parametrize("stream", list(STREAMS))


def _sim(stream: str = "stocks", **overrides: object) -> SimulatorThread:
    symbols, feed = STREAMS[stream]
    values: dict[str, object] = dict(
        stream=stream, feed=feed, symbols=symbols, rate=2000, time_scale=6000,
        start_on_subscribe=False, keys={SIM_KEY: SIM_SECRET}, rest_reset_seconds=0.0,
        quote_ratio=0.0,  # every tick a trade: each symbol has a bar in every minute
    )  # fmt: skip
    values.update(overrides)
    return SimulatorThread(SimConfig(**values))  # type: ignore[arg-type]


def _client(
    sim: SimulatorThread, secret: str = SIM_SECRET, limit: int = 7, location: str | None = None
) -> BarsClient:
    """A REST client for the simulator's stream (crypto: at its location unless told)."""
    endpoint = bars_endpoint(sim.config.stream, crypto_location=location or sim.config.url_feed)
    assert endpoint is not None
    config = BackfillConfig(base_url=sim.data_url, key=SIM_KEY, secret=secret, page_limit=limit,
                            endpoint=endpoint)  # fmt: skip
    return BarsClient(config)


async def _fetch(
    sim: SimulatorThread, client: BarsClient, start: str, end: str
) -> list[dict[str, object]]:
    """Every bar of the simulator's symbols from `start` to `end`, in the stream's shape."""
    bars: list[dict[str, object]] = []
    try:
        async for page in client.pages(sim.config.symbols, start, end, time.monotonic() + 60):
            assert not page.skipped
            bars.extend(stream_bar(bar) for bar in page.bars)
    finally:
        await client.close()
    return bars


async def _until_minutes(sim: SimulatorThread, minutes: int) -> dict:
    deadline = time.monotonic() + 60
    while len(bars := sim.minute_bars()) < minutes * len(sim.config.symbols):
        assert time.monotonic() < deadline, "the market did not trade long enough"
        await asyncio.sleep(0.05)
    return bars


@EVERY_STREAM
async def test_rest_serves_the_streamed_markets_bars_paged(stream: str) -> None:
    with _sim(stream) as sim:
        await _until_minutes(sim, 12)
        sim.call(lambda: sim.simulator.market)  # (the market keeps trading meanwhile)
        client = _client(sim, limit=7)
        bars = await _fetch(sim, client, "2026-01-05T14:33:00Z", "2026-01-05T14:40:00Z")
        truth = sim.minute_bars()
        stats = sim.stats()
    window = {k: v for k, v in truth.items() if "14:33:00" <= k[1][11:19] <= "14:40:00"}
    assert len(bars) == len(window) == 8 * len(STREAMS[stream][0])
    assert client.requests == stats["rest_requests"] >= 4  # paged: 24 bars, 7 a page
    for bar in bars:
        sim_bar = window[(bar["S"], bar["t"])]
        assert {k: v for k, v in bar.items() if k != "T"} == {
            k: v for k, v in sim_bar.items() if k != "T"
        }
    # sorted like Alpaca's: by symbol, then time
    assert [(b["S"], b["t"]) for b in bars] == sorted((b["S"], b["t"]) for b in bars)


@EVERY_STREAM
async def test_rest_answers_429_on_every_second_request_and_refuses_on_demand(
    stream: str,
) -> None:
    with _sim(stream, rest_429_every=2) as sim:
        await _until_minutes(sim, 4)
        client = _client(sim, limit=3)
        bars = await _fetch(sim, client, "2026-01-05T14:30:00Z", "2026-01-05T14:33:00Z")
        truth = [k for k in sim.minute_bars() if k[1][11:19] <= "14:33:00"]
        assert len(bars) == len(truth) >= 3 * len(STREAMS[stream][0])
        statuses = [status for _t, status in sim.rest_log()]
        assert statuses[1::2] == [429] * len(statuses[1::2]) and 200 in statuses
        assert client.rate_limited == sim.stats()["rest_rate_limited"] >= 2
        sim.refuse_rest(403)
        with pytest.raises(BackfillFailed) as refused:
            await _fetch(sim, _client(sim), "2026-01-05T14:30:00Z", "2026-01-05T14:33:00Z")
        assert refused.value.reason == "refused" and "403" in refused.value.detail
        sim.refuse_rest(None)
        with pytest.raises(BackfillFailed) as unauthorised:
            await _fetch(
                sim, _client(sim, secret="wrong"), "2026-01-05T14:30:00Z", "2026-01-05T14:31:00Z"
            )
        assert "401" in unauthorised.value.detail and "wrong" not in unauthorised.value.detail


async def test_crypto_rest_lives_at_the_streams_location_and_needs_no_key() -> None:
    """Crypto's bars are at `/v1beta3/crypto/{loc}/bars` for the simulator's own location
    (another location is a 404: backfill says `refused`), answer without credentials like
    Alpaca's crypto data API, and still refuse a wrong key pair."""
    with _sim("crypto") as sim:
        await _until_minutes(sim, 3)
        with pytest.raises(BackfillFailed) as elsewhere:
            await _fetch(sim, _client(sim, location="eu-1"), "2026-01-05T14:30:00Z",
                         "2026-01-05T14:31:00Z")  # fmt: skip
        assert elsewhere.value.reason == "refused" and "404" in elsewhere.value.detail
        url = f"{sim.data_url}/v1beta3/crypto/us-1/bars"
        query = {"symbols": "BTC/USD,ETH/USD", "timeframe": "1Min",
                 "start": "2026-01-05T14:30:00Z", "end": "2026-01-05T14:31:00Z"}  # fmt: skip
        async with aiohttp.ClientSession() as http:
            async with http.get(url, params=query) as anonymous:
                body = await anonymous.json()
            async with http.get(url, params=query, headers={
                "APCA-API-KEY-ID": SIM_KEY, "APCA-API-SECRET-KEY": "wrong",
            }) as wrong:  # fmt: skip
                assert wrong.status == 401
        assert anonymous.status == 200
        assert set(body["bars"]) == {"BTC/USD", "ETH/USD"}
        truth = sim.minute_bars()
        for symbol, bars in body["bars"].items():
            for bar in bars:
                assert truth[(symbol, bar["t"][:19] + ".000000000Z")]["c"] == bar["c"]


def _ticks_client(sim: SimulatorThread, channel: str, limit: int = 50) -> TicksClient:
    """A trades or quotes client for the simulator's stream (crypto: at its location)."""
    config = BackfillConfig(base_url=sim.data_url, key=SIM_KEY, secret=SIM_SECRET,
                            page_limit=limit)  # fmt: skip
    endpoint = ticks_endpoint(sim.config.stream, channel, crypto_location=sim.config.url_feed)
    assert endpoint is not None
    return TicksClient(config, endpoint)


async def _fetch_ticks(
    sim: SimulatorThread, client: TicksClient, start: str, end: str
) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    try:
        async for page in client.pages(sim.config.symbols, start, end, time.monotonic() + 60):
            assert not page.skipped
            out.extend(stream_tick(client.channel, tick, "json") for tick in page.ticks)
    finally:
        await client.close()
    return out


@pytest.mark.parametrize(
    ("stream", "channel", "kind"),
    [
        ("stocks", "trades", "t"),
        ("stocks", "quotes", "q"),
        ("crypto", "trades", "t"),
        ("crypto", "quotes", "q"),
        ("options", "trades", "t"),
    ],
)
async def test_rest_serves_the_streamed_markets_trades_and_quotes_paged(
    stream: str, channel: str, kind: str
) -> None:
    """Every trade (quote) the market handed out inside the window, as the stream has it
    (crypto, options: their own items; a crypto quote the stream sent as an order book is
    no quote), sorted by symbol then time, over several pages; 429s and refusals as for
    the bars. Crypto at the simulator's location; options trades only."""
    with _sim(stream, rest_429_every=3, quote_ratio=0.55) as sim:  # trades and quotes both
        await _until_minutes(sim, 6)
        start, end = "2026-01-05T14:30:20.5Z", "2026-01-05T14:34:40Z"
        client = _ticks_client(sim, channel, limit=4)
        got = await _fetch_ticks(sim, client, start, end)
        truth = [
            item for item in sim.ticks(kind)
            if "2026-01-05T14:30:20.500000000Z" <= item["t"] <= "2026-01-05T14:34:40.000000000Z"
        ]  # fmt: skip
        stats = sim.stats()
        sim.refuse_rest(403)
        with pytest.raises(BackfillFailed) as refused:
            await _fetch_ticks(sim, _ticks_client(sim, channel), start, end)
    assert len(truth) >= 20 and client.requests > len(truth) // 4
    assert all(item["T"] == kind for item in truth)
    assert sorted(got, key=lambda i: (i["S"], i["t"])) == got
    assert sorted(got, key=lambda i: (i["S"], i["t"])) == sorted(
        truth, key=lambda i: (i["S"], i["t"])
    )
    assert client.rate_limited == stats["rest_rate_limited"] >= 1
    assert refused.value.reason == "refused" and "403" in refused.value.detail


async def test_the_options_simulator_serves_no_historical_quotes() -> None:
    """Like Alpaca: `/v1beta1/options/quotes` does not exist (404)."""
    with _sim("options") as sim:
        url = f"{sim.data_url}/v1beta1/options/quotes"
        query = {"symbols": STREAMS["options"][0][0], "start": "2026-01-05T14:30:00Z",
                 "end": "2026-01-05T14:31:00Z"}  # fmt: skip
        headers = {"APCA-API-KEY-ID": SIM_KEY, "APCA-API-SECRET-KEY": SIM_SECRET}
        async with (
            aiohttp.ClientSession() as http,
            http.get(url, params=query, headers=headers) as response,
        ):
            assert response.status == 404
