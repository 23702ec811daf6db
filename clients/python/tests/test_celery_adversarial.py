"""Adversarial review of ``@limited`` on a real Celery worker (prefork, 2 processes, Redis as
broker and result backend) against the real server: the bounds on each kind of retry hold in
Celery's real message headers (a task never waits, is throttled or finds Floodgate
unreachable forever, and is reported as failed, not dropped, once past its bound); a body's
own exception releases the permit and fails the task; and a worker process SIGKILLed inside
the body gives its slot back when its lease ends, its task (``acks_late``,
``reject_on_worker_lost``) runs again, and no two bodies ever held the one permit at once.

Runs are counted in Redis by the app (``tests/adv_celery/adv_app.py``); the assertions are on
counts and states, with bounded waits for liveness only."""

import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Dict, Iterator

import pytest
import redis
from celery import Celery

from floodgate import Floodgate, WaitTimeout

from conftest import celery_worker, RedisProcess, ServerProcess, closed_port, wait_until
from test_adversarial_client import Action, Proxy

pytestmark = pytest.mark.e2e

APP_DIR = Path(__file__).resolve().parent / "adv_celery"


# What the error proxy answers an acquire of limiter ``adv-err-<status>``: that status, with
# the body a server (or a proxy in front of it) would send; anything else is forwarded.
ERROR_ANSWERS = {
    "500": (500, {}, {"error": "internal", "message": "the limiter service failed"}),
    "502": (502, {}, None),  # a proxy's bare 502, no Retry-After
    "400": (400, {}, {"error": "invalid_request", "message": "permits: must be at least 1"}),
}


def _error_hook(request_line: str, body: Dict[str, object]) -> Action:
    for status, answer in ERROR_ANSWERS.items():
        if "/v1/limiters/adv-err-{}/acquire".format(status) in request_line:
            return answer
    return "forward"


@pytest.fixture(scope="module")
def adv_env(server: ServerProcess, redis_server: RedisProcess) -> Iterator[Dict[str, str]]:
    fg = Floodgate(server.url)
    suffix = uuid.uuid4().hex[:8]
    proxy = Proxy(server.port, _error_hook)
    with closed_port() as port:
        env = dict(os.environ)
        env.update(
            CELERY_BROKER_URL=redis_server.url,
            FLOODGATE_URL=server.url,
            ADV_QUEUE="adv-" + suffix,
            ADV_FULL_LIMITER="adv-full-" + suffix,
            ADV_OPEN_LIMITER="adv-open-" + suffix,
            ADV_KILL_LIMITER="adv-kill-" + suffix,
            ADV_TIME_LIMITER="adv-time-" + suffix,
            ADV_CLOSED_URL="http://127.0.0.1:{}".format(port),
            ADV_ERROR_URL=proxy.url,
            PYTHONPATH=os.pathsep.join(
                [str(APP_DIR)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                  else [])),
        )
        env.pop("FLOODGATE_TOKEN", None)
        fg.define(env["ADV_FULL_LIMITER"], 1)
        fg.define(env["ADV_OPEN_LIMITER"], 5)
        fg.define(env["ADV_KILL_LIMITER"], 1, max_wait=120)
        fg.define(env["ADV_TIME_LIMITER"], 5)
        yield env
    proxy.close()


