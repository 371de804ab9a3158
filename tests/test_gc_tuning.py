"""The actors' garbage-collector settings (ray_forwarder/ray/gc_tuning.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from ray_forwarder.ray.gc_tuning import HOT_PATH_THRESHOLDS, tune_for_hot_path


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tuning_freezes_what_exists_and_raises_the_thresholds(restore_gc: None) -> None:
    gc.unfreeze()
    long_lived = [{"kept": i} for i in range(100)]  # tracked containers existing at set-up
    tune_for_hot_path()
    assert gc.get_threshold() == HOT_PATH_THRESHOLDS
    assert gc.get_freeze_count() >= len(long_lived)
    assert HOT_PATH_THRESHOLDS[0] > 700  # fewer young collections than CPython's default


def test_cyclic_garbage_is_still_collected_after_tuning(restore_gc: None) -> None:
    tune_for_hot_path()

    class Node:
        pass

    collected = []
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: reference counting alone never frees it
    weakref.finalize(a, collected.append, "a")
    del a, b
    gc.collect()
    assert collected == ["a"]
