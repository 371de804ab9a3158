"""One WebSocket session to Alpaca's market-data stream, kept alive across failures.

`AlpacaSession.run()` connects, waits for the greeting, authenticates, subscribes, checks
the subscription reply against what it asked for (asking again, with back-off, for what the
server left out), and then reads frames until told to stop. Transient failures reconnect
with jittered exponential backoff and resubscribe; errors that retrying cannot fix (402,
405, 409, 410, 400) raise `FatalSessionError` instead of looping. Two watchdogs run beside
the read loop: transport liveness (a silent socket is probed, then reconnected) and data
staleness (no data item while the market is open, however lively the socket: reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import websockets
from websockets.asyncio.client import ClientConnection, connect

from ray_forwarder.alpaca import codec
from ray_forwarder.alpaca.errors import ErrorAction, classify_error, describe_error
from ray_forwarder.alpaca.events import (
    Authenticated,
    Connected,
    DataItem,
    ServerError,
    Skipped,
    Subscription,
    Success,
)
from ray_forwarder.core.envelope import utc_now_iso
from ray_forwarder.runtime.backoff import Backoff

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Back-off (seconds) before each re-send of the part of a subscription the server's reply
#: left out; after the last one, what is still missing is reported as unserved.
RESUBSCRIBE_DELAYS = (1.0, 2.0, 4.0)
#: Channels whose silence during market hours means a stuck stream (bars are minutely).
DATA_STALE_CHANNELS = ("trades", "quotes")


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

    def __repr__(self) -> str:  # the secret must never reach a log line
        return f"SessionConfig(url={self.url!r}, key=<masked>, subscriptions=...)"


class _Retry(Exception):
    """Internal: end this connection and reconnect after `delay` (None = backoff)."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class _NotingData:
    """The owner's handler, noting when data items last arrived (for the staleness check)."""

    def __init__(self, handler: SessionHandler, session: AlpacaSession) -> None:
        self._handler = handler
        self._session = session

    def on_items(self, *args: Any, **kwargs: Any) -> None:
        items = args[0] if args else kwargs.get("items")
        if items:
            self._session.last_data = time.monotonic()
        self._handler.on_items(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)


