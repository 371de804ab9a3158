"""Observability against the real thing: simulator -> forwarder actors on the session's local
Ray -> real Kafka, with the driver's HTTP server scraped over a socket and Ray's own metrics
export (what Prometheus scrapes on KubeRay) checked for the actors' metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ray_forwarder.core.topics import topic_map
from ray_forwarder.ops.http import HealthServer
from ray_forwarder.ops.metrics import EXPORT_PREFIX, LATENCY_KINDS
from ray_forwarder.ray.driver import Forwarder, plan_shards
from ray_forwarder_dev.sim import SimConfig, SimulatorThread
from tests.forwarder_harness import SIM_KEY, SIM_SECRET, forwarder_settings, read_back
from tests.kafka_fixture import create_topics

SYMBOLS = ["SPY", "QQQ", "AAPL", "MSFT", "NVDA", "AMZN"]

pytestmark = pytest.mark.usefixtures("ray_session")


def _sim(**overrides: Any) -> SimulatorThread:
    values = dict(symbols=SYMBOLS, rate=2000, time_scale=600, keys={SIM_KEY: SIM_SECRET}, seed=21)
    values.update(overrides)
    return SimulatorThread(SimConfig(**values))


class Running:
    """A forwarder (real actors) plus the driver's HealthServer on an ephemeral port, polled
    in the background like `run_forwarder` does. Actor names are unique to the test, so
    series in the shared Ray's metrics export belong to this run only."""

    def __init__(self, settings: Any, tag: str | None = None, producers: int = 1) -> None:
        tag = tag or uuid.uuid4().hex[:8]
        shards = [
            dataclasses.replace(spec, shard_id=f"obs-{tag}-{i}")
            for i, spec in enumerate(plan_shards(settings))
        ]
        names = [f"obs-{tag}-producer-{i}" for i in range(producers)]
        self.forwarder = Forwarder(settings, shards, names)
        self.server = HealthServer(lambda: self.forwarder.snapshot, 0)
        self._poller: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def __aenter__(self) -> Running:
        await self.server.start()
        await self.forwarder.start()
        self._poller = asyncio.create_task(self._poll())
        return self

    async def _poll(self) -> None:
        while True:
            await self.forwarder.poll()
            await asyncio.sleep(0.2)

    async def __aexit__(self, *exc: object) -> None:
        assert self._poller is not None
        self._poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._poller
        try:
            assert await self.forwarder.stop(30)
        finally:
            await self.server.stop()

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as response:
            return response.status, await response.text()


async def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> sample name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _by(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, label: str,
        **match: str) -> Counter[str]:  # fmt: skip
    total: Counter[str] = Counter()
    for labels, value in samples.get(name, []):
        if all(labels.get(k) == v for k, v in match.items()):
            total[labels.get(label, "")] += int(value)
    return total


