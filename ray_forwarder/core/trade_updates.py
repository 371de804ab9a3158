"""Trade updates -> deduplicated, sequenced, enveloped Kafka records. No I/O.

The same envelope as market data, with the choices that keep an order's story intact:

- **record key = order id**: every event of one order lands in one partition, in order.
- **seq** strictly increasing per order id (the record key), across reconnects; epochs
  across shard restarts as for market data. Order ids never come back, so the table is an
  LRU bounded at `ORDER_SEQ_MAX_KEYS` (a forgotten id that returns jumps, never repeats).
- **is_final = true** for every event: a trade update is a fact that is never revised (a
  later event about the order is a new record). Whether the order is done is in the
  payload: `event` (`fill`, `canceled`, …) and `order.status`.
- **dedup identity** `trade_updates:<order id>:<event>:<event_ts>:<digest>`, where the
  digest covers the whole serialised `data` object (keys sorted): two events are merged only
  when they are the very same event (a redelivered frame). Two fills of one order differ in
  `execution_id`, `qty`, `order.filled_qty`, … and are both kept.
"""

from __future__ import annotations

from typing import Any

import orjson

from ray_forwarder.alpaca.events import Skipped
from ray_forwarder.alpaca.trading import TRADE_UPDATES, TradeUpdate
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.envelope import _digest, serialise_payload
from ray_forwarder.core.pipeline import EventPipeline, OutRecord, Sequencer, has_non_finite

#: Orders remembered for seq numbering (an account's open and recent orders, with room).
ORDER_SEQ_MAX_KEYS = 250_000


def trade_update_dedup_key(order_id: str, event: str, event_ts: str, body: bytes) -> str:
    """The dedup key of a trade update from its `serialise_payload` bytes (see module)."""
    return f"{TRADE_UPDATES}:{order_id}:{event}:{event_ts}:{_digest(body)}"


class TradeUpdatePipeline(EventPipeline):
    """`EventPipeline` for the trading stream: same counters, skips, status records and
    seq epochs; `process` takes `TradeUpdate`s and keys records by order id."""

    def __init__(self, topics: dict[str, str], dedup: DedupCache, *, name: str) -> None:
        super().__init__(
            topics,
            dedup,
            BarFinalizer(0.0),  # no bars on this stream: finalize_due() stays empty
            Sequencer(max_keys=ORDER_SEQ_MAX_KEYS),
            allowed_symbols=None,
            name=name,
        )

    def process(  # type: ignore[override]
        self, items: list[TradeUpdate], ingest_ts: str, now: float
    ) -> list[OutRecord]:
        """Records for one frame's trade updates, in arrival order; redeliveries dropped.
        Never raises for an item's content (see `EventPipeline.process`)."""
        out: list[OutRecord] = []
        counters = self.counters
        topic = self._topics.get(TRADE_UPDATES)
        for item in items:
            order_id = item.order_id
            try:
                body = serialise_payload(item.payload)
            except TypeError as exc:  # bin, ext, non-str keys, depth
                self.skip(Skipped("unencodable", f"trade update of order {order_id}: {exc}"))
                continue
            if b"null" in body and has_non_finite(item.payload):
                self.skip(Skipped("non_finite_number", f"trade update of order {order_id}"))
                continue
            counters.received[TRADE_UPDATES] += 1
            if topic is None:
                counters.unrouted[TRADE_UPDATES] += 1
                continue
            key = trade_update_dedup_key(order_id, item.event, item.event_ts, body)
            if self._dedup.seen(key, now):
                counters.deduplicated[TRADE_UPDATES] += 1
                continue
            out.append(
                self._record(
                    topic,
                    ingest_ts=ingest_ts,
                    event_ts=item.event_ts,
                    channel=TRADE_UPDATES,
                    symbol=item.symbol,
                    payload=orjson.Fragment(body),
                    is_final=True,
                    key=key,
                    seq_symbol=order_id,
                    record_key=order_id,
                )
            )
        return out


def trade_update_record_key(envelope: dict[str, Any]) -> bytes:
    """The record key a trade-update envelope must carry (for checks and consumers)."""
    return str(envelope["payload"]["order"]["id"]).encode()
