"""The simulator speaks every market-data stream (crypto, options, news beside stocks) at its
own path, with that stream's items, and the same faults as stocks reach a real `ShardCore`
on those streams: malformed frames are skipped and counted, a 407 and a dropped connection
reconnect, and nothing is lost or delivered twice."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import orjson
import pytest
from websockets.asyncio.client import connect

from ray_forwarder.alpaca.streams import STREAMS
from ray_forwarder.config import load_settings
from ray_forwarder.core.topics import topic_map
from ray_forwarder.ray.planning import plan
from ray_forwarder.ray.shard import ShardCore
from ray_forwarder_dev.sim import SimConfig, Simulator
from tests.kafka_fixture import ConsumedRecord
from tests.stream_checks import assert_exactly_once, decode_and_check
from tests.test_streams_end_to_end import SIM_SYMBOLS, SYMBOLS

KEY, SECRET = "sim-key", "sim-secret"


def _config(stream: str, **overrides: Any) -> SimConfig:
    values: dict[str, Any] = dict(
        stream=stream, symbols=SIM_SYMBOLS[stream], rate=2000, time_scale=600,
        keys={KEY: SECRET}, seed=3,
    )  # fmt: skip
    values.update(overrides)
    return SimConfig(**values)


async def _recv(ws: Any, timeout: float = 3.0) -> Any:
    frame = await asyncio.wait_for(ws.recv(), timeout)
    return msgpack.unpackb(frame, timestamp=3) if isinstance(frame, bytes) else orjson.loads(frame)


@pytest.mark.parametrize(
    ("stream", "path", "subscribe", "kinds"),
    [
        ("crypto", "/v1beta3/crypto/us", {"trades": ["*"], "orderbooks": ["*"]}, {"t", "o"}),
        ("options", "/v1beta1/indicative", {"trades": ["*"], "quotes": ["*"]}, {"t", "q"}),
        ("news", "/v1beta1/news", {"news": ["*"]}, {"n"}),
    ],
)
async def test_each_stream_is_served_at_its_path_with_its_items(
    stream, path, subscribe, kinds
) -> None:
    async with Simulator(_config(stream)) as sim:
        assert sim.url.endswith(path)
        headers = {"Content-Type": "application/msgpack"}
        async with connect(sim.url, additional_headers=headers) as ws:
            assert await _recv(ws) == [{"T": "success", "msg": "connected"}]
            await ws.send(msgpack.packb({"action": "auth", "key": KEY, "secret": SECRET}))
            assert (await _recv(ws))[0]["msg"] == "authenticated"
            await ws.send(msgpack.packb({"action": "subscribe", **subscribe}))
            [reply] = await _recv(ws)
            assert reply["T"] == "subscription"
            assert set(reply) - {"T"} == set(STREAMS[stream].subscribable)
            seen: set[str] = set()
            for _ in range(200):
                seen |= {item["T"] for item in await _recv(ws)}
                if seen >= kinds:
                    break
            assert seen == kinds
        # the stock stream's path is not this one
        with pytest.raises(Exception, match="404"):
            await connect(f"ws://127.0.0.1:{sim.port}/v2/sip")


async def test_the_options_stream_refuses_a_json_client() -> None:
    async with Simulator(_config("options")) as sim, connect(sim.url) as ws:
        [error] = await _recv(ws)
        assert error["T"] == "error" and "msgpack" in error["msg"]


@pytest.mark.parametrize("stream", ["crypto", "news"])
async def test_faults_on_a_stream_are_survived_without_loss(stream) -> None:
    delivered: list[tuple[str, bytes, bytes]] = []

    async def send(records: list[tuple[str, bytes, bytes]], _ticket: Any) -> tuple[int, str]:
        delivered.extend(records)
        return len(records), "receiver"

    faults: list[str] = []
    async with Simulator(_config(stream, rate=1500, total_events=5000)) as sim:
        definition = STREAMS[stream]
        settings = load_settings(
            alpaca_api_key_id=KEY, alpaca_secret_key=SECRET, alpaca_streams=stream,
            alpaca_wire_format="json", kafka_bootstrap_servers="127.0.0.1:9",
            reconnect_initial=0.05, reconnect_max=0.2, data_stale_seconds=0,
            bar_final_delay_seconds=0.3,
            **{definition.url_setting: sim.url,
               definition.symbols_setting: ",".join(SYMBOLS[stream])},
        )  # fmt: skip
        [planned] = plan(settings)
        core = ShardCore(settings, planned.spec, [send])
        runner = asyncio.create_task(core.run())
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not sim.finished and loop.time() < deadline:
                items = sim.stats()["items"]
                if not faults and items > 200:
                    faults.append(f"malformed:{sim.inject_malformed(6)}")
                elif len(faults) == 1 and items > 600:
                    faults.append(f"407:{sim.send_error(407)}")
                elif len(faults) == 2 and items > 1000 and core.stats()["subscribed"]:
                    faults.append(f"drop:{await sim.drop_connections()}")
                await asyncio.sleep(0.02)
            assert sim.finished, faults
            await asyncio.sleep(1.0)
        finally:
            assert await core.stop(10)
            await asyncio.wait_for(runner, 10)
        sent = sim.distinct_items()
    stats = core.stats()
    assert len(faults) == 3, faults
    assert stats["reconnects"] == 2 and stats["errors_by_code"] == {407: 1}
    assert sum(stats["skipped"].values()) == 6
    records = [ConsumedRecord(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(delivered)]
    report = decode_and_check(records, topic_map(settings, definition))
    assert_exactly_once(report, sent)