class AlpacaSession:
    def __init__(
        self,
        config: SessionConfig,
        handler: SessionHandler,
        backoff: Backoff | None = None,
        market_open: Callable[[], bool] | None = None,
    ) -> None:
        self._config = config
        self._handler: SessionHandler = _NotingData(handler, self)
        self._backoff = backoff or Backoff(config.reconnect_initial, config.reconnect_max)
        self._market_open = market_open or (lambda: True)
        self._stopping = asyncio.Event()
        self._ws: ClientConnection | None = None
        self.connects = 0
        self.reconnects = 0
        self.subscribed = False
        self.stale_reconnects = 0
        self.stale_data_reconnects = 0
        self.stale_data_deferred = 0  # checks that found no data while the market was closed
        self.resubscribes = 0  # re-sends of a subscription's missing part
        #: What the latest subscription reply lacks of what we asked for, per channel.
        self.missing: dict[str, list[str]] = {}
        #: (channel, symbol) pairs still missing after every re-send: reported unserved.
        self.unserved: set[tuple[str, str]] = set()
        self.last_data = 0.0  # monotonic arrival of the latest data item
        self._data_window = 0.0  # staleness counts from here (subscribed, market opened)
        self._probe_sent: float | None = None  # monotonic time of a probe, until any frame
        self._replies_due = 0  # subscription replies to our own re-sends, not to report
        self._reply_seen = asyncio.Event()
        self._repair: asyncio.Task[None] | None = None
        self._last_frame = 0.0  # monotonic arrival of the latest frame
        self._stale: str | None = None  # why the watchdog closed the stream

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
                if self.subscribed:
                    self.subscribed = False
            if self._stopping.is_set():
                return
            self._handler.on_state("disconnected", {"reason": reason})
            wait = self._backoff.next_delay() if delay is None else delay
            self.reconnects += 1
            self._handler.on_state("reconnecting", {"delay_s": round(wait, 3), "reason": reason})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=wait)

    async def _one_connection(self) -> None:
        cfg = self._config
        headers = codec.connection_headers(cfg.wire_format)
        async with connect(
            cfg.url,
            additional_headers=headers,
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
            self._probe_sent, self._replies_due, self._stale = None, 0, None
            await asyncio.wait_for(self._handshake(ws), timeout=cfg.handshake_timeout)
            self._backoff.reset()
            self._last_frame = self._data_window = time.monotonic()
            watchdogs = []
            if cfg.stale_stream_seconds > 0:
                watchdogs.append(asyncio.create_task(self._watch_for_silence(ws)))
            if cfg.data_stale_seconds > 0 and any(
                cfg.subscriptions.get(channel) for channel in DATA_STALE_CHANNELS
            ):
                watchdogs.append(asyncio.create_task(self._watch_for_stale_data(ws)))
            if self.missing:
                self._start_repair(ws)
            try:
                async for frame in ws:
                    self._dispatch(frame)
            except websockets.exceptions.ConnectionClosed:
                if self._stale is None:
                    raise
            finally:
                for task in (*watchdogs, self._repair):
                    if task is not None:
                        task.cancel()
                self._repair = None
            if self._stale is not None:
                raise _Retry(self._stale)

    async def _watch_for_silence(self, ws: ClientConnection) -> None:
        """Close a subscribed stream that went silent, so that the session reconnects.

        Alpaca sends no JSON heartbeat, and WebSocket ping/pong (the `connect` keepalive)
        only proves that the peer's network stack answers, not that it still sends data.
        A quiet symbol set is silent legitimately, so silence alone is not enough: after
        `stale_stream_seconds` without a frame the session re-sends its subscribe message
        (idempotent) and the feed must answer with a subscription reply; if nothing at all
        arrives within as long again, the stream is stale. This runs beside the read loop,
        which only notes each frame's arrival time.
        """
        silence = self._config.stale_stream_seconds
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            while True:
                quiet = time.monotonic() - self._last_frame
                if quiet < silence:
                    await asyncio.sleep(silence - quiet)
                elif self._probe_sent is None:
                    log.info("no frame for %.1fs; probing with a re-sent subscribe", quiet)
                    self._probe_sent = time.monotonic()
                    self._replies_due += 1
                    await ws.send(codec.encode_subscribe(self._config.subscriptions))
                    await asyncio.sleep(silence)
                else:  # no frame since the probe, `silence` ago
                    self.stale_reconnects += 1
                    self._stale = f"stale stream: no frame for {quiet:.1f}s"
                    await ws.close()
                    return

    async def _watch_for_stale_data(self, ws: ClientConnection) -> None:
        """Close a stream that carries no data while the market is open.

        The transport watchdog cannot see this: a stuck upstream may still answer pings and
        re-sent subscribes. Trades and quotes of the subscribed symbols are never silent for
        `data_stale_seconds` during market hours; outside them silence is normal, so the
        window restarts while the market is closed (`market_open`, from Alpaca's clock).
        """
        limit = self._config.data_stale_seconds
        tick = limit / 4
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            while True:
                now = time.monotonic()
                if not self._market_is_open():
                    self._data_window = now
                    self.stale_data_deferred += 1
                    await asyncio.sleep(tick)
                    continue
                quiet = now - max(self.last_data, self._data_window)
                if quiet < limit:
                    await asyncio.sleep(min(tick, limit - quiet))
                    continue
                self.stale_data_reconnects += 1
                self._stale = f"stale data: no data item for {quiet:.1f}s while the market is open"
                await ws.close()
                return

    def _market_is_open(self) -> bool:
        try:
            return bool(self._market_open())
        except Exception:  # a broken clock must not stop the session: assume open
            log.warning("market clock check failed; assuming open", exc_info=True)
            return True

    # --- the subscription we asked for ------------------------------------------------------

    def _note_reply(self, reply: Subscription) -> None:
        """Compare a subscription reply (always the full current view) with what we asked
        for; pairs served again are no longer unserved."""
        self.missing = codec.missing_from_subscription(self._config.subscriptions, reply)
        still = _pairs(self.missing)
        if self.unserved and not self.unserved <= still:
            self.unserved &= still
            if not self.unserved:
                self._handler.on_state("subscription_repaired", {"resubscribes": self.resubscribes})

    def _start_repair(self, ws: ClientConnection) -> None:
        if self._repair is None or self._repair.done():
            self._repair = asyncio.create_task(self._complete_subscription(ws))

    async def _complete_subscription(self, ws: ClientConnection) -> None:
        """Ask again, with back-off, for what the server left out; report what stays out."""
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            for delay in self._config.resubscribe_delays:
                await asyncio.sleep(delay)
                if not self.missing:
                    return
                self.resubscribes += 1
                log.info("subscription lacks %d pair(s); asking again", len(_pairs(self.missing)))
                self._reply_seen.clear()
                self._replies_due += 1
                await ws.send(codec.encode_subscribe(self.missing))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reply_seen.wait(), self._config.handshake_timeout)
            lacking = _pairs(self.missing)
            if lacking - self.unserved:
                self.unserved |= lacking
                self._handler.on_state(
                    "subscription_mismatch",
                    {
                        "missing": self.missing,
                        "unserved": len(self.unserved),
                        "resubscribes": self.resubscribes,
                    },
                )

    def _on_subscription(self, reply: Subscription) -> None:
        self._note_reply(reply)
        self._reply_seen.set()
        if _pairs(self.missing) - self.unserved and self._ws is not None and self.subscribed:
            self._start_repair(self._ws)
        if self._replies_due > 0:
            self._replies_due -= 1
            log.debug("subscription re-send answered")
            return
        self._handler.on_state(
            "subscription_changed",
            {
                "channels": {name: len(s) for name, s in reply.channels.items()},
                "missing": self.missing,
            },
        )

    async def _handshake(self, ws: ClientConnection) -> None:
        cfg = self._config
        await self._expect(ws, Connected)
        self._handler.on_state("connected", {"url": cfg.url})
        await ws.send(codec.encode_auth(cfg.key, cfg.secret))
        await self._expect(ws, Authenticated)
        self._handler.on_state("authenticated", {})
        await ws.send(codec.encode_subscribe(cfg.subscriptions))
        reply = await self._expect(ws, Subscription)
        self._note_reply(reply)
        self.subscribed = True
        self._handler.on_state(
            "subscribed",
            {
                "channels": {name: len(symbols) for name, symbols in reply.channels.items()},
                "missing": self.missing,
            },
        )

    async def _expect(self, ws: ClientConnection, wanted: type[_T]) -> _T:
        """Read until a `wanted` control message; data that comes first is still handled,
        and a frame's data is handed over before its other control messages are acted on."""
        while True:
            frame = await ws.recv()
            received = time.monotonic()
            items: list[DataItem] = []
            controls: list[object] = []
            found: _T | None = None
            for event in codec.decode_frame(frame):
                if found is None and isinstance(event, wanted):
                    found = event
                elif isinstance(event, DataItem):
                    items.append(event)
                elif isinstance(event, Skipped):
                    self._handler.on_skipped(event)
                else:
                    controls.append(event)
            if items:
                self._handler.on_items(items, utc_now_iso(), received)
            for event in controls:
                self._control(event)
            if found is not None:
                return found

    def _dispatch(self, frame: bytes | str) -> None:
        """Hot path: one frame -> the handler, with one ingest timestamp per frame.

        Every data item of the frame reaches the handler before any control message in it
        is acted on, so `[trade, {"T":"error","code":500}]` forwards the trade and then
        reconnects: a server error costs no data that already arrived."""
        received = time.monotonic()
        self._last_frame = received
        self._probe_sent = None  # any frame proves the stream alive
        items: list[DataItem] = []
        controls: list[object] = []
        for event in codec.decode_frame(frame):
            kind = type(event)
            if kind is DataItem:
                items.append(event)  # type: ignore[arg-type]
            elif kind is Skipped:
                self._handler.on_skipped(event)  # type: ignore[arg-type]
            else:
                controls.append(event)
        if items:
            self._handler.on_items(items, utc_now_iso(), received)
        for event in controls:
            self._control(event)

    def _control(self, event: object) -> None:
        if isinstance(event, Skipped):
            self._handler.on_skipped(event)
        elif isinstance(event, ServerError):
            self._server_error(event)
        elif isinstance(event, Subscription):
            self._on_subscription(event)
        elif isinstance(event, Connected | Authenticated | Success):
            log.debug("control message %s", event)

    def _server_error(self, error: ServerError) -> None:
        action = classify_error(error.code)
        text = describe_error(error.code, error.msg)
        self._handler.on_state("error", {"code": error.code, "msg": error.msg})
        if action is ErrorAction.IGNORE:
            log.info("ignoring %s", text)
            return
        if action is ErrorAction.FATAL:
            self._stopping.set()
            raise FatalSessionError(error.code, text)
        if action is ErrorAction.RECONNECT_SLOW:
            raise _Retry(text, delay=max(self._config.connection_limit_backoff, 0.0))
        raise _Retry(text)


def _pairs(by_channel: Mapping[str, list[str]]) -> set[tuple[str, str]]:
    return {(channel, symbol) for channel, symbols in by_channel.items() for symbol in symbols}
