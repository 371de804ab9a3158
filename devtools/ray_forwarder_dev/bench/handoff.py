"""Component benchmark of the shard -> producer hand-off, usable on a busy machine.

A real local Ray (no dashboard) with one `ProducerActor` against a real broker (a
`LocalKafka` unless `--bootstrap` names one), and in this process the shard's side: an
`Outbox` built as `ShardCore` builds it, fed pre-built envelopes in frames. It prints what
each side costs in CPU time per record (this process = the shard's outbox, the producer
actor, Ray's other processes), records/s, batch ack latency, and whether anything went to
the disk spool. CPU time per record is the number to compare between runs: wall-clock
rates depend on what else the machine does.

    uv run python -m ray_forwarder_dev.bench.handoff --records 200000 --symbols 100
    BATCH_MAX_IN_FLIGHT=16 uv run python -m ray_forwarder_dev.bench.handoff --rate 20000

Settings come from the environment as for `ray-forwarder run` (BATCH_*, BUFFER_*, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import orjson

from ray_forwarder_dev.bench.procstats import psutil


def _envelopes(count: int, symbols: int, topics: tuple[str, str]) -> list[Any]:
    """Records shaped like the pipeline's: a JSON envelope of ~350 bytes keyed by symbol."""
    from ray_forwarder.core.pipeline import OutRecord

    names = [f"SYM{i:05d}" for i in range(symbols)]
    out = []
    for n in range(count):
        symbol = names[n % symbols]
        trade = n % 2 == 0
        payload = (
            {"T": "t", "S": symbol, "i": n, "x": "V", "p": 123.45 + n % 100, "s": 100,
             "c": ["@", "I"], "z": "C", "t": "2026-11-27T14:30:00.123456789Z"}
            if trade
            else {"T": "q", "S": symbol, "bx": "V", "bp": 123.4, "bs": 3, "ax": "Q",
                  "ap": 123.5, "as": 4, "c": ["R"], "z": "C",
                  "t": "2026-11-27T14:30:00.123456789Z"}
        )  # fmt: skip
        channel = "trades" if trade else "quotes"
        envelope = {
            "schema": "alpaca.v1", "channel": channel, "symbol": symbol, "seq": n + 1,
            "event_ts": "2026-11-27T14:30:00.123456789Z",
            "ingest_ts": "2026-11-27T14:30:00.125000Z", "source": "iex", "shard": "stocks-0",
            "dedup_key": f"{channel}:{symbol}:2026-11-27T14:30:00.123456789Z:{n:016x}",
            "payload": payload,
        }  # fmt: skip
        topic = topics[0] if trade else topics[1]
        out.append(OutRecord(topic, symbol.encode(), orjson.dumps(envelope), channel))
    return out


def _cpu(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def _ray_processes(exclude: set[int]) -> list[psutil.Process]:
    me = psutil.Process()
    return [p for p in me.children(recursive=True) if p.pid not in exclude]


async def _create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        )
    finally:
        await admin.close()


