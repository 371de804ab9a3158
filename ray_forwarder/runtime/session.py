"""One WebSocket session to an Alpaca stream, kept alive across failures: a thin asyncio
pump around a sans-I/O `StreamConnection` (`alpaca/connection.py`).

The protocol object decides everything (handshake, the subscription check and its re-sends,
error -> action, liveness probe, data staleness); this module only moves frames between the
socket and it, wakes it at its deadlines, reports to the owner, and reconnects with jittered
exponential back-off (or stops, for errors that retrying cannot fix: `FatalSessionError`).
Connect/disconnect points: `_one_connection` (a socket opened and handshaken) and `run`
(`disconnected` / `reconnecting` reported to the owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import websockets
from websockets.asyncio.client import ClientConnection, connect

from ray_forwarder.alpaca.connection import (
    RESUBSCRIBE_DELAYS,
    Disconnect,
    Items,
    MarketDataConnection,
    Output,
    Report,
    State,
    StreamConnection,
    Timing,
)
from ray_forwarder.alpaca.events import DataItem, Skipped
from ray_forwarder.alpaca.streams import STOCKS, StreamDefinition
from ray_forwarder.core.envelope import utc_now_iso
from ray_forwarder.runtime.backoff import Backoff

log = logging.getLogger(__name__)

__all__ = ["RESUBSCRIBE_DELAYS", "AlpacaSession", "FatalSessionError", "SessionConfig"]


class FatalSessionError(RuntimeError):
    """The feed refused us in a way that retrying cannot fix."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code


class SessionHandler(Protocol):
    """What the session reports to its owner (the shard)."""

    def on_items(self, items: list[DataItem], ingest_ts: str, received: float) -> None: ...

    def on_skipped(self, skipped: Skipped) -> None: ...

    def on_state(self, state: str, info: dict[str, object]) -> None: ...


@dataclass(frozen=True)
class SessionConfig:
    url: str
    key: str
    secret: str
    subscriptions: Mapping[str, list[str]]
    wire_format: str = "msgpack"
    reconnect_initial: float = 1.0
    reconnect_max: float = 60.0
    connection_limit_backoff: float = 90.0
    handshake_timeout: float = 15.0
    #: Silence before a liveness probe, and again before the stream is declared stale.
    stale_stream_seconds: float = 0.0  # 0 = never
    #: No data item for this long, while subscribed to trades or quotes and the market is
    #: open, = stale data: reconnect. 0 = never.
    data_stale_seconds: float = 0.0
    resubscribe_delays: tuple[float, ...] = RESUBSCRIBE_DELAYS
    stream: StreamDefinition = STOCKS

    def connection(self) -> StreamConnection:
        """The protocol object for this stream's family."""
        timing = Timing(
            handshake_timeout=self.handshake_timeout,
            stale_stream_seconds=self.stale_stream_seconds,
            data_stale_seconds=self.data_stale_seconds,
            connection_limit_backoff=self.connection_limit_backoff,
            resubscribe_delays=self.resubscribe_delays,
        )
        if self.stream.connection_factory is not None:
            return self.stream.connection_factory(self, timing)  # type: ignore[no-any-return]
        return MarketDataConnection(
            self.stream, self.key, self.secret, self.subscriptions,
            wire_format=self.wire_format, timing=timing, url=self.url,
        )  # fmt: skip

    def __repr__(self) -> str:  # the secret must never reach a log line
        return f"SessionConfig(url={self.url!r}, key=<masked>, subscriptions=...)"


