"""Kafka over TLS the way Strimzi serves it, against the session broker's real TLS listeners:
SCRAM-SHA-512 over SASL_SSL with a CA file, mutual TLS with a client certificate, hostname
checking, and clear start-time errors for wrong files — never a hang, never a secret."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives import serialization

from ray_forwarder.config import ConfigError, load_settings
from ray_forwarder.runtime.kafka_tls import ssl_context
from ray_forwarder.runtime.producer import KafkaSink, KafkaStartError, producer_options
from ray_forwarder_dev.certs import generate_ca
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import SIM_KEY, SIM_SECRET, forwarder_settings, read_back, run_until
from tests.kafka_fixture import KafkaBroker, consume_all

START_BOUND_S = 30.0  # a refused TLS handshake must fail this fast, not hang
SYMBOLS = ["SPY", "QQQ", "AAPL"]
ROOT = Path(__file__).resolve().parents[1]


def _tls_broker(broker: KafkaBroker) -> KafkaBroker:
    """The session broker's TLS listeners; an external broker has none: fail, not skip."""
    if broker.tls is None or broker.sasl_ssl_bootstrap_servers is None:
        pytest.fail("these tests need the local broker's TLS listeners (unset KAFKA_BOOTSTRAP_*)")
    return broker


def _sasl_ssl(broker: KafkaBroker, **overrides: object) -> dict[str, object]:
    """Settings for the SASL_SSL listener with the local CA, as for a Strimzi TLS listener."""
    assert broker.tls is not None
    values: dict[str, object] = dict(
        kafka_bootstrap_servers=broker.sasl_ssl_bootstrap_servers,
        kafka_security_protocol="SASL_SSL",
        kafka_username=broker.username,
        kafka_password=broker.password,
        kafka_ssl_cafile=str(broker.tls.ca_cert),
        kafka_request_timeout_ms=5000,
    )
    values.update(overrides)
    return values


async def _deliver_one(settings_values: dict[str, object], topic: str) -> None:
    sink = KafkaSink(load_settings(**settings_values))
    await sink.start()
    try:
        count, _token = await sink.send_batch([(topic, b"SPY", b'{"tls":true}')])
        assert count == 1
    finally:
        await sink.stop()


async def _start_fails(settings_values: dict[str, object]) -> str:
    """KafkaSink.start() must raise KafkaStartError promptly; returns its message."""
    sink = KafkaSink(load_settings(**settings_values))
    started = time.monotonic()
    with pytest.raises(KafkaStartError) as info:
        await sink.start()
    assert time.monotonic() - started < START_BOUND_S
    assert sink.stats.ready is False
    return str(info.value)


# ------------------------------------------------------------------ real broker, the sink


async def test_producer_delivers_over_sasl_ssl_with_the_ca_file(kafka_broker, kafka_topics):
    broker = _tls_broker(kafka_broker)
    topic = kafka_topics("sasl-ssl")
    await _deliver_one(_sasl_ssl(broker), topic)
    records = await consume_all(broker.bootstrap_servers, topic, expected_count=1)
    assert [(r.key, r.value) for r in records] == [(b"SPY", b'{"tls":true}')]


async def test_protocol_defaults_to_sasl_ssl_when_a_ca_file_and_a_user_are_set(
    kafka_broker, kafka_topics
):
    broker = _tls_broker(kafka_broker)
    values = _sasl_ssl(broker)
    del values["kafka_security_protocol"]
    assert load_settings(**values).kafka_auth_protocol == "SASL_SSL"
    topic = kafka_topics("inferred")
    await _deliver_one(values, topic)
    assert len(await consume_all(broker.bootstrap_servers, topic, expected_count=1)) == 1


async def test_producer_delivers_over_mutual_tls_with_a_client_certificate(
    kafka_broker, kafka_topics
):
    broker = _tls_broker(kafka_broker)
    assert broker.tls is not None
    topic = kafka_topics("mtls")
    await _deliver_one(
        dict(
            kafka_bootstrap_servers=broker.ssl_bootstrap_servers,
            kafka_ssl_cafile=str(broker.tls.ca_cert),
            kafka_ssl_certfile=str(broker.tls.client_cert),
            kafka_ssl_keyfile=str(broker.tls.client_key),
        ),
        topic,
    )
    records = await consume_all(broker.bootstrap_servers, topic, expected_count=1)
    assert [r.value for r in records] == [b'{"tls":true}']


