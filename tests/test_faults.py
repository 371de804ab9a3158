"""Faults: a producer actor killed mid-stream, the broker down for 30 s, a shard actor
killed mid-stream, a stream that goes silent."""

from __future__ import annotations

import os
import signal
from typing import Any

import orjson
import pytest
import ray

from ray_forwarder.core.pipeline import SEQ_EPOCH_BITS
from ray_forwarder.core.topics import topic_map
from ray_forwarder.ray.driver import Forwarder
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import SIM_KEY, SIM_SECRET, forwarder_settings, read_back, run_until
from tests.stream_checks import (
    assert_at_least_once,
    assert_first_occurrence_order,
    canonical,
    decode_and_check,
)

SYMBOLS = ["SPY", "QQQ", "AAPL", "MSFT", "NVDA", "AMZN"]

pytestmark = pytest.mark.usefixtures("ray_session")


def _pid(actor: Any) -> int:
    """The process id of an actor, asked of the actor itself (never a process-name search,
    which would find another test session's actors too)."""
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=10)


async def test_killing_a_producer_actor_loses_nothing_and_keeps_order(
    kafka_broker, kafka_topics
) -> None:
    killed: list[int] = []
    forwarders: list[Forwarder] = []

    def kill_once(_elapsed: float) -> None:
        if not killed and sim.stats()["items"] >= 1500:
            pid = _pid(forwarders[0].actors()["producer-0"])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    sim_config = SimConfig(symbols=SYMBOLS, rate=1500, time_scale=600, total_events=5000,
                           keys={SIM_KEY: SIM_SECRET}, seed=11)  # fmt: skip
    with SimulatorThread(sim_config) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS)
        )
        result = await run_until(
            settings, lambda: sim.finished, during=kill_once, settle=3, timeout=300,
            on_forwarder=forwarders.append,
        )  # fmt: skip
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


DATA_CHANNELS = ("trades", "quotes")


async def test_killed_shard_actor_comes_back_and_resumes(kafka_broker, kafka_topics) -> None:
    """SIGKILL the shard actor's process mid-stream. Ray restarts it, the driver calls run()
    on the new incarnation with the next seq epoch, it reconnects and resumes.

    The guarantee checked: what the killed incarnation had handed to its producer (at the
    least everything acknowledged before the kill) is in Kafka, and the Kafka copy of the
    killed connection is a prefix of what the simulator sent on it: only its tail (frames in
    the dead process's memory or socket buffers) is lost. Everything sent on the new
    connection arrives. What the feed produced while no socket was open never reached us
    (measured with the simulator's `unsent` counter). seq stays strictly increasing."""
    state: dict[str, Any] = {"max_sockets": 0}
    forwarders: list[Forwarder] = []

    def kill_once(_elapsed: float) -> None:
        state["max_sockets"] = max(state["max_sockets"], sim.stats()["authenticated"])
        if "pid" in state and "total" not in state:
            # the feed ends on an event (the new incarnation has streamed a while), not on a
            # length guessed for a machine whose restart may take 2 s or 40
            by_conn = sim.sent_by_connection()
            later = sorted(by_conn)[1:]
            if later and len(by_conn[later[-1]]) >= 1000:
                state["total"] = sim.end_feed()
        if "pid" not in state and sim.stats()["items"] >= 3000:
            shard = forwarders[0].actors()["stocks-0"]
            stats = ray.get(shard.stats.remote(), timeout=10)
            state["acked_before"] = sum(n for c, n in stats["acked"].items() if c != "status")
            state["pid"] = ray.get(shard.pid.remote(), timeout=10)
            state["unsent_at_kill"] = sim.stats()["unsent"]
            os.kill(state["pid"], signal.SIGKILL)

    sim_config = SimConfig(symbols=SYMBOLS, rate=1000, time_scale=600, total_events=None,
                           keys={SIM_KEY: SIM_SECRET}, seed=13)  # fmt: skip
    with SimulatorThread(sim_config) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS),
            alpaca_channels=",".join(DATA_CHANNELS),
        )  # fmt: skip
        result = await run_until(
            settings, lambda: sim.finished, during=kill_once, settle=3, timeout=300,
            on_forwarder=forwarders.append,
        )  # fmt: skip
        by_conn = sim.sent_by_connection()
        sent = sim.distinct_items()
        unsent_at_end = sim.stats()["unsent"]
    assert "pid" in state, "the shard was never killed"
    assert "total" in state, "the restarted shard never streamed (feed not ended)"
    assert result.error is None and result.drained
    [shard] = result.snapshot.shards
    assert shard["restarts"] == 1 and shard["epoch"] == 1
    assert state["max_sockets"] <= 1, "two sockets for one connection slot"
    killed_conn, *later_conns = sorted(by_conn)
    assert later_conns, "the restarted shard never reconnected"

    expected = sum(result.snapshot.total("emitted").values())
    records = await read_back(kafka_broker, settings, expected)
    report = decode_and_check(records, topic_map(settings), allow_resends=True)
    got = {canonical(e["payload"]) for e in report.data}
    on_killed = list(dict.fromkeys(canonical(r.item) for r in by_conn[killed_conn]))
    arrived = [item in got for item in on_killed]
    kept = sum(arrived)
    assert arrived == [True] * kept + [False] * (len(on_killed) - kept), "loss is not a tail"
    assert kept >= state["acked_before"] > 0
    after = {canonical(r.item) for c in later_conns for r in by_conn[c]}
    assert not after - got, f"{len(after - got)} items sent after the restart are missing"
    assert not got - {canonical(item) for item in sent}, "items that were never sent"
    # seq: the new incarnation numbers from epoch 1, above everything the first one issued
    assert any(e["seq"] > 1 << SEQ_EPOCH_BITS for e in report.data)
    assert all(e["seq"] < 1 << SEQ_EPOCH_BITS for e in report.data[:10])
    never_sent = unsent_at_end - state["unsent_at_kill"]  # no subscribed socket after the kill
    assert never_sent > 0 and len(sent) + unsent_at_end <= state["total"]
    print(f"shard kill: {len(sent)} items sent; killed connection: {len(on_killed)} items, "
          f"{kept} in Kafka ({state['acked_before']} acknowledged before the kill), "
          f"{len(on_killed) - kept} lost from its tail; {never_sent} produced while no socket "
          f"was open (never sent)")  # fmt: skip


