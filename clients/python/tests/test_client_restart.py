"""A holder across a restart of ``floodgate serve``, against the real binary: with a data
directory the permit survives and the heartbeat keeps extending it; without one the holder is
told the permit is lost, whichever call of its (extend, release) first reaches the restarted
server, and never takes that server's "not held" for its own doing when its earlier attempt
could not have reached any server.

The server is SIGKILLed (a crash) and started again on the same port. Where a test needs the
restart to fall between two attempts of one call, a handler on the client's ``floodgate``
logger restarts it when the client logs that the first attempt failed (in the calling thread,
before the retry is sent), so the order does not depend on timing."""

import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from floodgate import Floodgate, PermitLost, Unavailable

from conftest import ServerProcess, wait_until


def _serve(floodgate_bin: str, tmp_path: Path, data_dir: bool) -> ServerProcess:
    config = tmp_path / "floodgate.toml"
    config.write_text("[limiters.lim]\nconcurrency = 1\nlease_ms = 60000\n")
    extra = ["--config", str(config)]
    if data_dir:
        extra += ["--data-dir", str(tmp_path / "data")]
    # Restarted on the same port: a port below the ephemeral range (conftest.free_port).
    return ServerProcess(floodgate_bin, tmp_path, extra=extra, restartable=True).start()


class _RestartOnRetry(logging.Handler):
    """Starts ``proc`` again (on its port) the first time the client logs a retry of a
    request whose path contains ``path_part``: between that call's first attempt and its
    retry."""

    def __init__(self, proc: ServerProcess, path_part: str) -> None:
        super().__init__(logging.DEBUG)
        self.proc = proc
        self.path_part = path_part
        self.restarted = 0
        self.error: Optional[BaseException] = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.restarted or "; retry " not in message or self.path_part not in message:
            return
        self.restarted += 1
        try:
            self.proc.start(port=self.proc.port)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


@pytest.fixture
def restart_on_retry() -> Iterator[List[_RestartOnRetry]]:
    logger = logging.getLogger("floodgate")
    level = logger.level
    handlers: List[_RestartOnRetry] = []
    logger.setLevel(logging.DEBUG)
    try:
        yield handlers
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)


def _install(handlers: List[_RestartOnRetry], proc: ServerProcess,
             path_part: str) -> _RestartOnRetry:
    handler = _RestartOnRetry(proc, path_part)
    logging.getLogger("floodgate").addHandler(handler)
    handlers.append(handler)
    return handler


def test_a_release_refused_then_answered_not_held_by_a_restarted_server_is_a_loss(
    floodgate_bin: str, tmp_path: Path, restart_on_retry: List[_RestartOnRetry]
) -> None:
    """The server (no data directory) crashed while the block held its permit; the block
    ends while it is down, so the release's first attempt is refused (it reached no server),
    and the retry reaches the restarted server, which never heard of the permit. That "not
    held" is the loss, not the release's doing: leaving the block raises PermitLost, and
    the slot the holder believed it had was free for anyone on the new server."""
    proc = _serve(floodgate_bin, tmp_path, data_dir=False)
    fg = Floodgate(proc.url, timeout=5.0, retries=5, backoff=0.2, backoff_max=1.0,
                   bookkeeping_deadline=120.0)
    handler = _install(restart_on_retry, proc, "/release")
    try:
        with pytest.raises(PermitLost) as info:
            with fg.permit("lim", wait=1, lease=60, heartbeat=False) as p:
                proc.kill()
        assert handler.error is None and handler.restarted == 1
        assert "the server no longer held it at its release" in info.value.message
        assert p.lost and p.released
        # The restarted server never knew it: its one slot is free.
        assert Floodgate(proc.url).limiter("lim")["in_use"] == 0
    finally:
        proc.stop()


def test_a_direct_release_refused_then_answered_not_held_returns_false(
    floodgate_bin: str, tmp_path: Path, restart_on_retry: List[_RestartOnRetry]
) -> None:
    """As above through ``p.release()``: it returns whether the server still held the permit,
    and the server did not (the refused attempt released nothing)."""
    proc = _serve(floodgate_bin, tmp_path, data_dir=False)
    fg = Floodgate(proc.url, timeout=5.0, retries=5, backoff=0.2, backoff_max=1.0,
                   bookkeeping_deadline=120.0)
    handler = _install(restart_on_retry, proc, "/release")
    try:
        p = fg.acquire("lim", wait=1, lease=60)
        proc.kill()
        assert p.release() is False
        assert handler.error is None and handler.restarted == 1
    finally:
        proc.stop()


