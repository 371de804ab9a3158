"""Alpaca's historical trades and quotes REST API: requests and responses, sans I/O.

Opt-in backfill (`BACKFILL_CHANNELS=bars,trades,quotes`) asks each stream's historical
ticks endpoint for the ticks a gap missed (`ticks_endpoint`; sources in docs/streams.md §8):

- stocks `GET /v2/stocks/trades`, `/v2/stocks/quotes`: a trade `{t, x, p, s, c, i, z}`, a
  quote `{t, ax, ap, as, bx, bp, bs, c, z}`; the query takes the stream's `feed`;
- crypto `GET /v1beta3/crypto/{loc}/trades`, `/quotes` (`loc` = ALPACA_CRYPTO_LOCATION, as
  for the bars): a trade `{t, p, s, i, tks}` (taker side `B`/`S`/`-`), a quote
  `{t, bp, bs, ap, as}` (no exchanges, conditions or tape); sizes are fractional; no `feed`;
- options `GET /v1beta1/options/trades`: a trade `{t, p, s, x, c}` (`c` one condition
  string); at most 100 contracts per request, no `feed`. Alpaca has no historical options
  quotes (latest only), so options quotes are not backfilled.

All take `symbols` (comma list), `start`/`end` (RFC 3339 inclusive), `limit` (1..10000,
counted over all symbols), `page_token`, `sort`, and answer the bars' page shape with
`trades` / `quotes` in place of `bars` (symbol -> list, `next_page_token`), sorted by symbol,
then time. Each REST item is the stream's item without `T` and `S`.

Responses are network input: `parse_ticks_page` shares the page checks with the bars
(`rest_bars.page_entries`) and the stream's own field checks (`items.field_type_error`),
skips a bad item with a reason and raises `RestBarsError` only for a page without shape.

`stream_tick` gives a REST tick the exact payload the stream would have delivered, so a
tick received both live and by REST has one dedup key (`channel:S:t:digest` of the
payload): `T` and `S` added, only that stream's fields kept, and the two things that differ
by wire format made to match the stream in use: with msgpack (the default; the options
stream's only format) the stream's `t` is a Timestamp the decoder renders canonical (nine
digits, `Z`) and its prices (crypto: sizes too) are float64s, so the REST `t` is made
canonical and an integral number (`590` in JSON) a float; with JSON both sides are
Alpaca's own JSON text and are kept as they came.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import orjson

from ray_forwarder.alpaca import timestamps
from ray_forwarder.alpaca.items import FIELD_TYPES, field_type_error
from ray_forwarder.alpaca.rest_bars import MAX_PAGE_LIMIT, page_entries, parse_instant

#: The channels tick backfill serves and the stream item type (`T`) of each.
TICK_TYPES: dict[str, str] = {"trades": "t", "quotes": "q"}


@dataclass(frozen=True)
class TickShape:
    """What one stream's trade or quote looks like on the stream."""

    #: Its fields besides `T`, `S` and `t`: a field REST adds would give a twin another digest.
    fields: frozenset[str]
    #: Numbers the msgpack stream sends as float64 (JSON may write them integral).
    floats: tuple[str, ...]


def _all_fields(kind: str) -> frozenset[str]:
    return frozenset(name for name, _types in FIELD_TYPES[kind])


#: Stocks keep the union the stream's checks know (`items.FIELD_TYPES`); crypto and options
#: their own items (go `CryptoTrade`, `CryptoQuote`, `OptionTrade`; docs/streams.md §4, §5).
_STOCK_TRADE = TickShape(_all_fields("t"), ("p",))
_STOCK_QUOTE = TickShape(_all_fields("q"), ("ap", "bp"))
_CRYPTO_TRADE = TickShape(frozenset({"p", "s", "i", "tks"}), ("p", "s"))
_CRYPTO_QUOTE = TickShape(frozenset({"bp", "bs", "ap", "as"}), ("ap", "as", "bp", "bs"))
_OPTION_TRADE = TickShape(frozenset({"p", "s", "x", "c"}), ("p",))


@dataclass(frozen=True)
class TicksEndpoint:
    """Where one stream's historical ticks of one channel live and what they look like."""

    channel: str  # "trades" | "quotes": also the page's map key
    path: str
    shape: TickShape = _STOCK_TRADE
    #: Stocks take the stream's feed; crypto and options take none.
    takes_feed: bool = False
    #: Most symbols one request may name (None: no documented limit).
    max_symbols: int | None = None


#: (stream, channel) -> endpoint (docs/streams.md §8). Crypto's `{loc}` is filled in by
#: `ticks_endpoint`; options has trades only (no historical quotes endpoint exists).
TICKS_ENDPOINTS: dict[tuple[str, str], TicksEndpoint] = {
    ("stocks", "trades"): TicksEndpoint("trades", "/v2/stocks/trades", _STOCK_TRADE, True),
    ("stocks", "quotes"): TicksEndpoint("quotes", "/v2/stocks/quotes", _STOCK_QUOTE, True),
    ("crypto", "trades"): TicksEndpoint("trades", "/v1beta3/crypto/{loc}/trades", _CRYPTO_TRADE),
    ("crypto", "quotes"): TicksEndpoint("quotes", "/v1beta3/crypto/{loc}/quotes", _CRYPTO_QUOTE),
    ("options", "trades"): TicksEndpoint(
        "trades", "/v1beta1/options/trades", _OPTION_TRADE, max_symbols=100
    ),
}


