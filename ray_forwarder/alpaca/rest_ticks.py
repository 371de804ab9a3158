"""Alpaca's historical trades and quotes REST API: requests and responses, sans I/O.

Opt-in backfill (`BACKFILL_CHANNELS=bars,trades,quotes`) asks `GET /v2/stocks/trades` and
`GET /v2/stocks/quotes` for the ticks a gap missed. Both take the bars endpoint's query
(`symbols` comma list, `start`/`end` RFC 3339 inclusive, `limit` 1..10000 counted over all
symbols, `page_token`, `sort`, `feed`) and answer its page shape with `trades` / `quotes`
in place of `bars` (a map of symbol -> list, `next_page_token`); results are sorted by
symbol, then time (docs.alpaca.markets "Historical trades" / "Historical quotes"; the
apca and alpaca_api_client crates). A REST trade is `{t, x, p, s, c, i, z}`, a quote
`{t, ax, ap, as, bx, bp, bs, c, z}`: the stream's item without `T` and `S`.

Responses are network input: `parse_ticks_page` shares the page checks with the bars
(`rest_bars.page_entries`) and the stream's own field checks (`items.field_type_error`),
skips a bad item with a reason and raises `RestBarsError` only for a page without shape.

`stream_tick` gives a REST tick the exact payload the stream would have delivered, so a
tick received both live and by REST has one dedup key (`channel:S:t:digest` of the
payload): `T` and `S` added, only the stream's fields kept, and the two things that differ
by wire format made to match the stream in use: with msgpack (the default) the stream's
`t` is a Timestamp the decoder renders canonical (nine digits, `Z`) and its prices are
float64s, so the REST `t` is made canonical and an integral price (`590` in JSON) a float;
with JSON both sides are Alpaca's own JSON text and are kept as they came.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from ray_forwarder.alpaca import timestamps
from ray_forwarder.alpaca.items import FIELD_TYPES, field_type_error
from ray_forwarder.alpaca.rest_bars import MAX_PAGE_LIMIT, page_entries, parse_instant

#: The channels tick backfill serves and the stream item type (`T`) of each.
TICK_TYPES: dict[str, str] = {"trades": "t", "quotes": "q"}
#: Price fields: float64 on the msgpack stream, possibly integral numbers in JSON.
_PRICE_FIELDS: dict[str, tuple[str, ...]] = {"trades": ("p",), "quotes": ("ap", "bp")}


@dataclass(frozen=True)
class TicksEndpoint:
    """Where one stream's historical ticks of one channel live."""

    channel: str  # "trades" | "quotes": also the page's map key
    path: str


#: (stream, channel) -> endpoint. Stocks only so far (crypto and options: not yet).
TICKS_ENDPOINTS: dict[tuple[str, str], TicksEndpoint] = {
    ("stocks", "trades"): TicksEndpoint("trades", "/v2/stocks/trades"),
    ("stocks", "quotes"): TicksEndpoint("quotes", "/v2/stocks/quotes"),
}


def ticks_params(
    symbols: Sequence[str],
    start: str,
    end: str,
    *,
    feed: str,
    limit: int = MAX_PAGE_LIMIT,
    page_token: str | None = None,
) -> dict[str, str]:
    """Query parameters for one page of ticks of `symbols`, `start`..`end` inclusive
    (RFC 3339, nanoseconds kept), oldest first, from the stream's feed."""
    params = {
        "symbols": ",".join(symbols),
        "start": start,
        "end": end,
        "limit": str(max(1, min(limit, MAX_PAGE_LIMIT))),
        "sort": "asc",
        "feed": feed,
    }
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


@dataclass
class TicksPage:
    ticks: list[RestTick] = field(default_factory=list)
    next_page_token: str | None = None
    skipped: list[str] = field(default_factory=list)  # one reason per item left out


def parse_ticks_page(channel: str, body: bytes | str) -> TicksPage:
    """Validate one `trades` or `quotes` page; a bad item is skipped (with a reason),
    never raised."""
    kind = TICK_TYPES[channel]
    token, entries, skipped = page_entries(body, channel)
    page = TicksPage(next_page_token=token, skipped=skipped)
    for symbol, raw in entries:
        tick, reason = _tick(kind, symbol, raw)
        if tick is None:
            page.skipped.append(reason)
        else:
            page.ticks.append(tick)
    return page


#: Per item type: the fields the stream's item has besides `T`, `S` and `t`.
_STREAM_FIELDS: dict[str, frozenset[str]] = {
    kind: frozenset(name for name, _types in FIELD_TYPES[kind]) for kind in TICK_TYPES.values()
}


def _tick(kind: str, symbol: str, raw: object) -> tuple[RestTick | None, str]:
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
    wanted = _STREAM_FIELDS[kind]
    fields = {k: v for k, v in raw.items() if k in wanted}
    try:  # what the envelope embeds must be JSON (non-string keys, nesting are refused)
        orjson.dumps(fields)
    except TypeError:
        return None, "unencodable"
    return RestTick(symbol, t, raw_t, fields), ""


def stream_tick(channel: str, tick: RestTick, wire_format: str) -> dict[str, Any]:
    """The REST tick as the stream in `wire_format` would have delivered it (see module)."""
    fields = dict(tick.fields)
    if wire_format == "msgpack":
        for name in _PRICE_FIELDS[channel]:
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
