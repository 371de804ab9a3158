"""A time- and size-bounded set of recently seen dedup keys, O(1) per event.

The size bound wins over the TTL: at `rate` items/s the cache holds at most
`max_keys / rate` seconds of keys, whatever the TTL says. `evicted` counts keys pushed out
early and `window()` is the age of the oldest key, the window actually in force; size
`DEDUP_MAX_KEYS` >= item rate x `DEDUP_TTL_SECONDS` to keep the configured one.
"""

from __future__ import annotations

from collections import OrderedDict


class DedupCache:
    """Remembers keys for `ttl` seconds, at most `max_keys` of them.

    Keys are stored in arrival order with their expiry time; since every key lives the same
    `ttl`, the oldest entry is always first, so expiry and eviction pop from the front.
    """

    def __init__(self, ttl: float, max_keys: int) -> None:
        if ttl <= 0 or max_keys <= 0:
            raise ValueError("ttl and max_keys must be positive")
        self._ttl = ttl
        self._max_keys = max_keys
        self._expiry: OrderedDict[str, float] = OrderedDict()
        self.evicted = 0  # keys pushed out by the size bound before their TTL

    def __len__(self) -> int:
        return len(self._expiry)

    def window(self, now: float) -> float:
        """Seconds a redelivery is recognised for right now: the age of the oldest key,
        at most the TTL (0 while empty)."""
        if not self._expiry:
            return 0.0
        oldest_expiry = next(iter(self._expiry.values()))
        return max(0.0, min(self._ttl, now - (oldest_expiry - self._ttl)))

    def seen(self, key: str, now: float) -> bool:
        """True if `key` was seen within the TTL; otherwise remember it and return False."""
        expiry = self._expiry
        while expiry:
            oldest_key, oldest_expiry = next(iter(expiry.items()))
            if oldest_expiry > now:
                break
            del expiry[oldest_key]
        if key in expiry:
            return True
        expiry[key] = now + self._ttl
        if len(expiry) > self._max_keys:
            expiry.popitem(last=False)
            self.evicted += 1
        return False
