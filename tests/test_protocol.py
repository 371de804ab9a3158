"""The sans-I/O protocol layer: every message type in JSON and msgpack, bad input, codes."""

from __future__ import annotations

import msgpack
import orjson
import pytest

from ray_forwarder.alpaca import (
    Authenticated,
    Connected,
    DataItem,
    ErrorAction,
    ServerError,
    Skipped,
    Subscription,
    Success,
    classify_error,
    decode_frame,
    describe_error,
    encode_auth,
    encode_subscribe,
    encode_unsubscribe,
    missing_from_subscription,
)
from ray_forwarder.alpaca.channels import CHANNEL_BY_TYPE

TS = "2026-01-05T14:30:01.123456789Z"
TS_MSGPACK = msgpack.Timestamp(1767623401, 123456789)

ITEMS = {
    "t": {"T": "t", "S": "SPY", "i": 7, "x": "V", "p": 470.5, "s": 100, "c": ["@"], "z": "B"},
    "q": {
        "T": "q", "S": "SPY", "ax": "V", "ap": 470.6, "as": 2, "bx": "V", "bp": 470.4,
        "bs": 3, "c": ["R"], "z": "B",
    },
    "b": {"T": "b", "S": "SPY", "o": 1.0, "h": 2.0, "l": 0.5, "c": 1.5, "v": 10, "vw": 1.2, "n": 3},
    "u": {"T": "u", "S": "SPY", "o": 1.0, "h": 2.0, "l": 0.5, "c": 1.6, "v": 12, "vw": 1.2, "n": 4},
    "d": {"T": "d", "S": "SPY", "o": 1.0, "h": 2.0, "l": 0.5, "c": 1.5, "v": 99, "vw": 1.2, "n": 9},
    "s": {"T": "s", "S": "SPY", "sc": "H", "sm": "Halted", "rc": "T12", "rm": "News", "z": "B"},
    "l": {"T": "l", "S": "SPY", "u": 480.0, "d": 460.0, "i": "B", "z": "B"},
    "c": {
        "T": "c", "S": "SPY", "x": "V", "oi": 7, "op": 470.5, "os": 100, "oc": ["@"], "ci": 8,
        "cp": 470.4, "cs": 100, "cc": ["@"], "z": "B",
    },
    "x": {"T": "x", "S": "SPY", "i": 7, "x": "V", "p": 470.5, "s": 100, "a": "C", "z": "B"},
    "i": {"T": "i", "S": "SPY", "p": 470.0, "z": "B"},
}  # fmt: skip


def _json_frame(*messages: dict) -> str:
    return orjson.dumps(list(messages)).decode()


def _msgpack_frame(*messages: dict) -> bytes:
    return msgpack.packb(list(messages), datetime=False)


@pytest.mark.parametrize("code", sorted(ITEMS))
def test_every_item_type_decodes_from_json(code: str) -> None:
    item = {**ITEMS[code], "t": TS}
    [event] = decode_frame(_json_frame(item))
    assert isinstance(event, DataItem)
    assert event.channel == CHANNEL_BY_TYPE[code]
    assert event.symbol == "SPY"
    assert event.event_ts == TS
    assert event.payload == item


@pytest.mark.parametrize("code", sorted(ITEMS))
def test_every_item_type_decodes_from_msgpack_with_timestamp_ext(code: str) -> None:
    [event] = decode_frame(_msgpack_frame({**ITEMS[code], "t": TS_MSGPACK}))
    assert isinstance(event, DataItem)
    assert event.channel == CHANNEL_BY_TYPE[code]
    assert event.event_ts == TS
    assert event.payload == {**ITEMS[code], "t": TS}  # rendered as the JSON string


def test_json_timestamps_keep_the_original_string_and_pad_event_ts() -> None:
    [event] = decode_frame(_json_frame({**ITEMS["t"], "t": "2021-02-22T15:51:44.208Z"}))
    assert isinstance(event, DataItem)
    assert event.payload["t"] == "2021-02-22T15:51:44.208Z"
    assert event.event_ts == "2021-02-22T15:51:44.208000000Z"