class _Retry(Exception):
    """Internal: end this connection and reconnect after `delay` (None = backoff)."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class AlpacaSession:
    """The asyncio pump around one `StreamConnection` (the protocol lives there)."""

    def __init__(
        self,
        config: SessionConfig,
        handler: SessionHandler,
        backoff: Backoff | None = None,
        market_open: Callable[[], bool] | None = None,
        backlogged: Callable[[], bool] | None = None,
    ) -> None:
        self._config = config
        self._handler = handler
        self._backoff = backoff or Backoff(config.reconnect_initial, config.reconnect_max)
        self._market_open = market_open or (lambda: True)
        self._backlogged = backlogged or (lambda: False)
        self._stopping = asyncio.Event()
        self._ws: ClientConnection | None = None
        self.connection: StreamConnection = config.connection()
        self.connects = 0
        self.reconnects = 0
        self._timer_moved = asyncio.Event()
        self._ended: Disconnect | None = None  # what the timer decided, for the read loop

    # counters and subscription state live in the protocol object
    @property
    def subscribed(self) -> bool:
        return self.connection.subscribed

    @property
    def missing(self) -> dict[str, list[str]]:
        return self.connection.missing

    @property
    def unserved(self) -> set[tuple[str, str]]:
        return self.connection.unserved

    @property
    def last_data(self) -> float:
        return self.connection.last_data

    @property
    def resubscribes(self) -> int:
        return self.connection.counters.resubscribes

    @property
    def stale_reconnects(self) -> int:
        return self.connection.counters.stale_reconnects

    @property
    def stale_data_reconnects(self) -> int:
        return self.connection.counters.stale_data_reconnects

    @property
    def stale_data_deferred(self) -> int:
        return self.connection.counters.stale_data_deferred

    async def stop(self) -> None:
        """Stop reading: close the socket and make `run()` return."""
        self._stopping.set()
        if self._ws is not None:
            await self._ws.close()

    async def run(self) -> None:
        """Keep a subscribed session until `stop()`; raise FatalSessionError on fatal errors."""
        while not self._stopping.is_set():
            try:
                await self._one_connection()
                if self._stopping.is_set():
                    return
                reason, delay = "server closed the connection", None
            except _Retry as retry:
                reason, delay = retry.reason, retry.delay
            except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                reason, delay = f"{type(exc).__name__}: {exc}", None
            finally:
                self._ws = None
                self.connection.connection_lost()
            if self._stopping.is_set():
                return
            # connect/disconnect point: a gap in the data may start here
            self._handler.on_state("disconnected", {"reason": reason})
            wait = self._backoff.next_delay() if delay is None else delay
            self.reconnects += 1
            self._handler.on_state("reconnecting", {"delay_s": round(wait, 3), "reason": reason})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=wait)

    async def _one_connection(self) -> None:
        cfg = self._config
        conn = self.connection
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
            self._ended = None
            conn.connect(time.monotonic())
            timer = asyncio.create_task(self._timers(ws), name="session-timers")
            try:
                await self._flush(ws)
                backlogged = self._backlogged
                async for frame in ws:
                    await self._act(ws, conn.receive_frame(frame, time.monotonic()))
                    if backlogged():
                        # websockets hands over queued frames without suspending: while
                        # the owner's sends lag, let them run between frames, or a burst
                        # would be read to its end (into memory) before any batch leaves.
                        await asyncio.sleep(0)
            except websockets.exceptions.ConnectionClosed:
                if self._ended is None:
                    raise
            finally:
                timer.cancel()
            if self._ended is not None:
                self._end(self._ended)

    async def _act(self, ws: ClientConnection, outputs: list[Output]) -> None:
        """Hand one frame's outputs to the owner, in order, then write what is due."""
        received = time.monotonic()
        handler = self._handler
        for out in outputs:
            kind = type(out)
            if kind is Items:
                handler.on_items(out.items, utc_now_iso(), received)  # type: ignore[union-attr]
            elif kind is Skipped:
                handler.on_skipped(out)  # type: ignore[arg-type]
            elif kind is Report:
                self._report(out)  # type: ignore[arg-type]
            elif kind is Disconnect:
                self._end(out)  # type: ignore[arg-type]
        if len(outputs) != 1 or type(outputs[0]) is not Items:
            # not a plain data frame: a control message may have set an earlier deadline
            self._timer_moved.set()
        await self._flush(ws)

    def _report(self, report: Report) -> None:
        if report.state == "subscribed":
            self._backoff.reset()
        self._handler.on_state(report.state, report.info)

    async def _flush(self, ws: ClientConnection) -> None:
        for message in self.connection.data_to_send():
            await ws.send(message)

    def _end(self, disconnect: Disconnect) -> None:
        if disconnect.fatal:
            self._stopping.set()
            raise FatalSessionError(disconnect.code, disconnect.reason)
        raise _Retry(disconnect.reason, disconnect.delay)

    async def _timers(self, ws: ClientConnection) -> None:
        """Wake at the protocol's deadlines (handshake timeout, subscription re-sends,
        liveness probe, data staleness) and act on what it decides; a decision to end the
        connection closes the socket, and the read loop raises it."""
        conn = self.connection
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            while True:
                deadline = conn.next_deadline()
                self._timer_moved.clear()
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._timer_moved.wait(), wait)
                now = time.monotonic()
                deadline = conn.next_deadline()
                if deadline is None or now < deadline:
                    continue
                outputs = conn.on_deadline(now, self._market_is_open_if_needed(conn))
                for out in outputs:
                    if type(out) is Report:
                        self._report(out)  # type: ignore[arg-type]
                    elif type(out) is Disconnect:
                        self._ended = out  # type: ignore[assignment]
                await self._flush(ws)
                if self._ended is not None:
                    await ws.close()
                    return

    def _market_is_open_if_needed(self, conn: StreamConnection) -> bool:
        return self._market_is_open() if conn.state is State.STREAMING else True

    def _market_is_open(self) -> bool:
        try:
            return bool(self._market_open())
        except Exception:  # a broken clock must not stop the session: assume open
            log.warning("market clock check failed; assuming open", exc_info=True)
            return True
