"""Alpaca's historical bars REST API: requests and responses, sans I/O.

Backfill asks `GET /v2/stocks/bars` (stocks) or `GET /v1beta3/crypto/{loc}/bars` (crypto,
`loc` = ALPACA_CRYPTO_LOCATION) for the 1-minute bars a gap missed; options
(`/v1beta1/options/bars`) has the same shape (a `bars` map of symbol -> list,
`next_page_token`) but its stream carries no bars to fill (docs/streams.md §4, §8).
`bars_endpoint` gives a stream's endpoint, `rest_url` the request URL. Responses are
network input: `parse_bars_page` never raises for one bad bar (it is skipped with a reason,
like a stream item) and raises `RestBarsError` only when the page itself has no usable
shape.

A REST bar has no `T`/`S`; `stream_bar` gives it the stream's shape (`T: "b"`, `S`, `t`
canonical) so that a backfilled bar and a streamed one are the same kind of record, with
the same final key and, for equal content, the same dedup key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from ray_forwarder.alpaca import timestamps

MINUTE = timedelta(minutes=1)
#: Alpaca's largest page (`limit` is 1..10000 and counts bars over all symbols).
MAX_PAGE_LIMIT = 10_000


class RestBarsError(ValueError):
    """A bars response without a usable shape; the text is safe to log."""


@dataclass(frozen=True)
class BarsEndpoint:
    """Where one stream's minute bars live and which query parameters it takes."""

    path: str
    #: Stocks take the stream's feed (`sip`, `iex`, ...) and a price adjustment.
    stock_params: bool = False
    #: Most symbols one request may name (None: no documented limit).
    max_symbols: int | None = None


#: The REST bars endpoint of each stream (docs.alpaca.markets: "Historical bars"; sources in
#: docs/streams.md §8). Crypto's `{loc}` is filled in by `bars_endpoint`. Neither crypto nor
#: options take a `feed` (alpaca-py CryptoBarsRequest, OptionBarsRequest; go
#: GetMultiOptionBars); options names at most 100 contracts per request.
BARS_ENDPOINTS: dict[str, BarsEndpoint] = {
    "stocks": BarsEndpoint("/v2/stocks/bars", stock_params=True),
    "crypto": BarsEndpoint("/v1beta3/crypto/{loc}/bars"),
    "options": BarsEndpoint("/v1beta1/options/bars", max_symbols=100),
}


def bars_endpoint(stream: str, *, crypto_location: str = "us") -> BarsEndpoint | None:
    """The REST bars endpoint of `stream` (None: it has none), crypto's location (`us`,
    `us-1`, `eu-1`: ALPACA_CRYPTO_LOCATION) in its path."""
    endpoint = BARS_ENDPOINTS.get(stream)
    if endpoint is None or "{loc}" not in endpoint.path:
        return endpoint
    return replace(endpoint, path=endpoint.path.format(loc=quote(crypto_location, safe="")))


def rest_url(base_url: str, path: str, params: Mapping[str, str]) -> str:
    """The request URL of one page (bars, trades or quotes), its query encoded like
    Alpaca's Go SDK (`url.Values.Encode`): every reserved character escaped, so `BTC/USD`
    travels as `BTC%2FUSD` and a `+`, `&` or `%` in a symbol cannot change what the server
    reads."""
    return f"{base_url.rstrip('/')}{path}?{urlencode(sorted(params.items()))}"


def bars_params(
    endpoint: BarsEndpoint,
    symbols: Sequence[str],
    start: str,
    end: str,
    *,
    feed: str,
    limit: int = MAX_PAGE_LIMIT,
    page_token: str | None = None,
) -> dict[str, str]:
    """Query parameters for one page of 1-minute bars of `symbols`, `start`..`end`
    inclusive (RFC 3339), oldest first."""
    params = {
        "symbols": ",".join(symbols),
        "timeframe": "1Min",
        "start": start,
        "end": end,
        "limit": str(max(1, min(limit, MAX_PAGE_LIMIT))),
        "sort": "asc",
    }
    if endpoint.stock_params:
        params["feed"] = feed
        params["adjustment"] = "raw"  # what the stream sends
    if page_token:
        params["page_token"] = page_token
    return params


@dataclass(frozen=True, slots=True)
class RestBar:
    """One validated REST bar; `t` canonical (nine fractional digits, `Z`)."""

    symbol: str
    t: str
    fields: Mapping[str, Any]  # o, h, l, c, v, n, vw (and whatever else the API adds)


@dataclass
class BarsPage:
    bars: list[RestBar] = field(default_factory=list)
    next_page_token: str | None = None
    skipped: list[str] = field(default_factory=list)  # one reason per bar left out


#: Fields a bar must have, and the JSON types each may take (bool is no number).
_NUMBER = (int, float)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "o": _NUMBER,
    "h": _NUMBER,
    "l": _NUMBER,
    "c": _NUMBER,
    "v": _NUMBER,
}
_OPTIONAL: dict[str, tuple[type, ...]] = {"n": (int,), "vw": _NUMBER}
_SYMBOL_MAX = 32


