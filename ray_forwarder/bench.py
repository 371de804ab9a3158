"""`ray-forwarder bench`: simulator -> forwarder -> Kafka, against a single-process baseline.

For each shard count, two runs on the same simulated feed (same seed): the plain baseline
(the same shard code - decode, dedup, envelope, outbox - and the same aiokafka settings in
one asyncio loop in this process, without Ray), then the Ray forwarder (S shard actors, P
producer actors). The ratio tells what Ray's actor hops cost and what its parallelism buys.
Numbers are printed, not asserted.

What each column means:

* `events`, `s`, `ev/s`: items the shards received, over the time from "all shards
  subscribed" to "everything acknowledged" as the driver (or baseline loop) observes it,
  shutdown included.
* `e2e ev/s`: distinct items found in Kafka / (last broker append - first simulator send).
* `p50`, `p99`, `max`: latency from **simulator send to Kafka ack**, per distinct item, end
  to end. The simulator stamps every frame with the wall-clock time it wrote it to the
  socket (`SimConfig.record_send_times`). Each run gets fresh topics created with
  `message.timestamp.type=LogAppendTime`, so every record carries the time the broker
  appended it to the log; with acks=all on one broker that is the moment the ack is sent
  (the ack reaches the producer one local round trip later). After the run the bench reads
  the topics back and matches each record to the item the simulator sent by content (the
  digest of the envelope's `payload`, which is the original item), so the same code
  measures the baseline and Ray runs. A producer's CreateTime is not used: aiokafka sets it
  at send(), before the batch even leaves the client. Caveats: the broker time is in whole
  milliseconds; both clocks must be one machine's clock (the local broker, or a broker on
  the same host via KAFKA_BOOTSTRAP_SERVERS); for an item the simulator sent twice (an
  injected duplicate) the first send counts, for an item in Kafka twice, the first append.
  Forwarder-made records (status events, `is_final` bars) are not feed items and are left
  out. Flat out (`--rate 0`) the simulator writes as fast as sockets accept, so latency is
  mostly queueing behind the backlog; with `--rate` it is mostly the forwarder's batching
  (batch_max_ms, producer linger) plus the hops between.
* `lost`: distinct items the simulator sent that are not in Kafka; `dup`: records in Kafka
  beyond the first for an item (an at-least-once re-send); `dedup`: simulator-injected
  duplicates the forwarder dropped; `peak RSS`: per actor class (max over actors) for Ray,
  the whole process (simulator thread included) for the baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from ray_forwarder.config import Settings, load_settings
from ray_forwarder.devtools.local_kafka import kafka_for_tools
from ray_forwarder.envelope import content_digest
from ray_forwarder.topics import ensure_topics

SYMBOLS = [f"S{i:03d}" for i in range(500)]
#: Topics of a bench run (the channels the bench subscribes to, plus status and the rest).
_DATA_TOPICS = ("trades", "quotes", "bars")
_TOPIC_CONFIGS = {"message.timestamp.type": "LogAppendTime"}
_TOPIC_PARTITIONS = 3
_LOG_APPEND_TIME = 1  # aiokafka's ConsumerRecord.timestamp_type for LogAppendTime


# --- latency accounting (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class Percentiles:
    min: float
    p50: float
    p99: float
    max: float
    count: int


def percentiles(values: Iterable[float]) -> Percentiles | None:
    """Min, nearest-rank p50/p99 and max, or None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * n) - 1)]

    return Percentiles(ordered[0], rank(0.50), rank(0.99), ordered[-1], n)


@dataclass
class Delivery:
    """What reached Kafka, matched item by item against what the simulator sent."""

    latencies: list[float] = field(default_factory=list)  # seconds, one per delivered item
    sent: int = 0  # distinct items sent
    delivered: int = 0  # distinct items found in Kafka
    lost: int = 0  # sent, never found
    duplicates: int = 0  # Kafka records beyond the first for an item
    unexpected: int = 0  # Kafka data records that match no sent item
    first_sent: float = 0.0
    last_acked: float = 0.0

    @property
    def rate(self) -> float:
        span = self.last_acked - self.first_sent
        return self.delivered / span if self.delivered and span > 0 else 0.0


def match_deliveries(
    sent: Iterable[tuple[str, float]], acked: Iterable[tuple[str, float]]
) -> Delivery:
    """`sent`: (item key, send time) per write, duplicates included; `acked`: (item key,
    broker append time) per Kafka record. Latency per item: first append - first send."""
    first_sent: dict[str, float] = {}
    for key, at in sent:
        if key not in first_sent or at < first_sent[key]:
            first_sent[key] = at
    first_acked: dict[str, float] = {}
    out = Delivery(sent=len(first_sent))
    for key, at in acked:
        if key not in first_sent:
            out.unexpected += 1
        elif key in first_acked:
            out.duplicates += 1
            first_acked[key] = min(first_acked[key], at)
        else:
            first_acked[key] = at
    out.delivered = len(first_acked)
    out.lost = out.sent - out.delivered
    out.latencies = [at - first_sent[key] for key, at in first_acked.items()]
    if first_acked:
        out.first_sent = min(first_sent.values())
        out.last_acked = max(first_acked.values())
    return out