async def test_metrics_count_what_the_simulator_sent(kafka_broker, kafka_topics) -> None:
    with _sim(total_events=2500, duplicate_ratio=0.05) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS),
        )  # fmt: skip
        async with Running(settings) as run:

            def drained() -> bool:
                snap = run.forwarder.snapshot
                emitted = sum(snap.total("emitted").values())
                acked = sum(snap.total("acked").values())
                return sim.finished and bool(snap.shards) and acked > 0 and acked == emitted

            await _until(drained, 90, "the simulator to finish and Kafka to ack everything")
            await asyncio.sleep(1.5)  # final bars are due 0.5 s later; then one more poll
            status, text = await run.get("/metrics")
            [producer] = run.forwarder.snapshot.producers
            sim_stats = sim.stats()
            sent = sim.distinct_items()
    assert status == 200
    samples = _samples(text)
    received = _by(samples, "ray_forwarder_events_received_total", "channel")
    dedup = _by(samples, "ray_forwarder_events_deduplicated_total", "channel")
    emitted = _by(samples, "ray_forwarder_events_emitted_total", "channel")
    forwarded = _by(samples, "ray_forwarder_events_forwarded_total", "channel")
    assert sim_stats["duplicates"] > 0
    assert sum(received.values()) == sim_stats["items"]  # every item written, dups included
    assert sum(dedup.values()) == sim_stats["duplicates"]
    assert sum(received.values()) - sum(dedup.values()) == len(sent)
    assert forwarded == emitted  # by channel, after the drain
    assert sum(_by(samples, "ray_forwarder_events_dropped_total", "channel").values()) == 0
    assert _by(samples, "ray_forwarder_subscribed", "shard").most_common(1)[0][1] == 1
    assert _by(samples, "ray_forwarder_kafka_ready", "producer").total() == 1
    # Latency histograms: one publish and one receive->ack observation per acknowledged
    # batch (the producer counts the same batches), event->ack by channel, never symbol.
    publish = _by(samples, "ray_forwarder_publish_latency_seconds_count", "shard")
    receive = _by(samples, "ray_forwarder_receive_to_ack_latency_seconds_count", "shard")
    assert publish.total() == receive.total() == producer["batches"] > 0
    for name in ("publish_latency_seconds", "receive_to_ack_latency_seconds"):
        inf = _by(samples, f"ray_forwarder_{name}_bucket", "shard", le="+Inf")
        assert inf == _by(samples, f"ray_forwarder_{name}_count", "shard"), name
        assert sum(v for _, v in samples[f"ray_forwarder_{name}_sum"]) > 0, name
    event = _by(samples, "ray_forwarder_event_to_ack_latency_seconds_count", "channel")
    assert {"trades", "quotes"} <= set(event) <= set(forwarded) - {"status"}
    assert event.total() >= publish.total() - forwarded["status"]  # >= 1 per data batch
    hist_labels = [labels for n, rows in samples.items() if "latency" in n for labels, _ in rows]
    assert hist_labels and all("symbol" not in labels for labels in hist_labels)
    # ...and Kafka holds exactly what /metrics says was forwarded, plus the `stopped`
    # status record the shard writes on its way out, after the scrape (README § Gaps).
    records = await read_back(kafka_broker, settings, sum(forwarded.values()) + 1)
    stopped = [r for r in records if b'"event":"stopped"' in r.value]
    assert len(stopped) == 1
    assert len(records) - len(stopped) == sum(forwarded.values())
    print(f"metrics: {sim_stats['items']} items, {sim_stats['duplicates']} duplicates, "
          f"{len(records)} records forwarded")  # fmt: skip


async def test_healthz_is_503_until_subscribed_and_livez_is_always_200(
    kafka_broker, kafka_topics
) -> None:
    with _sim(total_events=500, rate=500) as sim:
        sim.refuse_connections(True)  # 406: the shard cannot subscribe yet
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS),
            connection_limit_backoff=1.0,
        )  # fmt: skip
        async with Running(settings) as run:
            status, body = await run.get("/healthz")  # before the first poll: no shards yet
            assert status == 503 and '"unavailable"' in body
            await _until(lambda: sim.stats()["refused"] >= 1, 30, "a refused connection")
            await _until(lambda: run.forwarder.snapshot.shards, 10, "a poll")
            status, body = await run.get("/healthz")
            assert status == 503, body
            assert "obs-" in body and "problems" in body
            assert (await run.get("/livez"))[0] == 200
            _, text = await run.get("/metrics")
            assert "ray_forwarder_healthy 0.0" in text

            sim.refuse_connections(False)

            async def healthy() -> bool:
                return (await run.get("/healthz"))[0] == 200

            await _until(healthy, 30, "/healthz 200 after the subscription")
            _, text = await run.get("/metrics")
            assert "ray_forwarder_healthy 1.0" in text
            assert 'ray_forwarder_feed_errors_total{code="406"}' in text

            # Once subscribed: the connection drops and the feed refuses the reconnect.
            sim.refuse_connections(True)
            refused = sim.stats()["refused"]
            assert sim.drop_connections() == 1

            async def unhealthy() -> bool:
                return (await run.get("/healthz"))[0] == 503

            await _until(unhealthy, 30, "/healthz 503 after the drop")
            await _until(lambda: sim.stats()["refused"] > refused, 30, "a refused reconnect")
            status, body = await run.get("/healthz")
            assert status == 503 and "obs-" in body, body
            assert (await run.get("/livez"))[0] == 200
            sim.refuse_connections(False)
            await _until(healthy, 30, "/healthz 200 after the reconnect")
            assert (await run.get("/livez"))[0] == 200


