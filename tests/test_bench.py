"""`ray-forwarder bench`: its accounting (pure), the load generator's feed (pure), and one
small real run - real broker, real Ray, every system in its own process - checked for
structure and consistent counts, not for speed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict

import msgpack
import orjson
import pytest

from ray_forwarder.alpaca.codec import decode_frame
from ray_forwarder.alpaca.events import DataItem
from ray_forwarder.core.envelope import dedup_key, encode_envelope, final_bar_key
from ray_forwarder_dev.bench.accounting import envelope_key, match_deliveries, percentiles
from ray_forwarder_dev.bench.kafka_io import read_back
from ray_forwarder_dev.bench.procstats import ProcessSampler, psutil, ray_role, terminate
from ray_forwarder_dev.bench.report import (
    BenchReport,
    CeilingReport,
    RoleReport,
    SystemReport,
    fill_delivery,
    format_report,
)
from ray_forwarder_dev.bench.runner import BenchOptions, SystemSpec, run_all
from ray_forwarder_dev.bench.suite import format_summary, issue9_cases
from ray_forwarder_dev.bench.targets import evaluate
from ray_forwarder_dev.loadgen.feed import FeedSpec, build_feed, frames_for, item_key
from tests.kafka_fixture import consume_all

# --- accounting --------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    assert percentiles([]) is None
    values = [i / 1000 for i in range(1000, 0, -1)]  # 1 ms .. 1000 ms, unsorted
    pct = percentiles(values)
    assert pct is not None
    assert (pct.min, pct.p50, pct.p99, pct.max, pct.count) == (0.001, 0.5, 0.99, 1.0, 1000)
    small = percentiles([3.0, 1.0, 2.0])
    assert small is not None and small.p50 == 2.0 and small.p99 == 3.0


def test_match_uses_first_send_and_first_append() -> None:
    sent = [("a", 10.0), ("b", 10.5), ("a", 11.0), ("c", 12.0)]  # "a" re-sent (a duplicate)
    acked = [("a", 10.2), ("b", 10.9), ("b", 10.8), ("x", 13.0)]  # "b" twice, "x" unknown
    got = match_deliveries(sent, acked)
    assert got.sent == 3 and got.delivered == 2
    assert got.lost == 1  # "c"
    assert got.duplicates == 1 and got.unexpected == 1
    assert sorted(round(x, 6) for x in got.latencies) == [0.2, 0.3]
    assert got.first_sent == 10.0 and got.last_acked == 10.8
    assert got.rate == pytest.approx(2 / 0.8)


def test_match_splits_by_connection_and_measures_the_steady_rate() -> None:
    # connection 0: 100 items sent at 1 ms spacing, appended at 1000/s; connection 1: 50
    # items, the last 10 never appended
    sent = [(f"a{i}", i / 1000, 0) for i in range(100)]
    sent += [(f"b{i}", i / 1000, 1) for i in range(50)]
    acked = [(f"a{i}", 1 + i / 1000) for i in range(100)]
    acked += [(f"b{i}", 1 + i / 500) for i in range(40)]
    got = match_deliveries(sent, acked)
    assert (got.sent, got.delivered, got.lost) == (150, 140, 10)
    a, b = got.streams[0], got.streams[1]
    assert (a.sent, a.delivered, b.sent, b.delivered) == (100, 100, 50, 40)
    assert a.rate == pytest.approx(100 / 1.099)
    assert got.send_rate == pytest.approx(150 / 0.099)
    # the middle 80 % of 140 sorted appends: a steady 1000 + 500 per second
    assert 1200 < got.sustained_rate < 1800


@pytest.mark.parametrize(
    ("append_every", "lose", "kept_up"),
    [(1 / 1000, 0, True), (1 / 600, 0, False), (1 / 1000, 3, False)],
)
def test_kept_up_means_the_rate_was_held_and_nothing_lost(append_every, lose, kept_up) -> None:
    n = 2000
    sent = [(f"k{i}", i / 1000) for i in range(n)]
    acked = [(f"k{i}", 0.05 + i * append_every) for i in range(lose, n)]
    report = SystemReport("ray S=1 P=1", "ray", pid=1, generator_pid=2)
    fill_delivery(report, match_deliveries(sent, acked), rate=1000)
    assert report.kept_up is kept_up
    flat = SystemReport("ray S=1 P=1", "ray", pid=1, generator_pid=2)
    fill_delivery(flat, match_deliveries(sent, acked), rate=0)
    assert flat.kept_up is None  # flat out there is no rate to keep up with


def _system(label: str, rate: float, **fields) -> SystemReport:
    kind = "baseline" if label == "baseline" else "ray"
    s = SystemReport(label, kind, pid=1, generator_pid=2, e2e_items_per_s=rate,
                     sustained_items_per_s=rate, sent=100, delivered=100)  # fmt: skip
    for name, value in fields.items():
        setattr(s, name, value)
    return s


def _run(systems: list[SystemReport], **options) -> BenchReport:
    base = {"events": 100, "symbols": 100, "wire_format": "json", "rate": 0.0, "linger_ms": 50}
    return BenchReport({**base, **options}, None, systems)


def test_targets_say_met_or_not_with_the_gap_and_never_pass_a_missing_run() -> None:
    reports = [
        # 1: one shard at 1.6x the baseline, clean -> met; 1,000 symbols at 1.2x -> gap
        _run([_system("baseline", 80_000), _system("ray S=1 P=1", 128_000)]),
        _run([_system("baseline", 80_000), _system("ray S=1 P=1", 96_000)], symbols=1000),
        # 1 without the ray run: not measured
        _run([_system("baseline", 80_000)], wire_format="msgpack"),
        # 2 and 3 at 20k/s: 31 µs/event, p99 60 ms at linger 50 -> CPU gap, latency met
        _run(
            [
                _system(
                    "ray S=1 P=1",
                    20_000,
                    cpu_us_per_event=31.0,
                    kept_up=True,
                    latency_ms={"p50": 30.0, "p99": 60.0, "max": 80.0},
                )
            ],
            rate=20_000,
            wire_format="msgpack",
        ),
        # 3 at 50k/s, linger 5: did not keep up
        _run(
            [
                _system(
                    "ray S=1 P=1",
                    25_600,
                    kept_up=False,
                    latency_ms={"p50": 900.0, "p99": 5700.0, "max": 6000.0},
                )
            ],
            rate=50_000,
            linger_ms=5,
        ),
        # 4: 10k symbols flat out, shard actor 500 MB, 120 records spooled
        _run(
            [
                _system(
                    "ray S=1 P=1",
                    20_000,
                    spooled=120,
                    roles=[RoleReport("shard actor", 1, 10.0, 500.0)],
                )
            ],
            symbols=10_000,
        ),
    ]
    checks = evaluate(reports)
    by_target: dict[int, list] = defaultdict(list)
    for check in checks:
        by_target[check.target].append(check)
    assert [c.target for c in checks] == sorted(c.target for c in checks)
    assert [c.met for c in by_target[1]] == [True, False, None]
    assert by_target[1][1].gap == "24,000 items/s short"
    assert "1.20x" in by_target[1][1].measured and "NOT MET" in by_target[1][1].verdict
    assert by_target[1][2].verdict == "not measured"
    [cpu] = by_target[2]
    assert (cpu.met, cpu.gap) == (False, "16.0 µs/event over")
    latency_20k, latency_50k = by_target[3]
    assert latency_20k.met is True and latency_20k.goal == "p99 <= 70 ms"
    assert latency_50k.met is False and "did not keep up" in latency_50k.gap
    assert latency_50k.goal == "p99 <= 55 ms, kept up"
    memory = {c.goal: c for c in by_target[4]}
    assert memory["shard actor <= 300 MB"].gap == "200 MB over"
    assert memory["no spool use (Kafka healthy)"].met is False


@pytest.mark.parametrize(
    ("rss", "pss", "met", "measured"),
    [
        (1_100.0, 650.0, True, "650 MB PSS (1,100 MB RSS summed)"),
        (1_100.0, 900.0, False, "900 MB PSS (1,100 MB RSS summed)"),
        (700.0, 0.0, True, "700 MB RSS summed (PSS not readable here)"),  # no smaps: RSS
    ],
)
def test_total_memory_reads_pss_and_shows_the_rss_sum(rss, pss, met, measured) -> None:
    """Target 4's total: the RSS sum counts a library page every Ray process maps once per
    process; PSS splits it between them, so it is what the processes occupy together."""
    ray = _system("ray S=1 P=1", 20_000, peak_rss_mb=rss, peak_pss_mb=pss)
    [total] = [
        c for c in evaluate([_run([ray], symbols=10_000, rate=20_000)])
        if c.goal.startswith("all processes")
    ]  # fmt: skip
    assert (total.met, total.measured) == (met, measured)
    assert total.gap == ("" if met else "100 MB over")


def test_issue9_suite_covers_the_issues_table() -> None:
    runs = issue9_cases(BenchOptions(events=1000, systems=("baseline", "ray:1:1")), 2.0)
    flat = {(r.wire_format, r.symbols) for r in runs if not r.rate}
    assert flat == {("json", 100), ("msgpack", 100), ("json", 1000), ("msgpack", 1000),
                    ("msgpack", 10_000)}  # fmt: skip
    fixed = {(r.rate, r.linger_ms, r.symbols) for r in runs if r.rate}
    assert fixed == {(20_000, 50, 100), (20_000, 5, 100), (50_000, 50, 100), (50_000, 5, 100),
                     (20_000, 50, 10_000)}  # fmt: skip
    assert all(r.events >= r.rate * 2.0 for r in runs)  # long enough to tell "kept up"
    assert all(r.systems == ("baseline", "ray:1:1") for r in runs)
    assert all(r.ceiling == (not r.rate) for r in runs)


def test_summary_flags_a_generator_that_cannot_outrun_the_system() -> None:
    report = _run([_system("baseline", 80_000), _system("ray S=1 P=1", 40_000)])
    report.ceiling = CeilingReport(100, 0.001, 200_000, 1, 2)  # 2.5x the fastest system
    assert report.ceiling_ok is False
    assert "TOO LOW" in format_summary([report])
    report.ceiling = CeilingReport(100, 0.001, 400_000, 1, 2)
    assert report.ceiling_ok is True and "TOO LOW" not in format_summary([report])


def test_a_failed_run_is_shown_failed_and_its_targets_not_measured() -> None:
    failed = _system("ray S=1 P=1", 0, failed="ray did not start", delivered=0, sent=0)
    report = _run([_system("baseline", 80_000), failed], rate=20_000, wire_format="msgpack")
    assert all(c.met is None for c in evaluate([report]))
    assert "FAILED" in format_summary([report]) and "FAILED" in format_report(report)


def _envelope(item: dict, channel: str, *, is_final: bool, key: str | None = None) -> bytes:
    return encode_envelope(
        ingest_ts="2026-01-05T14:30:00.000001Z",
        event_ts=item["t"],
        channel=channel,
        symbol=item["S"],
        seq=1,
        payload=item,
        is_final=is_final,
        source="alpaca",
        key=key or dedup_key(channel, item["S"], item["t"], item),
    )


def test_envelope_matches_the_item_it_carries_whatever_the_key_order() -> None:
    trade = {"T": "t", "S": "SPY", "i": 7, "p": 590.1, "s": 100, "t": "2026-01-05T14:30:01Z"}
    reordered = dict(reversed(list(trade.items())))
    assert envelope_key(_envelope(reordered, "trades", is_final=True)) == item_key(trade)
    assert envelope_key(_envelope({**trade, "i": 8}, "trades", is_final=True)) != item_key(trade)


def test_forwarder_made_records_are_not_feed_items() -> None:
    bar = {"T": "b", "S": "SPY", "o": 1, "h": 2, "l": 1, "c": 2, "v": 9, "vw": 1.5, "n": 3,
           "t": "2026-01-05T14:30:00Z"}  # fmt: skip
    assert envelope_key(_envelope(bar, "bars", is_final=False)) == item_key(bar)
    final = _envelope(bar, "bars", is_final=True, key=final_bar_key("SPY", bar["t"]))
    assert envelope_key(final) is None
    status = orjson.loads(_envelope(bar, "bars", is_final=False))
    status.update(channel="status", symbol=None, source="forwarder")
    assert envelope_key(orjson.dumps(status)) is None


@pytest.mark.parametrize(("ceiling", "verdict"), [(90_000, "TOO LOW"), (300_000, "(ok)")])
def test_report_says_whether_the_generator_outran_the_systems(ceiling, verdict) -> None:
    fast = SystemReport("ray S=2 P=1", "ray", pid=10, generator_pid=11, e2e_items_per_s=40_000,
                        stats={"shards": [{"shard_id": "a", "received": 7},
                                          {"shard_id": "b", "received": 9}]})  # fmt: skip
    slow = SystemReport("baseline", "baseline", pid=12, generator_pid=13, e2e_items_per_s=30_000)
    slow.notes.append("1 records matched no sent item")
    report = BenchReport(
        {"events": 9, "symbols": 2, "wire_format": "json", "rate": 0, "linger_ms": 50},
        CeilingReport(100, 0.001, ceiling, 1, 2),
        [slow, fast],
    )
    text = format_report(report)
    assert report.ceiling_factor == pytest.approx(ceiling / 40_000)
    assert verdict in text.splitlines()[-1]
    assert "! 1 records matched no sent item" in text
    assert "items received per shard: a 7, b 9" in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [("baseline", SystemSpec("baseline")), ("ray:2:3", SystemSpec("ray", 2, 3)),
     ("ray", SystemSpec("ray", 1, 1)), ("ray:4", SystemSpec("ray", 4, 1)),
     ("ray:1:0", SystemSpec("ray", 1, 0)), ("cluster:2:2:0", SystemSpec("cluster", 2, 0, 2)),
     ("cluster:3:3:1", SystemSpec("cluster", 3, 1, 3)),
     ("cluster", SystemSpec("cluster", 2, 1, 2))],
)  # fmt: skip
def test_system_names(text: str, expected: SystemSpec) -> None:
    assert SystemSpec.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "rayy",
        "ray:0",
        "ray:0:1",
        "ray:1:2:3",
        "ray:x",
        "base",
        "cluster:2:2:1:1",
        "cluster:0",
        "cluster:2:0:1",
    ],
)
def test_bad_system_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a system"):
        SystemSpec.parse(text)


_PY = "/venv/bin/python"
_RAY = "/venv/lib/python3.11/site-packages/ray"


@pytest.mark.parametrize(
    ("argv", "role"),
    [
        (["ray::ShardActor.run", "", ""], "shard actor"),
        (["ray::ProducerActor"], "producer actor"),
        (["ray::IDLE"], "idle worker"),
        ([f"{_RAY}/core/src/ray/raylet/raylet", "--raylet_socket_name=/tmp/x",
          f"--python_worker_command={_PY} {_RAY}/_private/workers/default_worker.py"], "raylet"),
        ([f"{_RAY}/core/src/ray/gcs/gcs_server", "--log_dir=/tmp/x"], "gcs_server"),
        ([_PY, "-u", f"{_RAY}/dashboard/agent.py", "--raylet-name=/tmp/x/raylet"],
         "dashboard agent"),
        ([_PY, f"{_RAY}/dashboard/dashboard.py", "--host=127.0.0.1"], "dashboard"),
        (["ray-dashboard-NodeHead-0 (python -B -c ...)"], "dashboard"),
        ([_PY, "-u", f"{_RAY}/_private/runtime_env/agent/main.py"], "runtime env agent"),
        ([_PY, "-u", f"{_RAY}/_private/log_monitor.py"], "log monitor"),
        ([_PY, "-u", f"{_RAY}/autoscaler/_private/monitor.py"], "monitor"),
        ([_PY, "-B", "-c", "from multiprocessing.forkserver import main"], None),
    ],
)  # fmt: skip
def test_ray_processes_are_told_apart_by_program_not_by_arguments(argv, role) -> None:
    assert ray_role(argv) == role


_TREE = """
import pathlib, subprocess, sys, time
flag = pathlib.Path(sys.argv[1])
wait = "import pathlib, sys, time\\nwhile not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.01)"
early = subprocess.Popen([sys.executable, "-c", wait, str(flag), "early"])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "late"])
early.wait()
time.sleep(60)
"""


def test_sampler_follows_the_tree_and_counts_only_processes_of_the_window(tmp_path) -> None:
    flag = tmp_path / "flag"
    root = subprocess.Popen([sys.executable, "-c", _TREE, str(flag)])
    try:
        sampler = ProcessSampler(root.pid, "root", classify=lambda argv: argv[-1])
        deadline = time.monotonic() + 30
        while len(sampler.usage) < 3 and time.monotonic() < deadline:
            sampler.sample()
            time.sleep(0.05)
        assert sorted(u.role for u in sampler.usage.values()) == ["early", "late", "root"]
        early = next(u.pid for u in sampler.usage.values() if u.role == "early")
        flag.touch()
        psutil.wait_procs([psutil.Process(early)], timeout=30)
        sampler.mark_start()
        sampler.mark_end()
        assert sorted(u.role for u in sampler.in_window()) == ["late", "root"]
        assert all(u.peak_rss > 0 and u.cpu_seconds >= 0 for u in sampler.in_window())
        # PSS (Linux): at most the RSS, and the shared interpreter pages make it smaller
        assert all(0 < u.peak_pss <= u.peak_rss for u in sampler.in_window())
        assert {p.pid for p in sampler.leftovers()} == {u.pid for u in sampler.in_window()}
    finally:
        leftovers = sampler.leftovers()
        assert terminate(leftovers, grace=0.1) == 2
        root.wait(10)
    assert not any(p.is_running() for p in leftovers)


# --- the load generator's feed -----------------------------------------------------------


def test_feed_is_deterministic_and_redeliveries_repeat_an_earlier_item_of_the_symbol() -> None:
    spec = FeedSpec(symbols=5, events=2000, duplicate_ratio=0.05, seed=3)
    feed = build_feed(spec)
    assert feed.items == build_feed(spec).items
    assert feed.distinct == 2000
    redeliveries = [i for i, o in enumerate(feed.origin) if o != i]
    assert len(redeliveries) > 20
    for i in redeliveries:
        first = feed.origin[i]
        assert first < i and feed.items[i] == feed.items[first]
    assert {item["T"] for item in feed.items} <= {"t", "q", "b", "u", "c", "x"}


@pytest.mark.parametrize("use_msgpack", [False, True])
@pytest.mark.parametrize(("shards", "per_frame"), [(1, 50), (2, 1), (3, 7), (4, 60)])
def test_frames_split_the_feed_by_subscription_and_decode_to_its_items(
    shards: int, use_msgpack: bool, per_frame: int
) -> None:
    feed = build_feed(FeedSpec(symbols=7, events=300, duplicate_ratio=0.05))
    symbols = sorted({item["S"] for item in feed.items})
    channels = ("trades", "quotes", "bars", "updatedBars")
    seen: list[int] = []
    for shard in range(shards):
        mine = symbols[shard::shards]
        frames = frames_for(feed, dict.fromkeys(channels, mine), use_msgpack=use_msgpack,
                            items_per_frame=per_frame)  # fmt: skip
        assert frames.text is not use_msgpack
        for payload, members in zip(frames.payloads, frames.members, strict=True):
            assert 1 <= len(members) <= per_frame
            events = decode_frame(payload if use_msgpack else payload.decode())
            assert all(isinstance(e, DataItem) for e in events)
            assert [e.payload for e in events] == [feed.items[i] for i in members]
            assert all(e.symbol in mine for e in events)
            seen.extend(members)
    assert sorted(seen) == list(range(len(feed.items)))  # every item exactly once


# --- a small real run --------------------------------------------------------------------


@pytest.mark.timeout(900)
async def test_small_real_run_reports_consistent_counts(kafka_broker, tmp_path) -> None:
    options = BenchOptions(events=3000, symbols=20, wire_format="msgpack", linger_ms=5,
                           systems=("baseline", "ray:1:1"), keep_topics=True)  # fmt: skip
    report = await run_all(options, kafka_broker.bootstrap_servers, tmp_path)

    assert [s.label for s in report.systems] == ["baseline", "ray S=1 P=1"]
    test_pid = os.getpid()
    placements: list[dict[tuple[str, str], int]] = []
    for system in report.systems:
        # nothing lost, nothing doubled, every redelivery dropped by the system itself
        assert system.sent == 3000 and system.delivered == 3000
        assert (system.lost, system.duplicates, system.unexpected) == (0, 0, 0)
        assert system.items_written > system.sent
        assert system.deduplicated == system.items_written - system.sent
        assert system.stats["received"] == system.items_written
        assert system.e2e_items_per_s > 0
        lat = system.latency_ms
        assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"]
        # honest process boundaries: the system, the generator and this test are apart
        pids = {p.pid for p in system.processes}
        assert system.pid in pids
        assert test_pid not in pids and system.generator_pid not in pids
        assert len({system.pid, system.generator_pid, test_pid}) == 3
        assert system.cpu_us_per_event == pytest.approx(
            sum(p.cpu_us_per_event for p in system.processes)
        )
        assert all(p.peak_rss_mb > 0 for p in system.processes)
        assert 0 < system.peak_pss_mb <= system.peak_rss_mb
        assert not any(psutil.pid_exists(pid) and _started_by(pid, system) for pid in pids)
        placements.append(await _check_envelopes(kafka_broker.bootstrap_servers, system.topics))

    # the same symbol lands on the same partition (the product's murmur2 partitioner)
    assert placements[0] == placements[1]
    baseline, on_ray = report.systems
    assert [p.role for p in baseline.processes] == ["baseline"]
    roles = {r.role for r in on_ray.roles}
    assert {"driver", "shard actor", "producer actor", "raylet", "gcs_server"} <= roles

    assert report.ceiling is not None
    assert report.ceiling.items == baseline.items_written
    assert report.ceiling.items_per_s > 0
    assert report.ceiling.generator_pid != report.ceiling.client_pid

    text = format_report(report)
    assert "baseline" in text and "ray S=1 P=1" in text and "ceiling" in text
    assert orjson.loads(orjson.dumps(report.to_dict()))["systems"][1]["label"] == "ray S=1 P=1"
    for system in report.systems:  # flat out: a steady rate, no rate to keep up with
        assert system.kept_up is None and system.sustained_items_per_s > 0
        assert system.send_items_per_s > 0 and system.spooled == 0
        [stream] = system.streams  # one connection, which carried everything
        assert (stream.sent, stream.delivered) == (3000, 3000)
        assert stream.label == "bench-key-0"


async def test_lost_and_doubled_records_are_found_on_real_data(kafka_broker, tmp_path) -> None:
    """A real run (the baseline: no Ray, seconds), then the head of one partition deleted
    and three of its records written once more: accounting the same run again finds
    exactly those lost and doubled."""
    options = BenchOptions(events=2000, symbols=10, wire_format="json", linger_ms=5,
                           systems=("baseline",), ceiling=False, keep_topics=True)  # fmt: skip
    bootstrap = kafka_broker.bootstrap_servers
    [system] = (await run_all(options, bootstrap, tmp_path)).systems
    assert (system.delivered, system.lost, system.duplicates) == (2000, 0, 0)

    await _lose_and_double(bootstrap, system.topics[0], lose=5, double=3)
    sent = msgpack.unpackb((tmp_path / "baseline.sent").read_bytes())["sent"]
    acked, _ = await read_back(bootstrap, system.topics)
    again = match_deliveries(sent, acked)
    assert (again.lost, again.duplicates, again.unexpected) == (5, 3, 0)
    assert again.delivered == 2000 - 5


async def _lose_and_double(bootstrap: str, topic: str, *, lose: int, double: int) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

    partition = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        batch = await consumer.getmany(partition, timeout_ms=10_000, max_records=lose + double)
        head = batch[partition]
    finally:
        await consumer.stop()
    assert len(head) == lose + double
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({partition: RecordsToDelete(head[lose].offset)})
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for record in head[lose:]:
            await producer.send_and_wait(topic, record.value, key=record.key, partition=0)
    finally:
        await producer.stop()


def _started_by(pid: int, system) -> bool:
    """Whether `pid` is still the process the bench sampled (not a reused pid)."""
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    return any(p.pid == pid and p.command and p.command == cmdline[:160] for p in system.processes)


async def _check_envelopes(bootstrap: str, topics: list[str]) -> dict[tuple[str, str], int]:
    """Baseline and product write the same contract: dedup key, seq per (channel, symbol).
    Returns the partition of each (topic kind, symbol)."""
    records = await consume_all(bootstrap, topics, idle_timeout=3.0, timeout=60.0)
    last_seq: dict[tuple[str, str], int] = defaultdict(int)
    placement: dict[tuple[str, str], int] = {}
    for record in records:
        kind = record.topic.rsplit(".", 1)[-1]
        where = placement.setdefault((kind, record.key.decode()), record.partition)
        assert where == record.partition
        envelope = orjson.loads(record.value)
        assert record.key == envelope["symbol"].encode()
        channel, symbol = envelope["channel"], envelope["symbol"]
        assert envelope["seq"] > last_seq[(channel, symbol)]
        last_seq[(channel, symbol)] = envelope["seq"]
        if envelope["is_final"] and channel == "bars":
            assert envelope["key"] == final_bar_key(symbol, envelope["event_ts"])
        else:
            expected = dedup_key(channel, symbol, envelope["event_ts"], envelope["payload"])
            assert envelope["key"] == expected
    return placement


# --- the baseline writes what the product writes ------------------------------------------


async def test_baseline_writes_the_products_records(kafka_broker, kafka_topics) -> None:
    """Same frames through the baseline (into real Kafka) and through the product's
    pipeline: the same topic, record key and envelope, ingest time aside - for JSON with
    Alpaca's short time form (kept as sent) and msgpack Timestamps (rendered), and a
    redelivery dropped by both."""

    from ray_forwarder.config import load_settings
    from ray_forwarder.core.bars import BarFinalizer
    from ray_forwarder.core.dedup import DedupCache
    from ray_forwarder.core.pipeline import EventPipeline
    from ray_forwarder.core.topics import topic_map
    from ray_forwarder.runtime.producer import producer_options
    from ray_forwarder_dev.bench.baseline import Baseline
    from ray_forwarder_dev.bench.kafka_io import create_topics, topic_env

    bootstrap = kafka_broker.bootstrap_servers
    prefix = kafka_topics("baseline")
    await create_topics(bootstrap, prefix)
    settings = load_settings(
        kafka_bootstrap_servers=bootstrap,
        **{k.lower(): v for k, v in topic_env(prefix).items()},
    )
    trade = {"T": "t", "S": "SPY", "i": 1, "p": 590.1, "s": 100, "t": "2026-01-05T14:30:01Z"}
    quote = {"T": "q", "S": "QQQ", "bp": 1.0, "ap": 1.01, "t": "2026-01-05T14:30:02.5Z"}
    bar = {"T": "b", "S": "SPY", "o": 1, "h": 2, "l": 1, "c": 2, "v": 9, "vw": 1.5, "n": 3,
           "t": msgpack.Timestamp(1767623400, 0)}  # fmt: skip
    nan_quote = {"T": "q", "S": "QQQ", "bp": float("nan"), "ap": 1.0, "t": "2026-01-05T14:30:03Z"}
    raw_trade = {"T": "t", "S": "SPY", "i": 2, "p": 1.0, "s": 1, "t": "2026-01-05T14:30:04Z",
                 "c": b"raw"}  # fmt: skip
    frames = [
        (orjson.dumps([trade, quote, trade]), True),  # the second trade: a redelivery
        (msgpack.packb([bar, nan_quote, raw_trade], datetime=False), False),  # 2 unforwardable
    ]

    producer = producer_options(settings).create_producer()
    await producer.start()
    try:
        baseline = Baseline(settings, producer)
        await baseline.warm_up()
        for frame, is_json in frames:
            await baseline.on_frame(frame, is_json)
        await baseline.flush_due(0.0, everything=True)
        await baseline.wait_acked()
    finally:
        await producer.stop()
    assert (baseline.received, baseline.deduplicated, baseline.acked) == (4, 1, 3)
    # what JSON cannot carry is skipped and counted, as the product does, not sent as null
    assert baseline.skipped == {"non_finite_number": 1, "unencodable": 1}

    pipeline = EventPipeline(topic_map(settings), DedupCache(900, 1000), BarFinalizer(35))
    expected = []
    for frame, is_json in frames:
        items = decode_frame(frame.decode() if is_json else frame)
        items = [item for item in items if isinstance(item, DataItem)]
        for record in pipeline.process(items, "ingest", 0.0):
            envelope = orjson.loads(record.value)
            expected.append((record.topic, record.key, {**envelope, "ingest_ts": None}))

    records = await consume_all(bootstrap, sorted(set(topic_env(prefix).values())), 3)
    got = [(r.topic, r.key, {**orjson.loads(r.value), "ingest_ts": None}) for r in records]
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    json_trade = next(e for _, _, e in got if e["channel"] == "trades")
    assert json_trade["payload"]["t"] == "2026-01-05T14:30:01Z"  # as Alpaca sent it


async def test_baseline_dedup_window_is_bounded_like_the_products(
    kafka_broker, kafka_topics
) -> None:
    """DEDUP_MAX_KEYS bounds the baseline's dedup window as it bounds the product's
    DedupCache: beyond it the oldest key is forgotten, so its redelivery goes through, while
    a recent one is still dropped."""
    from ray_forwarder.config import load_settings
    from ray_forwarder.core.dedup import DedupCache
    from ray_forwarder.runtime.producer import producer_options
    from ray_forwarder_dev.bench.baseline import Baseline
    from ray_forwarder_dev.bench.kafka_io import create_topics, topic_env

    bootstrap = kafka_broker.bootstrap_servers
    prefix = kafka_topics("bounded")
    await create_topics(bootstrap, prefix)
    settings = load_settings(
        kafka_bootstrap_servers=bootstrap,
        dedup_max_keys=3,
        **{k.lower(): v for k, v in topic_env(prefix).items()},
    )
    trades = [{"T": "t", "S": "SPY", "i": i, "p": 1.0, "s": 1, "t": "2026-01-05T14:30:01Z"}
              for i in range(5)]  # fmt: skip
    feed = [*trades, trades[0], trades[4], trades[3]]  # 0 is forgotten, 3 and 4 are not
    producer = producer_options(settings).create_producer()
    await producer.start()
    try:
        baseline = Baseline(settings, producer)
        await baseline.warm_up()
        for item in feed:
            baseline.process(orjson.dumps([item]), is_json=True)
    finally:
        await producer.stop()

    product = DedupCache(settings.dedup_ttl_seconds, settings.dedup_max_keys)
    dropped = sum(product.seen(dedup_key("trades", "SPY", t["t"], t), 0.0) for t in feed)
    assert baseline.deduplicated == dropped == 2
    assert baseline.emitted == len(feed) - 2


@pytest.mark.timeout(1200)
async def test_cluster_run_shows_records_from_every_shard(kafka_broker, tmp_path) -> None:
    """Target 5: two shards on a two-node `ray.cluster_utils.Cluster`: every shard's
    connection delivers, each has its own rate, and the actors ran on more than one node."""
    options = BenchOptions(events=2000, symbols=20, wire_format="msgpack", linger_ms=5,
                           systems=("cluster:2:2:1",), ceiling=False)  # fmt: skip
    report = await run_all(options, kafka_broker.bootstrap_servers, tmp_path)

    [system] = report.systems
    assert system.label == "cluster N=2 S=2 P=1"
    assert (system.sent, system.delivered, system.lost, system.duplicates) == (2000, 2000, 0, 0)
    assert sorted(st.label for st in system.streams) == ["bench-key-0", "bench-key-1"]
    assert all(st.delivered > 0 and st.e2e_items_per_s > 0 for st in system.streams)
    assert sum(st.delivered for st in system.streams) == 2000
    assert len(system.stats["shards"]) == 2
    assert sorted(system.stats["nodes"].values()) == ["head", "worker-1"]
    placement = system.stats["placement"]
    assert sorted(placement) == [
        "producer-0",
        *sorted(s["shard_id"] for s in system.stats["shards"]),
    ]
    assert len(set(placement.values())) == 2  # SPREAD used both nodes
    roles = {r.role: r.processes for r in system.roles}
    assert roles["raylet"] == 2  # one raylet per node, all accounted for
    text = format_report(report)
    assert "actors by node: " in text and "per connection (shard)" in text
