"""ALPACA_STREAMS and the per-stream settings: validated at start with one line naming the
variable; topics and shards per stream; today's stocks-only configuration unchanged."""

from __future__ import annotations

import pytest

from ray_forwarder.alpaca.streams import CRYPTO, NEWS, OPTIONS, STOCKS
from ray_forwarder.config import ConfigError, load_settings
from ray_forwarder.core.topics import routed_topics, topic_map
from ray_forwarder.ray.planning import plan

OCC = "AAPL240119C00100000"


def _settings(**overrides):
    values = dict(alpaca_api_key_id="AKMAINKEY", alpaca_secret_key="main-secret")
    values.update(overrides)
    return load_settings(**values)


def _refusal(**overrides) -> str:
    with pytest.raises(ConfigError) as refused:
        _settings(**overrides)
    message = str(refused.value)
    assert "\n" not in message and "main-secret" not in message
    return message


def test_the_default_is_stocks_alone_with_todays_topics() -> None:
    settings = _settings()
    assert [s.name for s in settings.streams()] == ["stocks"]
    assert routed_topics(settings) == sorted(
        {
            "alpaca.trades.v1", "alpaca.quotes.v1", "alpaca.bars.1m.v1", "alpaca.bars.1d.v1",
            "alpaca.statuses.v1", "alpaca.lulds.v1", "alpaca.imbalances.v1",
            "alpaca.status.v1", "alpaca.deadletter.v1",
        }
    )  # fmt: skip
    [shard] = plan(settings)
    assert shard.spec.shard_id == "stocks-0" and shard.spec.stream == "stocks"
    assert shard.spec.url == "wss://stream.data.alpaca.markets/v2/sip"


def test_each_stream_gets_its_endpoint_symbols_channels_and_shard() -> None:
    settings = _settings(
        alpaca_streams="stocks,crypto,options,news",
        alpaca_options_symbols=OCC,
        alpaca_options_feed="OPRA",
        alpaca_crypto_symbols="btc/usd,ETH/USD",
    )
    shards = {p.spec.stream: p.spec for p in plan(settings)}
    assert shards["crypto"].url == "wss://stream.data.alpaca.markets/v1beta3/crypto/us"
    assert shards["crypto"].symbols == ("BTC/USD", "ETH/USD")
    assert shards["options"].url == "wss://stream.data.alpaca.markets/v1beta1/opra"
    assert shards["options"].subscriptions() == {"trades": [OCC], "quotes": [OCC]}
    assert shards["news"].url == "wss://stream.data.alpaca.markets/v1beta1/news"
    assert shards["news"].subscriptions() == {"news": ["*"]}
    assert {s.shard_id for s in shards.values()} == {
        "stocks-0", "crypto-0", "options-0", "news-0"
    }  # fmt: skip
    topics = set(routed_topics(settings))
    assert {"alpaca.crypto.trades.v1", "alpaca.crypto.bars.1m.v1", "alpaca.options.quotes.v1",
            "alpaca.news.v1"} <= topics  # fmt: skip
    assert "alpaca.crypto.orderbooks.v1" in topics  # routed whether or not subscribed


def test_topics_are_per_stream_and_overridable() -> None:
    settings = _settings(topic_crypto_trades="my.crypto.trades", topic_news="my.news")
    assert topic_map(settings, CRYPTO)["trades"] == "my.crypto.trades"
    assert topic_map(settings, CRYPTO)["updatedBars"] == "alpaca.crypto.bars.1m.v1"
    assert topic_map(settings, STOCKS)["trades"] == "alpaca.trades.v1"
    assert topic_map(settings, OPTIONS) == {
        "trades": "alpaca.options.trades.v1",
        "quotes": "alpaca.options.quotes.v1",
        "status": "alpaca.status.v1",
    }
    assert topic_map(settings, NEWS)["news"] == "my.news"
    # a stream that does not run needs none of its topics
    assert "my.news" not in routed_topics(settings)


