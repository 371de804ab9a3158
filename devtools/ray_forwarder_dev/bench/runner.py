"""Orchestration: one load generator and one system under test per run, each in a process
of its own; this process only starts them, samples their CPU and memory, and reads Kafka
afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import msgpack

from ray_forwarder_dev.bench.accounting import match_deliveries
from ray_forwarder_dev.bench.children import Child, ChildFailed
from ray_forwarder_dev.bench.kafka_io import (
    DATA_TOPICS,
    create_topics,
    delete_topics,
    read_back,
    topic_env,
)
from ray_forwarder_dev.bench.procstats import ProcessSampler, terminate
from ray_forwarder_dev.bench.report import (
    BenchReport,
    CeilingReport,
    SystemReport,
    fill_delivery,
    fill_processes,
)
from ray_forwarder_dev.loadgen.feed import BENCH_CHANNELS, bench_symbols

SAMPLE_INTERVAL_S = 0.2
#: A fresh local Ray on a loaded machine can be slow: three start attempts (ray_runner's)
#: of up to two minutes each were seen with a load average of 20 on 2 cores.
STARTUP_TIMEOUT_S = 600.0


#: Ray's raylet dies if its dashboard agent has not registered within 30 s, and reaps
#: workers that take over 60 s to start: both happen on a loaded machine (seen here with a
#: load average of 15 on 2 cores). They only delay a failure; the run itself is unchanged.
RAY_STARTUP_PATIENCE = {
    "RAY_agent_register_timeout_ms": "180000",
    "RAY_worker_register_timeout_seconds": "180",
}


@dataclass(frozen=True)
class BenchOptions:
    events: int = 60_000
    symbols: int = 100
    wire_format: str = "json"
    rate: float = 0.0  # items/s; 0 = flat out
    linger_ms: int = 50
    duplicate_ratio: float = 0.01
    systems: tuple[str, ...] = ("baseline", "ray:1:1")  # "ray:SHARDS:PRODUCERS"
    ceiling: bool = True
    keep_topics: bool = False  # leave the run's topics in Kafka (tests inspect them)
    keep_going: bool = False  # a system that fails is reported as failed, the rest still run
    run_timeout: float = 600.0
    seed: int = 0


@dataclass(frozen=True)
class SystemSpec:
    kind: str  # "baseline" | "ray" | "cluster"
    shards: int = 1
    producers: int = 1
    nodes: int = 1  # "cluster": Ray nodes (raylets) on this machine, the head included

    @classmethod
    def parse(cls, text: str) -> SystemSpec:
        """`baseline`, `ray:S:P` (S shards, P producers on a local Ray; P=0: each shard
        writes to Kafka itself) or `cluster:N:S:P` (the same on a
        `ray.cluster_utils.Cluster` of N nodes on this machine)."""
        if text == "baseline":
            return cls("baseline")
        kind, _, rest = text.partition(":")
        parts = rest.split(":") if rest else []
        counts = 3 if kind == "cluster" else 2
        if (
            kind not in ("ray", "cluster")
            or len(parts) > counts
            or not all(p.isdigit() for p in parts)
            # at least one node and one shard; PRODUCERS=0 (shards write to Kafka) is valid
            or any(int(p) == 0 for p in parts[: counts - 1])
        ):
            raise ValueError(
                f"not a system: {text!r} (use baseline, ray:SHARDS:PRODUCERS or "
                "cluster:NODES:SHARDS:PRODUCERS)"
            )
        if kind == "ray":
            shards, producers = (int(p) for p in [*parts, "1", "1"][:2])
            return cls("ray", shards, producers)
        nodes, shards, producers = (int(p) for p in [*parts, "2", "2", "1"][:3])
        return cls("cluster", shards, producers, nodes)

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return "baseline"
        if self.kind == "cluster":
            return f"cluster N={self.nodes} S={self.shards} P={self.producers}"
        return f"ray S={self.shards} P={self.producers}"

    @property
    def connections(self) -> int:
        return 1 if self.kind == "baseline" else self.shards


def _loadgen_args(options: BenchOptions, connections: int, out: Path) -> list[str]:
    return [
        "--symbols",
        str(options.symbols),
        "--events",
        str(options.events),
        "--duplicate-ratio",
        str(options.duplicate_ratio),
        "--seed",
        str(options.seed),
        "--rate",
        str(options.rate),
        "--connections",
        str(connections),
        "--out",
        str(out),
    ]


def system_env(
    spec: SystemSpec, options: BenchOptions, url: str, bootstrap: str, prefix: str, workdir: Path
) -> dict[str, str]:
    """The product's own configuration variables, the same for the baseline and Ray."""
    keys = [(f"bench-key-{i}", f"bench-secret-{i}") for i in range(spec.connections)]
    return {
        "ALPACA_API_KEY_ID": keys[0][0],
        "ALPACA_SECRET_KEY": keys[0][1],
        "ALPACA_CREDENTIALS": ",".join(f"{k}:{s}" for k, s in keys[1:]),
        "ALPACA_STREAM_URL": url,
        "ALPACA_SYMBOLS": ",".join(bench_symbols(options.symbols)),
        "ALPACA_CHANNELS": ",".join(BENCH_CHANNELS),
        "ALPACA_WIRE_FORMAT": options.wire_format,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SHARDS": str(spec.shards),
        "PRODUCERS": str(spec.producers),
        "PRODUCER_LINGER_MS": str(options.linger_ms),
        "METRICS_PORT": "0",
        "BAR_FINAL_DELAY_SECONDS": "1",
        "SPOOL_DIR": str(workdir / "spool"),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
        **topic_env(prefix),
    }


