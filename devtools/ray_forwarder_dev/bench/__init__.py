"""`ray-forwarder bench`: the forwarder on Ray against the best single-process forwarder.

Every run has three kinds of process, each on its own: the load generator
(`python -m ray_forwarder_dev.loadgen`), which builds and encodes its whole feed before the clock
starts and then replays it over a real WebSocket in Alpaca's protocol (greeting, auth,
subscription reply, data); the system under test, configured by the product's own
environment variables; and this process, which only starts them, samples their CPU and
memory with psutil, and reads Kafka afterwards. Systems:

* `baseline`: `python -m ray_forwarder_dev.bench.baseline`, one asyncio loop (uvloop when
  installed), orjson/msgpack, one aiokafka producer fed with `send()` and acknowledged by
  callbacks; the same envelope, dedup key and TTL, seq, topics, record keys and producer
  settings (acks=all, idempotent, linger, compression) as the product.
* `ray:S:P`: `ray-forwarder run` with S shards and P producers, on a fresh local Ray
  started by its own driver process (with the dashboard, as the product runs), torn down by
  that driver; every process of it is accounted for. `ray:S:0` (`PRODUCERS=0`): no
  producer actors, each shard actor writes to Kafka itself.
* `cluster:N:S:P`: the same on a `ray.cluster_utils.Cluster` of N nodes on this machine
  (N raylets, one CPU each; shards placed with SPREAD): shows every shard's records
  arriving, its rate per connection, and which node each actor ran on.

`--suite issue9` runs issue #9's whole table (flat out JSON/msgpack with 100 and 1,000
symbols and msgpack with 10,000; 20k and 50k items/s at linger 50 and 5 ms; 10,000 symbols
at 20k/s) with `--systems`, then prints a summary and targets 1-4 met or not, with the gap.

What each column means:

* `items/s`: distinct items found in Kafka / (first generator send -> last broker append).
* `p50`, `p99`, `max`: per distinct item, from the generator's stamp of its first write
  (time.time() as the frame is handed to the socket) to the broker's `LogAppendTime` (each
  run gets fresh topics with `message.timestamp.type=LogAppendTime`); with acks=all on one
  broker that is when the ack is sent. Whole milliseconds; one machine's clock. Flat out,
  latency is mostly queueing behind the backlog; at `--rate` it is batching and hops.
* `held/s`, `kept up`: broker appends per second over the middle 80 % of the items (no
  start, no final drain); at `--rate`, kept up = held >= 95 % of the rate, nothing lost.
* `sent`, `lost`, `dup`: distinct items written, those never found in Kafka, and Kafka
  records beyond the first for an item; `dedup`: redeliveries (byte-identical re-sends
  the generator sprinkles in, `--duplicate-ratio`) that the system dropped. Records the
  forwarder makes itself (status events, `is_final` bars) are not feed items: left out.
* `CPU µs/ev`: user + system CPU of every process of the system, from the clock's start
  (all clients subscribed) to the system having everything acknowledged and drained,
  divided by the items delivered; per role (driver, shard actor, producer actor, raylet,
  gcs_server, dashboard, agents, ...) below the table. `RSS MB`: sum of the processes'
  peak resident memory, sampled every 0.2 s; `PSS MB`: the same in proportional set size
  (sampled every second), which counts a page N processes share (the Python and Ray
  libraries every Ray process maps) 1/N in each: what the processes occupy together.
  Target 4's total reads PSS.
* The load generator's ceiling: the same feed, flat out, into a client that reads and
  discards; it must be at least 3x the fastest system, or the bench measured the generator.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=60_000, help="distinct items (60000)")
    parser.add_argument("--symbols", type=int, default=100, help="symbols in the feed (100)")
    parser.add_argument("--wire-format", choices=["json", "msgpack"], default="json")
    parser.add_argument("--rate", type=float, default=0.0, help="items/s; 0 = flat out")
    parser.add_argument("--linger-ms", type=int, default=50, help="PRODUCER_LINGER_MS (50)")
    parser.add_argument("--duplicate-ratio", type=float, default=0.01)
    parser.add_argument(
        "--systems",
        default="baseline,ray:1:1",
        help="comma-separated: baseline, ray:SHARDS:PRODUCERS, cluster:NODES:SHARDS:PRODUCERS "
        "(default baseline,ray:1:1)",
    )
    parser.add_argument(
        "--suite",
        choices=["issue9"],
        default=None,
        help="run a whole table instead of one configuration (issue9: issue #9's runs and "
        "targets; --wire-format, --symbols, --rate and --linger-ms are then the suite's)",
    )
    parser.add_argument(
        "--rate-seconds",
        type=float,
        default=None,
        help="suite: how long each fixed-rate run lasts at least (10)",
    )
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip the load generator's ceiling run"
    )
    parser.add_argument("--json", metavar="FILE", default=None, help="write the numbers here")


def run_from_args(args: argparse.Namespace) -> int:
    from ray_forwarder_dev.bench.runner import BenchOptions, bench_main

    options = BenchOptions(
        events=args.events,
        symbols=args.symbols,
        wire_format=args.wire_format,
        rate=args.rate,
        linger_ms=args.linger_ms,
        duplicate_ratio=args.duplicate_ratio,
        systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
        ceiling=not args.no_ceiling,
    )
    bench_main(options, args.json, suite=args.suite, rate_seconds=args.rate_seconds)
    return 0
