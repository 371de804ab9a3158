"""Every Alpaca real-time stream, declared once. Everything else reads `STREAMS`.

A `StreamDefinition` says where a stream lives (endpoint template and the setting that fills
it), which wire formats it speaks, which channels it has (the item type `T` of each, the
topic it lands on, whether its records may be revised), what a valid symbol looks like, and
how an item is keyed (record key, seq key and dedup identity). Planning, configuration, the
topic table, metrics, the simulator and the demo all read this table; adding a stream means
adding one definition here (and teaching the simulator to speak it).

Sources: docs/streams.md (Alpaca's docs and official SDKs, cited there).

No I/O and no imports from the rest of the package, so anything may import it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

LIVE_DATA_HOST = "wss://stream.data.alpaca.markets"

Family = Literal["market_data", "trading"]
WireFormat = Literal["json", "msgpack"]

#: Stock feeds and where each streams (docs.alpaca.markets "Real-time Stock Data").
STOCK_FEED_PATHS: dict[str, str] = {
    "sip": "v2/sip",
    "iex": "v2/iex",
    "delayed_sip": "v2/delayed_sip",
    "boats": "v1beta1/boats",
    "overnight": "v1beta1/overnight",
    "test": "v2/test",
}
OPTIONS_FEEDS: tuple[str, ...] = ("indicative", "opra")


@dataclass(frozen=True, slots=True)
class TopicDef:
    """A Kafka topic: the `Settings` field (= env var upper-cased) and its default name."""

    setting: str
    default: str


@dataclass(frozen=True, slots=True)
class ChannelDef:
    """One envelope channel of a stream.

    `subscribe_as` is the key of the subscribe action that brings its items (corrections
    and cancel/errors come with `trades`, so theirs is `trades`)."""

    name: str
    item_type: str
    topic: TopicDef
    subscribe_as: str
    #: Records may later be revised (bars, running daily bars, order books): `is_final`
    #: false. Minute bars get their final record from the bar finaliser.
    revisable: bool = False
    minute_bar: bool = False


@dataclass(frozen=True, slots=True)
class StreamDefinition:
    """One Alpaca real-time stream (see the module docstring)."""

    name: str
    family: Family
    #: Endpoint from settings (host, feed or location); the `url_setting` overrides it.
    endpoint: Callable[[Any], str]
    #: Settings field of the URL override (e.g. `alpaca_stream_url`).
    url_setting: str
    #: Settings field with the symbol list (None: the stream has no symbols, e.g.
    #: trade_updates; it is planned as one connection subscribed to `*`).
    symbols_setting: str | None
    channels_setting: str | None
    wire_formats: tuple[WireFormat, ...]
    channels: tuple[ChannelDef, ...]
    default_channels: tuple[str, ...]
    symbol_pattern: re.Pattern[str]
    #: The item field that names what a record is about: its record key, the seq key and
    #: the middle of its dedup key (`S` = the symbol; news: `id`, the article).
    key_field: str = "S"
    #: The item field holding its event time (news: `updated_at`, so an edit is new).
    time_field: str = "t"
    #: Whether the key is a symbol (and goes into the envelope's `symbol`); news keys by
    #: article id and leaves `symbol` null (its symbols are in the payload).
    key_is_symbol: bool = True
    #: Items for symbols outside the subscription are skipped (news items name many).
    filter_by_symbol: bool = True
    #: The market never closes (crypto) or has no hours (news): no market-clock lookups.
    always_open: bool = False
    #: Subscribe channels whose silence in market hours means a stuck stream.
    stale_channels: tuple[str, ...] = ()
    default_symbols: tuple[str, ...] = ()
    #: Dedup identity in words, for docs and `describe()`; the key itself is always
    #: `channel:key:event_ts:digest` (digest = BLAKE2b of the item's sorted JSON).
    dedup_identity: str = "channel, symbol, t and the item's full content"
    #: Settings field with the most symbols one connection may subscribe to (0: no limit);
    #: the planner spreads the symbols over more connections to stay within it.
    symbol_limit_setting: str | None = None
    #: Builds the family's `StreamConnection` from (SessionConfig, Timing); None = the
    #: market-data family's `MarketDataConnection`.
    connection_factory: Callable[[Any, Any], Any] | None = None
    channel_by_type: dict[str, str] = field(init=False, repr=False)
    by_name: dict[str, ChannelDef] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_by_type", {c.item_type: c.name for c in self.channels})
        object.__setattr__(self, "by_name", {c.name: c for c in self.channels})

    @property
    def subscribable(self) -> tuple[str, ...]:
        """Keys a subscribe action may name, in table order."""
        return tuple(dict.fromkeys(c.subscribe_as for c in self.channels))

    @property
    def revisable(self) -> frozenset[str]:
        return frozenset(c.name for c in self.channels if c.revisable)

    @property
    def minute_bars(self) -> frozenset[str]:
        return frozenset(c.name for c in self.channels if c.minute_bar)

    def topics(self) -> dict[str, TopicDef]:
        return {c.name: c.topic for c in self.channels}

    def is_symbol(self, symbol: str) -> bool:
        return symbol == "*" or self.symbol_pattern.fullmatch(symbol) is not None

    def url(self, settings: Any) -> str:
        return getattr(settings, self.url_setting, None) or self.endpoint(settings)


def _topic(setting: str, default: str) -> TopicDef:
    return TopicDef(setting, default)


# --- stocks (v2) ----------------------------------------------------------------------------

_T_TRADES = _topic("topic_trades", "alpaca.trades.v1")
_T_BARS = _topic("topic_bars", "alpaca.bars.1m.v1")
STOCKS = StreamDefinition(
    name="stocks",
    family="market_data",
    endpoint=lambda s: f"{LIVE_DATA_HOST}/{STOCK_FEED_PATHS[s.alpaca_feed]}",
    url_setting="alpaca_stream_url",
    symbols_setting="alpaca_symbols",
    channels_setting="alpaca_channels",
    wire_formats=("msgpack", "json"),
    channels=(
        ChannelDef("trades", "t", _T_TRADES, "trades"),
        ChannelDef("quotes", "q", _topic("topic_quotes", "alpaca.quotes.v1"), "quotes"),
        ChannelDef("bars", "b", _T_BARS, "bars", revisable=True, minute_bar=True),
        ChannelDef("updatedBars", "u", _T_BARS, "updatedBars", revisable=True, minute_bar=True),
        ChannelDef(
            "dailyBars",
            "d",
            _topic("topic_daily_bars", "alpaca.bars.1d.v1"),
            "dailyBars",
            revisable=True,
        ),
        ChannelDef("statuses", "s", _topic("topic_statuses", "alpaca.statuses.v1"), "statuses"),
        ChannelDef("lulds", "l", _topic("topic_lulds", "alpaca.lulds.v1"), "lulds"),
        ChannelDef(
            "imbalances", "i", _topic("topic_imbalances", "alpaca.imbalances.v1"), "imbalances"
        ),
        # come with trades, amend them: same topic and key keep them in order with them
        ChannelDef("corrections", "c", _T_TRADES, "trades"),
        ChannelDef("cancelErrors", "x", _T_TRADES, "trades"),
    ),
    default_channels=("trades", "quotes", "bars", "updatedBars"),
    # printable, no space, `*` or `:` (the dedup key's separator): as alpaca/items.py
    symbol_pattern=re.compile(r"[!-)+-9;-~]{1,32}"),
    stale_channels=("trades", "quotes"),
    default_symbols=("SPY", "QQQ"),
)

# --- crypto (v1beta3) -------------------------------------------------------------------------

_T_CRYPTO_BARS = _topic("topic_crypto_bars", "alpaca.crypto.bars.1m.v1")
CRYPTO = StreamDefinition(
    name="crypto",
    family="market_data",
    endpoint=lambda s: f"{LIVE_DATA_HOST}/v1beta3/crypto/{s.alpaca_crypto_location}",
    url_setting="alpaca_crypto_stream_url",
    symbols_setting="alpaca_crypto_symbols",
    channels_setting="alpaca_crypto_channels",
    wire_formats=("msgpack", "json"),
    channels=(
        ChannelDef(
            "trades", "t", _topic("topic_crypto_trades", "alpaca.crypto.trades.v1"), "trades"
        ),
        ChannelDef(
            "quotes", "q", _topic("topic_crypto_quotes", "alpaca.crypto.quotes.v1"), "quotes"
        ),
        ChannelDef("bars", "b", _T_CRYPTO_BARS, "bars", revisable=True, minute_bar=True),
        ChannelDef(
            "updatedBars", "u", _T_CRYPTO_BARS, "updatedBars", revisable=True, minute_bar=True
        ),
        ChannelDef(
            "dailyBars",
            "d",
            _topic("topic_crypto_daily_bars", "alpaca.crypto.bars.1d.v1"),
            "dailyBars",
            revisable=True,
        ),
        ChannelDef(
            "orderbooks",
            "o",
            _topic("topic_crypto_orderbooks", "alpaca.crypto.orderbooks.v1"),
            "orderbooks",
            revisable=True,  # snapshot/delta semantics unverified: never final
        ),
    ),
    default_channels=("trades", "quotes", "bars", "updatedBars"),
    symbol_pattern=re.compile(r"[A-Z0-9]{1,15}/[A-Z0-9]{1,15}"),
    always_open=True,  # crypto trades around the clock
    stale_channels=("trades", "quotes"),
    default_symbols=("BTC/USD", "ETH/USD"),
)

# --- options (v1beta1, msgpack only) ----------------------------------------------------------

OPTIONS = StreamDefinition(
    name="options",
    family="market_data",
    endpoint=lambda s: f"{LIVE_DATA_HOST}/v1beta1/{s.alpaca_options_feed}",
    url_setting="alpaca_options_stream_url",
    symbols_setting="alpaca_options_symbols",
    channels_setting="alpaca_options_channels",
    wire_formats=("msgpack",),  # "only available in msgpack format" (docs: options data)
    channels=(
        ChannelDef(
            "trades", "t", _topic("topic_options_trades", "alpaca.options.trades.v1"), "trades"
        ),
        ChannelDef(
            "quotes", "q", _topic("topic_options_quotes", "alpaca.options.quotes.v1"), "quotes"
        ),
    ),
    default_channels=("trades", "quotes"),
    # OCC: root (1-6), YYMMDD, C|P, strike x 1000 in 8 digits: AAPL240119C00100000
    symbol_pattern=re.compile(r"[A-Z0-9]{1,6}\d{6}[CP]\d{8}"),
    stale_channels=(),  # a contract can be quiet for minutes in market hours
    default_symbols=(),
    # a per-connection subscription limit exists for options; Alpaca's docs read give no
    # number, so it is a setting (ALPACA_OPTIONS_MAX_SYMBOLS_PER_CONNECTION, 0 = none)
    symbol_limit_setting="alpaca_options_max_symbols_per_connection",
    dedup_identity="channel, contract, t and the item's full content (no trade id)",
)

# --- news (v1beta1) -----------------------------------------------------------------------------

NEWS = StreamDefinition(
    name="news",
    family="market_data",
    endpoint=lambda s: f"{LIVE_DATA_HOST}/v1beta1/news",
    url_setting="alpaca_news_stream_url",
    symbols_setting="alpaca_news_symbols",
    channels_setting=None,  # one channel
    wire_formats=("msgpack", "json"),
    channels=(ChannelDef("news", "n", _topic("topic_news", "alpaca.news.v1"), "news"),),
    default_channels=("news",),
    symbol_pattern=re.compile(r"[A-Z0-9.\-]{1,15}(/[A-Z0-9]{1,15})?"),
    key_field="id",
    time_field="updated_at",
    key_is_symbol=False,
    filter_by_symbol=False,
    always_open=True,  # news has no market hours, and no staleness rule
    default_symbols=("*",),
    dedup_identity="article id, updated_at and the article's full content",
)

# --- trade_updates (the trading stream: another protocol, alpaca/trading.py) -------------------

#: The trading API's stream per ALPACA_TRADING_ENV (docs.alpaca.markets "Websocket Streaming").
TRADING_STREAM_URLS: dict[str, str] = {
    "paper": "wss://paper-api.alpaca.markets/stream",
    "live": "wss://api.alpaca.markets/stream",
}


def _trading_connection(config: Any, timing: Any) -> Any:
    from ray_forwarder.alpaca.trading import trading_connection  # this module imports nothing

    return trading_connection(config, timing)


TRADE_UPDATES = StreamDefinition(
    name="trade_updates",
    family="trading",
    endpoint=lambda s: TRADING_STREAM_URLS[s.alpaca_trading_env],
    url_setting="alpaca_trading_stream_url",
    symbols_setting=None,  # no symbols: one connection per key pair (that account's orders)
    channels_setting=None,
    wire_formats=("json",),  # paper sends it in binary frames, live in text frames
    channels=(
        ChannelDef(
            "trade_updates",
            "trade_updates",  # the `stream` name, not a `T`
            _topic("topic_trade_updates", "alpaca.trade_updates.v1"),
            "trade_updates",
        ),
    ),
    default_channels=("trade_updates",),
    symbol_pattern=re.compile(r"[A-Za-z0-9._-]{1,64}"),  # the key: an order id (a UUID)
    key_field="order.id",  # record key, seq key and dedup middle: every event of an order
    time_field="timestamp",  # else order.updated_at (a `new` event may carry none)
    key_is_symbol=False,  # the order's symbol stays in payload.order.symbol
    filter_by_symbol=False,
    always_open=True,  # orders can change at any hour; silence is normal: no data watchdog
    default_symbols=(),
    dedup_identity=(
        "order id, event time and the event's full content (execution_id, qty, the order "
        "snapshot): only a redelivered event is ever dropped"
    ),
    connection_factory=_trading_connection,
)

#: Every stream this build knows, by name.
STREAMS: dict[str, StreamDefinition] = {
    s.name: s for s in (STOCKS, CRYPTO, OPTIONS, NEWS, TRADE_UPDATES)
}


def register(definition: StreamDefinition) -> StreamDefinition:
    """Add a stream (the trading family uses this for `trade_updates`)."""
    STREAMS[definition.name] = definition
    return definition


def topic_defaults() -> dict[str, str]:
    """Settings field -> default topic name, for every stream's channels."""
    return {c.topic.setting: c.topic.default for s in STREAMS.values() for c in s.channels}


def all_channels() -> tuple[str, ...]:
    """Every envelope channel any stream can produce, in table order."""
    return tuple(dict.fromkeys(c.name for s in STREAMS.values() for c in s.channels))
