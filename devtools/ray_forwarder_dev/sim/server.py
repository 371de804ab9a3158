"""A real WebSocket server speaking Alpaca's market-data protocol (the stream of
`SimConfig.stream`: stocks, crypto, options or news), over the synthetic market.

It exists so tests, the demo and benchmarks can run the whole forwarder without credentials,
and so faults (drops, auth failures, 406/407, malformed frames, duplicates) can be triggered on
demand. It keeps exact accounting of what it wrote to each connection: a data frame counts as
sent once it is written to the socket, and frames still sitting in the write buffer when a
connection is cut abruptly are taken back out, so "every item sent arrives exactly once"
is checkable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

import msgpack
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from ray_forwarder.alpaca import timestamps
from ray_forwarder.alpaca.channels import (
    CHANNEL_BY_TYPE,
    MARKET_DATA_CHANNELS,
    TRADE_COMPANION_CHANNELS,
)
from ray_forwarder.alpaca.errors import ERROR_MEANINGS
from ray_forwarder_dev.sim.generator import (
    Item,
    Market,
    MarketConfig,
    bars_between,
    parse_base_time,
    ticks_between,
)
from ray_forwarder_dev.sim.streams import DEFAULT_FEEDS, SIM_STREAMS, SimStream

log = logging.getLogger(__name__)

#: Subscribable channels, in the order Alpaca lists them in a subscription reply.
SUBSCRIBE_CHANNELS = MARKET_DATA_CHANNELS
#: Item type -> the subscription channel that receives it (corrections come with trades).
SUBSCRIPTION_BY_TYPE = {
    kind: "trades" if channel in TRADE_COMPANION_CHANNELS else channel
    for kind, channel in CHANNEL_BY_TYPE.items()
}
MSGPACK_CONTENT_TYPE = "application/msgpack"
_BACKPRESSURE_HIGH = 16  # frames queued per client before an unpaced pump waits
_BACKPRESSURE_LOW = 4


class SimConfig(BaseModel):
    """Simulator settings. `rate` is data items per real second (None or 0: as fast as the
    clients read); the market's density is `rate / time_scale` ticks per simulated second,
    so the simulated clock runs about `time_scale` times faster than the real one."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 0
    #: Which Alpaca stream to speak (ray_forwarder.alpaca.streams.STREAMS).
    stream: str = "stocks"
    #: The feed in the URL (stocks: sip/iex/...; crypto: the location; options: indicative
    #: or opra); empty: the stream's usual one.
    feed: str = ""
    symbols: list[str] = Field(default_factory=lambda: ["SPY", "QQQ"])
    keys: dict[str, str] = Field(default_factory=lambda: {"sim-key": "sim-secret"})
    connection_limit: int = 1
    rate: float | None = 200.0
    time_scale: float = 60.0
    total_events: int | None = None
    duplicate_ratio: float = 0.0
    updated_bar_ratio: float = 0.3
    max_items_per_frame: int = 50
    seed: int = 0
    auth_timeout: float = 10.0
    symbol_limit: int | None = None
    base_time: str = "2026-01-05T14:30:00Z"
    quote_ratio: float = 0.55
    status_ratio: float = 0.01
    luld_ratio: float = 0.02
    correction_ratio: float = 0.01
    cancel_error_ratio: float = 0.01
    #: Start the market clock at the first subscription, so a slow-starting client
    #: (a Ray job) still sees the run from its first event.
    start_on_subscribe: bool = True
    #: With start_on_subscribe: how many subscribed connections start the clock (a
    #: benchmark of several shards waits for all of them).
    start_after_subscribers: int = Field(default=1, ge=1)
    #: Pacing granularity: how often a paced pump wakes to send what is due.
    flush_interval: float = 0.01
    #: permessage-deflate; off by default (faster, and exact byte accounting on drops).
    compression: bool = False
    #: Send 407 and close a client whose queue exceeds this many frames (paced mode only).
    slow_client_frames: int | None = None
    #: How long drop_connections lets in-flight writes drain before cutting (seconds).
    drop_drain_timeout: float = 1.0
    #: Stamp each SentRecord with the wall-clock time (time.time()) its frame was written
    #: to the socket, for end-to-end latency (the benchmark). One clock read per frame.
    record_send_times: bool = False
    #: What the trading API's `/v2/clock` and `/v2/calendar` (served on the same port over
    #: plain HTTP) say: open around the clock by default, or closed (no trading day).
    market_open: bool = True
    #: The REST bars endpoint (the stream's: `/v2/stocks/bars`, `/v1beta3/crypto/{loc}/bars`
    #: or `/v1beta1/options/bars`) answers every Nth request with 429
    #: (None: never), with `X-RateLimit-*` headers naming a window `rest_reset_seconds` on.
    rest_429_every: int | None = Field(default=None, ge=1)
    rest_reset_seconds: float = 1.0

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("stream")
    @classmethod
    def _known_stream(cls, value: str) -> str:
        if value not in SIM_STREAMS:
            raise ValueError(f"unknown stream {value!r}; choose from {', '.join(SIM_STREAMS)}")
        return value

    @property
    def url_feed(self) -> str:
        return self.feed or DEFAULT_FEEDS[self.stream]

    def market_config(self) -> MarketConfig:
        density = (self.rate or 200.0) / self.time_scale
        rare = self.stream == "stocks"  # statuses, LULDs, corrections exist on stocks only
        return MarketConfig(
            symbols=tuple(self.symbols),
            seed=self.seed,
            base_time=self.base_time,
            ticks_per_second=density,
            quote_ratio=self.quote_ratio,
            updated_bar_ratio=self.updated_bar_ratio,
            status_ratio=self.status_ratio if rare else 0.0,
            luld_ratio=self.luld_ratio if rare else 0.0,
            correction_ratio=self.correction_ratio if rare else 0.0,
            cancel_error_ratio=self.cancel_error_ratio if rare else 0.0,
        )


