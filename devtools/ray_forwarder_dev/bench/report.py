"""What one bench invocation measured, as a table for people and JSON for files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ray_forwarder_dev.bench.accounting import Delivery, percentiles
from ray_forwarder_dev.bench.procstats import ProcessUsage

#: The generator must push at least this many times what the fastest system forwards.
CEILING_FACTOR = 3.0


@dataclass
class ProcessReport:
    pid: int
    role: str
    cpu_seconds: float
    cpu_us_per_event: float
    peak_rss_mb: float
    command: str = ""
    peak_pss_mb: float = 0.0


@dataclass
class RoleReport:
    role: str
    processes: int
    cpu_us_per_event: float
    peak_rss_mb: float  # sum of the processes' peaks
    peak_pss_mb: float = 0.0  # the same in PSS (shared pages split between the processes)


#: At a fixed rate, a system kept up if it held at least this share of the rate.
KEPT_UP_SHARE = 0.95


@dataclass
class StreamReport:
    """One connection (one shard of the forwarder): what it carried end to end."""

    connection: int
    label: str  # the API key id it authenticated with
    sent: int
    delivered: int
    e2e_items_per_s: float


@dataclass
class SystemReport:
    label: str
    kind: str  # "baseline" | "ray" | "cluster"
    pid: int  # the system's root process
    generator_pid: int
    items_written: int = 0  # items the generator wrote, redeliveries included
    sent: int = 0  # distinct items written
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    unexpected: int = 0
    deduplicated: int = 0  # the system's own count of dropped redeliveries
    e2e_items_per_s: float = 0.0
    sustained_items_per_s: float = 0.0  # appends/s over the middle 80 % of the run
    send_items_per_s: float = 0.0  # what the generator achieved
    rate: float = 0.0  # the generator's target rate; 0 = flat out
    kept_up: bool | None = None  # at a fixed rate: held >= KEPT_UP_SHARE of it, lost nothing
    spooled: int = 0  # records the system wrote to its disk spool (the baseline has none)
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p99, max, min
    cpu_us_per_event: float = 0.0  # all processes of the system
    peak_rss_mb: float = 0.0  # sum over its processes
    #: The same in PSS: what the processes occupy together (RSS counts a page that N
    #: processes share N times; PSS counts 1/N of it in each).
    peak_pss_mb: float = 0.0
    generator_cpu_us_per_event: float = 0.0
    processes: list[ProcessReport] = field(default_factory=list)
    roles: list[RoleReport] = field(default_factory=list)
    streams: list[StreamReport] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # the system's own counters
    topics: list[str] = field(default_factory=list)  # the run's data topics
    notes: list[str] = field(default_factory=list)
    failed: str = ""  # why the run failed (its numbers are then not measurements)

    def role_rss_mb(self, role: str) -> float:
        """Peak RSS of one role's processes together (0 if it has none)."""
        return sum(r.peak_rss_mb for r in self.roles if r.role == role)


@dataclass
class CeilingReport:
    """The load generator against a client that reads and discards."""

    items: int
    seconds: float
    items_per_s: float
    generator_pid: int
    client_pid: int


