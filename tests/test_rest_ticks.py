"""REST trades and quotes: request shapes, defensive parsing (hypothesis), the stream's
shape and dedup identity for a REST twin, the window, and the backfiller's tick part
(paging, the per-gap cap, clipping), all without I/O (an injected transport and clock)."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Mapping
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_forwarder.alpaca.codec import decode_frame
from ray_forwarder.alpaca.events import DataItem
from ray_forwarder.alpaca.rest_bars import RestBarsError, rest_url
from ray_forwarder.alpaca.rest_ticks import (
    TICKS_ENDPOINTS,
    TicksEndpoint,
    parse_ticks_page,
    stream_tick,
    tick_window,
    ticks_endpoint,
    ticks_params,
)
from ray_forwarder.alpaca.streams import STREAMS
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.gaps import Gap, Mark
from ray_forwarder.core.pipeline import EventPipeline
from ray_forwarder.runtime.backfill import BackfillConfig, Backfiller, TicksClient

T0 = "2026-01-05T14:31:02.123456789Z"
#: A stream trade (Alpaca's real-time schema) and its REST twin ({t, x, p, s, c, i, z}).
LIVE_TRADE = {"T": "t", "S": "SPY", "i": 52983525029461, "x": "V", "p": 590.0, "s": 100,
              "c": ["@"], "t": T0, "z": "B"}  # fmt: skip
REST_TRADE = {"t": T0, "x": "V", "p": 590, "s": 100, "c": ["@"], "i": 52983525029461, "z": "B"}
LIVE_QUOTE = {"T": "q", "S": "SPY", "ax": "V", "ap": 590.02, "as": 3, "bx": "Q", "bp": 590.0,
              "bs": 5, "c": ["R"], "t": T0, "z": "B"}  # fmt: skip
REST_QUOTE = {k: v for k, v in LIVE_QUOTE.items() if k not in ("T", "S")} | {"bp": 590}
#: Crypto (go `CryptoTrade` {t, p, s, i, tks}, `CryptoQuote` {t, bp, bs, ap, as}: fractional
#: sizes, no exchange, conditions or tape) and options (go `OptionTrade` {t, p, s, x, c}).
LIVE_CRYPTO_TRADE = {"T": "t", "S": "BTC/USD", "p": 97000.0, "s": 2.0, "t": T0, "i": 7,
                     "tks": "B"}  # fmt: skip
REST_CRYPTO_TRADE = {"t": T0, "p": 97000, "s": 2, "i": 7, "tks": "B"}
LIVE_CRYPTO_QUOTE = {"T": "q", "S": "BTC/USD", "bp": 96999.5, "bs": 1.0, "ap": 97000.0,
                     "as": 0.25, "t": T0}  # fmt: skip
REST_CRYPTO_QUOTE = {"t": T0, "bp": 96999.5, "bs": 1, "ap": 97000, "as": 0.25}
OCC = "AAPL260116C00230000"
LIVE_OPTION_TRADE = {"T": "t", "S": OCC, "t": T0, "p": 4.0, "s": 3, "x": "C", "c": "I"}
REST_OPTION_TRADE = {"t": T0, "p": 4, "s": 3, "x": "C", "c": "I"}


def test_ticks_params() -> None:
    assert TICKS_ENDPOINTS[("stocks", "trades")].path == "/v2/stocks/trades"
    assert TICKS_ENDPOINTS[("stocks", "quotes")].path == "/v2/stocks/quotes"
    params = ticks_params(["SPY", "QQQ"], T0, T0, feed="iex", limit=50_000, page_token="p")
    assert params == {"symbols": "SPY,QQQ", "start": T0, "end": T0, "limit": "10000",
                      "sort": "asc", "feed": "iex", "page_token": "p"}  # fmt: skip


def test_crypto_and_options_tick_params_and_paths() -> None:
    """Crypto at the stream's location (like its bars), options trades only; neither takes
    a `feed`; options name at most 100 contracts a request; symbols travel URL-encoded."""
    trades = ticks_endpoint("crypto", "trades", crypto_location="us-1")
    quotes = ticks_endpoint("crypto", "quotes", crypto_location="eu-1")
    assert trades is not None and trades.path == "/v1beta3/crypto/us-1/trades"
    assert quotes is not None and quotes.path == "/v1beta3/crypto/eu-1/quotes"
    assert ticks_endpoint("crypto", "trades").path == "/v1beta3/crypto/us/trades"  # type: ignore[union-attr]
    options = ticks_endpoint("options", "trades")
    assert options is not None and options.path == "/v1beta1/options/trades"
    assert options.max_symbols == 100 and trades.max_symbols is None
    assert ticks_endpoint("options", "quotes") is None  # Alpaca keeps no options quotes
    assert ticks_endpoint("news", "trades") is None
    assert not trades.takes_feed and not options.takes_feed
    assert TICKS_ENDPOINTS[("stocks", "trades")].takes_feed
    params = ticks_params(["BTC/USD", "ETH/USD"], T0, T0, feed=None, limit=5)
    assert params == {"symbols": "BTC/USD,ETH/USD", "start": T0, "end": T0, "limit": "5",
                      "sort": "asc"}  # fmt: skip
    url = rest_url("http://x/", trades.path, params)
    assert "symbols=BTC%2FUSD%2CETH%2FUSD" in url and "feed" not in url


def test_the_tick_client_sends_the_feed_to_stocks_only() -> None:
    cfg = BackfillConfig(base_url="http://sim", key="k", secret="s", feed="iex")
    endpoints = [TICKS_ENDPOINTS[("stocks", "trades")], ticks_endpoint("crypto", "quotes"),
                 ticks_endpoint("options", "trades")]  # fmt: skip
    feeds = [TicksClient(cfg, e).params(["X"], T0, T0, None).get("feed") for e in endpoints]  # type: ignore[arg-type]
    assert feeds == ["iex", None, None]


def _pipeline(stream: str = "stocks", symbol: str = "SPY") -> EventPipeline:
    topics = {"trades": "alpaca.trades.v1", "quotes": "alpaca.quotes.v1"}
    return EventPipeline(topics, DedupCache(900, 1000), BarFinalizer(2.0),
                         allowed_symbols=[symbol], stream=STREAMS[stream])  # fmt: skip


def _msgpack_frame(item: dict[str, Any]) -> bytes:
    """The item as Alpaca's msgpack stream sends it: `t` a Timestamp, prices float64."""
    seconds = 1767623462  # 2026-01-05T14:31:02Z
    wire = {**item, "t": msgpack.Timestamp(seconds, 123456789)}
    return msgpack.packb([wire], datetime=False)


