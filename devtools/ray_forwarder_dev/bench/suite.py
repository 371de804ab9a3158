"""Suites: the runs a question needs, in one command. `--suite issue9` runs issue #9's
table - flat out in both wire formats with 100 and 1,000 symbols, flat out with 10,000
symbols (the shard's memory), and fixed rates of 20k and 50k items/s at linger 50 and 5 ms
(latency, CPU, and 10,000 symbols at 20k/s for the total memory) - then prints every run, one
summary table and the targets met or not.
"""

from __future__ import annotations

from dataclasses import replace

from ray_forwarder_dev.bench.report import BenchReport, format_report
from ray_forwarder_dev.bench.runner import BenchOptions
from ray_forwarder_dev.bench.targets import evaluate, format_checks, run_name

__all__ = ["cases", "evaluate", "format_suite", "run_name"]

SUITES = ("issue9",)
#: A fixed-rate run lasts about this long (at least --events items), so that its steady
#: middle is long enough to tell whether the system kept up.
RATE_SECONDS = 10.0


def issue9_cases(base: BenchOptions, rate_seconds: float = RATE_SECONDS) -> list[BenchOptions]:
    """The runs of issue #9's table, from `base` (its systems, events, seed, ...)."""
    flat = [
        replace(base, wire_format=wire, symbols=symbols, rate=0.0, linger_ms=50)
        for symbols in (100, 1000)
        for wire in ("json", "msgpack")
    ]
    flat.append(replace(base, wire_format="msgpack", symbols=10_000, rate=0.0, linger_ms=50))

    def at(rate: float, linger: int, symbols: int = 100) -> BenchOptions:
        events = max(base.events, int(rate * rate_seconds))
        return replace(
            base, wire_format="msgpack", symbols=symbols, rate=rate, linger_ms=linger,
            events=events, ceiling=False,
        )  # fmt: skip

    fixed = [at(rate, linger) for rate in (20_000, 50_000) for linger in (50, 5)]
    fixed.append(at(20_000, 50, symbols=10_000))
    return flat + fixed


def cases(name: str, base: BenchOptions, rate_seconds: float = RATE_SECONDS) -> list[BenchOptions]:
    if name == "issue9":
        return issue9_cases(base, rate_seconds)
    raise ValueError(f"no suite {name!r} (known: {', '.join(SUITES)})")


SUMMARY_HEADER = (
    f"{'run':<44} {'system':<22} {'items/s':>8} {'kept up':>7} {'p50':>6} {'p99':>6} "
    f"{'max':>6} {'CPU µs/ev':>9} {'RSS MB':>7} {'PSS MB':>7} {'lost':>5} {'dup':>4}"
)


def format_summary(reports: list[BenchReport]) -> str:
    """One line per system per run: the issue's table."""
    lines = ["summary (latency in ms, send -> broker append; CPU, RSS and PSS: all processes)"]
    lines.append(SUMMARY_HEADER)
    for report in reports:
        name = run_name(report.options)
        for s in report.systems:
            if s.failed:
                lines.append(f"{name:<44} {s.label:<22} FAILED (see its run)")
                continue
            lat = s.latency_ms or {}
            kept = "-" if s.kept_up is None else ("yes" if s.kept_up else "NO")
            lines.append(
                f"{name:<44} {s.label:<22} {s.e2e_items_per_s:8.0f} {kept:>7} "
                f"{lat.get('p50', 0):6.0f} {lat.get('p99', 0):6.0f} {lat.get('max', 0):6.0f} "
                f"{s.cpu_us_per_event:9.1f} {s.peak_rss_mb:7.0f} {s.peak_pss_mb:7.0f} "
                f"{s.lost:>5} {s.duplicates:>4}"
            )
        if report.ceiling is not None and report.ceiling_factor is not None:
            lines.append(
                f"{'':<44} {'(load generator alone)':<22} {report.ceiling.items_per_s:8.0f}"
                f"  = {report.ceiling_factor:.1f}x the fastest system"
                + ("" if report.ceiling_ok else "  TOO LOW: the generator may be the limit")
            )
    return "\n".join(lines)


def format_suite(reports: list[BenchReport], with_runs: bool = True) -> str:
    parts = [format_report(r) for r in reports] if with_runs else []
    parts.append(format_summary(reports))
    parts.append(format_checks(evaluate(reports)))
    return "\n\n".join(parts)
