"""The benchmark's baseline: the best single-process forwarder we can write, run as
`python -m ray_forwarder.bench.baseline --expect N` in a process of its own.

One asyncio loop (uvloop when installed), one WebSocket connection, orjson/msgpack, and one
aiokafka producer fed with `send()` whose acknowledgements arrive as callbacks: nothing
waits for Kafka per record. It does the product's work per item: the same envelope, the same
dedup key (`channel:symbol:event_ts:digest`, BLAKE2b of the item with sorted keys) kept for
DEDUP_TTL_SECONDS / DEDUP_MAX_KEYS, the same seq per (channel, symbol), minute-bar
finalisation, the same topics and record keys, and the same producer settings (acks=all,
idempotence, linger, compression). It configures itself from the same environment variables.

What it leaves out on purpose, because the bench does not exercise it: reconnects, the disk
spool, re-sends after a failed delivery (a failure is counted, and the bench reports the
record as lost), status events and metrics.

Stdout: one JSON line `done` with its counters, once it has received `--expect` items (or
gone `--idle-timeout` seconds without a frame), finalised pending bars and seen every
acknowledgement. It then waits for `exit` on stdin before leaving, so the bench can take
its last CPU and memory reading first.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import msgpack
import orjson
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import connect

from ray_forwarder.bars import BarFinalizer
from ray_forwarder.config import Settings, load_settings
from ray_forwarder.producer import producer_options
from ray_forwarder.protocol.channels import CHANNEL_BY_TYPE
from ray_forwarder.protocol.codec import connection_headers, encode_auth, encode_subscribe
from ray_forwarder.protocol.timestamps import canonical, from_unix_nanos
from ray_forwarder.topics import topic_map

_REVISABLE = frozenset({"bars", "updatedBars", "dailyBars"})
_MINUTE_BARS = frozenset({"bars", "updatedBars"})
_SORT_KEYS = orjson.OPT_SORT_KEYS
_MAX_IN_FLIGHT = 200_000  # records handed to aiokafka and not yet acknowledged
_RESUME_AT = _MAX_IN_FLIGHT // 2


def _event_ts(raw: object) -> str:
    """Canonical `t`: Alpaca's usual 30-character form as is, anything else the long way."""
    if isinstance(raw, str) and len(raw) == 30 and raw[19] == "." and raw[29] == "Z":
        return raw
    if isinstance(raw, msgpack.Timestamp):
        return from_unix_nanos(raw.seconds, raw.nanoseconds)
    return canonical(raw)


