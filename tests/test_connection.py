"""The sans-I/O connection state machine (`alpaca/connection.py`), driven without sockets or
clocks: frames and `now` in, outputs, messages to send and deadlines out."""

from __future__ import annotations

import json

import msgpack
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_forwarder.alpaca.connection import (
    TRANSITIONS,
    Disconnect,
    Items,
    MarketDataConnection,
    Report,
    State,
    Timing,
)
from ray_forwarder.alpaca.events import Skipped
from ray_forwarder.alpaca.streams import CRYPTO, NEWS, OPTIONS, STOCKS, STREAMS

CONNECTED = '[{"T":"success","msg":"connected"}]'
AUTHENTICATED = '[{"T":"success","msg":"authenticated"}]'


def _conn(stream=STOCKS, subscriptions=None, **timing) -> MarketDataConnection:
    subs = subscriptions or {"trades": ["SPY", "QQQ"]}
    return MarketDataConnection(
        stream, "key", "secret", subs, wire_format="json", timing=Timing(**timing), url="ws://x"
    )


def _reply(**channels: list[str]) -> str:
    return orjson.dumps([{"T": "subscription", **channels}]).decode()


def _streaming(conn: MarketDataConnection, now: float = 0.0, **granted: list[str]) -> None:
    conn.connect(now)
    conn.receive_frame(CONNECTED, now)
    conn.receive_frame(AUTHENTICATED, now)
    conn.data_to_send()
    conn.receive_frame(_reply(**(granted or dict(conn.subscriptions))), now)


def _states(outputs) -> list[str]:
    return [o.state for o in outputs if isinstance(o, Report)]


def test_handshake_walks_the_transition_table_and_queues_each_message() -> None:
    conn = _conn()
    conn.connect(0.0)
    assert conn.state is State.CONNECTING and conn.data_to_send() == []
    assert _states(conn.receive_frame(CONNECTED, 0.1)) == ["connected"]
    assert conn.state is State.AUTHENTICATING
    [auth] = conn.data_to_send()
    assert orjson.loads(auth) == {"action": "auth", "key": "key", "secret": "secret"}
    assert _states(conn.receive_frame(AUTHENTICATED, 0.2)) == ["authenticated"]
    [subscribe] = conn.data_to_send()
    assert orjson.loads(subscribe) == {"action": "subscribe", "trades": ["SPY", "QQQ"]}
    out = conn.receive_frame(_reply(trades=["SPY", "QQQ"]), 0.3)
    assert _states(out) == ["subscribed"] and conn.state is State.STREAMING
    assert conn.subscribed and conn.missing == {}
    assert set(TRANSITIONS.values()) == {State.AUTHENTICATING, State.SUBSCRIBING, State.STREAMING}


def test_a_frames_items_come_out_before_the_error_that_ends_it() -> None:
    conn = _conn()
    _streaming(conn)
    frame = orjson.dumps(
        [
            {"T": "t", "S": "SPY", "i": 1, "p": 1.0, "s": 1, "t": "2026-01-05T14:30:00Z"},
            {"T": "error", "code": 500, "msg": "internal error"},
        ]
    ).decode()
    out = conn.receive_frame(frame, 1.0)
    assert isinstance(out[0], Items) and out[0].items[0].symbol == "SPY"
    assert _states(out) == ["error"]
    assert isinstance(out[-1], Disconnect) and not out[-1].fatal and out[-1].delay is None
    assert conn.state is State.CLOSED and not conn.subscribed


def test_error_codes_map_to_actions() -> None:
    def ending(code: int) -> Disconnect | None:
        conn = _conn(connection_limit_backoff=42.0)
        conn.connect(0.0)
        out = conn.receive_frame(f'[{{"T":"error","code":{code},"msg":"m"}}]', 0.0)
        return next((o for o in out if isinstance(o, Disconnect)), None)

    assert ending(402).fatal and ending(402).code == 402  # auth failed
    assert ending(411).fatal  # insufficient scope
    assert ending(406).delay == 42.0 and not ending(406).fatal  # connection limit
    assert ending(407).delay is None and not ending(407).fatal  # slow client
    assert ending(403) is None  # already authenticated: ignored
    assert ending(599).delay is None and not ending(599).fatal  # unknown: transient


