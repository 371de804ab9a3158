"""Deterministic order lifecycles in the shape of Alpaca's `trade_updates` events. Pure.

A few orders are open at a time; each step advances one of them by one event, so the
events of different orders interleave as on a real account. Lifecycles (docs/streams.md
§ 6.3): `new` → `partial_fill`* → `fill`; `new` → (`partial_fill`) → `canceled`;
`new` → `expired`; `rejected`; `new` → `replaced`, whose replacement order (with
`replaces`) then lives its own lifecycle. Fills carry `execution_id`, `price`, `qty` and
`position_qty` (strings, as Alpaca sends them); every event but `new` carries `timestamp`
(`new` has none in Alpaca's documentation: the forwarder must fall back to the order's
`updated_at`). The same seed always yields the same events.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ray_forwarder_dev.sim.generator import format_ns, parse_base_time

TradeData = dict[str, Any]
_PRICES = {"SPY": 590.0, "QQQ": 520.0, "AAPL": 230.0, "MSFT": 430.0}
#: Lifecycle kinds and their weights.
_KINDS = (("fill", 0.5), ("cancel", 0.2), ("replace", 0.12), ("expire", 0.08), ("reject", 0.1))


@dataclass(frozen=True)
class OrdersConfig:
    symbols: tuple[str, ...] = ("SPY", "QQQ", "AAPL")
    seed: int = 0
    base_time: str = "2026-01-05T14:30:00Z"
    open_orders: int = 4  # orders in flight at a time
    step_ns: int = 250_000_000  # simulated time between events


@dataclass
class _Order:
    snapshot: dict[str, Any]
    script: list[str]  # events still to come
    fills_left: list[Decimal] = field(default_factory=list)  # partial quantities
    successor_id: str | None = None  # the replacing order's id, once replaced


class OrderFlow:
    """`next_events(n)`: the next n trade update `data` objects, in send order."""

    def __init__(self, config: OrdersConfig | None = None) -> None:
        self.config = config or OrdersConfig()
        self._rng = random.Random(self.config.seed)
        self._now = parse_base_time(self.config.base_time)
        self._open: list[_Order] = []
        self._position: defaultdict[str, Decimal] = defaultdict(Decimal)
        self.emitted = 0
        self.orders = 0

    def next_events(self, n: int) -> list[TradeData]:
        return [self._next() for _ in range(n)]

    def _next(self) -> TradeData:
        while len(self._open) < self.config.open_orders:
            self._open.append(self._new_order())
        order = self._open[self._rng.randrange(len(self._open))]
        event = order.script.pop(0)
        data = self._event(order, event)
        if not order.script:
            self._open.remove(order)
            if event == "replaced":
                self._open.append(self._new_order(replaces=order))
        self.emitted += 1
        return data

    # --- orders ---------------------------------------------------------------------

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _tick(self) -> str:
        self._now += self.config.step_ns + self._rng.randrange(self.config.step_ns)
        return format_ns(self._now)

    def _new_order(self, replaces: _Order | None = None) -> _Order:
        rng = self._rng
        self.orders += 1
        if replaces is not None:
            old = replaces.snapshot
            symbol, side, qty = old["symbol"], old["side"], Decimal(old["qty"]) + 1
            kind = "fill"
        else:
            symbol = rng.choice(self.config.symbols)
            side = rng.choice(("buy", "sell"))
            qty = Decimal(rng.randint(1, 40))
            kind = rng.choices([k for k, _ in _KINDS], [w for _, w in _KINDS])[0]
        price = Decimal(str(round(_PRICES.get(symbol, 100.0) * rng.uniform(0.98, 1.02), 2)))
        created = format_ns(self._now)
        snapshot: dict[str, Any] = {
            "id": (replaces and replaces.successor_id) or self._uuid(),
            "client_order_id": self._uuid(),
            "created_at": created,
            "updated_at": created,
            "submitted_at": created,
            "filled_at": None,
            "expired_at": None,
            "canceled_at": None,
            "failed_at": None,
            "replaced_at": None,
            "replaced_by": None,
            "replaces": replaces.snapshot["id"] if replaces is not None else None,
            "asset_id": str(uuid.UUID(int=_stable(symbol), version=4)),
            "symbol": symbol,
            "asset_class": "us_equity",
            "notional": None,
            "qty": str(qty),
            "filled_qty": "0",
            "filled_avg_price": None,
            "order_class": "",
            "order_type": "limit",
            "type": "limit",
            "side": side,
            "time_in_force": "day",
            "limit_price": str(price),
            "stop_price": None,
            "status": "new",
            "extended_hours": False,
            "legs": None,
        }
        order = _Order(snapshot, [])
        if kind == "reject":
            order.script = ["rejected"]
        elif kind == "expire":
            order.script = ["new", "expired"]
        elif kind == "replace":
            order.script = ["new", "replaced"]
        elif kind == "cancel":
            partial = rng.random() < 0.5 and qty > 1
            order.fills_left = [qty // 2] if partial else []
            order.script = ["new", *(["partial_fill"] if partial else []), "canceled"]
        else:
            parts = _split(qty, rng.randint(1, 4), rng)
            order.fills_left = parts
            order.script = ["new", *(["partial_fill"] * (len(parts) - 1)), "fill"]
        return order

    def _event(self, order: _Order, event: str) -> TradeData:
        ts = self._tick()
        snap = order.snapshot
        snap["updated_at"] = ts
        data: TradeData = {"event": event}
        if event in ("partial_fill", "fill"):
            qty = order.fills_left.pop(0)
            price = Decimal(snap["limit_price"]) - Decimal(self._rng.randrange(0, 5)) / 100
            filled_before = Decimal(snap["filled_qty"])
            avg_before = Decimal(snap["filled_avg_price"] or 0)
            filled = filled_before + qty
            avg = (avg_before * filled_before + price * qty) / filled
            signed = qty if snap["side"] == "buy" else -qty
            self._position[snap["symbol"]] += signed
            snap.update(
                filled_qty=str(filled), filled_avg_price=str(avg.quantize(Decimal("0.0001")))
            )
            snap["status"] = "filled" if event == "fill" else "partially_filled"
            if event == "fill":
                snap["filled_at"] = ts
            data.update(
                execution_id=self._uuid(),
                price=str(price),
                qty=str(qty),
                position_qty=str(self._position[snap["symbol"]]),
            )
        elif event == "canceled":
            snap.update(status="canceled", canceled_at=ts)
        elif event == "expired":
            snap.update(status="expired", expired_at=ts)
        elif event == "rejected":
            snap.update(status="rejected", failed_at=ts)
        elif event == "replaced":
            order.successor_id = self._uuid()
            snap.update(status="replaced", replaced_at=ts, replaced_by=order.successor_id)
        if event != "new":
            data["timestamp"] = ts
        data["order"] = dict(snap)
        return data


def _split(qty: Decimal, parts: int, rng: random.Random) -> list[Decimal]:
    """`qty` in up to `parts` positive whole pieces."""
    parts = max(1, min(parts, int(qty)))
    cuts = sorted(rng.sample(range(1, int(qty)), parts - 1)) if parts > 1 else []
    bounds = [0, *cuts, int(qty)]
    return [Decimal(b - a) for a, b in itertools.pairwise(bounds)]


def _stable(text: str) -> int:
    return int.from_bytes(text.encode().ljust(16, b"\0")[:16], "big")
