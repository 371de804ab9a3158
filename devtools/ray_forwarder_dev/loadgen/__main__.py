"""`python -m ray_forwarder_dev.loadgen --symbols 100 --events 60000 --out sent.msgpack`

Builds the feed, serves it, and reports on stdout as JSON lines: `ready` (the URL and how
many items each run will write), `started` (the clock started: every expected client
subscribed), `finished` (everything written; the send stamps are in `--out`). It then keeps
the connections open until stdin says `exit` (or closes), so that the system under test can
drain without seeing its feed go away.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import msgpack
import orjson

from ray_forwarder_dev.loadgen.feed import FeedSpec, build_feed
from ray_forwarder_dev.loadgen.server import ReplayServer


def emit(event: str, **fields: object) -> None:
    print(orjson.dumps({"event": event, **fields}).decode(), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ray_forwarder_dev.loadgen")
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--events", type=int, default=60_000, help="distinct items")
    parser.add_argument("--duplicate-ratio", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0, help="items/s; 0 = flat out")
    parser.add_argument(
        "--connections", type=int, default=1, help="subscribed clients that start the clock"
    )
    parser.add_argument("--items-per-frame", type=int, default=50)
    parser.add_argument("--out", required=True, help="file for the send stamps (msgpack)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    spec = FeedSpec(
        symbols=args.symbols,
        events=args.events,
        seed=args.seed,
        duplicate_ratio=args.duplicate_ratio,
        rate=args.rate,
    )
    feed = build_feed(spec)
    server = ReplayServer(
        feed,
        connections=args.connections,
        rate=args.rate,
        items_per_frame=args.items_per_frame,
        on_started=lambda: emit("started", at=time.time()),
    )
    url = await server.start()
    emit("ready", url=url, items=len(feed.items), distinct=feed.distinct)
    exit_requested = asyncio.create_task(asyncio.to_thread(sys.stdin.readline))
    finished = asyncio.create_task(server.finished.wait())
    await asyncio.wait([exit_requested, finished], return_when=asyncio.FIRST_COMPLETED)
    if finished.done():
        sent, writes = server.sent()
        stamps = [s for log in server.logs for s in log.stamps]
        with open(args.out, "wb") as out:
            out.write(msgpack.packb({"sent": sent, "connections": server.connection_labels()}))
        emit(
            "finished",
            items=writes,
            distinct=len(sent),
            frames=len(stamps),
            first_send=min(stamps, default=0.0),
            last_send=max(stamps, default=0.0),
            closed_early=sum(1 for log in server.logs if log.closed_early),
        )
        await exit_requested
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
