"""SIGTERM during load: `python -m ray_forwarder` in its own process (its own local Ray)
against the simulator, which keeps sending; everything the forwarder read before the signal
is in Kafka when the process exits 0. (`ray job stop`, which sends the same SIGTERM, is
covered by tests/test_job_submit.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ray_forwarder.config import load_settings
from ray_forwarder.core.topics import routed_topics, topic_map
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import SIM_KEY, SIM_SECRET
from tests.kafka_fixture import consume_all, create_topics
from tests.stream_checks import canonical, decode_and_check

REPO = Path(__file__).resolve().parents[1]
SYMBOLS = ["SPY", "QQQ", "AAPL", "MSFT"]
#: From SIGTERM to exit: the drain (bounded by the driver's 30 s) plus Ray's shutdown.
EXIT_BOUND_S = 45.0


async def test_sigterm_under_load_flushes_everything_read(kafka_broker, kafka_topics) -> None:
    topics = {
        f"TOPIC_{name.upper()}": kafka_topics(name)
        for name in ("trades", "quotes", "bars", "status", "daily_bars", "statuses", "lulds",
                     "imbalances", "trade_updates", "deadletter")
    }  # fmt: skip
    # No total: the feed is still sending at full rate when the signal arrives.
    sim_config = SimConfig(symbols=SYMBOLS, rate=1500, time_scale=600,
                           keys={SIM_KEY: SIM_SECRET}, seed=21)  # fmt: skip
    with SimulatorThread(sim_config) as sim:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(
            ALPACA_API_KEY_ID=SIM_KEY, ALPACA_SECRET_KEY=SIM_SECRET, ALPACA_STREAM_URL=sim.url,
            ALPACA_SYMBOLS=",".join(SYMBOLS), ALPACA_CHANNELS="trades,quotes",
            KAFKA_BOOTSTRAP_SERVERS=kafka_broker.bootstrap_servers, METRICS_PORT="0",
            PRODUCER_LINGER_MS="5", LOG_LEVEL="INFO", RAY_AUTH_MODE="disabled",
            RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_DEDUP_LOGS="0", **topics,
        )  # fmt: skip
        settings = load_settings(
            **{k.lower(): v for k, v in env.items() if k in topics or k.startswith("KAFKA_")}
        )
        await create_topics(routed_topics(settings), **kafka_broker.client_kwargs())
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray_forwarder"], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            first = await consume_all(
                kafka_broker.bootstrap_servers, settings.topic_trades, expected_count=1,
                timeout=60,
            )  # fmt: skip
            assert first, "the forwarder wrote nothing within 60 s"
            assert sim.wait_sent(sim.stats()["items"] + 3000, 20)  # a few seconds of load
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            items_at_signal = sim.stats()["items"]
            out, _ = proc.communicate(timeout=EXIT_BOUND_S)
            exit_s = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        by_conn = sim.sent_by_connection()
        sent_after_signal = sim.stats()["items"] - items_at_signal
    assert proc.returncode == 0, out[-4000:]
    assert exit_s < EXIT_BOUND_S
    logs = [json.loads(line) for line in out.splitlines() if line.startswith('{"ts"')]
    assert [m["msg"] for m in logs if m["msg"].startswith("draining")] == [
        "draining (stop requested)"
    ]
    [stopped] = [m["msg"] for m in logs if m["msg"].startswith("stopped ")]
    final = json.loads(stopped.removeprefix("stopped "))
    assert final["drained"] is True and not final["dropped"]
    data = [channel for channel in final["emitted"] if channel != "status"]
    assert {"trades", "quotes"} <= set(data)  # and corrections, cancelErrors
    emitted = sum(final["emitted"][channel] for channel in data)
    assert sum(final["acked"].get(channel, 0) for channel in data) == emitted

    records = await consume_all(
        kafka_broker.bootstrap_servers, sorted(set(topic_map(settings).values())),
        idle_timeout=2.0, timeout=30,
    )  # fmt: skip
    report = decode_and_check(records, topic_map(settings))
    got = [canonical(e["payload"]) for e in report.data]
    assert len(got) == len(set(got)) == emitted  # everything read and emitted, exactly once
    [conn] = by_conn.values()
    on_conn = list(dict.fromkeys(canonical(r.item) for r in conn))
    # What reached Kafka is exactly the first `emitted` items the feed wrote: the only
    # items missing are the unread tail that was in flight when the socket closed.
    assert set(got) == set(on_conn[:emitted])
    unread = len(on_conn) - emitted
    print(f"SIGTERM under load: {emitted} items read and all in Kafka; exit 0 after "
          f"{exit_s:.1f}s; {unread} written by the feed but unread when the socket closed "
          f"({sent_after_signal} of them after the signal)")  # fmt: skip