def parse_bars_page(body: bytes | str) -> BarsPage:
    """Validate one response body; bad bars are skipped (with a reason), never raised."""
    token, entries, skipped = page_entries(body, "bars")
    page = BarsPage(next_page_token=token, skipped=skipped)
    for symbol, raw in entries:
        bar, reason = _bar(symbol, raw)
        if bar is None:
            page.skipped.append(reason)
        else:
            page.bars.append(bar)
    return page


def page_entries(
    body: bytes | str, what: str
) -> tuple[str | None, list[tuple[str, object]], list[str]]:
    """The shape every historical page shares (`{what: {symbol: [item, ...]},
    "next_page_token": ...}`: bars, trades, quotes): the token, the (symbol, raw item)
    pairs, and a reason per symbol left out. Raises RestBarsError only for a page without
    that shape."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RestBarsError(f"{what} response is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RestBarsError(f"{what} response is not an object")
    token = doc.get("next_page_token")
    if token is not None and (not isinstance(token, str) or not token or len(token) > 4096):
        raise RestBarsError(f"{what} response has an unusable next_page_token")
    by_symbol = doc.get(what)
    if by_symbol is None:  # Alpaca answers `"bars": null` (or {}) when nothing matched
        by_symbol = {}
    if not isinstance(by_symbol, dict):
        raise RestBarsError(f"{what} response: `{what}` is not an object")
    entries: list[tuple[str, object]] = []
    skipped: list[str] = []
    for symbol, items in by_symbol.items():
        if not _good_symbol(symbol):
            skipped.append("bad_symbol")
            continue
        if not isinstance(items, list):
            skipped.append("not_a_list")
            continue
        entries.extend((symbol, raw) for raw in items)
    return token, entries, skipped


def _good_symbol(symbol: object) -> bool:
    return (
        isinstance(symbol, str)
        and 0 < len(symbol) <= _SYMBOL_MAX
        and symbol.isascii()
        and symbol.isprintable()
        and not any(ch in symbol for ch in " :*")
    )


def _bar(symbol: str, raw: object) -> tuple[RestBar | None, str]:
    if not isinstance(raw, dict):
        return None, "not_an_object"
    try:
        t = timestamps.canonical(raw.get("t"))
    except ValueError:
        return None, "bad_timestamp"
    for name, kinds in _REQUIRED.items():
        if name not in raw:
            return None, "missing_field"
        if not _typed(raw[name], kinds):
            return None, "bad_field_type"
    for name, kinds in _OPTIONAL.items():
        if name in raw and not _typed(raw[name], kinds):
            return None, "bad_field_type"
    fields = {k: v for k, v in raw.items() if k not in ("t", "T", "S")}
    try:  # what the envelope embeds must be JSON (nesting, non-string keys are refused)
        orjson.dumps(fields)
    except TypeError:
        return None, "unencodable"
    return RestBar(symbol, t, fields), ""


def _typed(value: object, kinds: tuple[type, ...]) -> bool:
    kind = type(value)
    if kind not in kinds:
        return False
    return kind is not float or math.isfinite(value)  # type: ignore[arg-type]


def stream_bar(bar: RestBar) -> dict[str, Any]:
    """The REST bar in the stream's shape (`T`, `S`, fields, `t`)."""
    return {"T": "b", "S": bar.symbol, **bar.fields, "t": bar.t}


# --- windows ------------------------------------------------------------------------------


def parse_instant(value: str) -> datetime:
    """An RFC 3339 time as an aware UTC datetime (microseconds; real instants only)."""
    text = timestamps.canonical(value)
    return datetime.fromisoformat(text[:26]).replace(tzinfo=UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def floor_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


@dataclass(frozen=True)
class MinuteWindow:
    """The bar minutes (their `t`) a gap can have missed, `first`..`last` inclusive."""

    first: datetime
    last: datetime
    clipped: bool = False  # the gap reached further back than BACKFILL_MAX_SECONDS

    @property
    def minutes(self) -> int:
        return int((self.last - self.first) / MINUTE) + 1


def minute_window(
    start_event_ts: str, end_event_ts: str, max_seconds: float, bars_from: str | None = None
) -> MinuteWindow:
    """Minutes whose bars a gap from `start` to `end` (event times) can have missed.

    A minute's bar is sent after the minute ends, and its updated bar after the following
    half-minute mark, so the minute before the one `start` falls in can still have been
    revised during the gap: the window starts there. It ends with the minute `end` falls
    in (a bar whose `t` a resumed stream still delivers is merged, not duplicated). After
    a restart or a stop it starts where the predecessor said (`bars_from`: its oldest bar
    not final, or the minute after the last bar it saw), so its finals are not repeated.
    At most `max_seconds` back from `end`."""
    first = floor_minute(parse_instant(start_event_ts)) - MINUTE
    if bars_from is not None:  # a predecessor said which bars it had not finalised
        first = floor_minute(parse_instant(bars_from))
    last = floor_minute(parse_instant(end_event_ts))
    limit = floor_minute(parse_instant(end_event_ts) - timedelta(seconds=max_seconds))
    clipped = first < limit
    if clipped:
        first = limit
    if last < first:
        last = first
    return MinuteWindow(first, last, clipped)