@dataclass(slots=True, eq=False)
class Produced:
    """One market item with its encodings, cached so duplicates are byte-identical."""

    seq: int  # position in the market's output, from 1
    item: Item
    subscription: str
    symbol: str
    _json: bytes | None = None
    _msgpack: bytes | None = None

    def encoded(self, use_msgpack: bool) -> bytes:
        if use_msgpack:
            if self._msgpack is None:
                self._msgpack = encode_msgpack_item(self.item)
            return self._msgpack
        if self._json is None:
            self._json = orjson.dumps(self.item)
        return self._json


@dataclass(slots=True, eq=False)
class SentRecord:
    """One data item written to one connection. `lost` marks items taken back because the
    connection was cut before they left the write buffer; public views leave those out."""

    conn_id: int
    seq: int
    item: Item
    duplicate: bool
    lost: bool = False
    sent_at: float = 0.0  # time.time() of the write, with SimConfig.record_send_times


@dataclass(slots=True, eq=False)
class _Frame:
    data: bytes
    text: bool
    kind: str  # "data" | "control" | "junk" | "close"
    items: list[tuple[Produced, bool]] | None = None
    close_code: int = 1000


@dataclass(eq=False)
class _Conn:
    id: int
    ws: ServerConnection
    use_msgpack: bool
    key: str | None = None
    authenticated: bool = False
    subs: dict[str, dict[str, None]] = field(
        default_factory=lambda: {ch: {} for ch in SUBSCRIBE_CHANNELS}
    )  # (the server sets its stream's channels)
    pending: list[tuple[Produced, bool]] = field(default_factory=list)
    queue: deque[_Frame] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    space: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False  # no more frames may be queued
    stalled: bool = False  # open, but nothing more is written to it (a stalled stream)
    stopped: bool = False  # the sender must not write anything more
    starved: bool = False  # control replies still go out, data no longer does
    omitted: Counter[str] = field(default_factory=Counter)  # subscribes that left it out
    sender: asyncio.Task[None] | None = None
    auth_timer: asyncio.TimerHandle | None = None
    # items queued here or written on an earlier connection of the key: duplicate material
    dup_pool: deque[Produced] = field(default_factory=lambda: deque(maxlen=256))
    # (wire bytes, records) of recent frames, to take back what a drop left unflushed
    recent: deque[tuple[int, list[SentRecord]]] = field(
        default_factory=lambda: deque(maxlen=8192)  # far more frames than a buffer holds
    )

    def wants(self, subscription: str, symbol: str) -> bool:
        symbols = self.subs[subscription]
        return "*" in symbols or symbol in symbols

    @property
    def subscribed(self) -> bool:
        return any(self.subs.values())


@dataclass
class SimStats:
    """Counters; `stats()` returns them as a dict."""

    produced: int = 0
    unsent: int = 0  # produced while nobody subscribed to them
    connections: int = 0
    frames: int = 0  # data frames written
    items: int = 0  # data items written, duplicates included, lost ones excluded
    duplicates: int = 0
    malformed: int = 0  # junk frames written
    lost: int = 0  # items taken back after an abrupt drop
    auth_failures: int = 0
    refused: int = 0  # 406 answers
    errors_sent: int = 0
    dropped_connections: int = 0
    stalled_connections: int = 0
    starved_connections: int = 0
    omitted_from_subscription: int = 0  # subscribe requests answered without a symbol
    clock_requests: int = 0  # /v2/clock and /v2/calendar requests answered
    rest_requests: int = 0  # REST bars, trades and quotes requests, whatever the answer
    rest_rate_limited: int = 0  # of which answered 429
    rest_refused: int = 0  # of which refused (the refuse_rest fault, bad credentials)


def encode_msgpack_item(item: Item) -> bytes:
    """One item as msgpack, with `t` (news: `created_at`, `updated_at`) as a msgpack
    Timestamp like Alpaca sends it."""
    ts = item.get("t")
    if isinstance(ts, str):
        item = {**item, "t": _timestamp(ts)}
    elif "updated_at" in item:
        item = {**item, **{k: _timestamp(item[k]) for k in ("created_at", "updated_at")}}
    return msgpack.packb(item, datetime=False)


def _timestamp(canonical: str) -> msgpack.Timestamp:
    seconds = _second_of(canonical[:19])
    return msgpack.Timestamp(seconds, int(canonical[20:29]))


_SECONDS: dict[str, int] = {}


def _second_of(prefix: str) -> int:
    seconds = _SECONDS.get(prefix)
    if seconds is None:
        from datetime import datetime

        if len(_SECONDS) > 4096:
            _SECONDS.clear()
        seconds = int(datetime.fromisoformat(prefix + "+00:00").timestamp())
        _SECONDS[prefix] = seconds
    return seconds


def msgpack_array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _wire_size(payload_len: int) -> int:
    """Bytes of an unmasked server frame carrying `payload_len` bytes."""
    if payload_len < 126:
        return payload_len + 2
    if payload_len < 65536:
        return payload_len + 4
    return payload_len + 10


class SimEndpoints:
    """A running simulator's URLs, from its config and port: shared by the server and the
    thread that runs it for synchronous callers."""

    config: SimConfig

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return self.url_for(self.config.url_feed)

    def url_for(self, feed: str) -> str:
        path = SIM_STREAMS[self.config.stream].url_path(feed)
        return f"ws://{self.config.host}:{self.port}{path}"

    @property
    def trading_url(self) -> str:
        """Base URL of the simulated trading API (`/v2/clock`, `/v2/calendar`)."""
        return f"http://{self.config.host}:{self.port}"

    @property
    def data_url(self) -> str:
        """Base URL of the simulated market-data REST API (the stream's bars endpoint)."""
        return f"http://{self.config.host}:{self.port}"