def ticks_endpoint(
    stream: str, channel: str, *, crypto_location: str = "us"
) -> TicksEndpoint | None:
    """The REST endpoint of `stream`'s `channel` (None: it has none), crypto's location
    (ALPACA_CRYPTO_LOCATION) in its path."""
    endpoint = TICKS_ENDPOINTS.get((stream, channel))
    if endpoint is None or "{loc}" not in endpoint.path:
        return endpoint
    return replace(endpoint, path=endpoint.path.format(loc=quote(crypto_location, safe="")))


def ticks_params(
    symbols: Sequence[str],
    start: str,
    end: str,
    *,
    feed: str | None,
    limit: int = MAX_PAGE_LIMIT,
    page_token: str | None = None,
) -> dict[str, str]:
    """Query parameters for one page of ticks of `symbols`, `start`..`end` inclusive
    (RFC 3339, nanoseconds kept), oldest first, from `feed` (stocks: the stream's; None for
    crypto and options, whose endpoints take none)."""
    params = {
        "symbols": ",".join(symbols),
        "start": start,
        "end": end,
        "limit": str(max(1, min(limit, MAX_PAGE_LIMIT))),
        "sort": "asc",
    }
    if feed is not None:
        params["feed"] = feed
    if page_token:
        params["page_token"] = page_token
    return params


@dataclass(frozen=True, slots=True)
class RestTick:
    """One validated REST trade or quote."""

    symbol: str
    t: str  # canonical (nine fractional digits, `Z`): the event time
    raw_t: str  # `t` as the API wrote it
    fields: Mapping[str, Any]  # the stream's fields the item has (`t`, `T`, `S` excluded)
    floats: tuple[str, ...] = ()  # fields the msgpack stream sends as float64


@dataclass
class TicksPage:
    ticks: list[RestTick] = field(default_factory=list)
    next_page_token: str | None = None
    skipped: list[str] = field(default_factory=list)  # one reason per item left out


def parse_ticks_page(
    channel: str, body: bytes | str, endpoint: TicksEndpoint | None = None
) -> TicksPage:
    """Validate one `trades` or `quotes` page of `endpoint` (default: the stocks one); a
    bad item is skipped (with a reason), never raised."""
    kind = TICK_TYPES[channel]
    shape = (endpoint or TICKS_ENDPOINTS[("stocks", channel)]).shape
    token, entries, skipped = page_entries(body, channel)
    page = TicksPage(next_page_token=token, skipped=skipped)
    for symbol, raw in entries:
        tick, reason = _tick(kind, shape, symbol, raw)
        if tick is None:
            page.skipped.append(reason)
        else:
            page.ticks.append(tick)
    return page


def _tick(kind: str, shape: TickShape, symbol: str, raw: object) -> tuple[RestTick | None, str]:
    if not isinstance(raw, dict):
        return None, "not_an_object"
    raw_t = raw.get("t")
    if type(raw_t) is not str:  # JSON has no Timestamp type: a number is no event time
        return None, "bad_timestamp"
    try:
        t = timestamps.canonical(raw_t)
    except ValueError:
        return None, "bad_timestamp"
    if field_type_error(kind, raw) is not None:
        return None, "bad_field_type"
    # the stream's field set only: a field REST adds would give its twin another digest
    fields = {k: v for k, v in raw.items() if k in shape.fields}
    try:  # what the envelope embeds must be JSON (non-string keys, nesting are refused)
        orjson.dumps(fields)
    except TypeError:
        return None, "unencodable"
    return RestTick(symbol, t, raw_t, fields, shape.floats), ""


def stream_tick(channel: str, tick: RestTick, wire_format: str) -> dict[str, Any]:
    """The REST tick as the stream in `wire_format` would have delivered it (see module)."""
    fields = dict(tick.fields)
    if wire_format == "msgpack":
        for name in tick.floats:
            if type(fields.get(name)) is int:
                fields[name] = float(fields[name])
        t = tick.t
    else:
        t = tick.raw_t
    return {"T": TICK_TYPES[channel], "S": tick.symbol, **fields, "t": t}


@dataclass(frozen=True)
class TickWindow:
    """The event times a gap can have missed ticks in, `start`..`end` inclusive."""

    start: str  # canonical
    end: str
    clipped: bool = False  # the gap reached further back than BACKFILL_MAX_SECONDS


#: A minute bar's `t` is its minute's start, and the stream sends it (or its updated bar)
#: up to two minutes later: a gap mark that is a bar says data resumed by then.
_BAR_LAG = timedelta(minutes=2)


def tick_window(start_event_ts: str, end_event_ts: str, max_seconds: float) -> TickWindow:
    """From the last item before the gap to the first after it, both included (a tick the
    stream delivered at either edge is recognised by its dedup key, and another tick with
    the same time is not lost), at most `max_seconds` back from `end`.

    A mark on a whole minute may be a bar (`t` = its minute's start, sent up to two
    minutes later): the end is then moved two minutes on, so no tick between the bar's
    `t` and the actual resumption is left out; the overlap costs requests, not records
    (what the stream delivered since is in the dedup cache)."""
    start = timestamps.canonical(start_event_ts)
    end = timestamps.canonical(end_event_ts)
    if end.endswith(":00.000000000Z"):
        end = _canonical(parse_instant(end) + _BAR_LAG)
    limit_ts = _canonical(parse_instant(end) - timedelta(seconds=max_seconds))
    if start < limit_ts:  # canonical strings: string order is time order
        return TickWindow(limit_ts, end, clipped=True)
    return TickWindow(start, max(start, end))


def _canonical(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
