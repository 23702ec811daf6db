"""Keyed limiters from Python (docs/keyed.md): ``key=`` on acquire, schedule and the Celery
decorator; overrides; the errors a key can meet. Against the real server."""

import uuid
from pathlib import Path
from typing import Any, List

import pytest

from floodgate import BadRequest, Floodgate, PermitLost, TooManyKeys, WaitTimeout

from conftest import ServerProcess


def keyed(fg: Floodgate, concurrency: Any, **kwargs: Any) -> str:
    name = "k-{}".format(uuid.uuid4().hex[:12])
    fg.define(name, concurrency, **kwargs)
    return name


def test_a_key_counts_against_its_own_limit_under_the_total(fg: Floodgate) -> None:
    name = keyed(fg, 3, per_key={"concurrency": 2}, max_keys=2)
    a1 = fg.acquire(name, key="org-a", wait=0)
    a2 = fg.acquire(name, key="org-a", wait=0)
    with pytest.raises(WaitTimeout):
        fg.acquire(name, key="org-a", wait=0)  # org-a at its own limit
    b1 = fg.acquire(name, key="org-b", wait=0)  # the total has room for org-b
    with pytest.raises(TooManyKeys) as too_many:
        fg.acquire(name, key="org-c", wait=0)  # a third key beyond max_keys
    assert too_many.value.retry_after > 0
    status = fg.limiter(name)
    assert status["in_use"] == 3
    assert status["keyed"]["key_count"] == 2
    assert status["keyed"]["busiest_keys"][0]["key"] == "org-a"
    for p in (a1, a2, b1):
        assert p.release()
    assert fg.limiter(name)["keyed"]["key_count"] == 0


def test_overrides_and_bad_input(fg: Floodgate) -> None:
    name = keyed(fg, None, per_key={"concurrency": 1})
    over = fg.set_key(name, "big-org", concurrency=3, weight=2)
    assert over == {"key": "big-org", "concurrency": 3, "weight": 2}
    permits: List[Any] = [fg.acquire(name, key="big-org", wait=0) for _ in range(3)]
    with pytest.raises(WaitTimeout):
        fg.acquire(name, key="big-org", wait=0)
    assert fg.delete_key(name, "big-org")
    for p in permits:
        p.release()
    with pytest.raises(BadRequest) as no_key:
        fg.acquire(name, wait=0)
    assert "key" in str(no_key.value)
    plain = keyed(fg, 1)
    with pytest.raises(BadRequest) as on_plain:
        fg.acquire(plain, key="org-a", wait=0)
    assert "key" in str(on_plain.value)


def test_schedule_with_a_key_takes_both_rates(fg: Floodgate) -> None:
    per_key = {"concurrency": 5, "rate": {"limit": 10, "period_ms": 1000, "burst": 1}}
    name = keyed(fg, 10, per_key=per_key)
    offsets = fg.schedule(name, 3, key="org-a")
    # The key's 10/s paces its reservations 100 ms apart; another key's are its own.
    assert offsets[0] == 0.0
    assert offsets[1] >= 0.099 and offsets[2] >= 0.199
    other = fg.schedule(name, 1, key="org-b")
    assert other == [0.0]


def test_a_schedule_for_a_key_beyond_max_keys_is_too_many_keys_with_a_hint(fg: Floodgate) -> None:
    # Retryable, as an acquire's: the cap frees itself as idle keys drop out.
    per_key = {"concurrency": 5, "rate": {"limit": 10, "period_ms": 1000, "burst": 1}}
    name = keyed(fg, 10, per_key=per_key, max_keys=1)
    assert fg.schedule(name, 1, key="org-a") == [0.0]
    with pytest.raises(TooManyKeys) as too_many:
        fg.schedule(name, 1, key="org-b")
    assert too_many.value.retry_after >= 0
    assert fg.limiter(name)["keyed"]["too_many_keys"] == 1


def test_a_keyed_reservation_is_given_back(fg: Floodgate) -> None:
    per_key = {"concurrency": 5, "rate": {"limit": 1, "period_ms": 1000, "burst": 1}}
    name = keyed(fg, 10, per_key=per_key)
    reserved = fg.reserve(name, 5, key="org-a")
    assert reserved.id is not None
    assert reserved.offsets == [0.0, 1.0, 2.0, 3.0, 4.0]
    # Only the first child was enqueued: the others go back (those not started yet).
    back = fg.unschedule(name, reserved.id, 4)
    assert 1 <= back <= 4
    assert fg.unschedule(name, reserved.id, 4) == 0, "given back once"
    # org-a's next token follows the ones it kept, not all five.
    assert fg.schedule(name, 1, key="org-a")[0] <= 5 - back


def test_the_celery_decorator_takes_the_key_from_the_arguments(fg: Floodgate) -> None:
    from floodgate.celery import current_permit, limited

    from test_celery_decorator import BoundTask

    name = keyed(fg, 4, per_key={"concurrency": 1})
    seen: List[Any] = []

    @limited(name, key=lambda org_id, project_id: "org-{}".format(org_id), wait=1, client=fg)
    def body(self: Any, org_id: int, project_id: int) -> None:
        assert current_permit() is not None
        busiest = fg.limiter(name)["keyed"]["busiest_keys"]
        seen.append([(k["key"], k["in_use"]) for k in busiest])

    body(BoundTask(), 7, 1)
    body(BoundTask(), 8, 2)
    assert seen == [[("org-7", 1)], [("org-8", 1)]]
    assert fg.limiter(name)["keyed"]["key_count"] == 0


def test_a_keyed_permit_sends_its_key_on_extend_and_is_readopted_after_a_restart(
    floodgate_bin: str, tmp_path: Path
) -> None:
    """docs/learning.md: the permit remembers its key; after the server restarts without state
    (``--learning-window`` with the limiter in its config), its next extend re-adopts it under
    that key, so a new acquire of that key beyond its limit is refused while it holds."""
    config = tmp_path / "floodgate.toml"
    config.write_text(
        "[limiters.orgs]\nconcurrency = 2\nper_key = { concurrency = 1 }\n"
        "max_wait_ms = 60000\n"
    )
    # Restarted below on the same port: one below the ephemeral range (conftest.free_port).
    first = ServerProcess(
        floodgate_bin, tmp_path, ["--config", str(config)], restartable=True
    ).start()
    try:
        fg = Floodgate(first.url, timeout=5.0, retries=2, backoff=0.05)
        held = fg.acquire("orgs", key="org-a", wait=0, lease=600, heartbeat=False)
        assert held.key == "org-a"
        plain = keyed(fg, 1)
        assert fg.acquire(plain, wait=0, heartbeat=False).key is None
        # A bad key is refused by the server, naming it.
        with pytest.raises(BadRequest) as bad:
            fg.extend(held.permit_id, 60, permits=1, key="")
        assert "key" in str(bad.value)
        port = first.port
    finally:
        first.kill()
    second = ServerProcess(
        floodgate_bin, tmp_path, ["--config", str(config), "--learning-window", "600000"]
    ).start(port)
    try:
        assert fg.limiter("orgs")["learning"] is True
        # Without its key the server could not count it: lost, as before.
        with pytest.raises(PermitLost):
            fg.extend(held.permit_id, 60, permits=1)
        held.extend(60)  # the Permit sends its key: re-adopted
        status = fg.limiter("orgs")
        assert (status["in_use"], status["counters"]["adopted"]) == (1, 1)
        assert status["keyed"]["busiest_keys"][0]["key"] == "org-a"
        assert held.release()
        assert fg.limiter("orgs")["in_use"] == 0
    finally:
        second.stop()
