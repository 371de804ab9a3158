"""The Alpaca-protocol feed simulator, over real sockets with a plain websockets client."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.sync.client import connect as sync_connect

from ray_forwarder_dev.sim import Market, MarketConfig, SimConfig, Simulator, SimulatorThread

KEY, SECRET = "sim-key", "sim-secret"
MSGPACK = {"Content-Type": "application/msgpack"}
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
ALL_TYPES = set("tqbudslcx")
FIELDS = {
    "t": "S i x p s c t z",
    "q": "S ax ap as bx bp bs c t z",
    "b": "S o h l c v vw n t",
    "u": "S o h l c v vw n t",
    "d": "S o h l c v vw n t",
    "s": "S sc sm rc rm t z",
    "l": "S u d i t z",
    "c": "S x oi op os oc ci cp cs cc t z",
    "x": "S i x p s a t z",
}
EVERYTHING = {
    ch: ["*"]
    for ch in ("trades", "quotes", "bars", "updatedBars", "dailyBars", "statuses", "lulds")
}


def fast(**overrides: Any) -> SimConfig:
    """Unpaced, dense in minute marks (20 ticks per simulated minute), three symbols."""
    settings: dict[str, Any] = {
        "symbols": ["SPY", "QQQ", "AAPL"],
        "rate": None,
        "time_scale": 600.0,
        "updated_bar_ratio": 1.0,
    }
    settings.update(overrides)
    return SimConfig(**settings)


@asynccontextmanager
async def running(config: SimConfig) -> AsyncIterator[Simulator]:
    async with Simulator(config) as sim:
        yield sim


def decode(frame: str | bytes) -> Any:
    if isinstance(frame, str):
        return orjson.loads(frame)
    return msgpack.unpackb(frame, raw=False, timestamp=0)


async def recv(ws: ClientConnection, timeout: float = 3.0) -> Any:
    return decode(await asyncio.wait_for(ws.recv(), timeout))


async def login(url: str, headers: dict[str, str] | None = None, *, via_msgpack: bool = False):
    ws = await connect(url, additional_headers=headers or {})
    assert await recv(ws) == [{"T": "success", "msg": "connected"}]
    auth = {"action": "auth", "key": KEY, "secret": SECRET}
    await ws.send(msgpack.packb(auth) if via_msgpack else orjson.dumps(auth).decode())
    assert await recv(ws) == [{"T": "success", "msg": "authenticated"}]
    return ws


async def expect_error(ws: ClientConnection, code: int, msg: str, *, closes: bool) -> None:
    assert await recv(ws) == [{"T": "error", "code": code, "msg": msg}]
    if closes:
        with pytest.raises(ConnectionClosed):
            await recv(ws)


def canonical(item: dict[str, Any]) -> dict[str, Any]:
    """A received item in the simulator's canonical form (msgpack Timestamp -> string)."""
    ts = item.get("t")
    if isinstance(ts, msgpack.Timestamp):
        return {**item, "t": f"{_iso(ts.seconds)}.{ts.nanoseconds:09d}Z"}
    return item