class Simulator(SimEndpoints):
    """The feed server. Runs on one asyncio loop; use `SimulatorThread` from other threads."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.stream: SimStream = SIM_STREAMS[self.config.stream]
        self._channels = self.stream.definition.subscribable
        self.market = Market(self.config.market_config())
        self.stats_counters = SimStats()
        self.duplicate_ratio = self.config.duplicate_ratio
        self._conns: dict[int, _Conn] = {}
        self._next_conn_id = 1
        self._slots: dict[str, set[int]] = {}
        self._records: list[SentRecord] = []
        self._distinct: set[int] = set()
        self._history: dict[str | None, deque[Produced]] = {}
        self._dup_rng = random.Random(self.config.seed ^ 0x5EED)
        self._reject_auth = False
        self._refuse = False
        self._omit: dict[str, int | None] = {}  # symbol -> subscribes to leave it out of
        self.market_open = self.config.market_open
        self._clock_available = True
        self._rest_refusal: int | None = None  # the refuse_rest fault: this HTTP status
        self.rest_log: list[tuple[float, int]] = []  # (time.monotonic(), status) per request
        rest_path = self.stream.rest_bars_path
        self._rest_bars_path = rest_path(self.config.url_feed) if rest_path else None
        self._rest_tick_paths = self.stream.rest_tick_paths(self.config.url_feed)
        self._junk_cursor = 0
        self._server: Server | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._market_started = asyncio.Event()
        self._finished = asyncio.Event()
        self._progress = asyncio.Event()
        if not self.config.start_on_subscribe:
            self._market_started.set()

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> Simulator:
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._check_path,
            compression="deflate" if self.config.compression else None,
            max_size=1 << 20,
            close_timeout=2.0,
        )
        self._pump_task = asyncio.create_task(self._pump(), name="sim-pump")
        return self

    async def stop(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._conns.values()):
            if conn.sender is not None:
                conn.sender.cancel()

    async def __aenter__(self) -> Simulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "simulator not started"
        return self._server.sockets[0].getsockname()[1]

    def end_feed(self) -> int:
        """End the feed now: what was produced so far becomes `total_events`, so a test can
        stop on an event of its own (a reconnect seen) instead of a feed length it must
        guess for a machine of unknown speed. Returns the new total."""
        self.config.total_events = self.market.emitted
        self._check_finished()
        return self.market.emitted

    # --- faults -----------------------------------------------------------------------

    async def drop_connections(self) -> int:
        """Cut every client abruptly: no close frame, the client sees 1006. What was
        already written arrives; what was still queued is never sent (nor counted)."""
        conns = list(self._conns.values())
        for conn in conns:
            conn.closing = conn.stopped = True
            conn.pending.clear()
            conn.queue.clear()
            conn.wake.set()
            conn.space.set()
        senders = [c.sender for c in conns if c.sender is not None]
        if senders:
            await asyncio.wait(senders, timeout=self.config.drop_drain_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drop_drain_timeout
        while loop.time() < deadline and any(_buffered(c) for c in conns):
            await asyncio.sleep(0.005)
        for conn in conns:
            self._take_back_unflushed(conn)
            conn.ws.transport.abort()
            if conn.sender is not None and not conn.sender.done():
                conn.sender.cancel()
        self.stats_counters.dropped_connections += len(conns)
        return len(conns)

    def stall_connections(self) -> int:
        """Stall every authenticated client: the socket stays open (WebSocket pings are still
        answered) but nothing more is written to it, neither data nor control replies; what
        was queued and not yet written is discarded (never counted as sent). The market goes
        on for everyone else; new connections are served normally."""
        conns = [c for c in self._conns.values() if c.authenticated and not c.closing]
        for conn in conns:
            conn.stalled = True
            conn.pending.clear()
            conn.queue.clear()
            conn.space.set()
        self.stats_counters.stalled_connections += len(conns)
        return len(conns)

    def starve_connection(self) -> int | None:
        """Stop data on one connection (the oldest subscribed one) while it keeps answering
        control messages (subscribe replies, WebSocket pings): a stuck upstream that still
        looks alive. What was queued for it and not yet written is discarded (never counted
        as sent). Other and new connections are served normally. Returns its id, or None."""
        for conn in self._conns.values():
            if conn.subscribed and not conn.closing and not conn.starved:
                conn.starved = True
                conn.pending.clear()
                conn.queue = deque(f for f in conn.queue if f.kind != "data")
                self.stats_counters.starved_connections += 1
                return conn.id
        return None

    def omit_from_subscription(self, symbol: str, replies: int | None = 1) -> None:
        """Leave `symbol` out of the first `replies` subscribe requests of each connection
        (None: all of them): it is not subscribed (no data) and missing from the reply, as
        when the feed does not serve a symbol. A later subscribe that asks again gets it."""
        self._omit[symbol] = replies

    def set_market_open(self, flag: bool) -> None:
        """What `/v2/clock` and `/v2/calendar` report from now on."""
        self.market_open = flag

    def set_clock_available(self, flag: bool) -> None:
        """While False, `/v2/clock` and `/v2/calendar` answer 503."""
        self._clock_available = flag

    def refuse_rest(self, status: int | None = 403) -> None:
        """While set, the REST bars endpoint answers every request with `status` (None:
        served again)."""
        self._rest_refusal = status

    def set_rest_rate_limit(self, every: int | None) -> None:
        """Answer every `every`-th REST bars request with 429 (None: never)."""
        self.config = self.config.model_copy(update={"rest_429_every": every})

    def reject_auth(self, flag: bool = True) -> None:
        """While set, every auth attempt gets 402."""
        self._reject_auth = flag

    def refuse_connections(self, flag: bool = True) -> None:
        """While set, every new session gets 406 (a slot held by a half-dead session)."""
        self._refuse = flag

    def set_duplicate_ratio(self, ratio: float) -> None:
        self.duplicate_ratio = ratio

    def send_error(self, code: int, msg: str | None = None, close: bool = True) -> int:
        """Send `[{"T":"error",...}]` to every open client (after what is already queued),
        then close them if `close`. Returns the number of clients."""
        conns = [c for c in self._conns.values() if not c.closing]
        for conn in conns:
            self._flush(conn)
            self._send_error(conn, code, msg, close=close)
        return len(conns)

    def inject_malformed(self, n: int = 1) -> int:
        """Queue `n` junk frames to every authenticated client: bad JSON, bad msgpack,
        a non-array top level, an unknown `T`, items missing `S`/`t`. Real items are not
        touched; the junk is counted as malformed, never as sent items."""
        conns = [c for c in self._conns.values() if c.authenticated and not c.closing]
        for conn in conns:
            self._flush(conn)
            for _ in range(n):
                data, text = self._junk(conn.use_msgpack)
                self._enqueue(conn, _Frame(data, text, "junk"))
        return len(conns)

    # --- accounting -------------------------------------------------------------------

    @property
    def sent(self) -> list[SentRecord]:
        """Data items written to clients, in write order (duplicates marked)."""
        return [r for r in self._records if not r.lost]

    def sent_by_connection(self) -> dict[int, list[SentRecord]]:
        out: dict[int, list[SentRecord]] = {}
        for record in self._records:
            if not record.lost:
                out.setdefault(record.conn_id, []).append(record)
        return out

    def distinct_items(self) -> list[Item]:
        """Each distinct market item that reached a client, once, in first-send order."""
        seen: set[int] = set()
        out: list[Item] = []
        for record in self._records:
            if not record.lost and record.seq not in seen:
                seen.add(record.seq)
                out.append(record.item)
        return out

    def stats(self) -> dict[str, int]:
        counters = vars(self.stats_counters).copy()
        counters["active"] = len(self._conns)
        counters["authenticated"] = sum(1 for c in self._conns.values() if c.authenticated)
        counters["distinct"] = len(self._distinct)
        return counters

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    def active_connections(self, key: str | None = None) -> int:
        """Open connections, or authenticated ones holding a slot of `key`."""
        if key is None:
            return len(self._conns)
        return len(self._slots.get(key, ()))

    @property
    def finished(self) -> bool:
        """`total_events` produced and everything queued written."""
        return self._finished.is_set()

    async def wait_finished(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._finished.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_sent(self, n: int, timeout: float) -> bool:
        """Wait until at least `n` distinct items were sent; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.stats()["distinct"] < n:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), min(remaining, 0.05))
        return True

    # --- connection handling ----------------------------------------------------------

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path in ("/v2/clock", "/v2/calendar"):
            return self._trading_api(connection, request, path, query)
        if path == self._rest_bars_path:
            return self._rest_bars(connection, request, query)
        if path in self._rest_tick_paths:
            channel, transform = self._rest_tick_paths[path], self.stream.transform
            page = functools.partial(rest_ticks_page, channel=channel, transform=transform)
            return self._rest_bars(connection, request, query, page)
        if not self.stream.path.match(path):
            where = self.stream.url_path("{feed}")
            return connection.respond(HTTPStatus.NOT_FOUND, f"not found: use {where}\n")
        return None

    def _trading_api(
        self, connection: ServerConnection, request: Request, path: str, query: str
    ) -> Response:
        """Alpaca's trading API clock and calendar, as plain HTTP on the stream's port."""
        headers = request.headers
        if not self._clock_available:
            return _json_response(connection, HTTPStatus.SERVICE_UNAVAILABLE, {"message": "down"})
        key = headers.get("APCA-API-KEY-ID")
        if key is None or self.config.keys.get(key) != headers.get("APCA-API-SECRET-KEY"):
            return _json_response(connection, HTTPStatus.UNAUTHORIZED, {"message": "unauthorized."})
        self.stats_counters.clock_requests += 1
        now = datetime.now(UTC)
        if path == "/v2/clock":
            return _json_response(connection, HTTPStatus.OK, _clock_reply(now, self.market_open))
        params = dict(part.partition("=")[::2] for part in query.split("&") if part)
        try:
            start = date.fromisoformat(params.get("start") or now.date().isoformat())
            end = date.fromisoformat(params.get("end") or start.isoformat())
        except ValueError:
            return _json_response(connection, HTTPStatus.BAD_REQUEST, {"message": "bad date"})
        days = [] if not self.market_open else _every_day(start, min(end, start + timedelta(366)))
        return _json_response(connection, HTTPStatus.OK, days)

    def _rest_bars(
        self,
        connection: ServerConnection,
        request: Request,
        query: str,
        page: Callable[[Market, dict[str, list[str]]], dict[str, Any]] | None = None,
    ) -> Response:
        """Alpaca's historical bars (`GET /v2/stocks/bars`, `/v1beta3/crypto/{loc}/bars` for
        the simulator's own location, `/v1beta1/options/bars`; 1-minute bars) from the same
        market the stream sends: each closed minute's bar as its latest revision, sorted by
        symbol then time, paged by `limit` with an opaque `next_page_token`. With `page`:
        another endpoint of that API (trades, quotes: `rest_ticks_page`), with the same
        credentials check, 429s and refusals (one request counter for all of them)."""
        counters = self.stats_counters
        counters.rest_requests += 1
        n = counters.rest_requests
        status = self._rest_status(request, n)
        self.rest_log.append((time.monotonic(), status))
        if status == 429:
            counters.rest_rate_limited += 1
            response = _json_response(connection, HTTPStatus.TOO_MANY_REQUESTS,
                                      {"message": "too many requests."})  # fmt: skip
            reset = int(time.time() + self.config.rest_reset_seconds + 0.999)
            for name, value in (("X-RateLimit-Limit", "200"), ("X-RateLimit-Remaining", "0"),
                                ("X-RateLimit-Reset", str(reset))):  # fmt: skip
                response.headers[name] = value
            return response
        if status != 200:
            counters.rest_refused += 1
            return _json_response(connection, HTTPStatus(status), {"message": "refused"})
        try:
            body = (page or rest_bars_page)(self.market, parse_qs(query))
        except ValueError as exc:
            return _json_response(connection, HTTPStatus.BAD_REQUEST, {"message": str(exc)})
        return _json_response(connection, HTTPStatus.OK, body)

    def _rest_status(self, request: Request, n: int) -> int:
        headers = request.headers
        key = headers.get("APCA-API-KEY-ID")
        anonymous = key is None and self.stream.rest_open
        if not anonymous and (
            key is None or self.config.keys.get(key) != headers.get("APCA-API-SECRET-KEY")
        ):
            return 401
        if self._rest_refusal is not None:
            return self._rest_refusal
        every = self.config.rest_429_every
        if every is not None and n % every == 0:
            return 429
        return 200

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        headers = ws.request.headers
        use_msgpack = headers.get("Content-Type", "").startswith(MSGPACK_CONTENT_TYPE)
        conn = _Conn(
            id=self._next_conn_id,
            ws=ws,
            use_msgpack=use_msgpack,
            subs={channel: {} for channel in self._channels},
        )
        self._next_conn_id += 1
        self._conns[conn.id] = conn
        self.stats_counters.connections += 1
        conn.sender = asyncio.create_task(self._sender(conn), name=f"sim-send-{conn.id}")
        try:
            if self.stream.msgpack_only and not use_msgpack:
                # Alpaca's docs say only that the stream is msgpack only; what it answers a
                # JSON client is undocumented: here, an error and a close.
                self._send_error(conn, 400, f"the {self.stream.name} stream is msgpack only")
            self._control(conn, [{"T": "success", "msg": "connected"}])
            header_key = headers.get("APCA-API-KEY-ID")
            if header_key is not None:
                self._auth(conn, header_key, headers.get("APCA-API-SECRET-KEY"))
            if not conn.authenticated and not conn.closing:
                conn.auth_timer = asyncio.get_running_loop().call_later(
                    self.config.auth_timeout, self._auth_timed_out, conn
                )
            async for message in ws:
                if not conn.closing:
                    self._on_message(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self._forget(conn)
            if conn.sender is not None:
                conn.stopped = True
                conn.wake.set()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(conn.sender, 1.0)

    def _forget(self, conn: _Conn) -> None:
        conn.closing = True
        conn.space.set()
        if conn.auth_timer is not None:
            conn.auth_timer.cancel()
        self._conns.pop(conn.id, None)
        if conn.key is not None:
            self._slots.get(conn.key, set()).discard(conn.id)
        self._check_finished()

    def _auth_timed_out(self, conn: _Conn) -> None:
        if not conn.authenticated and not conn.closing:
            self._send_error(conn, 404)

    def _on_message(self, conn: _Conn, message: str | bytes) -> None:
        parsed = _parse_client_message(message)
        if parsed is None:
            self._send_error(conn, 400, close=False)
            return
        action = parsed.get("action") if isinstance(parsed, dict) else None
        if action == "auth":
            if conn.authenticated:
                self._send_error(conn, 403, close=False)
            else:
                self._auth(conn, parsed.get("key"), parsed.get("secret"))
        elif action in ("subscribe", "unsubscribe"):
            if not conn.authenticated:
                self._send_error(conn, 401, close=False)
            else:
                self._subscribe(conn, parsed, add=action == "subscribe")
        elif not conn.authenticated:
            self._send_error(conn, 401, close=False)
        else:
            self._send_error(conn, 400, close=False)

    def _auth(self, conn: _Conn, key: object, secret: object) -> None:
        if conn.auth_timer is not None:
            conn.auth_timer.cancel()
        ok = isinstance(key, str) and self.config.keys.get(key) == secret
        if self._reject_auth or not ok:
            self.stats_counters.auth_failures += 1
            self._send_error(conn, 402)
            return
        assert isinstance(key, str)
        slots = self._slots.setdefault(key, set())
        if self._refuse or len(slots) >= self.config.connection_limit:
            self.stats_counters.refused += 1
            self._send_error(conn, 406)
            return
        slots.add(conn.id)
        conn.key = key
        conn.authenticated = True
        conn.dup_pool.extend(self._history.get(key, ()))
        self._control(conn, [{"T": "success", "msg": "authenticated"}])

    def _subscribe(self, conn: _Conn, message: dict[str, Any], *, add: bool) -> None:
        changes: dict[str, list[str]] = {}
        for channel in self._channels:
            value = message.get(channel)
            if value is None:
                continue
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                self._send_error(conn, 400, close=False)
                return
            changes[channel] = value
        if add and self._omit:
            changes = self._leave_out(conn, changes)
        if add:
            limit = self.config.symbol_limit
            if limit is not None:
                symbols = {s for subs in conn.subs.values() for s in subs}
                symbols.update(s for v in changes.values() for s in v)
                if len(symbols - {"*"}) > limit:
                    self._send_error(conn, 405, close=False)
                    return
            for channel, symbols in changes.items():
                conn.subs[channel].update(dict.fromkeys(symbols))
        else:
            for channel, symbols in changes.items():
                for symbol in symbols:
                    conn.subs[channel].pop(symbol, None)
        self._control(conn, [self._subscription_message(conn)])
        subscribed = sum(1 for c in self._conns.values() if c.subscribed)
        if subscribed >= self.config.start_after_subscribers:
            self._market_started.set()

    def _leave_out(self, conn: _Conn, changes: dict[str, list[str]]) -> dict[str, list[str]]:
        """The omit_from_subscription fault: drop the symbols still to be left out."""
        left_out = {
            symbol
            for symbol, replies in self._omit.items()
            if replies is None or conn.omitted[symbol] < replies
        }
        asked = {s for symbols in changes.values() for s in symbols} & left_out
        for symbol in asked:
            conn.omitted[symbol] += 1
            self.stats_counters.omitted_from_subscription += 1
        return {ch: [s for s in symbols if s not in asked] for ch, symbols in changes.items()}

    def _subscription_message(self, conn: _Conn) -> dict[str, Any]:
        reply: dict[str, Any] = {"T": "subscription"}
        for channel in self._channels:
            reply[channel] = list(conn.subs[channel])
            if channel == "lulds" and self.stream.companions:
                reply["corrections"] = list(conn.subs["trades"])
                reply["cancelErrors"] = list(conn.subs["trades"])
        return reply

    # --- writing ----------------------------------------------------------------------

    def _encode(self, conn: _Conn, messages: list[dict[str, Any]]) -> _Frame:
        if conn.use_msgpack:
            return _Frame(msgpack.packb(messages), False, "control")
        return _Frame(orjson.dumps(messages), True, "control")

    def _control(self, conn: _Conn, messages: list[dict[str, Any]]) -> None:
        self._enqueue(conn, self._encode(conn, messages))

    def _send_error(self, conn: _Conn, code: int, msg: str | None = None, close: bool = True):
        if conn.closing:
            return
        text = msg or (ERROR_MEANINGS[code][0] if code in ERROR_MEANINGS else "error")
        self.stats_counters.errors_sent += 1
        self._control(conn, [{"T": "error", "code": code, "msg": text}])
        if close:
            self._enqueue(conn, _Frame(b"", False, "close"))
            conn.closing = True
            conn.pending.clear()
            conn.space.set()

    def _enqueue(self, conn: _Conn, frame: _Frame) -> None:
        if conn.closing or conn.stalled:
            return
        conn.queue.append(frame)
        conn.wake.set()

    def _flush(self, conn: _Conn) -> None:
        """Turn the connection's pending items into frames of at most max_items_per_frame."""
        size = self.config.max_items_per_frame
        pending, conn.pending = conn.pending, []
        for start in range(0, len(pending), size):
            chunk = pending[start : start + size]
            parts = [p.encoded(conn.use_msgpack) for p, _ in chunk]
            if conn.use_msgpack:
                data = msgpack_array_header(len(parts)) + b"".join(parts)
            else:
                data = b"[" + b",".join(parts) + b"]"
            self._enqueue(conn, _Frame(data, not conn.use_msgpack, "data", chunk))
        limit = self.config.slow_client_frames
        if limit is not None and self.config.rate and len(conn.queue) > limit:
            conn.queue.clear()
            self._send_error(conn, 407)

    async def _sender(self, conn: _Conn) -> None:
        """The only writer of a connection: keeps control replies and data in order."""
        ws = conn.ws
        try:
            while True:
                while not conn.queue:
                    if conn.stopped:
                        return
                    self._check_finished()
                    conn.wake.clear()
                    await conn.wake.wait()
                if conn.stopped:
                    return
                frame = conn.queue.popleft()
                if len(conn.queue) <= _BACKPRESSURE_LOW:
                    conn.space.set()
                if frame.kind == "close":
                    await ws.close()
                    return
                if ws.protocol.state is not State.OPEN:
                    return
                # websockets writes synchronously inside send() when the state is OPEN, so
                # recording first is exact; a later drop takes back what stayed buffered.
                records = self._record(conn, frame)
                conn.recent.append((_wire_size(len(frame.data)), records))
                await ws.send(frame.data, text=frame.text)
        except ConnectionClosed:
            return

    def _record(self, conn: _Conn, frame: _Frame) -> list[SentRecord]:
        counters = self.stats_counters
        if frame.kind == "junk":
            counters.malformed += 1
            return []
        if frame.kind != "data" or not frame.items:
            return []
        sent_at = time.time() if self.config.record_send_times else 0.0
        records = [
            SentRecord(conn.id, p.seq, p.item, duplicate, sent_at=sent_at)
            for p, duplicate in frame.items
        ]
        self._records.extend(records)
        self._distinct.update(r.seq for r in records)
        history = self._history.setdefault(conn.key, deque(maxlen=256))
        for p, duplicate in frame.items:
            if not duplicate:
                history.append(p)
        counters.frames += 1
        counters.items += len(records)
        counters.duplicates += sum(1 for r in records if r.duplicate)
        self._progress.set()
        return records

    def _take_back_unflushed(self, conn: _Conn) -> None:
        """Mark as lost the trailing frames still (even partly) in the write buffer."""
        buffered = _buffered(conn)
        counters = self.stats_counters
        lost_seqs: set[int] = set()
        while buffered > 0 and conn.recent:
            wire, records = conn.recent.pop()
            buffered -= wire
            for record in records:
                record.lost = True
                lost_seqs.add(record.seq)
                counters.items -= 1
                counters.lost += 1
                counters.duplicates -= int(record.duplicate)
            if records:
                counters.frames -= 1
        if lost_seqs:
            self._distinct = {r.seq for r in self._records if not r.lost}
            history = self._history.get(conn.key)
            if history is not None:
                kept = [p for p in history if p.seq not in lost_seqs]
                history.clear()
                history.extend(kept)

    def _junk(self, use_msgpack: bool) -> tuple[bytes, bool]:
        kind = self._junk_cursor % 6
        self._junk_cursor += 1
        ts = self.market.now
        if kind == 0:
            return b'[{"T":"t","S":', True  # truncated JSON
        if kind == 1:
            return b"\xc1\xc1\xc1", False  # 0xc1 is never valid msgpack
        if kind == 2:
            messages: Any = {"T": "t", "S": "SPY", "t": ts}  # not an array
        elif kind == 3:
            messages = [{"T": "zz", "S": "SPY", "t": ts}]  # unknown type
        elif kind == 4:
            messages = [{"T": "t", "i": 0, "p": 1.0, "s": 1, "t": ts}]  # no S
        else:
            messages = [{"T": "q", "S": "SPY", "bp": 1.0, "ap": 1.01}]  # no t
        if use_msgpack:
            return msgpack.packb(messages), False
        return orjson.dumps(messages), True

    # --- the market pump --------------------------------------------------------------

    async def _pump(self) -> None:
        """Pull items from the market at `rate` and fan them out to subscribers."""
        await self._market_started.wait()
        loop = asyncio.get_running_loop()
        rate = self.config.rate or 0.0
        chunk = max(self.config.max_items_per_frame * 4, 200)
        t0, done_at_t0 = loop.time(), 0
        while (total := self.config.total_events) is None or self.market.emitted < total:
            remaining = chunk if total is None else total - self.market.emitted
            if rate > 0:
                await asyncio.sleep(self.config.flush_interval)
                due = int((loop.time() - t0) * rate) - (self.market.emitted - done_at_t0)
                if due > rate:  # stalled for over a second: do not burst the backlog
                    t0, done_at_t0 = loop.time(), self.market.emitted
                    due = int(rate * self.config.flush_interval) or 1
                if (total := self.config.total_events) is not None:  # end_feed() may have
                    remaining = total - self.market.emitted  # run during the sleep
                n = min(due, remaining, max(chunk, int(rate * 0.1)))
                if n <= 0:
                    continue
            else:
                if not any(c.subscribed for c in self._conns.values()):
                    await asyncio.sleep(0.01)
                    continue
                n = min(chunk, remaining)
            self._dispatch(self.market.next_events(n))
            if rate <= 0:
                await self._backpressure()
                await asyncio.sleep(0)
        self._check_finished()

    def _dispatch(self, items: Iterable[Item]) -> None:
        conns = [
            c
            for c in self._conns.values()
            if c.authenticated and not c.closing and not c.stalled and not c.starved
        ]
        size = self.config.max_items_per_frame
        counters = self.stats_counters
        transform = None if self.stream.name == "stocks" else self.stream.transform
        for item in items:
            counters.produced += 1
            if transform is None:
                produced = Produced(
                    counters.produced, item, SUBSCRIPTION_BY_TYPE[item["T"]], item["S"]
                )
            else:
                converted = transform(item)
                if converted is None:  # the stream has no such item
                    counters.unsent += 1
                    continue
                produced = Produced(
                    counters.produced, converted, *self.stream.subscription_of(converted)
                )
            targets = [c for c in conns if c.wants(produced.subscription, produced.symbol)]
            if not targets:
                counters.unsent += 1
                continue
            for conn in targets:
                conn.pending.append((produced, False))
                conn.dup_pool.append(produced)
                if self.duplicate_ratio > 0 and self._dup_rng.random() < self.duplicate_ratio:
                    self._add_duplicate(conn)
                if len(conn.pending) >= size:
                    self._flush(conn)
        for conn in conns:
            if conn.pending:
                self._flush(conn)

    def _add_duplicate(self, conn: _Conn) -> None:
        """Re-send an item queued earlier on this connection or written on an earlier one of
        the same key (as after a reconnect). Order guarantees the original goes out first."""
        pool = conn.dup_pool
        candidate = pool[self._dup_rng.randrange(len(pool))]
        if conn.wants(candidate.subscription, candidate.symbol):
            conn.pending.append((candidate, True))

    async def _backpressure(self) -> None:
        """Unpaced mode: wait while any client has a long queue (instead of a 407)."""
        for conn in list(self._conns.values()):
            while len(conn.queue) > _BACKPRESSURE_HIGH and not conn.closing:
                conn.space.clear()
                await conn.space.wait()

    def _check_finished(self) -> None:
        total = self.config.total_events
        if total is None or self._finished.is_set() or self.market.emitted < total:
            return
        if any(c.queue or c.pending for c in self._conns.values() if not c.stopped):
            return
        self._finished.set()


def _parse_client_message(message: str | bytes) -> Any:
    """JSON text, or a binary frame holding msgpack (or, leniently, JSON); None if neither."""
    if isinstance(message, bytes):
        try:
            return msgpack.unpackb(message, raw=False)
        except Exception:
            pass
    try:
        return orjson.loads(message)
    except orjson.JSONDecodeError:
        return None


_REST_MAX_LIMIT = 10_000


def _query_value(params: dict[str, list[str]], name: str, default: str | None = None) -> str:
    """A REST query parameter's first value, or `default`; missing without one: a 400."""
    values = params.get(name)
    if not values:
        if default is None:
            raise ValueError(f"missing {name}")
        return default
    return values[0]


def rest_bars_page(market: Market, params: dict[str, list[str]]) -> dict[str, Any]:
    """One page of historical bars over `market` (see Simulator._rest_bars)."""

    one = functools.partial(_query_value, params)

    if one("timeframe") not in ("1Min", "1T"):
        raise ValueError("the simulator serves 1Min bars only")
    symbols = sorted({s for s in one("symbols").split(",") if s})
    start_ns = parse_base_time(one("start"))
    end_ns = parse_base_time(one("end"))
    limit = int(one("limit", "1000"))
    if not 1 <= limit <= _REST_MAX_LIMIT:
        raise ValueError("limit must be 1..10000")
    after = _page_position(one("page_token", ""))
    entries = [
        (symbol, bar)
        for symbol in symbols
        for bar in bars_between(market, symbol, start_ns, end_ns)
        if after is None or (symbol, bar["t"]) >= after
    ]
    page, rest = entries[:limit], entries[limit:]
    out: dict[str, list[dict[str, Any]]] = {}
    for symbol, bar in page:
        out.setdefault(symbol, []).append(
            {"t": bar["t"][:19] + "Z", **{k: bar[k] for k in ("o", "h", "l", "c", "v", "n", "vw")}}
        )
    token = None
    if rest:
        symbol, bar = rest[0]
        token = base64.urlsafe_b64encode(f"{symbol}|{bar['t']}".encode()).decode()
    return {"bars": out, "next_page_token": token}


_TICK_KIND = {"trades": "t", "quotes": "q"}


def rest_ticks_page(
    market: Market,
    params: dict[str, list[str]],
    channel: str,
    transform: Callable[[Item], Item | None] = lambda item: item,
) -> dict[str, Any]:
    """One page of a stream's historical trades or quotes (`/v2/stocks/trades`,
    `/v1beta3/crypto/{loc}/quotes`, `/v1beta1/options/trades`, ...) over `market`: the
    items the stream sends (or sent, or would have sent to a dropped connection), made the
    stream's items by its `transform` (a crypto quote the stream sends as an order book is
    no quote here), without `T` and `S`, `t` as the stream writes it, sorted by symbol then
    time, paged like the bars."""

    one = functools.partial(_query_value, params)

    kind = _TICK_KIND[channel]
    symbols = sorted({s for s in one("symbols").split(",") if s})
    try:
        start, end = timestamps.canonical(one("start")), timestamps.canonical(one("end"))
    except ValueError as exc:
        raise ValueError(f"bad start or end: {exc}") from None
    limit = int(one("limit", "1000"))
    if not 1 <= limit <= _REST_MAX_LIMIT:
        raise ValueError("limit must be 1..10000")
    if one("sort", "asc") != "asc":
        raise ValueError("the simulator serves sort=asc only")
    after = _page_position(one("page_token", ""))
    entries = [
        (symbol, item)
        for symbol in symbols
        for item in stream_ticks(ticks_between(market, kind, symbol, start, end), kind, transform)
        if after is None or (symbol, item["t"]) >= after
    ]
    page, rest = entries[:limit], entries[limit:]
    out: dict[str, list[dict[str, Any]]] = {}
    for symbol, item in page:
        out.setdefault(symbol, []).append({k: v for k, v in item.items() if k not in ("T", "S")})
    token = None
    if rest:
        symbol, item = rest[0]
        token = base64.urlsafe_b64encode(f"{symbol}|{item['t']}".encode()).decode()
    return {channel: out, "next_page_token": token}


def stream_ticks(
    items: Iterable[Item], kind: str, transform: Callable[[Item], Item | None]
) -> list[Item]:
    """The market's trades or quotes (`kind`) as the stream sends them: transformed, and
    only those that stay a `kind`."""
    out = []
    for item in items:
        sent = transform(item)
        if sent is not None and sent["T"] == kind:
            out.append(sent)
    return out


def _page_position(token: str) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        symbol, _, t = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("bad page_token") from exc
    return symbol, t


def _json_response(connection: ServerConnection, status: HTTPStatus, body: Any) -> Response:
    response = connection.respond(status, orjson.dumps(body).decode())
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def _clock_reply(now: datetime, is_open: bool) -> dict[str, Any]:
    """`/v2/clock` in Alpaca's shape (Eastern-time offsets, like the real API). Open: the
    next close is a day away; closed: the next open is."""
    eastern = timezone_eastern()
    soon, later = now + timedelta(days=1), now + timedelta(days=1, hours=6, minutes=30)
    next_open, next_close = (later, soon) if is_open else (soon, later)
    return {
        "timestamp": now.astimezone(eastern).isoformat(),
        "is_open": is_open,
        "next_open": next_open.astimezone(eastern).isoformat(timespec="seconds"),
        "next_close": next_close.astimezone(eastern).isoformat(timespec="seconds"),
    }


def _every_day(start: date, end: date) -> list[dict[str, str]]:
    """An always-open calendar: every date a trading day from 00:00 to 23:59 Eastern."""
    days = (end - start).days + 1
    return [
        {"date": (start + timedelta(n)).isoformat(), "open": "00:00", "close": "23:59"}
        for n in range(max(0, days))
    ]


def timezone_eastern() -> Any:
    from ray_forwarder.alpaca.market_clock import market_zone

    return market_zone() or UTC


def _buffered(conn: _Conn) -> int:
    transport = conn.ws.transport
    if transport is None or transport.is_closing():
        return 0
    return transport.get_write_buffer_size()
