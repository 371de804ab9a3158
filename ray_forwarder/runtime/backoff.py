"""Jittered exponential backoff for reconnects."""

from __future__ import annotations

import random


class Backoff:
    """Delays grow as initial * 2**n up to `maximum`; each is drawn from [d/2, d] so that
    many shards restarting at once do not reconnect in lockstep."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * (2**self.attempt))
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
