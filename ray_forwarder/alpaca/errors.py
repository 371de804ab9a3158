"""Alpaca stream error codes and what the session should do about each."""

from __future__ import annotations

import enum


class ErrorAction(enum.Enum):
    """How a session reacts to a server error."""

    RECONNECT = "reconnect"  # transient: back off, reconnect, resubscribe
    RECONNECT_SLOW = "reconnect_slow"  # 406: wait until the server frees the slot
    IGNORE = "ignore"  # harmless (403 already authenticated)
    FATAL = "fatal"  # retrying cannot fix it: stop the shard with a clear error


ERROR_MEANINGS: dict[int, tuple[str, ErrorAction]] = {
    400: ("invalid syntax", ErrorAction.FATAL),
    401: ("not authenticated", ErrorAction.RECONNECT),
    402: ("auth failed", ErrorAction.FATAL),
    403: ("already authenticated", ErrorAction.IGNORE),
    404: ("auth timeout", ErrorAction.RECONNECT),
    405: ("symbol limit exceeded", ErrorAction.FATAL),
    406: ("connection limit exceeded", ErrorAction.RECONNECT_SLOW),
    407: ("slow client", ErrorAction.RECONNECT),
    408: ("v2 not enabled", ErrorAction.FATAL),  # legacy: the account has no data v2
    409: ("insufficient subscription", ErrorAction.FATAL),
    410: ("invalid subscribe action for this feed", ErrorAction.FATAL),
    411: ("insufficient scope", ErrorAction.FATAL),  # an OAuth token without the data scope
    500: ("internal error", ErrorAction.RECONNECT),
}


def classify_error(code: int) -> ErrorAction:
    """The action for an error code; unknown codes are treated as transient."""
    meaning = ERROR_MEANINGS.get(code)
    return meaning[1] if meaning else ErrorAction.RECONNECT


def describe_error(code: int, msg: str | None = None) -> str:
    """A human sentence for logs and status events."""
    known = ERROR_MEANINGS.get(code)
    text = msg or (known[0] if known else "unknown error")
    hint = {
        402: "check ALPACA_API_KEY_ID / ALPACA_SECRET_KEY",
        405: "subscribe to fewer symbols or upgrade the plan",
        406: "another connection holds this key's slot",
        409: "the account's plan does not include this feed (try ALPACA_FEED=iex)",
        410: "a channel in ALPACA_CHANNELS is not offered on this feed",
        411: "the token lacks the market-data scope",
    }.get(code)
    return f"alpaca error {code}: {text}" + (f" ({hint})" if hint else "")
