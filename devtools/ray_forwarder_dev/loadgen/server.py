"""Replays a pre-built feed over Alpaca's v2 protocol: greeting, auth, subscription reply,
then data frames, flat out or at a fixed rate, stamping each frame's send time.

The clock starts when `connections` clients have subscribed; only then are frames sent.
Each frame is stamped with `time.time()` just before it is handed to the socket (websockets
writes synchronously when the connection is open, as the simulator relies on too), so
"send -> broker append" latency can be computed afterwards from the stamps.
Auth accepts any non-empty key and secret: this is a load source, not a fake of Alpaca's
account rules (the simulator is).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ray_forwarder.alpaca.channels import MARKET_DATA_CHANNELS
from ray_forwarder_dev.loadgen.feed import Feed, Frames, frames_for

MSGPACK_CONTENT_TYPE = "application/msgpack"


@dataclass
class ConnectionLog:
    """What one connection was sent: the frames and the wall-clock time of each write."""

    frames: Frames
    stamps: list[float] = field(default_factory=list)
    closed_early: bool = False


@dataclass
class _Client:
    ws: ServerConnection
    use_msgpack: bool
    subscription: dict[str, list[str]] = field(default_factory=dict)
    authenticated: bool = False
    key_id: str = ""  # the API key it authenticated with: tells the connections apart


class ReplayServer:
    def __init__(
        self,
        feed: Feed,
        *,
        connections: int = 1,
        rate: float = 0.0,
        items_per_frame: int = 50,
        on_started=None,
    ) -> None:
        self.feed = feed
        self.connections = connections
        self.rate = rate
        self.items_per_frame = items_per_frame
        self.logs: list[ConnectionLog] = []
        self._clients: list[_Client] = []
        self._all_subscribed = asyncio.Event()
        self.finished = asyncio.Event()
        self._on_started = on_started
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        self._server = await serve(self._handle, "127.0.0.1", 0, compression=None, max_size=1 << 20)
        self._task = asyncio.create_task(self._replay())
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/v2/sip"

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # --- protocol ---------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        content_type = ws.request.headers.get("Content-Type", "")
        client = _Client(ws, content_type.startswith(MSGPACK_CONTENT_TYPE))
        await self._control(client, {"T": "success", "msg": "connected"})
        try:
            async for message in ws:
                await self._on_message(client, message)
        except ConnectionClosed:
            pass

    async def _on_message(self, client: _Client, message: str | bytes) -> None:
        try:
            parsed = (
                msgpack.unpackb(message) if isinstance(message, bytes) else orjson.loads(message)
            )
        except Exception:
            parsed = None
        action = parsed.get("action") if isinstance(parsed, dict) else None
        if action == "auth" and parsed.get("key") and parsed.get("secret"):
            client.authenticated = True
            client.key_id = str(parsed["key"])
            await self._control(client, {"T": "success", "msg": "authenticated"})
        elif action == "subscribe" and client.authenticated:
            for channel in MARKET_DATA_CHANNELS:
                value = parsed.get(channel)
                if isinstance(value, list):
                    merged = dict.fromkeys([*client.subscription.get(channel, []), *value])
                    client.subscription[channel] = list(merged)
            reply: dict[str, Any] = {"T": "subscription"}
            for channel in MARKET_DATA_CHANNELS:
                reply[channel] = client.subscription.get(channel, [])
            await self._control(client, reply)
            if client not in self._clients:
                self._clients.append(client)
                if len(self._clients) >= self.connections:
                    self._all_subscribed.set()
        else:
            code, msg = (
                (400, "invalid syntax") if client.authenticated else (401, "not authenticated")
            )
            await self._control(client, {"T": "error", "code": code, "msg": msg})

    async def _control(self, client: _Client, message: dict[str, Any]) -> None:
        if client.use_msgpack:
            await client.ws.send(msgpack.packb([message]))
        else:
            await client.ws.send(orjson.dumps([message]), text=True)

    # --- replay -----------------------------------------------------------------------

    async def _replay(self) -> None:
        await self._all_subscribed.wait()
        # Everything is encoded here, before the clock starts.
        self.logs = [
            ConnectionLog(
                frames_for(
                    self.feed,
                    c.subscription,
                    use_msgpack=c.use_msgpack,
                    items_per_frame=self.items_per_frame,
                )
            )
            for c in self._clients
        ]
        total = sum(log.frames.items for log in self.logs)
        start = time.monotonic()
        if self._on_started is not None:
            self._on_started()
        await asyncio.gather(
            *(
                self._send_all(client, log, total, start)
                for client, log in zip(self._clients, self.logs, strict=True)
            )
        )
        self.finished.set()

    async def _send_all(
        self, client: _Client, log: ConnectionLog, total: int, start: float
    ) -> None:
        ws, frames, stamps = client.ws, log.frames, log.stamps
        text = frames.text
        # At a fixed rate, each connection gets its share of it.
        rate = self.rate * frames.items / total if self.rate > 0 and total else 0.0
        sent_items = 0
        clock = time.time
        try:
            for payload, members in zip(frames.payloads, frames.members, strict=True):
                if rate > 0:
                    delay = start + sent_items / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                stamps.append(clock())
                await ws.send(payload, text=text)
                sent_items += len(members)
        except ConnectionClosed:
            log.closed_early = True
            del stamps[len(stamps) - 1 :]  # the frame whose write failed was not sent

    # --- accounting -------------------------------------------------------------------

    def connection_labels(self) -> list[str]:
        """Each connection's API key id, in the order of `sent()`'s connection numbers."""
        return [c.key_id for c in self._clients]

    def sent(self) -> tuple[list[tuple[str, float, int]], int]:
        """(item key, first send time, connection number) per distinct item sent, and the
        number of writes (redeliveries included)."""
        first: dict[int, tuple[float, int]] = {}
        writes = 0
        origin = self.feed.origin
        for number, log in enumerate(self.logs):
            for stamp, members in zip(log.stamps, log.frames.members, strict=False):
                writes += len(members)
                for index in members:
                    first.setdefault(origin[index], (stamp, number))
        keys = self.feed.keys
        return [(keys[i], at, number) for i, (at, number) in first.items()], writes
