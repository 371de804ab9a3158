"""The one catalogue of metric names (`metric_catalogue.py`) against the code that
exports them: no Ray, no Kafka. The real scrape of a running forwarder, and the dashboard's
queries against it, are in tests/test_observability.py."""

from __future__ import annotations

import pytest


def test_the_driver_exports_exactly_its_catalogue_entries() -> None:
    """`http.py` renders every driver metric of the catalogue, under the catalogue's name,
    type and labels, and nothing else (no Ray needed)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ray_forwarder.ops.http import SnapshotCollector
    from ray_forwarder.ops.metric_catalogue import CATALOGUE
    from ray_forwarder.ray.stats import ForwarderSnapshot
    from tests.dashboard_queries import parse_scrape

    shard = {"shard_id": "s-0", "state": "subscribed", "subscribed": True, "symbols": 2,
             "received": {"trades": 3}, "emitted": {"trades": 3}, "acked": {"trades": 3},
             "deduplicated": {"trades": 1}, "dropped": {"trades": 1}, "skipped": {"bad": 1},
             "errors_by_code": {500: 1}, "buffered": 1, "in_flight": 2, "spooled": 0,
             "latency": [{"kind": kind, "channel": "trades" if kind == "event" else "",
                          "buckets": [1.0] + [0.0] * 17, "sum": 0.001, "count": 1.0}
                         for kind in ("publish", "receive", "event")]}  # fmt: skip
    snapshot = ForwarderSnapshot([shard], [{"name": "p-0", "ready": True, "errors": 0}])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))
    families = parse_scrape(generate_latest(registry).decode(), "driver")
    expected = {m.name: m for m in CATALOGUE if m.source == "driver"}
    assert set(families) == set(expected)
    for name, family in families.items():
        assert family.kind == expected[name].kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(expected[name].labels), name


def test_the_catalogue_refuses_a_name_both_sources_would_export() -> None:
    from ray_forwarder.ops.metric_catalogue import CATALOGUE, MetricSpec, check_catalogue

    check_catalogue(CATALOGUE)
    bridged = MetricSpec("shard_subscribed", "gauge", ("shard",), "again", "driver")
    with pytest.raises(ValueError, match="shard_subscribed"):
        check_catalogue((*CATALOGUE, bridged))
    clash = MetricSpec("events_received_total", "gauge", (), "x", "driver")
    with pytest.raises(ValueError, match="exported twice"):
        check_catalogue((*CATALOGUE, clash))
