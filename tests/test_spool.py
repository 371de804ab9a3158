"""The disk spool: a FIFO across segment files with a size bound, and a lane that
overflows into it and drains it back in order."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from ray_forwarder.config import load_settings
from ray_forwarder.core.pipeline import OutRecord
from ray_forwarder.ray.shard import ShardSpec, spool_directory
from ray_forwarder.runtime import spool as spool_module
from ray_forwarder.runtime.outbox import BatchLimits, Lane
from ray_forwarder.runtime.spool import DiskSpool, SpoolFull


def _record(n: int, channel: str = "trades") -> OutRecord:
    return OutRecord("alpaca.trades.v1", b"SPY", f'{{"n":{n}}}'.encode(), channel)


def _numbers(values: list[bytes]) -> list[int]:
    return [int(v.decode().split(":")[1].rstrip("}")) for v in values]


def test_spool_is_fifo_across_segments_and_removes_what_it_has_read(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 500)  # many small segments
    spool = DiskSpool(tmp_path / "lane", max_bytes=1_000_000)
    for n in range(50):
        spool.append(_record(n), received=float(n))
    assert len(spool) == 50 and len(list((tmp_path / "lane").iterdir())) > 3
    first = spool.pop_many(20)
    for n in range(50, 60):  # appends while reading keep their place at the tail
        spool.append(_record(n), received=float(n))
    rest = spool.pop_many(1000)
    out = first + rest
    assert _numbers([r.value for r, _ in out]) == list(range(60))
    assert [received for _, received in out] == [float(n) for n in range(60)]
    assert out[0][0] == _record(0)
    assert len(spool) == 0 and spool.bytes == 0
    assert list((tmp_path / "lane").iterdir()) == []  # read segments are deleted
    spool.close()
    assert not (tmp_path / "lane").exists()


def test_spool_refuses_records_beyond_its_bound(tmp_path):
    record = _record(1)
    spool = DiskSpool(tmp_path / "lane", max_bytes=DiskSpool.cost(record) * 3)
    for _ in range(3):
        spool.append(record, 0.0)
    with pytest.raises(SpoolFull):
        spool.append(record, 0.0)
    assert len(spool.pop_many(1)) == 1
    spool.append(record, 0.0)  # room again once read
    assert len(spool) == 3
    spool.close()


@pytest.mark.timeout(20)
def test_a_segment_cut_mid_record_gives_what_is_readable_and_counts_the_lost_tail(
    tmp_path, monkeypatch
):
    """A partial write under a full disk leaves a segment shorter than its count: reading
    it must not spin forever; the readable records come back and the rest is counted."""
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 500)
    spool = DiskSpool(tmp_path / "lane", max_bytes=1_000_000)
    for n in range(30):
        spool.append(_record(n), received=float(n))
    segments = sorted((tmp_path / "lane").iterdir())
    assert len(segments) >= 3
    first = segments[0]
    whole = first.read_bytes()
    first.write_bytes(whole[:-3])  # the last record of the oldest segment is cut
    in_first = len(list(msgpack_frames(whole)))
    out = spool.pop_many(1000)
    numbers = _numbers([r.value for r, _ in out])
    assert numbers == [n for n in range(30) if n != in_first - 1]
    assert spool.lost_total == 1
    assert len(spool) == 0 and spool.bytes == 0
    spool.append(_record(99), 0.0)  # and it keeps working
    assert _numbers([r.value for r, _ in spool.pop_many(10)]) == [99]
    spool.close()


@pytest.mark.timeout(20)
def test_an_unreadable_segment_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 500)
    spool = DiskSpool(tmp_path / "lane", max_bytes=1_000_000)
    for n in range(30):
        spool.append(_record(n), received=float(n))
    first = sorted((tmp_path / "lane").iterdir())[0]
    in_first = len(list(msgpack_frames(first.read_bytes())))
    first.write_bytes(b"\xc1" * 10)  # never-used msgpack byte: not a record at all
    out = spool.pop_many(1000)
    assert _numbers([r.value for r, _ in out]) == list(range(in_first, 30))
    assert spool.lost_total == in_first and len(spool) == 0 and spool.bytes == 0
    spool.close()


def msgpack_frames(data: bytes):
    import msgpack

    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    yield from unpacker


class HeldReceiver:
    """Acknowledges nothing until released, like a producer whose Kafka is down."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.delivered: list[bytes] = []

    async def send(self, records, ticket) -> tuple[int, str]:
        await self.release.wait()
        self.delivered.extend(value for _topic, _key, value in records)
        return len(records), "receiver"


