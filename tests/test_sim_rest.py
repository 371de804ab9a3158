"""The simulator's REST bars, trades and quotes endpoints over real HTTP: the same market
it streams, paged, rate-limited on request, refusable."""

from __future__ import annotations

import asyncio
import time

import pytest

from ray_forwarder.alpaca.rest_bars import stream_bar
from ray_forwarder.alpaca.rest_ticks import TICKS_ENDPOINTS, stream_tick
from ray_forwarder.runtime.backfill import BackfillConfig, BackfillFailed, BarsClient, TicksClient
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import SIM_KEY, SIM_SECRET

SYMBOLS = ["SPY", "QQQ", "AAPL"]


def _sim(**overrides: object) -> SimulatorThread:
    values: dict[str, object] = dict(
        symbols=SYMBOLS, rate=2000, time_scale=6000, start_on_subscribe=False,
        keys={SIM_KEY: SIM_SECRET}, rest_reset_seconds=0.0,
    )  # fmt: skip
    values.update(overrides)
    return SimulatorThread(SimConfig(**values))  # type: ignore[arg-type]


def _client(sim: SimulatorThread, secret: str = SIM_SECRET, limit: int = 7) -> BarsClient:
    config = BackfillConfig(base_url=sim.data_url, key=SIM_KEY, secret=secret, page_limit=limit)
    return BarsClient(config)


async def _fetch(client: BarsClient, start: str, end: str) -> list[dict[str, object]]:
    bars: list[dict[str, object]] = []
    try:
        async for page in client.pages(SYMBOLS, start, end, time.monotonic() + 60):
            assert not page.skipped
            bars.extend(stream_bar(bar) for bar in page.bars)
    finally:
        await client.close()
    return bars


async def _until_minutes(sim: SimulatorThread, minutes: int) -> dict:
    deadline = time.monotonic() + 60
    while len(bars := sim.minute_bars()) < minutes * len(SYMBOLS):
        assert time.monotonic() < deadline, "the market did not trade long enough"
        await asyncio.sleep(0.05)
    return bars


async def test_rest_serves_the_streamed_markets_bars_paged() -> None:
    with _sim() as sim:
        await _until_minutes(sim, 12)
        sim.call(lambda: sim.simulator.market)  # (the market keeps trading meanwhile)
        client = _client(sim, limit=7)
        bars = await _fetch(client, "2026-01-05T14:33:00Z", "2026-01-05T14:40:00Z")
        truth = sim.minute_bars()
        stats = sim.stats()
    window = {k: v for k, v in truth.items() if "14:33:00" <= k[1][11:19] <= "14:40:00"}
    assert len(bars) == len(window) == 8 * len(SYMBOLS)
    assert client.requests == stats["rest_requests"] >= 4  # paged: 24 bars, 7 a page
    for bar in bars:
        sim_bar = window[(bar["S"], bar["t"])]
        assert {k: v for k, v in bar.items() if k != "T"} == {
            k: v for k, v in sim_bar.items() if k != "T"
        }
    # sorted like Alpaca's: by symbol, then time
    assert [(b["S"], b["t"]) for b in bars] == sorted((b["S"], b["t"]) for b in bars)


async def test_rest_answers_429_on_every_second_request_and_refuses_on_demand() -> None:
    with _sim(rest_429_every=2) as sim:
        await _until_minutes(sim, 4)
        client = _client(sim, limit=3)
        bars = await _fetch(client, "2026-01-05T14:30:00Z", "2026-01-05T14:33:00Z")
        truth = [k for k in sim.minute_bars() if k[1][11:19] <= "14:33:00"]
        assert len(bars) == len(truth) >= 3 * len(SYMBOLS)
        statuses = [status for _t, status in sim.rest_log()]
        assert statuses[1::2] == [429] * len(statuses[1::2]) and 200 in statuses
        assert client.rate_limited == sim.stats()["rest_rate_limited"] >= 2
        sim.refuse_rest(403)
        with pytest.raises(BackfillFailed) as refused:
            await _fetch(_client(sim), "2026-01-05T14:30:00Z", "2026-01-05T14:33:00Z")
        assert refused.value.reason == "refused" and "403" in refused.value.detail
        sim.refuse_rest(None)
        with pytest.raises(BackfillFailed) as unauthorised:
            await _fetch(
                _client(sim, secret="wrong"), "2026-01-05T14:30:00Z", "2026-01-05T14:31:00Z"
            )
        assert "401" in unauthorised.value.detail and "wrong" not in unauthorised.value.detail


def _ticks_client(sim: SimulatorThread, channel: str, limit: int = 50) -> TicksClient:
    config = BackfillConfig(base_url=sim.data_url, key=SIM_KEY, secret=SIM_SECRET,
                            page_limit=limit)  # fmt: skip
    return TicksClient(config, TICKS_ENDPOINTS[("stocks", channel)])


async def _fetch_ticks(client: TicksClient, start: str, end: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    try:
        async for page in client.pages(SYMBOLS, start, end, time.monotonic() + 60):
            assert not page.skipped
            out.extend(stream_tick(client.channel, tick, "json") for tick in page.ticks)
    finally:
        await client.close()
    return out


@pytest.mark.parametrize(("channel", "kind"), [("trades", "t"), ("quotes", "q")])
async def test_rest_serves_the_streamed_markets_trades_and_quotes_paged(
    channel: str, kind: str
) -> None:
    """Every trade (quote) the market handed out inside the window, as the stream has it,
    sorted by symbol then time, over several pages; 429s and refusals as for the bars."""
    with _sim(rest_429_every=3) as sim:
        await _until_minutes(sim, 6)
        start, end = "2026-01-05T14:30:20.5Z", "2026-01-05T14:34:40Z"
        client = _ticks_client(sim, channel, limit=4)
        got = await _fetch_ticks(client, start, end)
        truth = [
            item for item in sim.ticks(kind)
            if "2026-01-05T14:30:20.500000000Z" <= item["t"] <= "2026-01-05T14:34:40.000000000Z"
        ]  # fmt: skip
        stats = sim.stats()
        sim.refuse_rest(403)
        with pytest.raises(BackfillFailed) as refused:
            await _fetch_ticks(_ticks_client(sim, channel), start, end)
    assert len(truth) >= 20 and client.requests > len(truth) // 4
    assert sorted(got, key=lambda i: (i["S"], i["t"])) == got
    assert sorted(got, key=lambda i: (i["S"], i["t"])) == sorted(
        truth, key=lambda i: (i["S"], i["t"])
    )
    assert client.rate_limited == stats["rest_rate_limited"] >= 1
    assert refused.value.reason == "refused" and "403" in refused.value.detail
