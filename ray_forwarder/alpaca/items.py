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
sentinel has an allowed type of its own, so absence costs no extra branch); `type(v) is ...`
rather than `isinstance`, so `True` is not an int. The checks are compiled once per item
type from `FIELD_TYPES` into straight-line functions (no loop, no tuple scan per field);
`reference_field_type_error` is the same check as a plain loop, which the tests compare
them with. Accepted symbols are remembered.
"""

from __future__ import annotations

import re
from collections.abc import Callable

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


def reference_field_type_error(kind: str, item: dict[str, object]) -> str | None:
    """`field_type_error` as a plain loop over `FIELD_TYPES`: the specification that the
    compiled checks must match (tests/test_items_fast.py)."""
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


def _compile_check(kind: str) -> Callable[[dict[str, object]], str | None]:
    """The check for one item type as straight-line code: per documented field one lookup
    and a chain of `is not` tests against its allowed types (and `_Missing`), then the
    element test of each conditions list; same order, same answer as the loop."""
    fields, condition_fields = _CHECKS[kind]
    namespace: dict[str, object] = {"_MISSING": _MISSING}
    lines = ["def check(item):", "    get = item.get"]
    for i, (name, allowed) in enumerate(fields):
        tests = []
        for j, allowed_type in enumerate(allowed):
            namespace[f"_t{i}_{j}"] = allowed_type
            tests.append(f"t is not _t{i}_{j}")
        lines += [f"    t = type(get({name!r}, _MISSING))", f"    if {' and '.join(tests)}:"]
        lines.append(f"        return {name!r}")
    for name in condition_fields:
        lines += [
            f"    value = get({name!r})",
            "    if type(value) is list:",
            "        for element in value:",
            "            if type(element) is not str:",
            f"                return {name!r}",
        ]
    lines.append("    return None")
    exec("\n".join(lines), namespace)
    check = namespace["check"]
    check.__qualname__ = check.__name__ = f"check_{kind}"  # type: ignore[attr-defined]
    return check  # type: ignore[return-value]


#: Item type code -> its compiled field check.
FIELD_CHECKS: dict[str, Callable[[dict[str, object]], str | None]] = {
    kind: _compile_check(kind) for kind in FIELD_TYPES
}


def field_type_error(kind: str, item: dict[str, object]) -> str | None:
    """The first documented field of a `kind` item whose value has the wrong type, or None."""
    check = FIELD_CHECKS.get(kind)
    return None if check is None else check(item)