def _iso(seconds: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


async def drain(ws: ClientConnection, timeout: float = 0.3, *, at_most: float = 10.0) -> list[Any]:
    """Every data item received until the stream goes quiet or closes, or for `at_most`
    seconds on a stream that never goes quiet."""
    items: list[Any] = []
    deadline = asyncio.get_running_loop().time() + at_most
    try:
        while asyncio.get_running_loop().time() < deadline:
            message = await recv(ws, timeout)
            assert isinstance(message, list)
            items.extend(message)
    except (TimeoutError, ConnectionClosed):
        pass
    return items


# --- handshake, auth, subscription ------------------------------------------------------


@pytest.mark.parametrize("wire", ["json", "msgpack"])
async def test_handshake_and_subscription_reply(wire: str) -> None:
    headers = MSGPACK if wire == "msgpack" else None
    async with running(SimConfig(rate=10)) as sim:
        ws = await login(sim.url, headers, via_msgpack=wire == "msgpack")
        await ws.send(orjson.dumps({"action": "subscribe", "trades": ["SPY"], "quotes": ["*"]}))
        frame = await asyncio.wait_for(ws.recv(), 3)
        assert isinstance(frame, bytes if wire == "msgpack" else str)
        assert decode(frame) == [
            {
                "T": "subscription",
                "trades": ["SPY"],
                "quotes": ["*"],
                "bars": [],
                "updatedBars": [],
                "dailyBars": [],
                "statuses": [],
                "lulds": [],
                "corrections": ["SPY"],
                "cancelErrors": ["SPY"],
                "imbalances": [],
            }
        ]
        await ws.close()


async def test_header_auth() -> None:
    async with running(SimConfig(rate=10)) as sim:
        headers = {"APCA-API-KEY-ID": KEY, "APCA-API-SECRET-KEY": SECRET}
        async with connect(sim.url, additional_headers=headers) as ws:
            assert await recv(ws) == [{"T": "success", "msg": "connected"}]
            assert await recv(ws) == [{"T": "success", "msg": "authenticated"}]
            await ws.send(orjson.dumps({"action": "auth", "key": KEY, "secret": SECRET}))
            await expect_error(ws, 403, "already authenticated", closes=False)
        bad = {"APCA-API-KEY-ID": KEY, "APCA-API-SECRET-KEY": "nope"}
        async with connect(sim.url, additional_headers=bad) as ws:
            assert await recv(ws) == [{"T": "success", "msg": "connected"}]
            await expect_error(ws, 402, "auth failed", closes=True)


async def test_auth_errors() -> None:
    async with running(SimConfig(rate=10, auth_timeout=0.2)) as sim:
        async with connect(sim.url) as ws:
            await recv(ws)
            await ws.send(orjson.dumps({"action": "subscribe", "trades": ["SPY"]}))
            await expect_error(ws, 401, "not authenticated", closes=False)
            await ws.send("{not json")
            await expect_error(ws, 400, "invalid syntax", closes=False)
            await ws.send(orjson.dumps({"action": "auth", "key": KEY, "secret": "wrong"}))
            await expect_error(ws, 402, "auth failed", closes=True)
        async with connect(sim.url) as ws:  # says nothing: auth timeout
            await recv(ws)
            await expect_error(ws, 404, "auth timeout", closes=True)
        ws = await login(sim.url)
        await ws.send(orjson.dumps({"action": "dance"}))
        await expect_error(ws, 400, "invalid syntax", closes=False)
        await ws.send(orjson.dumps({"action": "subscribe", "trades": "SPY", "quotes": 5}))
        await expect_error(ws, 400, "invalid syntax", closes=False)
        await ws.close()
        assert sim.stats()["auth_failures"] == 1  # 402s only


async def test_reject_auth_and_symbol_limit() -> None:
    async with running(SimConfig(rate=10, symbol_limit=2)) as sim:
        sim.reject_auth(True)
        async with connect(sim.url) as ws:
            await recv(ws)
            await ws.send(orjson.dumps({"action": "auth", "key": KEY, "secret": SECRET}))
            await expect_error(ws, 402, "auth failed", closes=True)
        sim.reject_auth(False)
        ws = await login(sim.url)
        await ws.send(orjson.dumps({"action": "subscribe", "trades": ["A", "B", "C"]}))
        await expect_error(ws, 405, "symbol limit exceeded", closes=False)
        await ws.send(orjson.dumps({"action": "subscribe", "trades": ["A"], "quotes": ["B"]}))
        assert (await recv(ws))[0]["quotes"] == ["B"]
        await ws.close()


async def test_connection_limit_406_and_release() -> None:
    async with running(SimConfig(rate=10)) as sim:
        first = await login(sim.url)
        assert sim.active_connections(KEY) == 1
        async with connect(sim.url) as second:
            await recv(second)
            await second.send(orjson.dumps({"action": "auth", "key": KEY, "secret": SECRET}))
            await expect_error(second, 406, "connection limit exceeded", closes=True)
        await first.close()
        for _ in range(100):
            if sim.active_connections(KEY) == 0:
                break
            await asyncio.sleep(0.01)
        third = await login(sim.url)  # the slot is free again
        sim.refuse_connections(True)
        async with connect(sim.url) as fourth:
            await recv(fourth)
            await fourth.send(orjson.dumps({"action": "auth", "key": KEY, "secret": SECRET}))
            await expect_error(fourth, 406, "connection limit exceeded", closes=True)
        await third.close()
        stats = sim.stats()
        assert stats["refused"] == 2
        assert stats["connections"] == 4


async def test_bad_path_is_rejected() -> None:
    async with running(SimConfig(rate=10)) as sim:
        with pytest.raises(Exception, match="404"):
            await connect(f"ws://127.0.0.1:{sim.port}/v1/nope")
        ws = await login(sim.url_for("iex"))  # any feed name is accepted
        await ws.close()


# --- data -------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["json", "msgpack"])
async def test_every_item_type_arrives_exactly_as_sent(wire: str) -> None:
    async with running(fast(total_events=600, max_items_per_frame=25)) as sim:
        ws = await login(sim.url, MSGPACK if wire == "msgpack" else None)
        await ws.send(orjson.dumps({"action": "subscribe", **EVERYTHING}))
        assert (await recv(ws))[0]["T"] == "subscription"
        assert await sim.wait_finished(5)
        received: list[dict[str, Any]] = []
        frames = 0
        while len(received) < 600:
            frame = await asyncio.wait_for(ws.recv(), 3)
            assert isinstance(frame, bytes if wire == "msgpack" else str)
            items = decode(frame)
            assert isinstance(items, list) and 1 <= len(items) <= 25
            received.extend(items)
            frames += 1
        await ws.close()
    assert {item["T"] for item in received} == ALL_TYPES
    for item in received:
        assert set(FIELDS[item["T"]].split()) <= set(item), item
        if wire == "msgpack":
            assert isinstance(item["t"], msgpack.Timestamp)
        else:
            assert TS_RE.match(item["t"]), item["t"]
    assert [canonical(i) for i in received] == sim.distinct_items()
    stats = sim.stats()
    assert stats["items"] == stats["distinct"] == stats["produced"] == 600
    assert stats["frames"] == frames and stats["duplicates"] == 0


@pytest.mark.parametrize("wire", ["json", "msgpack"])
async def test_project_codec_reads_the_canonical_items(wire: str) -> None:
    """What the forwarder's decoder makes of the frames equals the simulator's accounting,
    which is what end-to-end tests compare Kafka payloads against."""
    from ray_forwarder.alpaca import DataItem, decode_frame

    async with running(fast(total_events=800, duplicate_ratio=0.05)) as sim:
        ws = await login(sim.url, MSGPACK if wire == "msgpack" else None)
        await ws.send(orjson.dumps({"action": "subscribe", **EVERYTHING}))
        await recv(ws)
        assert await sim.wait_finished(5)
        payloads: list[dict[str, Any]] = []
        while len(payloads) < len(sim.sent):
            events = decode_frame(await asyncio.wait_for(ws.recv(), 3))
            assert all(isinstance(e, DataItem) for e in events)
            payloads.extend(e.payload for e in events if isinstance(e, DataItem))
        await ws.close()
    assert payloads == [r.item for r in sim.sent]


async def test_unsubscribe_stops_a_stream() -> None:
    async with running(fast(total_events=2000)) as sim:
        ws = await login(sim.url)
        await ws.send(orjson.dumps({"action": "subscribe", "trades": ["SPY", "QQQ"]}))
        await recv(ws)
        await ws.send(orjson.dumps({"action": "unsubscribe", "trades": ["QQQ"]}))
        # data may come before the reply; skip to it
        while (reply := (await recv(ws))[0])["T"] != "subscription":
            pass
        assert reply["trades"] == ["SPY"] and reply["corrections"] == ["SPY"]
        assert await sim.wait_sent(200, 5)
        after_reply = await drain(ws, 0.2)
        await ws.close()
    assert after_reply
    kinds = Counter((i["T"], i["S"]) for i in after_reply)
    assert {s for _, s in kinds} == {"SPY"}
    assert {t for t, _ in kinds} <= {"t", "c", "x"}


async def test_drop_connections_is_abrupt_and_accounted() -> None:
    async with running(SimConfig(rate=3000, symbols=["SPY", "QQQ"])) as sim:
        ws = await login(sim.url, MSGPACK)
        await ws.send(orjson.dumps({"action": "subscribe", **EVERYTHING}))
        await recv(ws)
        assert await sim.wait_sent(300, 5)
        assert await sim.drop_connections() == 1
        received: list[Any] = []
        with pytest.raises(ConnectionClosedError) as closed:
            while True:
                received.extend(await recv(ws))
        assert closed.value.rcvd is None  # no close frame: 1006
        produced_at_drop = sim.stats()["produced"]
        await asyncio.sleep(0.1)
        sent = sim.sent_by_connection()
        assert sim.stats()["produced"] > produced_at_drop  # the market keeps running
        assert [canonical(i) for i in received] == [r.item for r in sent[1]]
        assert len(received) >= 300
        assert sim.active_connections(KEY) == 0 and sim.stats()["dropped_connections"] == 1


async def test_stall_keeps_the_socket_open_but_sends_nothing_more() -> None:
    """A stalled connection stays open and answers pings, but gets no data and no control
    reply; its items are not counted as sent; a new connection is served normally."""
    async with running(SimConfig(rate=2000, symbols=["SPY", "QQQ"])) as sim:
        ws = await login(sim.url)
        await ws.send(orjson.dumps({"action": "subscribe", "trades": ["*"], "quotes": ["*"]}))
        await recv(ws)
        assert await sim.wait_sent(200, 5)
        assert sim.stall_connections() == 1
        received = await drain(ws, 0.5)  # what was written before the stall
        sent_at_stall = sim.stats()["items"]
        assert [canonical(i) for i in received] == [r.item for r in sim.sent]
        await ws.send(orjson.dumps({"action": "subscribe", "trades": ["SPY"]}))
        with pytest.raises(TimeoutError):
            await recv(ws, 0.5)  # neither data nor the subscription reply
        await asyncio.wait_for(await ws.ping(), 2)  # but the transport is alive
        assert sim.stats()["items"] == sent_at_stall
        assert sim.stats()["produced"] > sent_at_stall and sim.stats()["stalled_connections"] == 1
        await ws.close()
        fresh = await login(sim.url)  # the slot was released by the close
        await fresh.send(orjson.dumps({"action": "subscribe", "trades": ["*"]}))
        assert (await recv(fresh))[0]["T"] == "subscription"
        assert (await recv(fresh))[0]["T"] in ("t", "c", "x")  # data flows on the new one
        await fresh.close()


async def test_starve_stops_data_but_still_answers_control_messages() -> None:
    """A starved connection keeps answering subscribes and pings, gets no more data; its
    items are not counted as sent; other connections are served normally."""
    async with running(SimConfig(rate=2000, symbols=["SPY"], connection_limit=2)) as sim:
        ws = await login(sim.url)
        await ws.send(orjson.dumps({"action": "subscribe", "trades": ["SPY"]}))
        assert (await recv(ws))[0]["T"] == "subscription"
        assert await sim.wait_sent(100, 5)
        starved = sim.starve_connection()
        assert starved is not None and sim.stats()["starved_connections"] == 1
        await drain(ws, 0.5)  # what was written before the starvation
        sent = sim.stats()["items"]
        await ws.send(orjson.dumps({"action": "subscribe", "quotes": ["SPY"]}))
        reply = await recv(ws)  # the control reply still comes (data frames do not)
        while reply[0]["T"] != "subscription":
            reply = await recv(ws)
        assert reply[0]["quotes"] == ["SPY"]
        await asyncio.wait_for(await ws.ping(), 2)
        other = await login(sim.url)
        await other.send(orjson.dumps({"action": "subscribe", "trades": ["SPY"]}))
        assert (await recv(other))[0]["T"] == "subscription"
        assert (await recv(other))[0]["T"] in ("t", "c", "x")  # data flows on the other
        assert len([r for r in sim.sent if r.conn_id == starved]) == sent
        await ws.close()
        await other.close()


async def test_omit_from_subscription_leaves_a_symbol_out_once_or_always() -> None:
    async with running(SimConfig(rate=500, symbols=["SPY", "QQQ"], connection_limit=2)) as sim:
        sim.omit_from_subscription("QQQ", replies=1)
        sim.omit_from_subscription("AAPL", replies=None)
        ws = await login(sim.url)
        ask = {"action": "subscribe", "trades": ["SPY", "QQQ", "AAPL"], "quotes": ["QQQ"]}
        await ws.send(orjson.dumps(ask))
        first = (await recv(ws))[0]
        assert first["trades"] == ["SPY"] and first["quotes"] == []
        items = await drain(ws, 0.3, at_most=1.0)
        assert {i["S"] for i in items} == {"SPY"}
        await ws.send(orjson.dumps(ask))  # asking again gets QQQ, never AAPL
        reply = await recv(ws)
        while reply[0]["T"] != "subscription":
            reply = await recv(ws)
        assert reply[0]["trades"] == ["SPY", "QQQ"] and reply[0]["quotes"] == ["QQQ"]
        assert "QQQ" in {i["S"] for i in await drain(ws, 0.3, at_most=1.0)}
        assert sim.stats()["omitted_from_subscription"] == 3  # QQQ once, AAPL twice
        await ws.close()


async def test_trading_api_clock_and_calendar() -> None:
    """`/v2/clock` and `/v2/calendar` on the stream's port, plain HTTP, Alpaca's headers:
    open around the clock by default, closed on demand, 401 without the key, 503 on demand."""
    import aiohttp

    headers = {"APCA-API-KEY-ID": KEY, "APCA-API-SECRET-KEY": SECRET}
    async with running(SimConfig()) as sim, aiohttp.ClientSession(headers=headers) as http:
        base = sim.trading_url

        async def get(path: str, **kw: Any) -> tuple[int, Any]:
            async with http.get(base + path, **kw) as response:
                return response.status, await response.json(content_type=None)

        status, clock = await get("/v2/clock")
        assert status == 200 and clock["is_open"] is True
        assert set(clock) == {"timestamp", "is_open", "next_open", "next_close"}
        assert clock["next_close"] < clock["next_open"]  # ISO strings, same offset
        params = {"start": "2026-01-05", "end": "2026-01-07"}
        status, days = await get("/v2/calendar", params=params)
        assert status == 200 and [d["date"] for d in days] == [
            "2026-01-05", "2026-01-06", "2026-01-07"
        ]  # fmt: skip
        assert days[0]["open"] == "00:00" and days[0]["close"] == "23:59"
        sim.set_market_open(False)
        assert (await get("/v2/clock"))[1]["is_open"] is False
        assert (await get("/v2/calendar", params=params))[1] == []
        async with aiohttp.ClientSession() as anonymous, anonymous.get(base + "/v2/clock") as r:
            assert r.status == 401
        sim.set_clock_available(False)
        assert (await get("/v2/clock"))[0] == 503
        assert sim.stats()["clock_requests"] == 4


async def test_drop_takes_back_what_a_stalled_reader_left_in_the_buffer() -> None:
    """The client stops reading, the server's write buffer fills, then the drop: exactly the
    frames that reached the kernel arrive; the ones still buffered are marked lost."""
    config = fast(symbols=["SPY"], max_items_per_frame=200, drop_drain_timeout=0.1)
    async with running(config) as sim:
        ws = await login(sim.url)
        await ws.send(orjson.dumps({"action": "subscribe", **EVERYTHING}))
        await recv(ws)
        for _ in range(200):  # until the sender is stuck on a full buffer
            await asyncio.sleep(0.02)
            stuck = sim.stats()["items"]
            await asyncio.sleep(0.05)
            if sim.stats()["items"] == stuck:
                break
        await sim.drop_connections()
        received: list[Any] = []
        with pytest.raises(ConnectionClosedError):
            while True:
                received.extend(await recv(ws))
        stats = sim.stats()
        assert stats["lost"] > 0, stats
        assert [canonical(i) for i in received] == [r.item for r in sim.sent]
        assert stats["items"] == len(received)


async def test_send_error_407_closes() -> None:
    async with running(SimConfig(rate=200)) as sim:
        ws = await login(sim.url)
        await ws.send(orjson.dumps({"action": "subscribe", "quotes": ["*"]}))
        await recv(ws)
        assert await sim.wait_sent(5, 5)
        assert sim.send_error(407) == 1
        messages: list[Any] = []
        with pytest.raises(ConnectionClosed):
            while True:
                messages.extend(await recv(ws))
        assert messages[-1] == {"T": "error", "code": 407, "msg": "slow client"}
        assert all(m["T"] == "q" for m in messages[:-1])


@pytest.mark.parametrize("wire", ["json", "msgpack"])
async def test_inject_malformed(wire: str) -> None:
    async with running(fast(total_events=1000)) as sim:
        ws = await login(sim.url, MSGPACK if wire == "msgpack" else None)
        await ws.send(orjson.dumps({"action": "subscribe", "trades": ["*"], "quotes": ["*"]}))
        await recv(ws)
        assert await sim.wait_sent(50, 5)
        assert sim.inject_malformed(6) == 1
        assert await sim.wait_finished(5)
        good: list[dict[str, Any]] = []
        junk: Counter[str] = Counter()
        while True:
            try:
                frame = await asyncio.wait_for(ws.recv(), 0.3)
            except TimeoutError:
                break
            try:
                message = decode(frame)
            except Exception:
                junk["unparseable"] += 1
                continue
            if not isinstance(message, list):
                junk["not_array"] += 1
                continue
            for item in message:
                if item.get("T") not in ALL_TYPES:
                    junk["unknown_type"] += 1
                elif "S" not in item or "t" not in item:
                    junk["missing_field"] += 1
                else:
                    good.append(canonical(item))
        await ws.close()
    assert junk == {"unparseable": 2, "not_array": 1, "unknown_type": 1, "missing_field": 2}
    assert sim.stats()["malformed"] == 6
    assert good == [r.item for r in sim.sent]


@pytest.mark.parametrize("wire", ["json", "msgpack"])
async def test_duplicates_are_marked_and_byte_identical(wire: str) -> None:
    async with running(fast(duplicate_ratio=0.2, total_events=500)) as sim:
        ws = await login(sim.url, MSGPACK if wire == "msgpack" else None)
        await ws.send(orjson.dumps({"action": "subscribe", **EVERYTHING}))
        await recv(ws)
        assert await sim.wait_finished(5)
        frames: list[str | bytes] = []
        while True:
            try:
                frames.append(await asyncio.wait_for(ws.recv(), 0.3))
            except TimeoutError:
                break
        await ws.close()
    records = sim.sent
    received = [canonical(i) for f in frames for i in decode(f)]
    assert received == [r.item for r in records]
    dups = [r for r in records if r.duplicate]
    assert 50 < len(dups) < 200, len(dups)
    assert sim.stats()["duplicates"] == len(dups)
    first_seen: set[int] = set()
    for record in records:
        assert record.duplicate == (record.seq in first_seen)
        first_seen.add(record.seq)
    assert len(sim.distinct_items()) == 500 == len(records) - len(dups)
    # byte-identical: each duplicate's encoding appears verbatim in the frames, twice or more
    stream = b"".join(f.encode() if isinstance(f, str) else f for f in frames)
    for record in dups[:20]:
        item = record.item
        encoded = orjson.dumps(item) if wire == "json" else _msgpack_item(item)
        assert stream.count(encoded) >= 2


def _msgpack_item(item: dict[str, Any]) -> bytes:
    from ray_forwarder_dev.sim import encode_msgpack_item

    return encode_msgpack_item(item)


# --- the generator ----------------------------------------------------------------------


def test_generator_is_deterministic_and_well_formed() -> None:
    config = MarketConfig(symbols=("SPY", "QQQ", "AAPL"), seed=7, ticks_per_second=1 / 3)
    items = Market(config).next_events(500)
    assert items == Market(config).next_events(500)
    assert items != Market(MarketConfig(symbols=config.symbols, seed=8)).next_events(500)
    # the same stream however the calls are split
    split = Market(config)
    pieces = split.next_events(37) + split.advance_to("2026-01-05T14:40:00Z")
    pieces += split.next_events(500 - len(pieces))
    assert pieces == items

    assert {i["T"] for i in items} == ALL_TYPES
    encoded = [orjson.dumps(i, option=orjson.OPT_SORT_KEYS) for i in items]
    assert len(set(encoded)) == len(encoded)  # no two items identical
    last: dict[str, str] = {}
    trade_ids: list[int] = []
    for item in items:
        assert TS_RE.match(item["t"])
        if item["T"] in "tq":
            assert item["t"] > last.get(item["S"], ""), "timestamps must strictly increase"
            last[item["S"]] = item["t"]
        if item["T"] == "t":
            trade_ids.append(item["i"])
    assert len(trade_ids) == len(set(trade_ids))


def test_bars_aggregate_trades_and_updates_revise_them() -> None:
    market = Market(MarketConfig(symbols=("SPY", "QQQ"), ticks_per_second=0.5, seed=3))
    items = market.next_events(1500)
    bars = {(i["S"], i["t"]): i for i in items if i["T"] == "b"}
    updates = [i for i in items if i["T"] == "u"]
    assert len(bars) > 20 and updates
    for (symbol, start), bar in bars.items():
        assert start.endswith(":00.000000000Z")
        trades = [
            i for i in items if i["T"] == "t" and i["S"] == symbol and i["t"][:16] == start[:16]
        ]
        assert bar["o"] == trades[0]["p"] and bar["c"] == trades[-1]["p"]
        assert bar["h"] == max(t["p"] for t in trades)
        assert bar["v"] == sum(t["s"] for t in trades) and bar["n"] == len(trades)
    position = {id(i): n for n, i in enumerate(items)}
    for update in updates:
        bar = bars[(update["S"], update["t"])]
        assert update != {**bar, "T": "u"}  # same bar start, different content
        assert update["v"] > bar["v"]
        assert position[id(update)] > position[id(bar)]
    # a bar comes after the minute closes, an update after the following half-minute mark
    minute_of = {id(i): i["t"][:16] for i in items if i["T"] in "tq"}
    for n, item in enumerate(items):
        if item["T"] == "b":
            later_ticks = [minute_of[id(i)] for i in items[n:] if id(i) in minute_of]
            assert all(m > item["t"][:16] for m in later_ticks)


# --- the thread wrapper -----------------------------------------------------------------


def test_simulator_thread_for_sync_callers() -> None:
    config = SimConfig(symbols=["SPY"], rate=2000, total_events=300, duplicate_ratio=0.05)
    with SimulatorThread(config) as sim:
        assert re.match(r"^ws://127\.0\.0\.1:\d+/v2/sip$", sim.url)
        with sync_connect(sim.url) as ws:
            assert decode(ws.recv(3))[0]["msg"] == "connected"
            ws.send(orjson.dumps({"action": "auth", "key": KEY, "secret": SECRET}).decode())
            assert decode(ws.recv(3))[0]["msg"] == "authenticated"
            assert sim.active_connections(KEY) == 1
            ws.send(orjson.dumps({"action": "subscribe", **EVERYTHING}).decode())
            assert decode(ws.recv(3))[0]["T"] == "subscription"
            assert sim.wait_finished(5)
            received: list[Any] = []
            while len(received) < len(sim.sent()):
                received.extend(decode(ws.recv(3)))
            assert received == [r.item for r in sim.sent()]
            assert len(sim.distinct_items()) == 300 and sim.finished
            assert sim.call("send_error", 407) == 1
            assert decode(ws.recv(3))[0]["code"] == 407
        stats = sim.stats()
        assert stats["produced"] == 300 and stats["duplicates"] > 0
