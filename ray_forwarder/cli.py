"""Command line: `ray-forwarder [run]`, `ray-forwarder demo`, `ray-forwarder schema`.

`demo` and `bench` live in the development tools (`ray_forwarder_dev`, a package of its own
under devtools/ that `uv sync` installs in a clone); the wheel and the image do not carry
them, so there these two commands say so in one line instead of failing on an import.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
import sys
from pathlib import Path
from types import ModuleType

import orjson

from ray_forwarder.config import ConfigError, load_settings
from ray_forwarder.ops import logs

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2
DEV_TOOLS_PACKAGE = "ray_forwarder_dev"
DEV_COMMANDS = ("demo", "bench")


def dev_tool(name: str) -> ModuleType | None:
    """`ray_forwarder_dev.<name>`, or None where the development tools are not installed.

    Only the package's own absence counts: a missing dependency inside it still raises.
    """
    try:
        importlib.import_module(DEV_TOOLS_PACKAGE)
    except ModuleNotFoundError as exc:
        if exc.name != DEV_TOOLS_PACKAGE:
            raise
        return None
    return importlib.import_module(f"{DEV_TOOLS_PACKAGE}.{name}")


def not_installed_message(command: str) -> str:
    return (
        f"ray-forwarder: the {command} is a development tool, not installed here: "
        f"run it from a clone of the repository (`uv run ray-forwarder {command}`)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # parse_known_args: without the development tools `bench` has no options to parse, and
    # its command line must reach the one-line message below rather than a usage error.
    args, unknown = parser.parse_known_args(argv)
    if args.command in DEV_COMMANDS and dev_tool(args.command) is None:
        print(not_installed_message(args.command), file=sys.stderr)
        return EXIT_CONFIG
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.command:
        args.duration = None
    command = args.command or "run"
    try:
        if command == "run":
            return _run(args)
        if command == "demo":
            from ray_forwarder_dev.demo import DemoOptions, run_demo

            return run_demo(
                DemoOptions(
                    duration=args.duration,
                    symbols=args.symbols,
                    rate=args.rate,
                    wire_format=args.wire_format,
                    duplicate_ratio=args.duplicate_ratio,
                    streams=args.streams,
                )
            )
        if command == "bench":
            from ray_forwarder_dev.bench import run_from_args

            return run_from_args(args)
        if command == "plan":
            return _plan()
        if command == "schema":
            return _schema(args.output)
    except ConfigError as exc:
        print(f"ray-forwarder: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    parser.error(f"unknown command {command}")
    return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-forwarder",
        description="Forward Alpaca market data to Kafka on Ray. Configured by environment "
        "variables (see README).",
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the forwarder (the default)")
    run.add_argument("--duration", type=_positive_seconds, default=None,
                     help="stop after N seconds")  # fmt: skip
    demo = sub.add_parser(
        "demo",
        help="run on embedded defaults: local Ray, a local Kafka broker and the feed simulator",
    )
    demo.add_argument("--duration", type=float, default=20.0, help="seconds to run (20)")
    demo.add_argument("--symbols", default="SPY,QQQ,AAPL,MSFT,NVDA,AMZN,TSLA,META")
    demo.add_argument("--rate", type=float, default=2000.0, help="simulated items/s (2000)")
    demo.add_argument("--wire-format", choices=["json", "msgpack"], default="msgpack")
    demo.add_argument("--duplicate-ratio", type=float, default=0.01)
    demo.add_argument(
        "--streams",
        default="",
        help="comma-separated streams to run (default: every stream the simulator speaks)",
    )
    bench_module = dev_tool("bench")
    bench = sub.add_parser(
        "bench",
        help="benchmark against a single-process baseline",
        description=bench_module.__doc__ if bench_module else not_installed_message("bench"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if bench_module is not None:
        bench_module.add_arguments(bench)
    sub.add_parser("plan", help="print the shard plan (key ids masked) without connecting")
    schema = sub.add_parser("schema", help="print (or write) the envelope JSON Schema")
    schema.add_argument("--output", type=Path, default=None)
    return parser


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a finite number of seconds > 0")
    return value


def _run(args: argparse.Namespace) -> int:
    from ray_forwarder.core.topics import KafkaUnreachableError
    from ray_forwarder.startup import preflight

    settings = load_settings()
    logs.configure(settings.log_level, component="driver")
    # Every refusal happens here, before Ray starts: the plan (credentials, shards vs
    # slots), the spool directory, and the Kafka topics.
    try:
        shards = preflight(settings)
    except KafkaUnreachableError as exc:
        print(f"ray-forwarder: {exc}", file=sys.stderr)
        return EXIT_ERROR
    from ray_forwarder.ray.driver import ensure_ray, run_forwarder

    ensure_ray()
    result = asyncio.run(run_forwarder(settings, shards=shards, duration=args.duration))
    if result.error:
        print(f"ray-forwarder: {result.error}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK if result.drained else EXIT_ERROR


def _plan() -> int:
    from ray_forwarder.ray.planning import plan, producer_names
    from ray_forwarder.startup import check_spool_dir

    settings = load_settings()
    shards = plan(settings)
    check_spool_dir(settings)
    producers = (
        f"{settings.producers} producer(s): {', '.join(producer_names(settings))}"
        if settings.producers
        else "no producer actors (PRODUCERS=0: each shard writes to Kafka itself)"
    )
    print(f"{len(shards)} shard(s), {producers}")
    for planned in shards:
        print("  " + planned.describe())
    return EXIT_OK


def _schema(output: Path | None) -> int:
    from ray_forwarder.core.envelope import json_schema

    text = orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    if output is None:
        sys.stdout.write(text.decode() + "\n")
    else:
        output.write_bytes(text + b"\n")
    return EXIT_OK
