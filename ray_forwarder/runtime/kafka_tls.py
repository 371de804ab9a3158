"""The TLS side of the Kafka connection: an `ssl.SSLContext` from the KAFKA_SSL_* settings.

Strimzi signs its listeners with a self-signed cluster CA, so the system trust store is not
enough: `KAFKA_SSL_CAFILE` names the CA (`ca.crt` of the `<cluster>-cluster-ca-cert` Secret).
A client certificate (`KAFKA_SSL_CERTFILE` / `KAFKA_SSL_KEYFILE`, a Strimzi `KafkaUser` with
`authentication: tls`) makes it mutual TLS. Hostname checking stays on unless explicitly
turned off.

Every error is one line that names the variable and the file, never a password. No Ray and
no Kafka in here, so `config.py` can check the files at start and the producer can build the
same context wherever it runs.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr


class KafkaTlsError(ValueError):
    """A TLS setting that cannot work; worded for an operator, never holds a secret."""


@dataclass(frozen=True)
class KafkaTls:
    """The TLS part of the Kafka settings (paths, not contents)."""

    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    key_password: SecretStr | None = field(default=None, repr=False)
    check_hostname: bool = True

    @property
    def configured(self) -> bool:
        """True when any file is named (the client then needs a TLS protocol)."""
        return bool(self.cafile or self.certfile or self.keyfile)


def readable_file(variable: str, path: str) -> str:
    """`path` if it names a regular file this process can read, else a KafkaTlsError."""
    target = Path(path)
    if not target.exists():
        raise KafkaTlsError(f"{variable}: {path} does not exist")
    if not target.is_file():
        raise KafkaTlsError(f"{variable}: {path} is not a file")
    if not os.access(target, os.R_OK):
        raise KafkaTlsError(f"{variable}: {path} is not readable by this process")
    return path


def ssl_context(tls: KafkaTls) -> ssl.SSLContext:
    """A client context that verifies the broker (CA file, or the system trust store when
    none is given), checks its hostname unless opted out, and presents a client
    certificate when one is configured."""
    if tls.keyfile and not tls.certfile:
        raise KafkaTlsError("KAFKA_SSL_KEYFILE is set without KAFKA_SSL_CERTFILE")
    if tls.key_password is not None and not tls.certfile:
        raise KafkaTlsError("KAFKA_SSL_KEY_PASSWORD is set without KAFKA_SSL_CERTFILE")
    if tls.cafile:
        readable_file("KAFKA_SSL_CAFILE", tls.cafile)
        try:
            context = ssl.create_default_context(cafile=tls.cafile)
        except ssl.SSLError as exc:
            raise KafkaTlsError(
                f"KAFKA_SSL_CAFILE: {tls.cafile} holds no usable PEM certificate ({_reason(exc)})"
            ) from None
    else:
        context = ssl.create_default_context()  # the system trust store
    if tls.certfile:
        readable_file("KAFKA_SSL_CERTFILE", tls.certfile)
        if tls.keyfile:
            readable_file("KAFKA_SSL_KEYFILE", tls.keyfile)
        _load_client_certificate(context, tls)
    # An explicit, documented opt-out: any certificate the CA signed is then accepted for
    # any broker address (a man in the middle holding one such certificate goes unnoticed).
    context.check_hostname = tls.check_hostname
    return context


def _load_client_certificate(context: ssl.SSLContext, tls: KafkaTls) -> None:
    """load_cert_chain with a password callback that never prompts on a terminal (OpenSSL's
    default for an encrypted key without a password would block a process with a TTY)."""
    assert tls.certfile is not None
    keyfile = tls.keyfile or tls.certfile
    secret = tls.key_password.get_secret_value() if tls.key_password is not None else ""
    try:
        context.load_cert_chain(tls.certfile, tls.keyfile, password=lambda: secret)
    except ssl.SSLError as exc:
        reason = _reason(exc)
        if "KEY_VALUES_MISMATCH" in reason:
            raise KafkaTlsError(
                f"KAFKA_SSL_KEYFILE: {keyfile} is not the key of the certificate in "
                f"KAFKA_SSL_CERTFILE ({tls.certfile})"
            ) from None
        if _is_encrypted(keyfile):
            raise KafkaTlsError(
                f"KAFKA_SSL_KEYFILE: cannot decrypt the key in {keyfile} "
                "(KAFKA_SSL_KEY_PASSWORD missing or wrong)"
            ) from None
        raise KafkaTlsError(
            f"KAFKA_SSL_CERTFILE/KAFKA_SSL_KEYFILE: cannot load the client certificate "
            f"{tls.certfile} with key {keyfile}: expected PEM files ({reason})"
        ) from None


def _is_encrypted(keyfile: str) -> bool:
    """True for a PEM key encrypted with a password (PKCS#8 or traditional OpenSSL)."""
    try:
        head = Path(keyfile).read_bytes()[:65536]
    except OSError:
        return False
    return b"ENCRYPTED PRIVATE KEY" in head or b"Proc-Type: 4,ENCRYPTED" in head


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's short reason (e.g. `KEY_VALUES_MISMATCH`), else the message's first line."""
    if exc.library and exc.reason:
        return f"{exc.library}: {exc.reason}"
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


#: (what OpenSSL says, what to tell the operator), first match wins.
_HANDSHAKE_HINTS = (
    ("mismatch, certificate is not valid for",
     "the broker's certificate does not name the host in KAFKA_BOOTSTRAP_SERVERS"),
    ("CERTIFICATE_VERIFY_FAILED",
     "the broker's certificate is not trusted; KAFKA_SSL_CAFILE must hold the CA that "
     "signed it (Strimzi: ca.crt of the <cluster>-cluster-ca-cert Secret)"),
    ("CERTIFICATE_REQUIRED",
     "the broker requires a client certificate (KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE)"),
    ("WRONG_VERSION_NUMBER",
     "the listener does not speak TLS (check the port and KAFKA_SECURITY_PROTOCOL)"),
)  # fmt: skip


def describe_handshake_failure(message: str) -> str | None:
    """An operator's reading of a Kafka client's log line about a failed TLS handshake
    (aiokafka logs the cause, then raises a generic "unable to bootstrap")."""
    for marker, hint in _HANDSHAKE_HINTS:
        if marker in message:
            detail = message.split(": ", 1)[-1].strip()[:300]
            return f"TLS handshake failed: {hint} ({detail})"
    return None


def client_certificate_hint(tls: KafkaTls, messages: Sequence[str]) -> str | None:
    """A listener that requires a client certificate refuses one without it after the TLS
    1.3 handshake, which the client sees only as a closed connection: say what may help."""
    if tls.certfile or not any("closed" in message for message in messages):
        return None
    return (
        "; the broker closed the TLS connection: if its listener requires a client "
        "certificate (Strimzi `authentication: tls`), set KAFKA_SSL_CERTFILE and "
        "KAFKA_SSL_KEYFILE"
    )
