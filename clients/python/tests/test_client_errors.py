"""The core client against the real server: bad input, authentication, unavailability."""

import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import pytest

import floodgate
from floodgate import (
    BadRequest,
    Conflict,
    Floodgate,
    FloodgateError,
    PermitsExceedLimit,
    Unauthorized,
    Unavailable,
    UnknownLimiter,
)
from floodgate.errors import _BY_CODE, error_for

from conftest import MakeLimiter, ServerProcess, closed_port, wait_until


# -- bad input: each answered with the server's own message ---------------------------------


@pytest.mark.parametrize(
    "call, exc_type, code, message_start",
    [
        (lambda fg, n: fg.acquire("bad name!", wait=0), BadRequest, "invalid_request",
         "name: limiter name has the character ' '"),
        (lambda fg, n: fg.acquire("x" * 129, wait=0), BadRequest, "invalid_request",
         "name: limiter name is 129 characters long"),
        (lambda fg, n: fg.define("sp ace", 1), BadRequest, "invalid_request", "name:"),
        (lambda fg, n: fg.acquire(n, permits=0, wait=0), BadRequest, "invalid_request",
         "permits: must be at least 1"),
        (lambda fg, n: fg.acquire(n, lease=0, wait=0), BadRequest, "invalid_request",
         "lease_ms: must be at least 1 ms"),
        (lambda fg, n: fg.acquire(n, wait=-1), BadRequest, "invalid_request", "wait_ms:"),
        (lambda fg, n: fg.acquire(n, holder="h" * 257, wait=0), BadRequest, "invalid_request",
         "holder: at most 256 characters"),
        (lambda fg, n: fg.acquire(n, permits=3, wait=0), PermitsExceedLimit,
         "permits_exceed_limit", "permits: asked for 3 but at most 2 can ever be granted at once"),
        (lambda fg, n: fg.acquire("no-such-limiter", wait=0), UnknownLimiter,
         "unknown_limiter", "no limiter is named \"no-such-limiter\""),
        (lambda fg, n: fg.define(n, 0), BadRequest, "invalid_request",
         "concurrency: must be from 1 to 1000000"),
        (lambda fg, n: fg.define(n, lease=0), BadRequest, "invalid_request",
         "lease_ms: must be at least 1 ms"),
        (lambda fg, n: fg.define("new-without-concurrency", lease=5), BadRequest,
         "invalid_request", "concurrency: required when creating a limiter"),
        (lambda fg, n: fg.release("garbage"), BadRequest, "invalid_request",
         "permit_id: permit id \"garbage\" is not of the form NAME.TOKEN"),
        (lambda fg, n: fg.extend(n + ".1", lease=0), BadRequest, "invalid_request",
         "lease_ms: must be at least 1 ms"),
        (lambda fg, n: fg.limiter("no-such-limiter"), UnknownLimiter, "unknown_limiter",
         "no limiter is named"),
    ],
    ids=[
        "bad-name", "long-name", "bad-name-define", "permits-0", "lease-0", "negative-wait",
        "long-holder", "permits-above-limit", "unknown-limiter", "concurrency-0",
        "define-lease-0", "create-without-concurrency", "bad-permit-id", "extend-lease-0",
        "get-unknown",
    ],
)
def test_bad_input_raises_with_the_servers_message(
    fg: Floodgate, limiter: MakeLimiter, call: Callable[[Floodgate, str], object],
    exc_type: type, code: str, message_start: str,
) -> None:
    name = limiter(2)
    with pytest.raises(exc_type) as info:
        call(fg, name)
    e = info.value
    assert isinstance(e, FloodgateError)
    assert e.code == code
    assert e.message.startswith(message_start), e.message
    assert e.status in (400, 404)
    assert message_start in str(e)
    assert fg.limiter(name)["in_use"] == 0


def test_unauthorized(floodgate_bin: str, tmp_path: "os.PathLike[str]") -> None:
    from pathlib import Path
    proc = ServerProcess(floodgate_bin, Path(str(tmp_path)), ["--token", "s3cret"]).start()
    try:
        for token in (None, "wrong"):
            with pytest.raises(Unauthorized) as info:
                Floodgate(proc.url, token=token).define("auth-test", 1)
            assert info.value.status == 401 and info.value.code == "unauthorized"
            assert "bearer token" in info.value.message
        good = Floodgate(proc.url, token="s3cret")
        good.define("auth-test", 1)
        with good.permit("auth-test", wait=1) as p:
            assert p.fencing_token > 0
    finally:
        proc.stop()


def test_token_and_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOODGATE_URL", "http://127.0.0.1:9/prefix/")
    monkeypatch.setenv("FLOODGATE_TOKEN", "tok")
    fg = Floodgate.from_env(timeout=1.5)
    assert fg.url == "http://127.0.0.1:9/prefix" and fg.token == "tok" and fg.timeout == 1.5
    monkeypatch.delenv("FLOODGATE_URL")
    monkeypatch.delenv("FLOODGATE_TOKEN")
    fg = Floodgate.from_env()
    assert fg.url == floodgate.DEFAULT_URL and fg.token is None