@dataclass
class BenchReport:
    options: dict[str, Any]
    ceiling: CeilingReport | None = None
    systems: list[SystemReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ceiling_factor(self) -> float | None:
        best = max((s.e2e_items_per_s for s in self.systems), default=0.0)
        if self.ceiling is None or best <= 0:
            return None
        return self.ceiling.items_per_s / best

    @property
    def ceiling_ok(self) -> bool | None:
        """Whether the generator alone pushed >= CEILING_FACTOR x the fastest system (None:
        not measured)."""
        factor = self.ceiling_factor
        return None if factor is None else factor >= CEILING_FACTOR


def fill_delivery(
    report: SystemReport, delivery: Delivery, rate: float = 0.0, labels: list[str] | None = None
) -> None:
    report.sent = delivery.sent
    report.delivered = delivery.delivered
    report.lost = delivery.lost
    report.duplicates = delivery.duplicates
    report.unexpected = delivery.unexpected
    report.e2e_items_per_s = delivery.rate
    report.sustained_items_per_s = delivery.sustained_rate
    report.send_items_per_s = delivery.send_rate
    report.rate = rate
    if rate > 0:
        held = report.sustained_items_per_s >= KEPT_UP_SHARE * rate
        report.kept_up = held and delivery.lost == 0
    labels = labels or []
    report.streams = [
        StreamReport(
            number,
            labels[number] if number < len(labels) else str(number),
            stream.sent,
            stream.delivered,
            stream.rate,
        )
        for number, stream in sorted(delivery.streams.items())
    ]
    pct = percentiles(delivery.latencies)
    if pct is not None:
        report.latency_ms = {
            "min": pct.min * 1000,
            "p50": pct.p50 * 1000,
            "p99": pct.p99 * 1000,
            "max": pct.max * 1000,
        }
        if pct.min < -0.001:  # the broker time is truncated to ms: -1 ms can happen
            report.notes.append(f"min latency {pct.min * 1000:.1f} ms < 0: the clocks disagree")
    if delivery.unexpected:
        report.notes.append(f"{delivery.unexpected} records matched no sent item")


def fill_processes(report: SystemReport, usage: list[ProcessUsage], events: int) -> None:
    """Per process and per role: CPU µs per delivered event, peak RSS."""
    per_event = 1e6 / events if events else 0.0
    report.processes = [
        ProcessReport(
            u.pid,
            u.role,
            u.cpu_seconds,
            u.cpu_seconds * per_event,
            u.peak_rss / 2**20,
            u.cmdline[:160],
            u.peak_pss / 2**20,
        )
        for u in sorted(usage, key=lambda u: (u.role, u.pid))
    ]
    roles: dict[str, RoleReport] = {}
    for proc in report.processes:
        role = roles.setdefault(proc.role, RoleReport(proc.role, 0, 0.0, 0.0))
        role.processes += 1
        role.cpu_us_per_event += proc.cpu_us_per_event
        role.peak_rss_mb += proc.peak_rss_mb
        role.peak_pss_mb += proc.peak_pss_mb
    report.roles = sorted(roles.values(), key=lambda r: -r.cpu_us_per_event)
    report.cpu_us_per_event = sum(p.cpu_us_per_event for p in report.processes)
    report.peak_rss_mb = sum(p.peak_rss_mb for p in report.processes)
    report.peak_pss_mb = sum(p.peak_pss_mb for p in report.processes)


HEADER = (
    f"{'system':<22} {'items/s':>8} {'held/s':>8} {'kept up':>7} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'max ms':>7} {'sent':>7} {'lost':>5} {'dup':>4} {'dedup':>5} {'CPU µs/ev':>9} "
    f"{'RSS MB':>7} {'PSS MB':>7}"
)


def _kept_up(s: SystemReport) -> str:
    return "-" if s.kept_up is None else ("yes" if s.kept_up else "NO")


def format_row(s: SystemReport) -> str:
    if s.failed:
        return f"{s.label:<22} FAILED: {s.failed[:90]}"
    lat = s.latency_ms
    cols = (
        f"{lat['p50']:7.1f} {lat['p99']:7.1f} {lat['max']:7.1f}"
        if lat
        else f"{'-':>7} {'-':>7} {'-':>7}"
    )
    return (
        f"{s.label:<22} {s.e2e_items_per_s:8.0f} {s.sustained_items_per_s:8.0f} "
        f"{_kept_up(s):>7} {cols} {s.sent:>7} {s.lost:>5} {s.duplicates:>4} "
        f"{s.deduplicated:>5} {s.cpu_us_per_event:9.1f} {s.peak_rss_mb:7.0f} {s.peak_pss_mb:7.0f}"
    )


def format_roles(s: SystemReport) -> list[str]:
    lines = [
        f"  {s.label} (pid {s.pid}), by role: processes, CPU µs/event, peak RSS MB, peak PSS MB"
    ]
    for role in s.roles:
        lines.append(
            f"    {role.role:<18} {role.processes:>3} {role.cpu_us_per_event:9.1f} "
            f"{role.peak_rss_mb:8.0f} {role.peak_pss_mb:8.0f}"
        )
    lines.append(
        f"    {'total':<18} {len(s.processes):>3} {s.cpu_us_per_event:9.1f} {s.peak_rss_mb:8.0f}"
        f" {s.peak_pss_mb:8.0f}"
    )
    lines.append(f"    {'(load generator)':<18} {1:>3} {s.generator_cpu_us_per_event:9.1f}")
    if s.rate > 0:
        lines.append(
            f"    rate {s.rate:,.0f}/s: the generator sent {s.send_items_per_s:,.0f}/s, the "
            f"system held {s.sustained_items_per_s:,.0f}/s (kept up: {_kept_up(s)})"
        )
    if s.spooled:
        lines.append(f"    ! {s.spooled} records went through the disk spool")
    if len(s.streams) > 1:
        lines.append("    per connection (shard): key, items sent, delivered, e2e items/s")
        for st in s.streams:
            lines.append(
                f"      {st.label:<14} {st.sent:>8} {st.delivered:>8} {st.e2e_items_per_s:9.0f}"
            )
    shards = s.stats.get("shards") or []
    if len(shards) > 1:
        lines.append(
            "    items received per shard: "
            + ", ".join(f"{sh['shard_id']} {sh['received']}" for sh in shards)
        )
    placement = s.stats.get("placement") or {}
    if placement:
        nodes = s.stats.get("nodes") or {}
        lines.append(
            "    actors by node: "
            + "; ".join(
                f"{nodes.get(node, node[:8])}: {', '.join(sorted(names))}"
                for node, names in sorted(_by_node(placement).items())
            )
        )
    lines.extend(f"    ! {note}" for note in s.notes)
    return lines


def _by_node(placement: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for actor, node in placement.items():
        out.setdefault(node, []).append(actor)
    return out


def format_report(report: BenchReport) -> str:
    o = report.options
    lines = [
        f"bench: {o['events']} items, {o['symbols']} symbols, {o['wire_format']}, "
        f"rate={o['rate'] or 'flat out'}, linger={o['linger_ms']} ms",
        "items/s = distinct items in Kafka / (first generator send -> last broker append);",
        "held/s = broker appends/s over the middle 80 % of the items (kept up: >= 95 % of",
        "the rate, nothing lost);",
        "latency = generator send -> broker LogAppendTime; CPU per event delivered, all",
        "processes of the system (load generator apart); RSS = sum of per-process peaks",
        "(PSS: the same with shared pages split between the processes that map them)",
        "",
        HEADER,
    ]
    lines.extend(format_row(s) for s in report.systems)
    lines.append("")
    for s in report.systems:
        lines.extend(format_roles(s))
    if report.ceiling is not None:
        c = report.ceiling
        factor = report.ceiling_factor
        verdict = ""
        if factor is not None:
            ok = "ok" if report.ceiling_ok else f"TOO LOW: under {CEILING_FACTOR:g}x"
            verdict = f" = {factor:.1f}x the fastest system ({ok})"
        lines.append("")
        lines.append(
            f"load generator ceiling (null client, one connection): "
            f"{c.items_per_s:,.0f} items/s{verdict}"
        )
    return "\n".join(lines)