async def test_healthz_reports_kafka_down_while_livez_stays_up(kafka_broker, kafka_topics) -> None:
    if kafka_broker.local is None:
        pytest.fail("this test stops and restarts the local broker")
    with _sim(total_events=300, rate=1000) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS),
            kafka_request_timeout_ms=5000,
        )  # fmt: skip
        async with Running(settings) as run:

            async def status() -> int:
                return (await run.get("/healthz"))[0]

            await _until(lambda: sim.finished, 60, "the simulator to finish")
            await _until(lambda: _eq(status(), 200), 30, "/healthz 200")
            await asyncio.sleep(3.0)  # idle: nothing left to send, only the probe talks
            [before] = run.forwarder.snapshot.producers
            await asyncio.to_thread(kafka_broker.local.stop_broker)
            try:
                started = time.monotonic()
                await _until(lambda: _eq(status(), 503), 30, "/healthz 503 with Kafka down")
                detected = time.monotonic() - started
                _, body = await run.get("/healthz")
                assert "has no Kafka connection" in body
                assert (await run.get("/livez"))[0] == 200
                [during] = run.forwarder.snapshot.producers
                noticed_by = {
                    "probe": during["probe_failures"] - before["probe_failures"],
                    "sends": during["errors"] - before["errors"],
                }
            finally:
                await asyncio.to_thread(kafka_broker.local.start_broker)
            await _until(lambda: _eq(status(), 200), 60, "/healthz 200 after Kafka is back")
    assert noticed_by["probe"] > 0, noticed_by
    print(f"kafka outage noticed by /healthz in {detected:.1f}s ({noticed_by})")


async def _eq(value: Any, expected: Any) -> bool:
    return (await value) == expected


async def _ray_metrics_text() -> AsyncIterator[str]:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                yield await response.text()


async def test_ray_metrics_export_has_the_actor_metrics(kafka_broker, kafka_topics) -> None:
    with _sim(total_events=1500, duplicate_ratio=0.05) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=",".join(SYMBOLS),
        )  # fmt: skip
        async with Running(settings) as run:
            await _until(
                lambda: sim.finished and run.forwarder.snapshot.shards
                and all(s["buffered"] + s["in_flight"] == 0 for s in run.forwarder.snapshot.shards),
                90, "the simulator to finish",
            )  # fmt: skip
            sim_stats = sim.stats()
            [shard] = [s["shard_id"] for s in run.forwarder.snapshot.shards]
            [producer] = run.forwarder.producer_names
            received_name = EXPORT_PREFIX + "shard_events_received_total"
            started = time.monotonic()
            text = ""
            async for text in _ray_metrics_text():  # Ray reports every ~10 s by default
                got = _by(_samples(text), received_name, "shard", shard=shard)
                if got.total() == sim_stats["items"] or time.monotonic() - started > 45:
                    break
                await asyncio.sleep(1.0)
            waited = time.monotonic() - started
    samples = _samples(text)
    assert _by(samples, received_name, "shard", shard=shard).total() == sim_stats["items"]
    dedup = _by(samples, EXPORT_PREFIX + "shard_events_deduplicated_total", "shard", shard=shard)
    assert dedup.total() == sim_stats["duplicates"] > 0
    for name in ("shard_events_forwarded_total", "shard_connects_total"):
        assert _by(samples, EXPORT_PREFIX + name, "shard", shard=shard), name
    for name in ("shard_publish_latency_seconds", "shard_receive_to_ack_latency_seconds",
                 "shard_event_to_ack_latency_seconds"):  # fmt: skip
        count = _by(samples, EXPORT_PREFIX + name + "_count", "shard", shard=shard)
        assert count.total() > 0, name
        inf = _by(samples, EXPORT_PREFIX + name + "_bucket", "shard", shard=shard, le="+Inf")
        assert inf == count, name
    assert _by(samples, EXPORT_PREFIX + "shard_subscribed", "shard", shard=shard)[shard] == 1
    state = _by(samples, EXPORT_PREFIX + "shard_state", "state", shard=shard)
    assert state["subscribed"] == 1 and state.total() == 1
    assert _by(samples, EXPORT_PREFIX + "producer_ready", "producer", producer=producer) == {
        producer: 1
    }
    names = {name for name in samples if name.startswith(EXPORT_PREFIX)}
    assert all("symbol" not in labels for n in names for labels, _ in samples[n])
    print(f"ray metrics export: {len(names)} ray_forwarder_* series names after {waited:.1f}s")


