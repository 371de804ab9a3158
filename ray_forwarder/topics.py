"""Channel -> Kafka topic routing (every channel lands on a documented topic)."""

from __future__ import annotations

from collections.abc import Iterable

from ray_forwarder.config import Settings


def topic_map(settings: Settings) -> dict[str, str]:
    """The topic of every envelope channel.

    Corrections and cancel/errors share the trades topic (they amend trades, and the same
    record key keeps them in order with the trades they amend); updated bars share the bars
    topic with the bars they revise.
    """
    return {
        "trades": settings.topic_trades,
        "corrections": settings.topic_trades,
        "cancelErrors": settings.topic_trades,
        "quotes": settings.topic_quotes,
        "bars": settings.topic_bars,
        "updatedBars": settings.topic_bars,
        "dailyBars": settings.topic_daily_bars,
        "statuses": settings.topic_statuses,
        "lulds": settings.topic_lulds,
        "imbalances": settings.topic_imbalances,
        "trade_updates": settings.topic_trade_updates,
        "status": settings.topic_status,
    }


def routed_topics(settings: Settings) -> list[str]:
    """Every topic the forwarder may write to: the channels' and the dead-letter topic."""
    return sorted({*topic_map(settings).values(), settings.topic_deadletter})


async def ensure_topics(
    bootstrap: str,
    names: Iterable[str],
    *,
    partitions: int = 3,
    configs: dict[str, str] | None = None,
) -> None:
    """Create those of the topics that do not exist yet (replication factor 1: for the
    demo and the benchmark, which run against one broker), so that the first sends do not
    wait for auto-creation."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        missing = sorted(set(names) - set(await admin.list_topics()))
        if missing:
            await admin.create_topics(
                [NewTopic(name, partitions, 1, topic_configs=configs) for name in missing]
            )
    finally:
        await admin.close()
