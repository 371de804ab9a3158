"""Configuration from the environment: contract names, defaults, clear errors."""

from __future__ import annotations

import pytest

from ray_forwarder.config import ConfigError, load_settings


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "ALPACA_SYMBOLS", "ALPACA_API_KEY_ID", "ALPACA_SECRET_KEY", "KAFKA_USERNAME",
        "KAFKA_PASSWORD", "KAFKA_BOOTSTRAP_SERVERS", "ALPACA_CHANNELS", "METRICS_PORT",
        "ALPACA_STREAM_URL", "ALPACA_FEED", "RECONNECT_INITIAL", "RECONNECT_MAX",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_contract_defaults(env) -> None:
    s = load_settings()
    assert s.alpaca_feed == "sip"
    assert s.alpaca_symbols == ["SPY", "QQQ"]
    assert s.kafka_bootstrap_servers == "kafka-kafka-bootstrap.kafka:9092"
    assert (s.topic_trades, s.topic_quotes, s.topic_bars, s.topic_status) == (
        "alpaca.trades.v1", "alpaca.quotes.v1", "alpaca.bars.1m.v1", "alpaca.status.v1",
    )  # fmt: skip
    assert s.producer_linger_ms == 50
    assert (s.dedup_ttl_seconds, s.dedup_max_keys) == (900, 50000)
    assert s.metrics_port == 8080
    assert (s.reconnect_initial, s.reconnect_max) == (1.0, 60.0)
    assert s.alpaca_channels == ["trades", "quotes", "bars", "updatedBars"]
    assert s.stream_url == "wss://stream.data.alpaca.markets/v2/sip"
    assert s.kafka_auth_protocol == "PLAINTEXT"


def test_plain_comma_separated_symbols(env) -> None:
    env.setenv("ALPACA_SYMBOLS", "SPY, qqq,,AAPL")
    assert load_settings().alpaca_symbols == ["SPY", "QQQ", "AAPL"]


def test_scram_defaults_when_a_user_is_set(env) -> None:
    env.setenv("KAFKA_USERNAME", "forwarder")
    env.setenv("KAFKA_PASSWORD", "pw")
    s = load_settings()
    assert (s.kafka_auth_protocol, s.kafka_mechanism) == ("SASL_PLAINTEXT", "SCRAM-SHA-512")


def test_feed_and_stream_url_override(env) -> None:
    env.setenv("ALPACA_FEED", "iex")
    assert load_settings().stream_url.endswith("/v2/iex")
    env.setenv("ALPACA_STREAM_URL", "ws://127.0.0.1:1/v2/test")
    assert load_settings().stream_url == "ws://127.0.0.1:1/v2/test"


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("METRICS_PORT", "eighty", "METRICS_PORT"),
        ("ALPACA_CHANNELS", "trades,nonsense", "ALPACA_CHANNELS"),
        ("ALPACA_SYMBOLS", ",", "ALPACA_SYMBOLS"),
        ("RECONNECT_INITIAL", "-1", "RECONNECT_INITIAL"),
    ],
)
def test_wrong_values_fail_with_one_line_naming_the_variable(env, name, value, needle) -> None:
    env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_secrets_never_appear_in_errors_or_repr(env) -> None:
    env.setenv("ALPACA_API_KEY_ID", "AKID")
    env.setenv("ALPACA_SECRET_KEY", "super-secret-value")
    env.setenv("KAFKA_USERNAME", "u")
    env.setenv("KAFKA_PASSWORD", "kafka-secret-value")
    env.setenv("METRICS_PORT", "nope")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "secret-value" not in str(info.value)
    env.delenv("METRICS_PORT")
    settings = load_settings()
    assert "secret-value" not in repr(settings) and "secret-value" not in str(settings)
    assert settings.require_credentials() == ("AKID", "super-secret-value")


def test_missing_credentials_are_named(env) -> None:
    with pytest.raises(ConfigError, match="ALPACA_API_KEY_ID and ALPACA_SECRET_KEY"):
        load_settings().require_credentials()


def test_kafka_user_without_password(env) -> None:
    env.setenv("KAFKA_USERNAME", "u")
    with pytest.raises(ConfigError, match="KAFKA_PASSWORD"):
        load_settings()