def _dashboard() -> dict[str, Any]:
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return json.loads((root / "dashboards" / "ray-forwarder.json").read_text())


def _panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def _idle_lane_tag(symbol: str, producers: int) -> str:
    """A run tag whose shard id (the key of status records) maps to the same producer lane
    as `symbol`, so that every record goes through one producer and the other stays idle
    (only an idle producer probes Kafka, hence counts probe failures)."""
    from ray_forwarder.runtime.outbox import stable_slot

    while True:
        tag = uuid.uuid4().hex[:8]
        if stable_slot(f"obs-{tag}-0".encode(), producers) == stable_slot(
            symbol.encode(), producers
        ):
            return tag


@pytest.mark.timeout(600)  # a broker outage and Ray's ~10 s export cycle, on a loaded box
async def test_dashboard_panels_evaluate_against_real_scrapes(kafka_broker, kafka_topics) -> None:
    """Every panel's query, read against what Prometheus would hold: the driver's /metrics
    and Ray's metrics export of a running forwarder that went through the faults the
    panels show (malformed frames, a feed error and reconnect, a Kafka outage with drops,
    failed and re-sent batches, failed probes). Each selector must find series, with the
    labels the query uses, from ONE source; no name is exported by both; every forwarder
    series in either scrape is in the catalogue under its source, type and labels; and the
    stat panels' sums count each shard once."""
    from ray_forwarder.ops.metric_catalogue import BY_NAME, CATALOGUE
    from tests.dashboard_queries import (
        evaluate,
        grouping_labels,
        label_values,
        parse_scrape,
        selectors,
        substitute,
    )

    dashboard = _dashboard()
    queries = _panel_queries(dashboard)
    used = {sel.name for _, expr in queries for sel in selectors(expr)}
    symbol = "SPY"
    tag = _idle_lane_tag(symbol, 2)
    local = kafka_broker.local
    assert local is not None, "this test stops and starts the session's local broker"
    with _sim(symbols=[symbol], rate=400, duplicate_ratio=0.05) as sim:
        settings = forwarder_settings(
            kafka_broker, kafka_topics, sim, alpaca_symbols=symbol,
            buffer_max_events=100, spool_max_bytes=0, kafka_request_timeout_ms=3000,
        )  # fmt: skip
        # Topics exist before the start: a 3 s request timeout leaves no room for creation.
        topics = sorted(set(topic_map(settings).values()))
        await create_topics(topics, bootstrap_servers=kafka_broker.bootstrap_servers)
        async with Running(settings, tag=tag, producers=2) as run:
            snap = lambda: run.forwarder.snapshot  # noqa: E731
            await _until(lambda: snap().shards and sum(snap().total("acked").values()) > 50,
                         60, "records acknowledged")  # fmt: skip
            sim.inject_malformed(2)
            sim.send_error(500, "injected by the test")  # and closes: a reconnect
            await _until(lambda: snap().shards[0]["reconnects"] >= 1
                         and snap().shards[0]["skipped"] and snap().shards[0]["subscribed"],
                         60, "the reconnect after the feed error")  # fmt: skip

            def outage() -> dict[str, int]:
                return {
                    "dropped": sum(snap().total("dropped").values()),
                    "batches_failed": snap().shards[0]["batches_failed"],
                    "kafka_errors": sum(p["errors"] for p in snap().producers),
                    "probe_failures": sum(p["probe_failures"] for p in snap().producers),
                }

            await asyncio.to_thread(local.stop_broker)
            try:
                what = "drops, failed batches and failed probes while Kafka is down"
                await _until(lambda: all(outage().values()), 90, what)
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {outage()}") from None
            finally:
                await asyncio.to_thread(local.start_broker)
            await _until(lambda: snap().shards[0]["batches_resent"] > 0, 90, "re-sent batches")
            [shard] = [s["shard_id"] for s in snap().shards]
            variables = {"stream": "stocks", "shard": re.escape(shard), "channel": ".*"}
            needed = {BY_NAME[n.removesuffix("_total").removesuffix("_bucket")].name
                      for n in used}  # fmt: skip
            started = time.monotonic()
            ray_text = ""
            async for ray_text in _ray_metrics_text():  # Ray reports every ~10 s
                present = {name for name, family in parse_scrape(ray_text, "ray").items()
                           if any(s.labels.get("shard") in (shard, None)
                                  for s in family.samples)}  # fmt: skip
                if needed <= present or time.monotonic() - started > 60:
                    break
                await asyncio.sleep(1.0)
            status, driver_text = await run.get("/metrics")
    assert status == 200
    driver = parse_scrape(driver_text, "driver")
    ray_families = parse_scrape(ray_text, "ray")
    # Nothing is exported by both sources; each series is in the catalogue as its source's.
    assert not set(driver) & set(ray_families), set(driver) & set(ray_families)
    for families, source in ((driver, "driver"), (ray_families, "actor")):
        for name, family in families.items():
            entry = BY_NAME.get(name)
            assert entry is not None and entry.source == source, (name, source)
            assert family.kind == entry.kind, name
            for sample in family.samples:
                labels = set(sample.labels) - {"le"}
                if source == "driver":
                    assert labels == set(entry.labels), name
                else:  # Ray adds its own (WorkerId, NodeAddress, SessionName, ...)
                    assert set(entry.labels) <= labels, name
    assert {m.name for m in CATALOGUE if m.source == "driver"} <= set(driver)
    # Every panel query: its selectors find this run's series, from one source only, with
    # every label the query groups by.
    samples = [s for f in (*driver.values(), *ray_families.values()) for s in f.samples]
    for title, expr in queries:
        expr = substitute(expr, variables)
        for selector in selectors(expr):
            found = selector.select(samples)
            assert found, f"{title}: no series for {selector}"
            assert len({s.source for s in found}) == 1, f"{title}: {selector.name} twice"
            missing = grouping_labels(expr) - set(found[0].labels)
            assert not missing, f"{title}: {selector.name} has no label {missing}"
    for variable in dashboard["templating"]["list"]:
        query = label_values(variable.get("definition", ""))
        if query is not None:
            name, label = query
            assert any(label in s.labels for s in samples if s.name == name), variable["name"]
    # The stat panels count each shard and state once (a bridged copy would double them).
    results = {expr: evaluate(substitute(expr, variables), samples) for _, expr in queries}
    stat_panels = {"Shards subscribed": {(): 1.0}, "Connection state": {(shard, "subscribed"): 1.0}}
    checked = [(t, e) for t, e in queries if t in stat_panels]
    assert len(checked) == 3, checked  # sum and count of subscribed shards, and the states
    for title, expr in checked:
        assert results[expr] == stat_panels[title], (title, expr, results[expr])
    histograms = {f"ray_forwarder_{name}_bucket" for name, _ in LATENCY_KINDS.values()}
    assert histograms <= used, histograms - used  # every latency histogram has a panel
    assert "ray_forwarder_shard_overflowing" in used
    print(
        f"dashboard: {len(queries)} queries checked against {len(driver)} driver and "
        f"{len(ray_families)} actor families after {time.monotonic() - started:.1f}s"
    )