def test_a_release_refused_then_answered_by_a_durable_restarted_server_releases(
    floodgate_bin: str, tmp_path: Path, restart_on_retry: List[_RestartOnRetry]
) -> None:
    """The same crash with a data directory: the restarted server still holds the permit,
    the retried release frees it, and the block ends quietly."""
    proc = _serve(floodgate_bin, tmp_path, data_dir=True)
    fg = Floodgate(proc.url, timeout=5.0, retries=5, backoff=0.2, backoff_max=1.0,
                   bookkeeping_deadline=120.0)
    handler = _install(restart_on_retry, proc, "/release")
    try:
        with fg.permit("lim", wait=1, lease=60, heartbeat=False) as p:
            proc.kill()
        assert handler.error is None and handler.restarted == 1
        assert p.released and not p.lost
        status = Floodgate(proc.url).limiter("lim")
        assert status["in_use"] == 0 and status["counters"]["released"] == 1
    finally:
        proc.stop()


def _heartbeat_across_a_crash(proc: ServerProcess, fg: Floodgate) -> None:
    """Holds a permit with a heartbeat, crashes the server, waits for the heartbeat to fail
    against it, and starts it again: the block's outcome is the caller's to check."""
    with fg.permit("lim", wait=1, lease=60, heartbeat=0.3) as p:
        proc.kill()
        assert wait_until(lambda: p.heartbeat_error is not None, 30)
        extensions = p.extensions
        assert not p.lost, "an unreachable server stopped the work"
        proc.start(port=proc.port)
        # The restarted server decides: an extend that succeeds, or permit_lost.
        assert wait_until(lambda: p.lost or p.extensions > extensions, 30)
        if not p.lost:
            # Still extended after the restart, more than once; the failures are over.
            assert wait_until(lambda: p.lost or p.extensions > extensions + 2, 30)
            assert wait_until(lambda: p.lost or p.heartbeat_error is None, 30), \
                p.heartbeat_error


def test_with_a_data_directory_the_heartbeat_keeps_the_permit_across_a_crash(
    floodgate_bin: str, tmp_path: Path
) -> None:
    proc = _serve(floodgate_bin, tmp_path, data_dir=True)
    fg = Floodgate(proc.url, timeout=1.0, retries=0)
    try:
        _heartbeat_across_a_crash(proc, fg)  # leaves the block without PermitLost
        status = Floodgate(proc.url).limiter("lim")
        assert status["in_use"] == 0
        assert status["counters"]["released"] == 1 and status["counters"]["expired"] == 0
    finally:
        proc.stop()


def test_without_a_data_directory_the_heartbeat_learns_the_permit_is_lost(
    floodgate_bin: str, tmp_path: Path
) -> None:
    """No learning window (docs/learning.md): the restarted server does not re-adopt, so the
    heartbeat's first extend that reaches it is answered permit_lost, long before the local
    lease (60 s from the last extend) could say so."""
    proc = _serve(floodgate_bin, tmp_path, data_dir=False)
    fg = Floodgate(proc.url, timeout=1.0, retries=0)
    try:
        with pytest.raises(PermitLost) as info:
            _heartbeat_across_a_crash(proc, fg)
        assert "the server answered permit_lost" in info.value.message
        # The new server's slot is free for others; the old holder's release freed nothing.
        status = Floodgate(proc.url).limiter("lim")
        assert status["in_use"] == 0 and status["counters"]["released"] == 0
    finally:
        proc.stop()


