"""Partition choice (Java's murmur2, as `send()` picks) and the split of a batch by partition."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ray_forwarder.runtime.partitioning import KeyPartitioner, Run, split_by_partition

#: Kafka's own test vectors for Utils.murmur2 (clients/.../utils/UtilsTest.java), as signed
#: Java ints.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "murmur2"), JAVA_MURMUR2.items())
@pytest.mark.parametrize("count", [1, 3, 6, 12, 50])
def test_a_key_goes_where_javas_default_partitioner_puts_it(
    key: bytes, murmur2: int, count: int
) -> None:
    partition_of = KeyPartitioner()
    partition_of.use("t", range(count))
    # Java: Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions
    assert partition_of("t", key) == (murmur2 & 0x7FFFFFFF) % count


def test_the_memo_starts_over_when_the_partitions_change() -> None:
    partition_of = KeyPartitioner()
    partition_of.use("t", [0, 1, 2])
    assert partition_of("t", b"foobar") == (JAVA_MURMUR2[b"foobar"] & 0x7FFFFFFF) % 3
    partition_of.use("t", {5, 4, 3, 2, 1, 0})
    assert partition_of("t", b"foobar") == (JAVA_MURMUR2[b"foobar"] & 0x7FFFFFFF) % 6
    with pytest.raises(ValueError, match="no partitions"):
        partition_of.use("u", [])


def _records(keys: list[bytes], topic: str = "t") -> list[tuple[str, bytes, bytes]]:
    return [(topic, key, str(index).encode()) for index, key in enumerate(keys)]


def test_a_batch_splits_by_topic_and_partition_keeping_order() -> None:
    partition_of = KeyPartitioner()
    partition_of.use("t", range(3))
    partition_of.use("u", range(3))
    keys = [b"21", b"foobar", b"abc", b"21", b"abc", b"foobar"]
    records = _records(keys) + _records([b"21"], topic="u")
    plan = split_by_partition(records, partition_of)
    expected: dict[tuple[str, int], list[int]] = {}
    for index, (topic, key, _) in enumerate(records):
        slot = (topic, (JAVA_MURMUR2[key] & 0x7FFFFFFF) % 3)
        expected.setdefault(slot, []).append(index)
    assert plan == {slot: [Run(indices)] for slot, indices in expected.items()}


def test_an_isolated_record_is_a_run_of_its_own_between_its_neighbours() -> None:
    partition_of = KeyPartitioner()
    partition_of.use("t", [0])
    plan = split_by_partition(_records([b"a"] * 5), partition_of, isolate={1, 2})
    assert plan == {("t", 0): [Run([0]), Run([1], True), Run([2], True), Run([3, 4])]}


@given(
    keys=st.lists(st.binary(min_size=1, max_size=8), max_size=60),
    partitions=st.integers(1, 8),
    isolate=st.sets(st.integers(0, 59)),
)
def test_every_record_lands_once_in_its_partition_in_batch_order(
    keys: list[bytes], partitions: int, isolate: set[int]
) -> None:
    partition_of = KeyPartitioner()
    partition_of.use("t", range(partitions))
    records = _records(keys)
    plan = split_by_partition(records, partition_of, isolate)
    seen: list[int] = []
    for (topic, partition), runs in plan.items():
        indices = [index for run in runs for index in run.indices]
        assert indices == sorted(indices)
        assert all(partition_of(topic, records[i][1]) == partition for i in indices)
        for run in runs:
            assert run.alone == (run.indices[0] in isolate)
            assert not run.alone or len(run.indices) == 1
        seen += indices
    assert sorted(seen) == list(range(len(records)))
