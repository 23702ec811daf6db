"""The incident's task cascade (docs: ../../../../docs/python.md), with the query task limited:

    start_spike_projection_batch
      -> calculate_spike_projections                      (one)
        -> calculate_spike_projection_for_organization    (one per organization)
          -> run_spike_projection                         (one per project: a backend query)

Only ``run_spike_projection`` touches the backend, so only it is ``@limited``: however many
tasks the fan-out enqueues and however many workers run them, at most the limiter's concurrency
of queries run at once, and a task whose wait ends goes back to the broker (never dropped).

Configuration (environment):
    CELERY_BROKER_URL        redis://127.0.0.1:6379/0
    FLOODGATE_URL            http://127.0.0.1:8750   (FLOODGATE_TOKEN if the server has one)
    SPIKE_LIMITER            snuba-spike-projections          (concurrency: the queries)
    SPIKE_FANOUT_LIMITER     snuba-spike-projections-fanout   (a rate: paces the org tasks)
    SPIKE_WAIT               5      seconds a worker may wait for a permit before re-enqueueing
    SPIKE_LEASE              300    seconds; kept alive by the heartbeat while the query runs
    SPIKE_MAX_COUNTDOWN      (none) cap on the server's retry-after hint, in seconds
    SPIKE_BACKOFF            1.0    first throttle retry's backoff ceiling, in seconds
    SNUBA_CONCURRENT_LIMIT   100    the stand-in backend's limit (see snuba.py)
    SNUBA_QUERY_MS_MIN/MAX   50/150 how long a query takes
"""

import logging
import os
from typing import Optional

import redis
from celery import Celery
from celery.signals import task_failure, task_retry

from floodgate import BadRequest, NoPermit, UnknownLimiter
from floodgate.celery import current_permit, limited, paced_fan_out
from snuba import RateLimitExceeded, StandInSnuba

log = logging.getLogger(__name__)

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
LIMITER = os.environ.get("SPIKE_LIMITER", "snuba-spike-projections")
FANOUT_LIMITER = os.environ.get("SPIKE_FANOUT_LIMITER", "snuba-spike-projections-fanout")
WAIT = float(os.environ.get("SPIKE_WAIT", "5"))
LEASE = float(os.environ.get("SPIKE_LEASE", "300"))
_cap = os.environ.get("SPIKE_MAX_COUNTDOWN")
MAX_COUNTDOWN: Optional[float] = float(_cap) if _cap else None
BACKOFF = float(os.environ.get("SPIKE_BACKOFF", "1.0"))

app = Celery("spike_projections", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("SPIKE_QUEUE", "spike-projections"),
)

# Bookkeeping of the example itself (what completed, what was retried and why), in Redis.
_stats = redis.Redis.from_url(os.environ.get("SNUBA_REDIS_URL") or BROKER)
_backend: Optional[StandInSnuba] = None


def snuba() -> StandInSnuba:
    global _backend
    if _backend is None:
        _backend = StandInSnuba.from_env()
    return _backend


@app.task
def start_spike_projection_batch(num_orgs: int, projects_per_org: int) -> None:
    calculate_spike_projections.delay(num_orgs, projects_per_org)


@app.task
def calculate_spike_projections(num_orgs: int, projects_per_org: int) -> None:
    # The seed's Option 2 slept between batches of organizations inside a worker. Instead, every
    # organization task is enqueued now, each with the start time the fan-out rate limiter
    # gives it.
    signatures = [calculate_spike_projection_for_organization.s(org_id, projects_per_org)
                  for org_id in range(1, num_orgs + 1)]
    try:
        paced_fan_out(signatures, FANOUT_LIMITER)
    except (UnknownLimiter, BadRequest) as e:  # no such limiter, or one without a rate
        log.info("fan-out not paced (%s): enqueueing %d organizations at once", e, num_orgs)
        for sig in signatures:
            sig.apply_async()


@app.task
def calculate_spike_projection_for_organization(org_id: int, projects_per_org: int) -> None:
    # One query task per project, all at once: the query limiter decides when each runs.
    for project_id in range(1, projects_per_org + 1):
        run_spike_projection.delay(org_id, project_id)


@app.task(bind=True)
@limited(
    LIMITER,
    wait=WAIT,
    lease=LEASE,
    throttle_exceptions=(RateLimitExceeded,),
    backoff=BACKOFF,
    max_countdown=MAX_COUNTDOWN,
)
def run_spike_projection(self, org_id: int, project_id: int) -> None:
    permit = current_permit()
    token = permit.fencing_token if permit is not None else None
    result = snuba().query(org_id, project_id, fencing_token=token)
    # Count the work done: every query must complete exactly once.
    key = "{}:{}".format(org_id, project_id)
    pipe = _stats.pipeline()
    pipe.sadd("spike:done", key)
    pipe.incr("spike:completions")
    pipe.sadd("spike:pids", os.getpid())  # which worker processes ran queries
    if result["projected_spike"]:
        pipe.incr("spike:projected_spikes")
    pipe.execute()


@task_retry.connect
def _count_retry(sender=None, request=None, reason=None, **_kwargs):  # type: ignore[no-untyped-def]
    exc = getattr(reason, "exc", None)
    if isinstance(exc, NoPermit):
        kind = "wait"  # the wait ended: re-enqueued with the server's retry-after
    elif isinstance(exc, RateLimitExceeded):
        kind = "throttle"  # the backend refused: backoff with full jitter
    else:
        kind = "other"
    _stats.hincrby("spike:retries", kind, 1)


@task_failure.connect
def _count_failure(sender=None, exception=None, **_kwargs):  # type: ignore[no-untyped-def]
    _stats.hincrby("spike:failures", type(exception).__name__, 1)


def reset_stats() -> None:
    _stats.delete("spike:done", "spike:completions", "spike:projected_spikes",
                  "spike:retries", "spike:failures", "spike:pids")
    snuba().reset()


def stats() -> dict:
    retries = {k.decode(): int(v) for k, v in _stats.hgetall("spike:retries").items()}
    failures = {k.decode(): int(v) for k, v in _stats.hgetall("spike:failures").items()}
    return {
        "completions": int(_stats.get("spike:completions") or 0),
        "distinct_done": int(_stats.scard("spike:done")),
        "worker_processes": int(_stats.scard("spike:pids")),
        "retries": retries,
        "failures": failures,
        "backend": snuba().stats(),
    }
