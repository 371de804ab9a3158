"""The local Kafka broker is real: round trips, SCRAM-SHA-512 auth, restarts that keep data."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from ray_forwarder_dev.local_kafka import (
    MARKER_NAME,
    KafkaPorts,
    LocalKafka,
    LocalKafkaError,
    _random_cluster_id,
    free_ports,
    probe_metadata,
)
from tests.kafka_fixture import KafkaBroker, TopicNames, consume_all, create_topics

AUTH_FAILURE_BOUND_S = 5.0


def _local(broker: KafkaBroker) -> LocalKafka:
    """The session's own LocalKafka; tests of its listeners mean nothing on an external broker."""
    if broker.local is None:
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS points at an external broker")
    return broker.local


async def _produce(kwargs: dict, topic: str, items: list[tuple[bytes, bytes]]) -> list[int]:
    """Send keyed records with acks=all; return their offsets."""
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **kwargs)
    await producer.start()
    try:
        metas = [await producer.send_and_wait(topic, value=v, key=k) for k, v in items]
    finally:
        await producer.stop()
    return [m.offset for m in metas]


async def test_plaintext_round_trip(kafka_broker: KafkaBroker, kafka_topics: TopicNames) -> None:
    topic = kafka_topics("roundtrip")
    items = [(f"SYM{i % 4}".encode(), f"value-{i}".encode()) for i in range(20)]
    kwargs = kafka_broker.client_kwargs()
    await _produce(kwargs, topic, items)
    bootstrap = kwargs.pop("bootstrap_servers")
    records = await consume_all(bootstrap, [topic], expected_count=20, settle=0.5, **kwargs)

    assert sorted((r.key, r.value) for r in records) == sorted(items)
    by_key: dict[bytes | None, set[int]] = {}
    for r in records:
        by_key.setdefault(r.key, set()).add(r.partition)
        assert r.topic == topic and r.timestamp > 0
    assert all(len(parts) == 1 for parts in by_key.values()), by_key  # key -> one partition
    for key in by_key:  # order within a key is kept
        values = [r.value for r in sorted(records, key=lambda r: r.offset) if r.key == key]
        assert values == [v for k, v in items if k == key]


async def test_create_topics_and_idle_consume(
    kafka_broker: KafkaBroker, kafka_topics: TopicNames
) -> None:
    a, b = kafka_topics("a"), kafka_topics("b")
    assert a != b and a.startswith("test_create_topics_and_idle_consume.a.")
    kwargs = kafka_broker.client_kwargs()
    await create_topics([a, b], partitions=2, **kwargs)
    await create_topics([a], partitions=2, **kwargs)  # already there: fine
    await _produce(kwargs, a, [(b"x", b"1")])
    await _produce(kwargs, b, [(b"y", b"2"), (b"z", b"3")])
    bootstrap = kwargs.pop("bootstrap_servers")
    records = await consume_all(bootstrap, [a, b], idle_timeout=1.0, **kwargs)
    assert sorted((r.topic, r.value) for r in records) == [(a, b"1"), (b, b"2"), (b, b"3")]
    assert {r.partition for r in records} <= {0, 1}


async def test_scram_right_password(kafka_broker: KafkaBroker, kafka_topics: TopicNames) -> None:
    local = _local(kafka_broker)
    topic = kafka_topics("sasl")
    sasl = kafka_broker.sasl_client_kwargs()
    assert sasl["sasl_plain_username"] == local.scram_username == "forwarder"
    await _produce(sasl, topic, [(b"k", b"over-scram")])
    bootstrap = sasl.pop("bootstrap_servers")
    records = await consume_all(bootstrap, topic, expected_count=1, **sasl)
    assert [(r.key, r.value) for r in records] == [(b"k", b"over-scram")]


@pytest.mark.parametrize("user_ok", [True, False], ids=["wrong-password", "unknown-user"])
async def test_scram_bad_credentials_fail_fast(kafka_broker: KafkaBroker, user_ok: bool) -> None:
    local = _local(kafka_broker)
    user = local.scram_username if user_ok else "nobody"
    started = time.monotonic()
    with pytest.raises(SaslAuthenticationFailed, match=r"(?i)authentication failed"):
        await probe_metadata(local.sasl_bootstrap_servers, username=user, password="wrong")
    assert time.monotonic() - started < AUTH_FAILURE_BOUND_S

    # A real client refuses to start, promptly (aiokafka wraps the cause in a bootstrap error).
    producer = AIOKafkaProducer(
        bootstrap_servers=local.sasl_bootstrap_servers,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username=user,
        sasl_plain_password=local.scram_password + "x",
    )
    started = time.monotonic()
    try:
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(producer.start(), AUTH_FAILURE_BOUND_S * 2)
    finally:
        await producer.stop()
    assert time.monotonic() - started < AUTH_FAILURE_BOUND_S


