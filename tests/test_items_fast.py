"""The compiled field checks answer exactly like the plain loop over `FIELD_TYPES`.

`items.field_type_error` runs straight-line checks generated per item type; any item, of any
shape, must get the same verdict (the same first wrong field, or None) as
`reference_field_type_error`.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_forwarder.alpaca.items import (
    FIELD_CHECKS,
    FIELD_TYPES,
    field_type_error,
    reference_field_type_error,
)

_DOCUMENTED = sorted({name for table in FIELD_TYPES.values() for name, _ in table})
_NAMES = st.one_of(st.sampled_from(_DOCUMENTED), st.text(max_size=3))
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4), st.binary(max_size=2)
)
_VALUES = st.one_of(
    _SCALARS, st.lists(_SCALARS, max_size=3), st.dictionaries(st.text(max_size=2), _SCALARS)
)


@settings(max_examples=3000)
@given(
    kind=st.one_of(st.sampled_from(sorted(FIELD_TYPES)), st.text(max_size=2)),
    item=st.dictionaries(_NAMES, _VALUES, max_size=12),
)
def test_compiled_checks_agree_with_the_reference(kind: str, item: dict[str, Any]) -> None:
    assert field_type_error(kind, item) == reference_field_type_error(kind, item)


def test_every_item_type_has_a_compiled_check_and_order_is_the_tables() -> None:
    assert set(FIELD_CHECKS) == set(FIELD_TYPES)
    # two wrong fields: the first in table order is named, as the loop does
    assert field_type_error("q", {"bs": "x", "ax": 1}) == "ax"
    # a wrong type wins over a bad conditions element, as the loop does
    assert field_type_error("t", {"c": ["@", 1], "z": 5}) == "z"
    assert field_type_error("t", {"c": ["@", 1]}) == "c"
    assert field_type_error("t", {"p": True}) == "p"  # bool is not a number
