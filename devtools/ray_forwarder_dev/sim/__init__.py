"""A local Alpaca market-data feed: a deterministic synthetic market behind a real WebSocket
server that speaks Alpaca's market-data protocol for one stream (`SimConfig.stream`: stocks,
crypto, options, news; see `sim/streams.py`), with faults on demand and exact accounting of
what it sent. For tests, the demo and benchmarks."""

from ray_forwarder_dev.sim.generator import Market, MarketConfig, format_ns
from ray_forwarder_dev.sim.server import SentRecord, SimConfig, Simulator, encode_msgpack_item
from ray_forwarder_dev.sim.thread import SimulatorThread

__all__ = [
    "Market",
    "MarketConfig",
    "SentRecord",
    "SimConfig",
    "Simulator",
    "SimulatorThread",
    "encode_msgpack_item",
    "format_ns",
]
