"""Alpaca's trading stream (`trade_updates`) without I/O: a connection state machine.

The trading stream is a different protocol from the market-data family
(docs.alpaca.markets/docs/websocket-streaming; docs/streams.md § 6): every message is one
JSON object `{"stream": …, "data": {…}}`, not an array of `{"T": …}` maps; there is no
greeting, so the client authenticates as soon as the socket is open::

    > {"action":"auth","key":"…","secret":"…"}          (or the older "authenticate" form)
    < {"stream":"authorization","data":{"status":"authorized","action":"authenticate"}}
    > {"action":"listen","data":{"streams":["trade_updates"]}}
    < {"stream":"listening","data":{"streams":["trade_updates"]}}
    < {"stream":"trade_updates","data":{"event":"fill","order":{…},…}}

The paper endpoint sends **binary** frames that hold JSON (UTF-8), live sends text frames:
the frame's opcode says nothing about the encoding, so frames are decoded by the negotiated
format (JSON unless msgpack was asked for with `Content-Type: application/msgpack`).

Two layers, neither touching a socket or a clock:

- `TradingProtocol`, one per socket: frames in, events out, frames to send
  (`data_to_send()`); the message-level states (`TradingState`).
- `TradingConnection`, the trading family's `StreamConnection` (`alpaca/connection.py`),
  driven by the same session pump as market data: reports, the fatal refusal, the re-asked
  `listen`, the liveness probe and the deadlines that need time (`now` is passed in).

A malformed frame, an unknown stream or an invalid trade update becomes a counted `Skipped`
event; an unknown `event` value is forwarded (the SDKs disagree on the list;
docs/streams.md § 6.3) and counted. Trade updates come out as `DataItem`s keyed by order id.
"""

from __future__ import annotations

import enum
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import orjson

from ray_forwarder.alpaca import timestamps
from ray_forwarder.alpaca.codec import MSGPACK_CONTENT_TYPE, _clip
from ray_forwarder.alpaca.connection import (
    ConnectionCounters,
    Disconnect,
    Items,
    Output,
    RepairSchedule,
    Report,
    State,
    Timing,
    report_unserved,
)
from ray_forwarder.alpaca.events import DataItem, Skipped
from ray_forwarder.alpaca.items import is_symbol
from ray_forwarder.alpaca.streams import StreamDefinition

log = logging.getLogger(__name__)

#: The one stream this forwarder listens to on the trading endpoint.
TRADE_UPDATES = "trade_updates"

#: Trade update events documented by Alpaca or sent by its SDKs (docs/streams.md § 6.3).
#: Others are forwarded too and counted as `unknown_events`: Alpaca adds events (e.g.
#: `accepted`, 2026-07) and the forwarder must not drop an order's facts for that.
KNOWN_EVENTS = frozenset(
    {
        "new", "fill", "partial_fill", "canceled", "expired", "done_for_day", "replaced",
        "rejected", "pending_new", "stopped", "pending_cancel", "pending_replace",
        "calculated", "suspended", "order_replace_rejected", "order_cancel_rejected",
        "accepted", "restated", "held", "pending_review",
    }
)  # fmt: skip

#: Order ids are UUIDs; accept any short token of URL-safe characters (no `:`, which
#: separates the dedup key's parts, no whitespace).
_ORDER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Event names: lower-case words joined by `_` (`partial_fill`), bounded.
_EVENT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
#: Where a trade update's event time comes from, in order: the event's own `timestamp`,
#: else the order's last change (a `new` event may carry no timestamp).
_ORDER_TIME_FIELDS = ("updated_at", "submitted_at", "created_at")
#: Documented decimal fields of a fill: strings in Alpaca's JSON; numbers tolerated.
_DECIMAL_FIELDS = ("price", "qty", "position_qty")
_DECIMAL_TYPES = (str, int, float, type(None))
_UNKNOWN_EVENTS_LOGGED_MAX = 64
HEARTBEAT = b"\x01"


