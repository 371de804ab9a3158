"""Property-based tests of decode -> pipeline with generated and mutated frames (issue 8 §1).

A frame mixes valid items of every type with items broken in one way each (a bad symbol,
a `t` that is not an instant, a documented field of the wrong type, NaN, content JSON cannot
hold, missing fields, unknown types). Whatever the mix, decoding and processing it must not
raise, and must produce exactly what the valid items alone produce: the same records with
the same seq and dedup keys, the same dedup and seq state, every invalid item counted once
as a skip. Random bytes and byte-flipped msgpack frames must never raise either.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

import msgpack
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_forwarder.alpaca import DataItem, Skipped, decode_frame
from ray_forwarder.config import Settings
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.pipeline import EventPipeline
from ray_forwarder.core.topics import topic_map

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOPICS = topic_map(Settings())
INGEST = "2026-01-05T14:30:02.000000Z"

# --- valid items, per Alpaca's documented schemas ------------------------------------------

symbols = st.sampled_from(["SPY", "QQQ", "BRK.B", "BTC/USD", "AAPL240119C00100000", "A"])
ints = st.integers(-(2**63), 2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(ints, floats)
short_text = st.text(max_size=8)
conditions = st.one_of(st.lists(short_text, max_size=3), short_text, st.none())
json_scalars = st.one_of(st.none(), st.booleans(), ints, floats, short_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(short_text, inner, max_size=3)
    ),
    max_leaves=8,
)

FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "t": {"i": ints, "x": short_text, "p": numbers, "s": numbers, "c": conditions, "z": short_text},
    "q": {
        "ax": short_text, "ap": numbers, "as": numbers, "bx": short_text, "bp": numbers,
        "bs": numbers, "c": conditions, "z": short_text,
    },
    "b": {"o": numbers, "h": numbers, "l": numbers, "c": numbers, "v": numbers, "vw": numbers,
          "n": ints},
    "u": {"o": numbers, "c": numbers, "v": numbers, "n": ints},
    "d": {"o": numbers, "c": numbers, "v": numbers, "n": ints},
    "s": {"sc": short_text, "sm": short_text, "rc": short_text, "rm": short_text, "z": short_text},
    "l": {"u": numbers, "d": numbers, "i": short_text, "z": short_text},
    "c": {"x": short_text, "oi": ints, "op": numbers, "os": numbers, "oc": conditions,
          "ci": ints, "cp": numbers, "cs": numbers, "cc": conditions, "z": short_text},
    "x": {"i": ints, "x": short_text, "p": numbers, "s": numbers, "a": short_text,
          "z": short_text},
    "i": {"p": numbers, "z": short_text},
}  # fmt: skip
#: For each documented field, values of a type Alpaca does not document for it.
WRONG: dict[str, st.SearchStrategy[Any]] = {
    "number": st.one_of(st.booleans(), floats.map(repr), st.lists(ints, max_size=2), st.none()),
    "int": st.one_of(st.booleans(), floats, ints.map(str), st.none()),
    "str": st.one_of(st.booleans(), ints, floats, st.lists(short_text, max_size=2), st.none()),
    "conditions": st.one_of(st.booleans(), ints, st.lists(ints, min_size=1, max_size=2)),
}


def _kind_of(strategy: st.SearchStrategy[Any]) -> str:
    if strategy is numbers:
        return "number"
    if strategy is ints:
        return "int"
    if strategy is conditions:
        return "conditions"
    return "str"


instants = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@st.composite
def valid_items(draw: st.DrawFn, use_msgpack: bool) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(FIELDS)))
    item: dict[str, Any] = {"T": kind, "S": draw(symbols)}
    moment = draw(instants)
    nanos = draw(st.integers(0, 999_999_999))
    if use_msgpack and draw(st.booleans()):
        item["t"] = msgpack.Timestamp(int(moment.timestamp()), nanos)
    else:
        digits = draw(st.integers(0, 9))
        frac = f".{nanos:09d}"[: digits + 1] if digits else ""
        item["t"] = moment.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"
    for name, strategy in FIELDS[kind].items():
        if draw(st.booleans()):  # optional fields may be missing
            item[name] = draw(strategy)
    if draw(st.booleans()):  # fields Alpaca does not document pass unchecked
        item["x_" + draw(short_text)] = draw(json_values)
    return item


# --- invalid items: a valid item broken in exactly one way ---------------------------------

BAD_SYMBOLS = st.one_of(
    st.sampled_from(["", "*", "SP Y", "SP:Y", "SPY\n", "SP\u00ddY", "A" * 33, "\u0661"]),
    st.tuples(st.text(alphabet="ABC", max_size=4), st.sampled_from(" \t:*\x00\x7f\u00e9")).map(
        "".join
    ),
    ints,
    st.lists(st.just("SPY"), max_size=1),
)
BAD_TIMES = st.one_of(
    st.sampled_from(
        [
            "2026-99-99T14:99:99Z", "2026-AB-05T14:30:00Z", "2026-02-30T00:00:00Z",
            "2026-01-05T25:00:00Z", "\u0662\u0660\u0662\u0666-01-05T14:30:00Z",
            "2026-01-05T14:30:00.\u0661Z", "yesterday", "2026-01-05", "0000-01-01T00:00:00Z",
            "2026-01-05T14:30:00.1234567890Z", "2026-01-05T14:30:00+24:00",
        ]
    ),
    ints,
    floats,
    st.booleans(),
)  # fmt: skip
BAD_TIMES_MSGPACK = st.sampled_from(
    [msgpack.Timestamp(2**62, 0), msgpack.Timestamp(-(2**62), 0), msgpack.Timestamp(2**40, 0)]
)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
UNENCODABLE_MSGPACK = st.one_of(
    st.binary(max_size=4),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    st.dictionaries(ints, short_text, min_size=1, max_size=2),
    st.just(msgpack.Timestamp(2**62, 0)),
)


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def invalid_items(draw: st.DrawFn, use_msgpack: bool) -> Any:
    item = draw(valid_items(use_msgpack))
    kinds = ["symbol", "time", "field", "missing", "type", "not_a_map"]
    if use_msgpack:  # JSON cannot carry these (tests/test_items.py covers deep JSON)
        kinds += ["non_finite", "unencodable", "deep"]
    how = draw(st.sampled_from(kinds))
    if how == "symbol":
        item["S"] = draw(BAD_SYMBOLS)
    elif how == "time":
        item["t"] = draw(st.one_of(BAD_TIMES, BAD_TIMES_MSGPACK) if use_msgpack else BAD_TIMES)
    elif how == "field":
        name, strategy = draw(st.sampled_from(sorted(FIELDS[item["T"]].items())))
        item[name] = draw(WRONG[_kind_of(strategy)])
    elif how == "missing":
        del item[draw(st.sampled_from(["S", "t"]))]
    elif how == "type":
        item["T"] = draw(st.sampled_from(["zz", "", "T", "trade"]))
    elif how == "not_a_map":
        return draw(st.one_of(ints, short_text, st.lists(ints, max_size=2)))
    elif how == "deep":
        item["x_deep"] = _nested(draw(st.integers(255, 400)))
    elif how == "non_finite":
        numeric = [n for n, s in FIELDS[item["T"]].items() if s is numbers]
        target = draw(st.sampled_from([*numeric, "x_extra"]))
        value = draw(NON_FINITE)
        item[target] = [1.0, value] if target == "x_extra" else value
    else:
        item["x_bad"] = draw(UNENCODABLE_MSGPACK)
    return item


# --- running decode -> pipeline the way a shard does ---------------------------------------


class Run:
    def __init__(self) -> None:
        self.pipeline = EventPipeline(TOPICS, DedupCache(60.0, 10_000), BarFinalizer(10.0))

    def frame(self, frame: bytes | str) -> list[tuple[str, bytes, bytes, str]]:
        items: list[DataItem] = []
        for event in decode_frame(frame):
            if isinstance(event, DataItem):
                items.append(event)
            elif isinstance(event, Skipped):
                self.pipeline.skip(event)
        records = self.pipeline.process(items, INGEST, 0.0)
        return [(r.topic, r.key, r.value, r.channel) for r in records]


def _encode(items: list[Any], use_msgpack: bool) -> bytes | str:
    if use_msgpack:
        return msgpack.packb(items, datetime=False)
    return orjson.dumps(items).decode()


@st.composite
def mixed_frames(draw: st.DrawFn) -> tuple[bool, list[tuple[bool, Any]]]:
    use_msgpack = draw(st.booleans())
    entries = draw(
        st.lists(
            st.one_of(
                valid_items(use_msgpack).map(lambda item: (True, item)),
                invalid_items(use_msgpack).map(lambda item: (False, item)),
            ),
            max_size=12,
        )
    )
    if entries and draw(st.booleans()):  # a redelivery within the frame
        entries.append(entries[draw(st.integers(0, len(entries) - 1))])
    return use_msgpack, entries


@SETTINGS
@given(mixed_frames())
def test_a_frame_yields_exactly_what_its_valid_items_yield(frame) -> None:
    use_msgpack, entries = frame
    valid = [item for ok, item in entries if ok]
    invalid = [item for ok, item in entries if not ok]
    mixed, reference = Run(), Run()
    got = mixed.frame(_encode([item for _, item in entries], use_msgpack))
    expected = reference.frame(_encode(valid, use_msgpack))
    assert got == expected  # same records, same seq, same keys, same order
    dedup_drops = sum(mixed.pipeline.counters.deduplicated.values())
    assert len(got) + dedup_drops == len(valid)  # every valid item came out, or was a redelivery
    assert mixed.pipeline.counters.skipped.total() == len(invalid)  # each invalid one counted
    assert len(mixed.pipeline.dedup) == len(reference.pipeline.dedup)
    assert mixed.pipeline.sequencer.snapshot() == reference.pipeline.sequencer.snapshot()
    for _topic, key, value, _channel in got:
        _assert_sound(key, orjson.loads(value))


_SYMBOL = re.compile(r"[\x21-\x7e]{1,32}")


def _assert_sound(key: bytes, envelope: dict[str, Any]) -> None:
    """What leaves is sound, checked independently of the code under test."""
    symbol = envelope["symbol"]
    assert _SYMBOL.fullmatch(symbol) and ":" not in symbol and "*" not in symbol
    assert key == symbol.encode() and envelope["payload"]["S"] == symbol
    ts = envelope["event_ts"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", ts, re.ASCII)
    datetime.fromisoformat(ts[:26])  # a real instant


@SETTINGS
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_random_bytes_and_text_never_raise(frame: bytes | str) -> None:
    Run().frame(frame)


@SETTINGS
@given(
    st.lists(st.one_of(json_values, st.dictionaries(st.sampled_from("TStpcSx"), json_values))),
    st.booleans(),
)
def test_random_structures_never_raise_and_what_comes_out_is_sound(items, use_msgpack) -> None:
    for _topic, key, value, _channel in Run().frame(_encode(items, use_msgpack)):
        _assert_sound(key, orjson.loads(value))


@SETTINGS
@given(mixed_frames(), st.data())
def test_byte_flipped_msgpack_frames_never_raise(frame, data) -> None:
    _, entries = frame
    raw = bytearray(msgpack.packb([item for _, item in entries], datetime=False))
    if raw:
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(raw) - 1))
            raw[position] = data.draw(st.integers(0, 255))
    for _topic, key, value, _channel in Run().frame(bytes(raw)):
        _assert_sound(key, orjson.loads(value))
