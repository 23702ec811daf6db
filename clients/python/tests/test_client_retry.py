"""The core client: backoff, `retry` and `call` (the last two against the real server)."""

import time
from typing import List

import pytest
from celery.exceptions import Ignore as CeleryIgnore
from celery.exceptions import Reject as CeleryReject
from celery.exceptions import Retry as CeleryRetry
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

import floodgate
from floodgate import (
    Backoff,
    Floodgate,
    Permit,
    PermitLost,
    WaitTimeout,
)

from conftest import MakeLimiter
from floodgate.backoff import retry_after_of


# -- retry and call ------------------------------------------------------------------------


class Throttled(Exception):
    pass


def test_backoff_is_full_jitter_and_honours_retry_after() -> None:
    b = Backoff(base=0.1, cap=1.0, max_attempts=5)
    assert b.delay(0, unit=1.0) == pytest.approx(0.1)
    assert b.delay(3, unit=1.0) == pytest.approx(0.8)
    assert b.delay(10, unit=1.0) == pytest.approx(1.0)  # capped
    assert b.delay(10, unit=0.0) == 0.0
    assert b.delay(0, retry_after=2.0, unit=0.5) == pytest.approx(2.05)
    assert all(0 <= b.delay(2) <= 0.4 for _ in range(100))


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"base": -1}, "base"), ({"base": float("nan")}, "base"), ({"cap": "30"}, "cap"),
     ({"cap": float("inf")}, "cap"), ({"max_attempts": 0}, "max_attempts"),
     ({"max_attempts": 2.5}, "max_attempts")],
    ids=["base-negative", "base-nan", "cap-str", "cap-inf", "attempts-0", "attempts-float"],
)
def test_a_bad_backoff_is_refused_when_made_naming_the_field(
    kwargs: "dict[str, object]", needle: str
) -> None:
    with pytest.raises(ValueError) as info:
        Backoff(**kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(needle), str(info.value)


def test_retry_helper() -> None:
    calls: List[int] = []
    slept: List[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Throttled()
        return "rows"

    assert floodgate.retry(flaky, retry_on=(Throttled,), backoff=Backoff(0.01, 1, 5),
                           sleep=slept.append) == "rows"
    assert len(calls) == 3 and len(slept) == 2
    calls.clear()
    slept.clear()
    with pytest.raises(Throttled):  # two attempts in all, both throttled: the last one raises
        floodgate.retry(flaky, retry_on=lambda e: isinstance(e, Throttled),
                        backoff=Backoff(0.01, 1, 2), sleep=slept.append)
    assert len(calls) == 2 and len(slept) == 1
    with pytest.raises(KeyError):  # not retryable: raised at once
        floodgate.retry(lambda: {}["x"], retry_on=(Throttled,), sleep=slept.append)


def test_retry_honours_wait_timeout_hint(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(1, lease=0.3)
    fg.acquire(name, wait=0)  # never released: reclaimed after 0.3 s
    slept: List[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        time.sleep(s)

    p = floodgate.retry(lambda: fg.acquire(name, wait=0), retry_on=(WaitTimeout,),
                        backoff=Backoff(0.01, 1, 10), sleep=sleep)
    assert slept and slept[0] >= 0.1  # the server's hint (the lease end, sooner than 1 s), not 0-10 ms
    p.release()


def test_call_retries_throttles_with_a_new_permit(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(1)
    tokens: List[int] = []

    def query(p: Permit) -> str:
        tokens.append(p.fencing_token)
        if len(tokens) < 3:
            raise Throttled("backend says too many")
        return "rows"

    assert fg.call(name, query, throttle_exceptions=(Throttled,), wait=1,
                   backoff=Backoff(0.01, 0.05, 5)) == "rows"
    assert len(tokens) == 3 and tokens == sorted(set(tokens))
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["released"] == 3
    if "feedback_throttled" in status["counters"]:
        assert status["counters"]["feedback_throttled"] == 2
        assert status["counters"]["feedback_ok"] == 1
    tokens.clear()
    with pytest.raises(Throttled):
        fg.call(name, lambda p: (_ for _ in ()).throw(Throttled()),
                throttle_exceptions=(Throttled,), wait=1, backoff=Backoff(0.01, 0.05, 2))
    with pytest.raises(ZeroDivisionError):
        fg.call(name, lambda p: 1 // 0, throttle_exceptions=(Throttled,), wait=1)
    assert fg.limiter(name)["in_use"] == 0


def test_call_never_takes_floodgates_own_errors_for_a_broad_throttle_class(
    fg: Floodgate, limiter: MakeLimiter
) -> None:
    """Under ``throttle_exceptions=(Exception,)`` a lost permit and a nested acquire's
    WaitTimeout fail the call at once, reported as errors, not throttles."""
    name = limiter(1)
    full = limiter(1)
    blocker = fg.acquire(full, wait=1, lease=30, heartbeat=False)
    calls: List[str] = []

    def lose(p: Permit) -> None:
        calls.append("lose")
        fg.release(p.permit_id)  # released by id elsewhere: the extend learns it
        p.extend()

    def nested(p: Permit) -> None:
        calls.append("nested")
        fg.acquire(full, wait=0)

    try:
        with pytest.raises(PermitLost):
            fg.call(name, lose, throttle_exceptions=(Exception,), wait=1,
                    backoff=Backoff(0.01, 0.05, 3))
        with pytest.raises(WaitTimeout):
            fg.call(name, nested, throttle_exceptions=(Exception,), wait=1,
                    backoff=Backoff(0.01, 0.05, 3))
        assert calls == ["lose", "nested"]
        with pytest.raises(WaitTimeout):  # named by its own class, it is one: retried
            fg.call(name, nested, throttle_exceptions=(WaitTimeout,), wait=1,
                    backoff=Backoff(0.01, 0.05, 2))
        assert calls == ["lose", "nested", "nested", "nested"]
        with pytest.raises(TypeError) as info:
            fg.call(name, nested, throttle_exceptions=(PermitLost,))
        assert str(info.value).startswith("throttle_exceptions")
    finally:
        blocker.release()
    status = fg.limiter(name)
    assert status["in_use"] == 0
    if "feedback_throttled" in status["counters"]:
        assert status["counters"]["feedback_throttled"] == 2
        assert status["counters"]["feedback_error"] == 2  # the lost permit, the nested wait


@pytest.mark.parametrize(
    "stop", [SystemExit, KeyboardInterrupt, GeneratorExit, SoftTimeLimitExceeded,
             TimeLimitExceeded, CeleryRetry, CeleryIgnore, CeleryReject],
    ids=lambda c: c.__name__,
)
def test_call_lets_exits_and_time_limits_through_a_broad_throttle_class(
    fg: Floodgate, limiter: MakeLimiter, stop: type
) -> None:
    """Under ``throttle_exceptions=(BaseException,)`` Python's exits, Celery's time limits and
    its control flow (``fg.call`` inside a task body) end the call at its first attempt, the permit released;
    naming one is a ``TypeError``."""
    name = limiter(1)
    calls: List[int] = []

    def stopped(p: Permit) -> None:
        calls.append(1)
        raise stop("stop")

    with pytest.raises(stop):
        fg.call(name, stopped, throttle_exceptions=(BaseException,), wait=1,
                backoff=Backoff(0.01, 0.05, 3))
    assert calls == [1]
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["granted"] == 1
    with pytest.raises(TypeError) as info:
        fg.call(name, stopped, throttle_exceptions=(stop,))
    assert str(info.value).startswith("throttle_exceptions: " + stop.__name__)
    assert calls == [1] and fg.limiter(name)["counters"]["granted"] == 1


def test_call_refuses_a_bare_throttle_class_naming_the_parameter(
    fg: Floodgate, limiter: MakeLimiter
) -> None:
    """``throttle_exceptions=Throttled`` (not ``(Throttled,)``) is a TypeError naming the
    parameter before anything is acquired, not "'type' object is not iterable"."""
    name = limiter(1)
    with pytest.raises(TypeError) as info:
        fg.call(name, lambda p: None, throttle_exceptions=Throttled)  # type: ignore[arg-type]
    assert str(info.value).startswith("throttle_exceptions: a tuple"), str(info.value)
    assert fg.limiter(name)["counters"]["granted"] == 0


@pytest.mark.parametrize(
    "stop",
    [PermitLost("permit_lost", "gone", None), SoftTimeLimitExceeded(), TimeLimitExceeded(),
     CeleryRetry(), CeleryIgnore(), CeleryReject()],
    ids=["permit-lost", "soft-time-limit", "time-limit", "celery-retry", "celery-ignore",
         "celery-reject"],
)
def test_retry_never_retries_a_lost_permit_or_the_task_systems_control_flow(
    stop: BaseException,
) -> None:
    """The rule of fg.call and @limited: whatever ``retry_on`` takes (``Exception``, a
    predicate saying yes), these are raised at once."""
    for retry_on in [(Exception,), lambda e: True]:
        calls: List[int] = []
        slept: List[float] = []

        def stopped(calls: List[int] = calls) -> None:
            calls.append(1)
            raise stop

        with pytest.raises(type(stop)):
            floodgate.retry(stopped, retry_on=retry_on,  # type: ignore[arg-type]
                            backoff=Backoff(0.01, 1, 5), sleep=slept.append)
        assert calls == [1] and slept == [], retry_on


@pytest.mark.parametrize(
    "named", [PermitLost, SoftTimeLimitExceeded, SystemExit, KeyboardInterrupt],
)
def test_retry_refuses_naming_what_is_never_retried(named: type) -> None:
    with pytest.raises(TypeError) as info:
        floodgate.retry(lambda: None, retry_on=(named,))
    assert str(info.value).startswith("retry_on: " + named.__name__), str(info.value)
    with pytest.raises(TypeError) as info:
        floodgate.retry(lambda: None, retry_on=Throttled)  # type: ignore[arg-type]
    assert str(info.value).startswith("retry_on: a tuple"), str(info.value)


def test_a_retry_after_that_is_not_a_finite_number_is_no_hint() -> None:
    class Hinted(Exception):
        def __init__(self, retry_after: object) -> None:
            super().__init__()
            self.retry_after = retry_after

    for value in [float("nan"), float("inf"), -1.0, True, "5"]:
        assert retry_after_of(Hinted(value)) is None, value
    assert retry_after_of(Hinted(2)) == 2.0
    assert retry_after_of(Hinted(1e15)) == 24 * 3600.0  # a day at most, as a 503's
