"""Channel -> Kafka topic routing (every channel lands on a documented topic), and the
start-up check that those topics exist."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ray_forwarder.alpaca.streams import STOCKS, STREAMS, StreamDefinition
from ray_forwarder.config import ConfigError, Settings

log = logging.getLogger(__name__)

#: Topics KAFKA_CREATE_TOPICS creates get this many partitions and a replication factor of
#: min(3, brokers): a development default; production topics come from KafkaTopic resources.
CREATED_TOPIC_PARTITIONS = 3
TOPIC_POLL_INTERVAL_S = 2.0


class KafkaUnreachableError(RuntimeError):
    """The start-up check could not talk to Kafka; the message is safe to show."""


def topic_map(settings: Settings, stream: StreamDefinition = STOCKS) -> dict[str, str]:
    """The topic of every envelope channel of `stream` (plus `status`), read off the
    stream table (`alpaca/streams.py`) and the TOPIC_* settings.

    Stocks: corrections and cancel/errors share the trades topic (they amend trades, and
    the same record key keeps them in order with the trades they amend); updated bars share
    the bars topic with the bars they revise. Crypto likewise for its bars.
    """
    topics = {c.name: getattr(settings, c.topic.setting) for c in stream.channels}
    topics["status"] = settings.topic_status
    return topics


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


def routed_topics(settings: Settings) -> list[str]:
    """Every topic the forwarder may write: the channel topics of the enabled streams and
    any other TOPIC_* setting (a dead-letter topic, say), so that none is found missing
    only when needed."""
    enabled = settings.streams()
    wanted = {c.topic.setting for s in enabled for c in s.channels}
    # topics of streams that do not run are not required (nor created)
    idle = {c.topic.setting for s in STREAMS.values() for c in s.channels} - wanted
    fields = (
        name
        for name in type(settings).model_fields
        if name.startswith("topic_") and name not in idle
    )
    routed = {t for s in enabled for t in topic_map(settings, s).values()}
    return sorted(routed | {getattr(settings, f) for f in fields})


def admin_client(settings: Settings) -> Any:
    """An admin client that connects exactly as the producers will (bootstrap, security,
    SASL, TLS); the password reaches it without passing through a plain dict."""
    from ray_forwarder.runtime.producer import producer_options

    return producer_options(settings).create_admin()


async def prepare_topics(
    settings: Settings,
    *,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Make sure every topic the configuration routes to exists before any producer starts.

    One Metadata request for all topics (never naming them, which would let a broker with
    auto-creation create them with its defaults). Missing topics are created when
    KAFKA_CREATE_TOPICS allows it; otherwise they are named in one log line and waited for
    up to KAFKA_TOPICS_WAIT_SECONDS (a Strimzi Topic Operator may still be reconciling the
    KafkaTopic resources applied with the job), then refused with a ConfigError.
    Returns the topics it created."""
    from ray_forwarder.runtime.producer import ClientErrors, describe_kafka_error

    wanted = routed_topics(settings)
    bootstrap = settings.kafka_bootstrap_servers
    admin = admin_client(settings)
    try:
        with ClientErrors() as client_errors:
            await admin.start()
    except Exception as exc:
        await _quietly_close(admin)
        user = f", user {settings.kafka_username}" if settings.kafka_username else ""
        raise KafkaUnreachableError(
            f"cannot reach Kafka at {bootstrap} ({settings.kafka_auth_protocol}{user}): "
            f"{client_errors.most_telling() or describe_kafka_error(exc)}"
        ) from None
    created: list[str] = []
    try:
        metadata = await admin.describe_topics()
        missing = _missing(wanted, metadata)
        if missing and settings.kafka_create_topics:
            created = await _create(admin, missing, len(await _brokers(admin)))
            log.info("created Kafka topics %s (KAFKA_CREATE_TOPICS=true)", ", ".join(created))
            missing = await _wait_for_leaders(admin, wanted, settings, sleep, clock)
        deadline = clock() + settings.kafka_topics_wait_seconds
        if missing and settings.kafka_topics_wait_seconds > 0:
            log.warning(
                "Kafka topics missing on %s: %s; waiting up to %gs for them "
                "(KAFKA_TOPICS_WAIT_SECONDS)",
                bootstrap,
                ", ".join(missing),
                settings.kafka_topics_wait_seconds,
            )
        while missing and clock() < deadline:
            await sleep(min(TOPIC_POLL_INTERVAL_S, max(0.0, deadline - clock())))
            missing = _missing(wanted, await admin.describe_topics())
        if missing:
            raise ConfigError(
                f"Kafka topics missing on {bootstrap}: {', '.join(missing)} (create them - "
                "under Strimzi, apply their KafkaTopic resources - or set "
                "KAFKA_CREATE_TOPICS=true to let the forwarder create them)"
            )
    finally:
        await _quietly_close(admin)
    return created


def _missing(wanted: Iterable[str], metadata: list[dict[str, Any]]) -> list[str]:
    """Wanted topics the metadata does not list as usable (error 0, some partition)."""
    present = {t["topic"] for t in metadata if t["error_code"] == 0 and t["partitions"]}
    return sorted(set(wanted) - present)


def _leaderless(wanted: Iterable[str], metadata: list[dict[str, Any]]) -> list[str]:
    with_leaders = {
        t["topic"]
        for t in metadata
        if t["error_code"] == 0
        and t["partitions"]
        and all(p["error_code"] == 0 and p["leader"] >= 0 for p in t["partitions"])
    }
    return sorted(set(wanted) - with_leaders)


async def _brokers(admin: Any) -> list[Any]:
    return list((await admin.describe_cluster())["brokers"])


async def _create(admin: Any, names: list[str], brokers: int) -> list[str]:
    from aiokafka.admin import NewTopic
    from aiokafka.errors import for_code

    replication = max(1, min(3, brokers))
    response = await admin.create_topics(
        [NewTopic(name, CREATED_TOPIC_PARTITIONS, replication) for name in names]
    )
    created, refused = [], []
    for result in response.topic_errors:
        name, code = result[0], result[1]
        if code == 0:
            created.append(name)
        elif code != 36:  # 36: TOPIC_ALREADY_EXISTS (it appeared meanwhile: fine)
            refused.append(f"{name} ({for_code(code).__name__})")
    if refused:
        raise ConfigError(
            "KAFKA_CREATE_TOPICS=true but Kafka refused to create "
            + ", ".join(refused)
            + " (the user needs the Create ACL, or create the topics beforehand)"
        )
    return sorted(created)


async def _wait_for_leaders(
    admin: Any,
    wanted: list[str],
    settings: Settings,
    sleep: Callable[[float], Awaitable[object]],
    clock: Callable[[], float],
) -> list[str]:
    """After creating topics, wait (up to a request timeout) until every partition has a
    leader, so that the producers' first metadata requests find them ready."""
    deadline = clock() + settings.kafka_request_timeout_ms / 1000
    while True:
        metadata = await admin.describe_topics()
        if not _leaderless(wanted, metadata) or clock() >= deadline:
            return _missing(wanted, metadata)
        await sleep(0.2)


async def _quietly_close(admin: Any) -> None:
    try:
        await admin.close()
    except Exception:  # a client that never connected; nothing to release
        log.debug("admin client close raised", exc_info=True)
