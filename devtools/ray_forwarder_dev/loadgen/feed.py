"""The feed of one benchmark run, built before the clock starts. Pure: no clock, no sockets.

`build_feed` draws the items from the simulator's synthetic market (same seed, same items)
and sprinkles byte-identical redeliveries of recent items of the same symbol (what Alpaca
sends after a reconnect), which the system under test must drop. `frames_for` turns the
items one subscription wants into ready-to-send WebSocket payloads, JSON or msgpack.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson

from ray_forwarder_dev.sim.generator import Item, Market, MarketConfig
from ray_forwarder_dev.sim.server import (
    SUBSCRIPTION_BY_TYPE,
    encode_msgpack_item,
    msgpack_array_header,
)

#: Channels the benchmark subscribes to (the forwarder's defaults).
BENCH_CHANNELS = ("trades", "quotes", "bars", "updatedBars")
#: Nominal market density for flat-out runs (ticks per real second before time_scale).
_FLAT_OUT_DENSITY = 20_000.0
_RECENT_PER_SYMBOL = 16


def bench_symbols(n: int) -> list[str]:
    """`n` distinct made-up tickers (S0000, S0001, ...)."""
    return [f"S{i:04d}" for i in range(n)]


def item_key(item: Mapping) -> str:
    """What identifies an item end to end: a digest of its content with sorted keys, so an
    envelope's `payload` (the same item, field order aside) maps back to it."""
    data = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass(frozen=True)
class FeedSpec:
    symbols: int = 100
    events: int = 60_000  # distinct items
    duplicate_ratio: float = 0.01
    seed: int = 0
    rate: float = 0.0  # items/s for the market's density; 0 = flat out
    time_scale: float = 600.0


@dataclass
class Feed:
    """Items in send order (redeliveries included); `origin[i]` is the index of the first
    occurrence of item i (itself unless it is a redelivery)."""

    items: list[Item]
    origin: list[int]
    keys: list[str] = field(default_factory=list)  # item_key per distinct item index

    @property
    def distinct(self) -> int:
        return sum(1 for i, o in enumerate(self.origin) if i == o)


def build_feed(spec: FeedSpec) -> Feed:
    density = (spec.rate or _FLAT_OUT_DENSITY) / spec.time_scale
    market = Market(
        MarketConfig(
            symbols=tuple(bench_symbols(spec.symbols)),
            seed=spec.seed,
            ticks_per_second=density,
            status_ratio=0.0,  # statuses and LULDs need channels the bench does not use
            luld_ratio=0.0,
        )
    )
    rng = random.Random(spec.seed ^ 0xFEED)
    items: list[Item] = []
    origin: list[int] = []
    recent: dict[str, list[int]] = {}
    distinct = 0
    while distinct < spec.events:
        for item in market.next_events(min(1000, spec.events - distinct)):
            if SUBSCRIPTION_BY_TYPE[item["T"]] not in BENCH_CHANNELS:
                continue  # daily bars: not subscribed
            if distinct == spec.events:
                break
            index = len(items)
            items.append(item)
            origin.append(index)
            distinct += 1
            history = recent.setdefault(item["S"], [])
            if history and spec.duplicate_ratio > 0 and rng.random() < spec.duplicate_ratio:
                again = history[rng.randrange(len(history))]
                items.append(items[again])
                origin.append(again)
            history.append(index)
            del history[:-_RECENT_PER_SYMBOL]
    keys = [item_key(item) if origin[i] == i else "" for i, item in enumerate(items)]
    return Feed(items, origin, keys)


@dataclass(frozen=True)
class Frames:
    """One connection's payloads, and the feed indices of the items in each."""

    payloads: list[bytes]
    members: list[list[int]]
    text: bool  # JSON is sent as text frames, msgpack as binary

    @property
    def items(self) -> int:
        return sum(len(m) for m in self.members)


def wanted(subscription: Mapping[str, Iterable[str]]) -> dict[str, set[str] | None]:
    """channel -> symbols (None: every symbol) from a subscribe message's lists."""
    out: dict[str, set[str] | None] = {}
    for channel in BENCH_CHANNELS:
        symbols = set(subscription.get(channel, ()))
        if symbols:
            out[channel] = None if "*" in symbols else symbols
    return out


def frames_for(
    feed: Feed,
    subscription: Mapping[str, Iterable[str]],
    *,
    use_msgpack: bool,
    items_per_frame: int = 50,
) -> Frames:
    """The frames one connection with this subscription receives, in feed order."""
    want = wanted(subscription)
    encoded: dict[int, bytes] = {}
    chosen: list[int] = []
    for index, item in enumerate(feed.items):
        symbols = want.get(SUBSCRIPTION_BY_TYPE[item["T"]], set())
        if symbols is None or item["S"] in symbols:
            chosen.append(index)
    payloads: list[bytes] = []
    members: list[list[int]] = []
    for start in range(0, len(chosen), items_per_frame):
        chunk = chosen[start : start + items_per_frame]
        parts = []
        for index in chunk:
            first = feed.origin[index]
            data = encoded.get(first)
            if data is None:
                item = feed.items[first]
                data = encode_msgpack_item(item) if use_msgpack else orjson.dumps(item)
                encoded[first] = data
            parts.append(data)
        if use_msgpack:
            payloads.append(msgpack_array_header(len(parts)) + b"".join(parts))
        else:
            payloads.append(b"[" + b",".join(parts) + b"]")
        members.append(chunk)
    return Frames(payloads, members, text=not use_msgpack)
