"""Timestamp rendering: Alpaca's RFC 3339 nanosecond times, from JSON strings or msgpack.

`canonical()` accepts only real instants: ASCII digits in the RFC 3339 layout, a calendar
date that exists and a time of day that does (month 99, second 99 and Arabic-Indic digits
are refused), and a msgpack Timestamp that a calendar can show (years 1..9999). Anything
else raises ValueError, so the caller can skip the item instead of forwarding a bad
`event_ts`.

Hot path: Alpaca's usual shape, `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, whose `YYYY-MM-DDTHH:MM:SS`
head the full parser already proved real, is answered by slicing (`_fast_utc`); everything
else goes through the full parser (`_parse`), which decides every accept/refuse.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import msgpack

_EPOCH_CACHE: dict[int, str] = {}
_VALID_HEADS: set[str] = set()  # `YYYY-MM-DDHH:MM:SS` strings already proven real
#: `YYYY-MM-DDTHH:MM:SS` heads (upper-case `T`) that `_parse` proved real: `_fast_utc` only
#: accepts strings whose head is in here.
_PROVEN_HEADS: set[str] = set()
_CACHE_LIMIT = 4096

#: date, time, optional fraction (1-9 digits), optional zone; [0-9], never `\d`, which
#: would accept every Unicode digit.
_RFC3339 = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}:[0-9]{2}:[0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(Z|z|[+-][0-9]{2}:[0-9]{2})?"
)


def _second_prefix(seconds: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS` for a Unix second, memoised: items cluster in time."""
    prefix = _EPOCH_CACHE.get(seconds)
    if prefix is None:
        try:
            moment = datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError) as exc:  # beyond what a calendar shows
            raise ValueError(f"not a representable instant: {seconds} s") from exc
        if len(_EPOCH_CACHE) >= _CACHE_LIMIT:
            _EPOCH_CACHE.clear()
        prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
        if len(prefix) != 19:  # years before 1000 render without padding on some libcs
            raise ValueError(f"not a representable instant: {seconds} s")
        _EPOCH_CACHE[seconds] = prefix
    return prefix


def from_unix_nanos(seconds: int, nanoseconds: int) -> str:
    """Canonical form: UTC, nine fractional digits, `Z`."""
    return f"{_second_prefix(seconds)}.{nanoseconds:09d}Z"


def from_msgpack(value: msgpack.Timestamp) -> str:
    return from_unix_nanos(value.seconds, value.nanoseconds)


def _check_head(date: str, time: str) -> None:
    """Raise ValueError unless `date`/`time` name a real calendar second (memoised)."""
    head = date + time
    if head in _VALID_HEADS:
        return
    datetime(  # raises ValueError for month 99, Feb 30, hour 24, second 60, year 0 ...
        int(date[:4]), int(date[5:7]), int(date[8:10]),
        int(time[:2]), int(time[3:5]), int(time[6:8]),
    )  # fmt: skip
    if len(_VALID_HEADS) >= _CACHE_LIMIT:
        _VALID_HEADS.clear()
    _VALID_HEADS.add(head)


def _prove_head(head: str) -> None:
    if head not in _PROVEN_HEADS:
        if len(_PROVEN_HEADS) >= _CACHE_LIMIT:
            _PROVEN_HEADS.clear()
        _PROVEN_HEADS.add(head)


def canonical(value: object) -> str:
    """Render an item's `t` (string or msgpack Timestamp) canonically.

    Strings in Alpaca's usual `...Z` form are re-padded without a datetime round trip;
    anything with an offset goes through `datetime` but keeps its nanoseconds; a string
    without a zone is read as UTC. Raises ValueError for values that are not real instants.
    """
    if type(value) is str:
        return _fast_utc(value) or _parse(value)
    if type(value) is msgpack.Timestamp:  # from_msgpack, inlined
        prefix = _EPOCH_CACHE.get(value.seconds) or _second_prefix(value.seconds)
        return f"{prefix}.{value.nanoseconds:09d}Z"
    raise ValueError(f"not a timestamp: {type(value).__name__}")


def _fast_utc(value: str) -> str | None:
    """`value` canonical if it is `<proven head>.<1-9 ASCII digits>Z` or `<proven head>Z`;
    None (= ask `_parse`) for anything else. Accepts nothing `_parse` refuses and renders
    what it accepts exactly as `_parse` does (tests/test_timestamps_fast.py)."""
    if value[-1:] != "Z" or value[:19] not in _PROVEN_HEADS:
        return None
    size = len(value)
    if size == 30:
        fraction = value[20:29]
        return value if value[19] == "." and fraction.isdigit() and fraction.isascii() else None
    if size == 20:
        return f"{value[:19]}.000000000Z"
    fraction = value[20:-1]
    if 22 <= size < 30 and value[19] == "." and fraction.isdigit() and fraction.isascii():
        return f"{value[:-1]}{_ZEROS[size - 21]}Z"
    return None


#: Padding for a fraction of n digits: `_ZEROS[n]` is 9 - n zeros.
_ZEROS = tuple("0" * (9 - n) for n in range(10))


def _parse(value: str) -> str:
    """The full RFC 3339 check and rendering (every layout, every zone)."""
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("not an RFC 3339 timestamp")
    date, time, frac, zone = match.groups()
    _check_head(date, time)
    nanos = (frac or "").ljust(9, "0")
    if zone is None or zone in ("Z", "z", "+00:00"):
        _prove_head(f"{date}T{time}")
        return f"{date}T{time}.{nanos}Z"
    try:
        moment = datetime.fromisoformat(f"{date}T{time}{zone}")
        seconds = int(moment.timestamp())
    except (OverflowError, OSError, ValueError) as exc:  # e.g. offset +99:00
        raise ValueError("not a representable instant") from exc
    return from_unix_nanos(seconds, int(nanos))
