"""Channel -> Kafka topic routing (every channel lands on a documented topic)."""

from __future__ import annotations

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
