"""`python -m ray_forwarder_dev.sim --port 8765 --symbols SPY,QQQ --rate 100`: a standalone feed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from ray_forwarder_dev.sim.server import SimConfig, Simulator


def parse_args(argv: list[str] | None = None) -> tuple[SimConfig, float]:
    parser = argparse.ArgumentParser(
        prog="python -m ray_forwarder_dev.sim", description="Local Alpaca-protocol feed simulator"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--feed", default="sip", help="feed name shown in the URL (any works)")
    parser.add_argument("--symbols", default="SPY,QQQ")
    parser.add_argument("--rate", type=float, default=200.0, help="items/s; 0 = unpaced")
    parser.add_argument("--time-scale", type=float, default=60.0)
    parser.add_argument("--total-events", type=int, default=None)
    parser.add_argument("--duplicate-ratio", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--key", default="sim-key")
    parser.add_argument("--secret", default="sim-secret")
    parser.add_argument("--connection-limit", type=int, default=1)
    parser.add_argument("--stats-every", type=float, default=10.0, help="seconds; 0 = never")
    parser.add_argument(
        "--market-closed", action="store_true", help="/v2/clock and /v2/calendar say closed"
    )
    args = parser.parse_args(argv)
    return SimConfig(
        host=args.host,
        port=args.port,
        feed=args.feed,
        symbols=args.symbols,
        rate=args.rate,
        time_scale=args.time_scale,
        total_events=args.total_events,
        duplicate_ratio=args.duplicate_ratio,
        seed=args.seed,
        keys={args.key: args.secret},
        connection_limit=args.connection_limit,
        start_on_subscribe=True,
        market_open=not args.market_closed,
    ), args.stats_every


async def serve_forever(config: SimConfig, stats_every: float) -> None:
    async with Simulator(config) as sim:
        print(f"alpaca simulator on {sim.url} (key {next(iter(config.keys))})", flush=True)
        try:
            while True:
                await asyncio.sleep(stats_every if stats_every > 0 else 3600)
                if stats_every > 0:
                    print(f"{sim.market.now} {sim.stats()}", flush=True)
        finally:
            print(f"final: {sim.stats()}", flush=True)


def main(argv: list[str] | None = None) -> None:
    config, stats_every = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(config, stats_every))


if __name__ == "__main__":
    main()
