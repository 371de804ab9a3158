"""Logging setup shared by the driver and the actors: one JSON object per line."""

from __future__ import annotations

import logging
import sys

import orjson

_STANDARD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """Structured lines that log shippers parse without regexes; extra fields are kept."""

    def __init__(self, context: dict[str, object] | None = None) -> None:
        super().__init__()
        self._context = context or {}

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **self._context,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


def configure(level: str = "INFO", *, json: bool = True, **context: object) -> None:
    """Configure the root logger once per process (driver or actor)."""
    handler = logging.StreamHandler(sys.stderr)
    if json:
        formatter: logging.Formatter = JsonFormatter(context)
        formatter.converter = __import__("time").gmtime  # type: ignore[attr-defined]
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "websockets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
