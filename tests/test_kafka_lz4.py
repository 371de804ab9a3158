"""lz4 batches are compressed as Kafka's own producer does (fast LZ4), in aiokafka's builder."""

from __future__ import annotations

import struct

import aiokafka.codec
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from hypothesis import given
from hypothesis import strategies as st

from ray_forwarder.runtime.kafka_lz4 import lz4_fast_encode, use_fast_lz4
from ray_forwarder.runtime.producer import ProducerOptions

LZ4_CODEC = 3
LZ4_FRAME_MAGIC = 0x184D2204
BATCH_HEADER_BYTES = 61  # Kafka record batch v2 header, before the (compressed) records


def _envelopes(count: int) -> list[tuple[bytes, bytes]]:
    return [
        (
            f"S{i % 100:04d}".encode(),
            (
                b'{"ingest_ts":"2026-11-27T19:00:00.123456Z","channel":"trades","symbol":"S%04d",'
                b'"seq":%d,"payload":{"T":"t","p":%d.25,"s":%d,"t":"2026-11-27T19:00:%02d.1Z"}}'
                % (i % 100, i, 100 + i % 37, i % 500, i % 60)
            ),
        )
        for i in range(count)
    ]


def _lz4_batch(records: list[tuple[bytes, bytes]]) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=LZ4_CODEC, is_transactional=False,
        producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 22,
    )  # fmt: skip
    for offset, (key, value) in enumerate(records):
        assert builder.append(offset, timestamp=None, key=key, value=value, headers=[])
    return bytes(builder.build())


def test_aiokafka_compresses_lz4_batches_with_the_fast_compressor_once_installed() -> None:
    assert use_fast_lz4()
    records = _envelopes(2000)
    batch = _lz4_batch(records)
    compressed = batch[BATCH_HEADER_BYTES:]
    raw = aiokafka.codec.lz4_decode(compressed)
    assert compressed == lz4_fast_encode(raw)
    # aiokafka's own encoder (LZ4 HC level 9) writes other bytes for the same input
    assert aiokafka.codec.lz4_encode(raw) != compressed
    # and the batch reads back record for record
    read = [(r.key, r.value) for r in DefaultRecordBatch(bytearray(batch))]
    assert read == records


async def test_the_producer_factory_installs_it_for_lz4() -> None:
    import aiokafka.record.default_records as python_builder

    python_builder.lz4_encode = aiokafka.codec.lz4_encode  # as aiokafka ships it
    options = ProducerOptions({"bootstrap_servers": "127.0.0.1:1", "compression_type": "lz4"})
    producer = options.create_producer()  # no connection is made before start()
    await producer.stop()
    assert python_builder.lz4_encode is lz4_fast_encode


def test_the_frame_is_the_one_kafka_reads() -> None:
    """KIP-57: an LZ4 frame with independent blocks and no content checksum."""
    frame = lz4_fast_encode(b"x" * 100_000)
    magic, flags = struct.unpack_from("<IB", frame)
    assert magic == LZ4_FRAME_MAGIC
    assert flags & 0b0010_0000  # block independence
    assert not flags & 0b0000_0100  # content checksum


@given(st.binary(max_size=200_000))
def test_any_payload_round_trips_through_aiokafkas_decoder(payload: bytes) -> None:
    assert aiokafka.codec.lz4_decode(lz4_fast_encode(payload)) == payload
