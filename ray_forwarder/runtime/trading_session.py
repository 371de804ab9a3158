"""One WebSocket session to Alpaca's trading stream (`trade_updates`), kept alive.

A thin asyncio pump around the sans-I/O `TradingConnection`: it opens the socket, feeds
every frame to the connection, hands trade updates to its owner (the shard) and writes what
the connection wants sent. It reports to the same `SessionHandler` as the market-data
session and keeps the same counters, so the shard, health and metrics treat both alike:

- a refused authorization is fatal (`FatalSessionError`), like market data's 402: the
  shard stops and the driver exits with one clear line, never a reconnect loop;
- a `listening` reply that leaves a stream out is handled like a subscription mismatch:
  `listen` is re-sent after each of `resubscribe_delays`, then what is still missing is
  reported (`subscription_mismatch`, counted as unserved, `/healthz` degraded);
- transient failures (drops, timeouts, an `unauthorized` for a later action) reconnect
  with jittered exponential backoff; a silent socket is probed with a re-sent `listen`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import websockets
from websockets.asyncio.client import ClientConnection, connect

from ray_forwarder.alpaca.events import Skipped
from ray_forwarder.alpaca.trading import (
    TRADE_UPDATES,
    Authorized,
    AuthRejected,
    Listening,
    TradeUpdate,
    TradingConnection,
    TradingState,
    Unauthorized,
)
from ray_forwarder.core.envelope import utc_now_iso
from ray_forwarder.runtime.backoff import Backoff
from ray_forwarder.runtime.session import (
    RESUBSCRIBE_DELAYS,
    FatalSessionError,
    SessionHandler,
)

log = logging.getLogger(__name__)

#: `unserved` pairs are (channel, symbol) for market data; here ("listen", stream).
LISTEN = "listen"


@dataclass(frozen=True)
class TradingSessionConfig:
    url: str
    key: str
    secret: str
    streams: tuple[str, ...] = (TRADE_UPDATES,)
    auth_style: str = "auth"
    wire_format: str = "json"
    reconnect_initial: float = 1.0
    reconnect_max: float = 60.0
    handshake_timeout: float = 15.0
    stale_stream_seconds: float = 0.0  # 0 = never probe
    resubscribe_delays: tuple[float, ...] = RESUBSCRIBE_DELAYS

    def __repr__(self) -> str:  # the secret must never reach a log line
        return f"TradingSessionConfig(url={self.url!r}, key=<masked>, streams={self.streams})"


class _Retry(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TradingSession:
    """`run()` until `stop()`; raises FatalSessionError when authorization is refused."""

    def __init__(
        self, config: TradingSessionConfig, handler: SessionHandler, backoff: Backoff | None = None
    ) -> None:
        self._config = config
        self._handler = handler
        self._backoff = backoff or Backoff(config.reconnect_initial, config.reconnect_max)
        self._stopping = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._conn: TradingConnection | None = None
        self.connects = 0
        self.reconnects = 0
        self.subscribed = False
        self.stale_reconnects = 0
        self.stale_data_reconnects = 0  # no data watchdog: orders are rare by nature
        self.resubscribes = 0  # re-sent `listen`s for a stream the reply left out
        self.missing: list[str] = []
        self.unserved: set[tuple[str, str]] = set()
        self.unknown_events: dict[str, int] = {}
        self.heartbeats = 0
        self.last_data = 0.0
        self._last_frame = 0.0
        self._probe_sent: float | None = None
        self._replies_due = 0  # listening replies to our own probes and re-sends
        self._reply_seen = asyncio.Event()
        self._repair: asyncio.Task[None] | None = None
        self._stale: str | None = None
        self._retry: str | None = None

    async def stop(self) -> None:
        self._stopping.set()
        if self._ws is not None:
            await self._ws.close()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._one_connection()
                if self._stopping.is_set():
                    return
                reason = "server closed the connection"
            except _Retry as retry:
                reason = retry.reason
            except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._ws = None
                self.subscribed = False
            if self._stopping.is_set():
                return
            self._handler.on_state("disconnected", {"reason": reason})
            wait = self._backoff.next_delay()
            self.reconnects += 1
            self._handler.on_state("reconnecting", {"delay_s": round(wait, 3), "reason": reason})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=wait)

    async def _one_connection(self) -> None:
        cfg = self._config
        conn = TradingConnection(
            cfg.key, cfg.secret, cfg.streams, wire_format=cfg.wire_format, auth_style=cfg.auth_style
        )
        self._conn = conn
        async with connect(
            cfg.url,
            additional_headers=conn.upgrade_headers(),
            open_timeout=cfg.handshake_timeout,
            max_size=None,
            max_queue=64,
            ping_interval=20,
            ping_timeout=20,
        ) as ws:
            self._ws = ws
            if self._stopping.is_set():
                return
            self.connects += 1
            self._probe_sent, self._replies_due, self._stale, self._retry = None, 0, None, None
            self._handler.on_state("connected", {"url": cfg.url})
            conn.start()
            await self._flush(ws)
            await asyncio.wait_for(self._handshake(ws), timeout=cfg.handshake_timeout)
            self._backoff.reset()
            self._last_frame = time.monotonic()
            watchdog = None
            if cfg.stale_stream_seconds > 0:
                watchdog = asyncio.create_task(self._watch_for_silence(ws))
            if self.missing:
                self._start_repair(ws)
            try:
                async for frame in ws:
                    self._on_frame(frame)
                    await self._flush(ws)
                    if self._retry is not None:
                        raise _Retry(self._retry)
            except websockets.exceptions.ConnectionClosed:
                if self._stale is None:
                    raise
            finally:
                for task in (watchdog, self._repair):
                    if task is not None:
                        task.cancel()
                self._repair = None
            if self._stale is not None:
                raise _Retry(self._stale)

    async def _handshake(self, ws: ClientConnection) -> None:
        """Read until the connection streams; data that comes first is still handled."""
        conn = self._conn
        assert conn is not None
        while conn.state is not TradingState.STREAMING:
            self._on_frame(await ws.recv())
            await self._flush(ws)
            if self._retry is not None:
                raise _Retry(self._retry)

    async def _flush(self, ws: ClientConnection) -> None:
        assert self._conn is not None
        for frame in self._conn.data_to_send():
            await ws.send(frame.payload, text=not frame.binary)

    def _on_frame(self, frame: bytes | str) -> None:
        """One frame -> the handler: trade updates first, then control events."""
        conn = self._conn
        assert conn is not None
        received = time.monotonic()
        self._last_frame = received
        self._probe_sent = None  # any frame proves the stream alive
        updates: list[TradeUpdate] = []
        controls = []
        for event in conn.receive_frame(frame):
            if type(event) is TradeUpdate:
                updates.append(event)
            elif type(event) is Skipped:
                self._handler.on_skipped(event)
            else:
                controls.append(event)
        if updates:
            self.last_data = received
            self._handler.on_items(updates, utc_now_iso(), received)  # type: ignore[arg-type]
        self.heartbeats = conn.heartbeats
        if conn.unknown_events:
            self._note_unknown_events(conn)
        for event in controls:
            self._control(event)

    def _control(self, event: object) -> None:
        if isinstance(event, Authorized):
            self._handler.on_state("authenticated", {})
        elif isinstance(event, Listening):
            self._on_listening(event)
        elif isinstance(event, AuthRejected):
            text = (
                f"trading stream authorization refused ({event.message}); check "
                "ALPACA_API_KEY_ID / ALPACA_SECRET_KEY and ALPACA_TRADING_ENV (paper keys "
                "work only on paper, live keys only on live)"
            )
            self._handler.on_state("error", {"stream": "authorization", "msg": event.message})
            self._stopping.set()
            raise FatalSessionError(None, text)
        elif isinstance(event, Unauthorized):
            self._handler.on_state("error", {"stream": "authorization", "msg": event.message})
            self._retry = f"trading stream: {event.message}"

    def _note_unknown_events(self, conn: TradingConnection) -> None:
        for name, count in conn.unknown_events.items():
            if name not in self.unknown_events:
                log.warning("trade update with an unknown event %r: forwarded", name[:64])
            self.unknown_events[name] = self.unknown_events.get(name, 0) + count
        conn.unknown_events.clear()

    # --- what we listen to --------------------------------------------------------------

    def _on_listening(self, reply: Listening) -> None:
        self.missing = reply.missing
        still = {(LISTEN, s) for s in reply.missing}
        if self.unserved and not self.unserved <= still:
            self.unserved &= still
            if not self.unserved:
                self._handler.on_state("subscription_repaired", {"resubscribes": self.resubscribes})
        self._reply_seen.set()
        info = {"streams": reply.streams, "missing": {LISTEN: reply.missing}}
        if not self.subscribed:
            self.subscribed = True
            self._handler.on_state("subscribed", info)
            return
        if still - self.unserved and self._ws is not None:
            self._start_repair(self._ws)
        if self._replies_due > 0:
            self._replies_due -= 1
            return
        self._handler.on_state("subscription_changed", info)

    def _start_repair(self, ws: ClientConnection) -> None:
        if self._repair is None or self._repair.done():
            self._repair = asyncio.create_task(self._complete_listen(ws))

    async def _complete_listen(self, ws: ClientConnection) -> None:
        """Ask again, with back-off, for the streams the reply left out; report the rest."""
        conn = self._conn
        assert conn is not None
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            for delay in self._config.resubscribe_delays:
                await asyncio.sleep(delay)
                if not self.missing:
                    return
                self.resubscribes += 1
                log.info("trading stream is not listening to %s; asking again", self.missing)
                self._reply_seen.clear()
                self._replies_due += 1
                conn.listen()
                await self._flush(ws)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reply_seen.wait(), self._config.handshake_timeout)
            lacking = {(LISTEN, s) for s in self.missing}
            if lacking - self.unserved:
                self.unserved |= lacking
                self._handler.on_state(
                    "subscription_mismatch",
                    {
                        "missing": {LISTEN: self.missing},
                        "unserved": len(self.unserved),
                        "resubscribes": self.resubscribes,
                    },
                )

    async def _watch_for_silence(self, ws: ClientConnection) -> None:
        """Probe a silent socket with a re-sent `listen`; no frame within as long again =
        stale: close, so that the session reconnects (see AlpacaSession)."""
        silence = self._config.stale_stream_seconds
        conn = self._conn
        assert conn is not None
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            while True:
                quiet = time.monotonic() - self._last_frame
                if quiet < silence:
                    await asyncio.sleep(silence - quiet)
                elif self._probe_sent is None:
                    self._probe_sent = time.monotonic()
                    self._replies_due += 1
                    conn.listen()
                    await self._flush(ws)
                    await asyncio.sleep(silence)
                else:
                    self.stale_reconnects += 1
                    self._stale = f"stale stream: no frame for {quiet:.1f}s"
                    await ws.close()
                    return