def item_key(item: dict) -> str:
    """How a simulator item and the `payload` of its envelope are matched."""
    return content_digest(item)


def envelope_key(value: bytes) -> str | None:
    """The item key of a Kafka record value; None for a record the forwarder made itself
    (a status event or an `is_final` bar), which no simulator send corresponds to."""
    envelope = orjson.loads(value)
    made_here = envelope["channel"] == "bars" and envelope["is_final"]
    if envelope.get("source") != "alpaca" or made_here:
        return None
    return item_key(envelope["payload"])


# --- results ---------------------------------------------------------------------------


@dataclass
class BenchResult:
    label: str
    events: int = 0
    seconds: float = 0.0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    deduplicated: int = 0
    unacked: int = 0  # the forwarder's own count: emitted - acked
    delivery: Delivery = field(default_factory=Delivery)
    create_time_records: int = 0  # records without LogAppendTime (should be 0)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


HEADER = (
    f"{'run':<22} {'events':>7} {'s':>6} {'ev/s':>7} {'e2e ev/s':>8} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'lost':>5} {'dup':>4} {'dedup':>5}  peak RSS"
)


def format_row(result: BenchResult) -> str:
    d = result.delivery
    pct = percentiles(d.latencies)
    lat = (
        f"{pct.p50 * 1000:7.1f} {pct.p99 * 1000:7.1f} {pct.max * 1000:7.1f}"
        if pct
        else f"{'-':>7} {'-':>7} {'-':>7}"
    )
    mem = " ".join(f"{k}={v:.0f}MB" for k, v in sorted(result.peak_rss_mb.items()))
    row = (
        f"{result.label:<22} {result.events:>7} {result.seconds:6.2f} {result.rate:7.0f} "
        f"{d.rate:8.0f} {lat} {d.lost:>5} {d.duplicates:>4} {result.deduplicated:>5}  {mem}"
    )
    notes = []
    if d.unexpected:
        notes.append(f"{d.unexpected} records matched no sent item")
    if result.unacked:
        notes.append(f"forwarder reports {result.unacked} emitted but unacked")
    if pct and pct.min < -0.001:  # the broker time is truncated to ms: -1 ms can happen
        notes.append(f"min latency {pct.min * 1000:.1f} ms < 0: the clocks disagree")
    if result.create_time_records:
        notes.append(f"{result.create_time_records} records lacked LogAppendTime (not timed)")
    return row + "".join(f"\n{'':<22} ! {n}" for n in notes)


# --- runs ------------------------------------------------------------------------------


def _sim_keys(shards: int) -> dict[str, str]:
    return {f"bench-key-{i}": f"bench-secret-{i}" for i in range(shards)}


def _topics(prefix: str) -> dict[str, str]:
    """Fresh topics per run: every channel the forwarder maps gets one under `prefix`."""
    names = {name: f"{prefix}.{name}" for name in (*_DATA_TOPICS, "status", "other")}
    return {
        "topic_trades": names["trades"],
        "topic_quotes": names["quotes"],
        "topic_bars": names["bars"],
        "topic_status": names["status"],
        "topic_daily_bars": names["other"],
        "topic_statuses": names["other"],
        "topic_lulds": names["other"],
        "topic_imbalances": names["other"],
        "topic_trade_updates": names["other"],
    }


def _settings(sim_url: str, bootstrap: str, symbols: list[str], shards: int,
              producers: int, topic_prefix: str) -> Settings:  # fmt: skip
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
        log_level="WARNING",
        **_topics(topic_prefix),
    )


async def _delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(names))
    finally:
        await admin.close()


