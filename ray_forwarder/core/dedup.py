"""A time- and size-bounded set of recently seen dedup keys, O(1) per event.

The size bound wins over the TTL: at `rate` items/s the cache holds at most
`max_keys / rate` seconds of keys, whatever the TTL says. `evicted` counts keys pushed out
early and `window()` is the age of the oldest key, the window actually in force; size
`DEDUP_MAX_KEYS` >= item rate x `DEDUP_TTL_SECONDS` to keep the configured one.
"""

from __future__ import annotations

import math
from collections import deque


class DedupCache:
    """Remembers keys for `ttl` seconds, at most `max_keys` of them.

    Keys map to their expiry time in a plain dict, and `_order` holds them in arrival
    order; since every key lives the same `ttl`, the oldest entry is always first, so
    expiry and eviction pop from the front. `_front` is the first entry's expiry (inf while
    empty): a check costs one comparison for expiry and one `setdefault` for "seen, else
    remember". (An OrderedDict did the same with more work per insert and eviction.)
    """

    def __init__(self, ttl: float, max_keys: int) -> None:
        if ttl <= 0 or max_keys <= 0:
            raise ValueError("ttl and max_keys must be positive")
        self._ttl = ttl
        self._max_keys = max_keys
        self._expiry: dict[str, float] = {}
        self._order: deque[str] = deque()  # the keys of `_expiry`, oldest first
        self._front = math.inf  # expiry of the first (oldest) entry
        self.evicted = 0  # keys pushed out by the size bound before their TTL

    def __len__(self) -> int:
        return len(self._expiry)

    def window(self, now: float) -> float:
        """Seconds a redelivery is recognised for right now: the age of the oldest key,
        at most the TTL (0 while empty)."""
        if not self._expiry:
            return 0.0
        oldest_expiry = self._expiry[self._order[0]]
        return max(0.0, min(self._ttl, now - (oldest_expiry - self._ttl)))

    def seen(self, key: str, now: float) -> bool:
        """True if `key` was seen within the TTL; otherwise remember it and return False."""
        if now >= self._front:
            self._expire(now)
        expiry = self._expiry
        deadline = now + self._ttl
        if expiry.setdefault(key, deadline) is not deadline:
            return True  # already there (its expiry is left as it was)
        order = self._order
        order.append(key)
        if len(order) > self._max_keys:
            del expiry[order.popleft()]
            self.evicted += 1
            self._front = expiry[order[0]]
        elif len(order) == 1:
            self._front = deadline
        return False

    def _expire(self, now: float) -> None:
        """Forget keys whose expiry is due, oldest first."""
        expiry, order = self._expiry, self._order
        while order:
            oldest_expiry = expiry[order[0]]
            if oldest_expiry > now:
                self._front = oldest_expiry
                return
            del expiry[order.popleft()]
        self._front = math.inf
