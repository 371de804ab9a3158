"""Encode client actions and decode server frames. Pure functions: no sockets here.

Every server message is an array of maps. A frame that cannot be parsed, an item of an
unknown type, an item without the fields the forwarder needs, with a symbol that is not a
feed symbol (`bad_symbol`), a `t` that is not a real instant (`bad_timestamp`) or a
documented field of the wrong type (`bad_field_type`) becomes a `Skipped` event instead of
an exception: one bad item costs only itself, never its frame-mates or the session.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack
import orjson

from ray_forwarder.alpaca import timestamps
from ray_forwarder.alpaca.channels import CHANNEL_BY_TYPE, MARKET_DATA_CHANNELS
from ray_forwarder.alpaca.events import (
    Authenticated,
    Connected,
    DataItem,
    Event,
    ServerError,
    Skipped,
    Subscription,
    Success,
)
from ray_forwarder.alpaca.items import FIELD_CHECKS, is_symbol
from ray_forwarder.alpaca.streams import STOCKS, StreamDefinition

MSGPACK_CONTENT_TYPE = "application/msgpack"
_DETAIL_LIMIT = 120
#: Bounded repr for skip details: a 2 MiB string or 1000 nested arrays cost nothing here.
_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 8, 12


# --- client -> server ------------------------------------------------------------------


def encode_auth(key: str, secret: str) -> str:
    return orjson.dumps({"action": "auth", "key": key, "secret": secret}).decode()


def encode_subscribe(
    channels: Mapping[str, Iterable[str]], stream: StreamDefinition = STOCKS
) -> str:
    return _encode_subscription_action("subscribe", channels, stream)


def encode_unsubscribe(
    channels: Mapping[str, Iterable[str]], stream: StreamDefinition = STOCKS
) -> str:
    return _encode_subscription_action("unsubscribe", channels, stream)


def _encode_subscription_action(
    action: str, channels: Mapping[str, Iterable[str]], stream: StreamDefinition
) -> str:
    allowed = MARKET_DATA_CHANNELS if stream is STOCKS else stream.subscribable
    unknown = [name for name in channels if name not in allowed]
    if unknown:
        raise ValueError(f"cannot subscribe to unknown channel(s): {', '.join(unknown)}")
    message: dict[str, Any] = {"action": action}
    message.update({name: list(symbols) for name, symbols in channels.items()})
    return orjson.dumps(message).decode()


def connection_headers(wire_format: str) -> dict[str, str]:
    """Headers for the WebSocket upgrade; msgpack is chosen by Content-Type."""
    return {"Content-Type": MSGPACK_CONTENT_TYPE} if wire_format == "msgpack" else {}


# --- server -> client ------------------------------------------------------------------


def decode_frame(frame: bytes | str, stream: StreamDefinition | None = None) -> list[Event]:
    """Decode one WebSocket frame (text = JSON, binary = msgpack) into events, in order.

    `stream` names the stream whose item types apply (None: stocks)."""
    try:
        if isinstance(frame, str):
            messages = orjson.loads(frame)
        else:
            messages = msgpack.unpackb(frame, raw=False, timestamp=0, strict_map_key=False)
    except Exception as exc:  # every parser error means the same thing here
        return [Skipped("malformed_frame", f"{type(exc).__name__}: {_clip(frame)}")]
    if not isinstance(messages, list):
        return [Skipped("malformed_frame", f"top level is not an array: {_clip(frame)}")]
    events: list[Event] = []
    append = events.append
    by_type = CHANNEL_BY_TYPE if stream is None else stream.channel_by_type
    by_symbol = stream is None or stream.key_field == "S"
    for message in messages:
        try:
            # Hot path: a data item (a map whose `T` names an item type of the stream, keyed
            # by `S`) goes straight to `_decode_item`; everything else takes
            # `decode_message`'s general route.
            kind = message.get("T") if type(message) is dict else None
            channel = by_type.get(kind) if by_symbol and type(kind) is str else None
            if channel is not None:
                append(_decode_item(channel, kind, message))  # type: ignore[arg-type]
            else:
                append(decode_message(message, stream))
        except Exception as exc:  # a defect here must cost one item, not the session
            append(Skipped("invalid_item", f"{type(exc).__name__}: {_clip(message)}"))
    return events


def decode_message(message: object, stream: StreamDefinition | None = None) -> Event:
    """Decode one element of a server array (`stream`: as in `decode_frame`)."""
    if not isinstance(message, dict):
        return Skipped("invalid_item", f"item is not a map: {_clip(message)}")
    kind = message.get("T")
    by_type = CHANNEL_BY_TYPE if stream is None else stream.channel_by_type
    channel = by_type.get(kind) if isinstance(kind, str) else None
    if channel is not None:
        if stream is not None and stream.key_field != "S":
            return _decode_keyed_item(stream, channel, kind, message)
        return _decode_item(channel, kind, message)
    if kind == "success":
        msg = str(message.get("msg", ""))
        if msg == "connected":
            return Connected()
        if msg == "authenticated":
            return Authenticated()
        return Success(msg)
    if kind == "subscription":
        return Subscription(
            {
                name: [str(s) for s in value]
                for name, value in message.items()
                if name != "T" and isinstance(value, list)
            }
        )
    if kind == "error":
        code = message.get("code")
        if not isinstance(code, int):
            return Skipped("invalid_item", f"error without a numeric code: {_clip(message)}")
        return ServerError(code, str(message.get("msg", "")))
    return Skipped("unknown_type", f"T={kind!r}")


def _decode_item(channel: str, kind: str, item: dict[Any, Any]) -> Event:
    symbol = item.get("S")
    raw_ts = item.get("t")
    if symbol is None or raw_ts is None:
        return Skipped("invalid_item", f"{channel} item without S or t: {_clip(item)}")
    if not is_symbol(symbol):
        return Skipped("bad_symbol", f"{channel} item with S={_clip(symbol)}")
    try:
        event_ts = timestamps.canonical(raw_ts)
    except ValueError as exc:
        return Skipped("bad_timestamp", f"{channel} item with t={_clip(raw_ts)}: {exc}")
    check = FIELD_CHECKS.get(kind)
    wrong = None if check is None else check(item)
    if wrong is not None:
        return Skipped(
            "bad_field_type", f"{channel} item with {wrong}={_clip(item[wrong])}: {_clip(item)}"
        )
    if type(raw_ts) is not str:
        item["t"] = event_ts  # msgpack Timestamp -> the string JSON consumers expect
    return DataItem(channel, symbol, event_ts, item)


def _decode_keyed_item(
    stream: StreamDefinition, channel: str, kind: str, item: dict[Any, Any]
) -> Event:
    """An item keyed by another field than `S` (news: `id`), timed by `stream.time_field`."""
    key, raw_ts = item.get(stream.key_field), item.get(stream.time_field)
    if raw_ts is None:  # an article never edited may carry only `created_at`
        raw_ts = item.get("created_at")
    if key is None or raw_ts is None or type(key) is bool:
        return Skipped(
            "invalid_item",
            f"{channel} item without {stream.key_field} or {stream.time_field}: {_clip(item)}",
        )
    if type(key) is int:
        key = str(key)
    if not is_symbol(key):
        return Skipped("bad_symbol", f"{channel} item with {stream.key_field}={_clip(key)}")
    try:
        event_ts = timestamps.canonical(raw_ts)
    except ValueError as exc:
        return Skipped("bad_timestamp", f"{channel} item with time={_clip(raw_ts)}: {exc}")
    for name in ("created_at", "updated_at"):  # msgpack Timestamps -> strings
        value = item.get(name)
        if value is not None and type(value) is not str:
            try:
                item[name] = timestamps.canonical(value)
            except ValueError as exc:
                return Skipped("bad_timestamp", f"{channel} item with {name}: {exc}")
    return DataItem(channel, key, event_ts, item)


def _clip(value: object) -> str:
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails must not turn a skip into a crash
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= _DETAIL_LIMIT else text[:_DETAIL_LIMIT] + "..."


def missing_from_subscription(
    requested: Mapping[str, Iterable[str]], reply: Subscription
) -> dict[str, list[str]]:
    """What was asked for but is absent from the server's reply (`*` covers everything)."""
    missing: dict[str, list[str]] = {}
    for name, symbols in requested.items():
        granted = set(reply.channels.get(name, ()))
        if "*" in granted:
            continue
        lacking = [s for s in symbols if s not in granted]
        if lacking:
            missing[name] = lacking
    return missing
