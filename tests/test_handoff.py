"""The shard -> producer hand-off: the packed batch on the wire, and a window sized in bytes.

The receivers here are the outbox's collaborator (an async `send(records, ticket)`), not a
Kafka stand-in; the tests control when they acknowledge.
"""

from __future__ import annotations

import asyncio
import pickle

from hypothesis import given
from hypothesis import strategies as st

from ray_forwarder.config import load_settings
from ray_forwarder.core.pipeline import OutRecord
from ray_forwarder.ray.shard import outbox_limits
from ray_forwarder.runtime.outbox import BatchLimits, Lane, Outbox
from ray_forwarder.runtime.partitioning import (
    KeyPartitioner,
    partition_packed,
    split_by_partition,
)
from ray_forwarder.runtime.wire import PackedBatch

_records = st.lists(
    st.tuples(
        st.sampled_from(["alpaca.trades.v1", "alpaca.quotes.v1", "t", "ü-topic"]),
        st.binary(max_size=40),
        st.binary(max_size=300),
    ),
    max_size=60,
)


@given(_records)
def test_a_packed_batch_carries_its_records_exactly(records) -> None:
    packed = PackedBatch.pack(records)
    received = pickle.loads(pickle.dumps(packed, protocol=5))
    for batch in (packed, received):
        assert list(batch) == records
        assert len(batch) == len(records)
        assert [batch[i] for i in range(len(records))] == records
        assert batch.nbytes == sum(len(k) + len(v) for _, k, v in records)
        assert batch.largest == max((len(k) + len(v) for _, k, v in records), default=0)
        if records:
            assert batch[-1] == records[-1]
        firsts = {topic: (topic, k, v) for topic, k, v in reversed(records)}
        assert list(batch.first_per_topic()) == list(
            dict.fromkeys(firsts[t] for t, _, _ in records)
        )


def test_a_packed_batch_pickles_as_a_handful_of_objects_whatever_its_size() -> None:
    """Ray pickles the call's argument: one buffer, not three objects per record."""
    small = PackedBatch.pack([("t", b"SPY", b"x" * 300)] * 10)
    large = PackedBatch.pack([("t", b"SPY", b"x" * 300)] * 200)
    overhead = len(pickle.dumps(large)) - large.nbytes
    assert overhead < 10 * len(large)  # four offset bytes per key and value, one per topic
    assert len(pickle.dumps(small)) - small.nbytes < 200


@given(_records, st.integers(min_value=1, max_value=7))
def test_reading_partitions_off_the_buffer_agrees_with_the_split(records, partitions) -> None:
    packed = PackedBatch.pack(records)
    partition_of = KeyPartitioner()
    for topic in packed.topics:
        partition_of.use(topic, range(partitions))
    expected = {
        slot: [index for run in runs for index in run.indices]
        for slot, runs in split_by_partition(records, partition_of).items()
    }
    assert partition_packed(packed, partition_of) == expected


def _record(n: int, size: int = 100) -> OutRecord:
    value = str(n).encode().ljust(size - 3, b" ")
    return OutRecord("t", b"SPY", value, "trades")


