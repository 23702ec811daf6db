"""A permit's loss cannot be missed, a permit belongs to its process (fork), connections are
kept alive per process (issue 12 item 4), acquires carry a request id that retries reuse and
holders ride out a server restart (issue 10 items 3 and 4). Against the real server."""

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from floodgate import Floodgate, PermitLost, Unavailable

from conftest import MakeLimiter, ServerProcess, wait_until


# -- leaving the block after a loss ----------------------------------------------------------


def test_leaving_the_block_after_a_gil_hold_raises_permit_lost(
    fg: Floodgate, limiter: MakeLimiter
) -> None:
    name = limiter(1)
    old = sys.getswitchinterval()
    with pytest.raises(PermitLost) as info:
        with fg.permit(name, wait=1, lease=0.3):
            # A long computation that never lets the heartbeat thread have the GIL (as a C
            # call holding it would): the lease runs out with no extend.
            sys.setswitchinterval(1000.0)
            try:
                end = time.monotonic() + 1.0
                while time.monotonic() < end:
                    pass
            finally:
                sys.setswitchinterval(old)
    assert info.value.code == "permit_lost"
    assert fg.limiter(name)["in_use"] == 0


def test_leaving_the_block_after_permit_lost_raises(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(1)
    with pytest.raises(PermitLost) as info:
        with fg.permit(name, wait=1, lease=30, heartbeat=0.05) as p:
            fg.release(p.permit_id)  # someone else releases it by id
            assert wait_until(lambda: p.lost, 10)
    assert "the server answered permit_lost" in info.value.message


def test_a_released_permit_found_at_exit_raises(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(1)
    # No heartbeat ran (off): the release at the end finds the permit gone.
    with pytest.raises(PermitLost):
        with fg.permit(name, wait=1, lease=30, heartbeat=False) as p:
            assert fg.release(p.permit_id)


def test_the_blocks_own_exception_wins_over_permit_lost(
    fg: Floodgate, limiter: MakeLimiter
) -> None:
    name = limiter(1)
    with pytest.raises(KeyError) as info:
        with fg.permit(name, wait=1, lease=30, heartbeat=False) as p:
            fg.release(p.permit_id)
            raise KeyError("the block's own")
    if sys.version_info >= (3, 11):
        assert any("permit_lost" in note for note in info.value.__notes__)


def test_a_block_that_keeps_its_permit_exits_quietly(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(1)
    with fg.permit(name, wait=1, lease=1.0, heartbeat=0.1) as p:
        time.sleep(1.5)  # past the lease: the heartbeat keeps it
        released_early = False
    assert not released_early and p.released and not p.lost
    with fg.permit(name, wait=1, lease=5) as q:
        q.release()  # released inside the block: nothing to report
    assert fg.limiter(name)["counters"]["expired"] == 0


# -- fork ------------------------------------------------------------------------------------


def _in_child(check: Callable[[], None]) -> int:
    """Forks; the child runs ``check`` and exits 0 if it passed (1 and a message otherwise).
    Returns the child's pid to the parent; never returns in the child."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        check()
        code = 0
    except BaseException as e:  # noqa: BLE001 - reported through the exit code
        os.write(2, "child failed: {!r}\n".format(e).encode())
    finally:
        os._exit(code)


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_leaves_the_parents_permit_alone(
    fg: Floodgate, limiter: MakeLimiter, tmp_path: Path
) -> None:
    name = limiter(1)
    other = limiter(1)
    parent = os.getpid()
    done = tmp_path / "child-left-the-block"
    with fg.permit(name, wait=1, lease=1.5, heartbeat=0.2) as p:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                assert not p.owned
                assert p.release() is False  # no request: the parent holds it
                with pytest.raises(RuntimeError):
                    p.extend()
                # The holder label follows this process, and it takes its own permits.
                assert fg.holder.endswith("/{}".format(os.getpid()))
                q = fg.acquire(other, wait=1, lease=5)
                assert q.release() is True
                code = 0
            except BaseException as e:  # noqa: BLE001
                os.write(2, "child failed: {!r}\n".format(e).encode())
        if pid != 0:
            assert _exit_code(pid) == 0
            assert done.exists()
            # Still held by the parent, and still kept alive past its lease by the heartbeat.
            assert fg.limiter(name)["in_use"] == 1
            time.sleep(2.0)
            assert not p.lost and fg.limiter(name)["in_use"] == 1
    if os.getpid() != parent:
        # The child left the block: its __exit__ neither released nor raised.
        done.write_text("yes")
        os._exit(code)
    assert fg.holder.endswith("/{}".format(parent))
    counters = fg.limiter(name)["counters"]
    assert counters["released"] == 1 and counters["expired"] == 0
    assert fg.limiter(other)["counters"]["released"] == 1


def test_connections_are_kept_alive_and_not_shared_with_a_child(
    server: ServerProcess, limiter: MakeLimiter
) -> None:
    name = limiter(1)
    fg = Floodgate(server.url, timeout=5.0, retries=0)
    for _ in range(20):
        fg.limiter(name)
    with fg.permit(name, wait=1, lease=5):
        pass
    assert fg.connections_opened == 1

    def child() -> None:
        assert fg.connections_opened == 0
        for _ in range(5):
            fg.limiter(name)
        assert fg.connections_opened == 1

    assert _exit_code(_in_child(child)) == 0
    # The parent's kept connection still works: the child never used it.
    for _ in range(5):
        assert fg.limiter(name)["in_use"] == 0
    assert fg.connections_opened == 1


def test_a_connection_the_server_closed_is_replaced(
    server: ServerProcess, limiter: MakeLimiter
) -> None:
    name = limiter(1)
    fg = Floodgate(server.url, timeout=5.0, retries=0)
    fg.limiter(name)
    # Close the kept connection under the client, as a server's idle timeout would.
    for conn in fg._pool:
        assert conn.sock is not None
        conn.sock.shutdown(socket.SHUT_RDWR)
    assert fg.limiter(name)["in_use"] == 0
    assert fg.connections_opened == 2


# -- request ids -----------------------------------------------------------------------------


class DroppingProxy:
    """A TCP front for the real server that records every request body and hangs up, without
    answering, on the first ``drop`` acquires (as a connection broken mid-request would)."""

    def __init__(self, upstream_port: int, drop: int = 1) -> None:
        self.upstream_port = upstream_port
        self.drop = drop
        self.bodies: List[Dict[str, Any]] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            body += conn.recv(65536)
        request_line = head.split(b"\r\n")[0].decode()
        if body:
            self.bodies.append(json.loads(body))
        if "/acquire" in request_line and self.drop > 0:
            self.drop -= 1
            return  # hang up without an answer
        method, path, _ = request_line.split(" ", 2)
        with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
            head_lines = [line for line in head.split(b"\r\n")[1:]
                          if not line.lower().startswith(b"connection:")]
            up.sendall(b"\r\n".join([request_line.encode()] + head_lines
                                    + [b"Connection: close", b"", body]))
            answer = b""
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                answer += chunk
        conn.sendall(answer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.listener.close()


def test_a_retried_acquire_carries_the_same_request_id(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    name = limiter(2)
    proxy = DroppingProxy(server.port, drop=1)
    try:
        client = Floodgate("http://127.0.0.1:{}".format(proxy.port), retries=2, backoff=0.01)
        p = client.acquire(name, wait=1, lease=5)
        q = client.acquire(name, wait=1, lease=5)
    finally:
        proxy.close()
    acquires = [b for b in proxy.bodies if "wait_ms" in b]
    assert len(acquires) == 3  # dropped, its retry, and the second acquire
    ids = [b.get("request_id") for b in acquires]
    assert ids[0] and ids[0] == ids[1], ids  # the retry is the same logical acquire
    assert ids[2] and ids[2] != ids[0]  # a new acquire, a new id
    assert fg.limiter(name)["in_use"] == 2
    fg.release(p.permit_id)
    fg.release(q.permit_id)
    # Extends say how many permits they keep alive.
    r = fg.acquire(name, permits=2, wait=1, lease=5)
    proxy = DroppingProxy(server.port, drop=0)
    try:
        client = Floodgate("http://127.0.0.1:{}".format(proxy.port), retries=0)
        client.extend(r.permit_id, 5, permits=r.permits)
        r.client = client
        r.extend()
    finally:
        proxy.close()
    assert [b.get("permits") for b in proxy.bodies] == [2, 2]
    r.client = fg
    assert r.release() is True


# -- riding out a restart --------------------------------------------------------------------


def _serve_with(floodgate_bin: str, tmp_path: Path) -> ServerProcess:
    config = tmp_path / "floodgate.toml"
    config.write_text("[limiters.lim]\nconcurrency = 1\nlease_ms = 60000\n")
    # Restarted on the same port while the permit's heartbeats reconnect: a port below the
    # ephemeral range (conftest.free_port).
    return ServerProcess(
        floodgate_bin, tmp_path, extra=["--config", str(config)], restartable=True
    ).start()


def test_a_permit_rides_out_a_server_restart(floodgate_bin: str, tmp_path: Path) -> None:
    proc = _serve_with(floodgate_bin, tmp_path)
    fg = Floodgate(proc.url, timeout=1.0, retries=0)
    outcome: Optional[str] = None
    try:
        try:
            with fg.permit("lim", wait=1, lease=8, heartbeat=0.4) as p:
                proc.kill()
                # Extends fail (connection refused) and the permit is still held.
                assert wait_until(lambda: isinstance(p.heartbeat_error, Unavailable), 10)
                failed_at = time.monotonic()
                assert wait_until(lambda: time.monotonic() - failed_at > 0.8, 5)
                assert not p.lost, "an unreachable server stopped the work"
                extensions = p.extensions
                proc.start(port=proc.port)
                # The restarted server answers: either permit_lost (state lost) or an extend
                # (state kept or re-adopted).
                assert wait_until(lambda: p.lost or p.extensions > extensions, 10)
                outcome = "lost" if p.lost else "kept"
        except PermitLost as e:
            assert outcome == "lost"
            assert "the server answered permit_lost" in e.message
        else:
            assert outcome == "kept"
    finally:
        proc.stop()


def test_a_lease_that_ends_during_the_outage_is_lost(floodgate_bin: str, tmp_path: Path) -> None:
    proc = _serve_with(floodgate_bin, tmp_path)
    fg = Floodgate(proc.url, timeout=1.0, retries=0)
    lost_calls: List[Any] = []
    try:
        with pytest.raises(PermitLost) as info:
            with fg.permit("lim", wait=1, lease=1, heartbeat=0.3, on_lost=lost_calls.append) as p:
                proc.kill()
                assert wait_until(lambda: p.lost, 10)
                assert wait_until(lambda: bool(lost_calls), 10)
        assert "the lease ran out" in info.value.message
    finally:
        proc.stop()
