"""A real WebSocket server speaking Alpaca's trading-stream protocol (`trade_updates`).

Path `/stream`, like `wss://paper-api.alpaca.markets/stream`. It answers `auth` (and the
older `authenticate` form) with an `authorization` message, `listen` with `listening`, and
then sends the order lifecycles of `OrderFlow` to every connection that listens to
`trade_updates`, one event per frame — in **binary** frames holding JSON by default (the
paper endpoint's behaviour), or text frames (`binary_frames=False`, the live endpoint's).

Faults on demand, as for the market-data simulator: abrupt drops, refused authorization,
malformed frames, duplicated events (byte-identical re-sends, also across reconnects of a
key), and `listening` replies that leave `trade_updates` out. Accounting is exact: an event
counts as sent once it is written to the socket, and a drop waits until the written bytes
left the buffer, so "every event sent arrives exactly once" is checkable. Events are
produced only while some connection listens (the account is quiet otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ray_forwarder_dev.sim.orders import OrderFlow, OrdersConfig, TradeData
from ray_forwarder_dev.sim.thread import SimulatorThread

log = logging.getLogger(__name__)

TRADE_UPDATES = "trade_updates"
STREAM_PATH = "/stream"


class TradingSimConfig(BaseModel):
    """Trading simulator settings. `rate`: events per real second (0: as fast as read)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 0
    keys: dict[str, str] = Field(default_factory=lambda: {"sim-key": "sim-secret"})
    symbols: tuple[str, ...] = ("SPY", "QQQ", "AAPL")
    seed: int = 0
    rate: float = 200.0
    total_events: int | None = None
    duplicate_ratio: float = 0.0
    binary_frames: bool = True  # paper: binary frames holding JSON; live: text
    open_orders: int = 4
    auth_timeout: float = 10.0


@dataclass(slots=True, eq=False)
class SentEvent:
    conn_id: int
    index: int  # position in the order flow, from 1
    data: TradeData
    duplicate: bool


@dataclass(slots=True, eq=False)
class _Produced:
    index: int
    data: TradeData
    frame: bytes  # the encoded message, cached so duplicates are byte-identical


