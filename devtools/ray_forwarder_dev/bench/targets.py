"""Issue #9's targets 1-4, checked against what a bench run measured. Pure: no I/O.

Each check names the run it looked at, the measured value, and met / not met with the gap;
a target whose runs are missing is reported as not measured rather than silently passed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ray_forwarder_dev.bench.report import BenchReport, SystemReport

BASELINE = "baseline"
ONE_SHARD = "ray S=1 P=1"  # target 1: one shard, one producer, defaults
SPEEDUP = 1.5  # target 1: one shard >= 1.5x the single process
CPU_US_PER_EVENT = 15.0  # target 2, at 20k items/s
LATENCY_SLACK_MS = {20_000: 20.0, 50_000: 50.0}  # target 3: p99 <= linger + slack
SHARD_RSS_MB = 300.0  # target 4, flat out with 10k symbols
TOTAL_RSS_MB = 800.0  # target 4, a local single-node run (read as PSS, see check_memory)


@dataclass(frozen=True)
class Check:
    target: int
    run: str  # which run it looked at
    goal: str
    measured: str
    met: bool | None  # None: not measured (the run is missing or incomplete)
    gap: str = ""

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "not measured"
        return "met" if self.met else f"NOT MET ({self.gap})" if self.gap else "NOT MET"


def run_name(options: dict) -> str:
    rate = f"{options['rate']:,.0f}/s" if options.get("rate") else "flat out"
    return (
        f"{options['wire_format']}, {options['symbols']:,} symbols, {rate}, "
        f"linger {options['linger_ms']} ms"
    )


def _system(report: BenchReport, label: str) -> SystemReport | None:
    return next((s for s in report.systems if s.label == label), None)


def _clean(s: SystemReport) -> bool:
    return s.lost == 0 and s.duplicates == 0 and s.delivered > 0


def check_speedup(report: BenchReport) -> Check | None:
    """Target 1: one shard flat out >= 1.5x the single process, nothing lost or doubled."""
    o = report.options
    if o.get("rate") or o.get("symbols") not in (100, 1000):
        return None
    base, ray = _system(report, BASELINE), _system(report, ONE_SHARD)
    goal = f">= {SPEEDUP:g}x the baseline, nothing lost or duplicated"
    if base is None or ray is None or not base.delivered or not ray.delivered:
        return Check(1, run_name(o), goal, "needs baseline and ray:1:1", None)
    ratio = ray.e2e_items_per_s / base.e2e_items_per_s
    measured = f"{ratio:.2f}x ({ray.e2e_items_per_s:,.0f} vs {base.e2e_items_per_s:,.0f}/s)"
    problems = []
    if ratio < SPEEDUP:
        missing = SPEEDUP * base.e2e_items_per_s - ray.e2e_items_per_s
        problems.append(f"{missing:,.0f} items/s short")
    for s in (base, ray):
        if not _clean(s):
            problems.append(f"{s.label}: {s.lost} lost, {s.duplicates} duplicated")
    return Check(1, run_name(o), goal, measured, not problems, "; ".join(problems))


def check_cpu(report: BenchReport) -> Check | None:
    """Target 2: all of the product's processes <= 15 µs per event at 20k items/s."""
    o = report.options
    if o.get("rate") != 20_000:
        return None
    ray = _system(report, ONE_SHARD)
    goal = f"<= {CPU_US_PER_EVENT:g} µs/event, all processes"
    if ray is None or not ray.delivered:
        return Check(2, run_name(o), goal, "needs ray:1:1", None)
    cpu = ray.cpu_us_per_event
    gap = f"{cpu - CPU_US_PER_EVENT:.1f} µs/event over" if cpu > CPU_US_PER_EVENT else ""
    return Check(2, run_name(o), goal, f"{cpu:.1f} µs/event", cpu <= CPU_US_PER_EVENT, gap)


