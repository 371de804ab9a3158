"""Operator configuration, read from the environment.

The variable names and defaults are the operator contract inherited from the single-process
forwarder (see docs/DESIGN.md). Everything is validated at start so that a wrong value fails
with one clear line naming the variable, and secrets are ``SecretStr`` so they never print.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ray_forwarder.alpaca.channels import MARKET_DATA_CHANNELS
from ray_forwarder.alpaca.streams import (
    CRYPTO,
    NEWS,
    OPTIONS,
    STOCK_FEED_PATHS,
    STREAMS,
    StreamDefinition,
    topic_defaults,
)
from ray_forwarder.runtime.kafka_tls import KafkaTls, ssl_context

DEFAULT_CHANNELS = ("trades", "quotes", "bars", "updatedBars")
LIVE_STREAM_HOST = "wss://stream.data.alpaca.markets"

#: Alpaca's stock feeds and where each one streams (docs.alpaca.markets, "Real-time Stock
#: Data" and "WebSocket Stream": BOATS and the overnight feed are still on v1beta1, `test`
#: is the always-on test stream with the symbol FAKEPACA).
FEED_PATHS: dict[str, str] = STOCK_FEED_PATHS

_TOPICS = topic_defaults()

#: What BACKFILL_CHANNELS may name (trades and quotes: opt-in; options have no quotes history).
BACKFILL_CHANNELS = ("bars", "trades", "quotes")

#: Kafka's own rule for topic names (kafka.common.internals.Topic).
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")

# Upper bounds: far above any sane value, low enough that a typo (an extra digit, a value
# in ms where seconds are meant) fails at start instead of hanging or exhausting memory.
HOUR, DAY = 3600.0, 86400.0
MAX_KEY_PAIRS = 256
MAX_CONNECTIONS_PER_KEY = 64
MAX_SHARDS = 1024
MAX_PRODUCERS = 256

CommaList = Annotated[list[str], NoDecode]
TLS_PROTOCOLS = ("SSL", "SASL_SSL")


def _split_commas(value: object) -> object:
    """Accept ``SPY,QQQ`` (the plain env form) as well as a real list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All runtime settings; field names map 1:1 to upper-case environment variables."""

    # allow_inf_nan=False: every float setting is finite ("inf" or "nan" as a duration would
    # grow state without bound or never fire).
    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, allow_inf_nan=False
    )

    # Alpaca
    alpaca_api_key_id: SecretStr | None = None
    alpaca_secret_key: SecretStr | None = None
    alpaca_feed: Literal["sip", "iex", "delayed_sip", "boats", "overnight", "test"] = "sip"
    alpaca_symbols: CommaList = Field(default_factory=lambda: ["SPY", "QQQ"])
    alpaca_channels: CommaList = Field(default_factory=lambda: list(DEFAULT_CHANNELS))
    # ws:// to anything but loopback sends the secret in clear: only with this opt-in
    alpaca_allow_insecure_stream: bool = False
    alpaca_stream_url: str | None = None
    # Trading API for the market clock/calendar (unset: Alpaca's live API, or the simulator
    # when the stream URL is a loopback ws:// URL); paper keys need paper-api.alpaca.markets.
    alpaca_trading_url: str | None = None
    # The trading stream (trade_updates): paper or live endpoint, or an override.
    alpaca_trading_env: Literal["paper", "live"] = "paper"
    alpaca_trading_stream_url: str | None = None
    alpaca_wire_format: Literal["json", "msgpack"] = "msgpack"
    # Which streams run (alpaca/streams.py STREAMS); stocks alone unless told otherwise.
    alpaca_streams: CommaList = Field(default_factory=lambda: ["stocks"])
    alpaca_crypto_symbols: CommaList = Field(default_factory=lambda: list(CRYPTO.default_symbols))
    alpaca_crypto_channels: CommaList = Field(default_factory=lambda: list(CRYPTO.default_channels))
    alpaca_crypto_location: str = Field(default="us", pattern=r"^[a-z0-9-]{1,32}$")
    alpaca_crypto_stream_url: str | None = None
    alpaca_options_feed: Literal["indicative", "opra"] = "indicative"
    alpaca_options_symbols: CommaList = Field(default_factory=list)
    alpaca_options_channels: CommaList = Field(
        default_factory=lambda: list(OPTIONS.default_channels)
    )
    alpaca_options_stream_url: str | None = None
    alpaca_options_max_symbols_per_connection: int = Field(default=0, ge=0, le=1_000_000)
    alpaca_news_symbols: CommaList = Field(default_factory=lambda: list(NEWS.default_symbols))
    alpaca_news_stream_url: str | None = None
    alpaca_credentials: SecretStr | None = None  # more key pairs: "KEY1:SECRET1,KEY2:SECRET2"
    alpaca_connections_per_key: int = Field(default=1, gt=0, le=MAX_CONNECTIONS_PER_KEY)
    # 0 = one per connection slot (at most one per symbol)
    shards: int = Field(default=0, ge=0, le=MAX_SHARDS)
    #: producer actors; 0 = every shard actor writes to Kafka itself (no Ray call between)
    producers: int = Field(default=1, ge=0, le=MAX_PRODUCERS)

    # Kafka
    kafka_bootstrap_servers: str = "kafka-kafka-bootstrap.kafka:9092"
    kafka_username: str | None = None
    kafka_password: SecretStr | None = None
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = None
    # what aiokafka supports and a user name + password can drive (not GSSAPI, OAUTHBEARER)
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    kafka_request_timeout_ms: int = Field(default=30_000, gt=0, le=600_000)
    # At start: create the routed topics that are missing (dev, the demo). Off in production,
    # where topics are managed elsewhere (Strimzi KafkaTopic resources) and a missing one is
    # waited for up to KAFKA_TOPICS_WAIT_SECONDS, then refused.
    kafka_create_topics: bool = False
    kafka_topics_wait_seconds: float = Field(default=60.0, ge=0, le=HOUR)
    # TLS (SSL / SASL_SSL): PEM files, e.g. Strimzi's cluster CA `ca.crt` and, for mTLS,
    # a KafkaUser's `user.crt` / `user.key`. Without a CA file the system trust store is used.
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_key_password: SecretStr | None = None  # only for an encrypted KAFKA_SSL_KEYFILE
    # Dangerous to turn off: any certificate the CA signed is then accepted for any broker.
    kafka_ssl_check_hostname: bool = True

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
    # the other streams' topics (defaults in alpaca/streams.py)
    topic_crypto_trades: str = _TOPICS["topic_crypto_trades"]
    topic_crypto_quotes: str = _TOPICS["topic_crypto_quotes"]
    topic_crypto_bars: str = _TOPICS["topic_crypto_bars"]
    topic_crypto_daily_bars: str = _TOPICS["topic_crypto_daily_bars"]
    topic_crypto_orderbooks: str = _TOPICS["topic_crypto_orderbooks"]
    topic_options_trades: str = _TOPICS["topic_options_trades"]
    topic_options_quotes: str = _TOPICS["topic_options_quotes"]
    topic_news: str = _TOPICS["topic_news"]

    # Pipeline
    producer_linger_ms: int = Field(default=50, ge=0, le=10_000)
    dedup_ttl_seconds: float = Field(default=900, gt=0, le=DAY)
    dedup_max_keys: int = Field(default=50_000, gt=0, le=10_000_000)
    bar_final_delay_seconds: float = Field(default=35.0, ge=0, le=HOUR)
    batch_max_events: int = Field(default=2500, gt=0, le=100_000)
    batch_max_ms: float = Field(default=20.0, gt=0, le=60_000)
    batch_max_in_flight: int = Field(default=64, gt=0, le=256)
    # Key + value bytes per shard -> producer call. Ray's cost per call outweighs its
    # object store (arguments above 100 KiB): ~1 MiB calls cost half the CPU of ~90 KB ones.
    batch_max_bytes: int = Field(default=1024**2, ge=1024, le=64 * 1024**2)
    # Key + value bytes in flight per shard -> producer lane (acks pipelined): the window
    # is sized in bytes so that it never caps a lane (see README, "Shard → producer").
    batch_max_in_flight_bytes: int = Field(default=8 * 1024**2, ge=1024, le=1024**3)
    buffer_max_events: int = Field(default=200_000, gt=0, le=10_000_000)
    buffer_max_bytes: int = Field(default=256 * 1024 * 1024, gt=0, le=64 * 1024**3)
    spool_dir: str = ""  # empty: <system temp dir>/ray-forwarder-spool
    spool_max_bytes: int = Field(default=1024**3, ge=0, le=1024**4)  # 0: no disk spool
    # Key + value bytes above which a record goes to TOPIC_DEADLETTER instead of its topic.
    max_record_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    # Operations
    metrics_port: int = Field(default=8080, ge=0, le=65535)
    reconnect_initial: float = Field(default=1.0, gt=0, le=HOUR)
    reconnect_max: float = Field(default=60.0, gt=0, le=HOUR)
    connection_limit_backoff: float = Field(default=90.0, ge=0, le=HOUR)
    # Silence on a subscribed socket before a probe (a re-sent subscribe whose reply
    # proves the stream alive); no reply within as long again = stale, reconnect. 0 = off.
    stale_stream_seconds: float = Field(default=30.0, ge=0, le=HOUR)
    # No data item on a trades/quotes subscription for this long while the market is open
    # (Alpaca's clock) = stale data, reconnect. 0 = off (and the clock is not fetched).
    data_stale_seconds: float = Field(default=60.0, ge=0, le=HOUR)
    market_clock_refresh_seconds: float = Field(default=300.0, gt=0, le=HOUR)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # Gaps and backfill (README § Gaps and backfill)
    # Alpaca's market-data REST API (unset: https://data.alpaca.markets, or the simulator's
    # port when the stream URL is a loopback ws:// URL).
    alpaca_data_url: str | None = None
    # What a closed gap is backfilled with from REST; empty: gaps are reported, not filled.
    backfill_channels: CommaList = Field(default_factory=lambda: ["bars"])
    backfill_requests_per_minute: int = Field(default=150, gt=0, le=100_000)
    backfill_symbols_per_request: int = Field(default=200, gt=0, le=10_000)
    backfill_page_limit: int = Field(default=10_000, gt=0, le=10_000)
    backfill_max_seconds: float = Field(default=6 * HOUR, gt=0, le=7 * DAY)
    backfill_timeout_seconds: float = Field(default=300.0, gt=0, le=DAY)
    # Trades/quotes outnumber bars a thousandfold: at most this many per gap and channel.
    backfill_ticks_max_items: int = Field(default=100_000, gt=0, le=10_000_000)

    _split = field_validator(
        "alpaca_symbols",
        "alpaca_channels",
        "alpaca_streams",
        "alpaca_crypto_symbols",
        "alpaca_crypto_channels",
        "alpaca_options_symbols",
        "alpaca_options_channels",
        "alpaca_news_symbols",
        mode="before",
    )(classmethod(lambda cls, v: _split_commas(v)))
    _split_backfill = field_validator("backfill_channels", mode="before")(
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

    @field_validator("alpaca_streams")
    @classmethod
    def _known_streams(cls, names: list[str]) -> list[str]:
        names = list(dict.fromkeys(n.lower() for n in names))
        unknown = [n for n in names if n not in STREAMS]
        if unknown:
            raise ValueError(
                f"unknown stream(s) {', '.join(unknown)}; choose from {', '.join(STREAMS)}"
            )
        if not names:
            raise ValueError("at least one stream is required")
        return names

    @field_validator(
        "alpaca_crypto_symbols", "alpaca_options_symbols", "alpaca_news_symbols", mode="after"
    )
    @classmethod
    def _upper_symbols(cls, symbols: list[str]) -> list[str]:
        return [s if s == "*" else s.upper() for s in symbols]

    @field_validator("alpaca_options_feed", "alpaca_crypto_location", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", "kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper_case_or_unset(cls, value: object) -> object:
        """`info` means INFO; an empty variable (a blank in a manifest) means unset."""
        if isinstance(value, str):
            value = value.strip().upper()
            return value or None
        return value

    @field_validator("alpaca_feed", "alpaca_trading_env", mode="before")
    @classmethod
    def _feed_lower_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("*")
    @classmethod
    def _legal_topic_name(cls, value: object, info: ValidationInfo) -> object:
        """Every TOPIC_* setting, including ones added later, is a name Kafka accepts."""
        if info.field_name and info.field_name.startswith("topic_"):
            if not isinstance(value, str) or not _TOPIC_NAME.fullmatch(value):
                raise ValueError(
                    "a Kafka topic name is 1-249 characters of ASCII letters, digits, '.', "
                    "'_' and '-'"
                )
            if value in (".", ".."):
                raise ValueError("'.' and '..' are not legal Kafka topic names")
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _host_port_list(cls, value: str) -> str:
        entries = [entry.strip() for entry in value.split(",")]
        if not any(entries):
            raise ValueError("at least one host:port is required")
        for position, entry in enumerate(entries, start=1):
            if not _is_host_port(entry):
                raise ValueError(
                    f"entry {position} is not host:port (comma-separated, e.g. "
                    "kafka-0:9092,kafka-1:9092; IPv6 as [::1]:9092)"
                )
        return ",".join(entries)

    @field_validator(
        "alpaca_stream_url",
        "alpaca_crypto_stream_url",
        "alpaca_options_stream_url",
        "alpaca_news_stream_url",
        "alpaca_trading_url",
        "alpaca_trading_stream_url",
        "alpaca_data_url",
        "alpaca_credentials",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(
        "alpaca_stream_url",
        "alpaca_crypto_stream_url",
        "alpaca_options_stream_url",
        "alpaca_news_stream_url",
        "alpaca_trading_stream_url",
    )
    @classmethod
    def _websocket_url(cls, value: str | None) -> str | None:
        return _endpoint_url(value, ("ws", "wss"))

    @field_validator("backfill_channels")
    @classmethod
    def _backfillable(cls, channels: list[str]) -> list[str]:
        unknown = sorted(set(channels) - set(BACKFILL_CHANNELS))
        if unknown:
            raise ValueError(
                f"cannot backfill {', '.join(unknown)}; choose from {', '.join(BACKFILL_CHANNELS)}"
            )
        return channels

    @field_validator("alpaca_trading_url", "alpaca_data_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return _endpoint_url(value, ("http", "https"))

    @field_validator("alpaca_credentials")
    @classmethod
    def _credential_list(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            pairs = _parse_credentials(value.get_secret_value())
            if len(pairs) > MAX_KEY_PAIRS:
                raise ValueError(f"at most {MAX_KEY_PAIRS} key pairs")
        return value

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    @classmethod
    def _unset_when_empty(cls, path: str | None) -> str | None:
        """An empty variable (e.g. an optional Secret key left out) means "not set"."""
        if path is None or not path.strip():
            return None
        return path.strip()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.reconnect_max < self.reconnect_initial:
            raise ValueError("RECONNECT_MAX must be >= RECONNECT_INITIAL")
        if self.kafka_username and not self.kafka_password:
            raise ValueError("KAFKA_PASSWORD is required when KAFKA_USERNAME is set")
        protocol = self.kafka_auth_protocol
        if protocol.startswith("SASL_") and not self.kafka_username:
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_USERNAME and KAFKA_PASSWORD"
            )
        if self.kafka_username and not protocol.startswith("SASL_"):
            raise ValueError(
                f"KAFKA_USERNAME is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
                "it; choose SASL_PLAINTEXT or SASL_SSL"
            )
        self._check_streams()
        for name, url in (
            ("ALPACA_STREAM_URL", self.alpaca_stream_url),
            ("ALPACA_CRYPTO_STREAM_URL", self.alpaca_crypto_stream_url),
            ("ALPACA_OPTIONS_STREAM_URL", self.alpaca_options_stream_url),
            ("ALPACA_NEWS_STREAM_URL", self.alpaca_news_stream_url),
            ("ALPACA_TRADING_URL", self.alpaca_trading_url),
            ("ALPACA_TRADING_STREAM_URL", self.alpaca_trading_stream_url),
            ("ALPACA_DATA_URL", self.alpaca_data_url),
        ):
            if url is None or self.alpaca_allow_insecure_stream:
                continue
            parts = urlsplit(url)
            if parts.scheme in ("ws", "http") and not _is_loopback(parts.hostname or ""):
                raise ValueError(
                    f"{name}: {parts.scheme}:// sends the Alpaca secret in clear text; use "
                    f"{parts.scheme}s://, a loopback host, or set "
                    "ALPACA_ALLOW_INSECURE_STREAM=true"
                )
        keys = [key for key, _ in self._credential_pairs()]
        if len(set(keys)) != len(keys):
            raise ValueError("the same Alpaca key id is configured twice")
        self._check_tls()
        return self

    def _check_streams(self) -> None:
        """Per enabled stream: its wire format, channels and symbol syntax (one line naming
        the variable). Streams that are not enabled are not checked."""
        for stream in self.streams():
            if stream.symbols_setting is None:  # trade_updates: no symbols; always JSON
                continue
            if self.alpaca_wire_format not in stream.wire_formats:
                raise ValueError(
                    f"ALPACA_STREAMS includes {stream.name}, which Alpaca serves only as "
                    f"{' or '.join(stream.wire_formats)}; ALPACA_WIRE_FORMAT="
                    f"{self.alpaca_wire_format} cannot be used with it (set "
                    f"ALPACA_WIRE_FORMAT={stream.wire_formats[0]} or leave it unset)"
                )
            if stream.channels_setting is not None:
                variable = stream.channels_setting.upper()
                channels = getattr(self, stream.channels_setting)
                unknown = [c for c in channels if c not in stream.subscribable]
                if unknown or not channels:
                    raise ValueError(
                        f"{variable}: unknown channel(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(stream.subscribable)}"
                        if unknown
                        else f"{variable}: at least one channel is required"
                    )
            if stream is STREAMS.get("stocks") or stream.symbols_setting is None:
                continue  # ALPACA_SYMBOLS keeps its own, older check
            variable = stream.symbols_setting.upper()
            symbols = getattr(self, stream.symbols_setting)
            if not symbols:
                raise ValueError(f"{variable}: at least one symbol is required for {stream.name}")
            bad = [s for s in symbols if not stream.is_symbol(s)][:3]
            if bad:
                example = {"crypto": "BTC/USD", "options": "AAPL240119C00100000"}.get(
                    stream.name, "AAPL"
                )
                raise ValueError(
                    f"{variable}: {', '.join(repr(s[:40]) for s in bad)} not a {stream.name} "
                    f"symbol (e.g. {example}, or *)"
                )
            if "*" in symbols and len(symbols) > 1:
                raise ValueError(f"{variable}: '*' already means every symbol; list nothing else")

    def streams(self) -> list[StreamDefinition]:
        """The enabled streams, in ALPACA_STREAMS order."""
        return [STREAMS[name] for name in self.alpaca_streams]

    def stream_symbols(self, stream: StreamDefinition) -> list[str]:
        if stream.symbols_setting is None:  # trade_updates: the account's orders
            return ["*"]
        return list(dict.fromkeys(getattr(self, stream.symbols_setting)))

    def stream_channels(self, stream: StreamDefinition) -> list[str]:
        if stream.channels_setting is None:
            return list(stream.default_channels)
        return list(getattr(self, stream.channels_setting))

    def _check_tls(self) -> None:
        """Refuse TLS files next to a protocol without TLS (they would be silently unused),
        and load them once, so that a missing, unreadable or mismatched file fails at start
        (one line naming the variable) rather than later in a producer actor."""
        tls = self.kafka_tls
        if tls.configured and self.kafka_auth_protocol not in TLS_PROTOCOLS:
            raise ValueError(
                f"KAFKA_SSL_* files are set but KAFKA_SECURITY_PROTOCOL="
                f"{self.kafka_auth_protocol} does not use TLS; use SSL or SASL_SSL"
            )
        if self.kafka_auth_protocol in TLS_PROTOCOLS:
            ssl_context(tls)  # raises KafkaTlsError (a ValueError) naming the variable

    # Derived values -------------------------------------------------------------------

    @property
    def stream_url(self) -> str:
        """The market-data WebSocket URL: the override, or Alpaca's URL for the feed."""
        return self.alpaca_stream_url or f"{LIVE_STREAM_HOST}/{FEED_PATHS[self.alpaca_feed]}"

    def stream_endpoint(self, stream: StreamDefinition) -> str:
        """A stream's WebSocket URL: its override (e.g. ALPACA_CRYPTO_STREAM_URL), or
        Alpaca's URL from its feed/location settings."""
        return stream.url(self)

    @property
    def spool_root(self) -> Path:
        """SPOOL_DIR, or <system temp dir>/ray-forwarder-spool when it is empty."""
        return Path(self.spool_dir or Path(tempfile.gettempdir()) / "ray-forwarder-spool")

    @property
    def kafka_auth_protocol(self) -> str:
        """Security protocol: explicit, else SASL_SSL/SSL when a TLS file is named, else
        SASL_PLAINTEXT when a SCRAM user is set, else PLAINTEXT."""
        if self.kafka_security_protocol:
            return self.kafka_security_protocol
        if self.kafka_tls.configured:
            return "SASL_SSL" if self.kafka_username else "SSL"
        return "SASL_PLAINTEXT" if self.kafka_username else "PLAINTEXT"

    @property
    def kafka_tls(self) -> KafkaTls:
        return KafkaTls(
            cafile=self.kafka_ssl_cafile,
            certfile=self.kafka_ssl_certfile,
            keyfile=self.kafka_ssl_keyfile,
            key_password=self.kafka_ssl_key_password,
            check_hostname=self.kafka_ssl_check_hostname,
        )

    @property
    def kafka_mechanism(self) -> str:
        return self.kafka_sasl_mechanism or "SCRAM-SHA-512"

    def credentials(self) -> list[tuple[str, str]]:
        """Every Alpaca key pair: ALPACA_API_KEY_ID/SECRET first, then ALPACA_CREDENTIALS.

        ALPACA_CREDENTIALS alone is enough; the single pair is then not required."""
        if self.alpaca_api_key_id is not None or self.alpaca_secret_key is not None:
            self.require_credentials()  # both or neither
        pairs = self._credential_pairs()
        if not pairs:
            self.require_credentials()  # raises the message naming the variables
        return pairs

    def _credential_pairs(self) -> list[tuple[str, str]]:
        pairs: list[tuple[str, str]] = []
        key, secret = self.alpaca_api_key_id, self.alpaca_secret_key
        if key is not None and secret is not None and key.get_secret_value():
            pairs.append((key.get_secret_value(), secret.get_secret_value()))
        if self.alpaca_credentials is not None:
            try:
                pairs += _parse_credentials(self.alpaca_credentials.get_secret_value())
            except ValueError as exc:
                raise ConfigError(f"ALPACA_CREDENTIALS: {exc}") from None
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