class TradingState(enum.Enum):
    """Where a trading-stream connection stands."""

    CONNECTING = "connecting"  # socket open, nothing sent yet
    AUTHENTICATING = "authenticating"  # auth sent, waiting for `authorization`
    LISTENING = "listening"  # listen sent, waiting for `listening`
    STREAMING = "streaming"  # listening confirmed (maybe without every stream)
    CLOSED = "closed"  # authorization refused: nothing more to do on this socket


# --- events ------------------------------------------------------------------------------


@dataclass(slots=True)
class Authorized:
    """`{"stream":"authorization","data":{"status":"authorized"}}`."""


@dataclass(slots=True)
class AuthRejected:
    """Authorization refused: retrying with the same key cannot help (like market data's
    402). `message` is the server's text (never our secret)."""

    message: str


@dataclass(slots=True)
class Unauthorized:
    """`unauthorized` for something other than our auth (e.g. a `listen` the server took
    as unauthenticated): the session is not usable; reconnect and authenticate again."""

    message: str


@dataclass(slots=True)
class Listening:
    """The server's full set of streams listened to, and what it left out of ours."""

    streams: list[str]
    missing: list[str]


TradingEvent = DataItem | Authorized | AuthRejected | Unauthorized | Listening | Skipped


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One frame for the transport to write."""

    payload: bytes
    binary: bool


# --- the connection ----------------------------------------------------------------------


@dataclass(eq=False)
class TradingProtocol:
    """The trading stream's protocol for one socket; create a new one per connection.

    `auth_style` picks the request form: `auth` (`{"action":"auth","key","secret"}`, the
    current documentation) or `authenticate` (`{"action":"authenticate","data":{"key_id",
    "secret_key"}}`, what the released SDKs send). The reply is read the same way for both.
    """

    key: str = field(repr=False)
    secret: str = field(repr=False)
    streams: tuple[str, ...] = (TRADE_UPDATES,)
    wire_format: str = "json"
    auth_style: str = "auth"
    state: TradingState = TradingState.CONNECTING
    #: Unknown `event` values seen, forwarded anyway (bounded: junk cannot grow it).
    unknown_events: Counter[str] = field(default_factory=Counter)
    heartbeats: int = 0
    close_reason: str | None = None
    _outgoing: list[Outgoing] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:  # the secret must never reach a log line
        return f"TradingProtocol(state={self.state.value}, streams={list(self.streams)})"

    # --- client -> server ---------------------------------------------------------------

    def upgrade_headers(self) -> dict[str, str]:
        """Headers for the WebSocket upgrade: msgpack is chosen by Content-Type."""
        return {"Content-Type": MSGPACK_CONTENT_TYPE} if self.wire_format == "msgpack" else {}

    def start(self) -> None:
        """The socket is open: authenticate at once (the trading stream has no greeting)."""
        if self.state is not TradingState.CONNECTING:
            raise RuntimeError(f"start() in state {self.state.value}")
        self.state = TradingState.AUTHENTICATING
        if self.auth_style == "authenticate":
            message: dict[str, Any] = {
                "action": "authenticate",
                "data": {"key_id": self.key, "secret_key": self.secret},
            }
        else:
            message = {"action": "auth", "key": self.key, "secret": self.secret}
        self._send(message)

    def listen(self, streams: tuple[str, ...] | None = None) -> None:
        """Ask for the streams to listen to (the whole set: `listen` replaces, not adds).
        Also the liveness probe: the `listening` reply proves the stream alive."""
        if streams is not None:
            self.streams = streams
        self._send({"action": "listen", "data": {"streams": list(self.streams)}})

    def data_to_send(self) -> list[Outgoing]:
        """Frames queued for the transport, oldest first; the queue is emptied."""
        out, self._outgoing = self._outgoing, []
        return out

    def _send(self, message: dict[str, Any]) -> None:
        if self.wire_format == "msgpack":
            self._outgoing.append(Outgoing(msgpack.packb(message), binary=True))
        else:
            self._outgoing.append(Outgoing(orjson.dumps(message), binary=False))

    # --- server -> client ---------------------------------------------------------------

    def receive_frame(self, frame: bytes | str) -> list[TradingEvent]:
        """Events for one frame (text or binary), decoded by the negotiated format."""
        if frame == HEARTBEAT:  # alpaca-trade-api-js skips a 1-byte 0x01 frame as heartbeat
            self.heartbeats += 1
            return []
        message = _decode(frame, self.wire_format)
        if isinstance(message, Skipped):
            return [message]
        stream, data = message
        if stream == TRADE_UPDATES:
            update = decode_trade_update(data)
            if type(update) is DataItem and update.payload["event"] not in KNOWN_EVENTS:
                self._note_unknown_event(update.payload["event"])
            return [update]
        if stream == "authorization":
            return [self._on_authorization(data)]
        if stream == "listening":
            return [self._on_listening(data)]
        return [Skipped("unknown_type", f"stream={_clip(stream)}")]

    def _note_unknown_event(self, event: str) -> None:
        """Count an event name outside KNOWN_EVENTS (a bounded number of distinct ones)."""
        if event in self.unknown_events or len(self.unknown_events) < _UNKNOWN_EVENTS_LOGGED_MAX:
            self.unknown_events[event] += 1

    def _on_authorization(self, data: dict[str, Any]) -> TradingEvent:
        status = data.get("status")
        action = data.get("action")
        text = data.get("message") or data.get("error") or ""
        message = f"{status}" + (f": {_clip(text)}" if text else "")
        if status == "authorized":
            if self.state is TradingState.AUTHENTICATING:
                self.state = TradingState.LISTENING
                self.listen()
            return Authorized()
        if status != "unauthorized":
            return Skipped("invalid_item", f"authorization with status={_clip(status)}")
        if self.state is TradingState.AUTHENTICATING or action in ("auth", "authenticate"):
            self.state = TradingState.CLOSED
            self.close_reason = f"authorization refused ({message})"
            return AuthRejected(message)
        return Unauthorized(f"unauthorized for action {_clip(action)} ({message})")

    def _on_listening(self, data: dict[str, Any]) -> TradingEvent:
        streams = data.get("streams")
        if streams is None:
            streams = []
        if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
            return Skipped("invalid_item", f"listening with streams={_clip(streams)}")
        if self.state is TradingState.LISTENING:
            self.state = TradingState.STREAMING
        missing = [s for s in self.streams if s not in streams]
        return Listening(list(streams), missing)


def _decode(frame: bytes | str, wire_format: str) -> tuple[str, dict[str, Any]] | Skipped:
    """One frame -> (stream, data), or a `malformed_frame` skip."""
    try:
        if wire_format == "msgpack" and isinstance(frame, bytes):
            message = msgpack.unpackb(frame, raw=False, timestamp=0, strict_map_key=False)
        else:
            message = orjson.loads(frame)  # str, or bytes holding UTF-8 JSON (paper)
    except Exception as exc:  # every parser error means the same thing here
        return Skipped("malformed_frame", f"{type(exc).__name__}: {_clip(frame)}")
    if not isinstance(message, dict):
        return Skipped("malformed_frame", f"top level is not an object: {_clip(message)}")
    stream, data = message.get("stream"), message.get("data")
    if not isinstance(stream, str) or not isinstance(data, dict):
        return Skipped("malformed_frame", f"no stream name or data object: {_clip(message)}")
    return stream, data


def decode_trade_update(data: dict[str, Any]) -> DataItem | Skipped:
    """Validate one `trade_updates` data object; never raises for its content.

    The item's key (`DataItem.symbol`, as news uses its article id) is the order id: the
    record key, the seq key and the middle of the dedup key."""
    try:
        return _decode_trade_update(data)
    except Exception as exc:  # a defect here must cost one item, not the session
        return Skipped("invalid_item", f"trade update: {type(exc).__name__}: {_clip(data)}")


def _decode_trade_update(data: dict[str, Any]) -> DataItem | Skipped:
    event = data.get("event")
    if type(event) is not str or _EVENT.fullmatch(event) is None:
        return Skipped("invalid_item", f"trade update with event={_clip(event)}")
    order = data.get("order")
    if type(order) is not dict:
        return Skipped("invalid_item", f"{event} trade update without an order object")
    order_id = order.get("id")
    if type(order_id) is not str or _ORDER_ID.fullmatch(order_id) is None:
        return Skipped("invalid_item", f"{event} trade update with order.id={_clip(order_id)}")
    raw_symbol = order.get("symbol")  # empty for multi-leg orders
    if raw_symbol not in (None, "") and not is_symbol(raw_symbol):
        return Skipped("bad_symbol", f"{event} trade update with order.symbol={_clip(raw_symbol)}")
    for name in _DECIMAL_FIELDS:
        if type(data.get(name)) not in _DECIMAL_TYPES:
            return Skipped(
                "bad_field_type", f"{event} trade update with {name}={_clip(data[name])}"
            )
    if type(data.get("execution_id")) not in (str, type(None)):
        return Skipped("bad_field_type", f"{event} trade update with execution_id={_clip(data)}")
    source, raw_ts = _event_time(data, order)
    if raw_ts is None:
        return Skipped("bad_timestamp", f"{event} trade update without a timestamp")
    try:
        event_ts = timestamps.canonical(raw_ts)
    except ValueError as exc:
        return Skipped(
            "bad_timestamp", f"{event} trade update with {source}={_clip(raw_ts)}: {exc}"
        )
    return DataItem(TRADE_UPDATES, order_id, event_ts, data)


def _event_time(data: dict[str, Any], order: dict[str, Any]) -> tuple[str, object]:
    """The event's own `timestamp` if present (even when invalid: no silent fallback),
    else the order's latest change."""
    if data.get("timestamp") is not None:
        return "timestamp", data["timestamp"]
    for name in _ORDER_TIME_FIELDS:
        if order.get(name) is not None:
            return f"order.{name}", order[name]
    return "timestamp", None


