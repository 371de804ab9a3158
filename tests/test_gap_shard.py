"""Gaps and backfill in one shard (`ShardCore`, no Ray, no Kafka): the real simulator over
real sockets (WebSocket and REST over HTTP), records collected from the outbox's sender.

The Ray + Kafka versions of these scenarios are in tests/test_backfill.py; these isolate
the shard's logic and run in seconds. The simulator's market runs at time_scale 60 (a
simulated minute per real second); the tests wait on its market clock, not on wall time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from ray_forwarder.alpaca import timestamps
from ray_forwarder.config import load_settings
from ray_forwarder.ray.driver import plan_shards
from ray_forwarder.ray.shard import ShardCore
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from ray_forwarder_dev.sim.generator import MINUTE_NS, parse_base_time
from tests.forwarder_harness import SIM_KEY, SIM_SECRET
from tests.outage import MarketOutage, market_ns

SYMBOLS = ["SPY", "QQQ", "AAPL"]
CRYPTO_SYMBOLS = ["BTC/USD", "ETH/USD", "SOL/USD"]
CRYPTO_LOCATION = "us-1"  # not the default: backfill must ask this location's endpoint
BUDGET = 30


def _ns(ts: str) -> int:
    return parse_base_time(ts[:19] + "Z")


def _content(bar: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in bar.items() if k != "T"}


def _stream_settings(sim: SimulatorThread) -> dict[str, Any]:
    """Settings that point the simulator's stream (stocks or crypto) at it."""
    if sim.config.stream == "crypto":
        return dict(
            alpaca_streams="crypto", alpaca_crypto_stream_url=sim.url,
            alpaca_crypto_symbols=",".join(CRYPTO_SYMBOLS),
            alpaca_crypto_channels="trades,bars,updatedBars",
            alpaca_crypto_location=sim.config.url_feed,
        )  # fmt: skip
    return dict(alpaca_stream_url=sim.url, alpaca_symbols=",".join(SYMBOLS),
                alpaca_channels="trades,bars,updatedBars")  # fmt: skip


async def _run_shard(
    sim: SimulatorThread,
    during: Callable[[ShardCore], bool],
    timeout: float = 120.0,
    **overrides: Any,
) -> tuple[ShardCore, list[dict[str, Any]]]:
    """Run one shard against `sim` until `during(core)` says done; its records, decoded."""
    delivered: list[tuple[str, bytes, bytes]] = []

    async def send(records: list[tuple[str, bytes, bytes]], _ticket: Any) -> tuple[int, str]:
        delivered.extend(records)
        return len(records), "receiver"

    settings = load_settings(
        alpaca_api_key_id=SIM_KEY, alpaca_secret_key=SIM_SECRET,
        kafka_bootstrap_servers="127.0.0.1:9", bar_final_delay_seconds=2.0,
        **{**_stream_settings(sim), "backfill_page_limit": 4,
           "backfill_requests_per_minute": BUDGET, **overrides},
        reconnect_initial=0.1, reconnect_max=0.5, connection_limit_backoff=1.0,
    )  # fmt: skip
    [spec] = plan_shards(settings)
    core = ShardCore(settings, spec, [send])
    runner = asyncio.create_task(core.run())
    deadline = time.monotonic() + timeout
    try:
        while not during(core):
            assert time.monotonic() < deadline, "the scenario did not finish in time"
            assert not runner.done(), "the shard stopped"
            await asyncio.sleep(0.05)
    finally:
        assert await core.stop(20)
        await asyncio.wait_for(runner, 20)
    return core, [orjson.loads(value) for _topic, _key, value in delivered]


