"""Pytest plugin: one real Kafka broker per test session, unique topics, and a read-back helper.

Register with `pytest_plugins = ["tests.kafka_fixture"]` in tests/conftest.py.

- `kafka_broker` (session): a `KafkaBroker`. With `KAFKA_BOOTSTRAP_SERVERS` set, that broker
  is used (with `KAFKA_USERNAME`/`KAFKA_PASSWORD` if set); otherwise a `LocalKafka` is
  started, with its TLS listeners (certificates generated once per session). A broker that
  cannot be started is an error, never a skip.
- `kafka_topics` (function): `kafka_topics("trades")` gives a topic name unique to the test.
- `consume_all(...)`: every record of some topics from the beginning, without a group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest

from ray_forwarder_dev.certs import TlsFiles
from ray_forwarder_dev.local_kafka import SCRAM_MECHANISM, LocalKafka, LocalKafkaError

_KAFKA_FIXTURES = {"kafka_broker", "kafka_topics"}
_prefetch_error: BaseException | None = None


@dataclass(frozen=True)
class KafkaBroker:
    """Where tests find Kafka; `client_kwargs()` gives aiokafka settings for `bootstrap_servers`."""

    bootstrap_servers: str
    sasl_bootstrap_servers: str | None
    username: str | None
    password: str | None = field(repr=False)
    local: LocalKafka | None
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    ssl_bootstrap_servers: str | None = None  # SSL listener, mutual TLS (local broker only)
    sasl_ssl_bootstrap_servers: str | None = None  # SCRAM-SHA-512 over TLS (local broker only)
    tls: TlsFiles | None = None  # the local CA and a client certificate it signed

    def client_kwargs(self) -> dict[str, Any]:
        """aiokafka keyword arguments for `bootstrap_servers` (SASL only for an external user)."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL"):
            kwargs |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.username,
                "sasl_plain_password": self.password,
            }
        return kwargs

    def sasl_client_kwargs(self) -> dict[str, Any]:
        """aiokafka keyword arguments for the local SCRAM-SHA-512 listener."""
        if self.sasl_bootstrap_servers is None:
            raise LookupError("no separate SASL listener on an external broker")
        return {
            "bootstrap_servers": self.sasl_bootstrap_servers,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": SCRAM_MECHANISM,
            "sasl_plain_username": self.username,
            "sasl_plain_password": self.password,
        }


