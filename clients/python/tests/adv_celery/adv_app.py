"""The Celery app of ``test_celery_adversarial.py``: ``@limited`` tasks that never get a permit,
are always throttled, cannot reach Floodgate, or are SIGKILLed mid-body, each run counted in
Redis (Celery's ``task_prerun``: ``<run>:attempts``; the body: ``<run>:ran``; ``task_failure``:
``<run>:failure``).

Configuration (environment): CELERY_BROKER_URL (also the result backend), FLOODGATE_URL,
ADV_QUEUE, ADV_FULL_LIMITER (always held by the test), ADV_OPEN_LIMITER, ADV_KILL_LIMITER (1
permit), ADV_TIME_LIMITER, ADV_CLOSED_URL (a Floodgate URL nothing listens on), ADV_ERROR_URL
(a proxy in front of the server answering the acquires of ``adv-err-<status>`` with that
status).
"""

import os
import time
from typing import Any, List

import redis
from celery import Celery
from celery.signals import task_failure, task_prerun

from floodgate import Floodgate
from floodgate.celery import current_permit, limited

BROKER = os.environ["CELERY_BROKER_URL"]

app = Celery("adv", broker=BROKER, backend=BROKER)
app.conf.update(
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ["ADV_QUEUE"],
    result_expires=600,
)

_r = redis.Redis.from_url(BROKER)


class Throttled(Exception):
    """The backend's "too much" answer."""


@task_prerun.connect
def _attempt(task: Any = None, args: Any = None, **_: Any) -> None:
    if task is not None and task.name.startswith("adv.") and args:
        _r.incr("{}:attempts".format(args[0]))


@task_failure.connect
def _failed(sender: Any = None, exception: Any = None, args: Any = None, **_: Any) -> None:
    """Records how a run ended in failure (``<run>:failure``: the exception's class). The
    result backend's state can end as RETRY instead when a retry with a tiny countdown ran on
    the other process and failed before this one stored its RETRY."""
    if sender is not None and sender.name.startswith("adv.") and args:
        _r.rpush("{}:failure".format(args[0]), type(exception).__name__)


@app.task(bind=True, name="adv.always_waits")
@limited(os.environ["ADV_FULL_LIMITER"], wait=0.05, max_retries=2, max_countdown=0.05,
         retry_jitter=0.0)
def always_waits(self: Any, run: str) -> None:
    _r.incr("{}:ran".format(run))


@app.task(bind=True, name="adv.always_throttled")
@limited(os.environ["ADV_OPEN_LIMITER"], wait=5, lease=5, throttle_exceptions=(Throttled,),
         throttle_max_retries=2, backoff=0.01, backoff_max=0.02)
def always_throttled(self: Any, run: str) -> None:
    _r.incr("{}:ran".format(run))
    raise Throttled("the backend refused")


@app.task(bind=True, name="adv.unreachable")
@limited(os.environ["ADV_OPEN_LIMITER"], wait=1,
         client=lambda: Floodgate(os.environ["ADV_CLOSED_URL"], retries=0, timeout=1),
         unavailable_max_retries=2, unavailable_backoff=0.01, unavailable_backoff_max=0.02)
def unreachable(self: Any, run: str) -> None:
    _r.incr("{}:ran".format(run))


@app.task(bind=True, name="adv.server_error")
@limited(lambda run, status: "adv-err-" + status, wait=1,
         client=lambda: Floodgate(os.environ["ADV_ERROR_URL"], retries=0, timeout=5),
         unavailable_max_retries=2, unavailable_backoff=0.01, unavailable_backoff_max=0.02)
def server_error(self: Any, run: str, status: str) -> None:
    """Its acquire is answered ``status`` by the test's proxy (ADV_ERROR_URL)."""
    _r.incr("{}:ran".format(run))


@app.task(bind=True, name="adv.times_out", soft_time_limit=1)
@limited(os.environ.get("ADV_TIME_LIMITER", "adv-time"), wait=5, lease=5,
         throttle_exceptions=(Exception,),
         throttle_max_retries=2, backoff=0.01, backoff_max=0.02)
