"""DedupCache answers like the straightforward model: expire from the front, then look up.

The cache keeps the first entry's expiry aside so that a check is one comparison and one
`setdefault`; whatever the sequence of keys and clock readings (backwards ones included),
its answers, size, evictions and window must equal those of the model below (the cache's
earlier implementation).
"""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_forwarder.core.dedup import DedupCache


class ModelCache:
    def __init__(self, ttl: float, max_keys: int) -> None:
        self.ttl, self.max_keys = ttl, max_keys
        self.expiry: OrderedDict[str, float] = OrderedDict()
        self.evicted = 0

    def seen(self, key: str, now: float) -> bool:
        while self.expiry:
            oldest_key, oldest_expiry = next(iter(self.expiry.items()))
            if oldest_expiry > now:
                break
            del self.expiry[oldest_key]
        if key in self.expiry:
            return True
        self.expiry[key] = now + self.ttl
        if len(self.expiry) > self.max_keys:
            self.expiry.popitem(last=False)
            self.evicted += 1
        return False


@settings(max_examples=500)
@given(
    ttl=st.sampled_from([0.5, 1.0, 3.0]),
    max_keys=st.integers(min_value=1, max_value=6),
    steps=st.lists(
        st.tuples(st.sampled_from("abcdefgh"), st.floats(min_value=-1.0, max_value=2.0)),
        max_size=60,
    ),
)
def test_cache_matches_the_model(ttl: float, max_keys: int, steps: list[tuple[str, float]]) -> None:
    cache, model = DedupCache(ttl, max_keys), ModelCache(ttl, max_keys)
    now = 0.0
    for key, delta in steps:
        now += delta  # mostly forwards, sometimes backwards
        assert cache.seen(key, now) == model.seen(key, now)
        assert len(cache) == len(model.expiry)
        assert cache.evicted == model.evicted
    assert [(k, cache._expiry[k]) for k in cache._order] == list(model.expiry.items())
    assert len(cache._order) == len(cache._expiry)


def test_a_redelivery_is_seen_until_its_ttl_and_not_after() -> None:
    cache = DedupCache(ttl=10.0, max_keys=100)
    assert cache.seen("k", 0.0) is False
    assert cache.seen("k", 9.999) is True
    assert cache.seen("k", 10.0) is False  # expired exactly at its deadline, remembered anew
    assert cache.seen("k", 19.0) is True
