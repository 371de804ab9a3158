"""`ray-forwarder demo`: the whole path on one machine with no credentials.

Starts (or reuses, if KAFKA_BOOTSTRAP_SERVERS is set) a local Apache Kafka broker, runs the
built-in Alpaca-protocol feed simulator for every stream it speaks (stocks, crypto, options,
news: one simulator each), runs the forwarder on a local single-node Ray for a bounded time,
and prints a summary grouped by stream with one envelope per stream read back from Kafka.
A third of the way in, the stocks simulator drops its connection and refuses new ones
for a few seconds (a few simulated minutes) while its market keeps trading: the summary
shows the gap opened, closed and filled from the simulator's REST bars.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from ray_forwarder.alpaca.channels import MARKET_DATA_CHANNELS
from ray_forwarder.config import Settings, load_settings, log_level_from_env
from ray_forwarder.core.topics import prepare_topics
from ray_forwarder.ray.stats import ForwarderSnapshot
from ray_forwarder_dev.local_kafka import kafka_for_tools

SIM_KEY, SIM_SECRET = "sim-key", "sim-secret"


#: Symbols the demo subscribes to on the streams other than stocks (stocks: --symbols).
DEMO_SYMBOLS = {
    "crypto": ["BTC/USD", "ETH/USD", "SOL/USD"],
    "options": ["AAPL260116C00230000", "SPY260116P00590000"],
    "news": ["*"],
}
#: What the simulated market of those streams is made of (news: the articles' tickers).
_SIM_SYMBOLS = {**DEMO_SYMBOLS, "news": ["AAPL", "MSFT", "NVDA", "TSLA"]}
#: Items/s of the other streams, as a share of --rate (stocks are the busy one).
_OTHER_STREAM_RATE_SHARE = 0.1


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 20.0
    symbols: str = "SPY,QQQ"
    rate: float = 2000.0
    wire_format: str = "msgpack"
    duplicate_ratio: float = 0.01
    #: Seconds the stocks connection stays down a third of the way in (0: no gap).
    outage_s: float = 3.0
    streams: str = ""  # empty: every stream the simulator speaks


def demo_streams(requested: str, wire_format: str = "msgpack") -> list[str]:
    """The streams to run: those asked for, else every stream of the table (STREAMS) that
    the simulator speaks and that can use `wire_format` (options are msgpack only), in
    table order."""
    from ray_forwarder.alpaca.streams import STREAMS
    from ray_forwarder_dev.sim.streams import SIM_STREAMS

    names = [n.strip().lower() for n in requested.split(",") if n.strip()]
    return names or [
        name
        for name, stream in STREAMS.items()
        if (name in SIM_STREAMS and wire_format in stream.wire_formats)
        or stream.family == "trading"  # its own simulator; always JSON, whatever the format
    ]


def run_demo(options: DemoOptions) -> int:
    from contextlib import ExitStack

    from ray_forwarder.alpaca.streams import STREAMS
    from ray_forwarder.ops import logs
    from ray_forwarder_dev.sim import SimConfig, SimulatorThread

    log_level = log_level_from_env("WARNING")
    logs.configure(log_level, component="demo")
    symbols = [s.strip().upper() for s in options.symbols.split(",") if s.strip()]
    streams = demo_streams(options.streams, options.wire_format)
    announce = "demo: starting a local Apache Kafka broker (the first run downloads its jars) ..."
    with kafka_for_tools(announce) as bootstrap, ExitStack() as running:
        sims = {}
        stream_settings: dict[str, object] = {}
        for name in streams:
            if STREAMS[name].family == "trading":
                from ray_forwarder_dev.sim.trading import TradingSimConfig, TradingSimulatorThread

                trading = TradingSimConfig(
                    keys={SIM_KEY: SIM_SECRET},
                    rate=options.rate * _OTHER_STREAM_RATE_SHARE,
                    duplicate_ratio=options.duplicate_ratio,
                )
                sims[name] = running.enter_context(TradingSimulatorThread(trading))
                stream_settings[STREAMS[name].url_setting] = sims[name].url
                continue
            sim_config = SimConfig(
                stream=name,
                symbols=_SIM_SYMBOLS.get(name, symbols),
                rate=options.rate if name == "stocks" else options.rate * _OTHER_STREAM_RATE_SHARE,
                duplicate_ratio=options.duplicate_ratio,
                keys={SIM_KEY: SIM_SECRET},
            )
            sims[name] = sim = running.enter_context(SimulatorThread(sim_config))
            definition = STREAMS[name]
            stream_settings[definition.url_setting] = sim.url
            if name in DEMO_SYMBOLS and definition.symbols_setting is not None:
                stream_settings[definition.symbols_setting] = DEMO_SYMBOLS[name]
        if "crypto" in streams:  # every crypto channel the simulator produces
            stream_settings["alpaca_crypto_channels"] = list(STREAMS["crypto"].subscribable)
        settings = load_settings(
            alpaca_api_key_id=SIM_KEY,
            alpaca_secret_key=SIM_SECRET,
            alpaca_streams=streams,
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
            connection_limit_backoff=1.0,
            log_level=log_level,
            **stream_settings,
        )
        print(f"demo: Kafka at {bootstrap}; streams {', '.join(streams)}")
        for name, sim in sims.items():
            shown = ",".join(DEMO_SYMBOLS.get(name, symbols))
            if STREAMS[name].family == "trading":
                shown = "(the account's orders)"
            print(f"  {name:<8} simulator at {sim.url}  symbols {shown}")
        print(f"demo: running the forwarder on a local Ray for {options.duration:g}s ...")
        from ray_forwarder.ray.driver import ensure_ray, run_forwarder

        asyncio.run(prepare_topics(settings))
        ensure_ray()  # a local Ray with only what the forwarder uses
        outage = (
            _Outage(sims["stocks"], options.duration / 3, options.outage_s)
            if "stocks" in sims
            else None
        )

        def progress(snap: ForwarderSnapshot, elapsed: float) -> None:
            if outage is not None:
                stocks = _by_stream(snap, "received").get("stocks", Counter())
                outage.tick(elapsed, flowing=sum(stocks.values()) > 0)
            _progress(snap, elapsed)

        result = asyncio.run(run_forwarder(settings, duration=options.duration, progress=progress))
        sim_stats = {name: _sim_stats(sim) for name, sim in sims.items()}
        envelopes = asyncio.run(_read_one_each(settings))
    _summary(result.snapshot, result.elapsed_s, sim_stats, envelopes)
    if result.error:
        print(f"demo: FAILED: {result.error}", file=sys.stderr)
        return 1
    return 0 if result.drained else 1


class _Outage:
    """Drop the simulator's connections at `at` s, once data flows (a gap needs data on
    both sides: on a slow start the drop would come before the first item), and refuse new
    ones for `seconds`."""

    def __init__(self, sim: object, at: float, seconds: float) -> None:
        self._sim, self._at, self._seconds = sim, at, seconds
        self._state = "before" if seconds > 0 else "done"
        self._down_at = 0.0

    def tick(self, elapsed: float, flowing: bool = True) -> None:
        sim: Any = self._sim
        if self._state == "before" and elapsed >= self._at and flowing:
            print(f"demo: dropping the feed connection for {self._seconds:g}s ...", flush=True)
            sim.refuse_connections(True)
            sim.drop_connections()
            self._state, self._down_at = "down", elapsed
        elif self._state == "down" and elapsed >= self._down_at + self._seconds:
            sim.refuse_connections(False)
            self._state = "done"


def _sim_stats(sim: Any) -> dict[str, int]:
    """What a simulator sent, in one shape for both protocols (the trading simulator counts
    `events` where the market-data one counts `items`)."""
    stats = dict(sim.stats())
    stats.setdefault("items", stats.get("events", 0))
    return stats


def _progress(snap: ForwarderSnapshot, elapsed: float) -> None:
    received = sum(snap.total("received").values())
    forwarded = sum(snap.total("acked").values())
    states = ",".join(f"{s['shard_id']}={s['state']}" for s in snap.shards)
    print(
        f"  t={elapsed:5.1f}s  received={received:>8}  forwarded={forwarded:>8}  "
        f"rate={forwarded / max(elapsed, 1e-9):8.0f}/s  {states}",
        flush=True,
    )


async def _read_one_each(settings: Settings) -> dict[str, dict[str, object] | None]:
    """One envelope per stream, read back from Kafka (its first data topic)."""
    from aiokafka import AIOKafkaConsumer

    out: dict[str, dict[str, object] | None] = {}
    for stream in settings.streams():
        topic = getattr(settings, stream.channels[0].topic.setting)
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.kafka_bootstrap_servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            batch = await consumer.getmany(timeout_ms=5000, max_records=1)
            records = [r for rs in batch.values() for r in rs]
            out[stream.name] = orjson.loads(records[0].value) if records else None
        finally:
            await consumer.stop()
    return out


def _by_stream(snap: ForwarderSnapshot, name: str) -> dict[str, Counter[str]]:
    totals: dict[str, Counter[str]] = {}
    for shard in snap.shards:
        totals.setdefault(shard.get("stream", "stocks"), Counter()).update(shard.get(name, {}))
    return totals


def _summary(
    snap: ForwarderSnapshot,
    elapsed: float,
    sim_stats: dict[str, dict],
    envelopes: dict[str, dict[str, object] | None],
) -> None:
    received, forwarded = _by_stream(snap, "received"), _by_stream(snap, "acked")
    dedup, dropped = _by_stream(snap, "deduplicated"), _by_stream(snap, "dropped")
    print("\ndemo summary")
    print(f"  ran {elapsed:.1f}s")
    total = 0
    for stream, stats in sim_stats.items():
        print(
            f"\n  {stream}: the simulator sent {stats['items']} items ({stats['distinct']} "
            f"distinct, {stats['duplicates']} duplicates injected)"
        )
        print(f"    {'channel':<14}{'received':>10}{'forwarded':>11}{'dedup':>8}{'dropped':>9}")
        got, sent = received.get(stream, Counter()), forwarded.get(stream, Counter())
        deduped, lost = dedup.get(stream, Counter()), dropped.get(stream, Counter())
        for channel in sorted(set(got) | set(sent)):
            print(
                f"    {channel:<14}{got[channel]:>10}{sent[channel]:>11}"
                f"{deduped[channel]:>8}{lost[channel]:>9}"
            )
        total += sum(sent.values())
        envelope = envelopes.get(stream)
        print("    one envelope read back from Kafka:")
        print("     ", orjson.dumps(envelope).decode()[:300] if envelope else "(none found)")
    print(f"\n  total forwarded {total} records, {total / max(elapsed, 1e-9):.0f} records/s")
    skipped = snap.total("skipped")
    if skipped:
        print(f"  skipped: {dict(skipped)}")
    print(f"  gaps: {_gap_summary(snap)}")


def _gap_summary(snap: ForwarderSnapshot) -> str:
    """Gaps opened, closed, filled and unfilled over all shards, and the bars backfilled."""
    closed = sum(sum((s.get("gaps") or {}).values()) for s in snap.shards)
    still_open = sum(1 for s in snap.shards if s.get("gap_open"))
    backfill = [s.get("backfill") or {} for s in snap.shards]
    filled = sum(b.get("gaps_filled", 0) for b in backfill)
    unfilled = sum(sum((b.get("gaps_unfilled") or {}).values()) for b in backfill)
    bars = sum(b.get("final", 0) + b.get("open", 0) + b.get("merged", 0) for b in backfill)
    return (
        f"{closed + still_open} opened, {closed} closed, {filled} filled, {unfilled} unfilled; "
        f"{bars} minute bars taken from REST"
    )
