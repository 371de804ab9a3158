"""What a local Ray started by the forwarder runs (and what it leaves out), and that joining
a cluster passes none of the local start's options."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ray_forwarder.ray.driver import LOCAL_ONLY_OPTIONS, ray_init_options

REPO = Path(__file__).resolve().parents[1]


def test_a_local_start_leaves_out_what_the_forwarder_does_not_use() -> None:
    options = ray_init_options({}, {})
    assert options["address"] == "local"  # a fresh Ray, never a stale one in /tmp/ray
    assert options["include_dashboard"] is False
    assert options["object_store_memory"] <= 256 * 1024 * 1024
    system = options["_system_config"]
    assert system["task_events_report_interval_ms"] == 0
    assert system["prestart_worker_first_driver"] is False
    assert system["num_workers_soft_limit"] == 0
    assert "AUTH_MODE" not in system  # Ray takes that from RAY_AUTH_MODE only


def test_the_callers_options_win_and_system_configs_merge() -> None:
    system = {"metrics_report_interval_ms": 2000}
    options = ray_init_options(
        {"include_dashboard": True, "num_cpus": 4, "_system_config": system}, {}
    )
    assert options["include_dashboard"] is True and options["num_cpus"] == 4
    assert options["_system_config"]["metrics_report_interval_ms"] == 2000
    assert options["_system_config"]["task_events_report_interval_ms"] == 0


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "ray://head:10001", "auto"])
def test_joining_a_cluster_passes_no_local_only_option(address: str) -> None:
    local = ray_init_options({}, {})
    options = ray_init_options(
        {"num_cpus": 2, "include_dashboard": False, "_temp_dir": "/tmp/x", "log_to_driver": False},
        {"RAY_ADDRESS": address},
    )
    assert not LOCAL_ONLY_OPTIONS & options.keys()
    assert "address" not in options  # ray.init() takes RAY_ADDRESS itself
    assert not (local.keys() - {"namespace", "log_to_driver"}) & options.keys()
    assert options["namespace"] == "ray-forwarder" and options["log_to_driver"] is False


def _probe(*, extra_env: dict[str, str] | None = None) -> tuple[dict, str]:
    """tests/local_ray_probe.py in a process of its own (a fresh local Ray started by
    `ensure_ray()`, not the test session's): its RESULT and its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", **(extra_env or {}))
    temp_dir = Path("/tmp") / f"rf-local-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.local_ray_probe", str(temp_dir)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
        )  # fmt: skip
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
    assert proc.returncode == 0 and lines, "the probe failed (its output is above)"
    out = json.loads(lines[-1].removeprefix("RESULT "))
    print("\n".join(f"{mb:7.1f} MB  {cmd}" for cmd, mb in out["rss_mb"].items()))
    return out, proc.stderr


def test_a_local_start_runs_no_dashboard_modules_and_still_exports_actor_metrics() -> None:
    """No dashboard module processes, no idle workers, and Ray's metrics export port (served
    by the dashboard agent, which the metrics bridge needs) has the actor's metric."""
    out, _ = _probe()
    processes = out["processes"]
    assert not [p for p in processes if p.startswith("ray-dashboard-")], "dashboard modules ran"
    [head] = [p for p in processes if "dashboard/dashboard.py" in p]
    assert "--modules-to-load=UsageStatsHead" in head  # the head without the UI's modules
    assert any(p.startswith("ray::DashboardAgent") for p in processes), "no metrics agent"
    assert not [p for p in processes if p.startswith("ray::IDLE")], "idle workers kept"
    assert out["exported"], "the actor's metric never reached Ray's metrics export port"


def test_a_local_start_is_tried_again_when_the_agent_misses_the_raylets_wait(
    tmp_path: Path,
) -> None:
    """The first dashboard agent sleeps past the raylet's fixed 15 s wait (as one importing
    slowly on a busy machine does): the raylet aborts, `ray.init()` fails, and
    `ensure_ray()` starts Ray again, leaving nothing of the failed start running."""
    out, stderr = _probe(
        extra_env={
            "PYTHONPATH": str(REPO / "tests" / "slow_agent"),
            "SLOW_AGENT_MARKER": str(tmp_path / "slept"),
        }
    )
    assert (tmp_path / "slept").exists(), "the first agent was not slowed down"
    assert "the local Ray did not start (attempt 1 of" in stderr
    # ray.init() wrote attempt 1's spilling directory into the options it was given; a
    # retry passing it along made Ray warn about a spilling config in the system config
    assert "object spilling config is specified from an unstable API" not in stderr
    processes = out["processes"]
    assert len([p for p in processes if "gcs_server" in p.split(" ", 1)[0]]) == 1
    assert len([p for p in processes if p.startswith("ray::DashboardAgent")]) == 1
    assert out["exported"]


def test_an_explicit_address_joins_like_ray_address() -> None:
    """`ensure_ray(address=cluster.address)` (a test's or the bench's `Cluster`) joins: Ray
    refuses local-only options such as `object_store_memory` for an existing cluster."""
    options = ray_init_options({"address": "127.0.0.1:6379", "log_to_driver": False}, {})
    assert options["address"] == "127.0.0.1:6379"
    assert not LOCAL_ONLY_OPTIONS & options.keys()
    assert ray_init_options({"address": "local"}, {})["object_store_memory"] > 0