@pytest.fixture(scope="module")
def adv_worker(adv_env: Dict[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator["subprocess.Popen[bytes]"]:
    log_dir = tmp_path_factory.mktemp("adv-celery")
    with celery_worker("adv_app", APP_DIR, adv_env, log_dir, 2, "prefork",
                       "adv") as proc:
        yield proc


@pytest.fixture
def celery_client(adv_env: Dict[str, str]) -> Iterator[Celery]:
    app = Celery(broker=adv_env["CELERY_BROKER_URL"], backend=adv_env["CELERY_BROKER_URL"])
    yield app
    app.close()


def _send(app: Celery, env: Dict[str, str], task: str, *args: str) -> "object":
    return app.send_task(task, args=list(args), queue=env["ADV_QUEUE"])


def _int(r: "redis.Redis", key: str) -> int:
    return int(r.get(key) or 0)


@pytest.mark.parametrize(
    "task, error",
    [("adv.always_waits", "WaitTimeout"), ("adv.always_throttled", "Throttled"),
     ("adv.unreachable", "Unavailable")],
    ids=["wait-timeouts", "throttles", "unreachable"],
)
def test_a_bounded_retry_ends_in_a_reported_failure(
    adv_worker: "subprocess.Popen[bytes]", adv_env: Dict[str, str], server: ServerProcess,
    redis_server: RedisProcess, celery_client: Celery, task: str, error: str,
) -> None:
    """max_retries=2 (or throttle_/unavailable_max_retries=2), counted in the real message
    headers: exactly three runs, then the task fails with the error (not dropped, not
    retried forever)."""
    fg = Floodgate(server.url)
    r = redis.Redis.from_url(redis_server.url)
    held = fg.acquire(adv_env["ADV_FULL_LIMITER"], wait=1, lease=120)  # never free
    run = "adv-" + uuid.uuid4().hex[:8]
    try:
        _send(celery_client, adv_env, task, run)
        # Not the result backend's state: with countdowns this short, the retry can run on
        # the other process and fail before this attempt stores RETRY over its FAILURE.
        assert wait_until(lambda: r.llen(run + ":failure") > 0, 60, 0.05)
        assert r.lrange(run + ":failure", 0, -1) == [error.encode()]
        assert _int(r, run + ":attempts") == 3
        ran = _int(r, run + ":ran")
        assert ran == (3 if task == "adv.always_throttled" else 0)
    finally:
        held.release()
    for name in ("ADV_FULL_LIMITER", "ADV_OPEN_LIMITER"):
        assert fg.limiter(adv_env[name])["in_use"] == 0


def test_a_task_past_its_wait_retries_reports_the_servers_hint_to_its_caller(
    adv_worker: "subprocess.Popen[bytes]", adv_env: Dict[str, str], server: ServerProcess,
    redis_server: RedisProcess, celery_client: Celery,
) -> None:
    """The result backend (Redis, Celery's default JSON serializer) gives the caller the
    WaitTimeout the task failed with, retry_after included: the answer it can act on."""
    fg = Floodgate(server.url)
    r = redis.Redis.from_url(redis_server.url)
    held = fg.acquire(adv_env["ADV_FULL_LIMITER"], wait=1, lease=120)  # never free
    run = "adv-" + uuid.uuid4().hex[:8]
    try:
        result = _send(celery_client, adv_env, "adv.always_waits", run)
        assert wait_until(lambda: r.llen(run + ":failure") > 0, 60, 0.05)
        # FAILURE, or the RETRY of an earlier attempt stored after it (see above): both hold
        # a WaitTimeout the server answered, with its hint.
        assert wait_until(lambda: result.state in ("FAILURE", "RETRY"), 60, 0.05)  # type: ignore[attr-defined]
        error = result.result  # type: ignore[attr-defined]
    finally:
        held.release()
    assert isinstance(error, WaitTimeout), repr(error)
    assert error.code == "wait_timeout" and error.status == 429
    assert error.retry_after > 0


def test_a_body_that_raises_releases_and_fails(
    adv_worker: "subprocess.Popen[bytes]", adv_env: Dict[str, str], server: ServerProcess,
    redis_server: RedisProcess, celery_client: Celery,
) -> None:
    fg = Floodgate(server.url)
    r = redis.Redis.from_url(redis_server.url)
    before = fg.limiter(adv_env["ADV_OPEN_LIMITER"])["counters"]
    run = "adv-" + uuid.uuid4().hex[:8]
    result = _send(celery_client, adv_env, "adv.raises", run)
    assert wait_until(lambda: result.state == "FAILURE", 60, 0.05), result.state  # type: ignore[attr-defined]
    assert "KeyError" in (result.traceback or "")  # type: ignore[attr-defined]
    assert _int(r, run + ":attempts") == 1 and _int(r, run + ":ran") == 1
    status = fg.limiter(adv_env["ADV_OPEN_LIMITER"])
    assert status["in_use"] == 0
    assert status["counters"]["released"] == before["released"] + 1
    assert status["counters"]["expired"] == before["expired"]


def test_a_task_past_its_soft_time_limit_fails_and_is_not_retried_as_throttled(
    adv_worker: "subprocess.Popen[bytes]", adv_env: Dict[str, str], server: ServerProcess,
    redis_server: RedisProcess, celery_client: Celery,
) -> None:
    """A body that runs out of its soft_time_limit under throttle_exceptions=(Exception,):
    SoftTimeLimitExceeded is the task system's signal, not the backend's, so the task fails
    at its first run (reported as an error), not retried as throttled; the permit is
    released."""
    fg = Floodgate(server.url)
    r = redis.Redis.from_url(redis_server.url)
    name = adv_env["ADV_TIME_LIMITER"]
    before = fg.limiter(name)["counters"]
    run = "adv-" + uuid.uuid4().hex[:8]
    _send(celery_client, adv_env, "adv.times_out", run)
    assert wait_until(lambda: r.llen(run + ":failure") > 0, 60, 0.05)
    assert r.lrange(run + ":failure", 0, -1) == [b"SoftTimeLimitExceeded"]
    assert _int(r, run + ":attempts") == 1 and _int(r, run + ":ran") == 1
    assert wait_until(lambda: fg.limiter(name)["in_use"] == 0, 30, 0.02)
    counters = fg.limiter(name)["counters"]
    assert counters["released"] == before["released"] + 1
    assert counters["expired"] == before["expired"]
    if "feedback_throttled" in counters:
        assert counters["feedback_throttled"] == before.get("feedback_throttled", 0)


def test_a_sigkilled_worker_frees_its_slot_at_the_lease_end_and_its_task_runs_again(
    adv_worker: "subprocess.Popen[bytes]", adv_env: Dict[str, str], server: ServerProcess,
    redis_server: RedisProcess, celery_client: Celery,
) -> None:
    fg = Floodgate(server.url)
    r = redis.Redis.from_url(redis_server.url)
    name = adv_env["ADV_KILL_LIMITER"]
    before = fg.limiter(name)["counters"]
    run = "adv-" + uuid.uuid4().hex[:8]
    _send(celery_client, adv_env, "adv.killable", run, "A")
    assert wait_until(lambda: r.get(run + ":A-pid") is not None, 60, 0.02)
    pid = int(r.get(run + ":A-pid") or 0)
    # B asks for the one permit while A's heartbeat keeps it, then waits in the server.
    _send(celery_client, adv_env, "adv.killable", run, "B")
    assert wait_until(lambda: fg.limiter(name)["waiting"] >= 1, 60, 0.02)
    os.kill(pid, signal.SIGKILL)
    # A's slot comes back when its lease (adv_app.KILL_LEASE) ends; B runs, and A runs again
    # (acks_late with reject_on_worker_lost put it back on the broker).
    assert wait_until(lambda: r.smembers(run + ":done") == {b"A", b"B"}, 90, 0.05), \
        r.smembers(run + ":done")
    assert _int(r, run + ":violations") == 0
    tokens = [int(t) for t in r.lrange(run + ":tokens", 0, -1)]
    assert len(tokens) == 3 and tokens == sorted(set(tokens))
    # The last task marks itself done inside its body; its permit is released right after,
    # in the decorator's finally: wait for that release rather than race it.
    assert wait_until(lambda: fg.limiter(name)["in_use"] == 0, 30, 0.02)
    status = fg.limiter(name)
    assert status["in_use"] == 0
    assert status["counters"]["expired"] == before["expired"] + 1  # the dead process's
    assert status["counters"]["granted"] == before["granted"] + 3
    assert status["counters"]["released"] == before["released"] + 2


def test_a_sigkilled_worker_with_early_acks_reports_the_task_failed(
    adv_worker: "subprocess.Popen[bytes]", adv_env: Dict[str, str], server: ServerProcess,
    redis_server: RedisProcess, celery_client: Celery,
) -> None:
    """Celery's default acks the message before the body runs: a SIGKILLed process's task is
    not run again but reported failed (WorkerLostError), never silently dropped; its slot
    comes back when the lease ends. (docs/python.md: use acks_late with
    reject_on_worker_lost for tasks that must run again.)"""
    fg = Floodgate(server.url)
    r = redis.Redis.from_url(redis_server.url)
    name = adv_env["ADV_KILL_LIMITER"]
    before = fg.limiter(name)["counters"]
    run = "adv-" + uuid.uuid4().hex[:8]
    result = _send(celery_client, adv_env, "adv.killable_early", run)
    assert wait_until(lambda: r.get(run + ":A-pid") is not None, 60, 0.02)
    assert fg.limiter(name)["in_use"] == 1
    os.kill(int(r.get(run + ":A-pid") or 0), signal.SIGKILL)
    assert wait_until(lambda: result.state == "FAILURE", 60, 0.05), result.state  # type: ignore[attr-defined]
    assert "WorkerLost" in repr(result.result)  # type: ignore[attr-defined]
    assert wait_until(lambda: fg.limiter(name)["in_use"] == 0, 30)  # the lease ended
    assert _int(r, run + ":ran") == 1
    counters = fg.limiter(name)["counters"]
    assert counters["expired"] == before["expired"] + 1
    assert counters["granted"] == before["granted"] + 1


def test_a_permit_lost_during_the_body_is_told_to_it_and_fails_the_task(
    adv_worker: "subprocess.Popen[bytes]", adv_env: Dict[str, str], server: ServerProcess,
    redis_server: RedisProcess, celery_client: Celery,
) -> None:
    fg = Floodgate(server.url)
    r = redis.Redis.from_url(redis_server.url)
    run = "adv-" + uuid.uuid4().hex[:8]
    result = _send(celery_client, adv_env, "adv.loses_permit", run)
    assert wait_until(lambda: result.state == "FAILURE", 60, 0.05), result.state  # type: ignore[attr-defined]
    assert "PermitLost" in (result.traceback or "")  # type: ignore[attr-defined]
    assert _int(r, run + ":told") == 1 and _int(r, run + ":ran-on") == 0
    assert _int(r, run + ":attempts") == 1  # not retried: the loss is the task's to handle
    assert fg.limiter(adv_env["ADV_OPEN_LIMITER"])["in_use"] == 0


@pytest.mark.parametrize(
    "status, error, attempts",
    [("500", "ServerError", 3), ("502", "Unavailable", 3), ("400", "BadRequest", 1)],
    ids=["500-retried", "bare-502-retried", "400-fails-at-once"],
)
def test_a_server_error_to_an_acquire_retries_the_task_and_a_bad_request_fails_it(
    adv_worker: "subprocess.Popen[bytes]", adv_env: Dict[str, str], redis_server: RedisProcess,
    celery_client: Celery, status: str, error: str, attempts: int,
) -> None:
    """A proxy answers the acquire with a 500 (or a bare 502): the limiter service failed,
    not the task, so the task is re-enqueued with backoff (unavailable_max_retries=2: three
    runs, then a reported failure); a 400 naming a bad request fails it at the first run. The
    body never runs without a permit."""
    r = redis.Redis.from_url(redis_server.url)
    run = "adv-" + uuid.uuid4().hex[:8]
    _send(celery_client, adv_env, "adv.server_error", run, status)
    assert wait_until(lambda: r.llen(run + ":failure") > 0, 60, 0.05)
    assert r.lrange(run + ":failure", 0, -1) == [error.encode()]
    assert _int(r, run + ":attempts") == attempts
    assert _int(r, run + ":ran") == 0