def _sim(stream: str = "stocks", **overrides: Any) -> SimulatorThread:
    if stream == "crypto":
        overrides = dict(stream="crypto", symbols=CRYPTO_SYMBOLS, feed=CRYPTO_LOCATION,
                         **overrides)  # fmt: skip
    values: dict[str, Any] = dict(
        symbols=SYMBOLS, rate=200, time_scale=60, total_events=2500, keys={SIM_KEY: SIM_SECRET},
        quote_ratio=0.0, status_ratio=0.0, luld_ratio=0.0, correction_ratio=0.0,
        cancel_error_ratio=0.0, seed=21,
    )  # fmt: skip
    values.update(overrides)
    return SimulatorThread(SimConfig(**values))


def _status(envelopes: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [
        e["payload"]
        for e in envelopes
        if e["channel"] == "status" and e["payload"]["event"] == event
    ]


@pytest.mark.parametrize("stream", ["stocks", "crypto"])
async def test_a_dropped_connection_gets_one_final_bar_per_minute_from_rest(stream: str) -> None:
    """Drop the connection and refuse new ones (406) for three simulated minutes; REST
    answers 429 to every second request. Every (symbol, minute) then has exactly one final
    bar equal to the simulator's, the gap names the last item before and the first after,
    nothing streamed is repeated, and REST stayed within the budget. Crypto: the same, from
    `/v1beta3/crypto/{loc}/bars` at the configured location."""
    outage = MarketOutage(after_items=600, minutes=3)

    def scenario(core: ShardCore) -> bool:
        outage.step(sim)
        return sim.finished and core.stats()["backfill"].get("gaps_filled", 0) >= 1

    with _sim(stream, rest_429_every=2) as sim:
        core, envelopes = await _run_shard(sim, scenario)
        by_conn = sim.sent_by_connection()
        sim_bars = sim.minute_bars()
        sim_stats = sim.stats()
        rest_log = sim.rest_log()
    [gap] = _status(envelopes, "gap")
    first_conn, *later = sorted(by_conn)
    assert gap["cause"] == "disconnect" and gap["stream"] == stream
    assert gap["from"]["event_ts"] == by_conn[first_conn][-1].item["t"]
    assert gap["to"]["event_ts"] == by_conn[later[0]][0].item["t"]
    [filled] = _status(envelopes, "gap_filled")
    assert filled["gap_id"] == gap["gap_id"] and filled["bars"] > 0

    finals = [e for e in envelopes if e["channel"] == "bars" and e["is_final"]]
    counts = Counter((e["symbol"], e["payload"]["t"]) for e in finals)
    assert all(n == 1 for n in counts.values()), "a bar was finalised twice"
    last_sent = max(_ns(r.item["t"]) for rs in by_conn.values() for r in rs)
    expected = {k: v for k, v in sim_bars.items() if _ns(k[1]) + 2 * MINUTE_NS <= last_sent}
    assert not set(expected) - set(counts), "minutes without a final bar"
    for envelope in finals:
        key = (envelope["symbol"], envelope["payload"]["t"])
        if key in expected:
            assert _content(envelope["payload"]) == _content(expected[key]), key
    streamed_bars = {(r.item["S"], r.item["t"]) for rs in by_conn.values() for r in rs
                     if r.item["T"] in ("b", "u")}  # fmt: skip
    never_streamed = set(expected) - streamed_bars
    marked = {(e["symbol"], e["payload"]["t"]) for e in finals if "backfill" in e}
    assert never_streamed and never_streamed <= marked  # what the stream never sent: REST

    streamed = [e for e in envelopes if e["channel"] != "status" and "backfill" not in e]
    counts_data = Counter(
        orjson.dumps(e["payload"], option=orjson.OPT_SORT_KEYS)
        for e in streamed
        if not (e["channel"] == "bars" and e["is_final"])
    )
    assert all(n == 1 for n in counts_data.values()), "a streamed item arrived twice"
    sent = {orjson.dumps(r.item, option=orjson.OPT_SORT_KEYS) for rs in by_conn.values()
            for r in rs}  # fmt: skip
    assert set(counts_data) == sent

    assert sim_stats["rest_rate_limited"] >= 1
    times = [t for t, _status_code in rest_log]
    assert all(sum(1 for u in times if t <= u < t + 60) <= BUDGET for t in times)
    stats = core.stats()
    assert stats["gaps"] == {"disconnect": 1} and stats["backfill"]["rate_limited"] >= 1


async def test_a_gap_rest_refuses_is_reported_unfilled_and_finals_still_follow() -> None:
    state: dict[str, Any] = {}

    def scenario(core: ShardCore) -> bool:
        if "dropped" not in state and sim.stats()["items"] >= 400:
            state["dropped"] = sim.drop_connections()
        unfilled = core.stats()["backfill"].get("gaps_unfilled") or {}
        return sim.finished and unfilled.get("refused", 0) >= 1

    with _sim(total_events=1500) as sim:
        sim.refuse_rest(403)
        _core, envelopes = await _run_shard(sim, scenario)
        sim_bars = sim.minute_bars()
    [gap] = _status(envelopes, "gap")
    [unfilled] = _status(envelopes, "gap_unfilled")
    assert unfilled["gap_id"] == gap["gap_id"] and unfilled["reason"] == "refused"
    assert unfilled["from"] == gap["from"] and "403" in unfilled["detail"]
    finals = Counter(
        (e["symbol"], e["payload"]["t"])
        for e in envelopes
        if e["channel"] == "bars" and e["is_final"]
    )
    assert finals and all(n == 1 for n in finals.values()) and set(finals) <= set(sim_bars)
    assert not [e for e in envelopes if "backfill" in e]
    await asyncio.sleep(0)


async def _run_until(core: ShardCore, done: Callable[[], bool], timeout: float = 120.0) -> None:
    runner = asyncio.create_task(core.run())
    deadline = time.monotonic() + timeout
    try:
        while not done():
            assert time.monotonic() < deadline and not runner.done()
            await asyncio.sleep(0.05)
    finally:
        assert await core.stop(20)
        await asyncio.wait_for(runner, 20)


def _core(sim: SimulatorThread, out: list[dict[str, Any]], **overrides: Any) -> ShardCore:
    async def send(records: list[tuple[str, bytes, bytes]], _ticket: Any) -> tuple[int, str]:
        out.extend(orjson.loads(value) for _topic, _key, value in records)
        return len(records), "receiver"

    settings = load_settings(
        alpaca_api_key_id=SIM_KEY, alpaca_secret_key=SIM_SECRET, **_stream_settings(sim),
        kafka_bootstrap_servers="127.0.0.1:9", bar_final_delay_seconds=2.0,
        reconnect_initial=0.1, reconnect_max=0.5, connection_limit_backoff=1.0, **overrides,
    )  # fmt: skip
    [spec] = plan_shards(settings)
    return ShardCore(settings, spec, [send])


def _check_finals(
    finals: list[dict[str, Any]],
    sim: SimulatorThread,
    *,
    exactly_once: bool,
    drained_from: str | None = None,
) -> Counter[tuple[str, str]]:
    """Every settled (symbol, minute) has a final equal to the simulator's bar (except bars
    a graceful stop finalised with what it knew: `t` within 3 minutes before
    `drained_from`, whose updated bar may have come after the stop)."""
    by_conn = sim.sent_by_connection()
    last_sent = max(_ns(r.item["t"]) for rs in by_conn.values() for r in rs)
    sim_bars = sim.minute_bars()
    expected = {k: v for k, v in sim_bars.items() if _ns(k[1]) + 2 * MINUTE_NS <= last_sent}
    counts = Counter((e["symbol"], e["payload"]["t"]) for e in finals)
    assert not set(expected) - set(counts), sorted(set(expected) - set(counts))[:5]
    if exactly_once:
        assert all(n == 1 for n in counts.values()), "a bar was finalised twice"
    drained = (
        range(_ns(drained_from) - 3 * MINUTE_NS, _ns(drained_from)) if drained_from else range(0)
    )
    for envelope in finals:
        key = (envelope["symbol"], envelope["payload"]["t"])
        if key in expected and _ns(key[1]) not in drained:
            assert _content(envelope["payload"]) == _content(expected[key]), key
    return counts


def _finals(envelopes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in envelopes if e["channel"] == "bars" and e["is_final"]]


async def test_a_successor_resumes_where_a_stopped_shard_left_off() -> None:
    """A graceful stop's `stopped` record, handed to the next run (what the driver reads
    back from the status topic), opens a `stop_start` gap that backfill fills: one final per
    minute across both runs, although the market traded minutes on without anyone."""
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []
    with _sim(total_events=3000) as sim:
        await _run_until(_core(sim, first), lambda: sim.stats()["items"] >= 500)
        [stopped] = _status(first, "stopped")
        paused_at = market_ns(sim)
        while market_ns(sim) - paused_at < 2 * MINUTE_NS:  # the market trades on
            await asyncio.sleep(0.05)
        core = _core(sim, second)
        runner = asyncio.create_task(core.run(0, stopped["last"]))
        deadline = time.monotonic() + 120
        try:
            while not (sim.finished and core.stats()["backfill"].get("gaps_filled", 0) >= 1):
                assert time.monotonic() < deadline and not runner.done()
                await asyncio.sleep(0.05)
        finally:
            assert await core.stop(20)
            await asyncio.wait_for(runner, 20)
        [gap] = _status(second, "gap")
        assert gap["cause"] == "stop_start" and gap["from"] == stopped["last"]
        # every bar it saw was finalised: the successor starts after the last one
        last = stopped["last"]
        assert _ns(last["bars_from"]) >= _ns(last["event_ts"]) - MINUTE_NS
        _check_finals(
            _finals(first) + _finals(second), sim, exactly_once=True,
            drained_from=last["bars_from"],
        )  # fmt: skip


async def test_a_restarted_incarnation_backfills_what_died_with_its_predecessor() -> None:
    """What the driver does for a shard actor restart, without Ray: the predecessor's last
    stats `gap_mark` is the successor's `resume_from` (epoch 1). Whatever the predecessor
    emitted after that look is taken as lost (it may or may not reach Kafka when a process
    dies); its pending bars die with it. The successor's `restart` gap starts at the oldest
    bar that was not final, so every minute has a final equal to the simulator's."""
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []
    with _sim(total_events=3000) as sim:
        predecessor = _core(sim, first)
        looked: dict[str, Any] = {}

        def looked_once() -> bool:
            if sim.stats()["items"] >= 600 and not looked:
                looked["mark"], looked["kept"] = predecessor.stats()["gap_mark"], len(first)
            return bool(looked)

        await _run_until(predecessor, looked_once)
        survived = first[: looked["kept"]]  # the rest "died with the process"
        assert looked["mark"]["bars_from"] <= looked["mark"]["event_ts"]  # bars pending
        core = _core(sim, second)
        runner = asyncio.create_task(core.run(1, looked["mark"]))
        deadline = time.monotonic() + 120
        try:
            while not (sim.finished and core.stats()["backfill"].get("gaps_filled", 0) >= 1):
                assert time.monotonic() < deadline and not runner.done()
                await asyncio.sleep(0.05)
        finally:
            assert await core.stop(20)
            await asyncio.wait_for(runner, 20)
        [gap] = _status(second, "gap")
        assert gap["cause"] == "restart" and gap["gap_id"].startswith("stocks-0:1:")
        finals = _finals(survived) + _finals(second)
        counts = _check_finals(finals, sim, exactly_once=False)
        keys: dict[tuple[str, str], set[str]] = {}
        for e in finals:  # a repeated final is the same record key and content
            keys.setdefault((e["symbol"], e["payload"]["t"]), set()).add(e["key"])
        assert all(len(v) == 1 for v in keys.values())
        assert max(counts.values()) <= 2


async def test_a_successor_takes_over_the_backfill_its_predecessor_left_unfinished() -> None:
    """A gap closes while REST answers nothing but 429: its backfill (bars and trades) is
    still waiting when the predecessor "dies" (its records after the driver's last look
    at its stats are taken as lost). The successor, given that look's `gap_mark` (with
    its `backlog`), submits the gap again under its own id once REST answers: `gap_filled`
    names it, every trade the dropped connection missed is forwarded exactly once, and
    every (symbol, minute) from the gap on has exactly one final bar, the simulator's.
    Before the hand-over, the gap's trades were lost and its id never reported again."""
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []
    channels = dict(backfill_channels="bars,trades")
    with _sim(total_events=3000) as sim:
        sim.refuse_rest(429)
        predecessor = _core(sim, first, **channels)
        looked: dict[str, Any] = {}

        def held_backfill() -> bool:
            if "dropped" not in looked and sim.stats()["items"] >= 400:
                looked["dropped"] = sim.drop_connections()
            mark = predecessor.stats()["gap_mark"]
            held = sim.stats()["rest_rate_limited"] >= 1  # its backfill asked and waits
            # the look the test keeps comes after the gap's own event left the outbox (its
            # lane ships on linger, so the backlog can show before the event is delivered)
            told = bool(_status(first, "gap"))
            if "dropped" in looked and mark and mark.get("backlog") and held and told:
                looked["mark"], looked["kept"] = mark, len(first)
            return "mark" in looked

        await _run_until(predecessor, held_backfill)
        survived = first[: looked["kept"]]  # the rest "died with the process"
        [gap] = _status(survived, "gap")
        [handed] = looked["mark"]["backlog"]
        assert handed == {k: v for k, v in gap.items() if k not in ("event", "shard")}
        assert not _status(survived, "gap_filled") and not _status(survived, "gap_unfilled")
        # the graceful stop that followed hands it over too, and says so
        [stopped] = _status(first, "stopped")
        assert [g["gap_id"] for g in stopped["last"]["backlog"]] == [gap["gap_id"]]
        [given_up] = _status(first, "gap_unfilled")
        assert given_up["reason"] == "stopped" and given_up["handed_over"] is True

        sim.refuse_rest(None)
        core = _core(sim, second, **channels)
        runner = asyncio.create_task(core.run(1, looked["mark"]))
        deadline = time.monotonic() + 120
        try:
            while not (sim.finished and core.stats()["backfill"].get("gaps_filled", 0) >= 2):
                assert time.monotonic() < deadline and not runner.done()
                await asyncio.sleep(0.05)
        finally:
            assert await core.stop(20)
            await asyncio.wait_for(runner, 20)
        trades = sim.ticks("t")
        finals = _finals(survived) + _finals(second)
        counts = _check_finals(finals, sim, exactly_once=False)

    filled = {f["gap_id"]: f for f in _status(second, "gap_filled")}
    [restart] = _status(second, "gap")
    assert restart["cause"] == "restart" and set(filled) == {gap["gap_id"], restart["gap_id"]}
    assert filled[gap["gap_id"]]["bars"] > 0 and filled[gap["gap_id"]]["trades"] > 0
    assert not _status(second, "gap_unfilled")
    assert all(e["backfill"]["gap_id"] in filled for e in second if "backfill" in e)

    start, end = gap["from"]["event_ts"], gap["to"]["event_ts"]
    missed = [t for t in trades if start < timestamps.canonical(t["t"]) < end]
    forwarded = Counter(
        orjson.dumps(e["payload"], option=orjson.OPT_SORT_KEYS)
        for e in survived + second
        if e["channel"] == "trades" and start < e["event_ts"] < end
    )
    assert missed and all(n == 1 for n in forwarded.values()), "a trade was forwarded twice"
    assert set(forwarded) == {orjson.dumps(t, option=orjson.OPT_SORT_KEYS) for t in missed}

    from_minute = _ns(start) - _ns(start) % MINUTE_NS
    assert all(n == 1 for (_s, t), n in counts.items() if _ns(t) >= from_minute)