async def test_a_wrong_ca_fails_clearly_without_the_password(kafka_broker, tmp_path):
    broker = _tls_broker(kafka_broker)
    other_ca = generate_ca(tmp_path, "not the cluster CA")
    message = await _start_fails(_sasl_ssl(broker, kafka_ssl_cafile=str(other_ca)))
    assert broker.sasl_ssl_bootstrap_servers in message and "SASL_SSL" in message
    assert "TLS handshake failed" in message and "KAFKA_SSL_CAFILE" in message
    assert "certificate verify failed" in message
    assert broker.password and broker.password not in message


async def test_the_system_trust_store_alone_does_not_trust_a_private_ca(kafka_broker):
    """Why KAFKA_SSL_CAFILE exists: without it, Strimzi's self-signed CA is refused."""
    broker = _tls_broker(kafka_broker)
    values = _sasl_ssl(broker)
    del values["kafka_ssl_cafile"]
    message = await _start_fails(values)
    assert "not trusted" in message and "KAFKA_SSL_CAFILE" in message


async def test_hostname_checking_is_on_unless_explicitly_turned_off(kafka_broker, kafka_topics):
    """The server certificate names 127.0.0.1 only; bootstrapping through `localhost`
    must be refused by default, and works only with KAFKA_SSL_CHECK_HOSTNAME=false."""
    broker = _tls_broker(kafka_broker)
    assert broker.sasl_ssl_bootstrap_servers is not None
    port = broker.sasl_ssl_bootstrap_servers.rpartition(":")[2]
    by_name = _sasl_ssl(broker, kafka_bootstrap_servers=f"localhost:{port}")
    message = await _start_fails(by_name)
    assert "does not name the host" in message, message
    topic = kafka_topics("no-hostname-check")
    await _deliver_one({**by_name, "kafka_ssl_check_hostname": False}, topic)
    assert len(await consume_all(broker.bootstrap_servers, topic, expected_count=1)) == 1


async def test_mutual_tls_without_a_client_certificate_is_refused(kafka_broker):
    broker = _tls_broker(kafka_broker)
    assert broker.tls is not None
    message = await _start_fails(
        dict(
            kafka_bootstrap_servers=broker.ssl_bootstrap_servers,
            kafka_ssl_cafile=str(broker.tls.ca_cert),
            kafka_request_timeout_ms=5000,
        )
    )
    assert broker.ssl_bootstrap_servers in message and "(SSL)" in message
    assert "client certificate" in message and "KAFKA_SSL_CERTFILE" in message


# ------------------------------------------------------------------ the forwarder on Ray


def _sim(**overrides: object) -> SimulatorThread:
    values: dict[str, object] = dict(
        symbols=SYMBOLS, rate=2000, time_scale=600, keys={SIM_KEY: SIM_SECRET}, seed=11
    )
    values.update(overrides)
    return SimulatorThread(SimConfig(**values))  # type: ignore[arg-type]


@pytest.mark.usefixtures("ray_session")
async def test_forwarder_delivers_every_item_over_sasl_ssl(kafka_broker, kafka_topics):
    broker = _tls_broker(kafka_broker)
    with _sim(total_events=600) as sim:
        settings = forwarder_settings(
            broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS), **_sasl_ssl(broker)
        )
        result = await run_until(settings, lambda: sim.finished)
        sent = sim.stats()["items"]
    assert result.error is None and result.drained
    assert sum(result.snapshot.total("received").values()) == sent > 0
    emitted = sum(result.snapshot.total("emitted").values())
    assert sum(result.snapshot.total("acked").values()) == emitted
    records = await read_back(broker, settings, emitted)  # over PLAINTEXT
    assert len(records) == emitted
    assert {orjson.loads(r.value)["channel"] for r in records} >= {"trades", "status"}