#: (stream, channel, live item, REST twin, wire formats the stream offers)
TWINS = [
    ("stocks", "trades", LIVE_TRADE, REST_TRADE, ("msgpack", "json")),
    ("stocks", "quotes", LIVE_QUOTE, REST_QUOTE, ("msgpack", "json")),
    ("crypto", "trades", LIVE_CRYPTO_TRADE, REST_CRYPTO_TRADE, ("msgpack", "json")),
    ("crypto", "quotes", LIVE_CRYPTO_QUOTE, REST_CRYPTO_QUOTE, ("msgpack", "json")),
    ("options", "trades", LIVE_OPTION_TRADE, REST_OPTION_TRADE, ("msgpack",)),  # msgpack only
]


@pytest.mark.parametrize(
    ("stream", "channel", "live", "rest", "wire_format"),
    [
        pytest.param(stream, channel, live, rest, wire, id=f"{stream}-{channel}-{wire}")
        for stream, channel, live, rest, wires in TWINS
        for wire in wires
    ],
)
def test_a_tick_received_live_and_by_rest_dedups_to_one_record(
    stream: str, channel: str, live: dict[str, Any], rest: dict[str, Any], wire_format: str
) -> None:
    """The live item (decoded from a real frame of the wire format) and its REST twin
    (another field order, integral numbers as JSON writes them, and a field the stream does
    not have) get one dedup key: one record, and the REST copy counted `duplicate`."""
    symbol = live["S"]
    endpoint = ticks_endpoint(stream, channel)
    assert endpoint is not None
    rest_body = {**rest, "u": "canceled"}  # a field the stream's item never has
    if wire_format == "msgpack":
        frame: bytes | str = _msgpack_frame(live)
    else:  # JSON: both sides are Alpaca's JSON text, integral numbers included
        frame = orjson.dumps([{**live, **{k: v for k, v in rest.items() if k != "t"}}]).decode()
    [decoded] = decode_frame(frame, STREAMS[stream])
    assert isinstance(decoded, DataItem)
    page = parse_ticks_page(channel, orjson.dumps({channel: {symbol: [rest_body]}}), endpoint)
    [tick] = page.ticks
    twin = DataItem(channel, tick.symbol, tick.t, stream_tick(channel, tick, wire_format))
    assert twin.event_ts == decoded.event_ts
    assert orjson.dumps(twin.payload, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        decoded.payload, option=orjson.OPT_SORT_KEYS
    )
    gap_id = f"{stream}-0:0:1"
    pipeline = _pipeline(stream, symbol)
    [record] = pipeline.process([decoded], "2026-01-05T14:31:03.000000Z", 1.0)
    again, outcome = pipeline.backfill_ticks([twin], gap_id, 2.0)
    assert again == [] and outcome == {"duplicate": 1}
    # in the other order (REST first, then the stream), still one record, same key
    other = _pipeline(stream, symbol)
    [backfilled], outcome = other.backfill_ticks([twin], gap_id, 1.0)
    assert outcome == {"emitted": 1} and other.process([decoded], "x", 2.0) == []
    live_env, rest_env = orjson.loads(record.value), orjson.loads(backfilled.value)
    assert live_env["key"] == rest_env["key"] and live_env["payload"] == rest_env["payload"]
    assert rest_env["backfill"] == {"gap_id": gap_id, "via": "rest"}
    assert rest_env["is_final"] is True and "backfill" not in live_env
    assert backfilled.key == symbol.encode() and backfilled.topic == record.topic


