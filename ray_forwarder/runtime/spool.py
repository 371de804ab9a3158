"""A bounded, append-only disk queue that takes over when a lane's memory buffer is full.

Records are msgpack frames in numbered segment files; the oldest segment is read back
first and deleted once read, so the spool is a FIFO that never rewrites a file. It is a
buffer for a Kafka outage, not a journal: a spool belongs to one lane of one shard actor
incarnation and is removed when that lane closes (a restarted shard starts empty, like
its memory buffer). Writes are plain buffered appends from the event loop: a few
microseconds per record against the page cache, cheaper than handing them to a thread.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import msgpack

from ray_forwarder.core.pipeline import OutRecord

log = logging.getLogger(__name__)

SEGMENT_BYTES = 4 * 1024 * 1024
#: Per record on disk besides key and value: msgpack framing, topic, channel, timestamp.
_OVERHEAD = 64


class SpoolFull(Exception):
    """The spool is at its size bound; the record was not written."""


@dataclass(slots=True)
class _Segment:
    path: Path
    records: int = 0
    bytes: int = 0  # what the segment's records count against the bound (`cost`)


class DiskSpool:
    """FIFO of (record, received) on disk, at most `max_bytes` of it (approximately)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self._dir = directory
        self._max_bytes = max_bytes
        self._segments: deque[_Segment] = deque()
        self._writer: IO[bytes] | None = None
        self._writer_bytes = 0
        self._reader: msgpack.Unpacker | None = None
        self._reader_file: IO[bytes] | None = None
        self._next_segment = 0
        self.records = 0
        self.bytes = 0
        self.written_total = 0
        self.lost_total = 0  # counted records that could not be read back (a cut segment)

    def __len__(self) -> int:
        return self.records

    @staticmethod
    def cost(record: OutRecord) -> int:
        return len(record.key) + len(record.value) + len(record.topic) + _OVERHEAD

    def append(self, record: OutRecord, received: float) -> None:
        size = self.cost(record)
        if self.bytes + size > self._max_bytes:
            raise SpoolFull
        if self._writer is None or self._writer_bytes >= SEGMENT_BYTES:
            self._open_segment()
        assert self._writer is not None
        self._writer.write(
            msgpack.packb((record.topic, record.key, record.value, record.channel, received))
        )
        self._segments[-1].records += 1
        self._segments[-1].bytes += size
        self._writer_bytes += size
        self.records += 1
        self.bytes += size
        self.written_total += 1

    def pop_many(self, limit: int) -> list[tuple[OutRecord, float]]:
        """Up to `limit` of the oldest records, removed from the spool.

        A segment that holds fewer readable records than were written to it (cut
        mid-record by a partial write on a full disk, or damaged) gives what it can; the
        unreadable tail is counted in `lost_total`, logged, and skipped.
        """
        out: list[tuple[OutRecord, float]] = []
        while len(out) < limit and self.records:
            head = self._segments[0]
            try:
                ended = self._read_head(head, out, limit)
            except Exception as exc:  # unreadable or malformed: the rest of it is lost
                self._lose_head(head, f"{type(exc).__name__}: {exc}")
                continue
            if ended and head.records:  # the file ended before the records counted into it
                self._lose_head(head, "segment ends mid-record")
            elif not head.records:
                self._drop_head()
        return out

    def _read_head(self, head: _Segment, out: list[tuple[OutRecord, float]], limit: int) -> bool:
        """Read records of the oldest segment into `out`; True if its file ended first."""
        if self._reader is None:
            if self._writer is not None and len(self._segments) == 1:
                self._close_writer()  # reading the segment being written: seal it
            self._reader_file = head.path.open("rb")
            self._reader = msgpack.Unpacker(self._reader_file, raw=False)
        for topic, key, value, channel, received in self._reader:
            record = OutRecord(topic, key, value, channel)
            out.append((record, received))
            cost = self.cost(record)
            head.records -= 1
            head.bytes -= cost
            self.records -= 1
            self.bytes -= cost
            if len(out) >= limit or not head.records:
                return False
        return True

    def _lose_head(self, head: _Segment, why: str) -> None:
        """Give up the oldest segment's unread records (counted and logged), drop it."""
        lost = head.records
        self.lost_total += lost
        self.records -= lost
        self.bytes = max(0, self.bytes - head.bytes)
        head.records = head.bytes = 0
        log.error(
            "spool segment %s lost %d unreadable records (%s); %d lost so far",
            head.path, lost, why, self.lost_total,
        )  # fmt: skip
        self._drop_head()

    def close(self) -> None:
        """Forget everything and remove the directory."""
        self._close_writer()
        if self._reader_file is not None:
            self._reader_file.close()
        self._reader = self._reader_file = None
        self._segments.clear()
        self.records = self.bytes = 0
        shutil.rmtree(self._dir, ignore_errors=True)

    def _open_segment(self) -> None:
        self._close_writer()
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"{self._next_segment:08d}.spool"
        self._next_segment += 1
        self._writer = path.open("wb")
        self._writer_bytes = 0
        self._segments.append(_Segment(path))

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _drop_head(self) -> None:
        head = self._segments.popleft()
        if self._reader_file is not None:
            self._reader_file.close()
        self._reader = self._reader_file = None
        try:
            os.unlink(head.path)
        except OSError:
            log.warning("could not remove spool segment %s", head.path, exc_info=True)
