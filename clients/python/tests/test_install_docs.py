"""The install and run commands of the documentation, run as written in fresh virtualenvs
(issue 11): the `pip install` lines of README.md, docs/python.md and the Celery example's
README, then the example's worker and batch commands. Only the addresses differ: the commands'
fixed ports (6379, 8750) are replaced by this run's redis-server and floodgate serve, given
through the same environment variables the README exports.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from conftest import CLIENT_DIR, REPO_ROOT, RedisProcess, ServerProcess, wait_until

pytestmark = pytest.mark.install

EXAMPLE_DIR = CLIENT_DIR / "examples" / "celery_spike_projections"
EXAMPLE_README = EXAMPLE_DIR / "README.md"


def _shell_lines(path: Path) -> List[str]:
    """The command lines of the ```sh blocks of a Markdown file, comments stripped."""
    lines: List[str] = []
    in_block = False
    for raw in path.read_text().splitlines():
        if raw.startswith("```"):
            in_block = raw.strip() == "```sh" if not in_block else False
            continue
        if in_block:
            line = re.sub(r"\s+#.*$", "", raw).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _venv(where: Path) -> Dict[str, str]:
    """A fresh virtualenv; the environment of a shell where it is activated."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    env = dict(os.environ)
    env["VIRTUAL_ENV"] = str(where)
    env["PATH"] = "{}:{}".format(where / "bin", env.get("PATH", ""))
    env.pop("PYTHONPATH", None)  # the venv's own installation, not the test's source tree
    env.pop("PYTHONHOME", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(line: str, cwd: Path, env: Dict[str, str], timeout: float = 600) -> None:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=str(cwd), env=env,
                          capture_output=True, timeout=timeout)
    assert done.returncode == 0, "{!r} failed:\n{}\n{}".format(
        line, done.stdout.decode(errors="replace")[-3000:],
        done.stderr.decode(errors="replace")[-3000:])
    shutil.rmtree(CLIENT_DIR / "build", ignore_errors=True)


def test_the_client_install_lines_work(tmp_path: Path, server: ServerProcess) -> None:
    lines = [line for path in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "python.md")
             for line in _shell_lines(path) if line.startswith("pip install")]
    assert lines, "no pip install line found"
    env = _venv(tmp_path / "venv")
    for line in dict.fromkeys(lines):  # each distinct line once, in order
        _run(line, REPO_ROOT, env)
        check = ("from floodgate import Floodgate; import floodgate.celery; "
                 "assert Floodgate({!r}).healthy()".format(server.url)
                 if "[celery]" in line else
                 "from floodgate import Floodgate; assert Floodgate({!r}).healthy()".format(
                     server.url))
        _run("python -c {}".format(shlex.quote(check)), tmp_path, env)


@pytest.fixture
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """Redis for this test alone: the example's keys must not meet the e2e test's."""
    proc = RedisProcess(tmp_path_factory.mktemp("redis-install")).start()
    yield proc
    proc.stop()


def test_the_celery_example_runs_as_its_readme_says(
    tmp_path: Path, server: ServerProcess, own_redis: RedisProcess
) -> None:
    lines = _shell_lines(EXAMPLE_README)
    install = [line for line in lines if line.startswith("pip install")]
    worker = [line for line in lines if line.startswith("celery -A spike_app worker")]
    batch = [line for line in lines if line.startswith("python run_example.py")]
    assert len(install) == 1 and worker and batch, lines

    env = _venv(tmp_path / "venv")
    _run(install[0], REPO_ROOT, env)  # "from the repository root", "in a virtualenv"

    env.update(
        CELERY_BROKER_URL=own_redis.url,
        FLOODGATE_URL=server.url,
        SPIKE_LIMITER="docs-snuba-{}".format(uuid.uuid4().hex[:8]),
        SPIKE_FANOUT_LIMITER="docs-fanout-{}".format(uuid.uuid4().hex[:8]),
    )
    log_path = tmp_path / "worker.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(["bash", "-c", "exec " + worker[0].rstrip("&").strip()],
                            cwd=str(EXAMPLE_DIR), env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    try:
        started = wait_until(
            lambda: proc.poll() is not None or b" ready." in log_path.read_bytes(), 60, 0.2)
        assert started and proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        _run(batch[0], EXAMPLE_DIR, env, timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
