"""Garbage-collector settings for the forwarder's actor processes.

The hot path allocates a handful of short-lived containers per item (the decoded payload,
the envelope dict, the record tuple), which reference counting frees at once; almost none
form cycles. CPython's default thresholds (700, 10, 10) still run a young collection every
700 net allocations and a full one every 100 young ones, and a full collection walks every
tracked object of the process: Ray's, aiokafka's, the dedup window's. Measured in the shard
actor's event-loop thread under `ray-forwarder bench` (300,000 msgpack items flat out):
about 840 collections and 1.05-1.18 s of its 9.0-9.5 s CPU went to the collector (11-12 %);
with the settings below, 3-5 collections and 0.05-0.10 s. The producer actor, which
allocates per record while it builds Kafka batches, gets the same settings.

`gc.freeze()` moves what exists once the actor is set up (modules, Ray's worker state,
the actor's long-lived objects) out of every later collection; raising the young
threshold lets bursts of records come and go between collections. Cyclic garbage is still
collected, only less often.
"""

from __future__ import annotations

import gc

#: Young-generation threshold (allocations minus deallocations between collections) and
#: the two older generations' (collections of the younger one between their own).
HOT_PATH_THRESHOLDS = (20_000, 20, 100)


def tune_for_hot_path() -> None:
    """Call once, at the end of an actor's set-up: freeze what exists, raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*HOT_PATH_THRESHOLDS)
