"""A release and a feedback report are bookkeeping: against a server that stops answering
(a proxy in front of the real server that reads each request and never answers) they take at
most the client's ``bookkeeping_deadline`` in all, instead of ``(retries + 1) * timeout``
(about 40 s with the defaults). The undelivered release costs capacity until the lease ends,
never safety. The assertions are on what the proxy was sent and what the server holds; the
threads' joins are generous liveness bounds, far below what the retries would take."""

import threading
from typing import Any, Dict, List

from floodgate import Floodgate, Unavailable

from conftest import MakeLimiter, ServerProcess, wait_until
from test_adversarial_client import Action, Proxy

# Far below (retries + 1) * timeout = 4 * 10 s, far above the deadline of 0.5 s.
LIVENESS = 25.0


class Freezer:
    """A proxy hook: forwards until ``freeze`` is set, then holds every request unanswered."""

    def __init__(self) -> None:
        self.freeze = False

    def __call__(self, request_line: str, body: Dict[str, Any]) -> Action:
        return "freeze" if self.freeze else "forward"


def _sent(proxy: Proxy, part: str) -> int:
    return sum(1 for line, _ in proxy.requests if part in line)


def _in_thread(fn: Any) -> List[Any]:
    """Runs ``fn`` in a thread, joined within LIVENESS; returns [result] or [exception]."""
    out: List[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(LIVENESS)
    assert not t.is_alive(), "still waiting on a server that stopped answering"
    return out


def _client(proxy: Proxy) -> Floodgate:
    return Floodgate(proxy.url, timeout=10, retries=3, backoff=0.05,
                     bookkeeping_deadline=0.5)


def test_a_release_to_a_frozen_server_gives_up_at_the_deadline(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    name = limiter(1)
    hook = Freezer()
    proxy = Proxy(server.port, hook)
    try:
        client = _client(proxy)
        p = client.acquire(name, wait=1, lease=2)
        hook.freeze = True
        out = _in_thread(p.release)
    finally:
        proxy.close()
    assert len(out) == 1 and isinstance(out[0], Unavailable), out
    # One attempt, not retried past the deadline (the retries would have sent four).
    assert _sent(proxy, "/release") == 1 and proxy.frozen == 1
    # The server never heard it: the permit stays held (capacity), until its lease ends.
    assert fg.limiter(name)["in_use"] == 1
    assert wait_until(lambda: fg.limiter(name)["in_use"] == 0, 30)
    assert fg.limiter(name)["counters"]["expired"] == 1


def test_the_end_of_a_with_block_does_not_wait_for_a_frozen_server(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    name = limiter(1)
    hook = Freezer()
    proxy = Proxy(server.port, hook)
    ran: List[int] = []

    def block() -> None:
        with client.permit(name, wait=1, lease=30) as p:  # heartbeat on (every 10 s)
            ran.append(p.fencing_token)
            hook.freeze = True
        # The release was not delivered: logged, the block still ends without an error.

    try:
        client = _client(proxy)
        out = _in_thread(block)
    finally:
        proxy.close()
    assert out == [None] and len(ran) == 1
    assert _sent(proxy, "/release") == 1
    assert fg.limiter(name)["in_use"] == 1  # held until the lease ends; then reclaimed


def test_a_report_to_a_frozen_server_gives_up_at_the_deadline(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    name = limiter(2, adaptive={"min": 1, "max": 10})
    hook = Freezer()
    hook.freeze = True
    proxy = Proxy(server.port, hook)
    try:
        client = _client(proxy)
        out = _in_thread(lambda: client.report(name, "ok", 0.01))
    finally:
        proxy.close()
    assert out == [None]  # report never raises
    assert _sent(proxy, "/feedback") == 1
    assert fg.limiter(name)["counters"]["feedback_ok"] == 0
