"""The Grafana dashboard's PromQL read against real scrapes — simply, not a PromQL engine.

What it understands: instant-vector selectors (`ray_forwarder_x{a=~"v", b="w"}`, matchers
`=`, `!=`, `=~`, `!~` with Prometheus' anchored regexes), `by (...)` grouping labels,
dashboard variables (`$shard`), Grafana's `label_values(metric, label)`, and plain
aggregations of one selector (`sum(...)`, `count(...)`, `max by (l) (...)`, `min ...`),
which it evaluates. Range functions (`rate`, `increase`) and `histogram_quantile` are not
evaluated; their selectors still are.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

SELECTOR = re.compile(r"\b(ray_forwarder_\w+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*(\w+)(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)")
AGGREGATION = re.compile(
    r"^\s*(?P<op>sum|count|max|min)\s*(?:by\s*\((?P<by>[^)]*)\))?\s*"
    r"\(\s*(?P<selector>ray_forwarder_\w+\s*(?:\{[^}]*\})?)\s*\)\s*(?P<positive>>\s*0)?\s*$"
)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float
    source: str  # which scrape it came from


@dataclass(frozen=True)
class Family:
    name: str
    kind: str
    samples: tuple[Sample, ...]
    source: str


def parse_scrape(text: str, source: str) -> dict[str, Family]:
    """`ray_forwarder_*` families of one scrape, by family name (counters without _total)."""
    families: dict[str, Family] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("ray_forwarder_"):
            continue
        samples = tuple(Sample(s.name, dict(s.labels), s.value, source) for s in family.samples)
        families[family.name] = Family(family.name, family.type, samples, source)
    return families


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]

    def matches(self, sample: Sample) -> bool:
        if sample.name != self.name:
            return False
        for label, op, value in self.matchers:
            actual = sample.labels.get(label, "")
            if op == "=" and actual != value:
                return False
            if op == "!=" and actual == value:
                return False
            if op == "=~" and not re.fullmatch(value, actual):
                return False
            if op == "!~" and re.fullmatch(value, actual):
                return False
        return True

    def select(self, samples: Iterable[Sample]) -> list[Sample]:
        return [sample for sample in samples if self.matches(sample)]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana variables (`$shard`, `${shard}`) by regex values."""
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr


def selectors(expr: str) -> list[Selector]:
    found = []
    for match in SELECTOR.finditer(expr):
        body = match.group(2) or ""
        matchers = tuple(
            (m.group(1), m.group(2), m.group(3).replace('\\"', '"')) for m in MATCHER.finditer(body)
        )
        found.append(Selector(match.group(1), matchers))
    return found


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in GROUPING.findall(expr)
        for label in group.split(",")
        if label.strip()
    }


def label_values(definition: str) -> tuple[str, str] | None:
    """(metric, label) of a Grafana `label_values(metric, label)` variable query."""
    match = LABEL_VALUES.search(definition)
    return (match.group(1), match.group(2)) if match else None


def evaluate(expr: str, samples: Iterable[Sample]) -> dict[tuple[str, ...], float] | None:
    """The result of a plain aggregation of one selector (grouping label values -> value),
    or None when the expression is anything else."""
    match = AGGREGATION.match(expr)
    if match is None:
        return None
    [selector] = selectors(match.group("selector"))
    by = [label.strip() for label in (match.group("by") or "").split(",") if label.strip()]
    groups: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for sample in selector.select(samples):
        groups[tuple(sample.labels.get(label, "") for label in by)].append(sample.value)
    op = match.group("op")
    combine = {"sum": sum, "count": len, "max": max, "min": min}[op]
    result = {key: float(combine(values)) for key, values in groups.items()}  # type: ignore[operator]
    if match.group("positive"):
        result = {key: value for key, value in result.items() if value > 0}
    return result
