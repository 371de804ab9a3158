"""The Kafka record envelope (contract v1) and how records are built on the hot path.

`Envelope` is the pydantic model that documents the contract and produces the JSON Schema
shipped in `schemas/`; the hot path builds plain dicts with the same fields and serialises
them with orjson, because validating a model per event would cost more than everything
else the forwarder does with it.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

import msgpack
import orjson
from pydantic import BaseModel, ConfigDict, Field

from ray_forwarder.alpaca import timestamps
from ray_forwarder.alpaca.channels import ALL_CHANNELS

ENVELOPE_VERSION = 1
Channel = Literal[ALL_CHANNELS]  # type: ignore[valid-type]


class Envelope(BaseModel):
    """One Kafka record value. Field names and meanings are the v1 contract."""

    model_config = ConfigDict(extra="forbid", title="ray-forwarder envelope v1")

    ingest_ts: str = Field(description="UTC ISO-8601 time the forwarder received the frame.")
    event_ts: str = Field(description="The item's `t`, UTC ISO-8601 with nanoseconds kept.")
    channel: Channel = Field(description="Alpaca channel name, or `status` for own events.")
    symbol: str | None = Field(description="The item's symbol; null for forwarder status.")
    seq: int = Field(ge=1, description="Strictly increasing per (channel, symbol).")
    payload: dict[str, Any] = Field(description="The original Alpaca item (or status body).")
    is_final: bool = Field(description="False for a bar that may still be revised.")
    source: Literal["alpaca", "forwarder"]
    key: str = Field(description="Dedup key: equal only for redeliveries of one event.")


def utc_now_iso() -> str:
    """Ingest time: microsecond UTC ISO-8601 with `Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def json_default(value: object) -> str:
    """orjson's hook for types it does not know (called only for those, so free on the hot
    path): a msgpack Timestamp anywhere in an item is rendered like `t`; anything else
    (bytes, ext types, ...) has no JSON form."""
    if type(value) is msgpack.Timestamp:
        try:
            return timestamps.from_msgpack(value)
        except ValueError as exc:
            raise TypeError(str(exc)) from exc
    raise TypeError(f"{type(value).__name__} has no JSON form")


def serialise_payload(payload: dict[str, Any]) -> bytes:
    """An item's JSON with sorted keys: what the dedup digest covers and what the envelope
    embeds (as an `orjson.Fragment`, so each item is serialised once).

    Raises TypeError (`orjson.JSONEncodeError`) for content JSON cannot hold: bytes,
    msgpack ext types, Timestamps no calendar can show, maps with non-string keys, nesting
    beyond 254 levels.
    """
    return orjson.dumps(payload, default=json_default, option=orjson.OPT_SORT_KEYS)


def _digest(body: bytes) -> str:
    """A short digest of an item's full content (`serialise_payload`: keys sorted, so field
    order is irrelevant). Two different events never share a digest in practice (64 bits),
    and a redelivered event always has the same one, which is what the dedup key needs."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def dedup_key(channel: str, symbol: str, event_ts: str, payload: dict[str, Any]) -> str:
    return item_dedup_key(channel, symbol, event_ts, serialise_payload(payload))


def item_dedup_key(channel: str, symbol: str, event_ts: str, body: bytes) -> str:
    """The dedup key from an item's `serialise_payload` bytes (contract: see DESIGN.md)."""
    return f"{channel}:{symbol}:{event_ts}:{_digest(body)}"


def final_bar_key(symbol: str, bar_ts: str) -> str:
    """The key of the one `is_final: true` record per (symbol, bar start)."""
    return f"bars:{symbol}:{bar_ts}:final"


def encode_envelope(
    *,
    ingest_ts: str,
    event_ts: str,
    channel: str,
    symbol: str | None,
    seq: int,
    payload: dict[str, Any] | orjson.Fragment,
    is_final: bool,
    source: str,
    key: str,
) -> bytes:
    return orjson.dumps(
        {
            "ingest_ts": ingest_ts,
            "event_ts": event_ts,
            "channel": channel,
            "symbol": symbol,
            "seq": seq,
            "payload": payload,
            "is_final": is_final,
            "source": source,
            "key": key,
        }
    )


def json_schema() -> dict[str, Any]:
    """The envelope's JSON Schema, as shipped in `schemas/envelope.v1.json`."""
    schema = Envelope.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
