"""The lane's linger: the one linger on a record's way to Kafka."""

from __future__ import annotations

import pytest

from ray_forwarder.config import load_settings
from ray_forwarder.ray.shard import lane_linger_ms


@pytest.mark.parametrize(
    ("batch_max_ms", "producer_linger_ms", "expected"),
    [(20.0, 50, 20.0), (20.0, 5, 5.0), (100.0, 50, 50.0), (20.0, 0, 1.0), (0.5, 50, 1.0)],
)
def test_a_lane_lingers_batch_max_ms_at_most_the_producer_linger(
    batch_max_ms: float, producer_linger_ms: int, expected: float
) -> None:
    settings = load_settings(batch_max_ms=batch_max_ms, producer_linger_ms=producer_linger_ms)
    assert lane_linger_ms(settings) == expected
