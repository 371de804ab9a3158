"""The Ray driver: plan shards, create actors, supervise them, serve health and metrics,
and drain cleanly on SIGTERM (what `ray job stop` sends) or when a duration runs out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from ray_forwarder.config import Settings
from ray_forwarder.ops.http import HealthServer
from ray_forwarder.ray.actors import ProducerActor, ShardActor
from ray_forwarder.ray.planning import plan, producer_names
from ray_forwarder.ray.shard import ShardSpec
from ray_forwarder.ray.stats import ForwarderSnapshot
from ray_forwarder.runtime.resume import read_previous_run

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
STATS_TIMEOUT_S = 5.0
#: A shard whose restarted `run()` failed this often in a row without the actor answering
#: in between is taken for permanently dead and re-created (Ray's restart is the norm).
RECREATE_AFTER_FAILURES = 3


class ForwarderError(RuntimeError):
    """The forwarder cannot run (fatal feed error, Kafka unreachable, bad plan)."""


def plan_shards(settings: Settings) -> list[ShardSpec]:
    return [planned.spec for planned in plan(settings)]


#: A local Ray that the forwarder starts for itself (no RAY_ADDRESS) runs only what the
#: forwarder uses (docs/DESIGN.md, "A local Ray"). The dashboard agent (Ray's metrics
#: export port, which the actor metrics need), the log monitor (actor logs on the driver's
#: terminal) and the runtime-env agent start whatever the options say.
LOCAL_RAY_OPTIONS: dict[str, Any] = {
    # No dashboard UI: Ray still starts a head process for usage stats alone, but not the
    # dashboard's dozen module processes (about 1 GB RSS between them).
    "include_dashboard": False,
    # A cap, not an allocation: batches travel inline (below), so the object store holds
    # next to nothing; Ray's default is 30 % of the machine's memory.
    "object_store_memory": 128 * 1024 * 1024,
}
LOCAL_RAY_SYSTEM_CONFIG: dict[str, Any] = {
    # Task events feed the dashboard's task views and the state API, neither of which a
    # local start serves; recording them costs every actor call, and the GCS keeps up to
    # 100,000 of them.
    "task_events_report_interval_ms": 0,
    # No idle workers: Ray prestarts one per CPU for the first driver and keeps up to one
    # per CPU idle (each a Python process of ~60-100 MB); the forwarder's actors start
    # the workers they need.
    "prestart_worker_first_driver": False,
    "num_workers_soft_limit": 0,
}
#: Options that only mean something to a Ray this process starts; joining a cluster they
#: are dropped, whoever passed them.
LOCAL_ONLY_OPTIONS = frozenset(
    {"num_cpus", "include_dashboard", "object_store_memory", "_system_config", "_temp_dir"}
)


def ray_init_options(init_kwargs: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The `ray.init()` keyword arguments: the caller's, over the local start's defaults
    when this process starts Ray, without any local-only option when it joins a cluster."""
    kwargs: dict[str, Any] = {"namespace": "ray-forwarder", "log_to_driver": True}
    joining = init_kwargs.get("address") not in (None, "local")  # e.g. a test's Cluster
    if environ.get("RAY_ADDRESS") or joining:
        kwargs.update({k: v for k, v in init_kwargs.items() if k not in LOCAL_ONLY_OPTIONS})
        return kwargs
    # Without RAY_ADDRESS, always a fresh local Ray: never a stale cluster that a
    # `ray start` once left in /tmp/ray.
    kwargs.update(LOCAL_RAY_OPTIONS, address="local")
    kwargs.update(init_kwargs)
    kwargs["_system_config"] = {**LOCAL_RAY_SYSTEM_CONFIG, **init_kwargs.get("_system_config", {})}
    return kwargs


def ensure_ray(*, environ: Mapping[str, str] | None = None, **init_kwargs: Any) -> None:
    """Join the cluster named by RAY_ADDRESS (set under `ray job submit`) or start a
    local single-node Ray with only what the forwarder needs (`LOCAL_RAY_OPTIONS`).

    `environ` (default: the process's) is where RAY_ADDRESS is looked up; `{}` always
    starts a local Ray."""
    if ray.is_initialized():
        return
    kwargs = ray_init_options(init_kwargs, os.environ if environ is None else environ)
    # Under `uv run`, Ray would otherwise build a fresh uv environment for every worker
    # from the working directory; the driver's own environment is the right one here.
    # Ray reads the variable when it is imported, so set its constant too.
    if os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0") == "0":
        from ray._private import ray_constants

        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    if kwargs.get("address") == "local":
        _start_local_ray(kwargs)
    else:
        ray.init(**kwargs)