def test_a_crypto_trade_keeps_only_the_crypto_streams_fields() -> None:
    """A crypto trade with a stock field (`x`, `z`, `c`) would digest differently from its
    live twin: only the crypto stream's fields are kept."""
    endpoint = ticks_endpoint("crypto", "trades")
    body = {"trades": {"BTC/USD": [{**REST_CRYPTO_TRADE, "x": "CBSE", "z": "C", "c": ["@"]}]}}
    [tick] = parse_ticks_page("trades", orjson.dumps(body), endpoint).ticks
    payload = stream_tick("trades", tick, "msgpack")
    assert payload == {**LIVE_CRYPTO_TRADE}
    assert type(payload["s"]) is float and type(payload["p"]) is float


def test_backfilled_ticks_continue_the_seq_and_skip_unsubscribed_symbols() -> None:
    pipeline = _pipeline()
    [live] = pipeline.process([DataItem("trades", "SPY", T0, dict(LIVE_TRADE))], "x", 1.0)
    later = {**LIVE_TRADE, "i": 2, "t": "2026-01-05T14:31:03.000000000Z"}
    other = {**LIVE_TRADE, "S": "QQQ"}
    records, outcome = pipeline.backfill_ticks(
        [DataItem("trades", "SPY", later["t"], later), DataItem("trades", "QQQ", T0, other)],
        "g", 2.0,
    )  # fmt: skip
    assert outcome == {"emitted": 1, "unsubscribed": 1}
    assert orjson.loads(records[0].value)["seq"] == orjson.loads(live.value)["seq"] + 1


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({**REST_TRADE, "t": "2026-02-30T00:00:00Z"}, "bad_timestamp"),
        ({**REST_TRADE, "t": 1767623462}, "bad_timestamp"),
        ({k: v for k, v in REST_TRADE.items() if k != "t"}, "bad_timestamp"),
        ({**REST_TRADE, "p": "590.0"}, "bad_field_type"),
        ({**REST_TRADE, "p": True}, "bad_field_type"),
        ({**REST_TRADE, "i": 1.5}, "bad_field_type"),
        ({**REST_TRADE, "c": [1]}, "bad_field_type"),
        ("trade", "not_an_object"),
    ],
)
def test_bad_ticks_are_skipped_with_a_reason(item: object, reason: str) -> None:
    page = parse_ticks_page("trades", orjson.dumps({"trades": {"SPY": [item, REST_TRADE]}}))
    assert page.skipped == [reason] and len(page.ticks) == 1


