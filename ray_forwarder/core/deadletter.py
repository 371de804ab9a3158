"""Dead letters: what Kafka refuses for good, and the record that takes its place.

A record the broker can never accept (above its size limit, invalid, on a topic we may not
write) would otherwise be re-sent forever and block every symbol of its lane. It is diverted
instead: to `TOPIC_DEADLETTER`, keyed like the original, as a small JSON document carrying
the reason and the original envelope (its head only, when it is large). No I/O in here.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from aiokafka import errors as kafka_errors
from aiokafka.errors import BrokerResponseError

#: The channel name dead-letter records are counted under (acked, dropped, ...).
DEAD_LETTER_CHANNEL = "deadletter"
#: The original envelope is embedded whole up to this size, beyond it only its head.
ENVELOPE_MAX_BYTES = 64 * 1024
#: The reason of a record refused before buffering (`MAX_RECORD_BYTES`).
OVER_MAX_RECORD_BYTES = "over_max_record_bytes"


class InvalidRecordError(BrokerResponseError):
    """INVALID_RECORD (87): the broker's validation refused a record (e.g. a null key on a
    compacted topic). aiokafka 0.14 has no class for it and would report the code as an
    UnknownError, a generic server error that must stay retriable; registered below."""

    errno = 87
    message = "INVALID_RECORD"
    description = "This record has failed the validation on broker and hence be rejected."


kafka_errors.kafka_errors.setdefault(InvalidRecordError.errno, InvalidRecordError)

#: Errors that say "this record, never": the reason each one is counted under.
_REFUSALS: tuple[tuple[type[BaseException], str], ...] = (
    (kafka_errors.MessageSizeTooLargeError, "message_too_large"),
    (kafka_errors.RecordTooLargeError, "record_too_large"),
    (kafka_errors.RecordListTooLargeError, "record_list_too_large"),
    (kafka_errors.CorruptRecordException, "corrupt_record"),
    (InvalidRecordError, "invalid_record"),
    (kafka_errors.TopicAuthorizationFailedError, "topic_authorization_failed"),
)


def refusal_reason(exc: BaseException | None) -> str | None:
    """The dead-letter reason when `exc` refuses a record for good; None when a re-send
    could succeed (timeouts, leader changes, a broker outage, ...)."""
    if exc is None:
        return None
    for kind, reason in _REFUSALS:
        if isinstance(exc, kind):
            return reason
    return None


def dead_letter_value(
    topic: str,
    key: bytes,
    value: bytes,
    reason: str,
    detail: str,
    envelope_max: int = ENVELOPE_MAX_BYTES,
) -> bytes:
    """The dead-letter document for one refused record (JSON): the envelope whole up to
    `envelope_max` bytes (at most ENVELOPE_MAX_BYTES), else its head."""
    envelope_max = min(envelope_max, ENVELOPE_MAX_BYTES)
    document: dict[str, object] = {
        "reason": reason,
        "detail": detail[:500],
        "topic": topic,
        "key": key.decode("utf-8", "replace"),
        "bytes": len(key) + len(value),
        "dead_lettered_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "truncated": False,
    }
    envelope: object | None = None
    if len(value) <= envelope_max:
        try:
            orjson.loads(value)
            envelope = orjson.Fragment(value)
        except orjson.JSONDecodeError:
            envelope = None
    if envelope is not None:
        document["envelope"] = envelope
    else:  # too large (or not JSON): its head, as text, so that it can still be looked at
        document["truncated"] = len(value) > envelope_max
        document["envelope_head"] = value[:envelope_max].decode("utf-8", "ignore")
    return orjson.dumps(document)
