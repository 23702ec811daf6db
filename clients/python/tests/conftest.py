"""Fixtures: the real floodgate server binary (built with cargo when missing) and redis-server,
each started on a free loopback port and stopped at the end."""

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from floodgate import Floodgate

CLIENT_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = CLIENT_DIR.parent.parent

# The `limiter` fixture: makes a limiter with a name unique to the test and returns the name.
MakeLimiter = Callable[..., str]


# The lowest port `free_port` draws: above the well-known and most registered services' ports.
FIRST_PORT = 10_000


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's default when it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that was free just now (bound and released), for a process that cannot
    bind port 0 and report its choice (redis-server; a server restarted on the same port).

    Drawn at random below the kernel's ephemeral range, as the Rust tests' ports.rs does: the
    kernel never hands such a port to a ``bind(0)`` or an outgoing connection, so neither can
    take it between this probe and the child's bind, nor can a client reconnecting while the
    server is down be given it as its own port (and connect to itself). A process that binds
    a fixed port there anyway makes the child exit, and the callers then try another port."""
    end = ephemeral_start()
    if end > FIRST_PORT + 1000:
        draw = random.SystemRandom()
        for _ in range(1000):
            port = draw.randrange(FIRST_PORT, end)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    # No room below the ephemeral range (an unusual kernel setting): any free port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on for as long as the block runs: a socket is bound to
    it and never listens, so a connection is refused and no other process can bind it (a port
    bound and released could be taken by another test's server in between)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def cargo_binary() -> Path:
    """Where `cargo build -p floodgate-cli` puts the debug binary: under the target directory
    cargo itself reports, so `CARGO_TARGET_DIR` (or a config's `target-dir`) is followed
    rather than a stale or missing `target/debug/floodgate` tested instead; `target/` when
    cargo is not on PATH."""
    cargo = shutil.which("cargo")
    if cargo is None:
        return REPO_ROOT / "target" / "debug" / "floodgate"
    metadata = subprocess.run(
        [cargo, "metadata", "--quiet", "--no-deps", "--format-version", "1"],
        cwd=str(REPO_ROOT), check=True, stdout=subprocess.PIPE,
    ).stdout
    return Path(json.loads(metadata)["target_directory"]) / "debug" / "floodgate"


def floodgate_binary() -> str:
    configured = os.environ.get("FLOODGATE_BIN")
    if configured:
        if not os.access(configured, os.X_OK):
            pytest.fail("FLOODGATE_BIN={} is not an executable".format(configured))
        return configured
    binary = cargo_binary()
    if not binary.exists():
        cargo = shutil.which("cargo")
        if cargo is None:
            pytest.fail("{} is missing and cargo is not on PATH; "
                        "build the server or set FLOODGATE_BIN".format(binary))
        subprocess.run([cargo, "build", "-p", "floodgate-cli"], cwd=str(REPO_ROOT),
                       check=True)
    return str(binary)


class ServerProcess:
    """``floodgate serve`` on a free port, with its log (JSON lines) in a file.

    It binds port 0 itself and the address is read from its "floodgate listening" log line,
    so no port is picked here for another process to take first. ``restartable`` servers (a
    test kills one and starts it again on the same address) take a port from ``free_port``
    instead, below the ephemeral range: a client reconnecting to an ephemeral port while no
    server listens there could be given that port as its own."""

    def __init__(self, binary: str, log_dir: Path, extra: Optional[List[str]] = None,
                 restartable: bool = False) -> None:
        self.binary = binary
        self.extra = list(extra or [])
        self.log_dir = log_dir
        self.restartable = restartable
        self.log_path = self._new_log_path()
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        self.port = 0

    def _new_log_path(self) -> Path:
        return self.log_dir / "floodgate-{}.log".format(uuid.uuid4().hex[:8])

    @property
    def url(self) -> str:
        return "http://127.0.0.1:{}".format(self.port)

    def start(self, port: Optional[int] = None) -> "ServerProcess":
        """Starts the server on a free port, or on ``port`` (a restart on the same address)."""
        last_error = ""
        for _ in range(5):  # a fixed port may be taken by another process: try another one
            wanted = port or (free_port() if self.restartable else 0)
            # A log of its own per start: the listening line read is this process's.
            self.log_path = self._new_log_path()
            log = open(self.log_path, "ab")
            env = dict(os.environ)
            env.pop("FLOODGATE_TOKEN", None)
            env["FLOODGATE_LOG_FORMAT"] = "json"
            # Warnings and up, and the line saying where it listens.
            levels = env.get("FLOODGATE_LOG") or "warn"
            env["FLOODGATE_LOG"] = levels + ",floodgate_server::cli::serve=info"
            self.proc = subprocess.Popen(
                [self.binary, "serve", "--listen", "127.0.0.1:{}".format(wanted)] + self.extra,
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
            log.close()
            if wait_until(lambda: self._listening() is not None or self.proc.poll() is not None,
                          30.0) and self.proc.poll() is None:
                self.port = self._listening() or 0
                probe = Floodgate(self.url, timeout=0.5, retries=0)
                # (The lambda runs within this iteration, so it sees this `probe`.)
                if wait_until(lambda: probe.healthy() or self.proc.poll() is not None, 20.0):  # noqa: B023
                    if self.proc.poll() is None:
                        return self
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError("floodgate serve did not start:\n" + last_error)

    def _listening(self) -> Optional[int]:
        """The port of this start's "floodgate listening" log line, once it is written."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("message") == "floodgate listening":
                return int(str(entry["local"]).rsplit(":", 1)[1])
        return None

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would; the port stays as it was."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RedisProcess:
    """``redis-server`` on a free port, no persistence."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_path = log_dir / "redis-{}.log".format(uuid.uuid4().hex[:8])
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        self.port = 0

    @property
    def url(self) -> str:
        return "redis://127.0.0.1:{}/0".format(self.port)

    def start(self) -> "RedisProcess":
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server); "
                        "run_tests.sh installs it when run as root")
        for _ in range(5):  # the port may be taken by another process: try another one
            self.port = free_port()
            # A log of its own per try: its "Ready to accept connections" says this process
            # listens (a PONG alone could come from someone else's server on that port).
            self.log_path = self.log_dir / "redis-{}.log".format(uuid.uuid4().hex[:8])
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--protected-mode", "yes"],
                stdout=log, stderr=subprocess.STDOUT,
            )
            log.close()
            if wait_until(lambda: self._ready() or self.proc.poll() is not None, 30.0):
                if self.proc.poll() is None:
                    return self
            self.stop()
        raise RuntimeError("redis-server did not start:\n"
                           + self.log_path.read_text(errors="replace")[-2000:])

    def _ready(self) -> bool:
        try:
            ready = "Ready to accept connections" in self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return ready and self._ping()

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def floodgate_bin() -> str:
    return floodgate_binary()


@pytest.fixture(scope="session")
def server(floodgate_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(floodgate_bin, tmp_path_factory.mktemp("floodgate")).start()
    yield proc
    proc.stop()


@pytest.fixture
def fg(server: ServerProcess) -> Floodgate:
    return Floodgate(server.url, timeout=5.0, retries=2, backoff=0.05)


@pytest.fixture
def limiter(fg: Floodgate) -> MakeLimiter:
    """Creates a limiter with a name unique to the test; returns its name."""

    def make(concurrency: int = 1, **kwargs: object) -> str:
        name = "t-{}".format(uuid.uuid4().hex[:12])
        fg.define(name, concurrency, **kwargs)  # type: ignore[arg-type]
        return name

    return make


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    proc = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield proc
    proc.stop()


@contextlib.contextmanager
def celery_worker(app: str, cwd: Path, env: Dict[str, str], log_dir: Path, concurrency: int,
                  pool: str, name: str) -> Iterator["subprocess.Popen[bytes]"]:
    """A real Celery worker (`celery -A app worker`) started in `cwd`, yielded once it logs
    ready; stopped with SIGTERM (a warm shutdown), killed if it does not stop in 30 s. Its log
    is `log_dir/worker.log` (printed at the end, for a failing test's output)."""
    log_path = log_dir / "worker.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", app, "worker",
         "--concurrency", str(concurrency), "--pool", pool, "--loglevel", "info",
         "--without-gossip", "--without-mingle", "--without-heartbeat",
         "--hostname", "{}-{}@%h".format(name, uuid.uuid4().hex[:6])],
        cwd=str(cwd), env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()

    def ready() -> bool:
        return proc.poll() is not None or b" ready." in log_path.read_bytes()

    try:
        if not wait_until(ready, 60, 0.2) or proc.poll() is not None:
            pytest.fail("the celery worker did not start:\n"
                        + log_path.read_text(errors="replace")[-3000:])
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        print("celery worker log: {}".format(log_path))
