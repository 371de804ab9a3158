"""The asyncio parts one process runs: session pump, outbox, spool, Kafka sink."""
