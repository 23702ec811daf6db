"""Each branch of ``@limited`` against the real server, calling the wrapped function with a
stand-in for Celery's bound ``self`` (its ``request`` and ``retry``). The real worker runs in
test_celery_e2e.py."""

import logging
from typing import Any, Callable, Dict, List, Optional

import pytest
from celery.exceptions import Retry as _CeleryRetry
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

import threading
import time
import uuid
from pathlib import Path

from floodgate import Backoff, Floodgate, PermitLost, Unavailable, UnknownLimiter, WaitTimeout
from conftest import ServerProcess, closed_port, wait_until
from floodgate.celery import (
    THROTTLE_RETRIES,
    UNAVAILABLE_RETRIES,
    WAIT_RETRIES,
    current_permit,
    full_jitter,
    limited,
)

MakeLimiter = Callable[..., str]


class Request:
    def __init__(self, headers: Optional[Dict[str, Any]] = None) -> None:
        self.headers = headers
        self.id = "task-1"
        self.hostname = "worker@test"
        self.retries = 0


class RetryCalled(Exception):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(kwargs)
        self.kwargs = kwargs


class BoundTask:
    """What Celery passes as ``self`` to a bound task, as far as the decorator uses it."""

    name = "tests.query"

    def __init__(self, headers: Optional[Dict[str, Any]] = None) -> None:
        self.request = Request(headers)

    def retry(self, **kwargs: Any) -> None:
        raise RetryCalled(**kwargs)


class Throttled(Exception):
    pass


def _has_feedback(fg: Floodgate, name: str) -> bool:
    return "feedback_ok" in fg.limiter(name)["counters"]


