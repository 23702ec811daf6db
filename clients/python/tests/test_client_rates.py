"""The core client against the real server: rate limits, fan-out schedules, feedback and
adaptive limits."""

import datetime
import time
import types
import uuid
from typing import Any, List, Optional

import pytest

from floodgate import (
    ServerError,
    Adaptive,
    BadRequest,
    Floodgate,
    NotFound,
    Rate,
    UnknownLimiter,
    WaitTimeout,
)

from conftest import MakeLimiter, ServerProcess


# -- rate limits, fan-out schedule, feedback and adaptive limits (issue 5) ------------------


def _skip_if_route_missing(e: NotFound, route: str) -> None:
    """These endpoints came with issue 5: against a server without them, skip (not fake)."""
    if e.code == "not_found":
        pytest.skip("the server answers 404 not_found for POST /v1/limiters/{{name}}/{}: "
                    "not implemented by this server (issue 5)".format(route))


def test_schedule_offsets_follow_the_rate(fg: Floodgate) -> None:
    name = "sched-{}".format(uuid.uuid4().hex[:8])
    try:
        fg.define(name, None, rate=Rate(10, period=1.0))  # one token per 100 ms, burst 1
    except BadRequest as e:
        pytest.skip("this server has no rate limits (issue 5): {}".format(e))
    started = time.monotonic()
    try:
        offsets = fg.schedule(name, 5)
    except NotFound as e:
        _skip_if_route_missing(e, "schedule")
        raise
    assert len(offsets) == 5
    assert all(isinstance(o, float) for o in offsets)
    assert offsets[0] < 0.05
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert all(0.099 <= g <= 0.101 for g in gaps), offsets
    # The reservations count against the rate: the next schedule starts after them.
    later = fg.schedule(name, 1)
    # A token later, less the time between the calls (measured here, which is at least what
    # the server's clock saw; a fixed 50 ms allowance failed when the test was stalled).
    between = time.monotonic() - started
    assert later[0] >= offsets[-1] + 0.1 - between - 0.001, (offsets, later, between)
    assert fg.limiter(name)["counters"]["scheduled"] == 6


def test_unused_reservations_go_back(fg: Floodgate) -> None:
    name = "unsched-{}".format(uuid.uuid4().hex[:8])
    fg.define(name, None, rate=Rate(10, period=1.0), max_wait=60.0)  # a token per 100 ms
    reserved = fg.reserve(name, 10)
    assert len(reserved.offsets) == 10 and reserved.id >= 1
    # Only 4 children were enqueued: the last 6 tokens (600 ms of the rate) go back, so the
    # next schedule starts about 400 ms from now instead of a second.
    assert fg.unschedule(name, reserved.id, 6) == 6
    later = fg.schedule(name, 1)
    assert later[0] < 0.45, later
    # The earlier reservation is no longer the latest: nothing more goes back.
    assert fg.unschedule(name, reserved.id, 4) == 0
    with pytest.raises(BadRequest) as info:
        fg.unschedule(name, reserved.id, 0)
    assert info.value.message.startswith("count:")


class _FlakyBroker:
    """A Celery signature whose broker accepts ``ok`` tasks, then fails (a broker outage
    half-way through a fan-out)."""

    accepted = 0

    def __init__(self, ok: int) -> None:
        self.ok = ok

    def apply_async(self, countdown: Optional[float] = None) -> float:
        if _FlakyBroker.accepted >= self.ok:
            raise ConnectionError("broker went away")
        _FlakyBroker.accepted += 1
        return countdown or 0.0


def test_paced_fan_out_gives_back_what_it_could_not_enqueue(fg: Floodgate) -> None:
    pytest.importorskip("celery")
    from floodgate.celery import paced_fan_out

    name = "fanout-{}".format(uuid.uuid4().hex[:8])
    fg.define(name, None, rate=Rate(10, period=1.0), max_wait=60.0)
    _FlakyBroker.accepted = 0
    with pytest.raises(ConnectionError):
        paced_fan_out([_FlakyBroker(ok=3) for _ in range(10)], name, client=fg)
    assert _FlakyBroker.accepted == 3
    # The 7 children not enqueued gave back their tokens: the next one starts about 300 ms
    # from now (after the 3 enqueued), not a second from now.
    later = fg.schedule(name, 1)
    assert later[0] < 0.35, later


class _ShortScheduleClient:
    """A client whose server answers fewer start offsets than it was asked for (a broken
    server or proxy; the real server answers one per token)."""

    given_back: List[Any] = []

    def reserve(self, limiter: str, count: int) -> Any:
        return types.SimpleNamespace(offsets=[0.0] * (count - 1), id=7)

    def unschedule(self, limiter: str, reservation: int, count: int) -> int:
        self.given_back.append((limiter, reservation, count))
        return count


def test_paced_fan_out_refuses_a_schedule_shorter_than_its_signatures() -> None:
    pytest.importorskip("celery")
    from floodgate.celery import paced_fan_out

    _FlakyBroker.accepted = 0
    with pytest.raises(ServerError, match="got 2"):
        paced_fan_out([_FlakyBroker(ok=3) for _ in range(3)], "x",
                      client=_ShortScheduleClient())  # type: ignore[arg-type]
    assert _FlakyBroker.accepted == 0, "enqueued part of a fan-out it could not schedule whole"
    assert _ShortScheduleClient.given_back == [("x", 7, 3)]


