"""Session-wide fixtures: one real Kafka broker and one local Ray for the whole run.

Ray >= 2.59 enables token auth on new local clusters unless RAY_AUTH_MODE is set; every
process a test starts inherits this module's choice, so they all agree.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# The raylet gives up when its dashboard agent has not registered within 30 s, which a
# loaded 2-core machine can exceed (ray-project/ray#65983): a slow start is not a failure.
os.environ.setdefault("RAY_agent_register_timeout_ms", "90000")

import pytest

pytest_plugins = ["tests.kafka_fixture"]

RAY_TEST_CPUS = 4


@pytest.fixture(scope="session")
def ray_session():
    """A local single-node Ray shared by every test that needs one."""
    import ray

    from ray_forwarder.ray.driver import ensure_ray

    # The forwarder's own local start (no dashboard UI, no task events, no idle workers,
    # tried again if Ray's startup times out), so every test runs on what `ray-forwarder
    # run` runs on; `environ={}`: a fresh local Ray whatever RAY_ADDRESS says.
    ensure_ray(environ={}, num_cpus=RAY_TEST_CPUS, namespace="ray-forwarder-tests")
    yield ray
    ray.shutdown()
