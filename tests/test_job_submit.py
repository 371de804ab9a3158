"""`ray job submit` of the real entrypoint to a separate `ray start --head` cluster, then
`ray job stop`: the job reaches Kafka, stops as STOPPED, and drains on the way out.

The cluster here is its own set of processes (own ports, own `--temp-dir`, own process
group); it never touches the in-process Ray of the `ray_session` fixture, and it is torn down
by killing only its own processes (never `ray stop`, which would stop every Ray on the
machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from ray_forwarder.config import load_settings
from ray_forwarder.core.topics import routed_topics, topic_map
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import ALL_CHANNELS, SIM_KEY, SIM_SECRET
from tests.kafka_fixture import consume_all, create_topics
from tests.stream_checks import (
    assert_at_least_once,
    assert_one_final_per_bar,
    decode_and_check,
)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
SYMBOLS = ["SPY", "QQQ", "AAPL"]
EXCLUDES = [".git/", ".venv/", ".cache/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/"]
TERMINAL = {"STOPPED", "SUCCEEDED", "FAILED"}

pytestmark = pytest.mark.timeout(240)


@dataclass
class HeadNode:
    dashboard: str  # http://127.0.0.1:<port>, the Jobs API
    temp_dir: Path
    env: dict[str, str]

    def ray(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )


def _free_ports(count: int) -> list[int]:
    """Free loopback ports in 20000..32767: above Ray's default worker port range
    (10002-19999, which `ray start` refuses to overlap) and below the usual ephemeral range."""
    chosen: list[int] = []
    for _ in range(5000):
        port = random.randint(20000, 32767)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in chosen:
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError("no free ports")


def _cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # never let the CLI find the session's in-process Ray
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # The job's entrypoint `python` is looked up on the head's PATH: make it this venv's
    # python (as `uv run ray start` would), so the job has aiokafka, websockets, ...
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _cluster_pids(pgid: int, temp_dir: Path) -> set[int]:
    """Every process of this cluster: its process group (gcs, raylet, dashboard, ...), any
    process naming its temp dir, and all their descendants (workers, the job's driver, which
    Ray starts in a session of its own)."""
    roots: set[int] = set()
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(proc.name)
            if os.getpgid(pid) == pgid or str(temp_dir) in (proc / "cmdline").read_text(
                errors="replace"
            ):
                roots.add(pid)
    tree, found, todo = _children(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(tree.get(pid, ()))
    found.discard(os.getpid())
    return found


@pytest.fixture
def head_node() -> Iterator[HeadNode]:
    ports = _free_ports(10)
    temp_dir = Path(tempfile.mkdtemp(prefix="rfjob-", dir="/tmp"))  # short: socket paths
    env = _cluster_env()
    dashboard_port = ports[1]
    cmd = [
        RAY, "start", "--head", "--disable-usage-stats", "--num-cpus", "2",
        "--temp-dir", str(temp_dir),
        "--port", str(ports[0]),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(ports[2]),
        "--dashboard-agent-listen-port", str(ports[3]),
        "--dashboard-agent-grpc-port", str(ports[4]),
        "--runtime-env-agent-port", str(ports[5]),
        "--metrics-export-port", str(ports[6]),
        "--node-manager-port", str(ports[7]),
        "--object-manager-port", str(ports[8]),
    ]  # fmt: skip
    # A new session: `ray start` and every daemon it forks share one process group that
    # belongs to this cluster alone.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    pgid = proc.pid
    node = HeadNode(f"http://127.0.0.1:{dashboard_port}", temp_dir, env)
    node.metrics_port = ports[9]  # type: ignore[attr-defined]
    try:
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, f"ray start --head failed:\n{out[-4000:]}"
        yield node
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=1)
        for _ in range(3):
            pids = _cluster_pids(pgid, temp_dir)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _status(node: HeadNode, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(node.dashboard).get_job_status(job_id).value)


def _wait_status(node: HeadNode, job_id: str, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = _status(node, job_id)
        if status in wanted:
            return status
        time.sleep(0.5)
    return status


async def test_ray_job_submit_then_stop_drains_to_kafka(kafka_broker, kafka_topics, head_node):
    node = head_node
    started = time.monotonic()
    topics = {
        f"TOPIC_{name.upper()}": kafka_topics(name)
        for name in ("trades", "quotes", "bars", "status", "daily_bars", "statuses", "lulds",
                     "imbalances", "trade_updates", "deadletter")
    }  # fmt: skip
    sim_config = SimConfig(
        symbols=SYMBOLS, rate=500, time_scale=600, total_events=3000,
        keys={SIM_KEY: SIM_SECRET}, seed=11,
    )  # fmt: skip
    with SimulatorThread(sim_config) as sim:
        env_vars = {
            "ALPACA_API_KEY_ID": SIM_KEY,
            "ALPACA_SECRET_KEY": SIM_SECRET,
            "ALPACA_STREAM_URL": sim.url,
            "ALPACA_SYMBOLS": ",".join(SYMBOLS),
            "ALPACA_CHANNELS": ALL_CHANNELS,
            "KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
            "METRICS_PORT": str(node.metrics_port),  # type: ignore[attr-defined]
            # No bar becomes final by time during the run: every is_final bar in Kafka
            # must come from the graceful drain after `ray job stop`.
            "BAR_FINAL_DELAY_SECONDS": "3600",
            "PRODUCER_LINGER_MS": "5",
            "LOG_LEVEL": "INFO",
            "RAY_JOB_STOP_WAIT_TIME_S": "60",
            **topics,
        }
        settings = load_settings(
            **{k.lower(): v for k, v in env_vars.items() if k != "RAY_JOB_STOP_WAIT_TIME_S"}
        )
        await create_topics(routed_topics(settings), **kafka_broker.client_kwargs())
        job_id = f"rf-test-{os.getpid()}-{int(time.time())}"
        runtime_env = {"env_vars": env_vars, "excludes": EXCLUDES}
        submit = node.ray(
            "job", "submit", "--address", node.dashboard, "--submission-id", job_id,
            "--no-wait", "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps(runtime_env),
            "--", "python", "-m", "ray_forwarder",
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout + submit.stderr
        # Envelopes reach the trades topic: the job's python imported the deps and ran.
        first = await consume_all(
            kafka_broker.bootstrap_servers, settings.topic_trades, expected_count=1, timeout=60
        )
        assert first, (
            f"no envelope within 60 s; job {_status(node, job_id)}:\n"
            + node.ray("job", "logs", "--address", node.dashboard, job_id).stdout[-4000:]
        )
        assert _status(node, job_id) == "RUNNING"
        assert sim.wait_finished(30), f"simulator did not finish: {sim.stats()}"
        time.sleep(1.0)
        bars_before = await consume_all(
            kafka_broker.bootstrap_servers, settings.topic_bars, idle_timeout=1.0
        )
        finals_before = [r for r in bars_before if orjson.loads(r.value)["is_final"]]
        sent = sim.distinct_items()

        stop = node.ray("job", "stop", "--address", node.dashboard, job_id, timeout=90)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        status = _wait_status(node, job_id, TERMINAL, 70)
        logs = node.ray("job", "logs", "--address", node.dashboard, job_id).stdout
    assert status == "STOPPED", f"job ended {status}:\n{logs[-4000:]}"
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith('{"ts"')]
    drains = [line for line in lines if line.get("msg", "").startswith("draining")]
    assert [d["msg"] for d in drains] == ["draining (stop requested)"], logs[-4000:]

    records = await consume_all(
        kafka_broker.bootstrap_servers, sorted(set(topic_map(settings).values())),
        idle_timeout=2.0, timeout=30,
    )  # fmt: skip
    report = decode_and_check(records, topic_map(settings))
    assert len(sent) == sim_config.total_events
    assert_at_least_once(report, sent)  # every distinct item sent is in Kafka
    assert not finals_before
    assert_one_final_per_bar(report, sent)  # written by the drain on SIGTERM
    assert time.monotonic() - started < 120
