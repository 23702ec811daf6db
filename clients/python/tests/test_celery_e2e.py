"""End to end: the incident's task cascade on a real Celery worker (8 prefork processes, Redis
as the broker), the real floodgate server, and the stand-in backend of the example, whose
witness (an in-flight counter in Redis, with its peak recorded atomically by a Lua script) the
limiter cannot see.

The limiter allows 4 queries at once; 8 worker processes compete for them with a 20 ms wait, so
waits end all the time and tasks are re-enqueued with the server's retry-after. Ten queries are
refused by the backend first (simulated RateLimitExceeded) to exercise the throttle path.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator

import pytest
import redis

from floodgate import Floodgate

from conftest import celery_worker, CLIENT_DIR, RedisProcess, ServerProcess

pytestmark = pytest.mark.e2e

EXAMPLE_DIR = CLIENT_DIR / "examples" / "celery_spike_projections"
WORKER_PROCESSES = 8
LIMIT = 4
ORGS, PROJECTS = 20, 30  # 600 query tasks
THROTTLES = 10


def _children(pid: int) -> int:
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            count += 1
    return count


@pytest.fixture(scope="module")
def example_env(server: ServerProcess, redis_server: RedisProcess) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        CELERY_BROKER_URL=redis_server.url,
        SNUBA_REDIS_URL=redis_server.url,
        FLOODGATE_URL=server.url,
        SPIKE_LIMITER="e2e-snuba-{}".format(uuid.uuid4().hex[:8]),
        SPIKE_FANOUT_LIMITER="e2e-fanout-{}".format(uuid.uuid4().hex[:8]),
        SPIKE_QUEUE="e2e-{}".format(uuid.uuid4().hex[:8]),
        SPIKE_WAIT="0.02",           # shorter than a query: waits end, tasks are re-enqueued
        SPIKE_LEASE="3",             # kept alive by the heartbeat while a query runs
        SPIKE_MAX_COUNTDOWN="2",     # a cap on the server's retry hint (README's example)
        SPIKE_BACKOFF="0.2",
        SNUBA_CONCURRENT_LIMIT=str(LIMIT),  # the backend refuses a fifth concurrent query
        SNUBA_QUERY_MS_MIN="40",
        SNUBA_QUERY_MS_MAX="80",
        PYTHONPATH=os.pathsep.join(
            [str(EXAMPLE_DIR)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                  else [])),
    )
    env.pop("FLOODGATE_TOKEN", None)
    return env


@pytest.fixture(scope="module")
def worker(example_env: Dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator["subprocess.Popen[bytes]"]:
    log_dir = tmp_path_factory.mktemp("celery")
    with celery_worker("spike_app", EXAMPLE_DIR, example_env, log_dir, WORKER_PROCESSES, "prefork",
                       "e2e") as proc:
        yield proc


def test_spike_projection_fan_out_on_a_real_worker(
    worker: "subprocess.Popen[bytes]", example_env: Dict[str, str], server: ServerProcess,
    redis_server: RedisProcess,
) -> None:
    assert _children(worker.pid) >= WORKER_PROCESSES

    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "run_example.py", "--orgs", str(ORGS), "--projects", str(PROJECTS),
         "--concurrency", str(LIMIT), "--throttle-budget", str(THROTTLES),
         "--fanout-rate", "20", "--timeout", "100", "--json"],
        cwd=str(EXAMPLE_DIR), env=example_env, capture_output=True, timeout=150,
    )
    elapsed = time.monotonic() - started
    assert run.returncode in (0, 1), run.stderr.decode(errors="replace")
    report = json.loads(run.stdout.decode().strip().splitlines()[-1])
    print("example report:", json.dumps(report, indent=1))
    print("elapsed: {:.1f} s".format(elapsed))

    # Checked here against Redis directly, not only through the example's own verdict.
    r = redis.Redis.from_url(redis_server.url)
    expected = ORGS * PROJECTS

    # Every task completed, exactly once: none was dropped when its wait ended.
    assert r.scard("spike:done") == expected
    assert int(r.get("spike:completions") or 0) == expected
    assert r.hgetall("spike:failures") == {}

    # The witness never saw more concurrent queries than the limit, and the backend refused
    # none for load (only the simulated throttles).
    peak = int(r.get("{snuba}:peak") or 0)
    assert int(r.get("{snuba}:peak_attempted") or 0) <= LIMIT
    assert int(r.get("{snuba}:rejected") or 0) == 0
    assert peak <= LIMIT
    assert peak == LIMIT  # the workers did press against it
    assert int(r.get("{snuba}:inflight") or 0) == 0
    assert int(r.get("{snuba}:throttled_simulated") or 0) == THROTTLES

    # Waits ended and the tasks were re-enqueued (retry with the server's hint), and the
    # throttled queries were retried with backoff.
    retries = {k.decode(): int(v) for k, v in r.hgetall("spike:retries").items()}
    assert retries.get("wait", 0) > 0
    assert retries.get("throttle", 0) == THROTTLES
    assert retries.get("other", 0) == 0

    # The work was spread over the worker processes.
    assert r.scard("spike:pids") >= WORKER_PROCESSES

    # The server agrees: every grant released, none expired, the wait timeouts counted.
    status = Floodgate(server.url).limiter(example_env["SPIKE_LIMITER"])
    counters = status["counters"]
    assert status["in_use"] == 0
    assert counters["granted"] == expected + THROTTLES
    assert counters["released"] == counters["granted"]
    assert counters["expired"] == 0
    assert counters["timed_out"] == retries["wait"]
    if "feedback_throttled" in counters:
        assert counters["feedback_throttled"] == THROTTLES
        assert counters["feedback_ok"] == expected

    assert report["ok"] is True
    assert elapsed < 100
