"""A deterministic synthetic market in Alpaca's item shapes. Pure: no clock, no sockets.

The caller drives it ("the next n items", "everything up to simulated time T"), so tests can
check exact content without sleeping, and the same seed always yields the same items no
matter how the calls are split. Every item is a plain JSON-compatible dict whose `t` is the
canonical timestamp string (nine fractional digits, `Z`).

Shape of the market: trades and quotes (and, at low configurable ratios, trading statuses,
LULD bands, corrections and cancel/errors) arrive as "ticks" at strictly increasing times.
At each minute mark comes one `b` bar per symbol that traded in the closed minute, plus a
`d` daily bar (running day aggregate) for it; after the following half-minute mark, a
fraction of those bars get a `u` updated bar with the same `t` and changed content.
"""

from __future__ import annotations

import heapq
import random
import zlib
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ray_forwarder.alpaca.timestamps import from_unix_nanos

NS = 1_000_000_000
MINUTE_NS = 60 * NS
HALF_MINUTE_NS = 30 * NS
#: Daily bars start at midnight New York time; the default base date is in winter (EST).
DAY_START_UTC_OFFSET_NS = 5 * 3600 * NS

Item = dict[str, Any]

_EXCHANGES = ("V", "Q", "N", "P", "K", "Z", "D")
_TAPES = ("A", "B", "C")
_KNOWN_PRICES = {"SPY": 590.0, "QQQ": 520.0, "AAPL": 230.0, "MSFT": 430.0, "FAKEPACA": 100.0}


