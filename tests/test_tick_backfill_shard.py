"""Opt-in trades and quotes backfill in one shard (`ShardCore`, no Ray, no Kafka): the
real simulator over real sockets (WebSocket, and REST over HTTP from the same market).

The Ray + Kafka version is tests/test_backfill.py::test_trades_lost_to_a_dropped_connection_
are_backfilled_exactly_once."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from ray_forwarder.ray.shard import ShardCore
from tests.outage import MarketOutage
from tests.test_gap_shard import _run_shard, _sim, _status


def _canonical(item: dict[str, Any]) -> bytes:
    return orjson.dumps(item, option=orjson.OPT_SORT_KEYS)


@pytest.mark.parametrize("stream", ["stocks", "crypto"])
async def test_a_dropped_connection_gets_every_trade_and_quote_exactly_once(stream: str) -> None:
    """BACKFILL_CHANNELS=bars,trades,quotes; the connection is down (406s) for two simulated
    minutes while the market trades, REST answers 429 to every third request. Every trade
    and quote the market produced is forwarded exactly once, live or backfilled (marked),
    the edges REST repeats are recognised by their dedup key, and seq keeps growing per
    (channel, symbol). Crypto: the same from `/v1beta3/crypto/{loc}/trades` and `/quotes`
    at the configured location, over the default msgpack stream (fractional sizes)."""
    outage = MarketOutage(after_items=400, minutes=2)

    def scenario(core: ShardCore) -> bool:
        outage.step(sim)
        return sim.finished and core.stats()["backfill"].get("gaps_filled", 0) >= 1

    channels = "alpaca_crypto_channels" if stream == "crypto" else "alpaca_channels"
    with _sim(stream, rest_429_every=3, quote_ratio=0.5, total_events=1800) as sim:
        core, envelopes = await _run_shard(
            sim, scenario, **{channels: "trades,quotes,bars,updatedBars"},
            backfill_channels="bars,trades,quotes", backfill_page_limit=50,
            backfill_requests_per_minute=600,
        )  # fmt: skip
        trades, quotes = sim.ticks("t"), sim.ticks("q")
    [gap] = _status(envelopes, "gap")
    [filled] = _status(envelopes, "gap_filled")
    assert filled["gap_id"] == gap["gap_id"] and filled["trades"] > 0 and filled["quotes"] > 0
    assert not _status(envelopes, "gap_unfilled")
    for channel, produced in (("trades", trades), ("quotes", quotes)):
        records = [e for e in envelopes if e["channel"] == channel]
        got = Counter(_canonical(e["payload"]) for e in records)
        assert all(n == 1 for n in got.values()), f"a {channel} record arrived twice"
        assert set(got) == {_canonical(item) for item in produced}, channel
        backfilled = [e for e in records if "backfill" in e]
        assert backfilled and all(e["backfill"]["gap_id"] == gap["gap_id"] for e in backfilled)
        assert all(e["is_final"] for e in backfilled)
        last: dict[str, int] = {}
        for envelope in records:  # one sender, so delivery order is Kafka's per symbol
            assert envelope["seq"] > last.get(envelope["symbol"], 0)
            last[envelope["symbol"]] = envelope["seq"]
    outcome = core.stats()["backfill"]["tick_records"]
    assert outcome["trades_emitted"] + outcome["quotes_emitted"] == sum(
        1 for e in envelopes if "backfill" in e and e["channel"] in ("trades", "quotes")
    )
    assert outcome.get("trades_duplicate", 0) + outcome.get("quotes_duplicate", 0) >= 1
    print(f"ticks: gap {gap['seconds']} s, filled {filled}, outcome {outcome}")


def test_backfilled_tick_outcomes_are_exported_by_channel_and_outcome(monkeypatch) -> None:
    """The shard's `tick_records` (`trades_emitted`, ...) become the catalogue's
    `shard_backfill_ticks` counter, by channel and outcome, as deltas of the totals. (Ray's
    metric classes are replaced by a recorder: exporting them needs a running actor, which
    tests/test_observability.py covers for the whole catalogue.)"""
    from ray_forwarder.ops import metrics

    incs: list[tuple[str, float, dict[str, str]]] = []

    class Counter_:
        def __init__(self, name: str, description: str = "", tag_keys: Any = ()) -> None:
            self.name = name

        def inc(self, value: float, tags: dict[str, str]) -> None:
            incs.append((self.name, value, tags))

    monkeypatch.setattr(metrics, "_metrics", lambda: type("M", (), {"Counter": Counter_}))
    gap_metrics = metrics.GapMetrics("stocks-0")
    stats = {"stream": "stocks", "backfill": {"tick_records": {"trades_emitted": 5}}}
    gap_metrics.update(stats)
    stats["backfill"]["tick_records"] = {"trades_emitted": 7, "quotes_duplicate": 1}
    gap_metrics.update(stats)
    ticks = [(v, t) for name, v, t in incs if "backfill_ticks" in name]
    base = {"shard": "stocks-0", "stream": "stocks"}
    assert ticks == [
        (5, {**base, "channel": "trades", "outcome": "emitted"}),
        (2, {**base, "channel": "trades", "outcome": "emitted"}),
        (1, {**base, "channel": "quotes", "outcome": "duplicate"}),
    ]


OPTION_SYMBOLS = ["AAPL260116C00230000", "SPY260116P00590000", "QQQ260116C00520000"]


async def test_an_options_gap_gets_every_trade_exactly_once_and_no_quotes() -> None:
    """The options stream (msgpack only) with BACKFILL_CHANNELS=bars,trades,quotes: its
    trades come back from `/v1beta1/options/trades` exactly once each (live or marked),
    and its quotes are not asked for (Alpaca keeps no options quotes history): `gap_filled`
    counts none, none is backfilled, none duplicated."""
    from ray_forwarder_dev.sim import SimConfig, SimulatorThread
    from tests.forwarder_harness import SIM_KEY, SIM_SECRET

    outage = MarketOutage(after_items=400, minutes=2)

    def scenario(core: ShardCore) -> bool:
        outage.step(sim)
        return sim.finished and core.stats()["backfill"].get("gaps_filled", 0) >= 1

    config = SimConfig(
        stream="options", feed="indicative", symbols=OPTION_SYMBOLS, rate=200, time_scale=60,
        total_events=1800, keys={SIM_KEY: SIM_SECRET}, quote_ratio=0.5, status_ratio=0.0,
        luld_ratio=0.0, correction_ratio=0.0, cancel_error_ratio=0.0, seed=21,
        rest_429_every=3,
    )  # fmt: skip
    with SimulatorThread(config) as sim:
        _core, envelopes = await _run_shard(
            sim, scenario, alpaca_streams="options", alpaca_options_stream_url=sim.url,
            alpaca_options_feed="indicative", alpaca_options_symbols=",".join(OPTION_SYMBOLS),
            alpaca_options_channels="trades,quotes", backfill_channels="bars,trades,quotes",
            backfill_page_limit=50, backfill_requests_per_minute=600,
        )  # fmt: skip
        trades = sim.ticks("t")
    [gap] = _status(envelopes, "gap")
    [filled] = _status(envelopes, "gap_filled")
    assert filled["gap_id"] == gap["gap_id"] and filled["trades"] > 0 and "quotes" not in filled
    assert not _status(envelopes, "gap_unfilled")
    records = [e for e in envelopes if e["channel"] == "trades"]
    got = Counter(_canonical(e["payload"]) for e in records)
    assert all(n == 1 for n in got.values()), "a trade arrived twice"
    assert set(got) == {_canonical(item) for item in trades}
    assert any("backfill" in e for e in records)
    quotes = [e for e in envelopes if e["channel"] == "quotes"]
    assert quotes and not any("backfill" in e for e in quotes)
    assert len({_canonical(e["payload"]) for e in quotes}) == len(quotes)
