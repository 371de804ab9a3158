"""A real single-node Apache Kafka (KRaft) broker for tests, the demo and CI — without Docker.

The broker jars come from Maven Central (`org.apache.kafka:kafka_2.13`) through `mvn` and are
cached per version; the broker runs as a plain `java` process on loopback ports with three
listeners: PLAINTEXT, SASL_PLAINTEXT (SCRAM-SHA-512, like Strimzi) and the KRaft CONTROLLER.
With `tls=True` it adds SSL (mutual TLS: a client certificate is required) and SASL_SSL
(SCRAM-SHA-512 over TLS), like Strimzi's `tls: true` listeners, with PEM certificates
generated at start (`devtools/certs.py`).

    with LocalKafka() as kafka:
        print(kafka.bootstrap_servers)          # "127.0.0.1:<port>"

Command line: `python -m ray_forwarder_dev.local_kafka start|stop|status|fetch`.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ray_forwarder_dev.certs import TlsFiles, generate_tls_files

log = logging.getLogger(__name__)

DEFAULT_KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.24.3"
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
SCRAM_MECHANISM = "SCRAM-SHA-512"
HOST = "127.0.0.1"
MARKER_NAME = ".complete"
STATE_NAME = "state.json"
PASSWORD_NAME = "scram-password"

_T = TypeVar("_T")


class LocalKafkaError(RuntimeError):
    """The local broker could not be fetched, formatted, started or reached."""


def default_cache_dir() -> Path:
    """`$RAY_FORWARDER_CACHE`, else `~/.cache/ray-forwarder`: jars outlive checkouts and runs."""
    env = os.environ.get("RAY_FORWARDER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ray-forwarder"


@dataclass(frozen=True)
class KafkaPorts:
    """The loopback ports; kept across broker restarts so clients can reconnect.
    `ssl` and `sasl_ssl` are None for a broker without TLS listeners."""

    plaintext: int
    sasl: int
    controller: int
    ssl: int | None = None
    sasl_ssl: int | None = None


# --------------------------------------------------------------------------- small helpers


def _tail(path: Path, lines: int = 40, start: int = 0) -> str:
    """Last lines of a log file from byte `start` on, for error messages."""
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError:
        return f"(no {path.name})"
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join(text) if text else f"({path.name} is empty)"


def _error_lines(path: Path, start: int = 0, limit: int = 12) -> str:
    """First ERROR/FATAL lines (with the exception line after each): the cause, not the noise."""
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    picked: list[str] = []
    for i, line in enumerate(lines):
        if " ERROR " in line or " FATAL " in line:
            picked.extend(lines[i : i + 2])
        if len(picked) >= limit:
            break
    return "\n".join(picked[:limit])


def _redact(text: str, secret: str) -> str:
    """Never let the SCRAM password reach a log line or an exception message."""
    return text.replace(secret, "***") if secret else text


#: Ray's default worker ports are 10002-19999: a broker there could take one from a worker.
RAY_WORKER_PORTS_END = 19999


def _ephemeral_floor() -> int:
    """Lowest ephemeral port; ours are picked below it so no client socket takes them meanwhile."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, RAY_WORKER_PORTS_END + 2000)


