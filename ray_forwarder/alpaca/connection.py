"""One stream connection as a state machine, without I/O (in the manner of h11 and the
`websockets` library's `Protocol`).

Frames go in (`receive_frame(frame, now)`), what to write comes out (`data_to_send()`), and
what happened comes back as outputs: data items, skips, status reports, and at most one
`Disconnect` saying how the connection ends (reconnect now, after a delay, or never).
Time is passed in; timers are deadlines the pump asks for (`next_deadline()`) and reports
back (`on_deadline(now, market_open)`). The asyncio pump is `runtime/session.py`.

States: CONNECTING -> AUTHENTICATING -> SUBSCRIBING -> STREAMING -> CLOSED (see
`TRANSITIONS`). Server errors map to actions in `alpaca/errors.py` (`ERROR_MEANINGS`).

`StreamConnection` is the small interface every family implements; `MarketDataConnection`
is the `[{"T":...}]` family (stocks, crypto, options, news).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ray_forwarder.alpaca import codec
from ray_forwarder.alpaca.errors import ErrorAction, classify_error, describe_error
from ray_forwarder.alpaca.events import (
    Authenticated,
    Connected,
    DataItem,
    ServerError,
    Skipped,
    Subscription,
)
from ray_forwarder.alpaca.streams import STOCKS, StreamDefinition

log = logging.getLogger(__name__)

#: Back-off (seconds) before each re-send of the part of a subscription the server's reply
#: left out; after the last one, what is still missing is reported as unserved.
RESUBSCRIBE_DELAYS = (1.0, 2.0, 4.0)


class State(enum.Enum):
    CONNECTING = "connecting"  # socket open, waiting for the greeting
    AUTHENTICATING = "authenticating"  # auth sent
    SUBSCRIBING = "subscribing"  # subscribe sent, waiting for the first reply
    STREAMING = "streaming"
    CLOSED = "closed"  # a Disconnect was returned; `connect()` starts the next cycle


#: (state, control message) -> next state. Anything else in a state is logged and ignored
#: (data items are accepted in every state: they are never dropped for arriving early).
TRANSITIONS: dict[tuple[State, type], State] = {
    (State.CONNECTING, Connected): State.AUTHENTICATING,
    (State.AUTHENTICATING, Authenticated): State.SUBSCRIBING,
    (State.SUBSCRIBING, Subscription): State.STREAMING,
}


# --- outputs ------------------------------------------------------------------------------


@dataclass(slots=True)
class Items:
    """The data items of one frame, in arrival order (handed on before its controls)."""

    items: list[DataItem]


@dataclass(slots=True)
class Report:
    """A status the owner reports (`connected`, `authenticated`, `subscribed`, `error`,
    `subscription_changed`, `subscription_mismatch`, `subscription_repaired`)."""

    state: str
    info: dict[str, object]


@dataclass(slots=True)
class Disconnect:
    """End this connection. `fatal`: retrying cannot fix it (do not reconnect). `delay`:
    wait this long before reconnecting (None = the pump's back-off)."""

    reason: str
    fatal: bool = False
    delay: float | None = None
    code: int | None = None


Output = Items | Skipped | Report | Disconnect


@dataclass(frozen=True)
class Timing:
    handshake_timeout: float = 15.0
    #: Silence before a liveness probe, and again before the stream is stale. 0 = never.
    stale_stream_seconds: float = 0.0
    #: No data item for this long on a stale-channel subscription while the market is open
    #: = stale data. 0 = never.
    data_stale_seconds: float = 0.0
    connection_limit_backoff: float = 90.0
    resubscribe_delays: tuple[float, ...] = RESUBSCRIBE_DELAYS


class StreamConnection(Protocol):
    """What the session pump drives; one implementation per stream family."""

    definition: StreamDefinition
    state: State
    # read by the session's stats (cumulative over the object's cycles)
    subscribed: bool
    missing: dict[str, list[str]]
    unserved: set[tuple[str, str]]
    last_data: float
    counters: ConnectionCounters

    def connect(self, now: float) -> None:
        """A new socket is open: start a handshake cycle (may queue the first message)."""

    def receive_frame(self, frame: bytes | str, now: float) -> list[Output]: ...

    def data_to_send(self) -> list[str | bytes]:
        """Messages to write, in order; the call empties the queue."""

    def next_deadline(self) -> float | None:
        """The earliest time `on_deadline` must be called (None: no timer)."""

    def on_deadline(self, now: float, market_open: bool = True) -> list[Output]: ...

    def upgrade_headers(self) -> dict[str, str]: ...

    def connection_lost(self) -> None:
        """The socket is gone (whatever the reason): the cycle ends."""


@dataclass
class ConnectionCounters:
    """Cumulative over every cycle of one connection object (one shard's session)."""

    resubscribes: int = 0  # re-sends of a subscription's missing part
    stale_reconnects: int = 0
    stale_data_reconnects: int = 0
    stale_data_deferred: int = 0  # staleness checks that found the market closed


@dataclass
class RepairSchedule:
    """The re-send schedule for what a subscription (or `listening`) reply left out: one
    re-send after each of `Timing.resubscribe_delays`, each awaiting its reply until
    `reply_by`. Shared by every family's connection; what is re-sent is theirs."""

    step: int = 0
    due: float | None = None  # next re-send
    reply_by: float | None = None  # waiting for the reply to a re-send until then

    @classmethod
    def begin(cls, delays: tuple[float, ...], now: float) -> RepairSchedule | None:
        return cls(due=now + delays[0]) if delays else None

    def answered(self, now: float, delays: tuple[float, ...]) -> bool:
        """The reply to a re-send came (or its time ran out): schedule the next re-send;
        False once the delays are spent (the rest is unserved)."""
        self.reply_by = None
        self.step += 1
        if self.step < len(delays):
            self.due = now + delays[self.step]
            return True
        return False


def report_unserved(
    unserved: set[tuple[str, str]],
    lacking: set[tuple[str, str]],
    missing: dict[str, list[str]],
    resubscribes: int,
    out: list[Output],
) -> None:
    """After the last re-send: a `subscription_mismatch` report for pairs not yet reported
    (`unserved` grows in place, so each pair is reported once)."""
    if lacking - unserved:
        unserved |= lacking
        out.append(
            Report(
                "subscription_mismatch",
                {"missing": missing, "unserved": len(unserved), "resubscribes": resubscribes},
            )
        )


@dataclass
class MarketDataConnection:
    """The market-data protocol (`[{"T":...}]` arrays): greeting, `auth`, `subscribe`,
    a subscription reply that must match what was asked for, then data."""

    definition: StreamDefinition
    key: str
    secret: str = field(repr=False)
    subscriptions: Mapping[str, list[str]]
    wire_format: str = "msgpack"
    timing: Timing = field(default_factory=Timing)
    url: str = ""

    def __post_init__(self) -> None:
        self.state = State.CLOSED
        self.counters = ConnectionCounters()
        self.subscribed = False
        #: What the latest subscription reply lacks of what we asked for, per channel.
        self.missing: dict[str, list[str]] = {}
        #: (channel, symbol) pairs still missing after every re-send: reported unserved.
        self.unserved: set[tuple[str, str]] = set()
        self.last_data = 0.0
        self._outgoing: list[str | bytes] = []
        self._handshake_by: float | None = None
        self._last_frame = 0.0
        self._probe_sent: float | None = None
        self._replies_due = 0  # replies to our own re-sends and probes: not reported
        self._repair: RepairSchedule | None = None
        self._data_window = 0.0
        self._data_check: float | None = None
        self._watch_data = self.timing.data_stale_seconds > 0 and any(
            self.subscriptions.get(c) for c in self.definition.stale_channels
        )
        # fast path: the stocks decoder is the default of codec.decode_frame
        self._decode_stream = None if self.definition is STOCKS else self.definition

    # --- the interface ------------------------------------------------------------------

    def upgrade_headers(self) -> dict[str, str]:
        return codec.connection_headers(self.wire_format)

    def connect(self, now: float) -> None:
        self.state = State.CONNECTING
        self.subscribed = False
        self._outgoing.clear()
        self._handshake_by = now + self.timing.handshake_timeout
        self._probe_sent, self._replies_due, self._repair = None, 0, None
        self._data_check = None

    def connection_lost(self) -> None:
        self.state = State.CLOSED
        self.subscribed = False
        self._handshake_by = self._data_check = self._probe_sent = None
        self._repair = None

    def data_to_send(self) -> list[str | bytes]:
        out, self._outgoing = self._outgoing, []
        return out

    def receive_frame(self, frame: bytes | str, now: float) -> list[Output]:
        """Hot path: decode one frame; its items come out first, then what its control
        messages cause, so an error that ends the connection costs no data that arrived
        with it."""
        self._last_frame = now
        self._probe_sent = None  # any frame proves the stream alive
        items: list[DataItem] = []
        out: list[Output] = []
        controls: list[object] = []
        if self._decode_stream is None:
            events = codec.decode_frame(frame)
        else:
            events = codec.decode_frame(frame, stream=self._decode_stream)
        for event in events:
            kind = type(event)
            if kind is DataItem:
                items.append(event)  # type: ignore[arg-type]
            elif kind is Skipped:
                out.append(event)  # type: ignore[arg-type]
            else:
                controls.append(event)
        if items:
            self.last_data = now
            out.append(Items(items))
        for event in controls:
            if self._control(event, now, out):
                break
        return out

    def next_deadline(self) -> float | None:
        candidates = [self._handshake_by, self._data_check]
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
        if self._silence_due(now, out) or self._stale_data_due(now, market_open, out):
            return out
        self._repair_due(now, out)
        return out

    # --- handshake and control messages -------------------------------------------------

    def _control(self, event: object, now: float, out: list[Output]) -> bool:
        """Act on one control message; True if the connection ends here."""
        if isinstance(event, ServerError):
            return self._server_error(event, out)
        nxt = TRANSITIONS.get((self.state, type(event)))
        if nxt is not None:
            self.state = nxt
            if nxt is State.AUTHENTICATING:
                out.append(Report("connected", {"url": self.url}))
                self._outgoing.append(codec.encode_auth(self.key, self.secret))
            elif nxt is State.SUBSCRIBING:
                out.append(Report("authenticated", {}))
                self._outgoing.append(self._subscribe(self.subscriptions))
            else:  # STREAMING
                self._subscribed(event, now, out)  # type: ignore[arg-type]
            return False
        if isinstance(event, Subscription) and self.state is State.STREAMING:
            self._on_subscription(event, now, out)
        else:
            log.debug("control message %s in state %s", event, self.state.value)
        return False

    def _subscribed(self, reply: Subscription, now: float, out: list[Output]) -> None:
        self._note_reply(reply, out)
        self.subscribed = True
        self._handshake_by = None
        self._last_frame = self._data_window = now
        if self._watch_data:
            self._data_check = now
        out.append(
            Report(
                "subscribed",
                {
                    "channels": {name: len(s) for name, s in reply.channels.items()},
                    "missing": self.missing,
                },
            )
        )
        if self.missing:
            self._start_repair(now)

    def _server_error(self, error: ServerError, out: list[Output]) -> bool:
        action = classify_error(error.code)
        text = describe_error(error.code, error.msg)
        out.append(Report("error", {"code": error.code, "msg": error.msg}))
        if action is ErrorAction.IGNORE:
            log.info("ignoring %s", text)
            return False
        if action is ErrorAction.FATAL:
            self._close(Disconnect(text, fatal=True, code=error.code), out)
        elif action is ErrorAction.RECONNECT_SLOW:
            delay = max(self.timing.connection_limit_backoff, 0.0)
            self._close(Disconnect(text, delay=delay, code=error.code), out)
        else:
            self._close(Disconnect(text, code=error.code), out)
        return True

    def _close(self, disconnect: Disconnect, out: list[Output]) -> list[Output]:
        self.connection_lost()
        out.append(disconnect)
        return out

    def _subscribe(self, channels: Mapping[str, list[str]]) -> str:
        return codec.encode_subscribe(channels, stream=self.definition)

    # --- the subscription we asked for ---------------------------------------------------

    def _note_reply(self, reply: Subscription, out: list[Output]) -> None:
        """Compare a reply (always the full current view) with what we asked for; pairs
        served again are no longer unserved."""
        self.missing = codec.missing_from_subscription(self.subscriptions, reply)
        still = _pairs(self.missing)
        if self.unserved and not self.unserved <= still:
            self.unserved &= still
            if not self.unserved:
                out.append(
                    Report("subscription_repaired", {"resubscribes": self.counters.resubscribes})
                )

    def _on_subscription(self, reply: Subscription, now: float, out: list[Output]) -> None:
        self._note_reply(reply, out)
        repair = self._repair
        if repair is not None and repair.reply_by is not None:
            self._repair_answered(now, out)
        if _pairs(self.missing) - self.unserved:
            self._start_repair(now)
        if self._replies_due > 0:
            self._replies_due -= 1
            return
        out.append(
            Report(
                "subscription_changed",
                {
                    "channels": {name: len(s) for name, s in reply.channels.items()},
                    "missing": self.missing,
                },
            )
        )

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
            log.info("subscription lacks %d pair(s); asking again", len(_pairs(self.missing)))
            self._replies_due += 1
            self._outgoing.append(self._subscribe(self.missing))
            repair.reply_by = now + self.timing.handshake_timeout

    def _repair_answered(self, now: float, out: list[Output]) -> None:
        assert self._repair is not None
        if self._repair.answered(now, self.timing.resubscribe_delays):
            return
        self._repair = None
        report_unserved(
            self.unserved, _pairs(self.missing), self.missing, self.counters.resubscribes, out
        )

    # --- liveness -------------------------------------------------------------------------

    def _silence_due(self, now: float, out: list[Output]) -> bool:
        """Alpaca sends no heartbeat and ping/pong proves only the peer's network stack, so
        a silent stream is probed with a re-sent subscribe (idempotent) whose reply proves
        it alive; nothing at all within as long again = stale."""
        silence = self.timing.stale_stream_seconds
        if silence <= 0:
            return False
        quiet = now - self._last_frame
        if self._probe_sent is None:
            if quiet >= silence:
                log.info("no frame for %.1fs; probing with a re-sent subscribe", quiet)
                self._probe_sent = now
                self._replies_due += 1
                self._outgoing.append(self._subscribe(self.subscriptions))
            return False
        if now - self._probe_sent < silence:
            return False
        self.counters.stale_reconnects += 1
        self._close(Disconnect(f"stale stream: no frame for {quiet:.1f}s"), out)
        return True

    def _stale_data_due(self, now: float, market_open: bool, out: list[Output]) -> bool:
        """No data item while the market is open (a stuck upstream may still answer
        probes); outside market hours silence is normal and the window restarts."""
        if self._data_check is None or now < self._data_check:
            return False
        limit = self.timing.data_stale_seconds
        tick = limit / 4
        if not market_open:
            self._data_window = now
            self.counters.stale_data_deferred += 1
            self._data_check = now + tick
            return False
        quiet = now - max(self.last_data, self._data_window)
        if quiet < limit:
            self._data_check = now + min(tick, limit - quiet)
            return False
        self.counters.stale_data_reconnects += 1
        self._close(
            Disconnect(f"stale data: no data item for {quiet:.1f}s while the market is open"), out
        )
        return True


def _pairs(by_channel: Mapping[str, list[str]]) -> set[tuple[str, str]]:
    return {(channel, symbol) for channel, symbols in by_channel.items() for symbol in symbols}