def test_url_overrides_per_stream() -> None:
    settings = _settings(
        alpaca_streams="crypto", alpaca_crypto_stream_url="ws://127.0.0.1:9/v1beta3/crypto/us"
    )
    [shard] = plan(settings)
    assert shard.spec.url == "ws://127.0.0.1:9/v1beta3/crypto/us"
    assert "ALPACA_CRYPTO_STREAM_URL" in _refusal(
        alpaca_streams="crypto", alpaca_crypto_stream_url="ws://example.com/x"
    )


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"alpaca_streams": "stocks,forex"}, ["ALPACA_STREAMS", "forex", "crypto"]),
        ({"alpaca_streams": "crypto", "alpaca_crypto_symbols": "BTCUSD"},
         ["ALPACA_CRYPTO_SYMBOLS", "BTCUSD", "BTC/USD"]),
        ({"alpaca_streams": "options"}, ["ALPACA_OPTIONS_SYMBOLS", "at least one"]),
        ({"alpaca_streams": "options", "alpaca_options_symbols": "AAPL"},
         ["ALPACA_OPTIONS_SYMBOLS", "AAPL", OCC]),
        ({"alpaca_streams": "options", "alpaca_options_symbols": OCC,
          "alpaca_options_channels": "bars"}, ["ALPACA_OPTIONS_CHANNELS", "bars"]),
        ({"alpaca_streams": "options", "alpaca_options_symbols": OCC,
          "alpaca_wire_format": "json"}, ["options", "msgpack", "ALPACA_WIRE_FORMAT"]),
        ({"alpaca_streams": "crypto", "alpaca_crypto_channels": "statuses"},
         ["ALPACA_CRYPTO_CHANNELS", "statuses", "orderbooks"]),
        ({"alpaca_streams": "news", "alpaca_news_symbols": "*,AAPL"},
         ["ALPACA_NEWS_SYMBOLS", "*"]),
        ({"alpaca_options_feed": "sip"}, ["ALPACA_OPTIONS_FEED"]),
        ({"alpaca_crypto_location": "us/../x"}, ["ALPACA_CRYPTO_LOCATION"]),
    ],
)  # fmt: skip
def test_wrong_stream_settings_are_refused_in_one_line(overrides, words) -> None:
    message = _refusal(**overrides)
    for word in words:
        assert word in message, (word, message)


def test_settings_of_streams_that_do_not_run_are_not_checked() -> None:
    settings = _settings(alpaca_crypto_symbols="BTCUSD", alpaca_wire_format="json")
    assert [s.name for s in settings.streams()] == ["stocks"]


def test_an_options_symbol_limit_spreads_contracts_over_connections() -> None:
    contracts = [f"AAPL2401{day:02d}C00100000" for day in range(1, 21)]
    settings = _settings(
        alpaca_streams="options",
        alpaca_options_symbols=",".join(contracts),
        alpaca_options_max_symbols_per_connection=8,
        alpaca_credentials="AKTWO:s2,AKTHREE:s3,AKFOUR:s4",
        alpaca_connections_per_key=2,
    )
    shards = plan(settings)
    assert len(shards) >= 3 and all(len(p.spec.symbols) <= 8 for p in shards)
    assert sorted(s for p in shards for s in p.spec.symbols) == sorted(contracts)
    assert plan(settings) == shards  # stable
    with pytest.raises(ConfigError, match="ALPACA_OPTIONS_MAX_SYMBOLS_PER_CONNECTION"):
        plan(
            _settings(
                alpaca_streams="options",
                alpaca_options_symbols=",".join(contracts),
                alpaca_options_max_symbols_per_connection=8,
            )
        )


def test_health_reports_each_stream_and_names_the_shard_that_is_down() -> None:
    from ray_forwarder.ray.stats import ForwarderSnapshot

    snap = ForwarderSnapshot(
        shards=[
            {"shard_id": "stocks-0", "stream": "stocks", "subscribed": True, "state": "subscribed"},
            {"shard_id": "crypto-0", "stream": "crypto", "subscribed": False,
             "state": "reconnecting"},
        ],
        producers=[{"name": "producer-0", "ready": True}],
    )  # fmt: skip
    ok, body = snap.health()
    assert not ok and body["problems"] == ["shard crypto-0 is reconnecting"]
    assert body["streams"] == {
        "stocks": {"shards": 1, "subscribed": 1},
        "crypto": {"shards": 1, "subscribed": 0},
    }


def test_options_with_a_json_wire_format_is_refused_at_start_in_one_line() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(
            alpaca_streams="stocks,options",
            alpaca_wire_format="json",
            alpaca_options_symbols="AAPL260116C00230000",
        )
    message = str(refused.value)
    assert "\n" not in message
    assert "options" in message and "msgpack" in message and "ALPACA_WIRE_FORMAT" in message


def test_the_cli_refuses_json_options_at_start_with_exit_code_2(monkeypatch, capsys) -> None:
    from ray_forwarder.cli import main

    monkeypatch.setenv("ALPACA_API_KEY_ID", "sim-key")
    monkeypatch.setenv("ALPACA_SECRET_KEY", "sim-secret")
    monkeypatch.setenv("ALPACA_STREAMS", "stocks,options")
    monkeypatch.setenv("ALPACA_OPTIONS_SYMBOLS", "AAPL260116C00230000")
    monkeypatch.setenv("ALPACA_WIRE_FORMAT", "json")
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "options" in err and "msgpack" in err
    assert "sim-secret" not in err
