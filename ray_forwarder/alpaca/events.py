"""Typed events decoded from server frames. Plain dataclasses: cheap on the hot path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class DataItem:
    """One market-data item (trade, quote, bar, ...) as it came, with its channel resolved."""

    channel: str
    symbol: str
    event_ts: str  # canonical UTC RFC 3339 with nine fractional digits
    payload: dict[str, Any]  # the original item, timestamps rendered as strings


@dataclass(slots=True)
class Connected:
    """The server's greeting, `[{"T":"success","msg":"connected"}]`."""


@dataclass(slots=True)
class Authenticated:
    """Auth accepted."""


@dataclass(slots=True)
class Success:
    """Any other success message (kept so nothing is silently dropped)."""

    msg: str


@dataclass(slots=True)
class Subscription:
    """The server's view of the full current subscription, channel -> symbols."""

    channels: dict[str, list[str]] = field(default_factory=dict)


@dataclass(slots=True)
class ServerError:
    """`[{"T":"error","code":N,"msg":...}]`."""

    code: int
    msg: str


@dataclass(slots=True)
class Skipped:
    """Something in a frame that could not be used; counted and logged by the caller."""

    #: decode: "malformed_frame" | "unknown_type" | "invalid_item" | "bad_symbol" |
    #: "bad_timestamp" | "bad_field_type"; pipeline: "unencodable" | "non_finite_number" |
    #: "unsubscribed_symbol"
    reason: str
    detail: str


Event = DataItem | Connected | Authenticated | Success | Subscription | ServerError | Skipped