def test_state_change_log_lines_carry_shard_context(capsys) -> None:
    import json
    import logging

    from ray_forwarder.ops import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", actor="shard", shard="stocks-3", symbols=42)
        shard_log = logging.getLogger("ray_forwarder.ray.shard")
        shard_log.info("shard %s %s %s", "stocks-3", "subscribed", "channels={'trades': 42}")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    [line] = capsys.readouterr().err.strip().splitlines()
    body = json.loads(line)
    assert body["shard"] == "stocks-3" and body["symbols"] == 42 and body["level"] == "INFO"
    assert "subscribed" in body["msg"]


async def test_overflow_and_recovered_status_events_once_per_transition() -> None:
    """A ShardCore (no Ray, no Kafka) reading the real simulator, with a producer that
    hangs like a dead broker until released: its tiny buffer overflows, then recovers."""
    import orjson

    from ray_forwarder.config import load_settings
    from ray_forwarder.ray.shard import ShardCore

    gate = asyncio.Event()
    delivered: list[tuple[str, bytes, bytes]] = []

    async def send(records: list[tuple[str, bytes, bytes]], _instance: str | None):
        await gate.wait()  # "the broker is down" until the gate opens
        delivered.extend(records)
        return len(records), "receiver"

    with _sim(total_events=3000, rate=3000) as sim:
        settings = load_settings(
            alpaca_api_key_id=SIM_KEY, alpaca_secret_key=SIM_SECRET,
            alpaca_stream_url=sim.url, alpaca_symbols=",".join(SYMBOLS),
            kafka_bootstrap_servers="127.0.0.1:9", bar_final_delay_seconds=0.5,
            buffer_max_events=200, batch_max_events=20, batch_max_in_flight=2,
            spool_max_bytes=0,  # no disk spool: the memory buffer's overflow is dropped
        )  # fmt: skip
        [spec] = plan_shards(settings)
        core = ShardCore(settings, spec, [send])
        runner = asyncio.create_task(core.run())
        try:
            await _until(lambda: core.stats()["overflowing"], 30, "the buffer to overflow")
            await asyncio.sleep(0.5)  # keep dropping for a while: still one overflow event
            assert core.stats()["overflowing"]
            gate.set()
            await _until(lambda: sim.finished, 30, "the simulator to finish")
            await _until(lambda: not core.stats()["overflowing"], 30, "the recovery")
        finally:
            gate.set()
            assert await core.stop(10)
            await asyncio.wait_for(runner, 10)
    stats = core.stats()
    dropped = stats["dropped"]
    assert sum(dropped.values()) > 0 and "status" not in dropped  # status events never drop
    # Nothing else lost: every record the pipeline emitted was delivered or counted dropped.
    assert len(delivered) == sum(stats["emitted"].values()) - sum(dropped.values())
    status = [orjson.loads(v) for t, _k, v in delivered if t == settings.topic_status]
    assert [e["seq"] for e in status] == sorted(e["seq"] for e in status)
    assert all(e["channel"] == "status" and e["source"] == "forwarder" for e in status)
    events = [e["payload"]["event"] for e in status]
    assert events[:3] == ["connected", "authenticated", "subscribed"]
    assert events.count("overflow") == 1 and events.count("recovered") == 1, events
    assert events.index("overflow") < events.index("recovered")
    overflow = status[events.index("overflow")]["payload"]
    recovered = status[events.index("recovered")]["payload"]
    assert overflow["shard"] == spec.shard_id and overflow["buffer_max_events"] == 200
    assert 0 < overflow["dropped"] == sum(overflow["dropped_by_channel"].values())
    assert recovered["dropped"] == sum(dropped.values()) >= overflow["dropped"]
    assert recovered["dropped_by_channel"] == dropped
    assert recovered["overflow_s"] >= 0.5
    print(f"overflow: {events}, {recovered['dropped']} dropped, {len(delivered)} delivered")
