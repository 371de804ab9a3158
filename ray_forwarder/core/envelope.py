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
#: Minor version of the v1 contract: 1 added the optional `backfill` marker.
ENVELOPE_MINOR_VERSION = 1
Channel = Literal[ALL_CHANNELS]  # type: ignore[valid-type]


class BackfillMarker(BaseModel):
    """Where a backfilled record came from (v1.1)."""

    model_config = ConfigDict(extra="forbid")

    gap_id: str = Field(description="The `gap_id` of the `gap` status event it fills.")
    via: Literal["rest"] = Field(description="How it was fetched: Alpaca's historical REST API.")


class Envelope(BaseModel):
    """One Kafka record value. Field names and meanings are the v1 contract."""

    model_config = ConfigDict(
        extra="forbid", title=f"ray-forwarder envelope v{ENVELOPE_VERSION}.{ENVELOPE_MINOR_VERSION}"
    )

    ingest_ts: str = Field(description="UTC ISO-8601 time the forwarder received the frame.")
    event_ts: str = Field(
        description="The item's event time, UTC ISO-8601 with nanoseconds kept: `t` for "
        "stocks, crypto and options; `updated_at` (else `created_at`) for news; "
        "`timestamp` (else `order.updated_at`) for trade_updates."
    )
    channel: Channel = Field(
        description="Alpaca channel name, or `status` for own events. The stream is told "
        "by the topic (stocks: alpaca.trades.v1, ...; crypto: alpaca.crypto.*; options: "
        "alpaca.options.*; news: alpaca.news.v1; order events: `trade_updates` on "
        "alpaca.trade_updates.v1)."
    )
    symbol: str | None = Field(
        description="The item's symbol (stocks ticker, crypto pair `BTC/USD`, OCC option "
        "contract); null for forwarder status, for news (an article names several "
        "symbols: see `payload.symbols`) and for trade_updates (see `payload.order.symbol`)."
    )
    seq: int = Field(
        ge=1,
        description="Strictly increasing per (channel, symbol) within a topic; news: per "
        "article id; trade_updates: per order id (the record key); status: per shard.",
    )
    payload: dict[str, Any] = Field(description="The original Alpaca item (or status body).")
    is_final: bool = Field(
        description="False for a record that may still be revised: minute bars (until "
        "their `is_final: true` record), daily bars, crypto order books. Trades, quotes, "
        "options, news and trade_updates are final (an edited article or the next event "
        "of an order is a new record)."
    )
    source: Literal["alpaca", "forwarder"]
    key: str = Field(
        description="Dedup key, equal only for redeliveries of one event: "
        "`channel:symbol:event_ts:digest` (digest: BLAKE2b-64 of the payload with sorted "
        "keys); news: `news:article_id:updated_at:digest`; trade_updates: "
        "`trade_updates:order_id:event_ts:digest`; a final bar: "
        "`bars:symbol:bar_ts:final`."
    )
    backfill: BackfillMarker | None = Field(
        default=None,
        description="v1.1: present only on records fetched from Alpaca's REST API to fill "
        "a gap (never on streamed ones); absent means streamed.",
    )


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


def encode_backfilled_envelope(
    *,
    ingest_ts: str,
    event_ts: str,
    channel: str,
    symbol: str,
    seq: int,
    payload: dict[str, Any] | orjson.Fragment,
    is_final: bool,
    key: str,
    gap_id: str,
) -> bytes:
    """A record fetched by backfill: a streamed record's fields plus the `backfill` marker
    (kept out of `encode_envelope`, the hot path)."""
    return orjson.dumps(
        {
            "ingest_ts": ingest_ts,
            "event_ts": event_ts,
            "channel": channel,
            "symbol": symbol,
            "seq": seq,
            "payload": payload,
            "is_final": is_final,
            "source": "alpaca",
            "key": key,
            "backfill": {"gap_id": gap_id, "via": "rest"},
        }
    )


def json_schema() -> dict[str, Any]:
    """The envelope's JSON Schema, as shipped in `schemas/envelope.v1.json`."""
    schema = Envelope.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
