"""Operator configuration, read from the environment.

The variable names and defaults are the operator contract inherited from the single-process
forwarder (see docs/DESIGN.md). Everything is validated at start so that a wrong value fails
with one clear line naming the variable, and secrets are ``SecretStr`` so they never print.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ray_forwarder.protocol.channels import MARKET_DATA_CHANNELS

DEFAULT_CHANNELS = ("trades", "quotes", "bars", "updatedBars")
LIVE_STREAM_BASE = "wss://stream.data.alpaca.markets/v2"

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    """Accept ``SPY,QQQ`` (the plain env form) as well as a real list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All runtime settings; field names map 1:1 to upper-case environment variables."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # Alpaca
    alpaca_api_key_id: SecretStr | None = None
    alpaca_secret_key: SecretStr | None = None
    alpaca_feed: str = "sip"
    alpaca_symbols: CommaList = Field(default_factory=lambda: ["SPY", "QQQ"])
    alpaca_channels: CommaList = Field(default_factory=lambda: list(DEFAULT_CHANNELS))
    alpaca_stream_url: str | None = None
    alpaca_wire_format: Literal["json", "msgpack"] = "msgpack"
    alpaca_credentials: SecretStr | None = None  # more key pairs: "KEY1:SECRET1,KEY2:SECRET2"
    alpaca_connections_per_key: int = Field(default=1, gt=0)
    shards: int = Field(default=0, ge=0)  # 0 = one per connection slot (at most one per symbol)
    producers: int = Field(default=1, gt=0)

    # Kafka
    kafka_bootstrap_servers: str = "kafka-kafka-bootstrap.kafka:9092"
    kafka_username: str | None = None
    kafka_password: SecretStr | None = None
    kafka_security_protocol: str | None = None
    kafka_sasl_mechanism: str | None = None
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    kafka_request_timeout_ms: int = Field(default=30_000, gt=0)

    # Topics (the first four are contract names)
    topic_trades: str = "alpaca.trades.v1"
    topic_quotes: str = "alpaca.quotes.v1"
    topic_bars: str = "alpaca.bars.1m.v1"
    topic_status: str = "alpaca.status.v1"
    topic_daily_bars: str = "alpaca.bars.1d.v1"
    topic_statuses: str = "alpaca.statuses.v1"
    topic_lulds: str = "alpaca.lulds.v1"
    topic_imbalances: str = "alpaca.imbalances.v1"
    topic_trade_updates: str = "alpaca.trade_updates.v1"
    topic_deadletter: str = "alpaca.deadletter.v1"  # records Kafka refused for good

    # Pipeline
    producer_linger_ms: int = Field(default=50, ge=0)
    dedup_ttl_seconds: float = Field(default=900, gt=0)
    dedup_max_keys: int = Field(default=50_000, gt=0)
    bar_final_delay_seconds: float = Field(default=35.0, ge=0)
    batch_max_events: int = Field(default=500, gt=0)
    batch_max_ms: float = Field(default=20.0, gt=0)
    batch_max_in_flight: int = Field(default=4, gt=0)
    buffer_max_events: int = Field(default=200_000, gt=0)
    buffer_max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    spool_dir: str = ""  # empty: <system temp dir>/ray-forwarder-spool
    spool_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=0)  # 0: no disk spool
    # Key + value bytes above which a record goes to TOPIC_DEADLETTER instead of its topic.
    max_record_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    # Operations
    metrics_port: int = Field(default=8080, ge=0, le=65535)
    reconnect_initial: float = Field(default=1.0, gt=0)
    reconnect_max: float = Field(default=60.0, gt=0)
    connection_limit_backoff: float = Field(default=90.0, ge=0)
    # Silence on a subscribed socket before a probe (a re-sent subscribe whose reply
    # proves the stream alive); no reply within as long again = stale, reconnect. 0 = off.
    stale_stream_seconds: float = Field(default=30.0, ge=0)
    log_level: str = "INFO"

    _split = field_validator("alpaca_symbols", "alpaca_channels", mode="before")(
        classmethod(lambda cls, v: _split_commas(v))
    )

    @field_validator("alpaca_symbols")
    @classmethod
    def _symbols_present(cls, symbols: list[str]) -> list[str]:
        if not symbols:
            raise ValueError("at least one symbol is required")
        return [s if s == "*" else s.upper() for s in symbols]

    @field_validator("alpaca_channels")
    @classmethod
    def _known_channels(cls, channels: list[str]) -> list[str]:
        unknown = [c for c in channels if c not in MARKET_DATA_CHANNELS]
        if unknown:
            raise ValueError(
                f"unknown channel(s) {', '.join(unknown)}; "
                f"choose from {', '.join(MARKET_DATA_CHANNELS)}"
            )
        if not channels:
            raise ValueError("at least one channel is required")
        return channels

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.reconnect_max < self.reconnect_initial:
            raise ValueError("RECONNECT_MAX must be >= RECONNECT_INITIAL")
        if self.kafka_username and not self.kafka_password:
            raise ValueError("KAFKA_PASSWORD is required when KAFKA_USERNAME is set")
        return self

    # Derived values -------------------------------------------------------------------

    @property
    def stream_url(self) -> str:
        """The market-data WebSocket URL: the override, or Alpaca's URL for the feed."""
        return self.alpaca_stream_url or f"{LIVE_STREAM_BASE}/{self.alpaca_feed}"

    @property
    def kafka_auth_protocol(self) -> str:
        """Security protocol: explicit, else SASL_PLAINTEXT when a SCRAM user is set."""
        if self.kafka_security_protocol:
            return self.kafka_security_protocol
        return "SASL_PLAINTEXT" if self.kafka_username else "PLAINTEXT"

    @property
    def kafka_mechanism(self) -> str:
        return self.kafka_sasl_mechanism or "SCRAM-SHA-512"

    def credentials(self) -> list[tuple[str, str]]:
        """Every Alpaca key pair: ALPACA_API_KEY_ID/SECRET first, then ALPACA_CREDENTIALS."""
        pairs: list[tuple[str, str]] = []
        if self.alpaca_api_key_id is not None or self.alpaca_secret_key is not None:
            pairs.append(self.require_credentials())
        if self.alpaca_credentials is not None:
            for position, entry in enumerate(
                self.alpaca_credentials.get_secret_value().split(","), start=1
            ):
                entry = entry.strip()
                if not entry:
                    continue
                key, sep, secret = entry.partition(":")
                if not sep or not key.strip() or not secret.strip():
                    raise ConfigError(
                        f"ALPACA_CREDENTIALS: entry {position} is not KEY_ID:SECRET "
                        "(entries are comma-separated)"
                    )
                pairs.append((key.strip(), secret.strip()))
        if not pairs:
            self.require_credentials()  # raises the message naming the variables
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ConfigError("the same Alpaca key id is configured twice")
        return pairs

    def require_credentials(self) -> tuple[str, str]:
        """The Alpaca key pair, or a ConfigError saying which variable is missing."""
        missing = [
            name
            for name, value in (
                ("ALPACA_API_KEY_ID", self.alpaca_api_key_id),
                ("ALPACA_SECRET_KEY", self.alpaca_secret_key),
            )
            if value is None or not value.get_secret_value()
        ]
        if missing:
            raise ConfigError(
                f"{' and '.join(missing)} must be set for the Alpaca feed "
                "(or run `ray-forwarder demo` to use the built-in simulator)"
            )
        assert self.alpaca_api_key_id is not None and self.alpaca_secret_key is not None
        return self.alpaca_api_key_id.get_secret_value(), self.alpaca_secret_key.get_secret_value()


class ConfigError(ValueError):
    """A configuration problem, worded for an operator; never contains a secret."""


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, turning validation errors into a ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, naming the environment variable; input values are left out
    on purpose so that a mistyped secret is never echoed."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        location = "_".join(str(part) for part in error["loc"]).upper()
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}" if location else message)
    return "invalid configuration: " + "; ".join(lines)