class ConsumedRecord(NamedTuple):
    """One record read back from Kafka."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: tuple[tuple[str, bytes], ...] = ()


def _external_broker() -> KafkaBroker | None:
    """The broker named by the environment (CI, a dev's own cluster), if any."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if not bootstrap:
        return None
    username = os.environ.get("KAFKA_USERNAME") or None
    password = os.environ.get("KAFKA_PASSWORD") or None
    protocol = os.environ.get("KAFKA_SECURITY_PROTOCOL") or (
        "SASL_PLAINTEXT" if username else "PLAINTEXT"
    )
    mechanism = os.environ.get("KAFKA_SASL_MECHANISM") or (SCRAM_MECHANISM if username else None)
    return KafkaBroker(
        bootstrap_servers=bootstrap,
        sasl_bootstrap_servers=None,
        username=username,
        password=password,
        local=None,
        security_protocol=protocol,
        sasl_mechanism=mechanism,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fetch the Kafka jars before any test runs, so a first download is not under a test timeout.

    A failure is kept and raised by the `kafka_broker` fixture (tests error, never skip).
    """
    global _prefetch_error
    needs_kafka = any(_KAFKA_FIXTURES & set(getattr(i, "fixturenames", ())) for i in items)
    if not needs_kafka or _external_broker() is not None:
        return
    try:
        LocalKafka().ensure_jars()
    except (LocalKafkaError, OSError) as exc:
        _prefetch_error = exc


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """A real broker for the whole session: external from the env, else a local KRaft node."""
    external = _external_broker()
    if external is not None:
        yield external
        return
    if _prefetch_error is not None:
        raise LocalKafkaError(f"Kafka jars unavailable: {_prefetch_error}") from _prefetch_error
    local = LocalKafka(tls=True)
    try:
        local.start(timeout=90)
    except BaseException:
        local.stop()
        raise
    try:
        yield KafkaBroker(
            bootstrap_servers=local.bootstrap_servers,
            sasl_bootstrap_servers=local.sasl_bootstrap_servers,
            username=local.scram_username,
            password=local.scram_password,
            local=local,
            ssl_bootstrap_servers=local.ssl_bootstrap_servers,
            sasl_ssl_bootstrap_servers=local.sasl_ssl_bootstrap_servers,
            tls=local.tls_files,
        )
    finally:
        local.stop()


class TopicNames:
    """Hands out topic names unique to one test: `<test>.<name>.<random>`."""

    def __init__(self, test_name: str) -> None:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", test_name).strip("._-") or "test"
        self._base = base[:120]
        self.names: list[str] = []

    def __call__(self, name: str = "topic") -> str:
        topic = f"{self._base}.{name}.{uuid.uuid4().hex[:8]}"
        self.names.append(topic)
        return topic


@pytest.fixture
def kafka_topics(request: pytest.FixtureRequest) -> TopicNames:
    """`kafka_topics("trades")` -> a fresh topic name for this test."""
    return TopicNames(request.node.name)


async def create_topics(
    names: Iterable[str],
    *,
    partitions: int = 3,
    configs: dict[str, str] | None = None,
    **client_kwargs: Any,
) -> None:
    """Create topics up front (instead of relying on auto-creation); existing ones are fine."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**client_kwargs)
    await admin.start()
    try:
        new = [
            NewTopic(n, num_partitions=partitions, replication_factor=1, topic_configs=configs)
            for n in names
        ]
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(new)
    finally:
        await admin.close()


async def consume_all(
    bootstrap: str,
    topics: str | Iterable[str],
    expected_count: int | None = None,
    *,
    idle_timeout: float = 3.0,
    timeout: float = 30.0,
    settle: float = 0.0,
    **client_kwargs: Any,
) -> list[ConsumedRecord]:
    """Read the topics from the beginning without a consumer group.

    With `expected_count`, return once that many records arrived (then keep reading for
    `settle` seconds, to catch duplicates) or when `timeout` passes — the caller asserts on
    the count. Without it, return after `idle_timeout` seconds with no new record.
    Extra keyword arguments go to `AIOKafkaConsumer` (e.g. SASL settings).
    """
    from aiokafka import AIOKafkaConsumer

    topic_list = [topics] if isinstance(topics, str) else list(topics)
    consumer = AIOKafkaConsumer(
        *topic_list,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        metadata_max_age_ms=1000,
        **client_kwargs,
    )
    await consumer.start()
    try:
        return await _drain(consumer, expected_count, idle_timeout, timeout, settle)
    finally:
        await consumer.stop()


async def _drain(
    consumer: Any, expected: int | None, idle_timeout: float, timeout: float, settle: float
) -> list[ConsumedRecord]:
    """The read loop of `consume_all`."""
    records: list[ConsumedRecord] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_news = loop.time()
    stop_at: float | None = None
    while (now := loop.time()) < deadline:
        if stop_at is not None and now >= stop_at:
            break
        batches = await consumer.getmany(timeout_ms=200)
        for batch in batches.values():
            records.extend(_record(msg) for msg in batch)
            last_news = loop.time()
        if not consumer.assignment():
            last_news = loop.time()  # the idle clock starts once partitions are assigned
        if expected is not None:
            if len(records) >= expected and stop_at is None:
                stop_at = loop.time() + settle
        elif loop.time() - last_news >= idle_timeout:
            break
    return records


def _record(msg: Any) -> ConsumedRecord:
    """aiokafka ConsumerRecord -> ConsumedRecord."""
    return ConsumedRecord(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=msg.key,
        value=msg.value,
        timestamp=msg.timestamp,
        headers=tuple(msg.headers or ()),
    )
