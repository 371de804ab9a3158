"""What a market-data item must look like: its symbol and the types of its fields.

The field tables follow Alpaca's real-time stock data schemas (docs.alpaca.markets,
"Real-time Stock Data"; the official Go SDK decodes the same fields with the same types).
Checks are strict on the types of documented fields (a trade whose price is the string
`"470.5"` is malformed, not data) and lenient on what the documentation does not promise:
fields may be missing, and fields the table does not name pass unchecked (the pipeline
still refuses values that cannot be encoded as JSON).

Deliberate widenings, so that the other Alpaca feeds that share these item types pass:
sizes and volumes are numbers (crypto sizes are fractional); conditions are an array of
strings, one string (the options feed), or nil (the Go SDK accepts a nil array).

Hot path: one dict lookup and one exact type test per documented field. `type(v) in ...`
rather than `isinstance`, so `True` is not an int.
"""

from __future__ import annotations

import re

_NONE = type(None)
NUMBER: tuple[type, ...] = (int, float)
INT: tuple[type, ...] = (int,)
STR: tuple[type, ...] = (str,)
CONDITIONS: tuple[type, ...] = (list, str, _NONE)

FieldTable = tuple[tuple[str, tuple[type, ...]], ...]

_TRADE: FieldTable = (
    ("i", INT), ("x", STR), ("p", NUMBER), ("s", NUMBER), ("c", CONDITIONS), ("z", STR),
    ("tks", STR),
)  # fmt: skip
_QUOTE: FieldTable = (
    ("ax", STR), ("ap", NUMBER), ("as", NUMBER), ("bx", STR), ("bp", NUMBER), ("bs", NUMBER),
    ("c", CONDITIONS), ("z", STR), ("x", STR),
)  # fmt: skip
_BAR: FieldTable = (
    ("o", NUMBER), ("h", NUMBER), ("l", NUMBER), ("c", NUMBER), ("v", NUMBER), ("vw", NUMBER),
    ("n", INT), ("x", STR),
)  # fmt: skip
_STATUS: FieldTable = (("sc", STR), ("sm", STR), ("rc", STR), ("rm", STR), ("z", STR))
_LULD: FieldTable = (("u", NUMBER), ("d", NUMBER), ("i", STR), ("z", STR))
_CORRECTION: FieldTable = (
    ("x", STR), ("oi", INT), ("op", NUMBER), ("os", NUMBER), ("oc", CONDITIONS),
    ("ci", INT), ("cp", NUMBER), ("cs", NUMBER), ("cc", CONDITIONS), ("z", STR),
)  # fmt: skip
_CANCEL_ERROR: FieldTable = (
    ("i", INT), ("x", STR), ("p", NUMBER), ("s", NUMBER), ("a", STR), ("z", STR),
)  # fmt: skip
_IMBALANCE: FieldTable = (("p", NUMBER), ("z", STR))

#: Item type code (`T`) -> documented fields and the types each may have.
FIELD_TYPES: dict[str, FieldTable] = {
    "t": _TRADE,
    "q": _QUOTE,
    "b": _BAR,
    "u": _BAR,
    "d": _BAR,
    "s": _STATUS,
    "l": _LULD,
    "c": _CORRECTION,
    "x": _CANCEL_ERROR,
    "i": _IMBALANCE,
}

#: Longest symbol accepted: room for OCC option symbols (`AAPL240119C00100000`, 19) and
#: crypto pairs (`BTC/USD`), far below anything that could hurt a key or a log line.
SYMBOL_MAX_LEN = 32
#: Printable ASCII without space, `*` (the subscription wildcard) and `:` (the dedup key's
#: separator): `!`..`)`, `+`..`9`, `;`..`~`.
_SYMBOL = re.compile(rf"[!-)+-9;-~]{{1,{SYMBOL_MAX_LEN}}}")
_MISSING = object()


def is_symbol(value: object) -> bool:
    """Whether `value` looks like a symbol of the feed (see `_SYMBOL`)."""
    return type(value) is str and _SYMBOL.fullmatch(value) is not None


def field_type_error(kind: str, item: dict[str, object]) -> str | None:
    """The first documented field of a `kind` item whose value has the wrong type, or None."""
    get = item.get
    for name, allowed in FIELD_TYPES.get(kind, ()):
        value = get(name, _MISSING)
        if value is _MISSING:
            continue
        value_type = type(value)
        if value_type not in allowed:
            return name
        if value_type is list:
            for element in value:  # type: ignore[attr-defined]
                if type(element) is not str:
                    return name
    return None