class Baseline:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._topics = topic_map(settings)
        self._ttl = settings.dedup_ttl_seconds
        self._max_keys = settings.dedup_max_keys
        self._seen: dict[str, float] = {}  # dedup key -> expiry, oldest first
        self._seq: dict[tuple[str, str], int] = {}
        self._bars = BarFinalizer(settings.bar_final_delay_seconds)
        self.received = 0
        self.deduplicated = 0
        self.emitted = 0
        self.acked = 0
        self.failed = 0
        self.skipped: Counter[str] = Counter()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._all_acked = asyncio.Event()

    # --- per frame ----------------------------------------------------------------------

    async def on_frame(self, frame: bytes, is_json: bool) -> None:
        now = time.monotonic()
        ingest_ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        try:
            if is_json:  # orjson reads the bytes: no UTF-8 decode into a str first
                messages = orjson.loads(frame)
            else:
                messages = msgpack.unpackb(frame, timestamp=0, strict_map_key=False)
        except Exception:
            self.skipped["malformed_frame"] += 1
            return
        seen, ttl, topics, seqs = self._seen, self._ttl, self._topics, self._seq
        while seen:  # every key lives `ttl`: the oldest is first
            oldest = next(iter(seen))
            if seen[oldest] > now:
                break
            del seen[oldest]
        send = self._send
        for item in messages:
            channel = CHANNEL_BY_TYPE.get(item.get("T")) if isinstance(item, dict) else None
            if channel is None:
                self.skipped["not_data"] += 1  # control replies, unknown types
                continue
            symbol = item.get("S")
            try:
                event_ts = _event_ts(item.get("t"))
            except ValueError:
                self.skipped["invalid_item"] += 1
                continue
            if not isinstance(symbol, str) or not symbol:
                self.skipped["invalid_item"] += 1
                continue
            item["t"] = event_ts
            self.received += 1
            topic = topics.get(channel)
            if topic is None:
                self.skipped["unrouted"] += 1
                continue
            digest = hashlib.blake2b(orjson.dumps(item, option=_SORT_KEYS), digest_size=8)
            key = f"{channel}:{symbol}:{event_ts}:{digest.hexdigest()}"
            if key in seen:
                self.deduplicated += 1
                continue
            seen[key] = now + ttl
            if len(seen) > self._max_keys:
                del seen[next(iter(seen))]
            if channel in _MINUTE_BARS:
                self._bars.observe(symbol, event_ts, item, now)
            seq = seqs.get((channel, symbol), 0) + 1
            seqs[(channel, symbol)] = seq
            value = orjson.dumps(
                {
                    "ingest_ts": ingest_ts,
                    "event_ts": event_ts,
                    "channel": channel,
                    "symbol": symbol,
                    "seq": seq,
                    "payload": item,
                    "is_final": channel not in _REVISABLE,
                    "source": "alpaca",
                    "key": key,
                }
            )
            await send(topic, symbol.encode(), value)
        await self._room.wait()

    def finalize(self, bars) -> list[tuple[str, bytes, bytes]]:
        ingest_ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out = []
        for bar in bars:
            seq = self._seq.get(("bars", bar.symbol), 0) + 1
            self._seq[("bars", bar.symbol)] = seq
            value = orjson.dumps(
                {
                    "ingest_ts": ingest_ts,
                    "event_ts": bar.bar_ts,
                    "channel": "bars",
                    "symbol": bar.symbol,
                    "seq": seq,
                    "payload": bar.payload,
                    "is_final": True,
                    "source": "alpaca",
                    "key": f"bars:{bar.symbol}:{bar.bar_ts}:final",
                }
            )
            out.append((self._topics["bars"], bar.symbol.encode(), value))
        return out

    async def send_finals(self, drain: bool = False) -> None:
        bars = self._bars.drain() if drain else self._bars.due(time.monotonic())
        for topic, key, value in self.finalize(bars):
            await self._send(topic, key, value)

    # --- Kafka --------------------------------------------------------------------------

    async def _send(self, topic: str, key: bytes, value: bytes) -> None:
        future = await self._producer.send(topic, value, key=key)
        self.emitted += 1
        self._in_flight += 1
        if self._in_flight >= _MAX_IN_FLIGHT:
            self._room.clear()
        self._all_acked.clear()
        future.add_done_callback(self._on_ack)

    def _on_ack(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.failed += 1
        else:
            self.acked += 1
        self._in_flight -= 1
        if self._in_flight <= _RESUME_AT:
            self._room.set()
        if self._in_flight == 0:
            self._all_acked.set()

    async def wait_acked(self) -> None:
        if self._in_flight:
            await self._all_acked.wait()

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "deduplicated": self.deduplicated,
            "emitted": self.emitted,
            "acked": self.acked,
            "failed": self.failed,
            "skipped": dict(self.skipped),
            "late_revisions": self._bars.late_revisions,
        }


async def run(settings: Settings, expect: int, idle_timeout: float) -> dict[str, Any]:
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    for topic in sorted(set(topic_map(settings).values())):  # as the product does at start
        await producer.partitions_for(topic)
    key, secret = settings.require_credentials()
    subscriptions = dict.fromkeys(settings.alpaca_channels, settings.alpaca_symbols)
    forwarder = Baseline(settings, producer)
    try:
        async with connect(
            settings.stream_url,
            additional_headers=connection_headers(settings.alpaca_wire_format),
            max_size=None,
            max_queue=64,
        ) as ws:
            await ws.recv()  # connected
            await ws.send(encode_auth(key, secret))
            await ws.recv()  # authenticated (a refusal shows up as nothing received)
            await ws.send(encode_subscribe(subscriptions))
            await ws.recv()  # subscription
            is_json = settings.alpaca_wire_format == "json"
            last_finals = time.monotonic()
            while forwarder.received < expect:
                try:
                    frame = await asyncio.wait_for(ws.recv(decode=False), idle_timeout)
                except TimeoutError:
                    break
                await forwarder.on_frame(frame, is_json)
                if time.monotonic() - last_finals > 0.25:
                    last_finals = time.monotonic()
                    await forwarder.send_finals()
            await forwarder.send_finals(drain=True)
            await producer.flush()
            await forwarder.wait_acked()
    finally:
        await producer.stop()
    return forwarder.stats()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_forwarder.bench.baseline")
    parser.add_argument("--expect", type=int, required=True, help="items to read, then stop")
    parser.add_argument("--idle-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    settings = load_settings()
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        loop_name, runner = "asyncio", asyncio.run
    else:
        loop_name, runner = "uvloop", uvloop.run
    stats = runner(run(settings, args.expect, args.idle_timeout))
    print(orjson.dumps({"event": "done", "loop": loop_name, **stats}).decode(), flush=True)
    sys.stdin.readline()  # "exit": the bench has taken its last reading


if __name__ == "__main__":
    main()