def format_ns(ns: int) -> str:
    """Canonical timestamp string for Unix nanoseconds."""
    return from_unix_nanos(ns // NS, ns % NS)


def parse_base_time(value: str) -> int:
    """Unix nanoseconds for an RFC 3339 string (whole seconds are plenty for a base)."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"base time needs a zone: {value!r}")
    return int(moment.timestamp()) * NS + moment.microsecond * 1000


@dataclass(frozen=True)
class MarketConfig:
    """What the synthetic market looks like; every ratio is a fraction of ticks or bars."""

    symbols: tuple[str, ...] = ("SPY", "QQQ")
    seed: int = 0
    base_time: str = "2026-01-05T14:30:00Z"
    ticks_per_second: float = 200.0 / 60.0  # mean ticks per *simulated* second
    quote_ratio: float = 0.55
    updated_bar_ratio: float = 0.3
    status_ratio: float = 0.01
    luld_ratio: float = 0.02
    correction_ratio: float = 0.01
    cancel_error_ratio: float = 0.01
    #: Trades (and quotes) kept for the REST trades/quotes endpoints, over all symbols: the
    #: oldest are forgotten beyond it, so a benchmark's millions of items are not all held.
    tick_history: int = 20_000

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("the market needs at least one symbol")
        if self.ticks_per_second <= 0:
            raise ValueError("ticks_per_second must be positive")


@dataclass
class _Agg:
    """Running OHLCV aggregate for one symbol over a minute or a day."""

    o: float = 0.0
    h: float = 0.0
    low: float = 0.0
    c: float = 0.0
    v: int = 0
    pv: float = 0.0
    n: int = 0

    def add(self, price: float, size: int) -> None:
        if self.n == 0:
            self.o = self.h = self.low = price
        self.h = max(self.h, price)
        self.low = min(self.low, price)
        self.c = price
        self.v += size
        self.pv += price * size
        self.n += 1

    def bar(self, kind: str, symbol: str, ts: str) -> Item:
        return {
            "T": kind,
            "S": symbol,
            "o": self.o,
            "h": self.h,
            "l": self.low,
            "c": self.c,
            "v": self.v,
            "vw": round(self.pv / self.v, 4),
            "n": self.n,
            "t": ts,
        }


@dataclass
class _Symbol:
    """Per-symbol market state."""

    name: str
    price: float
    tape: str
    minute: _Agg = field(default_factory=_Agg)
    day: _Agg = field(default_factory=_Agg)
    recent_trades: list[Item] = field(default_factory=list)
    halted: bool = False


class Market:
    """The synthetic market. Not thread-safe; one owner drives it."""

    def __init__(self, config: MarketConfig | None = None) -> None:
        self.config = config or MarketConfig()
        self._rng = random.Random(self.config.seed)
        base = parse_base_time(self.config.base_time)
        self._base_ns = base
        self._now_ns = base
        self._day_ns = _day_start_ns(base)
        self._day_start = format_ns(self._day_ns)
        self._symbols = [self._new_symbol(s) for s in self.config.symbols]
        self._heap: list[tuple[int, int, Item]] = []
        self._push_seq = 0
        self._next_mark_ns = (base // MINUTE_NS + 1) * MINUTE_NS
        self._last_tick_ns = base
        self._next_tick_ns = base + self._gap_ns()
        self._next_trade_id = 1
        self._emitted = 0
        # Deterministic spacing of the rare kinds: an accumulator per kind, started halfway
        # so each kind shows up early in a run instead of only after 1/ratio ticks.
        self._specials: dict[str, float] = {k: 0.5 for k in ("l", "s", "c", "x")}
        self._update_acc = 0.5
        #: Every closed minute's bar per symbol, as its latest revision (an updated bar's
        #: content where one follows): what the REST bars endpoint serves, so a backfill
        #: returns exactly what a dropped connection missed. (mark ns, bar) in time order.
        self.minute_bars: dict[str, list[tuple[int, Item]]] = {}
        #: Every trade (`t`) and quote (`q`), as streamed, oldest first: what the REST
        #: trades/quotes endpoints serve (the last `tick_history` of each kind).
        self.ticks: dict[str, deque[Item]] = {
            kind: deque(maxlen=self.config.tick_history) for kind in ("t", "q")
        }

    # --- driving ----------------------------------------------------------------------

    @property
    def now_ns(self) -> int:
        """Simulated time of the latest item handed out (or the latest advance target)."""
        return self._now_ns

    @property
    def now(self) -> str:
        return format_ns(self._now_ns)

    @property
    def emitted(self) -> int:
        """Items handed out so far."""
        return self._emitted

    def next_events(self, n: int) -> list[Item]:
        """The next `n` items in emission order, advancing the clock as far as needed."""
        out: list[Item] = []
        while len(out) < n:
            if not self._heap or self._heap[0][0] > self._next_tick_ns:
                self._tick()
                continue
            emit_ns = self._heap[0][0]
            if emit_ns >= self._next_mark_ns:
                self._process_marks(emit_ns)
                continue
            _, _, item = heapq.heappop(self._heap)
            self._now_ns = max(self._now_ns, emit_ns)
            out.append(item)
        self._emitted += len(out)
        return out

    def advance_to(self, sim_ns: int | str) -> list[Item]:
        """Every item due at or before simulated time `sim_ns` (nanoseconds or RFC 3339)."""
        target = parse_base_time(sim_ns) if isinstance(sim_ns, str) else sim_ns
        while self._next_tick_ns <= target:
            self._tick()
        self._process_marks(target)
        out: list[Item] = []
        while self._heap and self._heap[0][0] <= target:
            out.append(heapq.heappop(self._heap)[2])
        self._now_ns = max(self._now_ns, target)
        self._emitted += len(out)
        return out

    # --- internals --------------------------------------------------------------------

    def _new_symbol(self, name: str) -> _Symbol:
        crc = zlib.crc32(name.encode())
        price = _KNOWN_PRICES.get(name, 20.0 + (crc % 48_000) / 100.0)
        return _Symbol(name=name, price=price, tape=_TAPES[crc % len(_TAPES)])

    def _gap_ns(self) -> int:
        return max(1, int(self._rng.expovariate(self.config.ticks_per_second) * NS))

    def _push(self, emit_ns: int, item: Item) -> None:
        self._push_seq += 1
        heapq.heappush(self._heap, (emit_ns, self._push_seq, item))

    def _tick(self) -> None:
        """Generate the tick due at `_next_tick_ns` (minute marks before it come first)."""
        ts_ns = self._next_tick_ns
        self._process_marks(ts_ns)
        day_ns = _day_start_ns(ts_ns)
        if day_ns != self._day_ns:  # a new trading day: daily aggregates start over
            self._day_ns, self._day_start = day_ns, format_ns(day_ns)
            for sym in self._symbols:
                sym.day = _Agg()
        item = self._tick_item(ts_ns)
        self._push(ts_ns, item)
        self._last_tick_ns = ts_ns
        self._next_tick_ns = ts_ns + self._gap_ns()

    def _tick_item(self, ts_ns: int) -> Item:
        rng = self._rng
        for kind in self._specials:
            self._specials[kind] += getattr(self.config, _RATIO_FIELD[kind])
        sym = self._symbols[rng.randrange(len(self._symbols))]
        self._walk(sym)
        ts = format_ns(ts_ns)
        for kind, acc in self._specials.items():
            if acc < 1.0:
                continue
            special = self._special_item(kind, sym, ts)
            if special is not None:
                self._specials[kind] -= 1.0
                return special
        if rng.random() < self.config.quote_ratio:
            return self._quote(sym, ts)
        return self._trade(sym, ts)

    def _walk(self, sym: _Symbol) -> None:
        step = self._rng.gauss(0.0, max(0.01, sym.price * 0.0003))
        sym.price = max(1.0, round(sym.price + step, 2))

    def _trade(self, sym: _Symbol, ts: str) -> Item:
        rng = self._rng
        size = rng.choice((1, 5, 10, 50, 100, 100, 100, 200, 300, 500))
        trade: Item = {
            "T": "t",
            "S": sym.name,
            "i": self._take_trade_id(),
            "x": rng.choice(_EXCHANGES),
            "p": sym.price,
            "s": size,
            "c": ["@"] if size >= 100 else ["@", "I"],
            "t": ts,
            "z": sym.tape,
        }
        sym.minute.add(sym.price, size)
        sym.day.add(sym.price, size)
        sym.recent_trades.append(trade)
        del sym.recent_trades[:-16]
        self.ticks["t"].append(trade)
        return trade

    def _quote(self, sym: _Symbol, ts: str) -> Item:
        rng = self._rng
        bid = round(sym.price - 0.01 * rng.randint(0, 3), 2)
        ask = round(bid + 0.01 * rng.randint(1, 4), 2)
        quote: Item = {
            "T": "q",
            "S": sym.name,
            "ax": rng.choice(_EXCHANGES),
            "ap": ask,
            "as": rng.randint(1, 20),
            "bx": rng.choice(_EXCHANGES),
            "bp": bid,
            "bs": rng.randint(1, 20),
            "c": ["R"],
            "t": ts,
            "z": sym.tape,
        }
        self.ticks["q"].append(quote)
        return quote

    def _special_item(self, kind: str, sym: _Symbol, ts: str) -> Item | None:
        """A rare item for `sym`, or None when it cannot apply yet (nothing to correct)."""
        if kind == "l":
            return {
                "T": "l",
                "S": sym.name,
                "u": round(sym.price * 1.05, 2),
                "d": round(sym.price * 0.95, 2),
                "i": "B",
                "t": ts,
                "z": sym.tape,
            }
        if kind == "s":
            sym.halted = not sym.halted
            code, message, reason, reason_msg = (
                ("H", "Trading Halt", "T1", "Halt News Pending")
                if sym.halted
                else ("T", "Trading Resumption", "", "")
            )
            return {
                "T": "s",
                "S": sym.name,
                "sc": code,
                "sm": message,
                "rc": reason,
                "rm": reason_msg,
                "t": ts,
                "z": sym.tape,
            }
        if not sym.recent_trades:
            return None
        original = sym.recent_trades.pop(self._rng.randrange(len(sym.recent_trades)))
        if kind == "c":
            return {
                "T": "c",
                "S": sym.name,
                "x": original["x"],
                "oi": original["i"],
                "op": original["p"],
                "os": original["s"],
                "oc": original["c"],
                "ci": self._take_trade_id(),
                "cp": round(original["p"] + 0.01, 2),
                "cs": original["s"],
                "cc": original["c"],
                "t": ts,
                "z": sym.tape,
            }
        return {
            "T": "x",
            "S": sym.name,
            "i": original["i"],
            "x": original["x"],
            "p": original["p"],
            "s": original["s"],
            "a": "C",
            "t": ts,
            "z": sym.tape,
        }

    def _take_trade_id(self) -> int:
        trade_id = self._next_trade_id
        self._next_trade_id += 1
        return trade_id

    def _process_marks(self, upto_ns: int) -> None:
        """Close every minute whose end mark is at or before `upto_ns`."""
        while self._next_mark_ns <= upto_ns:
            mark = self._next_mark_ns
            minute_start = format_ns(mark - MINUTE_NS)
            for sym in self._symbols:
                if sym.minute.n == 0:
                    continue
                bar = sym.minute.bar("b", sym.name, minute_start)
                self._push(mark, bar)
                self._push(mark, sym.day.bar("d", sym.name, self._day_start))
                latest = bar
                self._update_acc += self.config.updated_bar_ratio
                if self._update_acc >= 1.0:
                    self._update_acc -= 1.0
                    latest = self._late_revision(sym.minute, bar)
                    self._push(mark + HALF_MINUTE_NS + 1, latest)
                self.minute_bars.setdefault(sym.name, []).append((mark, latest))
                sym.minute = _Agg()
            self._next_mark_ns = mark + MINUTE_NS

    def _late_revision(self, minute: _Agg, bar: Item) -> Item:
        """The bar as if a late trade had arrived: same `t`, different content."""
        revised = _Agg(**vars(minute))
        price = round(bar["c"] + 0.01 * self._rng.randint(-5, 5), 2)
        revised.add(price, self._rng.randint(1, 200))
        revised.c = bar["c"]  # a late trade is older than the close
        return revised.bar("u", bar["S"], bar["t"])


def _day_start_ns(ns: int) -> int:
    day = 1440 * MINUTE_NS
    return (ns - DAY_START_UTC_OFFSET_NS) // day * day + DAY_START_UTC_OFFSET_NS


_RATIO_FIELD = {
    "l": "luld_ratio",
    "s": "status_ratio",
    "c": "correction_ratio",
    "x": "cancel_error_ratio",
}


def bars_between(market: Market, symbol: str, start_ns: int, end_ns: int) -> list[Item]:
    """`symbol`'s minute bars (latest revision) whose `t` is in [start_ns, end_ns] and whose
    minute has closed by the market's current time, oldest first."""
    out: list[Item] = []
    for mark, bar in market.minute_bars.get(symbol, ()):
        if mark > market.now_ns:
            break
        t_ns = mark - MINUTE_NS
        if start_ns <= t_ns <= end_ns:
            out.append(bar)
    return out


def ticks_between(market: Market, kind: str, symbol: str, start: str, end: str) -> list[Item]:
    """`symbol`'s trades (`kind` "t") or quotes ("q") whose `t` is in [start, end]
    (canonical strings: string order is time order) and that the market has handed out
    by its current time, oldest first."""
    now = market.now
    return [
        item
        for item in market.ticks[kind]
        if item["S"] == symbol and start <= item["t"] <= end and item["t"] <= now
    ]