def times_out(self: Any, run: str) -> None:
    """Runs past its soft time limit: Celery raises SoftTimeLimitExceeded in the body, which
    the broad throttle_exceptions must not take for the backend's "too much"."""
    _r.incr("{}:ran".format(run))
    time.sleep(60)


@app.task(bind=True, name="adv.raises")
@limited(os.environ["ADV_OPEN_LIMITER"], wait=5, lease=5)
def raises(self: Any, run: str) -> None:
    _r.incr("{}:ran".format(run))
    raise KeyError("the body's own error")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed and not yet reaped, holds nothing)."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# The lease of the SIGKILLed tasks' permits: the test waits that long for a dead process's
# slot to come back, and a live one's heartbeat must outlast a stall of the machine (a
# process or the server stopped for a few seconds) or the live holder loses its permit to
# the next task for real.
KILL_LEASE = 6
KILL_HEARTBEAT = 0.5


@app.task(bind=True, name="adv.killable", acks_late=True, reject_on_worker_lost=True)
@limited(os.environ["ADV_KILL_LIMITER"], wait=60, lease=KILL_LEASE, heartbeat=KILL_HEARTBEAT)
def killable(self: Any, run: str, tag: str) -> None:
    """Holds the limiter's one permit. Entering, it checks that every earlier holder still
    listed in ``<run>:holders`` (one that has not left the body) is dead: a live one means two
    bodies hold the one permit at once (``<run>:violations``). The first run of tag ``A``
    stays in the body until the test SIGKILLs its process."""
    holders = "{}:holders".format(run)
    me = os.getpid()
    others: List[int] = [int(p) for p in _r.lrange(holders, 0, -1)]
    if any(_alive(p) for p in others if p != me):
        _r.incr("{}:violations".format(run))
    _r.rpush(holders, me)
    permit = current_permit()
    assert permit is not None
    _r.rpush("{}:tokens".format(run), permit.fencing_token)
    if tag == "A" and _r.set("{}:A-first".format(run), me, nx=True):
        _r.set("{}:A-pid".format(run), me)
        time.sleep(120)  # killed before this ends
    time.sleep(0.05)
    _r.lrem(holders, 0, me)
    _r.sadd("{}:done".format(run), tag)


@app.task(bind=True, name="adv.killable_early")
@limited(os.environ["ADV_KILL_LIMITER"], wait=60, lease=KILL_LEASE, heartbeat=KILL_HEARTBEAT)
def killable_early(self: Any, run: str) -> None:
    """Celery's default acks (before the body): its first run stays in the body until the
    test SIGKILLs its process; a second run would be counted."""
    _r.incr("{}:ran".format(run))
    _r.set("{}:A-pid".format(run), os.getpid())
    time.sleep(120)


@app.task(bind=True, name="adv.loses_permit")
@limited(os.environ["ADV_OPEN_LIMITER"], wait=5, lease=30, heartbeat=0.1)
def loses_permit(self: Any, run: str) -> None:
    """Its permit is released by id behind its back (as an operator, or a lease that ran out,
    would end it); the heartbeat tells the body, whose check() raises PermitLost."""
    permit = current_permit()
    assert permit is not None
    Floodgate(os.environ["FLOODGATE_URL"]).release(permit.permit_id)
    deadline = time.monotonic() + 30
    while not permit.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    if permit.lost:
        _r.incr("{}:told".format(run))
    permit.check()
    _r.incr("{}:ran-on".format(run))  # never reached: the body stopped at check()


@app.task(bind=True, name="adv.holds")
@limited(os.environ.get("ADV_RESTART_LIMITER", "adv-restart"), wait=30, lease=10,
         heartbeat=0.5)
def holds(self: Any, run: str) -> str:
    """Holds its permit until the test sets ``<run>:go`` (test_celery_restart.py restarts the
    server meanwhile), then records whether it knows the permit lost and checks it."""
    permit = current_permit()
    assert permit is not None
    _r.set("{}:token".format(run), permit.fencing_token)
    deadline = time.monotonic() + 120
    while not _r.get("{}:go".format(run)) and time.monotonic() < deadline:
        time.sleep(0.02)
    _r.set("{}:lost".format(run), int(permit.lost))
    permit.check()
    _r.incr("{}:ran".format(run))
    return "held"