def test_handshake_deadline_ends_a_stuck_handshake() -> None:
    conn = _conn(handshake_timeout=5.0)
    conn.connect(100.0)
    conn.receive_frame(CONNECTED, 100.5)
    assert conn.next_deadline() == 105.0
    assert conn.on_deadline(104.9) == []
    [ending] = conn.on_deadline(105.0)
    assert isinstance(ending, Disconnect) and "authenticating" in ending.reason


def test_a_left_out_symbol_is_asked_for_again_then_reported_unserved() -> None:
    conn = _conn(subscriptions={"trades": ["SPY", "QQQ"]}, resubscribe_delays=(1.0, 2.0))
    out = []
    conn.connect(0.0)
    conn.receive_frame(CONNECTED, 0.0)
    conn.receive_frame(AUTHENTICATED, 0.0)
    conn.data_to_send()
    out = conn.receive_frame(_reply(trades=["SPY"]), 10.0)
    assert conn.missing == {"trades": ["QQQ"]} and _states(out) == ["subscribed"]
    assert conn.next_deadline() == 11.0
    assert conn.on_deadline(11.0) == []
    [again] = conn.data_to_send()
    assert orjson.loads(again) == {"action": "subscribe", "trades": ["QQQ"]}
    # the reply to our own re-send is not reported as a change
    assert _states(conn.receive_frame(_reply(trades=["SPY"]), 11.5)) == []
    assert conn.next_deadline() == 13.5
    conn.on_deadline(13.5)
    assert len(conn.data_to_send()) == 1
    out = conn.receive_frame(_reply(trades=["SPY"]), 14.0)
    assert _states(out) == ["subscription_mismatch"]
    assert conn.unserved == {("trades", "QQQ")} and conn.counters.resubscribes == 2
    # served later: repaired
    out = conn.receive_frame(_reply(trades=["SPY", "QQQ"]), 20.0)
    assert _states(out) == ["subscription_repaired", "subscription_changed"]
    assert conn.unserved == set()


def test_silence_is_probed_then_declared_stale() -> None:
    conn = _conn(stale_stream_seconds=10.0)
    _streaming(conn, 0.0)
    assert conn.next_deadline() == 10.0
    assert conn.on_deadline(10.0) == []
    [probe] = conn.data_to_send()
    assert orjson.loads(probe)["action"] == "subscribe"
    assert conn.next_deadline() == 20.0
    # a frame (the probe's reply) proves it alive: the watch starts over
    assert _states(conn.receive_frame(_reply(trades=["SPY", "QQQ"]), 12.0)) == []
    assert conn.next_deadline() == 22.0
    conn.on_deadline(22.0)
    conn.data_to_send()
    [stale] = conn.on_deadline(32.0)
    assert isinstance(stale, Disconnect) and "stale stream" in stale.reason
    assert conn.counters.stale_reconnects == 1


def test_no_data_while_the_market_is_open_is_stale_but_not_while_closed() -> None:
    conn = _conn(data_stale_seconds=8.0)
    _streaming(conn, 0.0)
    assert conn.next_deadline() == 0.0
    assert conn.on_deadline(0.0, market_open=False) == []
    assert conn.counters.stale_data_deferred == 1 and conn.next_deadline() == 2.0
    assert conn.on_deadline(2.0, market_open=True) == []
    [stale] = conn.on_deadline(10.0, market_open=True)
    assert isinstance(stale, Disconnect) and "stale data" in stale.reason


def test_crypto_never_watches_data_staleness_nor_news() -> None:
    for stream, subs in ((NEWS, {"news": ["*"]}), (OPTIONS, {"trades": ["*"]})):
        conn = _conn(stream, subs, data_stale_seconds=8.0)
        _streaming(conn, 0.0)
        assert conn.next_deadline() is None, stream.name


