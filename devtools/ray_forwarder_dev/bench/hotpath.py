"""CPU per item of the shard's hot path, in one process: frame -> events -> records.

Measures what the shard actor does between a WebSocket frame and `Outbox.put`, stage by
stage, with `time.process_time` (CPU, not wall time: meaningful on a loaded machine), best
of several rounds. The frames are the load generator's (`loadgen.feed`), pre-encoded, JSON
and msgpack, so the numbers match what `ray-forwarder bench` feeds the product.

    uv run python -m ray_forwarder_dev.bench.hotpath [--symbols 100 10000] [--events N]

Stages:
- decode:   `codec.decode_frame` for every frame (bytes/str -> events)
- dispatch: the session read loop's split of events into items / skips / controls
- pipeline: `EventPipeline.process` (dedup, sequencing, envelopes) on fresh state
- total:    dispatch (decode included) + pipeline, as the shard runs them
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

from ray_forwarder.alpaca import codec
from ray_forwarder.alpaca.events import DataItem, Skipped
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.envelope import utc_now_iso
from ray_forwarder.core.pipeline import EventPipeline
from ray_forwarder_dev.loadgen.feed import BENCH_CHANNELS, FeedSpec, bench_symbols, build_feed
from ray_forwarder_dev.loadgen.feed import frames_for as feed_frames

_TOPICS = {
    "trades": "t",
    "quotes": "q",
    "bars": "b",
    "updatedBars": "b",
    "dailyBars": "d",
    "status": "s",
}


def _frames(symbols: int, events: int, use_msgpack: bool) -> tuple[list[bytes | str], int]:
    feed = build_feed(FeedSpec(symbols=symbols, events=events))
    names = bench_symbols(symbols)
    frames = feed_frames(feed, {c: names for c in BENCH_CHANNELS}, use_msgpack=use_msgpack)
    payloads: list[bytes | str] = (
        list(frames.payloads) if use_msgpack else [p.decode() for p in frames.payloads]
    )
    return payloads, frames.items


def _pipeline(symbols: int) -> EventPipeline:
    return EventPipeline(
        _TOPICS,
        DedupCache(900.0, 50_000),
        BarFinalizer(35.0),
        allowed_symbols=bench_symbols(symbols),
    )


def _split(frame: bytes | str) -> list[DataItem]:
    """What `AlpacaSession._dispatch` does with a frame's events."""
    items: list[DataItem] = []
    for event in codec.decode_frame(frame):
        kind = type(event)
        if kind is DataItem:
            items.append(event)  # type: ignore[arg-type]
        elif kind is Skipped:
            pass
    return items


def _cpu(run: Callable[[], object], rounds: int) -> float:
    """Best CPU seconds of `rounds` runs (GC collected between, not during)."""
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def measure(symbols: int, events: int, use_msgpack: bool, rounds: int) -> dict[str, float]:
    """CPU µs per item for each stage."""
    frames, n_items = _frames(symbols, events, use_msgpack)
    decoded = [_split(f) for f in frames]
    ingest = utc_now_iso()

    def decode() -> None:
        for frame in frames:
            codec.decode_frame(frame)

    def dispatch() -> None:
        for frame in frames:
            _split(frame)

    def pipeline() -> None:
        p = _pipeline(symbols)
        now = 1000.0
        for items in decoded:
            p.process(items, ingest, now)
            now += 0.001

    def total() -> None:
        p = _pipeline(symbols)
        now = 1000.0
        for frame in frames:
            p.process(_split(frame), ingest, now)
            now += 0.001

    # re-decode for `pipeline`: the msgpack path rewrites `t` in place, so reuse is fair
    out = {}
    for name, run in (("decode", decode), ("dispatch", dispatch), ("pipeline", pipeline)):
        out[name] = _cpu(run, rounds) / n_items * 1e6
    out["total"] = _cpu(total, rounds) / n_items * 1e6
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args(argv)
    print(f"CPU µs per item (best of {args.rounds}), {args.events} items per round")
    print(f"{'format':8} {'symbols':>7} {'decode':>8} {'dispatch':>8} {'pipeline':>8} {'total':>8}")
    for use_msgpack in (False, True):
        for symbols in args.symbols:
            r = measure(symbols, args.events, use_msgpack, args.rounds)
            fmt = "msgpack" if use_msgpack else "json"
            print(
                f"{fmt:8} {symbols:>7} {r['decode']:>8.2f} {r['dispatch']:>8.2f}"
                f" {r['pipeline']:>8.2f} {r['total']:>8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
