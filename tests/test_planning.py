"""Shard planning: credentials, connection slots, stable spreading, clear refusals."""

from __future__ import annotations

import pytest

from ray_forwarder.cli import main
from ray_forwarder.config import ConfigError, load_settings
from ray_forwarder.ray.planning import mask_key, plan
from ray_forwarder.runtime.outbox import stable_slot

SYMBOLS = "SPY,QQQ,AAPL,MSFT,NVDA,AMZN,TSLA,META,IWM,DIA,GOOG,AMD"


def _settings(**overrides):
    values = dict(alpaca_api_key_id="AKMAINKEY", alpaca_secret_key="main-secret",
                  alpaca_symbols=SYMBOLS)  # fmt: skip
    values.update(overrides)
    return load_settings(**values)


def test_one_key_pair_is_one_shard_with_every_symbol() -> None:
    [shard] = plan(_settings())
    assert shard.spec.key_id == "AKMAINKEY"
    assert sorted(shard.spec.symbols) == sorted(SYMBOLS.split(","))


def test_symbols_spread_over_key_pairs_by_a_stable_hash() -> None:
    shards = plan(_settings(alpaca_credentials="AKTWO:s2,AKTHREE:s3,AKFOUR:s4"))
    assert [s.spec.key_id for s in shards] == ["AKMAINKEY", "AKTWO", "AKTHREE", "AKFOUR"][
        : len(shards)
    ]
    seen = [sym for s in shards for sym in s.spec.symbols]
    assert sorted(seen) == sorted(SYMBOLS.split(","))  # each symbol exactly once
    for planned in shards:
        index = int(planned.spec.shard_id.rsplit("-", 1)[1])
        assert all(stable_slot(sym.encode(), 4) == index for sym in planned.spec.symbols)
    assert plan(_settings(alpaca_credentials="AKTWO:s2,AKTHREE:s3,AKFOUR:s4")) == shards


def test_connections_per_key_give_more_slots() -> None:
    shards = plan(_settings(alpaca_connections_per_key=2, shards=2))
    assert [(s.spec.key_id, s.slot) for s in shards] == [("AKMAINKEY", 0), ("AKMAINKEY", 1)]


def test_more_shards_than_connections_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match=r"SHARDS=3 .* 1 key pair\(s\)"):
        plan(_settings(shards=3))


def test_wildcard_cannot_be_split() -> None:
    assert len(plan(_settings(alpaca_symbols="*", alpaca_credentials="AKTWO:x"))) == 1
    with pytest.raises(ConfigError, match="cannot be split"):
        plan(_settings(alpaca_symbols="*", alpaca_credentials="AKTWO:x", shards=2))


@pytest.mark.parametrize("bad", ["AKTWO", "AKTWO:", ":secret"])
def test_bad_credential_lists_fail_without_echoing_them(bad: str) -> None:
    with pytest.raises(ConfigError, match="ALPACA_CREDENTIALS") as info:
        plan(_settings(alpaca_credentials=bad + ",AKX:the-secret"))
    assert "the-secret" not in str(info.value)


def test_plan_command_masks_key_ids(monkeypatch, capsys) -> None:
    monkeypatch.setenv("ALPACA_API_KEY_ID", "AKVERYSECRETKEYID")
    monkeypatch.setenv("ALPACA_SECRET_KEY", "the-secret")
    monkeypatch.setenv("ALPACA_CREDENTIALS", "AKOTHERKEYID:other-secret")
    monkeypatch.setenv("ALPACA_SYMBOLS", SYMBOLS)
    monkeypatch.setenv("PRODUCERS", "3")
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "AKVERYSECRETKEYID" not in out and "the-secret" not in out
    assert "other-secret" not in out and "AKOTHERKEYID" not in out
    assert mask_key("AKVERYSECRETKEYID") in out
    assert "3 producer(s)" in out


def test_alpaca_credentials_alone_are_enough() -> None:
    settings = load_settings(alpaca_credentials="AKONE:s1,AKTWO:s2", alpaca_symbols=SYMBOLS)
    shards = plan(settings)
    assert sorted(s.spec.key_id for s in shards) == ["AKONE", "AKTWO"]
    with pytest.raises(ConfigError, match="ALPACA_SECRET_KEY"):  # a half pair is still wrong
        plan(load_settings(alpaca_api_key_id="AK", alpaca_credentials="AKONE:s1"))
