"""The outbox's ordering, windowing, re-send and routing, with an in-process receiver.

The receiver here is the unit under test's collaborator, not a Kafka stand-in: the outbox
only knows an async `send(records) -> count`, and these tests control when it fails.
"""

from __future__ import annotations

import asyncio

from ray_forwarder.core.pipeline import OutRecord
from ray_forwarder.runtime.outbox import BatchLimits, Outbox, stable_slot


def _records(n: int, key: bytes = b"SPY", start: int = 0) -> list[OutRecord]:
    return [OutRecord("t", key, str(start + i).encode(), "trades") for i in range(n)]


class Receiver:
    """Fails the calls numbered in `fail_calls` the way a dying producer does: the failing
    call and every call in flight with it fail together."""

    def __init__(self, fail_calls: set[int] | None = None, delay: float = 0.0) -> None:
        self.calls = 0
        self.fail_calls = fail_calls or set()
        self.delay = delay
        self.delivered: list[bytes] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self._generation = 0

    async def send(self, records, ticket) -> tuple[int, str]:
        self.calls += 1
        call, generation = self.calls, self._generation
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            await asyncio.sleep(self.delay)
            if call in self.fail_calls:
                self._generation += 1  # everything in flight dies with this call
            if self._generation != generation or call in self.fail_calls:
                raise ConnectionError(f"call {call} failed")
            self.delivered.extend(value for _topic, _key, value in records)
            return len(records), "receiver"
        finally:
            self.concurrent -= 1


def _limits(**overrides) -> BatchLimits:
    values = dict(max_events=10_000, batch_max_events=10, batch_max_ms=5, max_in_flight=3)
    values.update(overrides)
    values.setdefault("retry_delay", 0.01)
    return BatchLimits(**values)


async def _drain(outbox: Outbox) -> None:
    runner = asyncio.create_task(outbox.run())
    await asyncio.sleep(0.05)
    outbox.close()
    await asyncio.wait_for(runner, 5)


async def test_batches_are_ordered_and_the_window_is_bounded() -> None:
    receiver = Receiver(delay=0.01)
    outbox = Outbox([receiver.send], _limits())
    outbox.put(_records(95), 0.0)
    await _drain(outbox)
    assert receiver.delivered == [str(i).encode() for i in range(95)]
    assert receiver.calls == 10  # 9 full batches of 10 and one of 5
    assert 1 < receiver.max_concurrent <= 3
    stats = outbox.snapshot()
    assert stats.records_acked == 95 and stats.acked_by_channel["trades"] == 95


async def test_a_failed_batch_is_resent_before_anything_newer() -> None:
    receiver = Receiver(fail_calls={2}, delay=0.005)
    outbox = Outbox([receiver.send], _limits())
    outbox.put(_records(50), 0.0)
    await _drain(outbox)
    first_seen: list[bytes] = []
    for value in receiver.delivered:
        if value not in first_seen:
            first_seen.append(value)
    assert first_seen == [str(i).encode() for i in range(50)]
    assert receiver.delivered == [str(i).encode() for i in range(50)]  # nothing twice here
    stats = outbox.snapshot()
    assert stats.batches_failed >= 1 and stats.batches_resent == stats.batches_failed


async def test_repeated_failures_keep_order_and_lose_nothing() -> None:
    receiver = Receiver(fail_calls={1, 2, 3, 4, 7}, delay=0.001)
    outbox = Outbox([receiver.send], _limits(max_in_flight=2))
    outbox.put(_records(40), 0.0)
    await _drain(outbox)
    assert set(receiver.delivered) == {str(i).encode() for i in range(40)}
    acked_order = list(dict.fromkeys(receiver.delivered))
    assert acked_order == [str(i).encode() for i in range(40)]


async def test_a_lone_record_leaves_after_the_linger() -> None:
    receiver = Receiver()
    outbox = Outbox([receiver.send], _limits(batch_max_ms=20))
    runner = asyncio.create_task(outbox.run())
    outbox.put(_records(1), asyncio.get_running_loop().time())
    await asyncio.sleep(0.2)
    assert receiver.delivered == [b"0"]
    outbox.close()
    await runner


async def test_overflow_is_dropped_and_counted_per_channel() -> None:
    receiver = Receiver()
    outbox = Outbox([receiver.send], _limits(max_events=30))
    outbox.put(_records(45), 0.0)
    assert outbox.snapshot().dropped_by_channel["trades"] == 15
    await _drain(outbox)
    assert len(receiver.delivered) == 30


async def test_a_symbol_always_goes_to_the_same_producer() -> None:
    receivers = [Receiver() for _ in range(3)]
    outbox = Outbox([r.send for r in receivers], _limits())
    symbols = [f"S{i}".encode() for i in range(30)]
    for round_no in range(3):
        for symbol in symbols:
            outbox.put(_records(1, key=symbol, start=round_no), 0.0)
    await _drain(outbox)
    for symbol in symbols:
        slot = stable_slot(symbol, 3)
        assert outbox.lane_for(symbol) is outbox.lane_for(symbol)
        assert receivers[slot].calls > 0
    assert sum(len(r.delivered) for r in receivers) == 90
    assert all(r.delivered for r in receivers)  # the hash spreads 30 symbols over 3


def test_stable_slot_does_not_depend_on_the_process() -> None:
    assert stable_slot(b"SPY", 4) == stable_slot(b"SPY", 4) == 3


async def test_backlogged_past_two_full_batches_in_memory_or_once_anything_spools(
    tmp_path,
) -> None:
    """What the session's read loop paces itself by (`AlpacaSession`, `backlogged`)."""
    outbox = Outbox([Receiver().send], _limits(batch_max_events=10))
    outbox.put(_records(20), 0.0)
    assert not outbox.backlogged()  # two full batches: the sender keeps up
    outbox.put(_records(1, start=20), 0.0)
    assert outbox.backlogged()
    await _drain(outbox)
    assert not outbox.backlogged()

    spooling = Outbox(
        [Receiver().send],
        _limits(max_events=5, spool_dir=tmp_path, spool_max_bytes=1 << 20),
    )
    spooling.put(_records(6), 0.0)  # one beyond memory: spooled
    assert spooling.snapshot().spooled == 1 and spooling.backlogged()
    await _drain(spooling)
