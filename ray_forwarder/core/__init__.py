"""The forwarding logic without I/O: pipeline, envelope, dedup, bars, the topic table."""
