"""Developer tooling for tests, the demo and CI; the forwarder itself never imports it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray_forwarder_dev.local_kafka import LocalKafka, LocalKafkaError

__all__ = ["LocalKafka", "LocalKafkaError"]


def __getattr__(name: str) -> Any:
    """Import lazily so `python -m ray_forwarder_dev.local_kafka` runs without a warning."""
    if name in __all__:
        from ray_forwarder_dev import local_kafka

        return getattr(local_kafka, name)
    raise AttributeError(name)