def _port_is_free(port: int) -> bool:
    """True when nothing listens on (or is bound to) the loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports outside the ephemeral range (restarts must get them back)."""
    high = _ephemeral_floor() - 1
    chosen: list[int] = []
    for _ in range(2000):
        port = random.randint(RAY_WORKER_PORTS_END + 1, high)
        if port not in chosen and _port_is_free(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise LocalKafkaError("could not find free loopback ports")


def _random_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, base64url without padding.

    Like Kafka's `Uuid.randomUuid()`, never one starting with "-": the storage tool's
    argument parser would read it as an option (1 start in 64 would fail).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _require_tool(name: str, hint: str) -> str:
    """Path of an executable, or a clear error saying what is missing."""
    if name == "java" and os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        if candidate.is_file():
            return str(candidate)
    path = shutil.which(name)
    if path is None:
        raise LocalKafkaError(f"`{name}` was not found on PATH; {hint}")
    return path


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine from sync code, even when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise jar downloads between processes (parallel test runs, CI jobs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_private(path: Path, text: str) -> None:
    """Write a file readable only by its owner (it holds a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def _die_with_parent_hook() -> Any:
    """A preexec_fn making the JVM get SIGTERM if this process dies without cleaning up.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only armed when
    forking from the main thread; elsewhere atexit and the fixture finalizer still apply.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


# --------------------------------------------------------------------------- file templates


def _pom_xml(kafka_version: str) -> str:
    """A dependency-only pom whose runtime closure is the broker plus a log4j2 binding."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0
                             https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.ray-forwarder</groupId>
  <artifactId>local-kafka-{kafka_version}</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{SCALA_VERSION}</artifactId>
      <version>{kafka_version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{DEPENDENCY_PLUGIN_VERSION}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""


def _listeners(ports: KafkaPorts) -> dict[str, int]:
    """Listener name -> port (the name is also its security protocol, except CONTROLLER)."""
    listeners = {"PLAINTEXT": ports.plaintext, "CONTROLLER": ports.controller,
                 "SASL_PLAINTEXT": ports.sasl}  # fmt: skip
    if ports.ssl is not None and ports.sasl_ssl is not None:
        listeners |= {"SSL": ports.ssl, "SASL_SSL": ports.sasl_ssl}
    return listeners


def _tls_properties(tls: TlsFiles) -> dict[str, str]:
    """PEM key store and trust store (Kafka >= 2.7 reads PEM files directly); the SSL
    listener demands a client certificate signed by the CA, SASL_SSL authenticates by SCRAM."""
    return {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(tls.server_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls.ca_cert),
        "listener.name.ssl.ssl.client.auth": "required",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
    }


def _server_properties(ports: KafkaPorts, data_dir: Path, tls: TlsFiles | None = None) -> str:
    """Single-node KRaft config tuned for a fast start and small disk use, not for durability."""
    c = ports.controller
    listeners = _listeners(ports)
    advertised = {name: port for name, port in listeners.items() if name != "CONTROLLER"}
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{HOST}:{c}",
        "listeners": ",".join(f"{name}://{HOST}:{port}" for name, port in listeners.items()),
        "advertised.listeners": ",".join(
            f"{name}://{HOST}:{port}" for name, port in advertised.items()
        ),
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": ",".join(
            f"{name}:{'PLAINTEXT' if name == 'CONTROLLER' else name}" for name in listeners
        ),
        "inter.broker.listener.name": "PLAINTEXT",
        "sasl.enabled.mechanisms": SCRAM_MECHANISM,
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        "log.dirs": str(data_dir),
        "num.partitions": "3",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "3",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        # After an unclean stop the controller refuses the new incarnation until the old
        # session expires (DUPLICATE_BROKER_REGISTRATION); 9 s by default, 4 s here.
        "broker.session.timeout.ms": "4000",
        "broker.heartbeat.interval.ms": "1000",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "background.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "log.cleaner.threads": "1",
        "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
        "log.segment.bytes": str(16 * 1024 * 1024),
        "log.retention.hours": "24",
        "log.retention.bytes": str(256 * 1024 * 1024),
        "log.retention.check.interval.ms": "60000",
        "offsets.topic.segment.bytes": str(16 * 1024 * 1024),
        "transaction.state.log.segment.bytes": str(16 * 1024 * 1024),
    }
    if tls is not None:
        settings |= _tls_properties(tls)
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def _log4j2_properties(log_file: Path) -> str:
    """Broker logs to a file (not our stdout), so failures can quote its tail."""
    return f"""status = warn
shutdownHook = disable
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


# --------------------------------------------------------------------------- readiness probe


async def probe_metadata(
    bootstrap: str,
    *,
    username: str | None = None,
    password: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 3.0,
) -> int:
    """Send one Metadata request (over SCRAM-SHA-512 when a user is given, over TLS with an
    `ssl_context`); return the broker count.

    Raises aiokafka's own errors, so an authentication failure surfaces as
    `SaslAuthenticationFailed` rather than a generic "unable to bootstrap".
    """
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    host, _, port = bootstrap.rpartition(":")
    security: dict[str, Any] = {}
    if ssl_context is not None:
        security = {"security_protocol": "SSL", "ssl_context": ssl_context}
    if username is not None:
        security |= {
            "security_protocol": "SASL_SSL" if ssl_context is not None else "SASL_PLAINTEXT",
            "sasl_mechanism": SCRAM_MECHANISM,
            "sasl_plain_username": username,
            "sasl_plain_password": password,
        }
    conn = await asyncio.wait_for(
        create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **security),
        timeout,
    )
    try:
        response = await asyncio.wait_for(conn.send(MetadataRequest([])), timeout)
    finally:
        conn.close()
    return len(response.brokers)


# --------------------------------------------------------------------------- the broker


_LIVE: set[LocalKafka] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    """atexit: no broker JVM outlives the Python process that started it."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for broker in live:
        with contextlib.suppress(Exception):
            broker.stop_broker()


atexit.register(_stop_all_at_exit)


@dataclass(eq=False)
class LocalKafka:
    """A single-node KRaft broker on loopback with a PLAINTEXT and a SCRAM-SHA-512 listener.

    `start()` fetches jars if needed, formats storage once and waits until both listeners
    answer a metadata request. `stop_broker()`/`start_broker()` keep data dir and ports, so a
    test can take the broker away and bring the same one back. `background=True` lets the
    broker outlive this process (the CLI uses it); otherwise it dies with us.
    """

    kafka_version: str = DEFAULT_KAFKA_VERSION
    cache_dir: Path = field(default_factory=default_cache_dir)
    work_dir: Path | None = None
    scram_username: str = "forwarder"
    scram_password: str = field(default="", repr=False)
    heap: str = "512m"
    ports: KafkaPorts | None = None
    background: bool = False
    keep_work_dir: bool = False
    tls: bool = False
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _own_work_dir: bool = field(default=False, init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        if not self.scram_password:
            self.scram_password = secrets.token_urlsafe(24)
        if any(ch in self.scram_password for ch in '"\\'):
            raise ValueError("the SCRAM password must not contain '\"' or '\\'")

    # ---- paths and addresses

    @property
    def version_dir(self) -> Path:
        """Cache folder for one Kafka version (pom.xml, libs/, lock)."""
        return self.cache_dir / f"kafka-{SCALA_VERSION}-{self.kafka_version}"

    @property
    def libs_dir(self) -> Path:
        """The broker's classpath folder."""
        return self.version_dir / "libs"

    @property
    def broker_log(self) -> Path:
        """The broker's own log4j2 log (appended across restarts)."""
        return self._work() / "logs" / "broker.log"

    @property
    def console_log(self) -> Path:
        """JVM stdout/stderr: crashes before log4j starts end up here."""
        return self._work() / "logs" / "console.log"

    @property
    def bootstrap_servers(self) -> str:
        """PLAINTEXT listener, "127.0.0.1:port"."""
        return f"{HOST}:{self._ports().plaintext}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        """SASL_PLAINTEXT (SCRAM-SHA-512) listener, "127.0.0.1:port"."""
        return f"{HOST}:{self._ports().sasl}"

    @property
    def ssl_bootstrap_servers(self) -> str:
        """SSL listener (mutual TLS: a client certificate signed by `tls_files.ca_cert`)."""
        return f"{HOST}:{self._tls_port('ssl')}"

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        """SASL_SSL listener (SCRAM-SHA-512 over TLS; no client certificate needed)."""
        return f"{HOST}:{self._tls_port('sasl_ssl')}"

    @property
    def tls_files(self) -> TlsFiles:
        """The CA, server keystore and client certificate of the TLS listeners."""
        if not self.tls:
            raise LocalKafkaError("this broker has no TLS listeners (LocalKafka(tls=True))")
        directory = self._work() / "tls"
        return TlsFiles(
            ca_cert=directory / "ca.crt",
            server_keystore=directory / "server-keystore.pem",
            client_cert=directory / "user.crt",
            client_key=directory / "user.key",
        )

    def client_ssl_context(self) -> ssl.SSLContext:
        """Trusts the local CA and presents the client certificate (accepted by both TLS
        listeners; SASL_SSL does not ask for it)."""
        files = self.tls_files
        context = ssl.create_default_context(cafile=str(files.ca_cert))
        context.load_cert_chain(str(files.client_cert), str(files.client_key))
        return context

    @property
    def pid(self) -> int | None:
        """The broker JVM's pid while it runs."""
        return self._proc.pid if self.is_running() else None

    def is_running(self) -> bool:
        """True while the broker JVM process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _ports(self) -> KafkaPorts:
        if self.ports is None:
            raise LocalKafkaError("the broker has no ports yet; call start() first")
        return self.ports

    def _tls_port(self, name: str) -> int:
        port = getattr(self._ports(), name)
        if not self.tls or port is None:
            raise LocalKafkaError("this broker has no TLS listeners (LocalKafka(tls=True))")
        return int(port)

    def _work(self) -> Path:
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="ray-forwarder-kafka-"))
            self._own_work_dir = True
        return Path(self.work_dir)

    # ---- jars

    def jars_complete(self) -> bool:
        """True when a previous download finished: the marker exists and lists present jars."""
        marker = self.libs_dir / MARKER_NAME
        if not marker.is_file():
            return False
        names = marker.read_text().split()
        return bool(names) and all((self.libs_dir / name).is_file() for name in names)

    def ensure_jars(self) -> Path:
        """Download the broker jars with mvn unless a complete copy is already cached."""
        if self.jars_complete():
            return self.libs_dir
        _require_tool("java", "install a Java 17+ runtime (Kafka 4.x needs 17)")
        mvn = _require_tool("mvn", "install Apache Maven to fetch the Kafka jars")
        with _file_lock(self.version_dir / ".lock"):
            if not self.jars_complete():
                self._download_jars(mvn)
        return self.libs_dir

    def _download_jars(self, mvn: str) -> None:
        """Copy the runtime closure into libs.partial, then publish it atomically."""
        started = time.monotonic()
        pom = self.version_dir / "pom.xml"
        pom.write_text(_pom_xml(self.kafka_version))
        partial = self.version_dir / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}",
            "-DincludeScope=runtime",
        ]
        log.info("fetching Kafka %s jars with mvn into %s", self.kafka_version, self.libs_dir)
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        output = (result.stdout + result.stderr).strip().splitlines()
        kafka_jar = partial / f"kafka_{SCALA_VERSION}-{self.kafka_version}.jar"
        if result.returncode != 0 or not kafka_jar.is_file():
            tail = "\n".join(output[-40:])
            raise LocalKafkaError(
                f"mvn could not fetch Kafka {self.kafka_version} (exit {result.returncode}):\n"
                f"{tail}"
            )
        names = sorted(p.name for p in partial.glob("*.jar"))
        shutil.rmtree(self.libs_dir, ignore_errors=True)
        partial.rename(self.libs_dir)
        (self.libs_dir / MARKER_NAME).write_text("\n".join(names) + "\n")
        log.info("fetched %d jars in %.1fs", len(names), time.monotonic() - started)

    # ---- lifecycle

    def start(self, timeout: float = 60.0) -> LocalKafka:
        """Fetch jars, prepare and format storage (once), start the JVM and wait until ready."""
        self.ensure_jars()
        self._prepare()
        self.start_broker(timeout)
        return self

    def stop(self) -> None:
        """Stop the broker for good and remove a temporary work dir. Safe to call twice."""
        self.stop_broker()
        if self._own_work_dir and not self.keep_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None
            self._own_work_dir = False
            self.ports = None

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start the same broker: same ports, same data."""
        self.stop_broker()
        self.start_broker(timeout)

    def start_broker(self, timeout: float = 60.0) -> float:
        """Start the JVM on the prepared data dir and ports; return seconds until ready."""
        if self.is_running():
            return 0.0
        if self.ports is None or not self._formatted():
            raise LocalKafkaError("storage is not prepared; call start() first")
        started = time.monotonic()
        self._spawn()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop_broker()
            raise
        elapsed = time.monotonic() - started
        log.info("Kafka broker ready on %s in %.1fs", self.bootstrap_servers, elapsed)
        return elapsed

    def stop_broker(self, timeout: float = 20.0) -> None:
        """SIGTERM the JVM's process group, wait, then SIGKILL. Data dir and ports stay."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("Kafka broker did not stop in %.0fs; killing it", timeout)
                self._signal(proc, signal.SIGKILL)
                proc.wait(10)
        self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def kill_broker(self) -> None:
        """SIGKILL the JVM, like a crash (data dir and ports stay; the next start recovers)."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal(self._proc, signal.SIGKILL)
        self.stop_broker()

    async def astart_broker(self, timeout: float = 60.0) -> float:
        """`start_broker` without blocking the event loop."""
        return await asyncio.to_thread(self.start_broker, timeout)

    async def astop_broker(self, timeout: float = 20.0) -> None:
        """`stop_broker` without blocking the event loop."""
        await asyncio.to_thread(self.stop_broker, timeout)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """Signal the JVM's own process group (it is a session leader)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _formatted(self) -> bool:
        return (self._work() / "data" / "meta.properties").is_file()

    def _prepare(self) -> None:
        """Choose ports, write configs and format storage with the SCRAM user (first time)."""
        work = self._work()
        for sub in ("config", "data", "logs"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        if self.ports is None:
            self.ports = KafkaPorts(*free_ports(5 if self.tls else 3))
        tls: TlsFiles | None = None
        if self.tls:
            if self.ports.ssl is None or self.ports.sasl_ssl is None:
                raise LocalKafkaError("tls=True needs KafkaPorts with ssl and sasl_ssl ports")
            tls = self.tls_files
            if not tls.server_keystore.is_file():  # once per work dir: restarts keep them
                generate_tls_files(tls.ca_cert.parent)
        (work / "config" / "server.properties").write_text(
            _server_properties(self.ports, work / "data", tls)
        )
        (work / "config" / "log4j2.properties").write_text(_log4j2_properties(self.broker_log))
        if not self._formatted():
            self._format_storage()

    def _java_cmd(self, heap: str, main: str, *args: str) -> list[str]:
        """A JVM command line tuned for quick start on a small machine."""
        java = _require_tool("java", "install a Java 17+ runtime (Kafka 4.x needs 17)")
        return [
            java,
            f"-Xmx{heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-XX:-UsePerfData",
            "-Xshare:auto",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._work() / 'config' / 'log4j2.properties'}",
            "-cp",
            f"{self.libs_dir}/*",
            main,
            *args,
        ]

    def _format_storage(self) -> None:
        """`kafka-storage format --standalone` with the SCRAM user added at format time."""
        scram = f'{SCRAM_MECHANISM}=[name={self.scram_username},password="{self.scram_password}"]'
        cmd = self._java_cmd(
            "256m",
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            _random_cluster_id(),
            "-c",
            str(self._work() / "config" / "server.properties"),
            "--add-scram",
            scram,
        )
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        if result.returncode != 0:
            output = _redact((result.stdout + result.stderr).strip(), self.scram_password)
            tail = "\n".join(output.splitlines()[-30:])
            raise LocalKafkaError(f"formatting Kafka storage failed:\n{tail}")

    def _spawn(self) -> None:
        """Start the JVM in its own process group with output going to files."""
        work = self._work()
        cmd = self._java_cmd(self.heap, "kafka.Kafka", str(work / "config" / "server.properties"))
        self._log_offset = self.broker_log.stat().st_size if self.broker_log.exists() else 0
        with self.console_log.open("ab") as console:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=work,
                start_new_session=True,
                preexec_fn=None if self.background else _die_with_parent_hook(),
            )
        if not self.background:
            with _LIVE_LOCK:
                _LIVE.add(self)

    def _wait_ready(self, timeout: float) -> None:
        """Poll every listener with real metadata requests until they list this broker."""
        deadline = time.monotonic() + timeout
        last_error = _run_sync(self._poll_ready(deadline))
        if last_error is None:
            return
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            reason = f"Kafka broker exited with code {proc.returncode} before it was ready"
        else:
            reason = f"Kafka broker not ready after {timeout:.0f}s (last error: {last_error})"
        raise LocalKafkaError(_redact(f"{reason}\n{self._failure_logs()}", self.scram_password))

    async def _poll_ready(self, deadline: float) -> str | None:
        """None once ready, else the last probe error when the deadline passed or the JVM died."""
        last_error = "no attempt"
        targets: list[tuple[str, str | None, ssl.SSLContext | None]] = [
            (self.bootstrap_servers, None, None),
            (self.sasl_bootstrap_servers, self.scram_username, None),
        ]
        if self.tls:
            context = self.client_ssl_context()
            targets += [
                (self.ssl_bootstrap_servers, None, context),
                (self.sasl_ssl_bootstrap_servers, self.scram_username, context),
            ]
        while True:
            for target in list(targets):
                bootstrap, user, context = target
                try:
                    brokers = await probe_metadata(
                        bootstrap,
                        username=user,
                        password=self.scram_password,
                        ssl_context=context,
                        timeout=2.0,
                    )
                except Exception as exc:
                    last_error = f"{bootstrap}: {type(exc).__name__}: {exc}"
                    break
                if brokers < 1:
                    last_error = f"{bootstrap}: metadata lists no broker yet"
                    break
                targets.remove(target)
            if not targets:
                return None
            if self._proc is None or self._proc.poll() is not None:
                return last_error
            if time.monotonic() >= deadline:
                return last_error
            await asyncio.sleep(0.2)

    def _failure_logs(self) -> str:
        """Tails of broker.log (this run only) and of the JVM console for error messages."""
        errors = _error_lines(self.broker_log, self._log_offset)
        return (
            (f"--- errors in {self.broker_log} ---\n{errors}\n" if errors else "")
            + f"--- tail of {self.broker_log} ---\n"
            f"{_tail(self.broker_log, 25, self._log_offset)}\n"
            f"--- tail of {self.console_log} ---\n{_tail(self.console_log, 15)}"
        )


# --------------------------------------------------------------------------- CLI


def _state_path(state_dir: Path) -> Path:
    return state_dir / STATE_NAME


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    """The state JSON written by `start`, or None."""
    try:
        return json.loads(_state_path(state_dir).read_text())
    except (OSError, ValueError):
        return None


def _pid_is_broker(pid: int) -> bool:
    """True when pid is alive, not a zombie, and is a Kafka JVM (guards against pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and b"kafka.Kafka" in cmdline


def _env_lines(state: dict[str, Any], *, sasl: bool, export: bool) -> list[str]:
    """Shell assignments for the forwarder; the password is read from its file, never printed."""
    prefix = "export " if export else ""
    # a scratch broker starts empty: let the forwarder create the topics it checks at start
    create = f"{prefix}KAFKA_CREATE_TOPICS=true"
    if not sasl:
        return [f"{prefix}KAFKA_BOOTSTRAP_SERVERS={state['bootstrap_servers']}", create]
    return [
        create,
        f"{prefix}KAFKA_BOOTSTRAP_SERVERS={state['sasl_bootstrap_servers']}",
        f"{prefix}KAFKA_USERNAME={state['username']}",
        f'{prefix}KAFKA_PASSWORD="$(cat {state["password_file"]})"',
        f"{prefix}KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT",
        f"{prefix}KAFKA_SASL_MECHANISM={SCRAM_MECHANISM}",
    ]


def _cli_start(args: argparse.Namespace) -> int:
    """Start (or restart, keeping data) a background broker in the state dir."""
    state_dir: Path = args.state_dir.resolve()
    state = _read_state(state_dir)
    if state and _pid_is_broker(int(state["pid"])):
        print(f"Kafka already running (pid {state['pid']})", file=sys.stderr)
        print("\n".join(_env_lines(state, sasl=args.sasl, export=args.export)))
        return 0
    password_file = state_dir / PASSWORD_NAME
    kafka = LocalKafka(
        kafka_version=args.kafka_version,
        work_dir=state_dir,
        heap=args.heap,
        background=True,
        keep_work_dir=True,
    )
    formatted = (state_dir / "data" / "meta.properties").is_file()
    if formatted and not (state and password_file.is_file()):
        raise LocalKafkaError(f"{state_dir} holds data but no state or password; remove it")
    if state and formatted:
        kafka.ports = KafkaPorts(**state["ports"])
        kafka.scram_username = state["username"]
        kafka.scram_password = password_file.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    _write_private(password_file, kafka.scram_password + "\n")
    started = time.monotonic()
    kafka.start(timeout=args.timeout)
    assert kafka.pid is not None and kafka.ports is not None
    state = {
        "pid": kafka.pid,
        "kafka_version": kafka.kafka_version,
        "ports": {
            "plaintext": kafka.ports.plaintext,
            "sasl": kafka.ports.sasl,
            "controller": kafka.ports.controller,
        },
        "bootstrap_servers": kafka.bootstrap_servers,
        "sasl_bootstrap_servers": kafka.sasl_bootstrap_servers,
        "username": kafka.scram_username,
        "password_file": str(password_file),
        "broker_log": str(kafka.broker_log),
        "started_at": time.time(),
    }
    _state_path(state_dir).write_text(json.dumps(state, indent=2) + "\n")
    elapsed = time.monotonic() - started
    print(
        f"Kafka started (pid {kafka.pid}) in {elapsed:.1f}s; state in {state_dir}", file=sys.stderr
    )
    print("\n".join(_env_lines(state, sasl=args.sasl, export=args.export)))
    return 0


def _cli_stop(args: argparse.Namespace) -> int:
    """Stop the background broker recorded in the state dir (data stays for the next start)."""
    state = _read_state(args.state_dir.resolve())
    if not state or not _pid_is_broker(int(state["pid"])):
        print("Kafka is not running", file=sys.stderr)
        return 0
    pid = int(state["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while _pid_is_broker(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_is_broker(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        print(f"Kafka (pid {pid}) did not stop in time; killed", file=sys.stderr)
    else:
        print(f"Kafka (pid {pid}) stopped", file=sys.stderr)
    return 0


def _cli_status(args: argparse.Namespace) -> int:
    """Exit 0 and print the env lines when the broker runs and answers; 1 otherwise."""
    state = _read_state(args.state_dir.resolve())
    if not state or not _pid_is_broker(int(state["pid"])):
        print("Kafka is not running", file=sys.stderr)
        return 1
    try:
        brokers = _run_sync(probe_metadata(state["bootstrap_servers"]))
    except Exception as exc:
        print(f"Kafka (pid {state['pid']}) does not answer: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka running (pid {state['pid']}, {brokers} broker)", file=sys.stderr)
    print("\n".join(_env_lines(state, sasl=args.sasl, export=args.export)))
    return 0


def _cli_fetch(args: argparse.Namespace) -> int:
    """Download the jars only (CI cache warm-up)."""
    started = time.monotonic()
    libs = LocalKafka(kafka_version=args.kafka_version).ensure_jars()
    print(f"{libs} ({time.monotonic() - started:.1f}s)", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ray_forwarder_dev.local_kafka",
        description="Run a local single-node Apache Kafka broker (KRaft) without Docker.",
    )
    parser.add_argument("command", choices=["start", "stop", "status", "fetch"])
    parser.add_argument("--state-dir", type=Path, default=Path(".cache/kafka"))
    parser.add_argument("--kafka-version", default=DEFAULT_KAFKA_VERSION)
    parser.add_argument("--heap", default="512m")
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument(
        "--sasl",
        action="store_true",
        help="print SASL_PLAINTEXT/SCRAM settings (password via file)",
    )
    parser.add_argument("--export", action="store_true", help="prefix lines with `export `")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the module CLI."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    args = _parser().parse_args(argv)
    commands = {
        "start": _cli_start,
        "stop": _cli_stop,
        "status": _cli_status,
        "fetch": _cli_fetch,
    }
    try:
        return commands[args.command](args)
    except LocalKafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())


@contextlib.contextmanager
def kafka_for_tools(announce: str | None = None) -> Iterator[str]:
    """The bootstrap servers the demo and the benchmark use: KAFKA_BOOTSTRAP_SERVERS when
    it is set, else a local broker that lives as long as the `with` block."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    if announce:
        print(announce, flush=True)
    with LocalKafka() as kafka:
        yield kafka.bootstrap_servers
