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

Hot path: one dict lookup and one exact type test per documented field (an absent field's
sentinel has an allowed type of its own, so absence costs no extra branch); `type(v) in ...`
rather than `isinstance`, so `True` is not an int. Accepted symbols are remembered.
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

#: Longest symbol accepted: room for OCC option symbols (`AAPL240119C00100000`, up to 21)
#: and crypto pairs (`BTC/USD`), far below anything that could hurt a key or a log line.
SYMBOL_MAX_LEN = 32
#: Printable ASCII without space, `*` (the subscription wildcard) and `:` (the dedup key's
#: separator): `!`..`)`, `+`..`9`, `;`..`~`.
_SYMBOL = re.compile(rf"[!-)+-9;-~]{{1,{SYMBOL_MAX_LEN}}}")
#: Symbols already accepted (a set lookup instead of a regex per item); starts over when
#: full, so junk cannot grow it.
_KNOWN_SYMBOLS: set[str] = set()
_KNOWN_SYMBOLS_MAX = 16_384


class _Missing:
    """The type of `_MISSING`, allowed for every field: absent fields pass in one test."""


_MISSING = _Missing()
#: Per type: documented fields with `_Missing` added to their types, and the fields that
#: hold conditions (whose list elements must be strings too).
_CHECKS: dict[str, tuple[tuple[tuple[str, tuple[type, ...]], ...], tuple[str, ...]]] = {
    kind: (
        tuple((name, (*allowed, _Missing)) for name, allowed in table),
        tuple(name for name, allowed in table if allowed is CONDITIONS),
    )
    for kind, table in FIELD_TYPES.items()
}


def is_symbol(value: object) -> bool:
    """Whether `value` looks like a symbol of the feed (see `_SYMBOL`)."""
    if type(value) is not str:
        return False
    if value in _KNOWN_SYMBOLS:
        return True
    if _SYMBOL.fullmatch(value) is None:
        return False
    if len(_KNOWN_SYMBOLS) >= _KNOWN_SYMBOLS_MAX:
        _KNOWN_SYMBOLS.clear()
    _KNOWN_SYMBOLS.add(value)
    return True


def field_type_error(kind: str, item: dict[str, object]) -> str | None:
    """The first documented field of a `kind` item whose value has the wrong type, or None."""
    checks = _CHECKS.get(kind)
    if checks is None:
        return None
    fields, condition_fields = checks
    get = item.get
    for name, allowed in fields:
        if type(get(name, _MISSING)) not in allowed:
            return name
    for name in condition_fields:
        value = get(name)
        if type(value) is list:
            for element in value:
                if type(element) is not str:
                    return name
    return None
