"""The product on several Ray nodes: `python -m ray_forwarder_dev.bench.cluster_runner --nodes N
--expect M --temp-dir DIR` starts a `ray.cluster_utils.Cluster` of N nodes on this machine
(a head and N-1 workers, each with its own raylet and agents, one CPU each; no dashboard),
connects to it,
and runs the forwarder on it exactly as `ray_runner` does on a local Ray: shards and
producers are placed with SPREAD, so with several nodes they land on different raylets and
their records cross between nodes on the way to the producer.

It shows that the forwarder scales out the way it is meant to (one connection per shard,
shards on different nodes); on one machine it cannot show more throughput than a local Ray,
since the nodes share the same cores. Every process of the cluster is a child of this one,
so the bench accounts for all of them, and `cluster.shutdown()` stops exactly them.

Stdout: the same `done` line as `ray_runner`, plus `placement` (actor -> node id) and
`nodes` (node id -> head / worker-N).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

import orjson

from ray_forwarder_dev.bench.ray_runner import RAY_START_ATTEMPTS, _stop_remains, run

#: One CPU per node, as a small KubeRay worker would have; the actors ask for a quarter each.
CPUS_PER_NODE = 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_forwarder_dev.bench.cluster_runner")
    parser.add_argument("--nodes", type=int, default=2, help="Ray nodes, the head included")
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, default=30.0)
    parser.add_argument("--temp-dir", required=True, help="Ray's session dir for this run")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    # Read by Ray at import: workers use this interpreter's environment, not a fresh uv one.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

    import ray
    from ray.cluster_utils import Cluster

    from ray_forwarder.ops import logs
    from ray_forwarder.ray.driver import ensure_ray

    logs.configure(os.environ.get("LOG_LEVEL", "WARNING"), component="driver")
    cluster = _start_cluster(Cluster, args.nodes, args.temp_dir)
    try:
        names = {node.node_id: name for name, node in cluster.named_nodes.items()}
        ensure_ray(address=cluster.address, log_to_driver=False)
        try:
            stats = asyncio.run(run(args.expect, args.idle_timeout, placement=True))
            stats["nodes"] = names
            print(orjson.dumps({"event": "done", **stats}).decode(), flush=True)
            sys.stdin.readline()  # "exit": the bench has taken its last reading
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


class _NamedCluster:
    """A started Cluster and its nodes by name (head, worker-1, ...)."""

    def __init__(self, cluster, workers) -> None:
        self._cluster = cluster
        self.named_nodes = {"head": cluster.head_node}
        self.named_nodes.update({f"worker-{i}": w for i, w in enumerate(workers, 1)})
        self.address = cluster.address

    def shutdown(self) -> None:
        self._cluster.shutdown()


def _start_cluster(cluster_class, nodes: int, temp_dir: str) -> _NamedCluster:
    """Head and workers, one CPU each; on a loaded machine a node can miss Ray's start-up
    deadline, so like `ray_runner` this tries again, after stopping what it started. No
    dashboard: not needed to place or run the actors, and the slowest thing to start."""
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        cluster = None
        try:
            cluster = cluster_class(
                initialize_head=True,
                head_node_args={
                    "num_cpus": CPUS_PER_NODE,
                    "temp_dir": temp_dir,
                    "include_dashboard": False,
                },
            )
            workers = [cluster.add_node(num_cpus=CPUS_PER_NODE) for _ in range(nodes - 1)]
            cluster.wait_for_nodes()
            return _NamedCluster(cluster, workers)
        except Exception as exc:
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.shutdown()
            _stop_remains()
            if attempt == RAY_START_ATTEMPTS:
                raise
            print(f"cluster did not start ({exc}); trying again", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


if __name__ == "__main__":
    main()