def check_latency(report: BenchReport) -> Check | None:
    """Target 3: p99 <= linger + 20 ms at 20k items/s; at 50k it keeps up, p99 <= linger
    + 50 ms."""
    o = report.options
    slack = LATENCY_SLACK_MS.get(int(o.get("rate") or 0))
    if slack is None:
        return None
    ray = _system(report, ONE_SHARD)
    bound = o["linger_ms"] + slack
    must_keep_up = o["rate"] >= 50_000
    goal = f"p99 <= {bound:g} ms" + (", kept up" if must_keep_up else "")
    if ray is None or not ray.latency_ms:
        return Check(3, run_name(o), goal, "needs ray:1:1", None)
    p99 = ray.latency_ms["p99"]
    measured = f"p99 {p99:,.0f} ms, held {ray.sustained_items_per_s:,.0f}/s"
    problems = []
    if p99 > bound:
        problems.append(f"p99 {p99 - bound:,.0f} ms over")
    if ray.kept_up is False:
        problems.append(f"did not keep up ({ray.sustained_items_per_s:,.0f}/s)")
    return Check(3, run_name(o), goal, measured, not problems, "; ".join(problems))


def check_memory(report: BenchReport) -> list[Check]:
    """Target 4: the shard actor <= 300 MB flat out with 10k symbols; no spool while
    Kafka keeps up; a local single-node run <= 800 MB in all."""
    o = report.options
    ray = _system(report, ONE_SHARD)
    if ray is None or not ray.delivered:
        return []
    checks = []
    if o.get("symbols", 0) >= 10_000 and not o.get("rate"):
        shard = ray.role_rss_mb("shard actor")
        gap = f"{shard - SHARD_RSS_MB:,.0f} MB over" if shard > SHARD_RSS_MB else ""
        checks.append(
            Check(
                4,
                run_name(o),
                f"shard actor <= {SHARD_RSS_MB:g} MB",
                f"{shard:,.0f} MB",
                shard <= SHARD_RSS_MB,
                gap,
            )
        )
    if o.get("symbols", 0) >= 10_000 and o.get("rate"):
        # What the processes occupy together: PSS splits each shared page (Ray's and
        # Python's libraries, mapped by every Ray process) between them, where the RSS sum
        # counts it once per process. Both are printed; PSS is the one the target reads.
        total = ray.peak_pss_mb or ray.peak_rss_mb
        measured = f"{total:,.0f} MB PSS ({ray.peak_rss_mb:,.0f} MB RSS summed)"
        if not ray.peak_pss_mb:
            measured = f"{total:,.0f} MB RSS summed (PSS not readable here)"
        gap = f"{total - TOTAL_RSS_MB:,.0f} MB over" if total > TOTAL_RSS_MB else ""
        checks.append(
            Check(
                4,
                run_name(o),
                f"all processes <= {TOTAL_RSS_MB:g} MB",
                measured,
                total <= TOTAL_RSS_MB,
                gap,
            )
        )
    checks.append(
        Check(
            4,
            run_name(o),
            "no spool use (Kafka healthy)",
            f"{ray.spooled} spooled",
            ray.spooled == 0,
            f"{ray.spooled} records spooled" if ray.spooled else "",
        )
    )
    return checks


def evaluate(reports: Iterable[BenchReport]) -> list[Check]:
    """Every check the runs allow, in target order."""
    checks: list[Check] = []
    for report in reports:
        for check in (check_speedup(report), check_cpu(report), check_latency(report)):
            if check is not None:
                checks.append(check)
        checks.extend(check_memory(report))
    return sorted(checks, key=lambda c: c.target)


def format_checks(checks: list[Check]) -> str:
    lines = ["issue #9 targets (this machine, this run):"]
    for c in checks:
        lines.append(f"  {c.target}. {c.run}: {c.goal}: {c.measured} -> {c.verdict}")
    if not checks:
        lines.append("  (no run of this invocation matches a target)")
    return "\n".join(lines)