#: The raylet waits a fixed 15 s for the dashboard agent (a Python process importing much
#: of Ray) to write its port files, then aborts, and `ray.init()` fails with "timed out
#: during startup" (ray-project/ray#65983; RAY_agent_register_timeout_ms does not extend
#: that wait in Ray 2.60). On a busy machine that happens; a second start usually wins.
LOCAL_START_ATTEMPTS = 3
_STARTUP_TIMEOUT = "timed out during startup"


def _start_local_ray(kwargs: dict[str, Any], attempts: int = LOCAL_START_ATTEMPTS) -> None:
    """`ray.init()` for a local start, tried again when Ray's own startup timed out; what
    a failed attempt started is stopped before the next one."""
    import psutil  # ray[default] ships it; importing ray put it on the path

    for attempt in range(1, attempts + 1):
        with _Descendants(psutil) as started:
            try:
                # A fresh _system_config each time: ray.init() writes the attempt's own
                # object spilling directory into the dict it was given.
                ray.init(**{**kwargs, "_system_config": dict(kwargs.get("_system_config", {}))})
                return
            except Exception as exc:
                if attempt == attempts or _STARTUP_TIMEOUT not in str(exc):
                    raise
                failure = exc
        ray.shutdown()
        _stop_processes(psutil, started.alive())
        log.warning(
            "the local Ray did not start (attempt %d of %d: %s; the raylet's log says why); "
            "starting it again",
            attempt,
            attempts,
            failure,
        )


class _Descendants:
    """Every process that appears under this one while the block runs, polled twice a
    second. The agents of a raylet that aborted are no longer under it once it is gone
    (they are re-parented to init), and, still importing, they would slow the next
    attempt's agents down further; this is how they are found."""

    def __init__(self, psutil: Any, interval: float = 0.5) -> None:
        self._psutil = psutil
        self._interval = interval
        self._before = {p.pid for p in psutil.Process().children(recursive=True)}
        self._seen: dict[int, Any] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="ray-start-watch", daemon=True)

    def __enter__(self) -> _Descendants:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()
        self._look()

    def _poll(self) -> None:
        while not self._done.wait(self._interval):
            self._look()

    def _look(self) -> None:
        with contextlib.suppress(self._psutil.Error):
            for proc in self._psutil.Process().children(recursive=True):
                if proc.pid not in self._before:
                    self._seen.setdefault(proc.pid, proc)

    def alive(self) -> list[Any]:
        """Those still running (the same processes: psutil checks the start time too)."""
        return [p for p in self._seen.values() if p.is_running()]


def _stop_processes(psutil: Any, procs: list[Any], grace: float = 5.0) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@dataclass
class RunResult:
    snapshot: ForwarderSnapshot
    elapsed_s: float
    drained: bool
    error: str | None = None
    stop_reason: str = ""


