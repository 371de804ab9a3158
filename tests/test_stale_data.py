"""Data staleness, separate from transport liveness: a stream that still answers control
messages but carries no data is reconnected while the market is open (Alpaca's clock, here
the simulator's), and left alone while it is closed. `AlpacaSession` and `MarketClock`
against the simulator over real sockets; the fallback through a real `ShardCore`."""

from __future__ import annotations

import asyncio

import orjson

from ray_forwarder.alpaca.market_clock import MarketClock, alpaca_fetcher
from ray_forwarder.runtime.session import AlpacaSession, SessionConfig
from ray_forwarder_dev.sim import SimConfig, Simulator
from tests.test_subscription_check import Recorder

KEY, SECRET = "sim-key", "sim-secret"


def _session(url: str, handler: Recorder, clock: MarketClock, stale: float) -> AlpacaSession:
    config = SessionConfig(
        url=url, key=KEY, secret=SECRET, subscriptions={"trades": ["SPY"], "quotes": ["SPY"]},
        wire_format="json", reconnect_initial=0.05, reconnect_max=0.1,
        stale_stream_seconds=0.2,  # the transport probe runs too, and is answered
        data_stale_seconds=stale,
    )  # fmt: skip
    return AlpacaSession(config, handler, market_open=clock.is_open)


def _clock(sim: Simulator, events: list[tuple[str, dict]]) -> MarketClock:
    fetch = alpaca_fetcher(sim.trading_url, KEY, SECRET)
    return MarketClock(fetch, lambda event, info: events.append((event, info)))


async def test_a_starved_stream_is_reconnected_with_reason_stale_data_and_data_resumes() -> None:
    async with Simulator(SimConfig(symbols=["SPY"], rate=500, keys={KEY: SECRET})) as sim:
        events: list[tuple[str, dict]] = []
        clock = _clock(sim, events)
        await clock.refresh()
        assert clock.source == "alpaca" and clock.is_open() and events == []
        handler = Recorder()
        session = _session(sim.url, handler, clock, stale=0.6)
        task = asyncio.create_task(session.run())
        try:
            await handler.until(lambda: sum(handler.symbols.values()) >= 50)
            assert sim.starve_connection() is not None
            await handler.until(lambda: bool(handler.named("disconnected")))
            before = sum(handler.symbols.values())
            await handler.until(lambda: sum(handler.symbols.values()) >= before + 50)
        finally:
            await session.stop()
            await asyncio.wait_for(task, 5)
    reason = handler.named("disconnected")[0]["reason"]
    assert reason.startswith("stale data"), reason
    assert session.stale_data_reconnects == 1 and session.connects == 2
    assert session.stale_reconnects == 0  # the socket itself stayed alive (probes answered)


async def test_no_stale_reconnect_while_the_market_is_closed() -> None:
    async with Simulator(SimConfig(symbols=["SPY"], rate=500, keys={KEY: SECRET})) as sim:
        sim.set_market_open(False)
        events: list[tuple[str, dict]] = []
        clock = _clock(sim, events)
        await clock.refresh()
        assert clock.source == "alpaca" and not clock.is_open()
        handler = Recorder()
        stale = 0.4
        session = _session(sim.url, handler, clock, stale)
        task = asyncio.create_task(session.run())
        try:
            await handler.until(lambda: sum(handler.symbols.values()) >= 20)
            assert sim.starve_connection() is not None
            # The watchdog checks every stale/4 s of its own sleep: 12 checks that found the
            # market closed span three stale windows, however slow the machine.
            await handler.until(lambda: session.stale_data_deferred >= 12, timeout=30)
            assert not handler.named("disconnected") and session.connects == 1
            # The same starved stream, once the clock says open: now it is stale.
            sim.set_market_open(True)
            await clock.refresh()
            assert clock.is_open()
            await handler.until(lambda: bool(handler.named("disconnected")))
        finally:
            await session.stop()
            await asyncio.wait_for(task, 5)
    assert handler.named("disconnected")[0]["reason"].startswith("stale data")
    assert events == []  # the clock answered all along: nothing to announce