def test_paced_fan_out_gives_back_a_schedule_it_refuses(
    fg: Floodgate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server reserved the tokens but answered one offset short: nothing is enqueued, and
    the tokens go back rather than holding up every later acquire."""
    pytest.importorskip("celery")
    from floodgate.celery import paced_fan_out

    name = "fanout-short-{}".format(uuid.uuid4().hex[:8])
    fg.define(name, None, rate=Rate(10, period=1.0), max_wait=60.0)  # a token per 100 ms
    real_reserve = fg.reserve
    reserved: List[Any] = []

    def short(limiter: str, count: int, **kwargs: Any) -> Any:
        answer = real_reserve(limiter, count, **kwargs)
        reserved.append(answer)
        return types.SimpleNamespace(offsets=answer.offsets[:-1], id=answer.id)

    monkeypatch.setattr(fg, "reserve", short)
    _FlakyBroker.accepted = 0
    with pytest.raises(ServerError, match="got 9"):
        paced_fan_out([_FlakyBroker(ok=10) for _ in range(10)], name, client=fg)
    assert _FlakyBroker.accepted == 0
    # The witness is the server: the reservation's tokens were given back already, so none
    # is left to give back now (without that, its last ones, a second away, still are).
    assert fg.unschedule(name, reserved[0].id, 6) == 0


def test_schedule_errors(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(4)  # concurrency only: nothing to schedule against
    try:
        with pytest.raises(BadRequest) as info:
            fg.schedule(name, 3)
    except NotFound as e:  # raised instead of BadRequest by a server without the route
        _skip_if_route_missing(e, "schedule")
        raise
    assert info.value.message.startswith("count:")
    with pytest.raises(BadRequest) as info:
        fg.schedule(name, 0)
    assert info.value.message.startswith("count:")
    with pytest.raises(UnknownLimiter):
        fg.schedule("no-such-limiter", 3)


def test_rate_only_grants_have_no_lease(fg: Floodgate) -> None:
    name = "rate-{}".format(uuid.uuid4().hex[:8])
    try:
        fg.define(name, None, rate={"limit": 5, "period_ms": 1000, "burst": 2})
    except BadRequest as e:
        pytest.skip("this server has no rate limits (issue 5): {}".format(e))
    with fg.permit(name, wait=0) as p:  # heartbeat asked for, but nothing to extend
        assert p.lease == 0 and not p.lost
    assert p.release() is False
    fg.acquire(name, wait=0)  # the burst's second token
    with pytest.raises(WaitTimeout) as info:
        fg.acquire(name, wait=0)
    assert 0 < info.value.retry_after <= 0.25
    assert fg.limiter(name)["counters"]["paced"] == 2


def test_a_gradient_limit_uses_the_reported_latency(fg: Floodgate) -> None:
    name = "gradient-{}".format(uuid.uuid4().hex[:8])
    try:
        shown = fg.define(name, 4, adaptive=Adaptive(min=1, max=20, algorithm="gradient",
                                                     tolerance=2.0, probe_rounds=5))
    except BadRequest as e:
        pytest.skip("this server has no gradient adaptive limits (issue 13): {}".format(e))
    assert shown["adaptive"]["algorithm"] == "gradient"
    assert shown["adaptive"]["tolerance"] == 2.0 and shown["adaptive"]["probe_rounds"] == 5
    permits = [fg.acquire(name, wait=0) for _ in range(4)]
    # Slow start: each success (the latency says it began after any decrease) adds a permit.
    assert fg.feedback(name, "ok", latency=0.01) == 5
    assert fg.feedback(name, "ok", latency=0.01) == 6
    # A throttle: one below the permits in use (4) becomes the ceiling, the limit x0.9.
    assert fg.feedback(name, "throttled", latency=0.001) == 5
    for p in permits:
        p.release()
    fg.define(name, adaptive=None)


def test_feedback_moves_an_adaptive_limit(fg: Floodgate) -> None:
    name = "adaptive-{}".format(uuid.uuid4().hex[:8])
    try:
        fg.define(name, 8, adaptive=Adaptive(min=2, max=10, increase=1, decrease=0.5,
                                             cooldown=0.001))
    except BadRequest as e:
        pytest.skip("this server has no adaptive limits (issue 5): {}".format(e))
    try:
        limit = fg.feedback(name, "throttled", latency=0.12)
    except NotFound as e:
        _skip_if_route_missing(e, "feedback")
        raise
    assert limit == 4
    time.sleep(0.01)
    assert fg.feedback(name, "throttled", latency=datetime.timedelta(milliseconds=30)) == 2
    assert fg.feedback(name, "error") == 2  # counted, does not move the limit
    for _ in range(2):  # a full round of ok at limit 2 grows it by one
        limit = fg.feedback(name, "ok", latency=0.01)
    assert limit == 3
    status = fg.limiter(name)
    assert status["limit"] == 3 and status["concurrency"] == 8
    assert status["counters"]["feedback_throttled"] == 2
    assert status["counters"]["feedback_error"] == 1
    fg.define(name, adaptive=None)  # None removes it
    assert fg.limiter(name)["adaptive"] is None


def test_feedback_bad_outcome(fg: Floodgate, limiter: MakeLimiter) -> None:
    name = limiter(4)
    try:
        with pytest.raises(BadRequest) as info:
            fg.feedback(name, "meh")
    except NotFound as e:
        _skip_if_route_missing(e, "feedback")
        raise
    assert info.value.message.startswith("outcome:")
    assert fg.feedback(name, "ok") == 4  # a non-adaptive limiter: the configured limit


def test_report_ignores_a_server_without_feedback(server: ServerProcess) -> None:
    fg = Floodgate(server.url, retries=0)
    fg.report("no-such-limiter", "ok")  # 404 unknown_limiter: logged, never raised
    fg.define("report-ok", 2)
    fg.report("report-ok", "throttled", 0.01)