@pytest.mark.usefixtures("ray_session")
async def test_forwarder_with_a_wrong_ca_stops_with_a_clear_error(
    kafka_broker, kafka_topics, tmp_path
):
    broker = _tls_broker(kafka_broker)
    other_ca = generate_ca(tmp_path, "not the cluster CA")
    with _sim(total_events=100) as sim:
        settings = forwarder_settings(
            broker, kafka_topics, sim, **_sasl_ssl(broker, kafka_ssl_cafile=str(other_ca))
        )
        started = time.monotonic()
        result = await run_until(settings, lambda: False, timeout=60)
    assert time.monotonic() - started < 60
    assert result.error is not None, "the forwarder must not run without a trusted broker"
    assert "TLS handshake failed" in result.error and "KAFKA_SSL_CAFILE" in result.error
    assert broker.password and broker.password not in result.error


# ------------------------------------------------------------------ settings (no broker)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    from ray_forwarder_dev.certs import generate_tls_files

    return generate_tls_files(tmp_path_factory.mktemp("tls"))


def test_hostname_checking_is_the_default(tls_files) -> None:
    settings = load_settings(kafka_ssl_cafile=str(tls_files.ca_cert))
    assert settings.kafka_ssl_check_hostname is True
    assert settings.kafka_auth_protocol == "SSL"
    assert ssl_context(settings.kafka_tls).check_hostname is True
    relaxed = load_settings(kafka_ssl_cafile=str(tls_files.ca_cert), kafka_ssl_check_hostname=False)
    context = ssl_context(relaxed.kafka_tls)
    assert context.check_hostname is False
    assert context.verify_mode.name == "CERT_REQUIRED"  # the chain is still verified


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"kafka_ssl_cafile": "/nonexistent/ca.crt"},
         "KAFKA_SSL_CAFILE: /nonexistent/ca.crt does not exist"),
        ({"kafka_ssl_cafile": "{dir}"}, "is not a file"),
        ({"kafka_ssl_cafile": "{key}"}, "KAFKA_SSL_CAFILE: {key} holds no usable PEM certificate"),
        ({"kafka_ssl_cafile": "{ca}", "kafka_ssl_keyfile": "{key}"},
         "KAFKA_SSL_KEYFILE is set without KAFKA_SSL_CERTFILE"),
        ({"kafka_ssl_cafile": "{ca}", "kafka_ssl_certfile": "{cert}",
          "kafka_ssl_keyfile": "{server}"}, "is not the key of the certificate"),
        ({"kafka_ssl_cafile": "{ca}", "kafka_security_protocol": "SASL_PLAINTEXT",
          "kafka_username": "u", "kafka_password": "p"}, "does not use TLS; use SSL or SASL_SSL"),
    ],
    ids=["missing", "directory", "not-a-certificate", "key-without-cert", "key-mismatch",
         "tls-files-without-tls"],
)  # fmt: skip
def test_bad_tls_files_are_refused_at_start_in_one_line(tls_files, values, expected) -> None:
    names = {
        "dir": str(tls_files.ca_cert.parent),
        "ca": str(tls_files.ca_cert),
        "key": str(tls_files.client_key),
        "cert": str(tls_files.client_cert),
        "server": str(tls_files.server_keystore),
    }
    values = {k: v.format(**names) for k, v in values.items()}
    with pytest.raises(ConfigError) as info:
        load_settings(**values)
    message = str(info.value)
    assert expected.format(**names) in message
    assert "\n" not in message


