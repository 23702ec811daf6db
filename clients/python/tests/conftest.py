"""Fixtures: the real floodgate server binary (built with cargo when missing) and redis-server,
each started on a free loopback port and stopped at the end."""

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

from floodgate import Floodgate

CLIENT_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = CLIENT_DIR.parent.parent

# The `limiter` fixture: makes a limiter with a name unique to the test and returns the name.
MakeLimiter = Callable[..., str]


def free_port() -> int:
    """A port that was free a moment ago (the server cannot report a port-0 choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def floodgate_binary() -> str:
    configured = os.environ.get("FLOODGATE_BIN")
    if configured:
        if not os.access(configured, os.X_OK):
            pytest.fail("FLOODGATE_BIN={} is not an executable".format(configured))
        return configured
    binary = REPO_ROOT / "target" / "debug" / "floodgate"
    if not binary.exists():
        cargo = shutil.which("cargo")
        if cargo is None:
            pytest.fail("target/debug/floodgate is missing and cargo is not on PATH; "
                        "build the server or set FLOODGATE_BIN")
        subprocess.run([cargo, "build", "-p", "floodgate-cli"], cwd=str(REPO_ROOT),
                       check=True)
    return str(binary)


class ServerProcess:
    """``floodgate serve`` on a free port, with its log in a file."""

    def __init__(self, binary: str, log_dir: Path, extra: Optional[List[str]] = None) -> None:
        self.binary = binary
        self.extra = list(extra or [])
        self.log_path = log_dir / "floodgate-{}.log".format(uuid.uuid4().hex[:8])
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        self.port = 0

    @property
    def url(self) -> str:
        return "http://127.0.0.1:{}".format(self.port)

    def start(self, port: Optional[int] = None) -> "ServerProcess":
        """Starts the server on a free port, or on ``port`` (a restart on the same address)."""
        last_error = ""
        for _ in range(5):  # the free port may be taken between the probe and the bind
            self.port = port or free_port()
            log = open(self.log_path, "ab")
            env = dict(os.environ)
            env.pop("FLOODGATE_TOKEN", None)
            env.setdefault("FLOODGATE_LOG", "warn")
            self.proc = subprocess.Popen(
                [self.binary, "serve", "--listen", "127.0.0.1:{}".format(self.port)]
                + self.extra,
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
            log.close()
            probe = Floodgate(self.url, timeout=0.5, retries=0)
            # (The lambda runs within this iteration, so it sees this `probe`.)
            if wait_until(lambda: probe.healthy() or self.proc.poll() is not None, 20.0):  # noqa: B023
                if self.proc.poll() is None:
                    return self
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError("floodgate serve did not start:\n" + last_error)

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
        for _ in range(5):
            self.port = free_port()
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--protected-mode", "yes"],
                stdout=log, stderr=subprocess.STDOUT,
            )
            log.close()
            if wait_until(lambda: self._ping() or self.proc.poll() is not None, 10.0):
                if self.proc.poll() is None:
                    return self
            self.stop()
        raise RuntimeError("redis-server did not start:\n"
                           + self.log_path.read_text(errors="replace")[-2000:])

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
