"""Alpaca's channels and the item types (`T`) that arrive on them (the stock stream; every
stream's channels are in `streams.py`)."""

from __future__ import annotations

from ray_forwarder.alpaca.streams import all_channels

#: Channels a client can name in a subscribe action (stock market-data stream).
MARKET_DATA_CHANNELS: tuple[str, ...] = (
    "trades",
    "quotes",
    "bars",
    "updatedBars",
    "dailyBars",
    "statuses",
    "lulds",
    "imbalances",
)

#: Channels that come along with a subscription to trades.
TRADE_COMPANION_CHANNELS: tuple[str, ...] = ("corrections", "cancelErrors")

#: Item type code -> envelope channel name.
CHANNEL_BY_TYPE: dict[str, str] = {
    "t": "trades",
    "q": "quotes",
    "b": "bars",
    "u": "updatedBars",
    "d": "dailyBars",
    "s": "statuses",
    "l": "lulds",
    "c": "corrections",
    "x": "cancelErrors",
    "i": "imbalances",
}

#: Every channel that can appear in an envelope, including the forwarder's own.
ALL_CHANNELS: tuple[str, ...] = tuple(
    dict.fromkeys((*CHANNEL_BY_TYPE.values(), *all_channels(), "trade_updates", "status"))
)