def test_bad_url_is_refused_locally() -> None:
    with pytest.raises(ValueError):
        Floodgate("127.0.0.1:8750")


# -- unavailability ------------------------------------------------------------------------


def test_connection_errors_are_retried_then_unavailable() -> None:
    # A listener that accepts and hangs up at once: every attempt is a connection error.
    attempts: List[int] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            attempts.append(1)
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        # Each attempt is written, then hung up on: it may have been granted, so without
        # acquire_retry_window=0 the retries would go on for that window (test_client_restart).
        fg = Floodgate("http://127.0.0.1:{}".format(port), retries=3, backoff=0.01,
                       acquire_retry_window=0)
        with pytest.raises(Unavailable) as info:
            fg.acquire("x", wait=0)
        assert info.value.code == "unavailable" and info.value.status is None
        assert len(attempts) == 4  # the first try and 3 retries
    finally:
        stop.set()
        t.join(2)
        listener.close()


def test_nothing_listening_is_unavailable() -> None:
    with closed_port() as port:
        fg = Floodgate("http://127.0.0.1:{}".format(port), retries=2, backoff=0.05)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            fg.limiters()
        assert time.monotonic() - started >= 0.05  # two backoffs of at least half their delay
        assert not fg.healthy()


def test_held_acquire_on_shutdown_is_unavailable(floodgate_bin: str,
                                                 tmp_path: "os.PathLike[str]") -> None:
    from pathlib import Path
    proc = ServerProcess(floodgate_bin, Path(str(tmp_path))).start()
    fg = Floodgate(proc.url, retries=1, backoff=0.05)
    fg.define("shutdown", 1)
    held = fg.acquire("shutdown", wait=1)
    errors: List[BaseException] = []

    def wait() -> None:
        try:
            fg.acquire("shutdown", wait=30)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    assert wait_until(lambda: fg.limiter("shutdown")["waiting"] == 1, 5)
    proc.stop()  # SIGTERM: held acquires are answered 503 shutting_down
    t.join(10)
    assert errors and isinstance(errors[0], Unavailable), errors
    assert held.lease > 0


def test_each_error_code_maps_to_its_exception() -> None:
    """Every `error` code docs/openapi.yaml lists has its class (a 409 `superseded` is a
    `Conflict`, not a retryable `Unavailable`)."""
    spec = (Path(__file__).resolve().parents[3] / "docs" / "openapi.yaml").read_text()
    listed = re.search(r"enum: \[(invalid_request[^\]]*)\]", spec)
    assert listed is not None
    codes = [c.strip() for c in listed.group(1).split(",")]
    assert "superseded" in codes
    # Answered by the HTTP layer before the API (framing, connections): mapped by status.
    by_status_only = {"bad_request", "body_timeout", "uri_too_long", "headers_too_large",
                      "too_many_connections", "unsupported_media_type"}
    missing = [c for c in codes if c not in _BY_CODE and c not in by_status_only]
    assert missing == []
    err = error_for(409, "superseded", "request_id: a repeat took this wait over")
    assert isinstance(err, Conflict)
    assert err.code == "superseded"


def test_retry_hints_the_caller_cannot_act_on_are_capped_or_dropped() -> None:
    """A hint that is not a finite number of seconds is dropped; one beyond a day is capped
    (a countdown of 1e15 s overflows Celery's date arithmetic, which then drops the task)."""
    from email.message import Message

    from floodgate.transport import MAX_RETRY_AFTER, _parse_error

    def hint(body: bytes, header: Optional[str] = None) -> Optional[float]:
        headers = Message()
        if header is not None:
            headers["Retry-After"] = header
        err = _parse_error(503, body, headers)  # type: ignore[arg-type]
        assert isinstance(err, Unavailable)
        return err.retry_after

    unavailable = b'{"error": "store_unavailable", "message": "x"'
    assert hint(unavailable + b', "retry_after_ms": 2500}') == 2.5
    assert hint(unavailable + b', "retry_after_ms": 1e18}') == MAX_RETRY_AFTER
    assert hint(unavailable + b', "retry_after_ms": -5}') is None
    assert hint(unavailable + b"}", "inf") is None
    assert hint(unavailable + b"}", "nan") is None
    assert hint(unavailable + b"}", "1e15") == MAX_RETRY_AFTER
    assert hint(unavailable + b"}", "7") == 7.0


def test_a_body_timeout_is_retryable() -> None:
    """The server's 408 `body_timeout` (the request never reached it whole) is `Unavailable`,
    retried like a 503, not a failure of the task."""
    err = error_for(408, "body_timeout", "the request body did not arrive within 30000 ms")
    assert isinstance(err, Unavailable)
    assert isinstance(error_for(408, "", "a proxy's 408"), Unavailable)


def test_a_lost_permit_is_never_revived() -> None:
    from floodgate.permit import Permit

    data = {"permit_id": "p.1", "fencing_token": 1, "permits": 1, "lease_ms": 60000}
    permit = Permit(None, "p", data)  # type: ignore[arg-type]
    permit.lost = False  # not lost: nothing to revive
    assert not permit.lost
    permit.lost = True
    with pytest.raises(ValueError, match="never revived"):
        permit.lost = False
    assert permit.lost
