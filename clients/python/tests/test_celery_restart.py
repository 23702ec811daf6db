"""A ``@limited`` task on a real prefork worker whose Floodgate server is SIGKILLed and
restarted (same port) while the body holds its permit. With a data directory the permit
survives: the restarted server still counts it (a try-once acquire is refused), and the task
ends in SUCCESS with its permit released, nothing expired. Without one the heartbeat learns
the permit is lost (permit_lost): the body's check() fails the task (reported, not retried),
and the slot on the new server is free, not held twice.

The test waits for the worker's log to show a failed extend (the heartbeat met the outage)
before starting the server again; the lease (10 s) only has to outlive the restart."""

import os
import uuid
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest
import redis
from celery import Celery

from floodgate import Floodgate, WaitTimeout

from conftest import RedisProcess, ServerProcess, celery_worker, wait_until

pytestmark = pytest.mark.e2e

APP_DIR = Path(__file__).resolve().parent / "adv_celery"
LIMITER = "adv-restart"


def _start(floodgate_bin: str, tmp_path: Path, data_dir: bool) -> ServerProcess:
    config = tmp_path / "floodgate.toml"
    config.write_text("[limiters.{}]\nconcurrency = 1\n".format(LIMITER))
    extra = ["--config", str(config)]
    if data_dir:
        extra += ["--data-dir", str(tmp_path / "data")]
    return ServerProcess(floodgate_bin, tmp_path, extra=extra, restartable=True).start()


@pytest.fixture(params=[True, False], ids=["data-dir", "in-memory"])
def restart_setup(
    request: pytest.FixtureRequest, floodgate_bin: str, redis_server: RedisProcess,
    tmp_path: Path,
) -> Iterator[Tuple[bool, ServerProcess, Dict[str, str], Path]]:
    data_dir = bool(request.param)
    proc = _start(floodgate_bin, tmp_path, data_dir)
    suffix = uuid.uuid4().hex[:8]
    env = dict(os.environ)
    env.update(
        CELERY_BROKER_URL=redis_server.url,
        FLOODGATE_URL=proc.url,
        ADV_QUEUE="adv-restart-" + suffix,
        ADV_FULL_LIMITER="unused", ADV_OPEN_LIMITER="unused", ADV_KILL_LIMITER="unused",
        ADV_RESTART_LIMITER=LIMITER,
        PYTHONPATH=os.pathsep.join(
            [str(APP_DIR)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                              else [])),
    )
    env.pop("FLOODGATE_TOKEN", None)
    log_dir = tmp_path / "worker"
    log_dir.mkdir()
    try:
        with celery_worker("adv_app", APP_DIR, env, log_dir, 1, "prefork", "restart"):
            yield data_dir, proc, env, log_dir / "worker.log"
    finally:
        proc.stop()


def test_a_server_restart_while_a_task_holds_its_permit(
    restart_setup: Tuple[bool, ServerProcess, Dict[str, str], Path],
    redis_server: RedisProcess,
) -> None:
    data_dir, proc, env, worker_log = restart_setup
    r = redis.Redis.from_url(redis_server.url)
    app = Celery(broker=redis_server.url, backend=redis_server.url)
    run = "adv-" + uuid.uuid4().hex[:8]
    try:
        result = app.send_task("adv.holds", args=[run], queue=env["ADV_QUEUE"])
        assert wait_until(lambda: r.get(run + ":token") is not None, 60, 0.02)
        logged = worker_log.read_text(errors="replace").count("failed (unavailable")
        proc.kill()
        # The heartbeat met the outage (and went on trying): then the server comes back.
        assert wait_until(lambda: worker_log.read_text(errors="replace")
                          .count("failed (unavailable") > logged, 30, 0.05)
        proc.start(port=proc.port)
        fg = Floodgate(proc.url)
        if data_dir:
            # Still held across the crash: the one slot is not free.
            with pytest.raises(WaitTimeout):
                fg.acquire(LIMITER, wait=0)
        else:
            # Lost with the state: the heartbeat is told, and the slot is free for others
            # (not re-adopted; the holder is not revived).
            assert wait_until(lambda: "was lost" in worker_log.read_text(errors="replace"),
                              30, 0.05)
            with fg.permit(LIMITER, wait=0, lease=30):
                pass
        r.set(run + ":go", 1)
        assert wait_until(lambda: result.state in ("SUCCESS", "FAILURE"), 60, 0.05), \
            result.state
        status = fg.limiter(LIMITER)
        assert status["in_use"] == 0
        if data_dir:
            assert result.state == "SUCCESS" and result.result == "held"
            assert r.get(run + ":lost") == b"0" and r.get(run + ":ran") == b"1"
            assert status["counters"]["expired"] == 0
            assert status["counters"]["released"] == 1
        else:
            assert result.state == "FAILURE" and "PermitLost" in (result.traceback or "")
            assert r.get(run + ":lost") == b"1" and r.get(run + ":ran") is None
            # The new server's only grant was the test's own.
            assert status["counters"]["granted"] == 1 and status["counters"]["released"] == 1
    finally:
        app.close()
