"""`ray-forwarder demo`: the whole path on one machine with no credentials.

Starts (or reuses, if KAFKA_BOOTSTRAP_SERVERS is set) a local Apache Kafka broker, runs the
built-in Alpaca-protocol feed simulator, runs the forwarder on a local single-node Ray for a
bounded time, and prints a summary with one envelope read back from Kafka.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

import orjson

from ray_forwarder.alpaca.channels import MARKET_DATA_CHANNELS
from ray_forwarder.config import Settings, load_settings, log_level_from_env
from ray_forwarder.core.topics import prepare_topics
from ray_forwarder.ray.stats import ForwarderSnapshot
from ray_forwarder_dev.local_kafka import kafka_for_tools

SIM_KEY, SIM_SECRET = "sim-key", "sim-secret"


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 20.0
    symbols: str = "SPY,QQQ"
    rate: float = 2000.0
    wire_format: str = "msgpack"
    duplicate_ratio: float = 0.01


def run_demo(options: DemoOptions) -> int:
    from ray_forwarder.ops import logs
    from ray_forwarder_dev.sim import SimConfig, SimulatorThread

    log_level = log_level_from_env("WARNING")
    logs.configure(log_level, component="demo")
    symbols = [s.strip().upper() for s in options.symbols.split(",") if s.strip()]
    announce = "demo: starting a local Apache Kafka broker (the first run downloads its jars) ..."
    with kafka_for_tools(announce) as bootstrap:
        sim_config = SimConfig(
            symbols=symbols,
            rate=options.rate,
            duplicate_ratio=options.duplicate_ratio,
            keys={SIM_KEY: SIM_SECRET},
        )
        with SimulatorThread(sim_config) as sim:
            settings = load_settings(
                alpaca_api_key_id=SIM_KEY,
                alpaca_secret_key=SIM_SECRET,
                alpaca_stream_url=sim.url,
                alpaca_symbols=symbols,
                alpaca_wire_format=options.wire_format,
                # every channel the simulator produces (it has no imbalances)
                alpaca_channels=[c for c in MARKET_DATA_CHANNELS if c != "imbalances"],
                kafka_bootstrap_servers=bootstrap,
                kafka_create_topics=True,  # the demo's own broker starts empty
                metrics_port=int(os.environ.get("METRICS_PORT", "0")),
                bar_final_delay_seconds=2.0,
                reconnect_initial=0.2,
                reconnect_max=2.0,
                log_level=log_level,
            )
            print(
                f"demo: simulator at {sim.url}, Kafka at {bootstrap}, symbols {','.join(symbols)}"
            )
            print(f"demo: running the forwarder on a local Ray for {options.duration:g}s ...")
            from ray_forwarder.ray.driver import ensure_ray, run_forwarder

            asyncio.run(prepare_topics(settings))
            ensure_ray()  # a local Ray with only what the forwarder uses
            result = asyncio.run(
                run_forwarder(settings, duration=options.duration, progress=_progress)
            )
            sim_stats = sim.stats()
        envelope = asyncio.run(_read_one(settings))
    _summary(result.snapshot, result.elapsed_s, sim_stats, envelope)
    if result.error:
        print(f"demo: FAILED: {result.error}", file=sys.stderr)
        return 1
    return 0 if result.drained else 1


def _progress(snap: ForwarderSnapshot, elapsed: float) -> None:
    received = sum(snap.total("received").values())
    forwarded = sum(snap.total("acked").values())
    states = ",".join(f"{s['shard_id']}={s['state']}" for s in snap.shards)
    print(
        f"  t={elapsed:5.1f}s  received={received:>8}  forwarded={forwarded:>8}  "
        f"rate={forwarded / max(elapsed, 1e-9):8.0f}/s  {states}",
        flush=True,
    )


async def _read_one(settings: Settings) -> dict[str, object] | None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.topic_trades,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=5000, max_records=1)
        for records in batch.values():
            for record in records:
                return orjson.loads(record.value)
        return None
    finally:
        await consumer.stop()


def _summary(snap: ForwarderSnapshot, elapsed: float, sim_stats: dict, envelope) -> None:
    received, forwarded = snap.total("received"), snap.total("acked")
    dedup, dropped = snap.total("deduplicated"), snap.total("dropped")
    print("\ndemo summary")
    print(
        f"  ran {elapsed:.1f}s; the simulator sent {sim_stats['items']} items "
        f"({sim_stats['distinct']} distinct, {sim_stats['duplicates']} duplicates injected)"
    )
    print(f"  {'channel':<14}{'received':>10}{'forwarded':>11}{'dedup':>8}{'dropped':>9}")
    for channel in sorted(set(received) | set(forwarded)):
        print(
            f"  {channel:<14}{received[channel]:>10}{forwarded[channel]:>11}"
            f"{dedup[channel]:>8}{dropped[channel]:>9}"
        )
    total = sum(forwarded.values())
    print(f"  total forwarded {total} records, {total / max(elapsed, 1e-9):.0f} records/s")
    skipped = snap.total("skipped")
    if skipped:
        print(f"  skipped: {dict(skipped)}")
    print("  one envelope read back from Kafka:")
    print("   ", orjson.dumps(envelope).decode() if envelope else "(none found)")
