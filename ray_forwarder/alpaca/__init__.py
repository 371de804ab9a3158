"""Alpaca's market-data protocol without I/O: channels, error codes, frame codec, events."""

from ray_forwarder.alpaca.channels import CHANNEL_BY_TYPE, MARKET_DATA_CHANNELS
from ray_forwarder.alpaca.codec import (
    connection_headers,
    decode_frame,
    encode_auth,
    encode_subscribe,
    encode_unsubscribe,
    missing_from_subscription,
)
from ray_forwarder.alpaca.errors import ErrorAction, classify_error, describe_error
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

__all__ = [
    "CHANNEL_BY_TYPE",
    "MARKET_DATA_CHANNELS",
    "Authenticated",
    "Connected",
    "DataItem",
    "ErrorAction",
    "Event",
    "ServerError",
    "Skipped",
    "Subscription",
    "Success",
    "classify_error",
    "connection_headers",
    "decode_frame",
    "describe_error",
    "encode_auth",
    "encode_subscribe",
    "encode_unsubscribe",
    "missing_from_subscription",
]