def test_crypto_items_decode_with_their_own_table() -> None:
    conn = _conn(CRYPTO, {"orderbooks": ["BTC/USD"]})
    _streaming(conn, 0.0)
    book = {"T": "o", "S": "BTC/USD", "t": "2026-01-05T14:30:00Z", "b": [], "a": [], "r": True}
    [items] = conn.receive_frame(orjson.dumps([book]).decode(), 1.0)
    assert items.items[0].channel == "orderbooks" and items.items[0].symbol == "BTC/USD"
    # on the stock stream `o` means nothing
    stocks = _conn()
    _streaming(stocks, 0.0)
    [skipped] = stocks.receive_frame(orjson.dumps([book]).decode(), 1.0)
    assert isinstance(skipped, Skipped) and skipped.reason == "unknown_type"


def test_a_news_item_is_keyed_by_its_article_id_and_timed_by_updated_at() -> None:
    conn = _conn(NEWS, {"news": ["*"]})
    _streaming(conn, 0.0)
    article = {
        "T": "n", "id": 24918784, "headline": "h", "symbols": ["AAPL", "MSFT"],
        "created_at": msgpack.Timestamp(1767623400, 0),
        "updated_at": msgpack.Timestamp(1767623460, 5),
    }  # fmt: skip
    [items] = conn.receive_frame(msgpack.packb([article], datetime=False), 1.0)
    [item] = items.items
    assert item.channel == "news" and item.symbol == "24918784"
    assert item.event_ts == "2026-01-05T14:31:00.000000005Z"
    assert item.payload["created_at"] == "2026-01-05T14:30:00.000000000Z"
    [skipped] = conn.receive_frame('[{"T":"n","headline":"no id"}]', 2.0)
    assert isinstance(skipped, Skipped) and skipped.reason == "invalid_item"


def test_every_stream_has_a_topic_per_channel_and_a_settings_field_for_it() -> None:
    from ray_forwarder.config import Settings

    fields = Settings.model_fields
    for stream in STREAMS.values():
        for channel in stream.channels:
            assert channel.topic.setting in fields, (stream.name, channel.name)
            assert fields[channel.topic.setting].default == channel.topic.default
        assert stream.symbols_setting is None or stream.symbols_setting in fields
        assert stream.url_setting in fields


FRAME_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)
ITEMS = st.fixed_dictionaries(
    {"T": st.sampled_from(["t", "q", "b", "o", "n", "success", "subscription", "error", "zz"])},
    optional={
        "S": st.text(max_size=12) | st.integers(),
        "t": st.text(max_size=30) | st.integers(),
        "id": st.integers() | st.text(max_size=5) | st.booleans(),
        "updated_at": st.text(max_size=30),
        "msg": st.sampled_from(["connected", "authenticated", "x"]),
        "code": st.integers(),
        "trades": st.lists(st.text(max_size=5), max_size=3),
        "p": FRAME_VALUES,
    },
)


@settings(max_examples=150, deadline=None)
@given(
    stream=st.sampled_from(list(STREAMS.values())),
    frames=st.lists(
        st.lists(ITEMS, max_size=4).map(json.dumps) | st.binary(max_size=40) | st.text(max_size=40),
        max_size=6,
    ),
)
def test_any_frames_in_any_state_never_raise_and_end_at_most_once(stream, frames) -> None:
    conn = _conn(stream, {stream.default_channels[0]: ["*"]}, stale_stream_seconds=5.0)
    conn.connect(0.0)
    now = 0.0
    for frame in frames:
        now += 1.0
        out = conn.receive_frame(frame, now)
        endings = [o for o in out if isinstance(o, Disconnect)]
        assert len(endings) <= 1 and (not endings or out[-1] is endings[0])
        assert all(isinstance(o, Items | Skipped | Report | Disconnect) for o in out)
        conn.data_to_send()
        deadline = conn.next_deadline()
        if deadline is not None:
            conn.on_deadline(deadline)
        if conn.state is State.CLOSED:
            conn.connect(now)
