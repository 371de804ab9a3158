"""Shard planning: which connection serves which symbols.

Alpaca allows a fixed number of connections per key pair and endpoint (usually one; a
second gets `406 connection limit exceeded`). A shard is therefore one (stream
endpoint, credential, connection slot); symbols are spread over the shards by a stable hash so the
same symbol lands on the same shard in every run. A plan asking for more shards than
there are connection slots is refused at start.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_forwarder.alpaca.streams import STOCKS, StreamDefinition
from ray_forwarder.config import ConfigError, Settings
from ray_forwarder.ray.shard import ShardSpec
from ray_forwarder.runtime.outbox import stable_slot


def mask_key(key_id: str) -> str:
    """Enough of a key id to tell keys apart in a log, not enough to use it."""
    return key_id[:4] + "…" if len(key_id) > 4 else "…"


@dataclass(frozen=True)
class PlannedShard:
    spec: ShardSpec
    slot: int

    def describe(self) -> str:
        spec = self.spec
        return (
            f"{spec.shard_id:<12} {spec.url:<48} key={mask_key(spec.key_id):<8} "
            f"slot={self.slot} symbols={len(spec.symbols)}"
        )


def plan(settings: Settings) -> list[PlannedShard]:
    """The shards for the settings, or a ConfigError saying why not: for every enabled
    stream (ALPACA_STREAMS), its endpoint's connection slots (each key pair has
    ALPACA_CONNECTIONS_PER_KEY of them per endpoint) shared among its symbols."""
    planned: list[PlannedShard] = []
    for stream in settings.streams():
        planned += _plan_stream(settings, stream)
    return planned


def _plan_stream(settings: Settings, stream: StreamDefinition) -> list[PlannedShard]:
    """Connection slots are numbered, not listed: slot i is key pair i // per_key,
    connection i % per_key, so the work is bounded by the shards and symbols, never by
    keys x slots."""
    if stream.symbols_setting is None:
        return _plan_per_key(settings, stream)
    credentials = settings.credentials()
    per_key = settings.alpaca_connections_per_key
    slots = len(credentials) * per_key
    symbols = settings.stream_symbols(stream)
    wildcard = "*" in symbols
    stocks = stream is STOCKS
    if stocks:
        wanted = settings.shards or (1 if wildcard else min(slots, len(symbols)))
    else:  # SHARDS caps the other streams' shards; `*` is one connection
        wanted = 1 if wildcard else min(settings.shards or slots, len(symbols))
    limit = getattr(settings, stream.symbol_limit_setting or "", 0) or 0
    if limit and not wildcard:
        wanted = _within_limit(symbols, wanted, limit, slots, stream)
    if wanted > slots:
        raise ConfigError(
            f"SHARDS={wanted} asks for more shards than there are connections: "
            f"{len(credentials)} key pair(s) x ALPACA_CONNECTIONS_PER_KEY={per_key} = "
            f"{slots} (add key pairs to ALPACA_CREDENTIALS or lower SHARDS)"
        )
    if wildcard and wanted > 1:
        raise ConfigError("ALPACA_SYMBOLS='*' cannot be split over shards; use SHARDS=1")
    buckets: list[list[str]] = [[] for _ in range(wanted)]
    for symbol in symbols:
        buckets[stable_slot(symbol.encode(), wanted)].append(symbol)
    url = settings.stream_url if stocks else settings.stream_endpoint(stream)
    planned = []
    for index, bucket in enumerate(buckets):
        if not bucket:
            continue  # more shards than the hash filled; an idle connection helps nobody
        key, secret = credentials[index // per_key]
        planned.append(
            PlannedShard(
                ShardSpec(
                    shard_id=f"{stream.name}-{index}",
                    url=url,
                    key_id=key,
                    secret=secret,
                    symbols=tuple(bucket),
                    channels=tuple(settings.stream_channels(stream)),
                    stream=stream.name,
                ),
                index % per_key,
            )
        )
    return planned


def _plan_per_key(settings: Settings, stream: StreamDefinition) -> list[PlannedShard]:
    """A stream without symbols (trade_updates: the account's order events) is one
    connection per key pair: each key pair's account, in its own shard and slot 0."""
    url = settings.stream_endpoint(stream)
    channels = tuple(settings.stream_channels(stream))
    return [
        PlannedShard(
            ShardSpec(
                shard_id=f"{stream.name}-{index}",
                url=url,
                key_id=key,
                secret=secret,
                symbols=("*",),  # the whole account
                channels=channels,
                stream=stream.name,
            ),
            0,
        )
        for index, (key, secret) in enumerate(settings.credentials())
    ]


def _within_limit(
    symbols: list[str], wanted: int, limit: int, slots: int, stream: StreamDefinition
) -> int:
    """The fewest shards (from `wanted` up) whose stable-hash buckets all hold at most
    `limit` symbols, or a ConfigError when the connection slots do not suffice."""
    for shards in range(max(wanted, -(-len(symbols) // limit)), slots + 1):
        sizes = [0] * shards
        for symbol in symbols:
            sizes[stable_slot(symbol.encode(), shards)] += 1
        if max(sizes) <= limit:
            return shards
    variable = (stream.symbol_limit_setting or "").upper()
    raise ConfigError(
        f"{len(symbols)} {stream.name} symbols at most {limit} per connection ({variable}) "
        f"need more connections than the {slots} slot(s) there are (add key pairs to "
        "ALPACA_CREDENTIALS, raise ALPACA_CONNECTIONS_PER_KEY if the plan allows, or "
        "subscribe to fewer symbols)"
    )


def producer_names(settings: Settings) -> list[str]:
    return [f"producer-{i}" for i in range(settings.producers)]
