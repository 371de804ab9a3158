"""Encode client actions and decode server frames. Pure functions: no sockets here.

Every server message is an array of maps. A frame that cannot be parsed, an item of an
unknown type or an item without the fields the forwarder needs becomes a `Skipped` event
instead of an exception, so one bad frame never takes the session down.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgpack
import orjson

from ray_forwarder.protocol import timestamps
from ray_forwarder.protocol.channels import CHANNEL_BY_TYPE, MARKET_DATA_CHANNELS
from ray_forwarder.protocol.events import (
    Authenticated,
    Connected,
    DataItem,
    Event,
    ServerError,
    Skipped,
    Subscription,
    Success,
)

MSGPACK_CONTENT_TYPE = "application/msgpack"
_DETAIL_LIMIT = 120


# --- client -> server ------------------------------------------------------------------


def encode_auth(key: str, secret: str) -> str:
    return orjson.dumps({"action": "auth", "key": key, "secret": secret}).decode()


def encode_subscribe(channels: Mapping[str, Iterable[str]]) -> str:
    return _encode_subscription_action("subscribe", channels)


def encode_unsubscribe(channels: Mapping[str, Iterable[str]]) -> str:
    return _encode_subscription_action("unsubscribe", channels)


def _encode_subscription_action(action: str, channels: Mapping[str, Iterable[str]]) -> str:
    unknown = [name for name in channels if name not in MARKET_DATA_CHANNELS]
    if unknown:
        raise ValueError(f"cannot subscribe to unknown channel(s): {', '.join(unknown)}")
    message: dict[str, Any] = {"action": action}
    message.update({name: list(symbols) for name, symbols in channels.items()})
    return orjson.dumps(message).decode()


def connection_headers(wire_format: str) -> dict[str, str]:
    """Headers for the WebSocket upgrade; msgpack is chosen by Content-Type."""
    return {"Content-Type": MSGPACK_CONTENT_TYPE} if wire_format == "msgpack" else {}


# --- server -> client ------------------------------------------------------------------


def decode_frame(frame: bytes | str) -> list[Event]:
    """Decode one WebSocket frame (text = JSON, binary = msgpack) into events, in order."""
    try:
        if isinstance(frame, str):
            messages = orjson.loads(frame)
        else:
            messages = msgpack.unpackb(frame, raw=False, timestamp=0, strict_map_key=False)
    except Exception as exc:  # every parser error means the same thing here
        return [Skipped("malformed_frame", f"{type(exc).__name__}: {_clip(frame)}")]
    if not isinstance(messages, list):
        return [Skipped("malformed_frame", f"top level is not an array: {_clip(frame)}")]
    return [decode_message(message) for message in messages]


def decode_message(message: object) -> Event:
    """Decode one element of a server array."""
    if not isinstance(message, dict):
        return Skipped("invalid_item", f"item is not a map: {_clip(message)}")
    kind = message.get("T")
    channel = CHANNEL_BY_TYPE.get(kind) if isinstance(kind, str) else None
    if channel is not None:
        return _decode_item(channel, message)
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


def _decode_item(channel: str, item: dict[str, Any]) -> Event:
    symbol = item.get("S")
    raw_ts = item.get("t")
    if not isinstance(symbol, str) or not symbol or raw_ts is None:
        return Skipped("invalid_item", f"{channel} item without S or t: {_clip(item)}")
    try:
        event_ts = timestamps.canonical(raw_ts)
    except ValueError:
        return Skipped("invalid_item", f"{channel} item with a bad t: {_clip(item)}")
    if not isinstance(raw_ts, str):
        item["t"] = event_ts  # msgpack Timestamp -> the string JSON consumers expect
    return DataItem(channel, symbol, event_ts, item)


def _clip(value: object) -> str:
    text = repr(value)
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
