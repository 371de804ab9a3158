"""The trading stream's sans-I/O protocol and its pipeline: no sockets, no Kafka, no Ray."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_forwarder.alpaca.events import DataItem, Skipped
from ray_forwarder.alpaca.streams import STREAMS
from ray_forwarder.alpaca.trading import (
    Authorized,
    AuthRejected,
    Listening,
    TradingProtocol,
    TradingState,
    Unauthorized,
    decode_trade_update,
)
from ray_forwarder.config import Settings
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.pipeline import EventPipeline
from ray_forwarder.core.topics import topic_map
from ray_forwarder_dev.sim.orders import OrderFlow

SECRET = "s3cr3t-value"
ORDER_ID = "61e69015-8549-4bfd-b9c3-01e75843f47d"
TS = "2026-01-05T14:30:01.123456789Z"
INGEST = "2026-01-05T14:30:02.000000Z"
STREAM = STREAMS["trade_updates"]
TOPICS = topic_map(Settings(), STREAM)
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _order(**changes: Any) -> dict[str, Any]:
    order = {
        "id": ORDER_ID,
        "client_order_id": "eb9e2aaa-f71a-4f51-b5b4-52a6c565dad4",
        "symbol": "AAPL",
        "qty": "10",
        "filled_qty": "4",
        "status": "partially_filled",
        "updated_at": "2026-01-05T09:30:01.000000-05:00",
    }
    order.update(changes)
    return order


def _fill(**changes: Any) -> dict[str, Any]:
    data = {
        "event": "partial_fill",
        "execution_id": "8d0f2bd3-2d8e-4a7f-a1f0-49a6b2c8dcfd",
        "price": "179.08",
        "qty": "4",
        "position_qty": "4",
        "timestamp": TS,
        "order": _order(),
    }
    data.update(changes)
    return data


def _frame(stream: str, data: object) -> bytes:
    return orjson.dumps({"stream": stream, "data": data})


def _streaming(binary: bool = True, **kwargs: Any) -> TradingProtocol:
    conn = TradingProtocol("key-id", SECRET, **kwargs)
    conn.start()
    conn.receive_frame(_frame("authorization", {"status": "authorized", "action": "auth"}))
    events = conn.receive_frame(_frame("listening", {"streams": ["trade_updates"]}))
    assert events == [Listening(["trade_updates"], [])]
    conn.data_to_send()
    return conn


# --- the handshake ------------------------------------------------------------------------


def test_handshake_sends_auth_then_listen_and_streams() -> None:
    conn = TradingProtocol("key-id", SECRET)
    assert conn.state is TradingState.CONNECTING
    conn.start()
    [auth] = conn.data_to_send()
    assert not auth.binary
    assert orjson.loads(auth.payload) == {"action": "auth", "key": "key-id", "secret": SECRET}
    assert conn.state is TradingState.AUTHENTICATING
    reply = _frame("authorization", {"status": "authorized", "action": "authenticate"})
    assert conn.receive_frame(reply) == [Authorized()]
    [listen] = conn.data_to_send()
    assert orjson.loads(listen.payload) == {
        "action": "listen",
        "data": {"streams": ["trade_updates"]},
    }
    assert conn.state is TradingState.LISTENING
    events = conn.receive_frame(_frame("listening", {"streams": ["trade_updates"]}))
    assert events == [Listening(["trade_updates"], [])]
    assert conn.state is TradingState.STREAMING


def test_the_older_authenticate_form_is_available() -> None:
    conn = TradingProtocol("key-id", SECRET, auth_style="authenticate")
    conn.start()
    [auth] = conn.data_to_send()
    assert orjson.loads(auth.payload) == {
        "action": "authenticate",
        "data": {"key_id": "key-id", "secret_key": SECRET},
    }


def test_refused_authorization_closes_the_connection() -> None:
    conn = TradingProtocol("key-id", SECRET)
    conn.start()
    refusal = {
        "action": "authenticate",
        "message": "access key verification failed",
        "status": "unauthorized",
    }
    [event] = conn.receive_frame(_frame("authorization", refusal))
    assert isinstance(event, AuthRejected)
    assert "access key verification failed" in event.message
    assert conn.state is TradingState.CLOSED
    assert conn.data_to_send()[1:] == []  # nothing but the auth already queued


def test_unauthorized_listen_after_auth_asks_for_a_reconnect() -> None:
    conn = _streaming()
    [event] = conn.receive_frame(
        _frame("authorization", {"status": "unauthorized", "action": "listen"})
    )
    assert isinstance(event, Unauthorized)


def test_a_listening_reply_without_trade_updates_reports_it_missing() -> None:
    conn = TradingProtocol("key-id", SECRET)
    conn.start()
    conn.receive_frame(_frame("authorization", {"status": "authorized"}))
    assert conn.receive_frame(_frame("listening", {"streams": []})) == [
        Listening([], ["trade_updates"])
    ]
    conn.data_to_send()
    conn.listen()  # the re-send: the whole set again
    [again] = conn.data_to_send()
    assert orjson.loads(again.payload)["data"] == {"streams": ["trade_updates"]}


def test_secrets_stay_out_of_reprs() -> None:
    conn = TradingProtocol("key-id", SECRET)
    conn.start()
    assert SECRET not in repr(conn)
    from ray_forwarder.alpaca.streams import TRADE_UPDATES
    from ray_forwarder.alpaca.trading import TradingConnection

    assert SECRET not in repr(TradingConnection(TRADE_UPDATES, "key-id", SECRET))


# --- frames ---------------------------------------------------------------------------------


@pytest.mark.parametrize("as_binary", [True, False], ids=["binary(paper)", "text(live)"])
def test_trade_updates_decode_from_binary_and_text_frames(as_binary: bool) -> None:
    conn = _streaming()
    raw = _frame("trade_updates", _fill())
    [update] = conn.receive_frame(raw if as_binary else raw.decode())
    assert isinstance(update, DataItem)
    assert (update.channel, update.symbol) == ("trade_updates", ORDER_ID)
    assert update.event_ts == TS
    assert update.payload == _fill()


def test_msgpack_when_negotiated() -> None:
    conn = TradingProtocol("key-id", SECRET, wire_format="msgpack")
    assert conn.upgrade_headers() == {"Content-Type": "application/msgpack"}
    conn.start()
    [auth] = conn.data_to_send()
    assert auth.binary and msgpack.unpackb(auth.payload)["action"] == "auth"
    conn.receive_frame(msgpack.packb({"stream": "authorization", "data": {"status": "authorized"}}))
    conn.receive_frame(
        msgpack.packb({"stream": "listening", "data": {"streams": ["trade_updates"]}})
    )
    [update] = conn.receive_frame(msgpack.packb({"stream": "trade_updates", "data": _fill()}))
    assert isinstance(update, DataItem)


def test_event_time_falls_back_to_the_order_and_keeps_offsets_exact() -> None:
    data = _fill(event="new")
    del data["timestamp"]
    update = decode_trade_update(data)
    assert isinstance(update, DataItem)
    assert update.event_ts == "2026-01-05T14:30:01.000000000Z"  # -05:00 converted


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"order": _order()}, "invalid_item"),  # no event
        (_fill(event=7), "invalid_item"),
        (_fill(event=""), "invalid_item"),
        (_fill(order=None), "invalid_item"),
        (_fill(order=_order(id=None)), "invalid_item"),
        (_fill(order=_order(id="a:b")), "invalid_item"),
        (_fill(order=_order(id="x" * 65)), "invalid_item"),
        (_fill(order=_order(symbol="BAD SYMBOL")), "bad_symbol"),
        (_fill(price=[1]), "bad_field_type"),
        (_fill(execution_id=5), "bad_field_type"),
        (_fill(timestamp="yesterday"), "bad_timestamp"),
        (_fill(timestamp=None, order=_order(updated_at=None)), "bad_timestamp"),
    ],
)
def test_invalid_trade_updates_are_counted_skips(data: dict[str, Any], reason: str) -> None:
    conn = _streaming()
    [event] = conn.receive_frame(_frame("trade_updates", data))
    assert isinstance(event, Skipped) and event.reason == reason


@pytest.mark.parametrize(
    "frame",
    [
        b'{"stream":"trade_updates","data":{"event":',
        b'[{"stream":"trade_updates"}]',
        b'{"data":{"event":"fill"}}',
        b'{"stream":"trade_updates","data":[]}',
        b"\xff\xfe",
        "not json",
    ],
)
def test_malformed_frames_are_skipped(frame: bytes | str) -> None:
    conn = _streaming()
    [event] = conn.receive_frame(frame)
    assert isinstance(event, Skipped) and event.reason == "malformed_frame"


def test_unknown_streams_are_skipped_and_unknown_events_forwarded() -> None:
    conn = _streaming()
    [skip] = conn.receive_frame(_frame("account_updates", {}))
    assert isinstance(skip, Skipped) and skip.reason == "unknown_type"
    [update] = conn.receive_frame(_frame("trade_updates", _fill(event="brand_new_event")))
    assert isinstance(update, DataItem)
    assert conn.unknown_events == {"brand_new_event": 1}
    assert conn.receive_frame(b"\x01") == [] and conn.heartbeats == 1


def test_multi_leg_orders_without_a_symbol_are_kept() -> None:
    update = decode_trade_update(_fill(order=_order(symbol="")))
    assert isinstance(update, DataItem) and update.symbol == ORDER_ID


# --- the pipeline -----------------------------------------------------------------------------


def _pipeline() -> EventPipeline:
    return EventPipeline(
        TOPICS, DedupCache(900, 10_000), BarFinalizer(35.0), name="test", stream=STREAM
    )


def _updates(*datas: dict[str, Any]) -> list[DataItem]:
    out = []
    for data in datas:
        update = decode_trade_update(copy.deepcopy(data))
        assert isinstance(update, DataItem)
        out.append(update)
    return out


def test_records_are_keyed_by_order_and_numbered_per_order() -> None:
    other = "0b6a5ab2-8c7b-4b8e-9e1a-0b0c6f8d7f10"
    pipeline = _pipeline()
    records = pipeline.process(
        _updates(
            _fill(event="new"),
            _fill(order=_order(id=other, symbol="SPY")),
            _fill(),
            _fill(event="fill", execution_id="e2", qty="6", order=_order(filled_qty="10")),
        ),
        INGEST,
        0.0,
    )
    envelopes = [orjson.loads(r.value) for r in records]
    assert [r.key for r in records] == [ORDER_ID.encode(), other.encode(), *[ORDER_ID.encode()] * 2]
    assert {r.topic for r in records} == {"alpaca.trade_updates.v1"}
    assert [e["seq"] for e in envelopes] == [1, 1, 2, 3]
    assert all(e["is_final"] and e["channel"] == "trade_updates" for e in envelopes)
    assert envelopes[0]["key"].startswith(f"trade_updates:{ORDER_ID}:{TS}:")


def test_only_the_very_same_event_is_deduplicated() -> None:
    pipeline = _pipeline()
    first = _fill()
    second = _fill(execution_id="another-execution")  # same qty, price and timestamp
    records = pipeline.process(_updates(first, first, second, first), INGEST, 0.0)
    assert len(records) == 2
    assert pipeline.counters.deduplicated["trade_updates"] == 2
    reordered = dict(reversed(list(first.items())))  # the same event, keys in another order
    assert pipeline.process(_updates(reordered), INGEST, 1.0) == []


def test_a_simulated_lifecycle_keeps_every_distinct_event() -> None:
    events = OrderFlow().next_events(500)
    pipeline = _pipeline()
    records = pipeline.process(_updates(*events), INGEST, 0.0)
    assert len(records) == 500
    assert pipeline.process(_updates(*events[:50]), INGEST, 1.0) == []  # redelivered
    last: dict[bytes, int] = {}
    for record in records:
        seq = orjson.loads(record.value)["seq"]
        assert seq > last.get(record.key, 0)
        last[record.key] = seq


# --- properties: network input never raises; junk never disturbs valid events -----------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
field_names = st.sampled_from(
    ["event", "order", "id", "symbol", "timestamp", "execution_id", "price", "qty", "updated_at"]
)
mutations = st.dictionaries(field_names, json_values, max_size=3)


@HYPOTHESIS
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_random_frames_never_raise(frame: bytes | str) -> None:
    conn = _streaming()
    for event in conn.receive_frame(frame):
        assert isinstance(
            event, DataItem | Skipped | Listening | Authorized | AuthRejected | Unauthorized
        )


@HYPOTHESIS
@given(mutations, mutations, st.integers(0, 20))
def test_mutated_updates_are_forwarded_or_skipped_never_raise(
    top: dict[str, Any], in_order: dict[str, Any], pick: int
) -> None:
    events = OrderFlow().next_events(21)
    valid = events[pick]
    broken = copy.deepcopy(valid)
    broken.update(top)
    if isinstance(broken.get("order"), dict):
        broken["order"].update(in_order)
    conn = _streaming()
    out = []
    for data in (events[0], broken, events[1]):
        out += conn.receive_frame(_frame("trade_updates", data))
    assert len(out) == 3
    assert all(isinstance(e, DataItem | Skipped) for e in out)
    updates = [e for e in out if isinstance(e, DataItem)]
    pipeline = _pipeline()
    records = pipeline.process(updates, INGEST, 0.0)  # never raises
    skipped = sum(pipeline.counters.skipped.values())
    assert len(records) + skipped + pipeline.counters.deduplicated.total() == len(updates)
    # the valid neighbours always come through
    assert out[0] == _updates(events[0])[0] and out[2] == _updates(events[1])[0]


# --- the StreamConnection: timers, repair, fatal refusal (no sockets) ---------------------------


def _connection(**timing: Any):
    from ray_forwarder.alpaca.connection import Timing
    from ray_forwarder.alpaca.streams import TRADE_UPDATES
    from ray_forwarder.alpaca.trading import TradingConnection

    return TradingConnection(TRADE_UPDATES, "key-id", SECRET, timing=Timing(**timing), url="ws://x")


def test_connection_reports_the_handshake_and_hands_over_items() -> None:
    from ray_forwarder.alpaca.connection import Items, Report, State

    conn = _connection()
    conn.connect(0.0)
    [auth] = conn.data_to_send()
    assert isinstance(auth, str) and orjson.loads(auth)["action"] == "auth"  # a text frame
    out = conn.receive_frame(_frame("authorization", {"status": "authorized"}), 0.1)
    assert [o.state for o in out if isinstance(o, Report)] == ["connected", "authenticated"]
    [listen] = conn.data_to_send()
    assert orjson.loads(listen)["action"] == "listen"
    out = conn.receive_frame(_frame("listening", {"streams": ["trade_updates"]}), 0.2)
    assert [o.state for o in out] == ["subscribed"] and conn.state is State.STREAMING
    [items] = conn.receive_frame(_frame("trade_updates", _fill()), 0.3)
    assert isinstance(items, Items) and items.items[0].symbol == ORDER_ID
    assert conn.last_data == 0.3


def test_connection_refused_authorization_is_fatal_and_names_the_settings() -> None:
    from ray_forwarder.alpaca.connection import Disconnect

    conn = _connection()
    conn.connect(0.0)
    refusal = {
        "status": "unauthorized",
        "action": "auth",
        "message": "access key verification failed",
    }
    out = conn.receive_frame(_frame("authorization", refusal), 0.1)
    [end] = [o for o in out if isinstance(o, Disconnect)]
    assert end.fatal and "ALPACA_TRADING_ENV" in end.reason and SECRET not in end.reason


def test_connection_reasks_for_a_stream_left_out_then_reports_it_unserved() -> None:
    from ray_forwarder.alpaca.connection import Report

    conn = _connection(resubscribe_delays=(1.0, 2.0))
    conn.connect(0.0)
    conn.receive_frame(_frame("authorization", {"status": "authorized"}), 0.0)
    conn.data_to_send()
    out = conn.receive_frame(_frame("listening", {"streams": []}), 0.0)
    assert out == [Report("subscribed", {"streams": [], "missing": {"listen": ["trade_updates"]}})]
    reports: list[str] = []
    now = 0.0
    for _ in range(2):
        now = conn.next_deadline()
        assert conn.on_deadline(now) == []
        [again] = conn.data_to_send()  # the whole set again
        assert orjson.loads(again)["data"]["streams"] == ["trade_updates"]
        out = conn.receive_frame(_frame("listening", {"streams": []}), now + 0.1)
        reports += [o.state for o in out if isinstance(o, Report)]
    assert reports == ["subscription_mismatch"]
    assert conn.unserved == {("listen", "trade_updates")} and conn.counters.resubscribes == 2
    out = conn.receive_frame(_frame("listening", {"streams": ["trade_updates"]}), now + 1)
    assert "subscription_repaired" in [o.state for o in out if isinstance(o, Report)]
    assert not conn.unserved and not conn.missing


def test_connection_probes_a_silent_stream_then_declares_it_stale() -> None:
    from ray_forwarder.alpaca.connection import Disconnect

    conn = _connection(stale_stream_seconds=30.0)
    conn.connect(0.0)
    conn.receive_frame(_frame("authorization", {"status": "authorized"}), 0.0)
    conn.receive_frame(_frame("listening", {"streams": ["trade_updates"]}), 0.0)
    conn.data_to_send()
    assert conn.next_deadline() == 30.0
    assert conn.on_deadline(30.0) == []
    [probe] = conn.data_to_send()
    assert orjson.loads(probe)["action"] == "listen"
    assert conn.receive_frame(_frame("listening", {"streams": ["trade_updates"]}), 31.0) == []
    assert conn.next_deadline() == 61.0
    conn.on_deadline(61.0)
    conn.data_to_send()
    [end] = conn.on_deadline(91.0)
    assert isinstance(end, Disconnect) and not end.fatal and "stale stream" in end.reason


def test_connection_handshake_timeout_reconnects() -> None:
    from ray_forwarder.alpaca.connection import Disconnect

    conn = _connection(handshake_timeout=15.0)
    conn.connect(0.0)
    [end] = conn.on_deadline(15.0)
    assert isinstance(end, Disconnect) and not end.fatal