async def _read_back(bootstrap: str, topics: Iterable[str],
                     timeout: float = 60.0) -> tuple[list[tuple[str, float]], int]:  # fmt: skip
    """(item key, append time in s) for every feed record in the topics, read up to the end
    offsets as of now, plus the number of records that carry no LogAppendTime."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    acked: list[tuple[str, float]] = []
    create_time = 0
    try:
        await consumer.topics()  # refreshes the metadata
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or range(_TOPIC_PARTITIONS))
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        pending = {tp for tp in partitions if ends[tp] > 0}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            batches = await consumer.getmany(*pending, timeout_ms=500)
            for tp, messages in batches.items():
                for msg in messages:
                    if msg.timestamp_type != _LOG_APPEND_TIME:
                        create_time += 1
                        continue
                    key = envelope_key(msg.value)
                    if key is not None:
                        acked.append((key, msg.timestamp / 1000))
                if messages and messages[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
        if pending:
            raise TimeoutError(f"could not read back {sorted(map(str, pending))} in {timeout}s")
    finally:
        await consumer.stop()
    return acked, create_time


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
    polls = [0]

    def progress(snap, _elapsed: float) -> None:
        if not started and snap.shards and all(s["subscribed"] for s in snap.shards):
            started.append(time.monotonic())
        polls[0] += 1
        if polls[0] % 20 == 1:  # `ps` is slow; sample memory now and then
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
    result.unacked = emitted - sum(snap.total("acked").values())
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
        await core.stop(60)
    await asyncio.gather(*tasks, return_exceptions=True)
    result.seconds = time.monotonic() - start
    await sink.stop()
    stats = [core.stats() for core in cores]
    result.events = sum(sum(s["received"].values()) for s in stats)
    result.deduplicated = sum(sum(s["deduplicated"].values()) for s in stats)
    result.unacked = sum(sum(s["emitted"].values()) - sum(s["acked"].values()) for s in stats)
    result.peak_rss_mb = {"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return result


def _sent_times(sim) -> list[tuple[str, float]]:
    """(item key, send time) per distinct item the simulator wrote (first write)."""
    first: dict[int, tuple[dict, float]] = {}
    for record in sim.sent():
        seen = first.get(record.seq)
        if seen is None or record.sent_at < seen[1]:
            first[record.seq] = (record.item, record.sent_at)
    return [(item_key(item), at) for item, at in first.values()]


def _one_run(label: str, shards: int, producers: int, names: list[str], events: int,
             rate: float | None, bootstrap: str, prefix: str) -> BenchResult:  # fmt: skip
    from ray_forwarder.sim import SimConfig, SimulatorThread

    config = SimConfig(symbols=names, keys=_sim_keys(shards), rate=rate,
                       total_events=events, time_scale=600, duplicate_ratio=0.01,
                       start_after_subscribers=shards, connection_limit=1, seed=shards,
                       record_send_times=True)  # fmt: skip
    topics = sorted(set(_topics(prefix).values()))
    asyncio.run(
        ensure_topics(bootstrap, topics, partitions=_TOPIC_PARTITIONS, configs=_TOPIC_CONFIGS)
    )
    try:
        with SimulatorThread(config) as sim:
            settings = _settings(sim.url, bootstrap, names, shards, producers, prefix)
            runner = _baseline(settings, sim) if label == "baseline" else _ray_run(settings, sim)
            result = asyncio.run(runner)
            sent = _sent_times(sim)
        data_topics = [f"{prefix}.{t}" for t in _DATA_TOPICS]
        acked, result.create_time_records = asyncio.run(_read_back(bootstrap, data_topics))
        result.delivery = match_deliveries(sent, acked)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(_delete_topics(bootstrap, topics))
    return result


def run_bench(events: int, symbols: int, shard_counts: list[int], producers: int,
              rate: float | None) -> int:  # fmt: skip
    from ray_forwarder import logs
    from ray_forwarder.driver import ensure_ray

    logs.configure("WARNING")
    names = SYMBOLS[:symbols]
    results: list[tuple[int, BenchResult, BenchResult]] = []
    with kafka_for_tools() as bootstrap:
        ensure_ray(include_dashboard=False, log_to_driver=False)
        print(f"bench: {events} events, {symbols} symbols, rate={rate or 'flat out'}, "
              f"P={producers}, Kafka {bootstrap}")  # fmt: skip
        print("latency = simulator send -> Kafka ack (broker LogAppendTime), per item")
        print(HEADER, flush=True)
        for shards in shard_counts:
            pair = []
            for label in ("baseline", "ray"):
                prefix = f"bench.{os.getpid()}.{label}.s{shards}"
                result = _one_run(label, shards, producers, names, events, rate, bootstrap,
                                  prefix)  # fmt: skip
                print(format_row(result), flush=True)
                pair.append(result)
            results.append((shards, pair[0], pair[1]))
    print()
    print("ray/baseline    ev/s   e2e ev/s   p50 lat   p99 lat")
    for shards, base, ray_ in results:
        print(
            f"  S={shards:<3} P={producers:<3} "
            f"{_ratio(ray_.rate, base.rate):>6} "
            f"{_ratio(ray_.delivery.rate, base.delivery.rate):>10}"
            f" {_lat_ratio(ray_, base, 'p50'):>9} {_lat_ratio(ray_, base, 'p99'):>9}"
        )
    return 0


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def _lat_ratio(a: BenchResult, b: BenchResult, which: str) -> str:
    pa, pb = percentiles(a.delivery.latencies), percentiles(b.delivery.latencies)
    if pa is None or pb is None:
        return "-"
    return _ratio(getattr(pa, which), getattr(pb, which))
