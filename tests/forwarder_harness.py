"""Running the real forwarder (local Ray, real Kafka) against the feed simulator in tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from ray_forwarder.config import Settings, load_settings
from ray_forwarder.core.topics import topic_map
from ray_forwarder.ray.driver import RunResult, run_forwarder
from ray_forwarder_dev.sim import SimulatorThread
from tests.kafka_fixture import ConsumedRecord, TopicNames, consume_all

SIM_KEY, SIM_SECRET = "sim-key", "sim-secret"
ALL_CHANNELS = "trades,quotes,bars,updatedBars,dailyBars,statuses,lulds"


def forwarder_settings(
    kafka_broker: Any, topics: TopicNames, sim: SimulatorThread, **overrides: Any
) -> Settings:
    """Settings pointing at the simulator and the broker, with topics unique to the test."""
    values: dict[str, Any] = dict(
        alpaca_api_key_id=SIM_KEY,
        alpaca_secret_key=SIM_SECRET,
        alpaca_stream_url=sim.url,
        alpaca_channels=ALL_CHANNELS,
        kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
        metrics_port=0,
        bar_final_delay_seconds=0.5,
        reconnect_initial=0.1,
        reconnect_max=0.5,
        connection_limit_backoff=1.0,
        producer_linger_ms=5,
        log_level="INFO",
    )
    for name in ("trades", "quotes", "bars", "status", "daily_bars", "statuses", "lulds",
                 "imbalances", "trade_updates"):  # fmt: skip
        values[f"topic_{name}"] = topics(name)
    values.update(overrides)
    return load_settings(**values)


async def run_until(
    settings: Settings,
    done: Callable[[], bool],
    *,
    timeout: float = 90.0,
    settle: float = 1.5,
    during: Callable[[float], None] | None = None,
    **kwargs: Any,
) -> RunResult:
    """Run the forwarder until `done()` (then `settle` more seconds), an error, or timeout."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_forwarder(settings, stop=stop, serve_http=False, handle_signals=False, **kwargs)
    )
    started = time.monotonic()
    while not task.done() and not done():
        if time.monotonic() - started > timeout:
            break
        if during is not None:
            during(time.monotonic() - started)
        await asyncio.sleep(0.1)
    if not task.done():
        await asyncio.sleep(settle)
        stop.set()
    return await asyncio.wait_for(task, 60)


async def read_back(kafka_broker: Any, settings: Settings, expected: int) -> list[ConsumedRecord]:
    topics = sorted(set(topic_map(settings).values()))
    return await consume_all(
        kafka_broker.bootstrap_servers, topics, expected_count=expected, timeout=60, settle=1.0
    )