async def _sample_until(stop: asyncio.Event, *samplers: ProcessSampler) -> None:
    while not stop.is_set():
        for sampler in samplers:
            sampler.sample()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)


async def run_system(
    spec: SystemSpec, options: BenchOptions, bootstrap: str, workdir: Path
) -> SystemReport:
    slug = spec.label.replace(" ", "_").replace("=", "")
    prefix = f"bench.{os.getpid()}.{slug}.{int(time.time())}"
    topics = await create_topics(bootstrap, prefix)
    out = workdir / f"{slug}.sent"
    gen = await Child.start(
        f"{slug}-loadgen",
        "ray_forwarder_dev.loadgen",
        _loadgen_args(options, spec.connections, out),
        workdir,
    )
    sut: Child | None = None
    sampler: ProcessSampler | None = None
    stop_sampling = asyncio.Event()
    ray_dir: Path | None = None
    try:
        ready = await gen.expect("ready", STARTUP_TIMEOUT_S)
        env = system_env(spec, options, ready["url"], bootstrap, prefix, workdir)
        args = ["--expect", str(ready["items"])]
        if spec.kind == "baseline":
            sut = await Child.start(slug, "ray_forwarder_dev.bench.baseline", args, workdir, env)
            sampler = ProcessSampler(sut.pid, "baseline")
        else:
            ray_dir = Path(tempfile.mkdtemp(prefix="rfb-", dir="/tmp"))  # short: unix sockets
            args += ["--temp-dir", str(ray_dir)]
            module = "ray_forwarder_dev.bench.ray_runner"
            if spec.kind == "cluster":
                module = "ray_forwarder_dev.bench.cluster_runner"
                args += ["--nodes", str(spec.nodes)]
            patience = {k: v for k, v in RAY_STARTUP_PATIENCE.items() if k not in os.environ}
            env = patience | env
            sut = await Child.start(slug, module, args, workdir, env)
            sampler = ProcessSampler(sut.pid, "driver")
        gen_sampler = ProcessSampler(gen.pid, "load generator")
        sampling = asyncio.create_task(_sample_until(stop_sampling, sampler, gen_sampler))
        await gen.expect_while(sut, "started", STARTUP_TIMEOUT_S)
        sampler.mark_start()
        gen_sampler.mark_start()
        finished = await gen.expect_while(sut, "finished", options.run_timeout)
        gen_sampler.mark_end()
        done = await sut.expect("done", options.run_timeout)
        sampler.mark_end()
        stop_sampling.set()
        await sampling
        await sut.exit(120)
        leftovers = sampler.leftovers()
        stray = sorted({sampler.usage[p.pid].role for p in leftovers if p.pid in sampler.usage})
        stopped = terminate(leftovers)
        await gen.exit(30)
    finally:
        stop_sampling.set()
        for child in (sut, gen):
            if child is not None:
                child.kill()
        if sampler is not None:
            terminate(sampler.leftovers())
        if ray_dir is not None:
            shutil.rmtree(ray_dir, ignore_errors=True)
    sent_log = msgpack.unpackb(out.read_bytes())
    sent = sent_log["sent"]
    acked, create_time = await read_back(bootstrap, [f"{prefix}.{t}" for t in DATA_TOPICS])
    if not options.keep_topics:
        with contextlib.suppress(Exception):
            await delete_topics(bootstrap, topics)
    report = SystemReport(spec.label, spec.kind, sut.pid, gen.pid, items_written=finished["items"])
    report.topics = [f"{prefix}.{t}" for t in DATA_TOPICS]
    report.stats = {k: v for k, v in done.items() if k != "event"}
    report.deduplicated = int(done.get("deduplicated", 0))
    delivery = match_deliveries(sent, acked)
    fill_delivery(report, delivery, options.rate, sent_log.get("connections"))
    report.spooled = int(done.get("spooled", 0))
    fill_processes(report, sampler.in_window(), report.delivered)
    gen_cpu = sum(u.cpu_seconds for u in gen_sampler.usage.values())
    report.generator_cpu_us_per_event = gen_cpu * 1e6 / report.delivered if report.delivered else 0
    if create_time:
        report.notes.append(f"{create_time} records lacked LogAppendTime (not timed)")
    if spec.connections > 1:
        silent = [st.label for st in report.streams if st.delivered == 0]
        silent += ["?"] * (spec.connections - len(report.streams))
        if silent:
            report.notes.append(f"no records arrived from connection(s) {', '.join(silent)}")
    if finished.get("closed_early"):
        report.notes.append(f"{finished['closed_early']} connection(s) closed before the end")
    if stopped:
        report.notes.append(
            f"{stopped} process(es) outlived the system and were stopped: {', '.join(stray)}"
        )
    if done.get("error"):
        report.notes.append(f"error: {done['error']}")
    return report


