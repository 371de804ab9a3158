"""Multi-node scenario, run by tests/test_multinode.py in its own process (the test session
already has an in-process Ray): a `ray.cluster_utils.Cluster` of three nodes (head and two
workers, one CPU each), two shards and one producer placed with SPREAD; the worker node
holding a shard is removed mid-stream; Ray rebuilds the shard actor on another node and the
stream continues. Prints one JSON line with what happened and what reached Kafka.

Usage: python tests/multinode_scenario.py BOOTSTRAP TOPIC_PREFIX
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
from ray.cluster_utils import Cluster

from ray_forwarder.core.topics import topic_map
from ray_forwarder.ray.driver import Forwarder
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import forwarder_settings, read_back, run_until
from tests.stream_checks import canonical, decode_and_check

SYMBOLS = ["SPY", "QQQ", "AAPL", "MSFT", "NVDA", "AMZN"]
KEYS = {"sim-key-0": "sim-secret-0", "sim-key-1": "sim-secret-1"}
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


class _Broker:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap_servers = bootstrap


def _node_of(actor: Any) -> str:
    return ray.get(
        actor.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()),
        timeout=30,
    )


async def main(bootstrap: str, prefix: str) -> dict[str, Any]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "_system_config": FAST_NODE_DEATH},
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="ray-forwarder-multinode")
    out: dict[str, Any] = {"nodes": len(ray.nodes())}
    forwarders: list[Forwarder] = []
    removed: dict[str, Any] = {}

    def remove_once(_elapsed: float) -> None:
        if removed.get("shard") and "node_after" not in out:
            stats = {s["shard_id"]: s for s in forwarders[0].snapshot.shards}
            if stats.get(removed["shard"], {}).get("restarts"):  # rebuilt and answering
                out["node_after"] = _node_of(forwarders[0].actors()[removed["shard"]])
        if removed or sim.stats()["items"] < 1500:
            return
        fwd = forwarders[0]
        actors = fwd.actors()
        placement = {name: _node_of(actors[name]) for name in actors}
        out["placement_before"] = placement
        by_node = {w.node_id: w for w in workers}
        shard_ids = sorted(n for n in placement if not n.startswith("producer"))
        # a worker node holding a shard, preferably not the producer's too
        candidates = sorted(
            (s for s in shard_ids if placement[s] in by_node),
            key=lambda s: placement[s] == placement["producer-0"],
        )
        if not candidates:
            removed["shard"] = None
            return
        shard = candidates[0]
        key = fwd._specs[shard].key_id
        removed.update(
            shard=shard,
            node=placement[shard],
            conns=sim.call(lambda: sorted(sim.simulator._slots.get(key, ()))),
            last_conn=sim.stats()["connections"],  # connection ids count up from 1
        )
        cluster.remove_node(by_node[placement[shard]])
        removed["at"] = time.monotonic()

    sim_config = SimConfig(symbols=SYMBOLS, rate=400, time_scale=600, total_events=9000,
                           keys=KEYS, seed=31)  # fmt: skip
    with SimulatorThread(sim_config) as sim:
        (k0, s0), (k1, s1) = KEYS.items()
        settings = forwarder_settings(
            _Broker(bootstrap), lambda name: f"{prefix}.{name}", sim,
            alpaca_symbols=",".join(SYMBOLS), alpaca_channels="trades,quotes",
            alpaca_api_key_id=k0, alpaca_secret_key=s0, alpaca_credentials=f"{k1}:{s1}",
            shards=2,
        )  # fmt: skip
        result = await run_until(
            settings, lambda: sim.finished, during=remove_once, settle=3, timeout=75,
            on_forwarder=forwarders.append,
        )  # fmt: skip
        by_conn = sim.sent_by_connection()
        sent = sim.distinct_items()
    out.update(
        removed_shard=removed.get("shard"),
        removed_node=removed.get("node"),
        error=result.error,
        drained=result.drained,
        shards={s["shard_id"]: {k: s.get(k) for k in ("restarts", "epoch", "connects")}
                for s in result.snapshot.shards},
        unreachable=result.snapshot.unreachable,
    )  # fmt: skip
    records = await read_back(
        _Broker(bootstrap), settings, sum(result.snapshot.total("emitted").values())
    )
    try:
        report = decode_and_check(records, topic_map(settings), allow_resends=True)
        out["seq_ok"] = True
    except AssertionError as exc:
        out["seq_ok"] = False
        out["seq_error"] = str(exc)[:300]
        return out
    got = {canonical(e["payload"]) for e in report.data}
    killed = set(removed.get("conns") or ())
    out["sent"] = len(sent)
    out["connections"] = sorted(by_conn)
    out["killed_connections"] = sorted(killed)
    out["missing_elsewhere"] = sum(
        1 for c, recs in by_conn.items() if c not in killed for r in recs
        if canonical(r.item) not in got
    )  # fmt: skip
    tails = []
    for c in killed:
        items = list(dict.fromkeys(canonical(r.item) for r in by_conn.get(c, ())))
        arrived = [item in got for item in items]
        kept = sum(arrived)
        tails.append(
            {"sent": len(items), "kept": kept, "prefix": arrived == sorted(arrived, reverse=True)}
        )
    out["killed_tails"] = tails
    out["foreign"] = len(got - {canonical(item) for item in sent})
    out["after_removal"] = sum(
        1 for c, recs in by_conn.items() if c > removed.get("last_conn", 1 << 30)
        for _ in recs
    )  # fmt: skip
    return out


if __name__ == "__main__":
    started = time.monotonic()
    result = asyncio.run(main(sys.argv[1], sys.argv[2]))
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    ray.shutdown()
