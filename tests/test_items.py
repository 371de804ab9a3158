"""Issue 8 §1: whatever an item holds, it becomes one record or one counted skip, and its
frame-mates go on. Regression tests, one per input the issue lists (each raised, reconnected
or forwarded the item unchanged before), through the real decode -> pipeline path; the
session's frame-mates-before-an-error rule against a scripted WebSocket feed."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from typing import Any

import msgpack
import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from ray_forwarder.alpaca import DataItem, Skipped, decode_frame
from ray_forwarder.config import Settings
from ray_forwarder.core.bars import BarFinalizer
from ray_forwarder.core.dedup import DedupCache
from ray_forwarder.core.pipeline import EventPipeline, OutRecord, Sequencer
from ray_forwarder.core.topics import topic_map
from ray_forwarder.runtime.session import AlpacaSession, SessionConfig

TS = "2026-01-05T14:30:01.123456789Z"
TRADE = {"T": "t", "S": "SPY", "i": 7, "x": "V", "p": 470.5, "s": 100, "c": ["@"], "z": "B"}


def _trade(i: int, **fields: Any) -> dict[str, Any]:
    return {**TRADE, "i": i, "t": TS, **fields}


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


class Run:
    """decode -> pipeline, the way a shard wires them (skips counted in one place)."""

    def __init__(self, allowed: list[str] | None = None) -> None:
        self.pipeline = EventPipeline(
            topic_map(Settings()),
            DedupCache(60.0, 10_000),
            BarFinalizer(10.0),
            allowed_symbols=allowed,
        )

    def frame(self, frame: bytes | str) -> list[dict[str, Any]]:
        items: list[DataItem] = []
        for event in decode_frame(frame):
            if isinstance(event, DataItem):
                items.append(event)
            elif isinstance(event, Skipped):
                self.pipeline.skip(event)
        records = self.pipeline.process(items, "2026-01-05T14:30:02.000000Z", 0.0)
        return [orjson.loads(r.value) for r in records]

    @property
    def skipped(self) -> Counter[str]:
        return self.pipeline.counters.skipped


def _mp(*items: Any) -> bytes:
    return msgpack.packb(list(items), datetime=False)


def _js(*items: Any) -> str:
    return orjson.dumps(list(items)).decode()


def _assert_only_mates(envelopes: list[dict[str, Any]], run: Run, reason: str) -> None:
    """The good items on both sides of the bad one came out, numbered as if it never was."""
    assert [e["payload"]["i"] for e in envelopes] == [1, 3]
    assert [e["seq"] for e in envelopes] == [1, 2]
    assert run.skipped == Counter({reason: 1})
    assert len(run.pipeline.dedup) == 2


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"blob": b"\x00\x01"}, "unencodable"),  # msgpack bin
        ({"ext": msgpack.ExtType(5, b"x")}, "unencodable"),
        ({"r": msgpack.Timestamp(2**62, 0)}, "unencodable"),  # a Timestamp beyond calendars
        ({"m": {1: "one"}}, "unencodable"),  # map with a non-string key
        ({"deep": _nested(300)}, "unencodable"),  # beyond orjson's 254 levels
        ({"c": _nested(300)}, "bad_field_type"),  # conditions that are not strings
        ({"p": math.nan}, "non_finite_number"),
        ({"p": math.inf}, "non_finite_number"),
        ({"extra": [1.0, -math.inf]}, "non_finite_number"),
        ({"t": msgpack.Timestamp(2**62, 0)}, "bad_timestamp"),  # OSError from datetime
        ({"t": msgpack.Timestamp(-(2**62), 0)}, "bad_timestamp"),
        ({"p": "470.5"}, "bad_field_type"),
        ({"s": True}, "bad_field_type"),
    ],
)
def test_a_bad_msgpack_item_is_skipped_and_its_frame_mates_forwarded(bad, reason) -> None:
    run = Run()
    envelopes = run.frame(_mp(_trade(1), _trade(2, **bad), _trade(3)))
    _assert_only_mates(envelopes, run, reason)


@pytest.mark.parametrize(
    ("t", "reason"),
    [
        ("2026-99-99T14:99:99Z", "bad_timestamp"),
        ("2026-AB-05T14:30:00Z", "bad_timestamp"),
        ("2026-02-30T14:30:00Z", "bad_timestamp"),
        ("2026-01-05T24:00:00Z", "bad_timestamp"),
        ("\u0662\u0660\u0662\u0666-01-05T14:30:00Z", "bad_timestamp"),  # Arabic-Indic year
        ("2026-01-05T14:30:00.\u0661\u0662Z", "bad_timestamp"),  # Arabic-Indic fraction
        ("2026-01-05T14:30:00+99:00", "bad_timestamp"),
        ("2026-01-05T14:30:00.1234567890Z", "bad_timestamp"),  # ten fractional digits
    ],
)
def test_a_timestamp_that_is_not_a_real_instant_is_skipped(t: str, reason: str) -> None:
    run = Run()
    envelopes = run.frame(_js(_trade(1), _trade(2, t=t), _trade(3)))
    _assert_only_mates(envelopes, run, reason)


@pytest.mark.parametrize(
    "symbol",
    ["SP Y", "SPY\x00", "SP:Y", "SP\u00ddY", "A" * 33, "", "*", "SPY\n", 5, ["SPY"]],
)
def test_a_symbol_that_is_not_a_feed_symbol_is_skipped(symbol: object) -> None:
    run = Run()
    envelopes = run.frame(_js(_trade(1), _trade(2, S=symbol), _trade(3)))
    _assert_only_mates(envelopes, run, "bad_symbol")


@pytest.mark.parametrize("symbol", ["BRK.B", "BTC/USD", "AAPL240119C00100000", "A" * 32])
def test_feed_symbols_of_every_kind_pass(symbol: str) -> None:
    [envelope] = Run().frame(_js(_trade(1, S=symbol)))
    assert envelope["symbol"] == symbol


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("t", "p", "470.5"),
        ("t", "i", 7.0),
        ("t", "c", [1]),
        ("t", "x", 5),
        ("q", "bs", "3"),
        ("q", "ap", None),
        ("b", "v", "10"),
        ("b", "n", 1.5),
        ("s", "sc", 1),
        ("l", "u", "480"),
        ("c", "oc", ["@", 5]),
        ("x", "a", ["C"]),
        ("i", "p", {"v": 1}),
    ],
)
def test_documented_fields_of_the_wrong_type_are_skipped(kind, field, value) -> None:
    item = {"T": kind, "S": "SPY", "t": TS, field: value}
    run = Run()
    assert run.frame(_js(item)) == []
    assert run.skipped == Counter({"bad_field_type": 1})


def test_extra_fields_and_missing_optional_fields_are_forwarded() -> None:
    """Lenient where Alpaca promises nothing: unknown fields, absent fields, and the other
    feeds' shapes (fractional crypto sizes, an options trade's single condition string)."""
    items = [
        {"T": "t", "S": "SPY", "t": TS, "p": 470, "future_field": {"a": [1, "b"]}},
        {"T": "t", "S": "BTC/USD", "t": TS, "p": 97000.5, "s": 0.0012, "tks": "B", "i": 1},
        {"T": "t", "S": "AAPL240119C00100000", "t": TS, "p": 1.5, "s": 1, "c": "I"},
        {"T": "q", "S": "SPY", "t": TS, "c": None},
    ]
    assert len(Run().frame(_js(*items))) == 4


def test_a_msgpack_timestamp_outside_t_is_rendered_like_t() -> None:
    [envelope] = Run().frame(_mp(_trade(1, r=msgpack.Timestamp(1767623401, 5))))
    assert envelope["payload"]["r"] == "2026-01-05T14:30:01.000000005Z"


def test_json_nesting_beyond_the_encoder_limit_is_skipped() -> None:
    run = Run()
    frame = "[" + _js(_trade(1))[1:-1] + ',{"T":"t","S":"SPY","t":"' + TS + '","deep":'
    frame += "[" * 300 + "]" * 300 + "}," + _js(_trade(3))[1:-1] + "]"
    _assert_only_mates(run.frame(frame), run, "unencodable")


def test_an_unencodable_item_leaves_no_trace_in_dedup_or_seq() -> None:
    """Its redelivery, now clean, is not a duplicate; seq continues densely."""
    run = Run()
    assert run.frame(_mp(_trade(1, blob=b"x"))) == []
    assert len(run.pipeline.dedup) == 0 and run.pipeline.sequencer.snapshot() == {}
    [envelope] = run.frame(_mp(_trade(1)))
    assert envelope["seq"] == 1


def test_items_for_unsubscribed_symbols_are_skipped() -> None:
    run = Run(allowed=["SPY"])
    envelopes = run.frame(_js(_trade(1), _trade(2, S="JUNK"), _trade(3)))
    _assert_only_mates(envelopes, run, "unsubscribed_symbol")
    assert set(run.pipeline.sequencer.snapshot()) == {("trades", "SPY")}


def test_the_wildcard_sequencer_is_bounded_and_seq_stays_increasing() -> None:
    """LRU bound: the least recently used key is forgotten; when it returns, it numbers on
    from above everything forgotten, so seq per key still only grows (it may jump)."""
    seq = Sequencer(max_keys=2)
    assert [seq.next("trades", s) for s in ("A", "A", "B")] == [1, 2, 1]
    assert seq.next("trades", "A") == 3  # A is now the most recently used
    assert seq.next("trades", "C") == 1 and seq.evicted == 1  # B (last 1) forgotten
    assert len(seq) == 2
    assert seq.next("trades", "B") == 2  # above the 1 it had; A (last 3) forgotten now
    assert seq.next("trades", "A") == 4  # above the 3 it had
    assert seq.evicted == 3 and len(seq) == 2


def test_a_wildcard_pipeline_bounds_its_sequencer_and_a_symbol_list_does_not_need_to() -> None:
    assert Run(allowed=None).pipeline.sequencer._max_keys is not None
    assert Run(allowed=["SPY"]).pipeline.sequencer._max_keys is None


def test_bar_finals_of_items_with_timestamps_outside_t_encode() -> None:
    run = Run()
    bar = {"T": "b", "S": "SPY", "t": TS, "o": 1.0, "c": 1.0, "r": msgpack.Timestamp(5, 0)}
    assert len(run.frame(_mp(bar))) == 1
    [final] = [orjson.loads(r.value) for r in run.pipeline.finalize_all()]
    assert final["is_final"] is True and final["payload"]["r"] == "1970-01-01T00:00:05.000000000Z"


def test_skips_are_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    run = Run()
    with caplog.at_level("WARNING", logger="ray_forwarder.core.pipeline"):
        for _ in range(2000):
            run.frame(_mp(_trade(1, blob=b"x")))
    assert run.skipped == Counter({"unencodable": 2000})
    assert len(caplog.records) == 10 + 2  # the first ten, then #1000 and #2000


def test_dedup_exports_evictions_and_the_effective_window() -> None:
    cache = DedupCache(ttl=100.0, max_keys=3)
    assert cache.window(0.0) == 0.0
    for i in range(5):
        cache.seen(f"k{i}", float(i))
    assert cache.evicted == 2
    assert cache.window(4.0) == 2.0  # k2, seen at t=2, is the oldest left
    assert cache.window(500.0) == 100.0  # never more than the TTL


# --- the session: frame-mates before a server error ----------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.disconnected = asyncio.Event()

    def on_items(self, items: list[DataItem], ingest_ts: str, received: float) -> None:
        self.calls.append(("items", [item.payload["i"] for item in items]))

    def on_skipped(self, skipped: Skipped) -> None:
        self.calls.append(("skipped", skipped.reason))

    def on_state(self, state: str, info: dict[str, Any]) -> None:
        self.calls.append((state, info.get("code")))
        if state == "disconnected":
            self.disconnected.set()


async def _scripted_feed(ws: ServerConnection, first: list[str], then: list[str]) -> None:
    """Alpaca's handshake; `first` replaces the subscription reply on the first connection,
    `then` follows it; later connections only get the handshake."""
    await ws.send('[{"T":"success","msg":"connected"}]')
    await ws.recv()
    await ws.send('[{"T":"success","msg":"authenticated"}]')
    await ws.recv()
    for frame in first:
        await ws.send(frame)
    for frame in then:
        await ws.send(frame)
    await ws.wait_closed()


async def _run_session(first: list[str], then: list[str]) -> Recorder:
    connections = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await _scripted_feed(ws, first, then)
        else:
            await _scripted_feed(ws, ['[{"T":"subscription","trades":["SPY"]}]'], [])

    recorder = Recorder()
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        config = SessionConfig(
            url=f"ws://127.0.0.1:{port}", key="k", secret="s",
            subscriptions={"trades": ["SPY"]}, wire_format="json",
            reconnect_initial=0.05, reconnect_max=0.1,
        )  # fmt: skip
        session = AlpacaSession(config, recorder)
        task = asyncio.create_task(session.run())
        await asyncio.wait_for(recorder.disconnected.wait(), 10)
        await session.stop()
        await asyncio.wait_for(task, 10)
    return recorder


ERROR_500 = {"T": "error", "code": 500, "msg": "internal error"}


async def test_data_ahead_of_a_server_error_is_forwarded_before_the_reconnect() -> None:
    recorder = await _run_session(
        ['[{"T":"subscription","trades":["SPY"]}]'],
        [_js(_trade(1), _trade(2, S="bad symbol"), _trade(3), ERROR_500, _trade(4))],
    )
    calls = [c for c in recorder.calls if c[0] in ("items", "skipped", "error")]
    assert calls == [("skipped", "bad_symbol"), ("items", [1, 3, 4]), ("error", 500)]


async def test_data_ahead_of_a_server_error_during_the_handshake_is_forwarded() -> None:
    recorder = await _run_session([_js(_trade(1), ERROR_500)], [])
    calls = [c for c in recorder.calls if c[0] in ("items", "error")]
    assert calls == [("items", [1]), ("error", 500)]


def test_out_records_are_plain_bytes() -> None:
    """The envelope embeds the payload serialised once; what leaves is still bytes."""
    run = Run()
    records: list[OutRecord] = run.pipeline.process(
        [item for item in decode_frame(_js(_trade(1))) if isinstance(item, DataItem)], "x", 0.0
    )
    assert isinstance(records[0].value, bytes)
    assert orjson.loads(records[0].value)["payload"] == _trade(1)


# --- shard stats and /metrics: skips, dedup evictions and the effective window ------------


def test_shard_stats_and_metrics_show_skips_dedup_evictions_and_window(tmp_path) -> None:
    """A ShardCore (no Ray, no Kafka, not running) fed frames the way its session would:
    the shard's one skip counter holds decode's and the pipeline's skips, and a too small
    DEDUP_MAX_KEYS shows as evictions and a window below the TTL, in stats and /metrics."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ray_forwarder.ops.http import SnapshotCollector
    from ray_forwarder.ray.shard import ShardCore, ShardSpec
    from ray_forwarder.ray.stats import ForwarderSnapshot

    async def send(records: Any, _instance: Any) -> Any:  # never called: the shard is idle
        raise AssertionError

    settings = Settings(
        alpaca_api_key_id="k", alpaca_secret_key="s", dedup_max_keys=5,
        dedup_ttl_seconds=900, spool_dir=str(tmp_path),
    )  # fmt: skip
    spec = ShardSpec("stocks-0", "ws://127.0.0.1:9", "k", "s", ("SPY",), ("trades",))
    core = ShardCore(settings, spec, [send])
    frame = _mp(*(_trade(i) for i in range(8)), _trade(8, S="QQQ"), _trade(9, blob=b"x"))
    items: list[DataItem] = []
    for event in decode_frame(frame) + decode_frame(_js(_trade(10, p="1"))):
        if isinstance(event, DataItem):
            items.append(event)
        else:
            core.on_skipped(event)  # type: ignore[arg-type]
    core.on_items(items, "2026-01-05T14:30:02.000000Z", time.monotonic())
    stats = core.stats()
    assert stats["skipped"] == {
        "bad_field_type": 1, "unsubscribed_symbol": 1, "unencodable": 1,
    }  # fmt: skip
    assert stats["dedup_keys"] == 5 and stats["dedup_evicted"] == 3
    assert 0 <= stats["dedup_window_s"] < 60  # 5 keys at this rate: far below the 900 s TTL
    assert stats["seq_keys"] == 1 and stats["seq_evicted"] == 0
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: ForwarderSnapshot(shards=[stats])))
    text = generate_latest(registry).decode()
    assert 'ray_forwarder_dedup_evictions_total{shard="stocks-0",stream="stocks"} 3.0' in text
    assert 'ray_forwarder_dedup_window_seconds{shard="stocks-0",stream="stocks"}' in text
    assert 'ray_forwarder_dedup_keys{shard="stocks-0",stream="stocks"} 5.0' in text
    assert 'ray_forwarder_items_skipped_total{reason="unencodable"} 1.0' in text