@dataclass
class Forwarder:
    """Owns the actors of one forwarder run."""

    settings: Settings
    shards: list[ShardSpec]
    producer_names: list[str] = field(default_factory=lambda: ["producer-0"])
    #: Read the previous run's hand-over marks from the status topic (stop/start gaps).
    resume_on_start: bool = True

    def __post_init__(self) -> None:
        self._producers: dict[str, Any] = {}
        self._shards: dict[str, Any] = {}
        self._runs: dict[str, Any] = {}  # shard id -> its run() (or readiness probe) ref
        self._probing: set[str] = set()  # shards whose restarted actor is not answering yet
        self._specs: dict[str, ShardSpec] = {}
        # per shard: seq epoch of its current run(), restarts seen, failures in a row
        self._epochs: dict[str, int] = {}
        self._restarts: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        # per shard: where its data stopped, as last seen (the next incarnation resumes
        # from it: a `restart` gap; the first run from the status topic: `stop_start`)
        self._resume_marks: dict[str, dict[str, Any] | None] = {}
        self.snapshot = ForwarderSnapshot()
        self.run_id = uuid.uuid4().hex[:12]

    async def start(self) -> None:
        for name in self.producer_names:
            self._producers[name] = ProducerActor.options(
                name=self._actor_name(name), scheduling_strategy="SPREAD"
            ).remote(self.settings, name)
        try:
            await asyncio.gather(*(p.start.remote() for p in self._producers.values()))
        except ray.exceptions.RayTaskError as exc:
            raise ForwarderError(_cause(exc)) from None
        previous_epochs: dict[str, int] = {}
        if self.resume_on_start:
            marks, previous_epochs = await read_previous_run(
                self.settings, [spec.shard_id for spec in self.shards]
            )
            self._resume_marks.update(marks)
        for spec in self.shards:
            spec = dataclasses.replace(spec, run_id=self.run_id)
            self._specs[spec.shard_id] = spec
            # above every epoch an earlier run used: seq keeps growing across stop/start
            previous = previous_epochs.get(spec.shard_id)
            self._epochs[spec.shard_id] = 0 if previous is None else previous + 1
            self._restarts[spec.shard_id] = 0
            self._failures[spec.shard_id] = 0
            self._create_shard(spec)

    def _actor_name(self, producer: str) -> str:
        return f"{self.run_id}.{producer}"

    def _create_shard(self, spec: ShardSpec) -> None:
        # Producers by name, not handle: Ray re-runs a restarted actor's constructor with
        # the same arguments, and handles there would be object-store references
        # (ray-project/ray#53727).
        producers = [self._actor_name(name) for name in self.producer_names]
        # SPREAD: shards go to different nodes where there are several, so a KubeRay
        # cluster with more workers spreads its connections over more pods.
        actor = ShardActor.options(scheduling_strategy="SPREAD").remote(
            self.settings, spec, producers
        )
        self._shards[spec.shard_id] = actor
        self._runs[spec.shard_id] = actor.run.remote(
            self._epochs[spec.shard_id],
            self._resume_from(spec.shard_id),
            self._restarts[spec.shard_id] > 0,
        )

    def _resume_from(self, shard_id: str) -> dict[str, Any] | None:
        """What a shard's next `run()` resumes from: a restarted incarnation always opens a
        gap (`{}`: nothing was received yet, so nothing is known to fill); a first run
        only when an earlier run's `stopped` record was found."""
        mark = self._resume_marks.get(shard_id)
        if self._restarts[shard_id] > 0:
            return mark or {}
        return mark

    def _restart_shard(self, shard_id: str, exc: BaseException) -> None:
        """The shard's process died (killed, OOM, node lost): Ray restarts the actor; call
        `run()` on the new incarnation with the next seq epoch, so its seqs continue above
        everything the dead one numbered. The new incarnation reconnects; the old socket
        died with its process (a 406 meanwhile is backed off like any other)."""
        self._epochs[shard_id] += 1
        self._restarts[shard_id] += 1
        self._failures[shard_id] += 1
        log.warning(
            "shard %s actor died (%s); restart %d, seq epoch %d",
            shard_id,
            _cause(exc),
            self._restarts[shard_id],
            self._epochs[shard_id],
        )
        if self._failures[shard_id] >= RECREATE_AFTER_FAILURES:
            log.warning("shard %s: re-creating its actor", shard_id)
            self._failures[shard_id] = 0
            with contextlib.suppress(Exception):
                ray.kill(self._shards[shard_id], no_restart=True)
            self._create_shard(self._specs[shard_id])
        else:
            self._await_incarnation(shard_id)

    def _await_incarnation(self, shard_id: str) -> None:
        """Ask the restarting actor for its pid before calling `run()`: a `run()` sent while
        Ray is still restarting the actor fails ("the actor is restarting") and would cost
        another epoch and count as another restart, though no incarnation ever ran it. A
        failed probe consumed no epoch, so it is simply sent again (see `poll`)."""
        self._probing.add(shard_id)
        self._runs[shard_id] = self._shards[shard_id].pid.remote()

    def actors(self) -> dict[str, Any]:
        """The current actor handles by name (shard ids and producer names): tests and
        tools that need to reach one (its pid, its stats)."""
        return {**self._shards, **self._producers}

    async def poll(self) -> ForwarderSnapshot:
        """Refresh the snapshot; restart shards whose actor died; a shard whose run ended
        with an error (a fatal feed error) is fatal."""
        for shard_id, ref in list(self._runs.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if ready and shard_id in self._probing:
                try:
                    await ref
                except ray.exceptions.ActorUnavailableError:  # still restarting: ask again
                    self._runs[shard_id] = self._shards[shard_id].pid.remote()
                except ray.exceptions.RayActorError as exc:  # died again, or for good
                    self._probing.discard(shard_id)
                    self._restart_shard(shard_id, exc)
                else:
                    self._probing.discard(shard_id)
                    self._runs[shard_id] = self._shards[shard_id].run.remote(
                        self._epochs[shard_id],
                        self._resume_from(shard_id),
                        self._restarts[shard_id] > 0,
                    )
            elif ready:
                try:
                    await ref
                except ray.exceptions.RayActorError as exc:
                    self._restart_shard(shard_id, exc)
                except ray.exceptions.RayError as exc:
                    raise ForwarderError(f"shard {shard_id}: {_cause(exc)}") from None
        snap = ForwarderSnapshot()
        for shard_id, actor in self._shards.items():
            try:
                stats = await asyncio.wait_for(actor.stats.remote(), STATS_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError):
                snap.unreachable.append(f"shard {shard_id}")
            else:
                self._failures[shard_id] = 0
                if stats.get("gap_mark") is not None:
                    self._resume_marks[shard_id] = stats["gap_mark"]
                hosted = stats.pop("producer", None)  # PRODUCERS=0: the shard's own
                if hosted is not None:
                    snap.producers.append(hosted)
                snap.shards.append({**stats, "restarts": self._restarts[shard_id]})
        for name, actor in self._producers.items():
            try:
                snap.producers.append(await asyncio.wait_for(actor.stats.remote(), STATS_TIMEOUT_S))
            except (ray.exceptions.RayError, TimeoutError):
                snap.unreachable.append(f"producer {name}")
        self.snapshot = snap
        return snap

    async def stop(self, timeout: float = 30.0) -> bool:
        """Stop reading, flush every buffer to Kafka, close producers. True if drained."""
        drained = True
        # One deadline for all shards, so the whole drain stays within `timeout` (plus
        # closing the producers) and so within RAY_JOB_STOP_WAIT_TIME_S under `ray job stop`.
        deadline = time.monotonic() + timeout
        if self._shards:
            results = await asyncio.gather(
                *(a.stop.remote(timeout) for a in self._shards.values()), return_exceptions=True
            )
            drained = all(r is True for r in results)
            for ref in self._runs.values():
                try:
                    await asyncio.wait_for(ref, max(0.1, deadline - time.monotonic()))
                except Exception:  # a failed run was already reported by poll()
                    drained = False
        await self.poll_quietly()
        await asyncio.gather(
            *(p.close.remote() for p in self._producers.values()), return_exceptions=True
        )
        for actor in [*self._shards.values(), *self._producers.values()]:
            ray.kill(actor, no_restart=True)
        return drained

    async def poll_quietly(self) -> None:
        with contextlib.suppress(ForwarderError):
            await self.poll()


ProgressFn = Callable[[ForwarderSnapshot, float], None]


async def run_forwarder(
    settings: Settings,
    *,
    shards: list[ShardSpec] | None = None,
    duration: float | None = None,
    stop: asyncio.Event | None = None,
    progress: ProgressFn | None = None,
    serve_http: bool = True,
    handle_signals: bool = True,
    drain_timeout: float = 30.0,
    poll_interval: float = POLL_INTERVAL_S,
    on_forwarder: Callable[[Forwarder], None] | None = None,
) -> RunResult:
    """Run until `duration` passes, `stop` is set, SIGTERM/SIGINT arrives, or a fatal error."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        _install_signal_handlers(loop, stop)
    forwarder = Forwarder(
        settings,
        shards if shards is not None else plan_shards(settings),
        producer_names(settings),
    )
    if on_forwarder is not None:
        on_forwarder(forwarder)
    server = HealthServer(lambda: forwarder.snapshot, settings.metrics_port) if serve_http else None
    started = time.monotonic()
    error: str | None = None
    reason = ""
    try:
        if server is not None:
            await server.start()
        await forwarder.start()
        while True:
            try:
                await asyncio.wait_for(stop.wait(), poll_interval)
                reason = "stop requested"
                break
            except TimeoutError:
                pass
            snap = await forwarder.poll()
            elapsed = time.monotonic() - started
            if progress is not None:
                progress(snap, elapsed)
            if duration is not None and elapsed >= duration:
                reason = f"duration of {duration:g}s reached"
                break
    except ForwarderError as exc:
        error = str(exc)
        reason = "error"
        log.error("forwarder stopping: %s", error)
    log.info("draining (%s)", reason)
    drained = await forwarder.stop(drain_timeout)
    final = forwarder.snapshot
    log.info(
        "stopped %s",
        json.dumps(
            {
                "drained": drained,
                "received": dict(final.total("received")),
                "emitted": dict(final.total("emitted")),
                "acked": dict(final.total("acked")),
                "dropped": dict(final.total("dropped")),
                "restarts": {s["shard_id"]: s.get("restarts", 0) for s in final.shards},
            },
            sort_keys=True,
        ),
    )
    if server is not None:
        await server.stop()
    if handle_signals:
        _remove_signal_handlers(loop)
    return RunResult(forwarder.snapshot, time.monotonic() - started, drained, error, reason)


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Outside the main thread (tests) this fails; the caller then sets `stop` itself.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)


def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(sig)


def _cause(exc: BaseException) -> str:
    """The innermost error's message from a Ray exception, without Ray's traceback noise."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return str(cause) or type(cause).__name__
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
