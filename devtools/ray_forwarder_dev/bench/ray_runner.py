"""The product under test: `python -m ray_forwarder_dev.bench.ray_runner --expect N` runs the
forwarder exactly as `ray-forwarder run` does (configured by the environment, on a fresh
local Ray started with the same options: no dashboard UI, Ray's metrics agent and the
driver's metrics endpoint), in a process of its own, so that the bench can account for every
process of it: this driver and everything Ray starts under it (gcs_server, raylet, the
dashboard head and agents, the shard and producer actors).

Ray's session files go to a temp dir of this run (`--temp-dir`), and `ray.shutdown()` at
the end stops the cluster this process started - never anybody else's.

Stdout: one JSON line `done` with the forwarder's totals once it has received `--expect`
items and Kafka acknowledged everything it emitted (or nothing moved for `--idle-timeout`
seconds), and the forwarder drained. It then waits for `exit` on stdin before shutting Ray
down, so the bench can take its last CPU and memory reading of the whole system first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

#: A loaded machine can miss Ray's fixed 30 s wait for the raylet to register.
RAY_START_ATTEMPTS = 3


def _data_total(counter) -> int:
    return sum(v for k, v in counter.items() if k != "status")


async def _node_of(actor: Any) -> str:
    """The Ray node an actor runs on (asked of the actor itself: no dashboard needed)."""
    import ray

    return await actor.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id())


async def _placement(forwarder) -> dict[str, str]:
    actors = forwarder.actors()
    nodes = await asyncio.gather(*(_node_of(actor) for actor in actors.values()))
    return dict(zip(actors, nodes, strict=True))


async def run(expect: int, idle_timeout: float, *, placement: bool = False) -> dict[str, Any]:
    """Run the forwarder until it has received `expect` items and Kafka acknowledged all
    it emitted; its totals. With `placement`, also the node of each actor (looked up once
    data flows, so every actor is up)."""
    from ray_forwarder.config import load_settings
    from ray_forwarder.ray.driver import run_forwarder

    settings = load_settings()
    stop = asyncio.Event()
    progress_at = [time.monotonic(), -1]
    forwarders: list[Any] = []
    lookups: list[asyncio.Task[dict[str, str]]] = []

    def progress(snap, _elapsed: float) -> None:
        received = sum(snap.total("received").values())
        if placement and received > 0 and not lookups and forwarders:
            lookups.append(asyncio.ensure_future(_placement(forwarders[0])))
        acked = _data_total(snap.total("acked"))
        if received != progress_at[1]:
            progress_at[:] = [time.monotonic(), received]
        caught_up = received >= expect and acked >= _data_total(snap.total("emitted"))
        if caught_up or time.monotonic() - progress_at[0] > idle_timeout:
            stop.set()

    result = await run_forwarder(
        settings,
        stop=stop,
        progress=progress,
        handle_signals=False,
        on_forwarder=forwarders.append,
    )
    snap = result.snapshot
    out: dict[str, Any] = {
        "received": sum(snap.total("received").values()),
        "deduplicated": sum(snap.total("deduplicated").values()),
        "emitted": _data_total(snap.total("emitted")),
        "acked": _data_total(snap.total("acked")),
        "dropped": sum(snap.total("dropped").values()),
        "spooled": sum(int(s.get("spooled_total", 0)) for s in snap.shards),
        "drained": result.drained,
        "error": result.error,
        "shards": [
            {"shard_id": s.get("shard_id"), "received": sum(s.get("received", {}).values())}
            for s in snap.shards
        ],
    }
    if lookups:
        try:
            out["placement"] = await asyncio.wait_for(lookups[0], 30)
        except Exception as exc:  # the numbers stand without it
            out["placement_error"] = repr(exc)
    return out


def _stop_remains() -> None:
    """What a failed `ray.init()` started and `ray.shutdown()` left running: every process
    under this one (they are all this driver's own)."""
    from ray_forwarder_dev.bench.procstats import psutil, terminate

    terminate(psutil.Process().children(recursive=True), grace=2.0)


def _raylet_failure(temp_dir: str) -> str:
    """The raylet's fatal log line, if it left one (the usual cause on a loaded machine)."""
    log = Path(temp_dir) / "session_latest" / "logs" / "raylet.out"
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no raylet log"
    fatal = [line for line in lines if "Check failed" in line]
    return fatal[0][-300:] if fatal else "the raylet logged no fatal error"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_forwarder_dev.bench.ray_runner")
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, default=30.0)
    parser.add_argument("--temp-dir", required=True, help="Ray's session dir for this run")
    args = parser.parse_args(argv)

    import ray

    from ray_forwarder.ops import logs
    from ray_forwarder.ray.driver import ensure_ray

    logs.configure(os.environ.get("LOG_LEVEL", "WARNING"), component="driver")
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ensure_ray(_temp_dir=args.temp_dir, log_to_driver=False)
            break
        except Exception as exc:  # Ray gives its raylet a fixed 30 s to register
            ray.shutdown()
            _stop_remains()
            if attempt == RAY_START_ATTEMPTS:
                raise
            why = _raylet_failure(args.temp_dir)
            print(f"ray did not start ({exc}; {why}); trying again", file=sys.stderr, flush=True)
    try:
        stats = asyncio.run(run(args.expect, args.idle_timeout))
        print(orjson.dumps({"event": "done", **stats}).decode(), flush=True)
        sys.stdin.readline()  # "exit": the bench has taken its last reading
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