async def test_plaintext_client_on_sasl_port_is_refused(kafka_broker: KafkaBroker) -> None:
    local = _local(kafka_broker)
    with pytest.raises(Exception):  # noqa: B017 - any failure will do, but it must fail
        await probe_metadata(local.sasl_bootstrap_servers, timeout=3.0)


def test_password_is_never_logged(kafka_broker: KafkaBroker) -> None:
    local = _local(kafka_broker)
    secret = local.scram_password
    assert len(secret) >= 16
    assert secret not in repr(local) and secret not in repr(kafka_broker)
    for path in (local.broker_log, local.console_log):
        assert secret not in path.read_text(errors="replace"), path


async def test_stop_and_start_broker_keeps_data_and_ports(
    kafka_broker: KafkaBroker, kafka_topics: TopicNames
) -> None:
    local = _local(kafka_broker)
    topic = kafka_topics("restart")
    kwargs = kafka_broker.client_kwargs()
    before = await _produce(kwargs, topic, [(b"k", b"before")])
    ports, pid = local.ports, local.pid

    await local.astop_broker()
    assert not local.is_running()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports.plaintext), timeout=1).close()

    ready_s = await local.astart_broker(timeout=60)
    assert local.ports == ports and local.pid != pid
    assert ready_s < 30

    after = await _produce(kwargs, topic, [(b"k", b"after")])
    assert after[0] == before[0] + 1  # same log, continued
    bootstrap = kwargs.pop("bootstrap_servers")
    records = await consume_all(bootstrap, topic, expected_count=2, **kwargs)
    assert [r.value for r in sorted(records, key=lambda r: r.offset)] == [b"before", b"after"]


async def test_broker_crash_then_start_keeps_acknowledged_data(
    kafka_broker: KafkaBroker, kafka_topics: TopicNames
) -> None:
    local = _local(kafka_broker)
    topic = kafka_topics("crash")
    kwargs = kafka_broker.client_kwargs()
    await _produce(kwargs, topic, [(b"k", b"acked")])
    await asyncio.to_thread(local.kill_broker)
    assert not local.is_running()
    ready_s = await local.astart_broker(timeout=60)
    assert ready_s < 20  # the old registration must expire first (broker.session.timeout.ms)
    bootstrap = kwargs.pop("bootstrap_servers")
    records = await consume_all(bootstrap, topic, expected_count=1, **kwargs)
    assert [r.value for r in records] == [b"acked"]


def test_broker_that_cannot_start_raises_with_log_tail(kafka_broker: KafkaBroker) -> None:
    """A taken port makes the JVM exit; start() must raise promptly and show why."""
    _local(kafka_broker)  # jars are there; this needs no network
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    sasl, ctl = free_ports(2)
    kafka = LocalKafka(ports=KafkaPorts(plaintext=taken, sasl=sasl, controller=ctl))
    started = time.monotonic()
    try:
        with pytest.raises(LocalKafkaError, match=r"broker\.log") as info:
            kafka.start(timeout=45)
        assert not kafka.is_running()
        assert "exited" in str(info.value) and "Address already in use" in str(info.value)
        assert kafka.scram_password not in str(info.value)
    finally:
        kafka.stop()
        blocker.close()
    assert time.monotonic() - started < 45


def test_jar_cache_needs_a_complete_marker(tmp_path: Path) -> None:
    kafka = LocalKafka(cache_dir=tmp_path)
    assert not kafka.jars_complete()
    kafka.libs_dir.mkdir(parents=True)
    (kafka.libs_dir / "a.jar").write_bytes(b"x")
    assert not kafka.jars_complete()  # half-finished download: no marker
    (kafka.libs_dir / MARKER_NAME).write_text("a.jar\nb.jar\n")
    assert not kafka.jars_complete()  # a listed jar is missing
    (kafka.libs_dir / "b.jar").write_bytes(b"x")
    assert kafka.jars_complete()


def test_cluster_ids_never_look_like_options() -> None:
    ids = {_random_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


async def test_tls_listeners_answer_with_the_generated_ca(kafka_broker: KafkaBroker) -> None:
    """SASL_SSL takes SCRAM over TLS; SSL demands a client certificate signed by the CA."""
    import ssl

    local = _local(kafka_broker)
    files = local.tls_files
    with_cert = local.client_ssl_context()
    ca_only = ssl.create_default_context(cafile=str(files.ca_cert))
    assert await probe_metadata(local.ssl_bootstrap_servers, ssl_context=with_cert) == 1
    assert (
        await probe_metadata(
            local.sasl_ssl_bootstrap_servers,
            username=local.scram_username,
            password=local.scram_password,
            ssl_context=ca_only,
        )
        == 1
    )
    with pytest.raises(Exception):  # noqa: B017 - no client certificate: refused
        await probe_metadata(local.ssl_bootstrap_servers, ssl_context=ca_only, timeout=3.0)
    for key in (files.client_key, files.server_keystore):
        assert key.stat().st_mode & 0o077 == 0, key  # keys readable by their owner only