def test_an_encrypted_key_needs_its_password_which_is_never_shown(tls_files, tmp_path) -> None:
    secret = "key-passphrase-4711"
    key = serialization.load_pem_private_key(tls_files.client_key.read_bytes(), None)
    encrypted = tmp_path / "user.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(secret.encode()),
        )
    )
    values = dict(
        kafka_ssl_cafile=str(tls_files.ca_cert),
        kafka_ssl_certfile=str(tls_files.client_cert),
        kafka_ssl_keyfile=str(encrypted),
    )
    for wrong in (None, "not-" + secret):
        extra = {} if wrong is None else {"kafka_ssl_key_password": wrong}
        with pytest.raises(ConfigError, match="KAFKA_SSL_KEY_PASSWORD missing or wrong") as info:
            load_settings(**values, **extra)  # never prompts on a terminal either
        assert secret not in str(info.value) and (wrong is None or wrong not in str(info.value))
    settings = load_settings(**values, kafka_ssl_key_password=secret)
    assert secret not in repr(settings) and secret not in repr(settings.kafka_tls)
    assert ssl_context(settings.kafka_tls).verify_mode.name == "CERT_REQUIRED"


def test_the_cli_refuses_a_missing_ca_file_with_exit_code_2(tmp_path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "ALPACA_API_KEY_ID": "key",
        "ALPACA_SECRET_KEY": "secret-value-123",
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9093",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_USERNAME": "forwarder",
        "KAFKA_PASSWORD": "kafka-password-123",
        "KAFKA_SSL_CAFILE": str(tmp_path / "missing-ca.crt"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "ray_forwarder", "plan"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "KAFKA_SSL_CAFILE" in line and "missing-ca.crt does not exist" in line
    assert "kafka-password-123" not in result.stderr + result.stdout
    assert "secret-value-123" not in result.stderr + result.stdout


# ------------------------------------------------------------------ no password in options


def test_producer_options_never_show_the_password(tls_files) -> None:
    secret = "scram-password-that-must-not-leak"
    options = producer_options(
        load_settings(
            kafka_username="forwarder",
            kafka_password=secret,
            kafka_ssl_cafile=str(tls_files.ca_cert),
        )
    )
    assert options.kwargs["security_protocol"] == "SASL_SSL"
    assert options.kwargs["sasl_plain_username"] == "forwarder"
    for shown in (repr(options), str(options), repr(dict(options.kwargs)), f"{options!r}"):
        assert secret not in shown
    assert "sasl_plain_password" not in options.kwargs
    with pytest.raises(TypeError):  # not a mapping: `**options` cannot drop the password
        AIOKafkaProducer(**options)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the start-up topic check


async def test_the_topic_check_connects_over_tls_like_the_producers(kafka_broker, kafka_topics):
    from ray_forwarder.core.topics import prepare_topics, routed_topics

    broker = _tls_broker(kafka_broker)
    from ray_forwarder.config import Settings

    fields = [name for name in Settings.model_fields if name.startswith("topic_")]
    topics = {field: kafka_topics(field.removeprefix("topic_")) for field in fields}
    settings = load_settings(**_sasl_ssl(broker), **topics, kafka_create_topics=True)
    created = await prepare_topics(settings)
    assert sorted(created) == routed_topics(settings)


def test_the_cli_refuses_to_start_when_the_ca_does_not_match(kafka_broker, tmp_path) -> None:
    """`python -m ray_forwarder` (what the RayJob runs) stops before Ray starts, in one
    line saying why, without the password and without hanging."""
    broker = _tls_broker(kafka_broker)
    other_ca = generate_ca(tmp_path, "not the cluster CA")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "ALPACA_API_KEY_ID": "key",
        "ALPACA_SECRET_KEY": "secret-value-123",
        "KAFKA_BOOTSTRAP_SERVERS": str(broker.sasl_ssl_bootstrap_servers),
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_USERNAME": str(broker.username),
        "KAFKA_PASSWORD": str(broker.password),
        "KAFKA_SSL_CAFILE": str(other_ca),
        "KAFKA_REQUEST_TIMEOUT_MS": "5000",
        "SPOOL_DIR": str(tmp_path / "spool"),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ray_forwarder"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert time.monotonic() - started < 60
    assert result.returncode == 1, result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("ray-forwarder:")]
    assert "TLS handshake failed" in line and "KAFKA_SSL_CAFILE" in line, line
    assert str(broker.password) not in result.stderr + result.stdout
    assert "Started a local Ray instance" not in result.stderr  # refused before Ray
