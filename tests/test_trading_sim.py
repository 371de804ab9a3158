"""The trading simulator's order flow: realistic lifecycles, deterministic, Alpaca's shapes."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

from ray_forwarder_dev.sim.orders import OrderFlow, OrdersConfig

TERMINAL = {"fill", "canceled", "expired", "replaced", "rejected"}


def test_every_lifecycle_is_one_an_order_can_have() -> None:
    flow = OrderFlow(OrdersConfig(seed=5))
    events = flow.next_events(3000)
    by_order: dict[str, list[dict]] = defaultdict(list)
    for data in events:
        by_order[data["order"]["id"]].append(data)
    finished = 0
    for history in by_order.values():
        kinds = [d["event"] for d in history]
        assert kinds[0] in ("new", "rejected")
        assert all(k not in TERMINAL for k in kinds[:-1]), kinds  # nothing after the end
        fills = [d for d in history if d["event"] in ("partial_fill", "fill")]
        assert len({d["execution_id"] for d in fills}) == len(fills)
        filled = sum((Decimal(d["qty"]) for d in fills), Decimal(0))
        assert Decimal(history[-1]["order"]["filled_qty"]) == filled
        if kinds[-1] == "fill":
            finished += 1
            assert filled == Decimal(history[-1]["order"]["qty"])
            assert history[-1]["order"]["status"] == "filled"
        assert all("timestamp" in d for d in history if d["event"] != "new")
        stamps = [d["order"]["updated_at"] for d in history]
        assert stamps == sorted(stamps)
    assert finished > 50
    kinds = {d["event"] for d in events}
    assert kinds >= {"new", "partial_fill", "fill", "canceled", "expired", "replaced", "rejected"}


def test_a_replaced_order_is_followed_by_its_replacement() -> None:
    events = OrderFlow(OrdersConfig(seed=2)).next_events(2000)
    replaced = [d for d in events if d["event"] == "replaced"]
    assert replaced
    firsts = {d["order"]["id"]: d for d in events if d["event"] == "new"}
    for data in replaced:
        successor = data["order"]["replaced_by"]
        if successor in firsts:
            assert firsts[successor]["order"]["replaces"] == data["order"]["id"]


def test_the_same_seed_gives_the_same_events_however_the_calls_are_split() -> None:
    one = OrderFlow(OrdersConfig(seed=9)).next_events(300)
    flow = OrderFlow(OrdersConfig(seed=9))
    two = flow.next_events(100) + flow.next_events(200)
    assert one == two