async def _run(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:

    from ray_forwarder.config import load_settings
    from ray_forwarder.ray.actors import ProducerActor, _sender
    from ray_forwarder.ray.shard import (
        ShardCore,  # noqa: F401  (the call site's module)
        lane_linger_ms,
    )
    from ray_forwarder.runtime.outbox import BatchLimits, Outbox

    run = uuid.uuid4().hex[:8]
    topics = (f"bench-handoff-trades-{run}", f"bench-handoff-quotes-{run}")
    await _create_topics(bootstrap, list(topics), args.partitions)
    overrides: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "topic_trades": topics[0],
        "topic_quotes": topics[1],
        "spool_dir": tempfile.mkdtemp(prefix="handoff-spool-"),
    }
    if args.linger_ms is not None:
        overrides["producer_linger_ms"] = args.linger_ms
    settings = load_settings(**overrides)
    records = _envelopes(args.records, args.symbols, topics)
    frames = [records[i : i + args.frame] for i in range(0, len(records), args.frame)]
    mean_bytes = statistics.fmean(len(r.key) + len(r.value) for r in records[:1000])

    producer = ProducerActor.options(name=f"handoff-{run}").remote(settings, "producer-0")
    await producer.start.remote()
    pid = await producer.__ray_call__.remote(lambda _self: os.getpid())
    producer_proc = psutil.Process(pid)
    limits = _limits(settings, BatchLimits, lane_linger_ms)
    outbox = Outbox([_sender(producer)], limits)
    latencies: list[float] = []
    outbox.observe_acks(lambda _r, received, _s, acked: latencies.append(acked - received))
    # warm-up: metadata, producer id, Ray's first call
    outbox.put(records[:10], time.monotonic())
    sender = asyncio.create_task(outbox.run())
    while outbox.snapshot().records_acked < 10:
        await asyncio.sleep(0.01)
    latencies.clear()
    others = _ray_processes({pid})
    me = psutil.Process()
    cpu0 = (_cpu(me), _cpu(producer_proc), sum(_cpu(p) for p in others))
    start = time.monotonic()
    interval = args.frame / args.rate if args.rate else 0.0
    for number, frame in enumerate(frames):
        if interval:
            delay = start + number * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            # flat out, but like a reader that the buffer holds back: wait for room
            while outbox.snapshot().buffered > args.backlog:
                await asyncio.sleep(0.001)
        outbox.put(frame, time.monotonic())
        await asyncio.sleep(0)
    fed = time.monotonic()
    while outbox.snapshot().records_acked < args.records + 10:
        await asyncio.sleep(0.002)
    elapsed = time.monotonic() - start
    cpu1 = (_cpu(me), _cpu(producer_proc), sum(_cpu(p) for p in others))
    stats = outbox.snapshot()
    outbox.close()
    await sender
    await producer.close.remote()
    n = args.records
    latencies.sort()
    return {
        "records": n,
        "record_bytes": round(mean_bytes),
        "records_per_s": round(n / elapsed),
        "feed_s": round(fed - start, 3),
        "cpu_us_per_record": {
            "shard_outbox": round((cpu1[0] - cpu0[0]) / n * 1e6, 2),
            "producer_actor": round((cpu1[1] - cpu0[1]) / n * 1e6, 2),
            "ray_other": round((cpu1[2] - cpu0[2]) / n * 1e6, 2),
        },
        "batches": stats.batches_sent,
        "records_per_batch": round(n / max(1, stats.batches_sent), 1),
        "ack_latency_ms_p50_p99_max": [
            round(latencies[int(q * (len(latencies) - 1))] * 1000, 1) for q in (0.5, 0.99, 1)
        ]
        if latencies
        else None,
        "spooled_total": stats.spooled_total,
        "dropped": sum(stats.dropped_by_channel.values()),
    }


def _limits(settings: Any, batch_limits: Any, lane_linger_ms: Any) -> Any:
    """The outbox limits `ShardCore` uses (`outbox_limits` once it exists)."""
    from ray_forwarder.ray import shard

    spool = Path(settings.spool_root)
    if hasattr(shard, "outbox_limits"):
        return shard.outbox_limits(settings, spool)
    return batch_limits(
        max_events=settings.buffer_max_events,
        max_bytes=settings.buffer_max_bytes,
        spool_dir=spool,
        spool_max_bytes=settings.spool_max_bytes,
        batch_max_events=settings.batch_max_events,
        batch_max_ms=lane_linger_ms(settings),
        max_in_flight=settings.batch_max_in_flight,
        max_record_bytes=settings.max_record_bytes,
        dead_letter_topic=settings.topic_deadletter,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--frame", type=int, default=100, help="records per put()")
    parser.add_argument("--rate", type=float, default=0.0, help="records/s; 0 = flat out")
    parser.add_argument(
        "--backlog", type=int, default=50_000,
        help="flat out: the feeder waits while the lane holds more records than this",
    )  # fmt: skip
    parser.add_argument("--linger-ms", type=int, default=None)
    parser.add_argument("--bootstrap", default=None, help="an existing broker (else local)")
    parser.add_argument("--address", default=None, help="a running Ray (else a local one)")
    args = parser.parse_args(argv)
    import ray

    # Started outside the event loop, as the forwarder's driver does.
    if args.address:  # a running local Ray (e.g. one kept up on a busy machine)
        ray.init(address=args.address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        _main(args)
    finally:
        ray.shutdown()


def _main(args: argparse.Namespace) -> None:
    if args.bootstrap:
        result = asyncio.run(_run(args, args.bootstrap))
    else:
        from ray_forwarder_dev.local_kafka import LocalKafka

        with LocalKafka() as kafka:
            result = asyncio.run(_run(args, kafka.bootstrap_servers))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
