"""`ray-forwarder bench`: simulator -> forwarder -> Kafka, flat out, against a baseline.

The baseline is the same shard code (decode, dedup, envelope, outbox) and the same aiokafka
settings in one asyncio loop in this process, without Ray: the ratio tells what Ray's actor
hops cost and what its parallelism buys. Numbers are printed, not asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ray_forwarder.config import Settings, load_settings

SYMBOLS = [f"S{i:03d}" for i in range(500)]


@dataclass
class BenchResult:
    label: str
    events: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    lost: int = 0
    deduplicated: int = 0

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        lat = sorted(self.latencies) or [0.0]
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        mem = ", ".join(f"{k}={v:.0f}MB" for k, v in sorted(self.peak_rss_mb.items()))
        return (
            f"{self.label:<28} {self.events:>8} ev {self.seconds:7.2f}s {self.rate:>9.0f} ev/s"
            f"  batch ack latency p50={p50 * 1000:.0f}ms p99={p99 * 1000:.0f}ms "
            f"max={lat[-1] * 1000:.0f}ms  lost={self.lost} dedup={self.deduplicated}  {mem}"
        )


def _sim_keys(shards: int) -> dict[str, str]:
    return {f"bench-key-{i}": f"bench-secret-{i}" for i in range(shards)}


def _settings(sim_url: str, bootstrap: str, symbols: list[str], shards: int,
              producers: int) -> Settings:  # fmt: skip
    keys = list(_sim_keys(shards).items())
    return load_settings(
        alpaca_api_key_id=keys[0][0],
        alpaca_secret_key=keys[0][1],
        alpaca_credentials=",".join(f"{k}:{s}" for k, s in keys[1:]) or None,
        alpaca_stream_url=sim_url,
        alpaca_symbols=symbols,
        alpaca_channels=["trades", "quotes", "bars", "updatedBars"],
        kafka_bootstrap_servers=bootstrap,
        shards=shards,
        producers=producers,
        metrics_port=0,
        bar_final_delay_seconds=1.0,
        topic_trades=f"bench.trades.{os.getpid()}",
        topic_quotes=f"bench.quotes.{os.getpid()}",
        topic_bars=f"bench.bars.{os.getpid()}",
        topic_status=f"bench.status.{os.getpid()}",
        log_level="WARNING",
    )


def _rss_by_actor() -> dict[str, float]:
    out = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True).stdout
    usage: dict[str, float] = {}
    for line in out.splitlines():
        rss, _, args = line.strip().partition(" ")
        for name in ("ShardActor", "ProducerActor"):
            if f"ray::{name}" in args:
                usage[name] = max(usage.get(name, 0.0), int(rss) / 1024)
    return usage


async def _ray_run(settings: Settings, sim) -> BenchResult:
    from ray_forwarder.driver import run_forwarder

    result = BenchResult(f"ray S={settings.shards} P={settings.producers}")
    stop = asyncio.Event()
    started: list[float] = []
    peak: dict[str, float] = {}

    def progress(snap, _elapsed: float) -> None:
        if not started and snap.shards and all(s["subscribed"] for s in snap.shards):
            started.append(time.monotonic())
        for shard in snap.shards:
            if shard["last_ack_latency_s"]:
                result.latencies.append(shard["last_ack_latency_s"])
        if len(result.latencies) % 20 == 0:  # `ps` is slow; sample memory now and then
            for name, mb in _rss_by_actor().items():
                peak[name] = max(peak.get(name, 0.0), mb)
        acked = sum(snap.total("acked").values()) - snap.total("acked")["status"]
        if (
            sim.finished
            and acked >= sum(snap.total("emitted").values()) - snap.total("emitted")["status"]
        ):
            stop.set()

    run = await run_forwarder(settings, stop=stop, serve_http=False, handle_signals=False,
                              progress=progress, poll_interval=0.05)  # fmt: skip
    end = time.monotonic()
    snap = run.snapshot
    result.seconds = end - (started[0] if started else end)
    result.events = sum(snap.total("received").values())
    result.deduplicated = sum(snap.total("deduplicated").values())
    emitted = sum(snap.total("emitted").values())
    result.lost = emitted - sum(snap.total("acked").values())
    result.peak_rss_mb = peak
    return result


async def _baseline(settings: Settings, sim) -> BenchResult:
    """The same shard code in one loop, one aiokafka producer, no Ray."""
    import resource

    from ray_forwarder.planning import plan
    from ray_forwarder.producer import KafkaSink
    from ray_forwarder.shard import ShardCore

    sink = KafkaSink(settings)
    await sink.start()

    async def send(records, ticket):
        return await sink.send_batch(records, ticket)

    cores = [ShardCore(settings, p.spec, [send]) for p in plan(settings)]
    result = BenchResult(f"baseline S={len(cores)} no Ray")
    tasks = [asyncio.create_task(core.run()) for core in cores]
    while not all(core.state.subscribed for core in cores):
        await asyncio.sleep(0.01)
    start = time.monotonic()
    while not sim.finished:
        await asyncio.sleep(0.05)
        for core in cores:
            latency = core.outbox.snapshot().last_ack_latency_s
            if latency:
                result.latencies.append(latency)
    for core in cores:
        await core.stop(60)
    await asyncio.gather(*tasks, return_exceptions=True)
    result.seconds = time.monotonic() - start
    await sink.stop()
    stats = [core.stats() for core in cores]
    result.events = sum(sum(s["received"].values()) for s in stats)
    result.deduplicated = sum(sum(s["deduplicated"].values()) for s in stats)
    result.lost = sum(sum(s["emitted"].values()) - sum(s["acked"].values()) for s in stats)
    result.peak_rss_mb = {"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return result


@contextlib.contextmanager
def _kafka() -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    from ray_forwarder.devtools.local_kafka import LocalKafka

    with LocalKafka() as kafka:
        yield kafka.bootstrap_servers


def run_bench(events: int, symbols: int, shard_counts: list[int], producers: int,
              rate: float | None) -> int:  # fmt: skip
    from ray_forwarder import logs
    from ray_forwarder.driver import ensure_ray
    from ray_forwarder.sim import SimConfig, SimulatorThread

    logs.configure("WARNING")
    names = SYMBOLS[:symbols]
    with _kafka() as bootstrap:
        ensure_ray(include_dashboard=False, log_to_driver=False)
        print(f"bench: {events} events, {symbols} symbols, rate={rate or 'flat out'}, "
              f"P={producers}, Kafka {bootstrap}")  # fmt: skip
        for shards in shard_counts:
            for label in ("baseline", "ray"):
                config = SimConfig(symbols=names, keys=_sim_keys(shards), rate=rate,
                                   total_events=events, time_scale=600, duplicate_ratio=0.01,
                                   start_after_subscribers=shards,
                                   connection_limit=1, seed=shards)  # fmt: skip
                with SimulatorThread(config) as sim:
                    settings = _settings(sim.url, bootstrap, names, shards, producers)
                    runner = (
                        _baseline(settings, sim) if label == "baseline" else _ray_run(settings, sim)
                    )
                    result = asyncio.run(runner)
                print("  " + result.line(), flush=True)
                if label == "baseline":
                    base = result.rate
                else:
                    print(f"  ratio ray/baseline at S={shards}: {result.rate / base:.2f}")
    return 0