@dataclass(eq=False)
class _Conn:
    id: int
    ws: ServerConnection
    key: str | None = None
    authorized: bool = False
    listening: bool = False
    listens: int = 0
    #: (frame, the event it carries or None, kind: "event" | "dup" | "control" | "junk" |
    #: "close"), in write order
    queue: deque[tuple[bytes, _Produced | None, str]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    sender: asyncio.Task[None] | None = None


@dataclass
class TradingSimStats:
    produced: int = 0
    connections: int = 0
    events: int = 0  # trade updates written, duplicates included
    duplicates: int = 0
    malformed: int = 0
    auth_failures: int = 0
    listens: int = 0
    omitted_from_listening: int = 0
    dropped_connections: int = 0


class TradingSimulator:
    """The trading-stream server, on one asyncio loop (see `TradingSimulatorThread`)."""

    def __init__(self, config: TradingSimConfig | None = None) -> None:
        self.config = config or TradingSimConfig()
        self.flow = OrderFlow(
            OrdersConfig(
                symbols=self.config.symbols,
                seed=self.config.seed,
                open_orders=self.config.open_orders,
            )
        )
        self.stats_counters = TradingSimStats()
        self.duplicate_ratio = self.config.duplicate_ratio
        self._conns: dict[int, _Conn] = {}
        self._next_id = 1
        self._sent: list[SentEvent] = []
        self._history: dict[str | None, deque[_Produced]] = {}
        self._rng = random.Random(self.config.seed ^ 0x7EAD)
        self._reject_auth = False
        self._omit_listens: int | None = 0  # listens per connection answered without it
        self._junk_cursor = 0
        self._server: Server | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> TradingSimulator:
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._check_path,
            max_size=1 << 20,
            close_timeout=2.0,
        )
        self._pump_task = asyncio.create_task(self._pump(), name="trading-sim-pump")
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

    @property
    def port(self) -> int:
        assert self._server is not None, "simulator not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}{STREAM_PATH}"

    # --- faults -----------------------------------------------------------------------

    def reject_auth(self, flag: bool = True) -> None:
        """While set, every authorization is refused (`unauthorized`, then close)."""
        self._reject_auth = flag

    def omit_from_listening(self, replies: int | None = 1) -> None:
        """Leave `trade_updates` out of the first `replies` listening replies of each
        connection (None: all of them); such a connection gets no events until a later
        `listen` is granted."""
        self._omit_listens = replies

    def set_duplicate_ratio(self, ratio: float) -> None:
        self.duplicate_ratio = ratio

    def inject_malformed(self, n: int = 1) -> int:
        """Queue `n` junk frames to every listening client (never counted as events)."""
        conns = [c for c in self._conns.values() if c.listening and not c.closing]
        for conn in conns:
            for _ in range(n):
                self._enqueue(conn, self._junk(), None, "junk")
        return len(conns)

    async def drop_connections(self) -> int:
        """Cut every client abruptly (no close frame) once what was written to it left
        the socket buffer: what was sent arrives, nothing queued is written (or counted)."""
        conns = list(self._conns.values())
        for conn in conns:
            conn.closing = True
            conn.queue.clear()
            conn.wake.set()
        senders = [c.sender for c in conns if c.sender is not None]
        if senders:
            await asyncio.wait(senders, timeout=2.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while loop.time() < deadline and any(_buffered(c) for c in conns):
            await asyncio.sleep(0.005)
        for conn in conns:
            conn.ws.transport.abort()
        self.stats_counters.dropped_connections += len(conns)
        return len(conns)

    # --- accounting -------------------------------------------------------------------

    @property
    def sent(self) -> list[SentEvent]:
        return list(self._sent)

    def distinct_events(self) -> list[TradeData]:
        """Each distinct event that reached a client, once, in first-send order."""
        seen: set[int] = set()
        out = []
        for record in self._sent:
            if record.index not in seen:
                seen.add(record.index)
                out.append(record.data)
        return out

    def stats(self) -> dict[str, int]:
        counters = vars(self.stats_counters).copy()
        counters["active"] = len(self._conns)
        counters["distinct"] = len({r.index for r in self._sent})
        return counters

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    # --- connections ------------------------------------------------------------------

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.partition("?")[0] != STREAM_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"not found: use {STREAM_PATH}\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Conn(self._next_id, ws)
        self._next_id += 1
        self._conns[conn.id] = conn
        self.stats_counters.connections += 1
        conn.sender = asyncio.create_task(self._sender(conn))
        try:
            async with asyncio.timeout(self.config.auth_timeout):
                while not conn.authorized and not conn.closing:
                    self._on_message(conn, await ws.recv())
            async for message in ws:
                self._on_message(conn, message)
        except (ConnectionClosed, TimeoutError):
            pass
        finally:
            conn.closing = True
            conn.wake.set()
            self._conns.pop(conn.id, None)
            if conn.sender is not None:
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await conn.sender

    def _on_message(self, conn: _Conn, raw: str | bytes) -> None:
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            self._reply(conn, "error", {"error": "invalid message"})  # shape undocumented
            return
        action = message.get("action")
        data = message.get("data") if isinstance(message.get("data"), dict) else {}
        if action in ("auth", "authenticate"):
            self._authorize(conn, message, data, action)
        elif action == "listen":
            self._listen(conn, data)

    def _authorize(self, conn: _Conn, message: dict[str, Any], data: dict[str, Any], action: str):
        if action == "auth":
            key, secret = message.get("key"), message.get("secret")
        else:
            key, secret = data.get("key_id"), data.get("secret_key")
        if self._reject_auth or not isinstance(key, str) or self.config.keys.get(key) != secret:
            self.stats_counters.auth_failures += 1
            reply = {"action": action, "message": "access key verification failed"}
            self._reply(conn, "authorization", {**reply, "status": "unauthorized"})
            self._enqueue(conn, b"", None, "close")  # close after the reply
            conn.closing = True
            return
        conn.key, conn.authorized = key, True
        self._reply(conn, "authorization", {"action": action, "status": "authorized"})

    def _listen(self, conn: _Conn, data: dict[str, Any]) -> None:
        if not conn.authorized:
            self._reply(conn, "authorization", {"action": "listen", "status": "unauthorized"})
            return
        streams = data.get("streams")
        wanted = [s for s in streams if isinstance(s, str)] if isinstance(streams, list) else []
        conn.listens += 1
        self.stats_counters.listens += 1
        granted = [s for s in wanted if s == TRADE_UPDATES]
        omit = self._omit_listens
        if granted and (omit is None or conn.listens <= omit):
            granted = []
            self.stats_counters.omitted_from_listening += 1
        conn.listening = bool(granted)
        self._reply(conn, "listening", {"streams": granted})

    # --- writing ----------------------------------------------------------------------

    def _reply(self, conn: _Conn, stream: str, data: dict[str, Any]) -> None:
        self._enqueue(conn, orjson.dumps({"stream": stream, "data": data}), None, "control")

    def _enqueue(self, conn: _Conn, frame: bytes, event: _Produced | None, kind: str) -> None:
        if conn.closing:
            return
        conn.queue.append((frame, event, kind))
        conn.wake.set()

    async def _sender(self, conn: _Conn) -> None:
        """The connection's only writer: replies and events in order."""
        ws, binary = conn.ws, self.config.binary_frames
        try:
            while True:
                while not conn.queue:
                    if conn.closing:
                        return
                    conn.wake.clear()
                    await conn.wake.wait()
                frame, event, kind = conn.queue.popleft()
                if kind == "close":
                    await ws.close()
                    return
                if event is not None:
                    self._record(conn, event, duplicate=kind == "dup")
                elif kind == "junk":
                    self.stats_counters.malformed += 1
                await ws.send(frame, text=not binary)
        except ConnectionClosed:
            return

    def _record(self, conn: _Conn, event: _Produced, duplicate: bool) -> None:
        self._sent.append(SentEvent(conn.id, event.index, event.data, duplicate))
        counters = self.stats_counters
        counters.events += 1
        counters.duplicates += int(duplicate)
        if not duplicate:
            self._history.setdefault(conn.key, deque(maxlen=64)).append(event)

    def _junk(self) -> bytes:
        """Malformed frames, in turn."""
        kinds: list[bytes] = [
            b'{"stream":"trade_updates","data":{"event":',  # truncated JSON
            b'[{"stream":"trade_updates"}]',  # not an object
            b'{"data":{"event":"fill"}}',  # no stream
            b'{"stream":"account_updates","data":{}}',  # unknown stream
            orjson.dumps({"stream": TRADE_UPDATES, "data": {"event": "fill", "order": {}}}),
            orjson.dumps({"stream": TRADE_UPDATES, "data": {"event": 7, "order": {"id": "x"}}}),
            orjson.dumps(
                {"stream": TRADE_UPDATES, "data": {"event": "new", "order": {"id": "a:b c"}}}
            ),
        ]
        frame = kinds[self._junk_cursor % len(kinds)]
        self._junk_cursor += 1
        return frame

    # --- the order flow ---------------------------------------------------------------

    async def _pump(self) -> None:
        total, rate = self.config.total_events, self.config.rate
        interval = 0.01
        budget = 0.0
        while total is None or self.flow.emitted < total:
            await asyncio.sleep(interval if rate > 0 else 0)
            targets = [c for c in self._conns.values() if c.listening and not c.closing]
            if not targets:
                budget = 0.0
                continue
            budget = min(budget + rate * interval, max(rate, 1.0)) if rate > 0 else 50.0
            n = int(budget)
            if total is not None:
                n = min(n, total - self.flow.emitted)
            budget -= n
            for data in self.flow.next_events(n):
                self.stats_counters.produced += 1
                frame = orjson.dumps({"stream": TRADE_UPDATES, "data": data})
                produced = _Produced(self.stats_counters.produced, data, frame)
                for conn in targets:
                    self._enqueue(conn, frame, produced, "event")
                    if self.duplicate_ratio > 0 and self._rng.random() < self.duplicate_ratio:
                        self._add_duplicate(conn, produced)
        while any(c.queue for c in self._conns.values() if not c.closing):
            await asyncio.sleep(0.01)
        self._finished.set()

    def _add_duplicate(self, conn: _Conn, latest: _Produced) -> None:
        """Re-send, byte for byte, an event written earlier to this key (maybe on an
        earlier connection, as after a reconnect) or the one just queued."""
        pool = list(self._history.get(conn.key, ())) or [latest]
        candidate = pool[self._rng.randrange(len(pool))]
        self._enqueue(conn, candidate.frame, candidate, "dup")


def _buffered(conn: _Conn) -> int:
    transport = conn.ws.transport
    if transport is None or transport.is_closing():
        return 0
    return transport.get_write_buffer_size()


class TradingSimulatorThread(SimulatorThread):
    """`with TradingSimulatorThread(TradingSimConfig(...)) as sim: connect to sim.url`:
    the trading simulator on its own loop in a daemon thread (see `SimulatorThread`)."""

    def __init__(self, config: TradingSimConfig | None = None, *, start_timeout: float = 10.0):
        self.config = config or TradingSimConfig()  # type: ignore[assignment]
        self.simulator = TradingSimulator(self.config)  # type: ignore[assignment]
        self._start_timeout = start_timeout
        self._loop = None
        self._thread = None
        self._ready = threading.Event()
        self._error = None
        self._port = None

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}{STREAM_PATH}"

    def reject_auth(self, flag: bool = True) -> None:
        self.call("reject_auth", flag)

    def omit_from_listening(self, replies: int | None = 1) -> None:
        self.call("omit_from_listening", replies)

    def distinct_events(self) -> list[TradeData]:
        return self.call("distinct_events")

    def sent_events(self) -> list[SentEvent]:
        return self.call(lambda: self.simulator.sent)

    @property
    def finished(self) -> bool:
        return self.call(lambda: self.simulator.finished)