def test_offset_timestamps_are_converted_to_utc() -> None:
    [event] = decode_frame(_json_frame({**ITEMS["t"], "t": "2021-02-22T10:51:44.5-05:00"}))
    assert isinstance(event, DataItem)
    assert event.event_ts == "2021-02-22T15:51:44.500000000Z"


@pytest.mark.parametrize("encode", [_json_frame, _msgpack_frame])
def test_control_messages(encode) -> None:
    frame = encode(
        {"T": "success", "msg": "connected"},
        {"T": "success", "msg": "authenticated"},
        {"T": "success", "msg": "something new"},
        {"T": "subscription", "trades": ["SPY"], "quotes": [], "corrections": ["SPY"]},
        {"T": "error", "code": 406, "msg": "connection limit exceeded"},
    )
    events = decode_frame(frame)
    assert events == [
        Connected(),
        Authenticated(),
        Success("something new"),
        Subscription({"trades": ["SPY"], "quotes": [], "corrections": ["SPY"]}),
        ServerError(406, "connection limit exceeded"),
    ]


def test_a_frame_mixes_data_and_control_in_order() -> None:
    events = decode_frame(_json_frame({**ITEMS["t"], "t": TS}, {"T": "error", "code": 407}))
    assert [type(e) for e in events] == [DataItem, ServerError]


@pytest.mark.parametrize(
    "frame",
    ["not json", "{", '{"T":"t"}', "42", b"\xc1\xc1", msgpack.packb({"T": "t"}), b""],
)
def test_malformed_frames_are_skipped_not_raised(frame) -> None:
    [event] = decode_frame(frame)
    assert isinstance(event, Skipped)
    assert event.reason == "malformed_frame"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"T": "zz", "S": "SPY"}, "unknown_type"),
        ({"T": 5}, "unknown_type"),
        ({"S": "SPY"}, "unknown_type"),
        ("just a string", "invalid_item"),
        ({"T": "t", "t": TS}, "invalid_item"),  # no symbol
        ({"T": "q", "S": "SPY"}, "invalid_item"),  # no timestamp
        ({"T": "b", "S": "SPY", "t": "yesterday"}, "bad_timestamp"),
        ({"T": "error", "msg": "no code"}, "invalid_item"),
    ],
)
def test_bad_items_are_skipped_and_the_rest_of_the_frame_survives(message, reason) -> None:
    good = {**ITEMS["t"], "t": TS}
    events = decode_frame(_json_frame(message, good))
    assert isinstance(events[0], Skipped)
    assert events[0].reason == reason
    assert isinstance(events[1], DataItem)


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (400, ErrorAction.FATAL),
        (401, ErrorAction.RECONNECT),
        (402, ErrorAction.FATAL),
        (403, ErrorAction.IGNORE),
        (404, ErrorAction.RECONNECT),
        (405, ErrorAction.FATAL),
        (406, ErrorAction.RECONNECT_SLOW),
        (407, ErrorAction.RECONNECT),
        (409, ErrorAction.FATAL),
        (410, ErrorAction.FATAL),
        (500, ErrorAction.RECONNECT),
        (599, ErrorAction.RECONNECT),
    ],
)
def test_error_classification(code: int, action: ErrorAction) -> None:
    assert classify_error(code) is action
    assert str(code) in describe_error(code)


def test_encoders() -> None:
    assert orjson.loads(encode_auth("k", "s")) == {"action": "auth", "key": "k", "secret": "s"}
    sub = orjson.loads(encode_subscribe({"trades": ["SPY"], "bars": ["*"]}))
    assert sub == {"action": "subscribe", "trades": ["SPY"], "bars": ["*"]}
    unsub = orjson.loads(encode_unsubscribe({"quotes": ["QQQ"]}))
    assert unsub == {"action": "unsubscribe", "quotes": ["QQQ"]}
    with pytest.raises(ValueError, match="unknown channel"):
        encode_subscribe({"nonsense": ["SPY"]})


def test_subscription_verification() -> None:
    reply = Subscription({"trades": ["SPY"], "bars": ["*"]})
    asked = {"trades": ["SPY", "QQQ"], "bars": ["SPY", "QQQ"], "quotes": ["SPY"]}
    assert missing_from_subscription(asked, reply) == {"trades": ["QQQ"], "quotes": ["SPY"]}
