"""Timestamp rendering: Alpaca's RFC 3339 nanosecond times, from JSON strings or msgpack."""

from __future__ import annotations

from datetime import UTC, datetime

import msgpack

_EPOCH_CACHE: dict[int, str] = {}
_CACHE_LIMIT = 4096


def _second_prefix(seconds: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS` for a Unix second, memoised: items cluster in time."""
    prefix = _EPOCH_CACHE.get(seconds)
    if prefix is None:
        if len(_EPOCH_CACHE) >= _CACHE_LIMIT:
            _EPOCH_CACHE.clear()
        prefix = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _EPOCH_CACHE[seconds] = prefix
    return prefix


def from_unix_nanos(seconds: int, nanoseconds: int) -> str:
    """Canonical form: UTC, nine fractional digits, `Z`."""
    return f"{_second_prefix(seconds)}.{nanoseconds:09d}Z"


def from_msgpack(value: msgpack.Timestamp) -> str:
    return from_unix_nanos(value.seconds, value.nanoseconds)


def canonical(value: object) -> str:
    """Render an item's `t` (string or msgpack Timestamp) canonically.

    Strings in Alpaca's usual `...Z` form are re-padded without a datetime round trip;
    anything with an offset goes through `datetime` but keeps its nanoseconds.
    Raises ValueError for values that are not timestamps.
    """
    if isinstance(value, msgpack.Timestamp):
        return from_msgpack(value)
    if (
        not isinstance(value, str)
        or len(value) < 19
        or value[10] not in "Tt "
        or not (value[:4].isdigit() and value[11:13].isdigit())
    ):
        raise ValueError(f"not a timestamp: {value!r}")
    head, frac, zone = value[:19], "", ""
    rest = value[19:]
    if rest.startswith("."):
        end = 1
        while end < len(rest) and rest[end].isdigit():
            end += 1
        frac, zone = rest[1:end], rest[end:]
    else:
        zone = rest
    if len(frac) > 9 or (frac and not frac.isdigit()):
        raise ValueError(f"not a timestamp: {value!r}")
    if zone in ("Z", "z", "+00:00"):
        return f"{head[:10]}T{head[11:]}.{frac.ljust(9, '0')}Z"
    moment = datetime.fromisoformat(head + (zone or "+00:00"))
    seconds = int(moment.timestamp())
    return from_unix_nanos(seconds, int(frac.ljust(9, "0") or 0))