async def test_clock_unreachable_falls_back_to_always_open_once_then_recovers() -> None:
    async with Simulator(SimConfig(symbols=["SPY"], keys={KEY: SECRET})) as sim:
        sim.set_clock_available(False)
        events: list[tuple[str, dict]] = []
        clock = _clock(sim, events)
        await clock.refresh()
        await clock.refresh()
        assert clock.source == "assumed_open" and clock.is_open()
        [(name, info)] = events  # one event per episode, not per failed fetch
        assert name == "market_clock" and info["source"] == "assumed_open"
        assert info["reason"] == "GET /v2/clock: HTTP 503" and info["is_open"] is True
        assert clock.next_refresh_in() == 60.0  # retried sooner than the refresh interval
        sim.set_clock_available(True)
        sim.set_market_open(False)
        await clock.refresh()
        assert clock.source == "alpaca" and not clock.is_open()
        assert [e for e, _ in events] == ["market_clock", "market_clock"]
        assert events[1][1]["source"] == "alpaca" and events[1][1]["is_open"] is False


async def test_a_shard_without_a_reachable_clock_says_so_in_one_status_event() -> None:
    """A real `ShardCore` whose trading URL refuses connections: it streams on (the market
    is assumed open) and writes one `market_clock` status record; no secret anywhere."""
    from ray_forwarder.config import load_settings
    from ray_forwarder.ray.driver import plan_shards
    from ray_forwarder.ray.shard import ShardCore

    delivered: list[tuple[str, bytes, bytes]] = []

    async def send(records: list[tuple[str, bytes, bytes]], _instance: str | None):
        delivered.extend(records)
        return len(records), "receiver"

    async with Simulator(SimConfig(symbols=["SPY"], rate=200, keys={KEY: SECRET})) as sim:
        settings = load_settings(
            alpaca_api_key_id=KEY, alpaca_secret_key=SECRET, alpaca_stream_url=sim.url,
            alpaca_trading_url="http://127.0.0.1:9", alpaca_symbols="SPY",
            kafka_bootstrap_servers="127.0.0.1:9", batch_max_ms=5,
        )  # fmt: skip
        [spec] = plan_shards(settings)
        core = ShardCore(settings, spec, [send])
        runner = asyncio.create_task(core.run())
        try:
            await asyncio.wait_for(core.market_clock.refreshed.wait(), 30)
            assert core.stats()["market_clock"] == "assumed_open"
            assert core.stats()["market_open"] is True
            for _ in range(300):  # until the status record went through the outbox
                if any(b'"market_clock"' in value for _t, _k, value in delivered):
                    break
                await asyncio.sleep(0.05)
        finally:
            assert await core.stop(10)
            await asyncio.wait_for(runner, 10)
    status = [orjson.loads(v)["payload"] for t, _k, v in delivered if t == settings.topic_status]
    clock_events = [p for p in status if p["event"] == "market_clock"]
    assert len(clock_events) == 1, status
    assert clock_events[0]["source"] == "assumed_open"
    assert clock_events[0]["reason"] == "GET /v2/clock: ClientConnectorError"
    assert all(SECRET.encode() not in value for _t, _k, value in delivered)
    assert "secret" not in repr(core.session._config).lower().replace("key=<masked>", "")


async def test_the_forwarder_reconnects_a_starved_shard_and_data_resumes(
    kafka_broker, kafka_topics, ray_session
) -> None:
    """The real forwarder (local Ray, real Kafka): the simulator starves the shard's
    connection while still answering it; the shard reconnects with reason `stale data`, and
    data flows into Kafka again on the new connection."""
    from tests.forwarder_harness import forwarder_settings
    from tests.kafka_fixture import consume_all
    from tests.test_observability import Running, _sim, _until

    with _sim(rate=500) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols="SPY,QQQ",
            alpaca_channels="trades,quotes", data_stale_seconds=1.0,
        )  # fmt: skip
        async with Running(settings) as run:

            def shard() -> dict:
                shards = run.forwarder.snapshot.shards
                return shards[0] if shards else {}

            await _until(lambda: sum(shard().get("acked", {}).values()) > 50, 60, "data")
            assert shard()["market_clock"] == "alpaca" and shard()["market_open"] is True
            assert sim.starve_connection() is not None
            await _until(lambda: shard().get("stale_data_reconnects", 0) >= 1, 60, "reconnect")
            acked = sum(shard()["acked"].values())
            await _until(lambda: sum(shard()["acked"].values()) > acked + 50, 60, "data again")
            assert shard()["stale_reconnects"] == 0  # the socket itself never went silent
    records = await consume_all(kafka_broker.bootstrap_servers, settings.topic_status)
    payloads = [orjson.loads(record.value)["payload"] for record in records]
    reasons = [p["reason"] for p in payloads if p["event"] == "disconnected"]
    assert reasons and reasons[0].startswith("stale data"), reasons
    assert [p["event"] for p in payloads].count("subscribed") >= 2  # subscribed again
    assert not [p for p in payloads if p["event"] == "market_clock"]  # the clock answered
