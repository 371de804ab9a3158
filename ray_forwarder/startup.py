"""What `ray-forwarder run` checks before it starts (or joins) Ray.

Every check here is cheap and needs no Ray, so a wrong setting costs seconds, not a cluster
start: the shard plan (credentials, SHARDS against the connection slots), the disk spool's
directory, and the Kafka topics the configuration routes to. A wrong setting raises
ConfigError (exit code 2); an unreachable Kafka raises KafkaUnreachableError (exit code 1).
"""

from __future__ import annotations

import asyncio
import os
import tempfile

from ray_forwarder.config import ConfigError, Settings
from ray_forwarder.core.topics import prepare_topics
from ray_forwarder.ray.planning import plan
from ray_forwarder.ray.shard import ShardSpec


def check_settings(settings: Settings) -> list[ShardSpec]:
    """Everything that needs neither Kafka nor Ray: the plan and the spool directory."""
    shards = [planned.spec for planned in plan(settings)]
    check_spool_dir(settings)
    return shards


def preflight(settings: Settings) -> list[ShardSpec]:
    """All start-up checks, in order of cost; returns the planned shards."""
    shards = check_settings(settings)
    asyncio.run(prepare_topics(settings))
    return shards


def check_spool_dir(settings: Settings) -> None:
    """The spool must be usable when it is first needed (Kafka down, buffer full), which is
    the worst moment to find out that it is not: create a directory in it now.

    Checked on the driver's node; on a cluster, SPOOL_DIR should be a path every node has
    (the system temp dir, or an emptyDir / hostPath volume mounted on every Ray pod)."""
    if settings.spool_max_bytes == 0:
        return
    root = settings.spool_root
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=root))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"SPOOL_DIR: cannot create directories under {root} ({reason}); choose a "
            "writable SPOOL_DIR, or set SPOOL_MAX_BYTES=0 to run without a disk spool"
        ) from None
