"""Configuration of the trading stream (`trade_updates`): endpoints and the URL override."""

from __future__ import annotations

import pytest

from ray_forwarder.alpaca.streams import STREAMS, TRADE_UPDATES
from ray_forwarder.config import ConfigError, load_settings


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("ALPACA_TRADING_ENV", "ALPACA_TRADING_STREAM_URL", "ALPACA_STREAMS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_paper_is_the_default_and_live_is_one_setting_away(env) -> None:
    assert STREAMS["trade_updates"] is TRADE_UPDATES
    assert TRADE_UPDATES.url(load_settings()) == "wss://paper-api.alpaca.markets/stream"
    env.setenv("ALPACA_TRADING_ENV", "Live")
    assert TRADE_UPDATES.url(load_settings()) == "wss://api.alpaca.markets/stream"


def test_the_url_override_wins(env) -> None:
    env.setenv("ALPACA_TRADING_STREAM_URL", "ws://127.0.0.1:9999/stream")
    assert TRADE_UPDATES.url(load_settings()) == "ws://127.0.0.1:9999/stream"
    env.setenv("ALPACA_TRADING_STREAM_URL", " ")
    assert TRADE_UPDATES.url(load_settings()) == "wss://paper-api.alpaca.markets/stream"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ALPACA_TRADING_ENV", "sandbox", "ALPACA_TRADING_ENV"),
        ("ALPACA_TRADING_STREAM_URL", "https://paper-api.alpaca.markets/stream", "ws://"),
        ("ALPACA_TRADING_STREAM_URL", "ws://paper-api.alpaca.markets/stream", "clear text"),
        ("ALPACA_TRADING_STREAM_URL", "wss://user:hunter2@example.com/stream", "credentials"),
    ],
)
def test_bad_values_fail_with_one_line_and_no_secret(env, variable, value, expected) -> None:
    env.setenv(variable, value)
    with pytest.raises(ConfigError) as failure:
        load_settings()
    message = str(failure.value)
    assert expected in message and "hunter2" not in message
    assert "\n" not in message


def test_one_trade_updates_shard_per_key_pair_beside_market_data(env) -> None:
    from ray_forwarder.ray.planning import plan

    settings = load_settings(
        alpaca_streams="stocks,trade_updates", alpaca_symbols="SPY,QQQ,AAPL",
        alpaca_api_key_id="key-1", alpaca_secret_key="secret-1",
        alpaca_credentials="key-2:secret-2,key-3:secret-3", alpaca_wire_format="msgpack",
    )  # fmt: skip
    trading = [p for p in plan(settings) if p.spec.stream == "trade_updates"]
    assert [(p.spec.shard_id, p.spec.key_id, p.slot, p.spec.symbols) for p in trading] == [
        ("trade_updates-0", "key-1", 0, ("*",)),
        ("trade_updates-1", "key-2", 0, ("*",)),
        ("trade_updates-2", "key-3", 0, ("*",)),
    ]
    assert {p.spec.url for p in trading} == {"wss://paper-api.alpaca.markets/stream"}
    assert {p.spec.stream for p in plan(settings)} == {"stocks", "trade_updates"}
    only = load_settings(
        alpaca_streams="trade_updates", alpaca_api_key_id="k", alpaca_secret_key="s"
    )
    assert [p.spec.stream for p in plan(only)] == ["trade_updates"]
