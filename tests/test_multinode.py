"""Multi-node: a 3-node `ray.cluster_utils.Cluster` in a subprocess (tests/multinode_scenario.py)
loses the worker node holding a shard; the shard is rebuilt on another node and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_removing_a_node_rebuilds_its_shard_elsewhere(kafka_broker) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_DEDUP_LOGS="0")
    prefix = f"multinode.{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "multinode_scenario.py"),
         kafka_broker.bootstrap_servers, prefix],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
    assert proc.returncode == 0 and lines, "the scenario failed (its output is above)"
    out = json.loads(lines[-1].removeprefix("RESULT "))
    print(json.dumps(out, indent=1))
    assert out["nodes"] == 3
    placement = out["placement_before"]
    shards = [name for name in placement if not name.startswith("producer")]
    assert len(shards) == 2 and len({placement[s] for s in shards}) == 2, "shards not spread"
    shard = out["removed_shard"]
    assert shard, f"no shard on a worker node: {placement}"
    assert out.get("node_after") not in (None, out["removed_node"]), "not rebuilt elsewhere"
    assert out["error"] is None and out["drained"]
    assert out["shards"][shard]["restarts"] >= 1 and out["shards"][shard]["epoch"] >= 1
    assert out["seq_ok"], out.get("seq_error")
    assert out["missing_elsewhere"] == 0  # everything but the removed socket's tail arrived
    assert out["foreign"] == 0
    assert all(t["prefix"] for t in out["killed_tails"])
    assert out["after_removal"] > 0, "the stream did not continue after the removal"
