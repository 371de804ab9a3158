"""The timestamp fast path decides exactly like the full parser.

`timestamps.canonical` answers Alpaca's usual `<head>.<fraction>Z` strings by slicing once
their head was proven real by `_parse`; these tests prime heads and then compare
`canonical` with `_parse` on near-miss strings: every accept/refuse and every rendering
must be the same.
"""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ray_forwarder.alpaca import timestamps


def _outcome(parse, value: str) -> tuple[str, str]:
    try:
        return ("ok", parse(value))
    except ValueError:
        return ("refused", "")


_HEAD = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)).map(
    lambda d: d.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0")
)
#: Fraction characters: ASCII digits, lookalikes that `isdigit()` accepts, and junk.
_FRACTION = st.text(alphabet="0123456789٣²۹.Zz ", max_size=11)
_ZONE = st.sampled_from(["Z", "z", "", "+00:00", "-05:00", "ZZ", "Z ", "\n"])
_SEPARATOR = st.sampled_from([".", "", ",", " "])


@settings(max_examples=2000)
@given(head=_HEAD, separator=_SEPARATOR, fraction=_FRACTION, zone=_ZONE)
@example(head="2026-01-05T14:30:00", separator=".", fraction="", zone="Z")
@example(head="2026-01-05T14:30:00", separator=".", fraction="1234567890", zone="Z")
@example(head="2026-01-05T14:30:00", separator=".", fraction="12345678²", zone="Z")
def test_fast_path_agrees_with_the_parser_on_near_misses(
    head: str, separator: str, fraction: str, zone: str
) -> None:
    timestamps.canonical(f"{head}Z")  # proves the head, so the fast path is taken
    assert f"{head}" in timestamps._PROVEN_HEADS
    value = f"{head}{separator}{fraction}{zone}"
    assert _outcome(timestamps.canonical, value) == _outcome(timestamps._parse, value)


@settings(max_examples=1000)
@given(st.text(max_size=40))
def test_fast_path_agrees_with_the_parser_on_arbitrary_strings(value: str) -> None:
    timestamps.canonical("2026-01-05T14:30:00Z")
    assert _outcome(timestamps.canonical, value) == _outcome(timestamps._parse, value)


@given(head=_HEAD, digits=st.integers(min_value=0, max_value=9))
def test_usual_shapes_take_the_fast_path_and_render_nine_digits(head: str, digits: int) -> None:
    timestamps.canonical(f"{head}Z")
    value = f"{head}.{'7' * digits}Z" if digits else f"{head}Z"
    fast = timestamps._fast_utc(value)
    assert fast == timestamps._parse(value)
    assert fast is not None and len(fast) == 30 and fast.startswith(head)


def test_unproven_or_impossible_heads_never_take_the_fast_path() -> None:
    assert timestamps._fast_utc("2026-02-30T10:00:00.5Z") is None  # never proven: no such day
    assert _outcome(timestamps.canonical, "2026-02-30T10:00:00.5Z") == ("refused", "")
    timestamps.canonical("2026-03-01T10:00:00Z")
    assert timestamps._fast_utc("2026-03-01t10:00:00.5Z") is None  # lower-case t: the parser


def test_msgpack_timestamps_are_unchanged() -> None:
    import msgpack

    moment = datetime(2026, 1, 5, 14, 30, tzinfo=UTC)
    stamp = msgpack.Timestamp(int(moment.timestamp()), 5)
    assert timestamps.canonical(stamp) == "2026-01-05T14:30:00.000000005Z"


@given(
    seconds=st.integers(min_value=-(2**40), max_value=2**40),
    nanoseconds=st.integers(min_value=0, max_value=999_999_999),
)
def test_msgpack_timestamps_render_like_from_unix_nanos(seconds: int, nanoseconds: int) -> None:
    import msgpack

    stamp = msgpack.Timestamp(seconds, nanoseconds)
    assert _outcome(timestamps.canonical, stamp) == _outcome(  # type: ignore[arg-type]
        lambda s: timestamps.from_unix_nanos(s.seconds, s.nanoseconds), stamp
    )
