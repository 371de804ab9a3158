"""Ray actors, the driver and shard planning: thin shells around runtime and core."""
