"""The benchmark's baseline: the best single-process forwarder we can write, run as
`python -m ray_forwarder_dev.bench.baseline --expect N` in a process of its own.

One asyncio loop on uvloop, one WebSocket connection, orjson/msgpack, and one
aiokafka producer fed whole batches: records go straight into a `BatchBuilder` per
partition (`create_batch()`; the partition from aiokafka's default murmur2 partitioner,
cached per key: `partitioning.KeyPartitioner`, as in the product's producer), and each
batch is handed over with `send_batch()` once full or `PRODUCER_LINGER_MS` old; its
acknowledgement arrives as a callback. Nothing waits for Kafka per record, and no future
is made per record: aiokafka's per-record `send()` costs about ten times the CPU of
appending to a batch (measured here: 21-32 against 2-4 µs per record). aiokafka queues
at most one batch per partition behind the one in flight, which is the backpressure.

It does the product's work per item: the same envelope, the same dedup key
(`channel:symbol:event_ts:digest`, BLAKE2b of the item with sorted keys) kept for
DEDUP_TTL_SECONDS / DEDUP_MAX_KEYS, the item serialised once (the bytes the digest covers
go into the envelope as an `orjson.Fragment`), the same skips of items JSON cannot carry,
the same seq per (channel, symbol), minute-bar
finalisation, the same topics, record keys and partitions, and the same producer settings
(acks=all, idempotence, linger, compression, batch size). It configures itself from the
same environment variables.

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
import sys
import time
from collections import Counter, OrderedDict
from typing import Any

import msgpack
import orjson
import uvloop
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import connect

from ray_forwarder.alpaca.channels import CHANNEL_BY_TYPE
from ray_forwarder.alpaca.codec import connection_headers, encode_auth, encode_subscribe
from ray_forwarder.alpaca.timestamps import canonical, from_unix_nanos
from ray_forwarder.config import Settings, load_settings
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.envelope import (
    final_bar_key,
    item_dedup_key,
    serialise_payload,
    utc_now_iso,
)
from ray_forwarder.core.pipeline import has_non_finite
from ray_forwarder.core.topics import topic_map
from ray_forwarder.runtime.partitioning import KeyPartitioner
from ray_forwarder.runtime.producer import producer_options

_REVISABLE = frozenset({"bars", "updatedBars", "dailyBars"})
_MINUTE_BARS = frozenset({"bars", "updatedBars"})


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
        # dedup key -> expiry, oldest first. An OrderedDict, not a dict: a dict trimmed from
        # the front keeps the deleted slots until it is resized, so `next(iter(d))` walks
        # over all of them (measured: 18 % of this process's time once DEDUP_MAX_KEYS was
        # reached); an OrderedDict's front is one pointer away.
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._seq: dict[tuple[str, str], int] = {}
        self._record_keys: dict[str, bytes] = {}
        self._bars = BarFinalizer(settings.bar_final_delay_seconds)
        self.received = 0
        self.deduplicated = 0
        self.emitted = 0
        self.acked = 0
        self.failed = 0
        self.skipped: Counter[str] = Counter()
        self._linger = settings.producer_linger_ms / 1000
        self._partition_of = KeyPartitioner()  # topics' partitions from the warm-up
        # (topic, partition) -> open batch and when its first record went in
        self._open: dict[tuple[str, int], tuple[Any, float]] = {}
        self._full: list[tuple[tuple[str, int], Any]] = []  # closed, to hand over in order
        self._in_flight = 0  # records in batches handed over, not yet acknowledged
        self._all_acked = asyncio.Event()
        self._all_acked.set()

    # --- per frame ----------------------------------------------------------------------

    async def on_frame(self, frame: bytes, is_json: bool) -> None:
        """Decode a frame, append its records to the open batches, then hand over the
        batches that filled up (the only place this waits: for Kafka's backpressure)."""
        self.process(frame, is_json)
        if self._full:
            await self._hand_over_full()

    def process(self, frame: bytes, is_json: bool) -> None:
        now = time.monotonic()
        ingest_ts = utc_now_iso()
        try:
            if is_json:  # orjson reads the bytes: no UTF-8 decode into a str first
                messages = orjson.loads(frame)
            else:
                messages = msgpack.unpackb(frame, timestamp=0, strict_map_key=False)
        except Exception:
            self.skipped["malformed_frame"] += 1
            return
        if not isinstance(messages, list):
            self.skipped["malformed_frame"] += 1
            return
        seen, ttl, topics, seqs = self._seen, self._ttl, self._topics, self._seq
        while seen:  # every key lives `ttl`: the oldest is first
            oldest, expiry = next(iter(seen.items()))
            if expiry > now:
                break
            del seen[oldest]
        append, record_keys = self._append, self._record_keys
        for item in messages:
            channel = CHANNEL_BY_TYPE.get(item.get("T")) if isinstance(item, dict) else None
            if channel is None:
                self.skipped["not_data"] += 1  # control replies, unknown types
                continue
            symbol, raw_ts = item.get("S"), item.get("t")
            try:
                event_ts = _event_ts(raw_ts)
            except ValueError:
                self.skipped["invalid_item"] += 1
                continue
            if not isinstance(symbol, str) or not symbol:
                self.skipped["invalid_item"] += 1
                continue
            if not isinstance(raw_ts, str):  # msgpack Timestamp; JSON keeps Alpaca's string
                item["t"] = event_ts
            # serialised once: the bytes feed the dedup digest and go into the envelope as
            # they are (an orjson.Fragment), as in the product's pipeline
            try:
                body = serialise_payload(item)
            except TypeError:
                self.skipped["unencodable"] += 1
                continue
            if b"null" in body and has_non_finite(item):
                self.skipped["non_finite_number"] += 1
                continue
            self.received += 1
            topic = topics.get(channel)
            if topic is None:
                self.skipped["unrouted"] += 1
                continue
            key = item_dedup_key(channel, symbol, event_ts, body)
            if key in seen:
                self.deduplicated += 1
                continue
            seen[key] = now + ttl
            if len(seen) > self._max_keys:
                seen.popitem(last=False)
            if channel in _MINUTE_BARS:
                self._bars.observe(symbol, event_ts, item, now)
            seq = seqs.get((channel, symbol), 0) + 1
            seqs[(channel, symbol)] = seq
            record_key = record_keys.get(symbol)
            if record_key is None:
                record_key = record_keys[symbol] = symbol.encode()
            value = orjson.dumps(
                {
                    "ingest_ts": ingest_ts,
                    "event_ts": event_ts,
                    "channel": channel,
                    "symbol": symbol,
                    "seq": seq,
                    "payload": orjson.Fragment(body),
                    "is_final": channel not in _REVISABLE,
                    "source": "alpaca",
                    "key": key,
                }
            )
            append(topic, record_key, value, now)

    def finalize(self, bars) -> list[tuple[str, bytes, bytes]]:
        ingest_ts = utc_now_iso()
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
                    "payload": orjson.Fragment(serialise_payload(bar.payload)),
                    "is_final": True,
                    "source": "alpaca",
                    "key": final_bar_key(bar.symbol, bar.bar_ts),
                }
            )
            out.append((self._topics["bars"], bar.symbol.encode(), value))
        return out

    async def send_finals(self, drain: bool = False) -> None:
        now = time.monotonic()
        bars = self._bars.drain() if drain else self._bars.due(now)
        for topic, key, value in self.finalize(bars):
            self._append(topic, key, value, now)
        await self._hand_over_full()

    # --- Kafka --------------------------------------------------------------------------

    async def warm_up(self) -> None:
        """Learn every topic's partitions before the first record, as the product does."""
        for topic in sorted(set(self._topics.values())):
            self._partition_of.use(topic, await self._producer.partitions_for(topic))

    def _append(self, topic: str, key: bytes, value: bytes, now: float) -> None:
        """Into the partition's open batch; a full one is set aside for `_hand_over_full`
        (in order) and a new one opened: no await, no future per record."""
        self.emitted += 1
        slot = (topic, self._partition_of(topic, key))
        entry = self._open.get(slot)
        if entry is None:
            entry = self._open[slot] = (self._producer.create_batch(), now)
        if entry[0].append(key=key, value=value, timestamp=None) is None:  # full
            self._full.append((slot, entry[0]))
            entry = self._open[slot] = (self._producer.create_batch(), now)
            entry[0].append(key=key, value=value, timestamp=None)

    async def _hand_over_full(self) -> None:
        full, self._full = self._full, []
        for slot, batch in full:
            await self._send(slot, batch)

    async def _send(self, slot: tuple[str, int], batch: Any) -> None:
        batch.close()  # an open batch would linger once more inside aiokafka
        count = batch.record_count()
        self._in_flight += count
        self._all_acked.clear()
        future = await self._producer.send_batch(batch, slot[0], partition=slot[1])
        future.add_done_callback(lambda f: self._on_ack(f, count))

    async def flush_due(self, now: float, everything: bool = False) -> float | None:
        """Hand over the batches whose linger passed (or all); the next deadline, if any."""
        await self._hand_over_full()  # those come first in their partitions
        deadline = None
        for slot, (batch, since) in list(self._open.items()):
            due = since + self._linger
            if everything or due <= now:
                del self._open[slot]
                await self._send(slot, batch)
            elif deadline is None or due < deadline:
                deadline = due
        return deadline

    def _on_ack(self, future: asyncio.Future[Any], count: int) -> None:
        if future.cancelled() or future.exception() is not None:
            self.failed += count
        else:
            self.acked += count
        self._in_flight -= count
        if self._in_flight == 0:
            self._all_acked.set()

    async def wait_acked(self) -> None:
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
    producer = producer_options(settings).create_producer()
    await producer.start()
    key, secret = settings.require_credentials()
    subscriptions = dict.fromkeys(settings.alpaca_channels, settings.alpaca_symbols)
    forwarder = Baseline(settings, producer)
    try:
        await forwarder.warm_up()
        async with connect(
            settings.stream_url,
            additional_headers=connection_headers(settings.alpaca_wire_format),
            max_size=None,
            max_queue=64,
            # No keepalive pings: behind a backlog of queued frames the pong arrives late
            # and websockets closes the connection (1011) although the feed is alive (seen at
            # 50k items/s on a loaded machine). The bench's feed is local; it cannot go stale.
            ping_interval=None,
        ) as ws:
            await ws.recv()  # connected
            await ws.send(encode_auth(key, secret))
            await ws.recv()  # authenticated (a refusal shows up as nothing received)
            await ws.send(encode_subscribe(subscriptions))
            await ws.recv()  # subscription
            is_json = settings.alpaca_wire_format == "json"
            last_frame = last_finals = time.monotonic()
            deadline: float | None = None
            while forwarder.received < expect:
                now = time.monotonic()
                wait = idle_timeout - (now - last_frame)
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - now))
                try:  # a timeout context, not wait_for: no task per frame
                    async with asyncio.timeout(wait):
                        frame = await ws.recv(decode=False)
                except TimeoutError:
                    if time.monotonic() - last_frame >= idle_timeout:
                        break
                else:
                    last_frame = time.monotonic()
                    await forwarder.on_frame(frame, is_json)
                now = time.monotonic()
                if now - last_finals > 0.25:
                    last_finals = now
                    await forwarder.send_finals()
                deadline = await forwarder.flush_due(now)
            await forwarder.send_finals(drain=True)
            await forwarder.flush_due(time.monotonic(), everything=True)
            await forwarder.wait_acked()
    finally:
        await producer.stop()
    return forwarder.stats()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_forwarder_dev.bench.baseline")
    parser.add_argument("--expect", type=int, required=True, help="items to read, then stop")
    parser.add_argument("--idle-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    settings = load_settings()
    stats = uvloop.run(run(settings, args.expect, args.idle_timeout))
    print(orjson.dumps({"event": "done", "loop": "uvloop", **stats}).decode(), flush=True)
    sys.stdin.readline()  # "exit": the bench has taken its last reading


if __name__ == "__main__":
    main()