def _last_error(text: str) -> str:
    """The most telling line of a child's failure: its last exception line, if any."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines or [""])[-1][:300]


async def run_ceiling(options: BenchOptions, workdir: Path) -> CeilingReport:
    """The generator flat out against a client that reads and discards."""
    out = workdir / "ceiling.sent"
    flat_out = BenchOptions(**{**options.__dict__, "rate": 0.0})
    gen = await Child.start(
        "ceiling-loadgen", "ray_forwarder_dev.loadgen", _loadgen_args(flat_out, 1, out), workdir
    )
    client: Child | None = None
    try:
        ready = await gen.expect("ready", STARTUP_TIMEOUT_S)
        client = await Child.start(
            "null-client",
            "ray_forwarder_dev.loadgen.null_client",
            [ready["url"], "--wire-format", options.wire_format],
            workdir,
        )
        finished = await gen.expect("finished", options.run_timeout)
        await gen.exit(30)
        done = await client.expect("done", 60)
        await client.exit(10)
    finally:
        for child in (client, gen):
            if child is not None:
                child.kill()
    seconds = max(done["last_recv"], finished["last_send"]) - finished["first_send"]
    items = finished["items"]
    return CeilingReport(
        items, seconds, items / seconds if seconds > 0 else 0.0, gen.pid, client.pid
    )


async def run_all(
    options: BenchOptions, bootstrap: str, workdir: Path, on_system=None
) -> BenchReport:
    report = BenchReport(options={**options.__dict__, "systems": list(options.systems)})
    for text in options.systems:
        spec = SystemSpec.parse(text)
        try:
            result = await run_system(spec, options, bootstrap, workdir)
        except ChildFailed as exc:
            if not options.keep_going:
                raise
            # the other runs still count; this one is reported as failed, not as zero
            result = SystemReport(spec.label, spec.kind, 0, 0)
            result.failed = str(exc).splitlines()[0]
            result.notes.append(f"FAILED: {_last_error(str(exc))}")
        report.systems.append(result)
        if on_system is not None:
            on_system(result)
    if options.ceiling:
        report.ceiling = await run_ceiling(options, workdir)
    return report


def bench_main(
    options: BenchOptions,
    json_path: str | None = None,
    suite: str | None = None,
    rate_seconds: float | None = None,
) -> list[BenchReport]:
    """Start (or use) a broker, run one configuration (or a suite of them), print the
    tables (and for a suite the summary and issue #9's targets); optionally write JSON."""
    import orjson

    from ray_forwarder_dev.bench import suite as suites
    from ray_forwarder_dev.bench.report import format_report, format_row
    from ray_forwarder_dev.local_kafka import kafka_for_tools

    for text in options.systems:
        SystemSpec.parse(text)  # fail before starting anything
    if suite:
        seconds = suites.RATE_SECONDS if rate_seconds is None else rate_seconds
        runs = suites.cases(suite, replace(options, keep_going=True), seconds)
    else:
        runs = [options]
    workdir = Path(tempfile.mkdtemp(prefix="ray-forwarder-bench-"))
    reports: list[BenchReport] = []

    async def run_each(bootstrap: str) -> None:
        for number, run in enumerate(runs, 1):
            if len(runs) > 1:
                print(f"run {number}/{len(runs)}: {suites.run_name(run.__dict__)}", flush=True)
            report = await run_all(
                run,
                bootstrap,
                workdir,
                on_system=lambda s: print(f"  done: {format_row(s)}", flush=True),
            )
            reports.append(report)
            if len(runs) > 1:  # each run in full as it ends: a long suite cut short keeps them
                print(f"\n{format_report(report)}\n", flush=True)

    try:
        with kafka_for_tools("bench: starting a local Kafka broker") as bootstrap:
            asyncio.run(run_each(bootstrap))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    text = suites.format_suite(reports, with_runs=False) if suite else format_report(reports[0])
    print(text, flush=True)
    if json_path:
        data = {"reports": [r.to_dict() for r in reports]}
        if suite:
            data["targets"] = [c.__dict__ for c in suites.evaluate(reports)]
        Path(json_path).write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    return reports
