"""What the simulator serves for each Alpaca stream: its URL path, its REST bars path, and
how the synthetic (stock-shaped) market's items become that stream's items.

Channels, subscribe keys and item types come from the forwarder's stream table
(`ray_forwarder.alpaca.streams.STREAMS`); only what a stream's items look like and where it
lives is here. A new stream needs a `SimStream` entry.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from ray_forwarder.alpaca.channels import TRADE_COMPANION_CHANNELS
from ray_forwarder.alpaca.streams import STREAMS, StreamDefinition
from ray_forwarder_dev.sim.generator import Item

#: An item of the synthetic market -> the stream's item (None: the stream has no such item).
Transform = Callable[[Item], Item | None]


@dataclass(frozen=True)
class SimStream:
    name: str
    path: re.Pattern[str]
    url_path: Callable[[str], str]  # feed (or location) -> path
    transform: Transform
    #: Only msgpack is served (the options stream): a JSON client gets an error and is closed.
    msgpack_only: bool = False
    #: Subscription reply extras: the stock reply lists corrections/cancelErrors too.
    companions: bool = False
    #: Feed (or location) -> the historical bars path served from the same market (None:
    #: none). Mirrors `ray_forwarder.alpaca.rest_bars.BARS_ENDPOINTS`.
    rest_bars_path: Callable[[str], str] | None = None
    #: The historical API answers without credentials (crypto); wrong ones still get 401.
    rest_open: bool = False
    #: Feed (or location) -> {historical trades/quotes path: channel} served from the same
    #: market. Mirrors `ray_forwarder.alpaca.rest_ticks.TICKS_ENDPOINTS`.
    rest_tick_paths: Callable[[str], dict[str, str]] = lambda _feed: {}

    @property
    def definition(self) -> StreamDefinition:
        return STREAMS[self.name]

    def subscription_of(self, item: Item) -> tuple[str, str]:
        """(subscribe key, symbol) an item is sent for."""
        definition = self.definition
        channel = definition.by_name[definition.channel_by_type[item["T"]]]
        symbols = item.get("symbols")
        symbol = symbols[0] if isinstance(symbols, list) and symbols else item.get("S", "")
        return channel.subscribe_as, symbol


def _stocks(item: Item) -> Item | None:
    return item


def _spread(item: Item) -> int:
    return zlib.crc32(f"{item['S']}{item['t']}".encode())


def _crypto(item: Item) -> Item | None:
    kind = item["T"]
    if kind == "t":
        return {
            "T": "t", "S": item["S"], "p": item["p"], "s": item["s"] / 100, "t": item["t"],
            "i": item["i"], "tks": "B" if item["i"] % 2 else "S",
        }  # fmt: skip
    if kind == "q":
        if _spread(item) % 10 == 0:  # now and then an order book update instead
            return {
                "T": "o", "S": item["S"], "t": item["t"], "r": False,
                "b": [{"p": item["bp"], "s": item["bs"] / 10}],
                "a": [{"p": item["ap"], "s": item["as"] / 10}],
            }  # fmt: skip
        return {
            "T": "q", "S": item["S"], "bp": item["bp"], "bs": item["bs"] / 10,
            "ap": item["ap"], "as": item["as"] / 10, "t": item["t"],
        }  # fmt: skip
    if kind in ("b", "u", "d"):
        return item
    return None  # no statuses, LULDs, corrections or cancels on crypto


def _options(item: Item) -> Item | None:
    kind = item["T"]
    if kind == "t":  # one condition string, not a list; no trade id
        return {
            "T": "t", "S": item["S"], "t": item["t"], "p": item["p"], "s": item["s"],
            "x": item["x"], "c": "I",
        }  # fmt: skip
    if kind == "q":
        return {
            "T": "q", "S": item["S"], "t": item["t"], "bx": item["bx"], "bp": item["bp"],
            "bs": item["bs"], "ax": item["ax"], "ap": item["ap"], "as": item["as"], "c": "A",
        }  # fmt: skip
    return None


def _news(item: Item) -> Item | None:
    if item["T"] != "t":
        return None
    article = item["i"]
    return {
        "T": "n",
        "id": article,
        "headline": f"{item['S']} moves (sim article {article})",
        "summary": "",
        "author": "ray-forwarder simulator",
        "created_at": item["t"],
        "updated_at": item["t"],
        "url": f"https://example.invalid/news/{article}",
        "content": "<p>synthetic</p>",
        "symbols": [item["S"]],
        "source": "sim",
    }


SIM_STREAMS: dict[str, SimStream] = {
    s.name: s
    for s in (
        SimStream(
            "stocks",
            re.compile(r"^/(v2|v1beta1)/[A-Za-z0-9_.\-]+/?$"),
            lambda feed: f"/v2/{feed}",
            _stocks,
            companions=True,
            rest_bars_path=lambda _feed: "/v2/stocks/bars",
            rest_tick_paths=lambda _feed: {
                "/v2/stocks/trades": "trades",
                "/v2/stocks/quotes": "quotes",
            },
        ),
        SimStream(
            "crypto",
            re.compile(r"^/v1beta3/crypto/[a-z0-9\-]+/?$"),
            lambda loc: f"/v1beta3/crypto/{loc}",
            _crypto,
            rest_bars_path=lambda loc: f"/v1beta3/crypto/{loc}/bars",
            rest_open=True,
            rest_tick_paths=lambda loc: {
                f"/v1beta3/crypto/{loc}/trades": "trades",
                f"/v1beta3/crypto/{loc}/quotes": "quotes",
            },
        ),
        SimStream(
            "options",
            re.compile(r"^/v1beta1/(indicative|opra)/?$"),
            lambda feed: f"/v1beta1/{feed}",
            _options,
            msgpack_only=True,
            rest_bars_path=lambda _feed: "/v1beta1/options/bars",
            # trades only: Alpaca has no historical options quotes
            rest_tick_paths=lambda _feed: {"/v1beta1/options/trades": "trades"},
        ),
        SimStream("news", re.compile(r"^/v1beta1/news/?$"), lambda _: "/v1beta1/news", _news),
    )
}

#: The feed (or location) each stream's URL names by default.
DEFAULT_FEEDS = {"stocks": "sip", "crypto": "us", "options": "indicative", "news": "news"}
#: Companion channels of the stock stream, listed in its subscription reply.
COMPANIONS = TRADE_COMPANION_CHANNELS
