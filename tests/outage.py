"""An outage of the simulator's connections, timed in its market's clock (gap tests)."""

from __future__ import annotations

from dataclasses import dataclass

from ray_forwarder_dev.sim import SimulatorThread
from ray_forwarder_dev.sim.generator import MINUTE_NS


def market_ns(sim: SimulatorThread) -> int:
    """The simulator's market time (it runs faster than the wall clock)."""
    return sim.call(lambda: sim.simulator.market.now_ns)


@dataclass
class MarketOutage:
    """Once `after_items` items went out, drop every connection and refuse new ones (406)
    until `minutes` of market time have passed, then let them in again. `step(sim)` is
    called from a test's polling loop; the gap it makes spans whole market minutes."""

    after_items: int
    minutes: int
    dropped_at: int | None = None  # market ns of the drop
    released: bool = False

    def step(self, sim: SimulatorThread) -> None:
        if self.dropped_at is None:
            if sim.stats()["items"] >= self.after_items:
                sim.refuse_connections(True)
                sim.drop_connections()
                self.dropped_at = market_ns(sim)
        elif not self.released and market_ns(sim) - self.dropped_at >= self.minutes * MINUTE_NS:
            sim.refuse_connections(False)
            self.released = True
