"""Throw-away PEM certificates for the local broker's TLS listeners (tests, the demo).

A self-signed CA (like Strimzi's cluster CA), a server certificate it signs for the broker
and a client certificate for mutual TLS (like a Strimzi `KafkaUser` with
`authentication: tls`). EC P-256 keys: generating all of it takes milliseconds, so a test
session can make fresh ones each time. Uses `cryptography`, imported lazily so that the
rest of the devtools work without it.

The server certificate names only the addresses given (by default 127.0.0.1, which is what
the local broker advertises), so that a client bootstrapping through `localhost` shows
hostname checking at work.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class TlsFiles:
    """Where the generated PEM files are."""

    ca_cert: Path  # the CA certificate: the client's KAFKA_SSL_CAFILE, the broker's truststore
    server_keystore: Path  # server key + certificate chain: Kafka's `ssl.keystore.type=PEM`
    client_cert: Path  # for mTLS: KAFKA_SSL_CERTFILE
    client_key: Path  # for mTLS: KAFKA_SSL_KEYFILE (unencrypted PKCS#8, like Strimzi's user.key)


@dataclass(frozen=True)
class _Issued:
    key: Any
    cert: Any


def generate_ca(directory: Path, name: str = "ray-forwarder local CA") -> Path:
    """A lone CA certificate (its key is thrown away): one that signed nothing we serve,
    for testing a client given the wrong CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _issue_ca(name)
    path = directory / "ca.crt"
    path.write_bytes(_cert_pem(ca.cert))
    return path


def generate_tls_files(
    directory: Path,
    *,
    server_ips: Sequence[str] = ("127.0.0.1",),
    server_dns: Sequence[str] = (),
    client_name: str = "forwarder",
) -> TlsFiles:
    """Write a CA, a server keystore and a client certificate/key into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _issue_ca("ray-forwarder local cluster CA")
    server = _issue_leaf(ca, "local-kafka", server_ips, server_dns, server=True)
    client = _issue_leaf(ca, client_name, (), (), server=False)
    files = TlsFiles(
        ca_cert=directory / "ca.crt",
        server_keystore=directory / "server-keystore.pem",
        client_cert=directory / "user.crt",
        client_key=directory / "user.key",
    )
    files.ca_cert.write_bytes(_cert_pem(ca.cert))
    _write_private(files.server_keystore, _key_pem(server.key) + _cert_pem(server.cert))
    files.client_cert.write_bytes(_cert_pem(client.cert))
    _write_private(files.client_key, _key_pem(client.key))
    return files


def _issue_ca(name: str) -> _Issued:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    return _Issued(key, builder.sign(key, hashes.SHA256()))


def _issue_leaf(
    ca: _Issued, name: str, ips: Sequence[str], dns: Sequence[str], *, server: bool
) -> _Issued:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
    )
    names = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    names += [x509.DNSName(host) for host in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _Issued(key, builder.sign(ca.key, hashes.SHA256()))


def _validity(builder: Any) -> Any:
    from cryptography import x509

    now = datetime.datetime.now(datetime.UTC)
    return (
        builder.serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + VALIDITY)
    )


def _cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    """Unencrypted PKCS#8 (`BEGIN PRIVATE KEY`): what Kafka's PEM keystore reads."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Keys are readable by their owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