def log_level_from_env(default: str) -> str:
    """`LOG_LEVEL` for tools that configure logging before (or without) `Settings`, checked
    against the same set, so `LOG_LEVEL=LOUD` is one clear line there too."""
    level = os.environ.get("LOG_LEVEL", "").strip().upper() or default
    allowed = typing.get_args(Settings.model_fields["log_level"].annotation)
    if level not in allowed:
        raise ConfigError(f"LOG_LEVEL: must be one of {', '.join(allowed)}")
    return level


def _parse_credentials(text: str) -> list[tuple[str, str]]:
    """`KEY1:SECRET1,KEY2:SECRET2`; errors name the entry's position, never its text."""
    pairs = []
    for position, entry in enumerate(text.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        key, sep, secret = entry.partition(":")
        if not sep or not key.strip() or not secret.strip():
            raise ValueError(f"entry {position} is not KEY_ID:SECRET (entries are comma-separated)")
        pairs.append((key.strip(), secret.strip()))
    if not pairs:
        raise ValueError("set but holds no KEY_ID:SECRET entry")
    return pairs


def _is_host_port(entry: str) -> bool:
    host, sep, port = entry.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit():
        return False
    if not 0 < int(port) < 65536:
        return False
    if host.startswith("["):
        if not host.endswith("]"):
            return False
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return re.fullmatch(r"[A-Za-z0-9._-]+", host) is not None


def _endpoint_url(value: str | None, schemes: tuple[str, ...]) -> str | None:
    """An Alpaca endpoint override. Never echoes the value: it may carry a password in its
    userinfo."""
    if value is None:
        return None
    try:
        parts = urlsplit(value.strip())
        _ = parts.port  # raises on a port that is not a number in range
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme not in schemes:
        raise ValueError(f"must be a {' or '.join(f'{s}://' for s in schemes)} URL")
    if "@" in parts.netloc:
        raise ValueError(
            "must not carry credentials (user:password@); the key pair goes in "
            "ALPACA_API_KEY_ID / ALPACA_SECRET_KEY"
        )
    if not parts.hostname:
        raise ValueError("has no host")
    return value.strip()


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
