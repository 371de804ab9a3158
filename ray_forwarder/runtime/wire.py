"""A batch of records as it crosses from a shard to a producer actor: one buffer, offsets.

A list of (topic, key, value) tuples costs Ray's pickler two bytes objects and a tuple per
record on each side of the call (and the producer as many allocations again to rebuild
them); a `PackedBatch` pickles as four objects whatever its size: the distinct topics, one
byte per record naming its topic, every key and value back to back in one `bytes`, and
their boundaries in one array. The producer reads keys and values out of the buffer as it
appends them to Kafka batches, so nothing is built twice.

It is also a `Sequence[WireRecord]`, so that code that only wants tuples (tests, the dead
letters, metrics) can iterate it as before.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

WireRecord = tuple[str, bytes, bytes]  # (topic, key, value)

#: A batch names at most this many distinct topics (one byte per record says which).
MAX_TOPICS = 256
_OFFSET = "I"  # unsigned 32-bit: a batch stays far below 4 GiB
assert array(_OFFSET).itemsize == 4


class PackedBatch(Sequence[WireRecord]):
    """Records packed for one Ray call; see the module docstring."""

    __slots__ = ("bounds", "data", "largest", "topic_of", "topics")

    def __init__(
        self,
        topics: tuple[str, ...],
        topic_of: bytes,
        data: bytes,
        bounds: array[int],
        largest: int | None = None,
    ) -> None:
        if len(bounds) != 2 * len(topic_of) + 1:
            raise ValueError("a packed batch needs two bounds per record and one more")
        self.topics = topics  # distinct topics, in order of first appearance
        self.topic_of = topic_of  # per record: its topic's index in `topics`
        self.data = data  # key 0, value 0, key 1, value 1, ...
        #: record i: key = data[bounds[2i]:bounds[2i+1]], value = up to bounds[2i+2]
        self.bounds = bounds
        #: key + value bytes of the largest record (checked against Kafka's request size)
        if largest is None:
            largest = max(
                (bounds[i + 2] - bounds[i] for i in range(0, len(bounds) - 1, 2)), default=0
            )
        self.largest = largest

    @classmethod
    def pack(cls, records: Iterable[WireRecord]) -> PackedBatch:
        if isinstance(records, PackedBatch):
            return records
        topic_ids: dict[str, int] = {}
        topic_of = bytearray()
        parts: list[bytes] = []
        bounds = array(_OFFSET, [0])
        end = largest = 0
        for topic, key, value in records:
            index = topic_ids.get(topic)
            if index is None:
                index = topic_ids[topic] = len(topic_ids)
                if index >= MAX_TOPICS:
                    raise ValueError(f"a packed batch holds at most {MAX_TOPICS} topics")
            topic_of.append(index)
            start = end
            end += len(key)
            bounds.append(end)
            end += len(value)
            bounds.append(end)
            if end - start > largest:
                largest = end - start
            parts.append(key)
            parts.append(value)
        return cls(tuple(topic_ids), bytes(topic_of), b"".join(parts), bounds, largest)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return _unpack, (
            self.topics, self.topic_of, self.data, self.bounds.tobytes(), self.largest
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.topic_of)

    @overload
    def __getitem__(self, index: int) -> WireRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[WireRecord]: ...
    def __getitem__(self, index: int | slice) -> WireRecord | list[WireRecord]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("packed batch index out of range")
        bounds, start = self.bounds, 2 * index
        return (
            self.topics[self.topic_of[index]],
            self.data[bounds[start] : bounds[start + 1]],
            self.data[bounds[start + 1] : bounds[start + 2]],
        )

    def __iter__(self) -> Iterator[WireRecord]:
        topics, data, bounds = self.topics, self.data, self.bounds
        start = 0
        for index in self.topic_of:
            middle, end = bounds[start + 1], bounds[start + 2]
            yield topics[index], data[bounds[start] : middle], data[middle:end]
            start += 2

    def first_per_topic(self) -> Iterator[WireRecord]:
        """One record of each topic (what the latency metrics sample), without the rest."""
        for index in range(len(self.topics)):
            yield self[self.topic_of.index(index)]

    @property
    def nbytes(self) -> int:
        """Key + value bytes of all records."""
        return len(self.data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PackedBatch({len(self)} records, {len(self.data)} bytes, topics={self.topics})"


def _unpack(
    topics: tuple[str, ...], topic_of: bytes, data: bytes, bounds: bytes, largest: int
) -> PackedBatch:
    offsets = array(_OFFSET)
    offsets.frombytes(bounds)
    return PackedBatch(topics, topic_of, data, offsets, largest)


def pack(records: Sequence[WireRecord] | PackedBatch) -> PackedBatch:
    """`records` as a PackedBatch (itself if it is one)."""
    return PackedBatch.pack(records)