def _limits(tmp_path: Path, spool_max_bytes: int) -> BatchLimits:
    return BatchLimits(
        max_events=20, batch_max_events=5, batch_max_ms=1, max_in_flight=2,
        retry_delay=0.01, spool_dir=tmp_path, spool_max_bytes=spool_max_bytes,
    )  # fmt: skip


async def test_a_full_lane_spools_to_disk_and_drains_it_back_in_order(tmp_path) -> None:
    receiver = HeldReceiver()
    lane = Lane(receiver.send, _limits(tmp_path, spool_max_bytes=1_000_000))
    runner = asyncio.create_task(lane.run())
    for n in range(300):
        lane.put(_record(n), received=0.0)
        if n % 50 == 0:
            await asyncio.sleep(0.005)
    stats = lane.snapshot()
    assert stats.spooled > 200 and stats.buffered <= 20 and not stats.dropped_by_channel
    assert lane.has_room()
    spool_dirs = list(tmp_path.iterdir())
    assert len(spool_dirs) == 1 and any(spool_dirs[0].iterdir())
    receiver.release.set()
    lane.close()
    await asyncio.wait_for(runner, 10)
    assert _numbers(receiver.delivered) == list(range(300))
    assert lane.snapshot().spooled == 0 and lane.snapshot().spooled_total == stats.spooled_total
    assert list(tmp_path.iterdir()) == []  # the lane removed its spool when it ended


async def test_records_are_dropped_and_counted_only_when_memory_and_spool_are_full(
    tmp_path,
) -> None:
    receiver = HeldReceiver()
    spool_room = 30
    lane = Lane(
        receiver.send, _limits(tmp_path, spool_max_bytes=DiskSpool.cost(_record(100)) * spool_room)
    )
    runner = asyncio.create_task(lane.run())
    await asyncio.sleep(0)
    for n in range(100, 200):
        lane.put(_record(n, "quotes" if n % 2 else "trades"), received=0.0)
    stats = lane.snapshot()
    kept = stats.buffered + stats.spooled + stats.in_flight
    dropped = sum(stats.dropped_by_channel.values())
    assert stats.spooled == spool_room and dropped == 100 - kept and dropped > 0
    assert set(stats.dropped_by_channel) == {"trades", "quotes"}
    assert not lane.has_room()
    receiver.release.set()
    lane.close()
    await asyncio.wait_for(runner, 10)
    delivered = _numbers(receiver.delivered)
    assert delivered == sorted(delivered) and len(delivered) == kept
    assert delivered == list(range(100, 100 + kept))  # the oldest were kept, the newest dropped


def test_a_restarted_shard_clears_what_its_dead_incarnation_spooled(tmp_path) -> None:
    settings = load_settings(spool_dir=str(tmp_path))
    spec = ShardSpec("stocks-0", "ws://x", "key", "secret", ("SPY",), ("trades",), run_id="run1")
    leftover = tmp_path / "run1" / "stocks-0" / "lane-0-dead"
    leftover.mkdir(parents=True)
    (leftover / "00000000.spool").write_bytes(b"old")
    assert spool_directory(settings, spec) == tmp_path / "run1" / "stocks-0"
    assert not (tmp_path / "run1" / "stocks-0").exists()
    # Without a run id (a ShardCore on its own) nothing is shared, so nothing is cleared.
    solo = dataclasses.replace(spec, run_id="")
    assert spool_directory(settings, solo) != spool_directory(settings, solo)
