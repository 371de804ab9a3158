"""Start-up refusals through the real entrypoints, and the Kafka topic check.

Every bad setting is refused by `ray-forwarder run` / `plan` / `python -m ray_forwarder`
before Ray starts: exit code 2, one line on stderr naming the variable, no traceback, and
no secret anywhere in the output. The topic check runs against the session's real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_forwarder.config import ConfigError, load_settings
from ray_forwarder.core.topics import prepare_topics, topic_map
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import SIM_KEY, SIM_SECRET
from tests.kafka_fixture import create_topics

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "ray-forwarder")
ENTRYPOINTS = {
    "run": [CONSOLE_SCRIPT, "run"],
    "plan": [CONSOLE_SCRIPT, "plan"],
    "module": [sys.executable, "-m", "ray_forwarder"],  # what `ray job submit` / RayJob run
}
ALPACA_SECRET = "alpaca-SENTINEL-4711"
KAFKA_SECRET = "kafka-SENTINEL-4712"
EXTRA_SECRET = "extra-SENTINEL-4713"
SECRETS = (ALPACA_SECRET, KAFKA_SECRET, EXTRA_SECRET)
TOPIC_FIELDS = (
    "trades",
    "quotes",
    "bars",
    "status",
    "daily_bars",
    "statuses",
    "lulds",
    "imbalances",
    "deadletter",
)


def _base_env(tmp_path: Path) -> dict[str, str]:
    """A valid configuration that carries a recognisable value in every secret."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            (
                "ALPACA_",
                "KAFKA_",
                "TOPIC_",
                "SPOOL_",
                "SHARDS",
                "PRODUCERS",
                "LOG_LEVEL",
                "RAY_ADDRESS",
            )
        )
    }
    env.update(
        ALPACA_API_KEY_ID="AKMAINKEYID",
        ALPACA_SECRET_KEY=ALPACA_SECRET,
        ALPACA_CREDENTIALS=f"AKSECONDKEY:{EXTRA_SECRET}",
        KAFKA_USERNAME="forwarder",
        KAFKA_PASSWORD=KAFKA_SECRET,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",  # never reached: every case fails before
        SPOOL_DIR=str(tmp_path / "spool"),
    )
    return env