# --- the trading family's StreamConnection ---------------------------------------------------

#: `missing` and `unserved` speak (channel, symbol) for market data; here ("listen", stream).
LISTEN = "listen"


@dataclass(eq=False)
class TradingConnection:
    """The trading family's `StreamConnection` (see `alpaca/connection.py`), driven by the
    same session pump as market data. One `TradingProtocol` per socket does the talking;
    this adds what outlives a socket and what needs time:

    - a refused authorization ends the session for good (`Disconnect(fatal=True)`, like
      market data's 402): retrying the same key cannot help;
    - an `unauthorized` for anything else, a handshake that times out, or a silent stream
      whose probe (a re-sent `listen`) stays unanswered: reconnect;
    - a `listening` reply that leaves a stream out is a subscription mismatch: `listen` is
      re-sent after each of `timing.resubscribe_delays`, then what is still missing is
      reported (`subscription_mismatch`) and counted unserved (`/healthz` degraded).
    """

    definition: StreamDefinition
    key: str = field(repr=False)
    secret: str = field(repr=False)
    streams: tuple[str, ...] = (TRADE_UPDATES,)
    wire_format: str = "json"
    auth_style: str = "auth"
    timing: Timing = field(default_factory=Timing)
    url: str = ""

    def __post_init__(self) -> None:
        self.state = State.CLOSED
        self.counters = ConnectionCounters()
        self.subscribed = False
        self.missing: dict[str, list[str]] = {}
        self.unserved: set[tuple[str, str]] = set()
        self.last_data = 0.0
        #: Event names outside KNOWN_EVENTS that were forwarded (bounded).
        self.unknown_events: Counter[str] = Counter()
        self.heartbeats = 0
        self._protocol: TradingProtocol | None = None
        self._reports: list[Report] = []
        self._handshake_by: float | None = None
        self._last_frame = 0.0
        self._probe_sent: float | None = None
        self._replies_due = 0
        self._repair: RepairSchedule | None = None

    def __repr__(self) -> str:  # the secret must never reach a log line
        return f"TradingConnection(url={self.url!r}, state={self.state.value})"

    # --- the interface ------------------------------------------------------------------

    def upgrade_headers(self) -> dict[str, str]:
        return {"Content-Type": MSGPACK_CONTENT_TYPE} if self.wire_format == "msgpack" else {}

    def connect(self, now: float) -> None:
        """No greeting on this stream: authenticate as soon as the socket is open."""
        self._protocol = TradingProtocol(
            self.key, self.secret, self.streams, self.wire_format, self.auth_style
        )
        self._protocol.start()
        self.state = State.AUTHENTICATING
        self.subscribed = False
        self._handshake_by = now + self.timing.handshake_timeout
        self._probe_sent, self._replies_due, self._repair = None, 0, None
        self._reports = [Report("connected", {"url": self.url})]

    def connection_lost(self) -> None:
        self.state = State.CLOSED
        self.subscribed = False
        self._handshake_by = self._probe_sent = None
        self._repair = None

    def data_to_send(self) -> list[str | bytes]:
        if self._protocol is None:
            return []
        return [
            f.payload if f.binary else f.payload.decode() for f in self._protocol.data_to_send()
        ]

    def receive_frame(self, frame: bytes | str, now: float) -> list[Output]:
        """One frame's outputs: reports due, skips, its trade updates, then what its
        control message causes."""
        protocol = self._protocol
        if protocol is None:
            return [Skipped("malformed_frame", "frame before the connection started")]
        self._last_frame = now
        self._probe_sent = None  # any frame proves the stream alive
        out: list[Output] = list(self._reports)
        self._reports.clear()
        items: list[DataItem] = []
        controls: list[TradingEvent] = []
        for event in protocol.receive_frame(frame):
            if type(event) is DataItem:
                items.append(event)
            elif type(event) is Skipped:
                out.append(event)
            else:
                controls.append(event)
        self.heartbeats = protocol.heartbeats
        if protocol.unknown_events:
            self._note_unknown(protocol)
        if items:
            self.last_data = now
            out.append(Items(items))
        for event in controls:
            if self._control(event, now, out):
                break
        return out

    def next_deadline(self) -> float | None:
        candidates = [self._handshake_by]
        if self.state is State.STREAMING:
            silence = self.timing.stale_stream_seconds
            if silence > 0:
                base = self._probe_sent if self._probe_sent is not None else self._last_frame
                candidates.append(base + silence)
            if self._repair is not None:
                candidates += [self._repair.due, self._repair.reply_by]
        due = [t for t in candidates if t is not None]
        return min(due) if due else None

    def on_deadline(self, now: float, market_open: bool = True) -> list[Output]:
        out: list[Output] = []
        if self._handshake_by is not None and now >= self._handshake_by:
            return self._close(Disconnect(f"handshake timed out in state {self.state.value}"), out)
        if self.state is not State.STREAMING:
            return out
        if self._silence_due(now, out):
            return out
        self._repair_due(now, out)
        return out

    # --- control messages ---------------------------------------------------------------

    def _control(self, event: TradingEvent, now: float, out: list[Output]) -> bool:
        """Act on one control event; True if the connection ends here."""
        if isinstance(event, Authorized):
            if self.state is State.AUTHENTICATING:
                self.state = State.SUBSCRIBING  # the protocol queued `listen`
                out.append(Report("authenticated", {}))
        elif isinstance(event, Listening):
            self._on_listening(event, now, out)
        elif isinstance(event, AuthRejected):
            out.append(Report("error", {"stream": "authorization", "msg": event.message[:200]}))
            text = (
                f"trading stream authorization refused ({event.message[:200]}); check "
                "ALPACA_API_KEY_ID / ALPACA_SECRET_KEY and ALPACA_TRADING_ENV (paper keys work "
                "only on paper, live keys only on live)"
            )
            self._close(Disconnect(text, fatal=True), out)
            return True
        elif isinstance(event, Unauthorized):
            out.append(Report("error", {"stream": "authorization", "msg": event.message[:200]}))
            self._close(Disconnect(f"trading stream: {event.message[:200]}"), out)
            return True
        return False

    def _on_listening(self, reply: Listening, now: float, out: list[Output]) -> None:
        self.missing = {LISTEN: reply.missing} if reply.missing else {}
        still = {(LISTEN, s) for s in reply.missing}
        if self.unserved and not self.unserved <= still:
            self.unserved &= still
            if not self.unserved:
                out.append(
                    Report("subscription_repaired", {"resubscribes": self.counters.resubscribes})
                )
        info: dict[str, object] = {"streams": reply.streams, "missing": self.missing}
        if self.state is State.SUBSCRIBING:
            self.state = State.STREAMING
            self.subscribed = True
            self._handshake_by = None
            self._last_frame = now
            out.append(Report("subscribed", info))
            if reply.missing:
                self._start_repair(now)
            return
        repair = self._repair
        if repair is not None and repair.reply_by is not None:
            self._repair_answered(now, out)
        if still - self.unserved:
            self._start_repair(now)
        if self._replies_due > 0:
            self._replies_due -= 1
            return
        out.append(Report("subscription_changed", info))

    def _note_unknown(self, protocol: TradingProtocol) -> None:
        for name, count in protocol.unknown_events.items():
            if name not in self.unknown_events:
                log.warning("trade update with an unknown event %r: forwarded", name[:64])
            self.unknown_events[name] += count
        protocol.unknown_events.clear()

    def _close(self, disconnect: Disconnect, out: list[Output]) -> list[Output]:
        self.connection_lost()
        out.append(disconnect)
        return out

    # --- re-asking for what the listening reply left out ----------------------------------

    def _start_repair(self, now: float) -> None:
        if self._repair is None:
            self._repair = RepairSchedule.begin(self.timing.resubscribe_delays, now)

    def _repair_due(self, now: float, out: list[Output]) -> None:
        repair = self._repair
        if repair is None:
            return
        if repair.reply_by is not None and now >= repair.reply_by:
            self._repair_answered(now, out)  # no reply in time: go on as if answered
        elif repair.due is not None and now >= repair.due:
            repair.due = None
            if not self.missing:
                self._repair = None
                return
            self.counters.resubscribes += 1
            log.info("trading stream is not listening to %s; asking again", self.missing[LISTEN])
            self._replies_due += 1
            self._listen()
            repair.reply_by = now + self.timing.handshake_timeout

    def _repair_answered(self, now: float, out: list[Output]) -> None:
        assert self._repair is not None
        if self._repair.answered(now, self.timing.resubscribe_delays):
            return
        self._repair = None
        lacking = {(LISTEN, s) for s in self.missing.get(LISTEN, ())}
        report_unserved(self.unserved, lacking, self.missing, self.counters.resubscribes, out)

    def _listen(self) -> None:
        if self._protocol is not None:
            self._protocol.listen()

    # --- liveness ---------------------------------------------------------------------------

    def _silence_due(self, now: float, out: list[Output]) -> bool:
        """A silent stream is probed with a re-sent `listen` (it replaces the set with the
        same set), whose `listening` reply proves it alive; nothing within as long again =
        stale. An account without orders is silent legitimately, hence the probe."""
        silence = self.timing.stale_stream_seconds
        if silence <= 0:
            return False
        quiet = now - self._last_frame
        if self._probe_sent is None:
            if quiet >= silence:
                self._probe_sent = now
                self._replies_due += 1
                self._listen()
            return False
        if now - self._probe_sent < silence:
            return False
        self.counters.stale_reconnects += 1
        self._close(Disconnect(f"stale stream: no frame for {quiet:.1f}s"), out)
        return True


def trading_connection(config: Any, timing: Timing) -> TradingConnection:
    """`StreamDefinition.connection_factory` of `trade_updates` (config: a SessionConfig).
    JSON always: what Alpaca documents and its SDKs use; the paper endpoint's binary frames
    hold JSON too."""
    return TradingConnection(
        config.stream, config.key, config.secret, timing=timing, url=config.url
    )
