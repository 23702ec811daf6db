"""The Celery app of ``test_celery_fairness.py``: one organization's large batch against small
organizations' tasks, through ``@limited`` with and without ``key=``.

Each task records, in one Redis list per run, ``arrive:<org>`` just before the decorator asks
for a permit (Celery's ``task_prerun``) and ``grant:<org>`` once its body runs under one; Redis
orders the two kinds of entries, so the test reads the order of arrivals and grants from it.

Configuration (environment): CELERY_BROKER_URL, FLOODGATE_URL, FAIR_QUEUE, FAIR_KEYED_LIMITER,
FAIR_PLAIN_LIMITER, FAIR_HOLD (seconds a body holds its permit).
"""

import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import task_prerun

from floodgate.celery import limited

BROKER = os.environ["CELERY_BROKER_URL"]
KEYED_LIMITER = os.environ["FAIR_KEYED_LIMITER"]
PLAIN_LIMITER = os.environ["FAIR_PLAIN_LIMITER"]
HOLD = float(os.environ.get("FAIR_HOLD", "0.1"))

app = Celery("fair", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ["FAIR_QUEUE"],
)

_events = redis.Redis.from_url(BROKER)


@task_prerun.connect
def _arrive(task: Any = None, args: Any = None, **_: Any) -> None:
    if task is not None and task.name.startswith("fair.") and args:
        run, org = args[0], args[1]
        _events.rpush(run, "arrive:" + org)


def _work(run: str, org: str) -> None:
    _events.rpush(run, "grant:" + org)
    time.sleep(HOLD)


@app.task(bind=True, name="fair.keyed_query")
@limited(KEYED_LIMITER, key=lambda run, org, i: org, wait=60, lease=30)
def keyed_query(self: Any, run: str, org: str, i: int) -> None:
    _work(run, org)


@app.task(bind=True, name="fair.plain_query")
@limited(PLAIN_LIMITER, wait=60, lease=30)
def plain_query(self: Any, run: str, org: str, i: int) -> None:
    _work(run, org)