def _run(argv: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


# One case per class of bad value: (variables to set, the variable the line must name).
BAD_VALUES = {
    "log level": ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    "unknown feed": ({"ALPACA_FEED": "bogusfeed"}, "ALPACA_FEED"),
    "feed as a path": ({"ALPACA_FEED": "../../evil?x=1"}, "ALPACA_FEED"),
    "stream url not ws": (
        {"ALPACA_STREAM_URL": "https://stream.example.com/v2/sip"},
        "ALPACA_STREAM_URL",
    ),
    "ws to a remote host": (
        {"ALPACA_STREAM_URL": "ws://stream.example.com/v2/sip"},
        "ALPACA_STREAM_URL",
    ),
    "stream url with userinfo": (
        {"ALPACA_STREAM_URL": f"wss://user:{EXTRA_SECRET}@stream.example.com/v2/sip"},
        "ALPACA_STREAM_URL",
    ),
    "trading url not http": (
        {"ALPACA_TRADING_URL": "wss://api.example.com"},
        "ALPACA_TRADING_URL",
    ),
    "http to a remote trading host": (
        {"ALPACA_TRADING_URL": "http://api.example.com"},
        "ALPACA_TRADING_URL",
    ),
    "trading url with userinfo": (
        {"ALPACA_TRADING_URL": f"https://user:{EXTRA_SECRET}@api.example.com"},
        "ALPACA_TRADING_URL",
    ),
    "security protocol": ({"KAFKA_SECURITY_PROTOCOL": "BOGUS"}, "KAFKA_SECURITY_PROTOCOL"),
    "sasl mechanism": ({"KAFKA_SASL_MECHANISM": "MD5"}, "KAFKA_SASL_MECHANISM"),
    "empty topic": ({"TOPIC_TRADES": ""}, "TOPIC_TRADES"),
    "illegal topic": ({"TOPIC_IMBALANCES": "alpaca/imbalances"}, "TOPIC_IMBALANCES"),
    "dot-dot topic": ({"TOPIC_STATUS": ".."}, "TOPIC_STATUS"),
    "long topic": ({"TOPIC_LULDS": "x" * 250}, "TOPIC_LULDS"),
    "empty bootstrap": ({"KAFKA_BOOTSTRAP_SERVERS": ""}, "KAFKA_BOOTSTRAP_SERVERS"),
    "bootstrap without port": (
        {"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092,kafka2"},
        "KAFKA_BOOTSTRAP_SERVERS",
    ),
    "infinite ttl": ({"DEDUP_TTL_SECONDS": "inf"}, "DEDUP_TTL_SECONDS"),
    "infinite bar delay": ({"BAR_FINAL_DELAY_SECONDS": "inf"}, "BAR_FINAL_DELAY_SECONDS"),
    "nan batch wait": ({"BATCH_MAX_MS": "nan"}, "BATCH_MAX_MS"),
    "infinite reconnect": ({"RECONNECT_MAX": "inf"}, "RECONNECT_MAX"),
    "infinite stale": ({"STALE_STREAM_SECONDS": "inf"}, "STALE_STREAM_SECONDS"),
    "absurd duration": ({"DEDUP_TTL_SECONDS": "1e12"}, "DEDUP_TTL_SECONDS"),
    "absurd connections": (
        {"ALPACA_CONNECTIONS_PER_KEY": "1000000000"},
        "ALPACA_CONNECTIONS_PER_KEY",
    ),
    "absurd producers": ({"PRODUCERS": "100000"}, "PRODUCERS"),
    "absurd buffer": ({"BUFFER_MAX_EVENTS": str(10**30)}, "BUFFER_MAX_EVENTS"),
    "malformed credentials": (
        {"ALPACA_CREDENTIALS": f"AKTWO{EXTRA_SECRET}"},
        "ALPACA_CREDENTIALS",
    ),
    "more shards than slots": ({"SHARDS": "3"}, "SHARDS"),
    "wildcard over shards": ({"ALPACA_SYMBOLS": "*", "SHARDS": "2"}, "ALPACA_SYMBOLS"),
    "unwritable spool": ({"SPOOL_DIR": "{file}/spool"}, "SPOOL_DIR"),
}


# Every case through `run` (the path that used to find out only after Ray started, or never);
# a few through `plan` and `python -m ray_forwarder` too.
ENTRYPOINT_CASES = [("run", case) for case in sorted(BAD_VALUES)] + [
    (entrypoint, case)
    for entrypoint in ("plan", "module")
    for case in ("log level", "stream url with userinfo", "more shards than slots")
]


@pytest.mark.parametrize(("entrypoint", "case"), ENTRYPOINT_CASES)
def test_bad_settings_are_refused_before_ray_with_one_line(tmp_path, case, entrypoint) -> None:
    values, variable = BAD_VALUES[case]
    a_file = tmp_path / "not-a-directory"
    a_file.write_text("")
    env = _base_env(tmp_path) | {k: v.format(file=a_file) for k, v in values.items()}
    started = time.monotonic()
    result = _run(ENTRYPOINTS[entrypoint], env)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("ray-forwarder: ") and variable in lines[0], lines[0]
    assert "Traceback" not in output and "Ray" not in output
    for secret in SECRETS:
        assert secret not in output
    assert elapsed < 30  # no Ray start (that alone takes longer on this machine)


def test_a_refused_duration_exits_2() -> None:
    result = _run([CONSOLE_SCRIPT, "run", "--duration", "inf"], dict(os.environ))
    assert result.returncode == 2 and "--duration" in result.stderr


def test_an_unreachable_kafka_stops_the_start_before_ray(tmp_path) -> None:
    """Valid settings, nothing listening: exit code 1 (not a settings error), the reason in
    the last line, no traceback, no secret, no Ray."""
    result = _run(ENTRYPOINTS["module"], _base_env(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    last = result.stderr.splitlines()[-1]
    assert last.startswith("ray-forwarder: cannot reach Kafka at 127.0.0.1:1 (SASL_PLAINTEXT")
    assert "Traceback" not in output and "Ray" not in output
    for secret in SECRETS:
        assert secret not in output


def test_loopback_ws_and_the_insecure_opt_in_are_accepted(tmp_path) -> None:
    env = _base_env(tmp_path)
    for url, opt_in in (
        ("ws://127.0.0.1:8765/v2/test", "false"),
        ("ws://localhost:8765/v2/test", "false"),
        ("ws://[::1]:8765/v2/test", "false"),
        ("ws://sim.internal:8765/v2/test", "true"),
    ):
        result = _run(
            ENTRYPOINTS["plan"],
            env | {"ALPACA_STREAM_URL": url, "ALPACA_ALLOW_INSECURE_STREAM": opt_in},
        )
        assert result.returncode == 0, result.stderr
        assert url in result.stdout


def test_every_documented_feed_streams_where_alpaca_says(monkeypatch) -> None:
    expected = {
        "sip": "wss://stream.data.alpaca.markets/v2/sip",
        "iex": "wss://stream.data.alpaca.markets/v2/iex",
        "delayed_sip": "wss://stream.data.alpaca.markets/v2/delayed_sip",
        "boats": "wss://stream.data.alpaca.markets/v1beta1/boats",
        "overnight": "wss://stream.data.alpaca.markets/v1beta1/overnight",
        "test": "wss://stream.data.alpaca.markets/v2/test",
    }
    for feed, url in expected.items():
        assert load_settings(alpaca_feed=feed).stream_url == url
    assert load_settings(alpaca_feed="IEX").alpaca_feed == "iex"


def test_topic_rule_covers_every_topic_field() -> None:
    """The validator applies to every topic_* field, including ones added later."""
    from ray_forwarder.config import Settings

    topic_fields = [name for name in Settings.model_fields if name.startswith("topic_")]
    assert {f"topic_{n}" for n in TOPIC_FIELDS} <= set(topic_fields)
    for name in topic_fields:
        with pytest.raises(ConfigError, match=name.upper()):
            load_settings(**{name: "bad name"})


def test_plan_work_is_bounded_by_shards_not_slots() -> None:
    """Planning numbers slots instead of listing them, so even the largest allowed
    credentials x connections product plans at once."""
    from ray_forwarder.ray.planning import plan

    credentials = ",".join(f"AK{i}:s{i}" for i in range(256))
    started = time.monotonic()
    shards = plan(
        load_settings(
            alpaca_api_key_id="AK",
            alpaca_secret_key="s",
            alpaca_credentials=credentials,
            alpaca_connections_per_key=64,
            alpaca_symbols="SPY,QQQ,AAPL",
            shards=1024,
        )
    )
    assert time.monotonic() - started < 1.0
    assert sorted(s for p in shards for s in p.spec.symbols) == ["AAPL", "QQQ", "SPY"]
    assert all(p.slot == int(p.spec.shard_id.split("-")[1]) % 64 for p in shards)


def test_spool_check_is_skipped_without_a_spool(tmp_path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    env = _base_env(tmp_path) | {"SPOOL_DIR": f"{a_file}/spool", "SPOOL_MAX_BYTES": "0"}
    assert _run(ENTRYPOINTS["plan"], env).returncode == 0


# --- Kafka topics -------------------------------------------------------------------------


def _topic_env(kafka_topics) -> dict[str, str]:
    return {f"TOPIC_{name.upper()}": kafka_topics(name) for name in TOPIC_FIELDS}


def _settings(kafka_broker, topics: dict[str, str], **overrides):
    return load_settings(
        kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
        **{k.lower(): v for k, v in topics.items()},
        **overrides,
    )


async def _partitions(kafka_broker, names) -> dict[str, int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**kafka_broker.client_kwargs())
    await admin.start()
    try:
        return {
            t["topic"]: len(t["partitions"])
            for t in await admin.describe_topics()
            if t["topic"] in set(names)
        }
    finally:
        await admin.close()


async def test_missing_topics_are_refused_in_one_line_naming_them(
    tmp_path, kafka_broker, kafka_topics
) -> None:
    """ALPACA_CREDENTIALS alone is a complete set of keys (the run gets as far as Kafka), and
    topics that are missing are named, not auto-created, with KAFKA_CREATE_TOPICS unset."""
    topics = _topic_env(kafka_topics)
    present = [topics["TOPIC_TRADES"], topics["TOPIC_STATUS"]]
    await create_topics(present, **kafka_broker.client_kwargs())
    env = (
        _base_env(tmp_path)
        | topics
        | {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
            "KAFKA_TOPICS_WAIT_SECONDS": "0",
        }
    )
    for name in ("ALPACA_API_KEY_ID", "ALPACA_SECRET_KEY", "KAFKA_USERNAME", "KAFKA_PASSWORD"):
        env.pop(name)
    result = _run(ENTRYPOINTS["run"], env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    [line] = result.stderr.splitlines()
    missing = sorted(set(topics.values()) - set(present))
    assert f"Kafka topics missing on {kafka_broker.bootstrap_servers}: {', '.join(missing)}" in line
    assert "KAFKA_CREATE_TOPICS" in line
    assert EXTRA_SECRET not in output and "Ray" not in output
    assert set(await _partitions(kafka_broker, topics.values())) == set(present)


async def test_topics_that_appear_while_waiting_are_taken(kafka_broker, kafka_topics) -> None:
    """A Topic Operator that creates the topics while the forwarder waits (no wall clock:
    the injected sleep creates them and advances a fake clock)."""
    topics = _topic_env(kafka_topics)
    settings = _settings(kafka_broker, topics, kafka_topics_wait_seconds=60)
    now = [0.0]
    naps: list[float] = []

    async def operator_reconciles(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds
        if len(naps) == 2:
            await create_topics(sorted(topics.values()), **kafka_broker.client_kwargs())

    assert await prepare_topics(settings, sleep=operator_reconciles, clock=lambda: now[0]) == []
    assert len(naps) == 2 and now[0] < 60

    never = _settings(kafka_broker, _topic_env(kafka_topics), kafka_topics_wait_seconds=10)
    now[0], naps[:] = 0.0, []

    async def nothing_happens(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds

    with pytest.raises(ConfigError, match="Kafka topics missing"):
        await prepare_topics(never, sleep=nothing_happens, clock=lambda: now[0])
    assert now[0] == pytest.approx(10)


async def test_create_topics_creates_only_what_is_missing(kafka_broker, kafka_topics) -> None:
    topics = _topic_env(kafka_topics)
    await create_topics([topics["TOPIC_QUOTES"]], partitions=1, **kafka_broker.client_kwargs())
    for _ in range(100):  # until the broker's metadata lists it
        if await _partitions(kafka_broker, [topics["TOPIC_QUOTES"]]):
            break
        await asyncio.sleep(0.1)
    settings = _settings(
        kafka_broker, topics, kafka_create_topics=True, kafka_topics_wait_seconds=0
    )
    created = await prepare_topics(settings)
    assert created == sorted(set(topics.values()) - {topics["TOPIC_QUOTES"]})
    partitions = await _partitions(kafka_broker, topics.values())
    assert partitions == {
        name: 1 if name == topics["TOPIC_QUOTES"] else 3 for name in topics.values()
    }
    assert await prepare_topics(settings) == []  # now all present


async def test_producer_warm_up_after_the_check_logs_no_kafka_errors(
    kafka_broker, kafka_topics, caplog
) -> None:
    """The producer's warm-up (metadata for every routed topic) is where the ERROR lines
    came from while a broker auto-created the topics; after the start-up check (here
    creating what is missing) it logs nothing at ERROR."""
    from ray_forwarder.runtime.producer import KafkaSink

    topics = _topic_env(kafka_topics)
    await create_topics([topics["TOPIC_TRADES"]], **kafka_broker.client_kwargs())
    settings = _settings(kafka_broker, topics, kafka_create_topics=True)
    caplog.set_level(logging.WARNING, logger="aiokafka")
    await prepare_topics(settings)
    sink = KafkaSink(settings)
    await sink.start()
    try:
        await sink.send_batch([(topics["TOPIC_QUOTES"], b"SPY", b"{}")])
    finally:
        await sink.stop()
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aiokafka") and r.levelno >= logging.ERROR
    ]
    assert errors == []


@pytest.mark.timeout(180)
async def test_a_start_logs_no_kafka_errors(tmp_path, kafka_broker, kafka_topics) -> None:
    """The real entrypoint, a local Ray and the real broker: some topics exist, the rest are
    created at start (KAFKA_CREATE_TOPICS=true), and no ERROR line comes from the Kafka
    client (before, each start logged `Topic ... not found in cluster metadata` per topic)."""
    topics = _topic_env(kafka_topics)
    await create_topics(
        [topics["TOPIC_TRADES"], topics["TOPIC_QUOTES"]], **kafka_broker.client_kwargs()
    )
    config = SimConfig(
        symbols=["SPY", "QQQ"],
        rate=200,
        time_scale=600,
        total_events=400,
        keys={SIM_KEY: SIM_SECRET},
        seed=5,
    )
    with SimulatorThread(config) as sim:
        env = _base_env(tmp_path) | topics
        env.pop("ALPACA_CREDENTIALS")
        env.pop("KAFKA_USERNAME")
        env.pop("KAFKA_PASSWORD")
        env.update(
            ALPACA_API_KEY_ID=SIM_KEY,
            ALPACA_SECRET_KEY=SIM_SECRET,
            ALPACA_STREAM_URL=sim.url,
            ALPACA_SYMBOLS="SPY,QQQ",
            KAFKA_BOOTSTRAP_SERVERS=kafka_broker.bootstrap_servers,
            KAFKA_CREATE_TOPICS="true",
            METRICS_PORT="0",
            LOG_LEVEL="INFO",
            RAY_AUTH_MODE="disabled",
            RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
            RAY_DEDUP_LOGS="0",
        )
        result = _run([*ENTRYPOINTS["run"], "--duration", "6"], env, timeout=150)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "not found in cluster metadata" not in output
    records = []
    for line in output.splitlines():
        if '{"ts"' in line:
            # a line cut by the log forwarder is skipped; the substring check covers it
            with contextlib.suppress(ValueError):
                records.append(json.loads(line[line.index('{"ts"') :]))
    kafka_errors = [
        r for r in records if r["level"] == "ERROR" and r["logger"].startswith("aiokafka")
    ]
    assert kafka_errors == []
    created = [r["msg"] for r in records if r["msg"].startswith("created Kafka topics")]
    assert len(created) == 1
    for name in set(topics.values()) - {topics["TOPIC_TRADES"], topics["TOPIC_QUOTES"]}:
        assert name in created[0]
    assert set(await _partitions(kafka_broker, topics.values())) == set(topics.values())
    routed = set(topic_map(_settings(kafka_broker, topics)).values())
    assert routed | {topics["TOPIC_DEADLETTER"]} == set(topics.values())  # DLQ: no channel's


def test_demo_refuses_a_bad_log_level_in_one_line() -> None:
    """The demo configures logging before it loads settings: the level is still checked."""
    env = dict(os.environ, LOG_LEVEL="LOUD")
    result = _run([CONSOLE_SCRIPT, "demo", "--duration", "1"], env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "ray-forwarder: LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    ]