@pytest.mark.parametrize(
    "body", [b"nope", b"[]", b'{"trades": []}', b'{"trades": {}, "next_page_token": 7}']
)
def test_unusable_tick_pages_raise(body: bytes) -> None:
    with pytest.raises(RestBarsError):
        parse_ticks_page("trades", body)
    assert parse_ticks_page("quotes", b'{"quotes": null, "next_page_token": null}').ticks == []


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=12,
)  # fmt: skip
_tick_like = st.fixed_dictionaries(
    {}, optional={"t": st.sampled_from([T0, "2026-01-05T14:31:02Z", "bad"]) | _json,
                  "p": _json, "s": _json, "c": _json, "i": _json, "x": _json, "z": _json,
                  "ap": _json, "bp": _json, "as": _json, "bs": _json, "tks": _json,
                  "extra": _json},
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    endpoint=st.sampled_from(list(TICKS_ENDPOINTS.values())),
    doc=st.dictionaries(
        st.sampled_from(["trades", "quotes", "next_page_token"]),
        st.dictionaries(st.text(max_size=6), st.lists(_tick_like | _json, max_size=4), max_size=3)
        | _json,
        max_size=3,
    ),
    wire_format=st.sampled_from(["msgpack", "json"]),
)
def test_any_tick_page_parses_or_raises_the_one_error(
    endpoint: TicksEndpoint, doc: dict[str, object], wire_format: str
) -> None:
    """Whatever the shape, for every stream's endpoint: RestBarsError for the page, or
    ticks whose stream payloads are JSON and carry that stream's keys only (msgpack: its
    float fields floats); never another exception."""
    channel = endpoint.channel
    try:
        page = parse_ticks_page(channel, json.dumps(doc).encode(), endpoint)  # big ints too
    except RestBarsError:
        return
    for tick in page.ticks:
        payload = stream_tick(channel, tick, wire_format)
        orjson.dumps(payload)
        assert set(payload) <= endpoint.shape.fields | {"T", "S", "t"}
        assert "extra" not in payload and payload["S"] == tick.symbol
        assert payload["T"] == {"trades": "t", "quotes": "q"}[channel]
        if wire_format == "msgpack":
            assert all(type(payload[f]) is float for f in endpoint.shape.floats if f in payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_raise_the_one_error(body: bytes) -> None:
    with contextlib.suppress(RestBarsError):
        parse_ticks_page("quotes", body)


def test_the_tick_window_of_a_gap_is_clipped_by_max_seconds() -> None:
    window = tick_window(T0, "2026-01-05T14:35:00.5Z", 3600)
    assert (window.start, window.end, window.clipped) == (
        T0, "2026-01-05T14:35:00.500000000Z", False
    )  # fmt: skip
    clipped = tick_window(T0, "2026-01-05T14:35:00.5Z", 60)
    assert clipped.clipped and clipped.start == "2026-01-05T14:34:00.500000000Z"
    # the first item after the gap was a bar (its `t` is its minute's start): data resumed
    # up to two minutes later, and the ticks up to then are asked for too
    after_bar = tick_window(T0, "2026-01-05T14:35:00Z", 3600)
    assert after_bar.end == "2026-01-05T14:37:00.000000000Z" and not after_bar.clipped


# --- the backfiller's tick part, over an injected transport -------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class Sink:
    def __init__(self) -> None:
        self.items: list[DataItem] = []
        self.filled: list[dict[str, Any]] = []
        self.unfilled: list[tuple[str, dict[str, Any]]] = []

    def on_backfill_bars(self, gap: Gap, bars: list[Any]) -> None:
        raise AssertionError("bars are not backfilled here")

    def on_backfill_ticks(self, gap: Gap, channel: str, items: list[DataItem]) -> None:
        self.items.extend(items)

    def on_gap_filled(self, gap: Gap, info: dict[str, Any]) -> None:
        self.filled.append(info)

    def on_gap_unfilled(self, gap: Gap, reason: str, info: dict[str, Any]) -> None:
        self.unfilled.append((reason, info))


def _trades_server(pages: int, per_page: int = 2):
    calls: list[tuple[str, dict[str, str]]] = []

    async def get(url: str, params: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        calls.append((url, dict(params)))
        n = int(params.get("page_token", "0"))
        trades = [{**REST_TRADE, "i": n * per_page + k} for k in range(per_page)]
        token = str(n + 1) if n + 1 < pages else None
        return 200, {}, orjson.dumps({"trades": {"SPY": trades}, "next_page_token": token})

    return get, calls


def _gap(start: str = T0, end: str = "2026-01-05T14:33:00.5Z") -> Gap:
    return Gap("stocks-0:0:1", "stocks", "stocks-0", ("trades",), ("SPY",), "disconnect",
               Mark("a", start), Mark("b", end))  # fmt: skip


async def _run_ticks(pages: int, **config: Any) -> tuple[Sink, list[tuple[str, dict[str, str]]]]:
    clock = FakeClock()
    get, calls = _trades_server(pages)
    cfg = BackfillConfig(base_url="http://sim", key="k", secret="s", **config)
    client = TicksClient(cfg, TICKS_ENDPOINTS[("stocks", "trades")], get,
                         clock=clock, sleep=clock.sleep, rng=random.Random(0))  # fmt: skip
    sink = Sink()
    backfiller = Backfiller(client, sink, clock=clock, ticks=[client], bars=False)
    await backfiller._fill(_gap())
    return sink, calls


async def test_trades_backfill_pages_through_the_gap_window() -> None:
    sink, calls = await _run_ticks(3)
    assert [url for url, _ in calls] == ["http://sim/v2/stocks/trades"] * 3
    assert calls[0][1]["start"] == T0 and calls[0][1]["end"] == "2026-01-05T14:33:00.500000000Z"
    assert [item.payload["i"] for item in sink.items] == list(range(6))
    assert all(i.channel == "trades" and i.payload["T"] == "t" for i in sink.items)
    assert sink.filled == [{"start": T0, "end": "2026-01-05T14:33:00.500000000Z",
                            "trades": 6, "requests": 3}]  # fmt: skip


async def test_a_gap_with_more_ticks_than_the_cap_is_reported_unfilled() -> None:
    sink, calls = await _run_ticks(10, ticks_max_items=3)
    assert len(calls) == 2 and len(sink.items) == 4  # stops after the page reaching it
    [(reason, info)] = sink.unfilled
    assert reason == "item_cap" and info["channel"] == "trades" and info["trades"] == 4
    assert not sink.filled


async def test_a_gap_older_than_max_seconds_is_filled_from_the_limit_and_reported() -> None:
    sink, calls = await _run_ticks(1, max_seconds=60)
    assert calls[0][1]["start"] == "2026-01-05T14:32:00.500000000Z"
    [(reason, info)] = sink.unfilled
    assert reason == "too_old" and info["filled_from"] == "2026-01-05T14:32:00.500000000Z"


def test_backfiller_for_builds_tick_clients_for_crypto_and_options() -> None:
    """BACKFILL_CHANNELS=bars,trades,quotes: each shard gets a tick client per channel it
    streams that its stream has an endpoint for (crypto at its location, options trades
    only: no historical options quotes), sharing the shard's budget; the options shard,
    which streams no bars, backfills its trades alone."""
    from ray_forwarder.config import load_settings
    from ray_forwarder.ray.driver import plan_shards
    from ray_forwarder.runtime.backfill import BackfillSink, backfiller_for

    settings = load_settings(
        alpaca_api_key_id="k", alpaca_secret_key="s", kafka_bootstrap_servers="127.0.0.1:9",
        alpaca_streams="stocks,crypto,options", alpaca_channels="trades,bars",
        alpaca_crypto_symbols="BTC/USD", alpaca_crypto_channels="trades,quotes,bars",
        alpaca_crypto_location="eu-1",
        alpaca_options_symbols="SPY260116C00590000", alpaca_options_channels="trades,quotes",
        backfill_channels="bars,trades,quotes",
    )  # fmt: skip
    built = {
        spec.stream: backfiller_for(settings, spec, BackfillSink())
        for spec in plan_shards(settings)
    }
    paths = {
        stream: (b.fill_bars, [(c.channel, c.path) for c in b.ticks])  # type: ignore[union-attr]
        for stream, b in built.items()
    }
    assert paths == {
        "stocks": (True, [("trades", "/v2/stocks/trades")]),
        "crypto": (True, [("trades", "/v1beta3/crypto/eu-1/trades"),
                          ("quotes", "/v1beta3/crypto/eu-1/quotes")]),
        "options": (False, [("trades", "/v1beta1/options/trades")]),
    }  # fmt: skip
    for backfiller in built.values():
        assert backfiller is not None
        assert all(c.budget is backfiller.client.budget for c in backfiller.ticks)
    options = built["options"]
    assert options is not None and options.ticks[0].max_symbols == 100
