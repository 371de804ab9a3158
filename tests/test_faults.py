"""Faults on the Kafka side: a producer actor killed mid-stream, the broker down for 30 s."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from ray_forwarder.sim import SimConfig, SimulatorThread
from ray_forwarder.topics import topic_map
from tests.forwarder_harness import SIM_KEY, SIM_SECRET, forwarder_settings, read_back, run_until
from tests.stream_checks import (
    assert_at_least_once,
    assert_first_occurrence_order,
    decode_and_check,
)

SYMBOLS = ["SPY", "QQQ", "AAPL", "MSFT", "NVDA", "AMZN"]

pytestmark = pytest.mark.usefixtures("ray_session")


def _producer_pids() -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", "ray::ProducerActor"], capture_output=True, text=True, check=False
    ).stdout
    return [int(pid) for pid in out.split()]


async def test_killing_a_producer_actor_loses_nothing_and_keeps_order(
    kafka_broker, kafka_topics
) -> None:
    killed: list[int] = []

    def kill_once(_elapsed: float) -> None:
        if not killed and sim.stats()["items"] >= 1500:
            pids = _producer_pids()
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    sim_config = SimConfig(symbols=SYMBOLS, rate=1500, time_scale=600, total_events=5000,
                           keys={SIM_KEY: SIM_SECRET}, seed=11)  # fmt: skip
    with SimulatorThread(sim_config) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS)
        )
        result = await run_until(settings, lambda: sim.finished, during=kill_once, settle=3)
        sent = sim.distinct_items()
    assert killed, "the producer was never killed"
    assert result.error is None and result.drained
    [shard] = result.snapshot.shards
    assert shard["batches_failed"] >= 1 and shard["batches_resent"] >= 1
    expected = sum(result.snapshot.total("emitted").values())
    records = await read_back(kafka_broker, settings, expected)
    report = decode_and_check(records, topic_map(settings), allow_resends=True)
    duplicates = assert_at_least_once(report, sent)
    assert_first_occurrence_order(report, sent)
    print(f"producer kill: {len(sent)} items, {duplicates} re-sent duplicates")


async def test_broker_down_for_30_seconds_loses_nothing(
    kafka_broker, kafka_topics, tmp_path
) -> None:
    if kafka_broker.local is None:
        pytest.fail("this test stops and restarts the local broker")
    outage: list[str] = []

    def outage_once(_elapsed: float) -> None:
        if not outage and sim.stats()["items"] >= 1000:
            outage.append("down")
            kafka_broker.local.stop_broker()

    sim_config = SimConfig(symbols=SYMBOLS, rate=200, time_scale=600, total_events=9000,
                           keys={SIM_KEY: SIM_SECRET}, seed=12)  # fmt: skip
    with SimulatorThread(sim_config) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS),
            kafka_request_timeout_ms=10_000,
            # A small memory buffer, so the outage overflows into the disk spool.
            buffer_max_events=1000, spool_dir=str(tmp_path / "spool"),
        )  # fmt: skip
        import asyncio

        async def restart_after_30s() -> None:
            while not outage:
                await asyncio.sleep(0.1)
            await asyncio.sleep(30)
            await asyncio.to_thread(kafka_broker.local.start_broker)
            outage.append("up")

        restarter = asyncio.create_task(restart_after_30s())
        result = await run_until(
            settings, lambda: sim.finished and "up" in outage, during=outage_once,
            timeout=150, settle=5,
        )  # fmt: skip
        await restarter
        sent = sim.distinct_items()
    assert outage == ["down", "up"]
    assert result.error is None and result.drained
    [shard] = result.snapshot.shards
    assert shard["spooled_total"] > 0 and shard["spooled"] == 0 and not shard["dropped"]
    expected = sum(result.snapshot.total("emitted").values())
    records = await read_back(kafka_broker, settings, expected)
    report = decode_and_check(records, topic_map(settings), allow_resends=True)
    duplicates = assert_at_least_once(report, sent)
    assert_first_occurrence_order(report, sent)
    print(
        f"broker outage: {len(sent)} items, {duplicates} re-sent duplicates, "
        f"{shard['spooled_total']} records spooled to disk"
    )