def test_a_grant_whose_answer_is_lost_in_a_crash_is_the_grant_the_retry_gets(
    floodgate_bin: str, tmp_path: Path
) -> None:
    """With a data directory the idempotency key survives a crash: the server granted, the
    answer never reached the client, the server crashed and came back before the retry;
    the retry (same request_id) gets that grant, not a second permit nor a wait behind the
    first one's slot (the limit is 1)."""
    from test_adversarial_client import Proxy, _acquires

    proc = _serve(floodgate_bin, tmp_path, data_dir=True)
    seen = [0]

    def hook(request_line: str, body: Dict[str, Any]) -> Any:
        if "/acquire" not in request_line:
            return "forward"
        seen[0] += 1
        if seen[0] == 1:
            return "drop-after"
        if seen[0] == 2:
            proc.kill()
            proc.start(port=proc.port)
        return "forward"

    proxy = Proxy(proc.port, hook)
    try:
        client = Floodgate(proxy.url, timeout=60.0, retries=2, backoff=0.01)
        p = client.acquire("lim", wait=0, lease=60)
        first = json.loads(proxy.answers[0].partition(b"\r\n\r\n")[2])
        assert first["permit_id"] == p.permit_id
        acquires = _acquires(proxy)
        assert len(acquires) == 2 and acquires[0]["request_id"] == acquires[1]["request_id"]
        fg = Floodgate(proc.url)
        status = fg.limiter("lim")
        assert status["in_use"] == 1 and status["counters"]["granted"] == 1
        assert fg.release(p.permit_id) is True
    finally:
        proxy.close()
        proc.stop()


def test_a_grant_lost_in_a_crash_is_got_by_a_retry_after_a_restart_longer_than_the_retries(
    floodgate_bin: str, tmp_path: Path
) -> None:
    """The server granted, the answer was lost, the server crashed and stayed down through
    more attempts than ``retries`` (default 3): the acquire, which may have been granted,
    goes on retrying within ``acquire_retry_window`` (default 30 s), and the retry sent once
    the restarted server (with its data directory) serves gets that grant, not a second one.
    Before, the call raised Unavailable after the fourth attempt and the grant stayed held
    until its lease ended. Attempts are counted, not timed: the server comes back at the
    fifth."""
    from test_adversarial_client import Proxy, _acquires

    proc = _serve(floodgate_bin, tmp_path, data_dir=True)
    seen = [0]

    def hook(request_line: str, body: Dict[str, Any]) -> Any:
        if "/acquire" not in request_line:
            return "forward"
        seen[0] += 1
        if seen[0] == 1:
            return "drop-after"  # granted; the answer never reaches the client
        if seen[0] == 2:
            proc.kill()  # the crash
        if seen[0] < 5:
            return "drop-before"  # nothing serves: the connection breaks
        if seen[0] == 5:
            proc.start(port=proc.port)
        return "forward"

    proxy = Proxy(proc.port, hook)
    try:
        client = Floodgate(proxy.url, timeout=60.0)  # retries=3, the default window
        p = client.acquire("lim", wait=0, lease=60)
        first = json.loads(proxy.answers[0].partition(b"\r\n\r\n")[2])
        assert first["permit_id"] == p.permit_id
        acquires = _acquires(proxy)
        assert len(acquires) == 5 and len({a["request_id"] for a in acquires}) == 1
        fg = Floodgate(proc.url)
        status = fg.limiter("lim")
        assert status["in_use"] == 1 and status["counters"]["granted"] == 1
        assert fg.release(p.permit_id) is True
    finally:
        proxy.close()
        proc.stop()


def test_without_a_lost_answer_an_acquire_gives_up_after_its_retries(
    floodgate_bin: str, tmp_path: Path, restart_on_retry: List[_RestartOnRetry]
) -> None:
    """The window is for a grant that may have been made: an acquire whose attempts never
    reached a server (refused) is retried ``retries`` times, as before, and raises
    Unavailable; so is one whose window is 0. (``restart_on_retry`` only sets the logger to
    DEBUG here: nothing is restarted.)"""
    proc = _serve(floodgate_bin, tmp_path, data_dir=True)
    url = proc.url
    proc.kill()
    counted = _CountRetries()
    logging.getLogger("floodgate").addHandler(counted)
    try:
        with pytest.raises(Unavailable):
            Floodgate(url, retries=2, backoff=0.01).acquire("lim", wait=0)
        assert counted.retries == 2
        from test_adversarial_client import Proxy

        proxy = Proxy(proc.port, lambda line, body: "drop-before")
        try:
            counted.retries = 0
            with pytest.raises(Unavailable):
                Floodgate(proxy.url, retries=2, backoff=0.01,
                          acquire_retry_window=0).acquire("lim", wait=0)
            assert counted.retries == 2 and len(proxy.requests) == 3
        finally:
            proxy.close()
    finally:
        logging.getLogger("floodgate").removeHandler(counted)


class _CountRetries(logging.Handler):
    """Counts the client's "retry" debug lines (the fixture sets the logger to DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "; retry " in record.getMessage():
            self.retries += 1