async def test_a_stalled_stream_is_detected_and_reconnected(kafka_broker, kafka_topics) -> None:
    """The simulator stops writing to the open, subscribed socket (pings still answered).
    After STALE_STREAM_SECONDS of silence the shard probes with a re-sent subscribe, gets no
    reply, reports `disconnected` with a stale reason, reconnects (after a 406 while the
    stalled socket's close is pending, if the feed is slow to free the slot) and resumes:
    every item the simulator wrote to any socket is in Kafka."""
    stalled: list[float] = []

    def stall_once(elapsed: float) -> None:
        if not stalled and sim.stats()["items"] >= 1500:
            assert sim.stall_connections() == 1
            stalled.append(elapsed)

    sim_config = SimConfig(symbols=SYMBOLS, rate=600, time_scale=600, total_events=6000,
                           keys={SIM_KEY: SIM_SECRET}, seed=14)  # fmt: skip
    with SimulatorThread(sim_config) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS),
            alpaca_channels=",".join(DATA_CHANNELS), stale_stream_seconds=1.0,
        )  # fmt: skip
        result = await run_until(settings, lambda: sim.finished, during=stall_once, settle=2)
        sent = sim.distinct_items()
        connections = sim.stats()["connections"]
    assert stalled and result.error is None and result.drained
    [shard] = result.snapshot.shards
    assert shard["stale_reconnects"] == 1 and connections >= 2
    expected = sum(result.snapshot.total("emitted").values())
    records = await read_back(kafka_broker, settings, expected)
    report = decode_and_check(records, topic_map(settings), allow_resends=True)
    assert_at_least_once(report, sent)
    assert_first_occurrence_order(report, sent)
    stale = [e for e in report.status if e["payload"].get("event") == "disconnected"]
    assert len(stale) == 1 and "stale stream" in orjson.dumps(stale[0]["payload"]).decode()
    print(f"stale stream: {len(sent)} items, detected and reconnected; "
          f"{connections} connections")  # fmt: skip
