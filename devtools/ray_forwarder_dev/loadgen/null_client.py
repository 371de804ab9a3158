"""`python -m ray_forwarder_dev.loadgen.null_client URL`: subscribes to everything, reads every
frame and discards it, until the feed closes. It measures the load generator's ceiling: what
it can push when the reader costs next to nothing. Prints one JSON line at the end."""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ray_forwarder.alpaca.codec import connection_headers, encode_auth, encode_subscribe
from ray_forwarder_dev.loadgen.feed import BENCH_CHANNELS


async def read_all(url: str, wire_format: str) -> dict[str, float]:
    frames = size = 0
    last = 0.0
    async with connect(
        url, additional_headers=connection_headers(wire_format), compression=None, max_size=None
    ) as ws:
        await ws.recv()  # connected
        await ws.send(encode_auth("null-client", "null"))
        await ws.recv()  # authenticated
        await ws.send(encode_subscribe({key: ["*"] for key in BENCH_CHANNELS}))
        await ws.recv()  # subscription
        try:
            while True:
                data = await ws.recv(decode=False)
                frames += 1
                size += len(data)
                last = time.time()
        except ConnectionClosed:
            pass
    return {"frames": frames, "bytes": size, "last_recv": last}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_forwarder_dev.loadgen.null_client")
    parser.add_argument("url")
    parser.add_argument("--wire-format", choices=["json", "msgpack"], default="json")
    args = parser.parse_args(argv)
    result = asyncio.run(read_all(args.url, args.wire_format))
    print(orjson.dumps({"event": "done", **result}).decode(), flush=True)


if __name__ == "__main__":
    main()