def test_body_runs_under_a_permit(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(1)
    seen: List[Any] = []

    @limited(name, wait=1, lease=5, client=fg)
    def body(self: Any, a: int, b: int) -> int:
        p = current_permit()
        assert p is not None and not p.lost
        seen.append((p.fencing_token, fg.limiter(name)["in_use"]))
        return a + b

    assert body(BoundTask(), 2, 3) == 5
    assert seen and seen[0][0] > 0 and seen[0][1] == 1
    assert current_permit() is None
    counters = fg.limiter(name)["counters"]
    assert fg.limiter(name)["in_use"] == 0 and counters["released"] == 1
    if _has_feedback(fg, name):
        assert counters["feedback_ok"] == 1
    assert body.__name__ == "body"  # Celery names the task after the function


def test_wait_timeout_retries_with_the_servers_hint(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(1, lease=20)
    ran: List[int] = []

    @limited(name, wait=0.05, client=fg, retry_jitter=0.1)
    def body(self: Any) -> None:
        ran.append(1)

    with fg.permit(name, wait=1):
        with pytest.raises(RetryCalled) as info:
            body(BoundTask({"other": "kept"}))
        kwargs = info.value.kwargs
        assert isinstance(kwargs["exc"], WaitTimeout)
        hint = kwargs["exc"].retry_after
        assert hint > 0 and hint <= kwargs["countdown"] <= hint * 1.1 + 1e-9
        assert kwargs["headers"] == {"other": "kept", WAIT_RETRIES: 1}
        assert kwargs["max_retries"] > 10**9  # unbounded, whatever the task's max_retries

        # The count goes on from the message's headers; max_retries bounds it when set.
        with pytest.raises(RetryCalled) as info:
            body(BoundTask({WAIT_RETRIES: 7}))
        assert info.value.kwargs["headers"][WAIT_RETRIES] == 8
        bounded = limited(name, wait=0, client=fg, max_retries=3)(lambda self: None)
        with pytest.raises(WaitTimeout):
            bounded(BoundTask({WAIT_RETRIES: 3}))
        capped = limited(name, wait=0, client=fg, max_countdown=0.01)(lambda self: None)
        with pytest.raises(RetryCalled) as info:
            capped(BoundTask())
        assert info.value.kwargs["countdown"] == 0.01
    assert ran == []


def test_throttle_is_reported_and_retried_with_backoff(fg: Floodgate,
                                                       limiter: MakeLimiter) -> None:
    name = limiter(1)

    @limited(name, wait=1, client=fg, throttle_exceptions=(Throttled,), backoff=0.5,
             backoff_max=4, throttle_max_retries=2)
    def body(self: Any) -> None:
        raise Throttled("backend: too many concurrent queries")

    with pytest.raises(RetryCalled) as info:
        body(BoundTask({WAIT_RETRIES: 4}))
    kwargs = info.value.kwargs
    assert isinstance(kwargs["exc"], Throttled)
    assert 0 <= kwargs["countdown"] <= 0.5
    assert kwargs["headers"] == {WAIT_RETRIES: 4, THROTTLE_RETRIES: 1}
    with pytest.raises(RetryCalled) as info:
        body(BoundTask({THROTTLE_RETRIES: 1}))
    assert 0 <= info.value.kwargs["countdown"] <= 1.0
    with pytest.raises(Throttled):  # throttle_max_retries reached: the exception is raised
        body(BoundTask({THROTTLE_RETRIES: 2}))
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["released"] == 3
    if _has_feedback(fg, name):
        assert status["counters"]["feedback_throttled"] == 3


def test_other_exceptions_release_and_propagate(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(1)

    @limited(name, wait=1, client=fg, throttle_exceptions=(Throttled,))
    def body(self: Any) -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        body(BoundTask())
    status = fg.limiter(name)
    assert status["in_use"] == 0
    if _has_feedback(fg, name):
        assert status["counters"]["feedback_error"] == 1


def test_control_flow_and_floodgate_errors_are_never_taken_by_a_broad_throttle_class(
    fg: Floodgate, limiter: MakeLimiter
) -> None:
    """``throttle_exceptions=(Exception,)`` covers the backend's errors, not the body's own
    ``self.retry`` (Celery's Retry), a lost permit, nor a nested acquire's WaitTimeout: none
    is reported as throttled and retried as one."""
    name = limiter(1)
    full = limiter(1)
    blocker = fg.acquire(full, wait=1, lease=30, heartbeat=False)

    @limited(name, wait=1, lease=30, client=fg, throttle_exceptions=(Exception,))
    def body(self: Any, how: str) -> None:
        if how == "retry":
            raise _CeleryRetry("the body's own retry")
        if how == "lost":
            p = current_permit()
            assert p is not None
            fg.release(p.permit_id)  # released by id elsewhere: the extend learns it
            p.extend()
        if how == "nested":
            fg.acquire(full, wait=0)
        raise Throttled("backend: too many")

    try:
        with pytest.raises(_CeleryRetry):
            body(BoundTask(), "retry")
        with pytest.raises(PermitLost):
            body(BoundTask(), "lost")
        with pytest.raises(WaitTimeout):
            body(BoundTask(), "nested")
        with pytest.raises(RetryCalled):  # the backend's own still is one
            body(BoundTask(), "throttled")

        @limited(name, wait=1, lease=30, client=fg, throttle_exceptions=(WaitTimeout,))
        def nested(self: Any) -> None:
            fg.acquire(full, wait=0)

        with pytest.raises(RetryCalled):  # named by its own class, it is one
            nested(BoundTask())
    finally:
        blocker.release()
    status = fg.limiter(name)
    assert status["in_use"] == 0
    if _has_feedback(fg, name):
        assert status["counters"]["feedback_throttled"] == 2
        assert status["counters"]["feedback_error"] == 2  # the lost permit, the nested wait


@pytest.mark.parametrize(
    "stop", [SystemExit, KeyboardInterrupt, GeneratorExit, SoftTimeLimitExceeded,
             TimeLimitExceeded],
    ids=lambda c: c.__name__,
)
def test_exits_and_time_limits_are_never_throttles(
    fg: Floodgate, limiter: MakeLimiter, stop: type
) -> None:
    """``throttle_exceptions=(BaseException,)`` (or ``(Exception,)`` for Celery's time
    limits, which are Exceptions) covers the backend's errors, not Python's exits nor the
    task's time running out: they pass through at once (no retry, no throttle reported) and
    the permit is released; naming one of them (or a subclass) is refused when decorating."""
    name = limiter(1)
    runs: List[int] = []

    for broad in (BaseException, Exception):
        @limited(name, wait=1, lease=30, client=fg, throttle_exceptions=(broad, Throttled))
        def body(self: Any) -> None:
            runs.append(1)
            raise stop("stop")

        with pytest.raises(stop):
            body(BoundTask())
    assert runs == [1, 1]
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["released"] == 2
    if _has_feedback(fg, name):
        assert status["counters"].get("feedback_throttled", 0) == 0
    for named in (stop, type("Sub" + stop.__name__, (stop,), {})):
        with pytest.raises(TypeError) as info:
            limited(name, client=fg, throttle_exceptions=(Throttled, named))
        message = str(info.value)
        assert message.startswith("throttle_exceptions: " + named.__name__), message
        assert "never a throttle" in message


def test_limiter_name_from_the_arguments(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(1)
    tokens: List[int] = []

    @limited(lambda org_id: name if org_id == 1 else "missing", wait=1, client=fg)
    def body(self: Any, org_id: int) -> None:
        p = current_permit()
        assert p is not None
        tokens.append(p.fencing_token)

    body(BoundTask(), 1)
    assert len(tokens) == 1 and fg.limiter(name)["counters"]["granted"] == 1


def test_floodgate_unreachable() -> None:
    # Nothing listens on the port while the block runs (and nobody else can bind it).
    with closed_port() as port:
        down = Floodgate("http://127.0.0.1:{}".format(port), retries=0)
        ran: List[Optional[object]] = []

        def body(self: Any) -> str:
            ran.append(current_permit())
            return "done"

        with pytest.raises(RetryCalled) as info:
            limited("x", client=down, backoff=0.5)(body)(BoundTask())
        assert isinstance(info.value.kwargs["exc"], Unavailable)
        assert info.value.kwargs["headers"] == {UNAVAILABLE_RETRIES: 1}
        assert 0 <= info.value.kwargs["countdown"] <= 0.5
        with pytest.raises(Unavailable):
            limited("x", client=down, on_unavailable="raise")(body)(BoundTask())
        with pytest.raises(Unavailable):
            limited("x", client=down, unavailable_max_retries=2)(body)(
                BoundTask({UNAVAILABLE_RETRIES: 2}))
        assert limited("x", client=down, on_unavailable="run")(body)(BoundTask()) == "done"
        assert ran == [None]  # ran without a permit (fail open)
        with pytest.raises(ValueError):
            limited("x", on_unavailable="sometimes")


def test_a_fail_open_run_still_retries_the_backends_throttles() -> None:
    """Under ``on_unavailable="run"`` the body runs without a permit, but a throttle it raises
    is retried with backoff as under a permit (step 5), up to ``throttle_max_retries``; the
    body's own ``self.retry`` is passed on. Before, the throttle failed the task."""
    with closed_port() as port:
        down = Floodgate("http://127.0.0.1:{}".format(port), retries=0)

        def body(self: Any, how: str) -> None:
            if how == "retry":
                raise _CeleryRetry("the body's own retry")
            raise Throttled("backend: too many")

        run = limited("x", client=down, on_unavailable="run", throttle_exceptions=(Exception,),
                      throttle_max_retries=2, backoff=0.5)(body)
        with pytest.raises(RetryCalled) as info:
            run(BoundTask({UNAVAILABLE_RETRIES: 1}), "throttled")
        assert isinstance(info.value.kwargs["exc"], Throttled)
        assert info.value.kwargs["headers"] == {UNAVAILABLE_RETRIES: 1, THROTTLE_RETRIES: 1}
        assert 0 <= info.value.kwargs["countdown"] <= 0.5
        with pytest.raises(Throttled):  # past throttle_max_retries
            run(BoundTask({THROTTLE_RETRIES: 2}), "throttled")
        with pytest.raises(_CeleryRetry):
            run(BoundTask(), "retry")


def test_unknown_limiter_is_retried_never_dropped(fg: Floodgate) -> None:
    # Issue 12 item 3: a 404 unknown_limiter (a limiter not created yet, or lost with the
    # store's state) used to fail the task for good.
    name = "missing-{}".format(uuid.uuid4().hex[:8])
    ran: List[int] = []

    def body(self: Any) -> str:
        ran.append(1)
        return "done"

    with pytest.raises(RetryCalled) as info:
        limited(name, client=fg, backoff=0.5)(body)(BoundTask())
    assert isinstance(info.value.kwargs["exc"], UnknownLimiter)
    assert info.value.kwargs["headers"] == {UNAVAILABLE_RETRIES: 1}
    assert 0 <= info.value.kwargs["countdown"] <= 0.5
    # Its own backoff, doubling from the count in the headers, capped.
    with pytest.raises(RetryCalled) as info:
        limited(name, client=fg, unavailable_backoff=2, unavailable_backoff_max=3)(body)(
            BoundTask({UNAVAILABLE_RETRIES: 4}))
    assert info.value.kwargs["headers"] == {UNAVAILABLE_RETRIES: 5}
    assert 0 <= info.value.kwargs["countdown"] <= 3
    # Fail-open is for an unreachable server only: a missing limiter never runs unlimited.
    with pytest.raises(RetryCalled):
        limited(name, client=fg, on_unavailable="run")(body)(BoundTask())
    # The bound the user chose, and "raise".
    with pytest.raises(UnknownLimiter):
        limited(name, client=fg, unavailable_max_retries=2)(body)(
            BoundTask({UNAVAILABLE_RETRIES: 2}))
    with pytest.raises(UnknownLimiter):
        limited(name, client=fg, on_unavailable="raise")(body)(BoundTask())
    assert ran == []
    # Once the limiter exists, the retried task runs.
    fg.define(name, 1)
    assert limited(name, client=fg)(body)(BoundTask({UNAVAILABLE_RETRIES: 3})) == "done"
    assert ran == [1]


def test_shutting_down_is_retried_never_dropped(floodgate_bin: str, tmp_path: Path) -> None:
    proc = ServerProcess(floodgate_bin, tmp_path).start()
    fg = Floodgate(proc.url, retries=0)
    fg.define("busy", 1)
    held = fg.acquire("busy", wait=1)
    outcome: List[BaseException] = []

    def body(self: Any) -> str:
        return "done"

    def task() -> None:
        try:
            limited("busy", client=fg, wait=30, backoff=0.5)(body)(BoundTask())
        except BaseException as e:  # noqa: BLE001 - inspected below
            outcome.append(e)

    t = threading.Thread(target=task)
    t.start()
    try:
        assert wait_until(lambda: fg.limiter("busy")["waiting"] == 1, 10)
        proc.stop()  # SIGTERM: the waiting acquire is answered 503 shutting_down
        t.join(15)
    finally:
        proc.stop()
    assert len(outcome) == 1 and isinstance(outcome[0], RetryCalled), outcome
    exc = outcome[0].kwargs["exc"]
    assert isinstance(exc, Unavailable) and exc.code == "shutting_down", exc
    assert outcome[0].kwargs["headers"] == {UNAVAILABLE_RETRIES: 1}
    assert held.lease > 0


def test_client_from_env(monkeypatch: pytest.MonkeyPatch, fg: Floodgate,
                         limiter: MakeLimiter) -> None:
    import floodgate.celery as fc

    name = limiter(1)
    monkeypatch.setenv("FLOODGATE_URL", fg.url)
    monkeypatch.setattr(fc, "_clients", {})

    @limited(name, wait=1)
    def body(self: Any) -> int:
        p = current_permit()
        assert p is not None
        return p.fencing_token

    assert body(BoundTask()) > 0
    assert fc.client_from_env().url == fg.url


def test_full_jitter_bounds() -> None:
    for attempt in range(8):
        for _ in range(50):
            assert 0 <= full_jitter(attempt, 0.1, 2.0) <= min(2.0, 0.1 * 2 ** attempt)
    assert full_jitter(10**6, 1.0, 3.0) <= 3.0


@pytest.mark.parametrize(
    "kwargs, exc_type, needle",
    [
        ({"wait": "5"}, TypeError, "wait"),
        ({"wait": -1}, ValueError, "wait"),
        ({"lease": 0}, ValueError, "lease"),
        ({"lease": float("nan")}, ValueError, "lease"),
        ({"permits": 0}, ValueError, "permits"),
        ({"permits": "2"}, ValueError, "permits"),
        ({"heartbeat": -1}, ValueError, "heartbeat"),
        ({"heartbeat": 10, "lease": 5}, ValueError, "heartbeat"),
        ({"throttle_exceptions": ("RateLimitExceeded",)}, TypeError, "throttle_exceptions"),
        ({"throttle_exceptions": Throttled}, TypeError, "throttle_exceptions"),  # not (C,)
        ({"throttle_exceptions": "Throttled"}, TypeError, "throttle_exceptions: a tuple"),
        ({"throttle_exceptions": (PermitLost,)}, TypeError, "throttle_exceptions"),
        ({"throttle_exceptions": (_CeleryRetry,)}, TypeError, "throttle_exceptions"),
        ({"max_retries": -1}, ValueError, "max_retries"),
        ({"throttle_max_retries": 2.5}, ValueError, "throttle_max_retries"),
        ({"backoff": -1}, ValueError, "backoff"),
        ({"max_countdown": float("inf")}, ValueError, "max_countdown"),
        ({"key": 42}, TypeError, "key"),
        ({"on_unavailable": "ignore"}, ValueError, "on_unavailable"),
        ({"client": "http://127.0.0.1:8750"}, TypeError, "client"),
        ({"wait": True}, TypeError, "wait"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_bad_arguments_are_refused_when_decorating(
    kwargs: Dict[str, Any], exc_type: type, needle: str
) -> None:
    """Refused at import, naming the parameter: found at run time they would fail every run."""
    with pytest.raises(exc_type) as info:
        limited("snuba", **kwargs)
    assert str(info.value).startswith(needle), str(info.value)
    with pytest.raises(TypeError) as info:
        limited(None)  # type: ignore[arg-type]
    assert str(info.value).startswith("name")


def test_a_503_retry_after_sets_the_least_countdown(server: ServerProcess,
                                                     limiter: MakeLimiter) -> None:
    from test_adversarial_client import Proxy

    name = limiter(1)
    proxy = Proxy(server.port, lambda line, body: (
        503, {"Retry-After": "7"}, {"error": "too_many_connections", "message": "busy"}))
    try:
        client = Floodgate(proxy.url, retries=3, backoff=0.01, backoff_max=2.0)

        @limited(name, client=client, unavailable_backoff=0.01, unavailable_backoff_max=0.02)
        def body(self: Any) -> str:
            return "ran"

        with pytest.raises(RetryCalled) as info:
            body(BoundTask())
    finally:
        proxy.close()
    assert len(proxy.requests) == 1  # not slept through inside the call
    assert info.value.kwargs["countdown"] >= 7.0
    assert info.value.kwargs["headers"][UNAVAILABLE_RETRIES] == 1


def test_a_429_without_a_hint_backs_off_instead_of_spinning(server: ServerProcess,
                                                           limiter: MakeLimiter) -> None:
    from test_adversarial_client import Proxy

    name = limiter(1)
    proxy = Proxy(server.port, lambda line, body: (429, {}, None))
    try:
        client = Floodgate(proxy.url, retries=0)

        @limited(name, client=client, unavailable_backoff=2.0, unavailable_backoff_max=64.0)
        def body(self: Any) -> str:
            return "ran"

        with pytest.raises(RetryCalled) as info:
            body(BoundTask({WAIT_RETRIES: 3}))
    finally:
        proxy.close()
    countdown = info.value.kwargs["countdown"]
    assert 0.0 < countdown <= 16.0  # full jitter after the 3rd: [0, min(64, 2 * 2**3)]
    assert info.value.kwargs["headers"][WAIT_RETRIES] == 4


def _feedback_then_release(lines: List[str]) -> List[str]:
    """The feedback and release requests, in the order the server got them."""
    return ["feedback" if "/feedback" in x else "release"
            for x in lines if "/feedback" in x or "/release" in x]


def test_feedback_is_reported_before_the_release(server: ServerProcess, fg: Floodgate,
                                                limiter: MakeLimiter) -> None:
    """Each outcome (ok, error, throttled) is reported while the permit is still held, so the
    limiter's in-use counts the reporting call. With a gradient limit of 2 and one call
    running, an ok reported before the release sees in-use 1 (not below half the limit: the
    limit grows, slow start); reported after it, in-use 0 says nothing about a higher limit."""
    from test_adversarial_client import Proxy

    name = limiter(2, adaptive={"algorithm": "gradient", "min": 1, "max": 10})
    proxy = Proxy(server.port, lambda line, body: "forward")
    try:
        client = Floodgate(proxy.url, retries=0)

        @limited(name, wait=1, lease=5, client=client, throttle_exceptions=(Throttled,))
        def body(self: Any, outcome: str) -> None:
            if outcome == "error":
                raise KeyError("the body's own error")
            if outcome == "throttled":
                raise Throttled("backend: too many")

        body(BoundTask(), "ok")
        assert fg.limiter(name)["limit"] == 3
        with pytest.raises(KeyError):
            body(BoundTask(), "error")
        with pytest.raises(RetryCalled):
            body(BoundTask(), "throttled")
        # Floodgate.call reports the same way.
        with pytest.raises(Throttled):
            client.call(name, lambda p: (_ for _ in ()).throw(Throttled("too many")),
                        throttle_exceptions=(Throttled,), wait=1, lease=5,
                        backoff=Backoff(max_attempts=1))
    finally:
        proxy.close()
    order = _feedback_then_release([line for line, _ in proxy.requests])
    assert order == ["feedback", "release"] * 4
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["feedback_ok"] == 1


def test_a_wait_retry_leaves_the_tasks_own_retry_limit_alone(fg: Floodgate,
                                                            limiter: MakeLimiter) -> None:
    """Celery's ``retry(max_retries=N)`` leaves ``override_max_retries`` on the task object,
    shared by every later run of the task in the worker process, where ``autoretry_for`` would
    then retry the body's own exceptions without bound. The decorator's unbounded retries put
    it back as it was (a real Celery task, run eagerly: its retry runs it again at once)."""
    from celery import Celery

    name = limiter(1)
    held = fg.acquire(name, wait=0)
    app = Celery("override", set_as_current=False)

    @app.task(bind=True, name="tests.override", autoretry_for=(ValueError,), max_retries=2)
    @limited(name, wait=0, max_retries=1, client=fg)
    def body(self: Any) -> int:
        return 1

    try:
        result = body.apply()  # a wait retry, then the decorator's own bound: WaitTimeout
        assert isinstance(result.result, WaitTimeout), result.result
        assert "override_max_retries" not in vars(body), vars(body)["override_max_retries"]
    finally:
        held.release()


class SoftTimeLimit(Exception):
    """Stands in for Celery's SoftTimeLimitExceeded, raised from a signal handler anywhere."""


def test_an_exception_landing_right_after_the_grant_leaves_no_heartbeat(
        fg: Floodgate, limiter: MakeLimiter, monkeypatch: pytest.MonkeyPatch) -> None:
    # The permit is granted, then (before the decorator's own try) a soft time limit lands:
    # nobody will release it, so nothing may keep it alive either. Its lease ends and the slot
    # comes back, as a crashed worker's does.
    name = limiter(1)
    real_acquire = fg.acquire
    granted: List[Any] = []

    def acquire_then_interrupted(*args: Any, **kwargs: Any) -> Any:
        granted.append(real_acquire(*args, **kwargs))
        raise SoftTimeLimit("landed after the grant")

    monkeypatch.setattr(fg, "acquire", acquire_then_interrupted)

    @limited(name, wait=1, lease=0.3, client=fg)
    def body(self: Any) -> None:
        raise AssertionError("the body must not run")

    with pytest.raises(SoftTimeLimit):
        body(BoundTask())
    assert len(granted) == 1
    heartbeat = "floodgate-heartbeat-{}".format(granted[0].permit_id)
    assert not [t for t in threading.enumerate() if t.name == heartbeat]
    # The witness is the server: the slot comes back when the lease ends (a heartbeat would
    # extend it every 0.1 s for ever).
    assert wait_until(lambda: fg.limiter(name)["in_use"] == 0, timeout=10)
    assert fg.limiter(name)["counters"]["expired"] == 1


def test_a_heartbeat_that_cannot_start_gives_the_permit_back(
        fg: Floodgate, limiter: MakeLimiter, monkeypatch: pytest.MonkeyPatch) -> None:
    name = limiter(1)

    def no_thread(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr("floodgate.permit.Permit.start_heartbeat", no_thread)

    @limited(name, wait=1, lease=5, client=fg)
    def body(self: Any) -> None:
        raise AssertionError("the body must not run")

    with pytest.raises(RuntimeError, match="new thread"):
        body(BoundTask())
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["released"] == 1

    # Not a throttle under a broad throttle_exceptions either: the backend was never called.
    @limited(name, wait=1, lease=5, client=fg, throttle_exceptions=(Exception,))
    def broad(self: Any) -> None:
        raise AssertionError("the body must not run")

    with pytest.raises(RuntimeError, match="new thread"):
        broad(BoundTask())
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["released"] == 2
    assert status["counters"].get("feedback_throttled", 0) == 0


def test_an_exception_landing_after_the_heartbeat_started_still_releases(
        fg: Floodgate, limiter: MakeLimiter, monkeypatch: pytest.MonkeyPatch) -> None:
    # A soft time limit landing at the first clock read after the heartbeat started (the
    # decorator then still held statements outside its releasing try): the permit must not be
    # kept alive for ever by its heartbeat.
    import floodgate.celery as fc
    import floodgate.permit as fp
    name = limiter(1)
    real_start = fp.Permit.start_heartbeat
    armed: List[Any] = []

    def start_then_arm(self: Any, *a: Any, **k: Any) -> None:
        real_start(self, *a, **k)
        armed.append(self)

    class FakeTime:
        """`time` as the decorator sees it: its first clock read after the heartbeat started
        raises, as a signal handler would there."""

        @staticmethod
        def monotonic() -> float:
            if armed and not getattr(FakeTime, "fired", False):
                FakeTime.fired = True  # type: ignore[attr-defined]
                # What a signal handler raising SoftTimeLimitExceeded here would do.
                raise SoftTimeLimit("landed after the heartbeat started")
            return time.monotonic()

    monkeypatch.setattr(fp.Permit, "start_heartbeat", start_then_arm)
    monkeypatch.setattr(fc, "time", FakeTime)

    @limited(name, wait=1, lease=0.3, client=fg)
    def body(self: Any) -> None:
        raise AssertionError("the body must not run")

    with pytest.raises(SoftTimeLimit):
        body(BoundTask())
    # Nobody will release it: its lease must end, as a crashed worker's.
    ok = wait_until(lambda: fg.limiter(name)["in_use"] == 0, timeout=10)
    alive = [t.name for t in threading.enumerate() if t.name.startswith("floodgate-heartbeat")]
    for p in armed:
        p.stop_heartbeat()
    assert ok, "permit still held 10 s after a 0.3 s lease; heartbeat threads: {}".format(alive)


def test_a_permit_found_gone_at_the_release_is_logged_as_lost(
    fg: Floodgate, limiter: MakeLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    """No heartbeat (off), so only the release can tell: the permit was released by id
    behind the body's back (as a server restarted without its state forgets it) and the body
    finished without checking. It keeps its result, and the loss is logged and shown on the
    permit (docs/python.md), as it is when the heartbeat learns it."""
    name = limiter(1)
    held: List[Any] = []

    @limited(name, wait=1, lease=30, heartbeat=False, client=fg)
    def body(self: Any) -> str:
        p = current_permit()
        assert p is not None
        held.append(p)
        assert fg.release(p.permit_id) is True  # someone else ends it
        return "done"

    with caplog.at_level(logging.WARNING, logger="floodgate.celery"):
        assert body(BoundTask()) == "done"
    assert held and held[0].lost
    with pytest.raises(PermitLost) as info:
        held[0].check()
    assert "no longer held" in info.value.message
    assert any("was lost" in r.getMessage() for r in caplog.records), caplog.text


def test_limited_above_the_task_or_on_an_unbound_task_is_refused(
    fg: Floodgate, limiter: MakeLimiter
) -> None:
    """@limited above @app.task would leave the registered task undecorated (the worker
    runs it without a permit, silently): refused when decorating. On a task without
    bind=True, a run fails naming the fix rather than with an AttributeError (and takes no
    permit)."""
    from celery import Celery

    name = limiter(1)
    app = Celery("order-check", broker="memory://", backend="cache+memory://")
    try:
        def body(self: Any, x: int) -> int:
            return x

        lazy = app.task(bind=True, name="order.lazy")(body)  # a Proxy: the app is not final
        with pytest.raises(TypeError) as info:
            limited(name, client=fg)(lazy)
        assert str(info.value).startswith("limited: put @limited under @app.task")
        app.finalize()
        task = app.task(bind=True, name="order.final")(body)
        with pytest.raises(TypeError):
            limited(name, client=fg)(task)

        def unbound(x: int) -> int:
            return x

        plain = app.task(name="order.unbound")(limited(name, client=fg)(unbound))
        outcome = plain.apply(args=(7,))
        assert outcome.failed()
        assert isinstance(outcome.result, TypeError)
        assert "bind=True" in str(outcome.result)
    finally:
        app.close()
    assert fg.limiter(name)["counters"]["granted"] == 0


def _interrupt_first_release(monkeypatch: pytest.MonkeyPatch, fg: Floodgate,
                             send_first: bool) -> List[str]:
    """Celery's soft time limit landing in the first release request (a signal handler raises
    it anywhere): before the request was sent, or after it was (its answer lost)."""
    real = fg._release
    calls: List[str] = []

    def interrupted(permit_id: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(permit_id)
        if len(calls) == 1:
            if send_first:
                real(permit_id, *args, **kwargs)
            raise SoftTimeLimitExceeded()
        return real(permit_id, *args, **kwargs)

    monkeypatch.setattr(fg, "_release", interrupted)
    return calls


@pytest.mark.parametrize("send_first", [False, True])
def test_a_time_limit_landing_in_the_release_still_releases_and_keeps_the_result(
    fg: Floodgate, limiter: MakeLimiter, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, send_first: bool,
) -> None:
    """The body finished; the soft time limit lands in its release. The release is sent (again)
    rather than left to the lease, the task keeps the body's result, and the release that
    follows an interrupted one that did reach the server is not taken for a loss."""
    name = limiter(1)
    calls = _interrupt_first_release(monkeypatch, fg, send_first)

    @limited(name, wait=1, lease=60, client=fg)
    def body(self: Any) -> str:
        return "done"

    with caplog.at_level(logging.WARNING, logger="floodgate.celery"):
        assert body(BoundTask()) == "done"
    assert len(calls) == 2, calls
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["released"] == 1, status
    assert any("landed while reporting and releasing" in r.getMessage()
               for r in caplog.records), caplog.text
    assert not any("was lost" in r.getMessage() for r in caplog.records), caplog.text


def test_a_time_limit_landing_in_the_report_still_releases(
    fg: Floodgate, limiter: MakeLimiter, monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = limiter(1)

    def report(*args: Any, **kwargs: Any) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(fg, "report", report)

    @limited(name, wait=1, lease=60, client=fg)
    def ok(self: Any) -> str:
        return "done"

    assert ok(BoundTask()) == "done"
    assert fg.limiter(name)["in_use"] == 0

    # A body that raised keeps its own error as the task's outcome.
    @limited(name, wait=1, lease=60, client=fg)
    def fails(self: Any) -> None:
        raise KeyError("the body's own")

    with pytest.raises(KeyError, match="the body's own"):
        fails(BoundTask())
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["released"] == 2, status


def test_a_keyboard_interrupt_landing_in_the_release_still_releases_and_goes_on(
    fg: Floodgate, limiter: MakeLimiter, monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = limiter(1)
    real = fg._release
    calls: List[str] = []

    def interrupted(permit_id: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(permit_id)
        if len(calls) == 1:
            raise KeyboardInterrupt()
        return real(permit_id, *args, **kwargs)

    monkeypatch.setattr(fg, "_release", interrupted)

    @limited(name, wait=1, lease=60, client=fg)
    def body(self: Any) -> str:
        return "done"

    with pytest.raises(KeyboardInterrupt):
        body(BoundTask())
    assert fg.limiter(name)["in_use"] == 0


@pytest.mark.parametrize("how", ["raises", "throttled", "retries"])
def test_a_lost_permit_is_logged_whatever_the_body_did(
    fg: Floodgate, limiter: MakeLimiter, caplog: pytest.LogCaptureFixture, how: str,
) -> None:
    name = limiter(1)

    @limited(name, wait=1, lease=30, heartbeat=False, client=fg,
             throttle_exceptions=(Throttled,))
    def body(self: Any) -> None:
        p = current_permit()
        assert p is not None
        assert fg.release(p.permit_id) is True  # someone else ends it
        if how == "raises":
            raise KeyError("boom")
        if how == "throttled":
            raise Throttled()
        raise _CeleryRetry()

    expected = {"raises": KeyError, "throttled": RetryCalled, "retries": _CeleryRetry}[how]
    with caplog.at_level(logging.WARNING, logger="floodgate.celery"):
        with pytest.raises(expected):
            body(BoundTask())
    assert any("was lost" in r.getMessage() for r in caplog.records), caplog.text


class ThrottledWithHint(Exception):
    def __init__(self, retry_after: Any) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


def test_a_throttles_own_retry_after_sets_the_countdown(fg: Floodgate,
                                                        limiter: MakeLimiter) -> None:
    name = limiter(1)
    hint: List[Any] = [42.0]

    @limited(name, wait=1, lease=5, client=fg, throttle_exceptions=(ThrottledWithHint,),
             backoff=0.5, backoff_max=2)
    def body(self: Any) -> None:
        raise ThrottledWithHint(hint[0])

    with pytest.raises(RetryCalled) as info:
        body(BoundTask())
    assert 42.0 <= info.value.kwargs["countdown"] <= 42.5, info.value.kwargs
    # Not a finite number: no hint, the backoff as without one.
    hint[0] = float("inf")
    with pytest.raises(RetryCalled) as info:
        body(BoundTask())
    assert 0.0 <= info.value.kwargs["countdown"] <= 0.5, info.value.kwargs
    # A day at most (a countdown of 1e15 s overflows Celery's dates and drops the task).
    hint[0] = 1e15
    with pytest.raises(RetryCalled) as info:
        body(BoundTask())
    assert 86400.0 <= info.value.kwargs["countdown"] <= 86400.5, info.value.kwargs
