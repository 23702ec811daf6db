"""End to end: one organization's large batch does not delay small organizations beyond their
fair share when ``@limited`` is given ``key=`` (a keyed limiter), and does without it.

A real Celery worker (a thread pool large enough that every task waits in the limiter at once,
Redis as the broker) runs ``fair_celery/fair_app.py``; the limiters live in the real server.
The large organization enqueues its batch first; once most of it waits in the limiter, five
small organizations enqueue two tasks each. The tasks record arrivals and grants in one Redis
list, and the assertions are about that order only (counts of grants), never about timings:

- keyed: each small organization's tasks are all granted within the next ``FAIR_SHARE``
  grants after it arrives (six keys share the total in turn: two turns each is 12 grants),
  while the large organization keeps getting its turn in each round;
- plain FIFO: each small organization's first grant comes only after the large
  organization's waiters queued before it (at least ``BEHIND`` grants).
"""

import os
import subprocess
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import redis
from celery import Celery

from floodgate import Floodgate

from conftest import celery_worker, RedisProcess, ServerProcess, wait_until

pytestmark = pytest.mark.e2e

APP_DIR = Path(__file__).resolve().parent / "fair_celery"
TOTAL = 2  # permits of each limiter
BIG = 60  # the large organization's batch
QUEUED_FIRST = 40  # its tasks waiting in the limiter before the small ones are sent
SMALL_ORGS, SMALL_TASKS = 5, 2
THREADS = BIG + SMALL_ORGS * SMALL_TASKS + 10  # every task can wait at once
FAIR_SHARE = 16  # 12 for two turns of six keys, plus a few granted while a task is in flight
BEHIND = 30  # QUEUED_FIRST less a few granted while the small tasks are in flight


@pytest.fixture(scope="module")
def fair_env(server: ServerProcess, redis_server: RedisProcess) -> Dict[str, str]:
    fg = Floodgate(server.url)
    suffix = uuid.uuid4().hex[:8]
    env = dict(os.environ)
    env.update(
        CELERY_BROKER_URL=redis_server.url,
        FLOODGATE_URL=server.url,
        FAIR_QUEUE="fair-" + suffix,
        FAIR_KEYED_LIMITER="fair-keyed-" + suffix,
        FAIR_PLAIN_LIMITER="fair-plain-" + suffix,
        FAIR_HOLD="0.1",
        PYTHONPATH=os.pathsep.join(
            [str(APP_DIR)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                              else [])),
    )
    env.pop("FLOODGATE_TOKEN", None)
    # The same total; the keyed one's per-key limit is the total, so only fair sharing differs.
    fg.define(env["FAIR_KEYED_LIMITER"], TOTAL, per_key={"concurrency": TOTAL}, max_wait=120)
    fg.define(env["FAIR_PLAIN_LIMITER"], TOTAL, max_wait=120)
    return env


@pytest.fixture(scope="module")
def fair_worker(fair_env: Dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator["subprocess.Popen[bytes]"]:
    log_dir = tmp_path_factory.mktemp("fair-celery")
    with celery_worker("fair_app", APP_DIR, fair_env, log_dir, THREADS, "threads",
                       "fair") as proc:
        yield proc


def _run(env: Dict[str, str], fg: Floodgate, r: "redis.Redis", keyed: bool) -> List[str]:
    """Enqueues the batch, then the small organizations' tasks; returns the run's events."""
    task = "fair.keyed_query" if keyed else "fair.plain_query"
    limiter = env["FAIR_KEYED_LIMITER" if keyed else "FAIR_PLAIN_LIMITER"]
    run = "fair-run-" + uuid.uuid4().hex[:8]
    client = Celery(broker=env["CELERY_BROKER_URL"])
    try:
        for i in range(BIG):
            client.send_task(task, args=[run, "org-big", i], queue=env["FAIR_QUEUE"])
        assert wait_until(lambda: fg.limiter(limiter)["waiting"] >= QUEUED_FIRST, 60, 0.01), \
            fg.limiter(limiter)
        for o in range(SMALL_ORGS):
            for i in range(SMALL_TASKS):
                client.send_task(task, args=[run, "org-small-{}".format(o), i],
                                 queue=env["FAIR_QUEUE"])
        total = BIG + SMALL_ORGS * SMALL_TASKS

        def grants() -> int:
            return sum(1 for e in r.lrange(run, 0, -1) if e.startswith(b"grant:"))

        assert wait_until(lambda: grants() == total, 120, 0.05), grants()
    finally:
        client.close()
    return [e.decode() for e in r.lrange(run, 0, -1)]


def _lateness(events: List[str]) -> Dict[str, Tuple[int, int, int]]:
    """Per small organization: (grants before it arrived, grants from its arrival to its first
    grant, to its last grant), counting its own."""
    granted = 0
    arrived: Dict[str, int] = {}
    first: Dict[str, int] = {}
    last: Dict[str, int] = {}
    for e in events:
        kind, org = e.split(":", 1)
        if kind == "arrive":
            arrived.setdefault(org, granted)
        else:
            granted += 1
            first.setdefault(org, granted)
            last[org] = granted
    return {org: (at, first[org] - at, last[org] - at)
            for org, at in arrived.items() if org.startswith("org-small-")}


def test_a_large_batch_does_not_delay_small_organizations_with_keys_and_does_without(
    fair_worker: "subprocess.Popen[bytes]", fair_env: Dict[str, str], fg: Floodgate,
    redis_server: RedisProcess,
) -> None:
    r = redis.Redis.from_url(redis_server.url)

    keyed = _run(fair_env, fg, r, keyed=True)
    late = _lateness(keyed)
    print("keyed: (grants before arrival, to first grant, to last grant) per small org:", late)
    assert len(late) == SMALL_ORGS
    for org, (before, _, to_last) in late.items():
        # Arrived behind most of the batch, yet served within its fair share of grants.
        assert before < BIG - QUEUED_FIRST + FAIR_SHARE, (org, before)
        assert to_last <= FAIR_SHARE, (org, to_last, keyed)
    # The large organization kept its turns (one per round of the six keys) while the small
    # ones were served: it is shared with, not starved.
    start = min(before for before, _, _ in late.values())
    end = max(before + to_last for before, _, to_last in late.values())
    grants = [e for e in keyed if e.startswith("grant:")]
    big_meanwhile = sum(1 for e in grants[start:end] if e == "grant:org-big")
    assert big_meanwhile >= SMALL_TASKS - 1, (big_meanwhile, grants[start:end])

    plain = _run(fair_env, fg, r, keyed=False)
    late = _lateness(plain)
    print("plain: (grants before arrival, to first grant, to last grant) per small org:", late)
    assert len(late) == SMALL_ORGS
    for org, (_before, to_first, _) in late.items():
        # FIFO: behind every waiter of the batch queued before it.
        assert to_first >= BEHIND, (org, to_first, plain)

    # Both limiters end empty: every permit released (the last bodies may still be running).
    for name in (fair_env["FAIR_KEYED_LIMITER"], fair_env["FAIR_PLAIN_LIMITER"]):
        def empty(name: str = name) -> bool:
            status = fg.limiter(name)
            return bool(status["in_use"] == 0 and status["waiting"] == 0)

        assert wait_until(empty, 30, 0.05), fg.limiter(name)
        counters = fg.limiter(name)["counters"]
        assert counters["granted"] == counters["released"] == BIG + SMALL_ORGS * SMALL_TASKS
