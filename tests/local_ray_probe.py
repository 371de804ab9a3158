"""Run by tests/test_local_ray.py in a process of its own: start a local Ray the way
`ray-forwarder run` does (`ensure_ray()` without RAY_ADDRESS), place one actor that records
a `ray.util.metrics` counter, and print one `RESULT {json}` line: the command lines of every
process under this one, and whether Ray's metrics export port served the counter.

argv: Ray's temp dir for this run (so its session files stay in the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

EXPORT_WAIT_S = 60.0  # Ray's agent reports every 10 s; a loaded machine takes longer
METRIC = "local_ray_probe_calls"


def main(temp_dir: str) -> None:
    import ray

    from ray_forwarder.ray.driver import ensure_ray

    ensure_ray(_temp_dir=temp_dir, log_to_driver=False)

    @ray.remote(num_cpus=0.25)
    class Probe:
        def __init__(self) -> None:
            from ray.util.metrics import Counter

            self._calls = Counter(METRIC, "calls of the local Ray probe")

        def call(self) -> int:
            self._calls.inc()
            return os.getpid()

    probe = Probe.remote()
    actor_pid = ray.get(probe.call.remote())
    port = ray._private.worker.global_worker.node.metrics_export_port
    exported, deadline = False, time.monotonic() + EXPORT_WAIT_S
    while not exported and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                exported = f"ray_{METRIC}_total" in r.read().decode()
        except OSError:
            pass
        if not exported:
            time.sleep(1.0)
    import psutil  # ray[default] ships it; importing ray put it on the path

    processes, rss_mb = [], {}
    for proc in psutil.Process().children(recursive=True):
        try:
            command = " ".join(proc.cmdline()) or proc.name()
            rss_mb[command[:80]] = round(proc.memory_info().rss / 2**20, 1)
        except psutil.Error:
            continue
        processes.append(command)
    result = {"actor_pid": actor_pid, "exported": exported, "processes": processes}
    result["rss_mb"] = rss_mb  # for the reader of the test's output: what each one costs
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