class HeldReceiver:
    """Acknowledges the first call (whose ack names the producer: until then a lane sends
    one batch at a time) and nothing more until released: what it holds is what the lane
    has in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.concurrent = 0
        self.delivered: list[bytes] = []

    async def send(self, records, ticket) -> tuple[int, str]:
        self.calls += 1
        self.concurrent += 1
        try:
            if self.calls > 1:
                await self.release.wait()
        finally:
            self.concurrent -= 1
        self.delivered.extend(value for _topic, _key, value in records)
        return len(records), "receiver"


async def _until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def test_the_window_admits_batches_by_bytes() -> None:
    receiver = HeldReceiver()
    limits = BatchLimits(
        max_events=10_000, batch_max_events=1000, batch_max_ms=1, max_in_flight=100,
        batch_max_bytes=1_000, max_in_flight_bytes=10_000, retry_delay=0.01,
    )  # fmt: skip
    lane = Lane(receiver.send, limits)
    runner = asyncio.create_task(lane.run())
    for n in range(300):  # 100 bytes each: 10 per batch
        lane.put(_record(n), received=0.0)
    await _until(lambda: receiver.concurrent == 10)
    await asyncio.sleep(0.05)  # nothing more is admitted while the window is full
    stats = lane.snapshot()
    assert receiver.concurrent == 10 and stats.in_flight == 100 and stats.buffered == 190
    receiver.release.set()
    lane.close()
    await asyncio.wait_for(runner, 10)
    assert receiver.delivered == [_record(n).value for n in range(300)]
    assert receiver.calls == 30  # batches of batch_max_bytes, not of batch_max_events


async def test_a_record_bigger_than_the_batch_and_the_window_still_goes_alone() -> None:
    receiver = HeldReceiver()
    receiver.release.set()
    limits = BatchLimits(
        max_events=100, batch_max_events=100, batch_max_ms=1, max_in_flight=4,
        batch_max_bytes=1_000, max_in_flight_bytes=2_000, retry_delay=0.01,
    )  # fmt: skip
    lane = Lane(receiver.send, limits)
    runner = asyncio.create_task(lane.run())
    lane.put(_record(0), received=0.0)
    lane.put(_record(1, size=5_000), received=0.0)
    lane.put(_record(2), received=0.0)
    lane.close()
    await asyncio.wait_for(runner, 10)
    assert receiver.delivered == [_record(0).value, _record(1, 5_000).value, _record(2).value]


async def test_no_spool_while_the_broker_keeps_up(tmp_path) -> None:
    """Defaults: a burst that arrives within one ack round trip is held in flight, not
    spooled. (With a window of 4 batches of 500, 8,400 of these 15,000 records went to
    disk although every batch handed over was acknowledged one round trip later.)"""
    settings = load_settings(buffer_max_events=5_000)
    receiver = HeldReceiver()
    outbox = Outbox([receiver.send], outbox_limits(settings, tmp_path))
    runner = asyncio.create_task(outbox.run())
    for frame in range(150):  # 100-record frames of 300-byte records: 4.5 MB in all
        outbox.put([_record(frame * 100 + n, 300) for n in range(100)], received=0.0)
        await asyncio.sleep(0)  # the session yields between frames, as here
    await _until(lambda: outbox.snapshot().buffered == 0)
    stats = outbox.snapshot()
    assert stats.spooled_total == 0 and not stats.dropped_by_channel
    assert stats.in_flight + stats.records_acked == 15_000
    receiver.release.set()
    outbox.close()
    await asyncio.wait_for(runner, 10)
    assert receiver.delivered == [_record(n, 300).value for n in range(15_000)]
    assert outbox.snapshot().spooled_total == 0


async def test_lane_order_admits_a_whole_window_in_order_and_after_a_jump() -> None:
    """Dozens of a lane's calls arrive in reverse; each is admitted right after its
    predecessor. After a re-send the numbering jumps (the first names no predecessor)."""
    from ray_forwarder.runtime.outbox import Ticket
    from ray_forwarder.runtime.producer import LaneOrder

    order = LaneOrder()
    admitted: list[int] = []

    async def arrive(number: int, after: int | None) -> None:
        ticket = Ticket("lane", number, after, "token")
        await order.wait_turn(ticket, timeout_s=5)
        admitted.append(number)
        await order.admitted(ticket)

    calls = [arrive(n, n - 1 if n > 1 else None) for n in range(64, 0, -1)]
    await asyncio.gather(*calls)
    assert admitted == list(range(1, 65))
    admitted.clear()
    # a re-send after a failure: 500 names nothing, 501.. follow it; 501 arrives first
    await asyncio.gather(arrive(502, 501), arrive(501, 500), arrive(500, None))
    assert admitted == [500, 501, 502]
