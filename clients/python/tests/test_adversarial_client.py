"""Adversarial review of the client's promises, against the real server: an acquire whose
answer is lost after the grant (or while it waits) never leaks a permit, a permit lost while
the server was frozen longer than the lease is never revived (and its late release frees
nobody else's slot), one client shared by many threads never lets more than the limit into the
guarded section, 503 answers are retried a bounded number of times and their ``Retry-After``
is honoured, and bad arguments raise Python exceptions naming the parameter.

The witnesses are independent of the server: a counter incremented inside the guarded section
(its peak compared with the limit), and a proxy in front of the server that records and
tampers with the exchanges."""

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from floodgate import BadRequest, Floodgate, NoPermit, PermitLost, Unavailable

from conftest import MakeLimiter, RedisProcess, ServerProcess, wait_until

# What the proxy does with one request: "forward", "drop-before" (hang up before the server
# sees it), "drop-after" (forward, read the server's answer, hang up without passing it on),
# "abandon" (forward, and hang up on both sides unless the server answers within
# ABANDON_AFTER seconds: a client that went away while its acquire was queued; a
# ``threading.Event`` instead: once the test sets it), "freeze"
# (read the request, never pass it on, never answer: a server that stopped answering; the
# connection is held until the proxy closes), or a canned (status, headers, body) answer that
# never reaches the server.
Action = Any
Hook = Callable[[str, Dict[str, Any]], Action]

ABANDON_AFTER = 0.5


class Proxy:
    """A TCP front for the real server, one request per connection (it answers
    ``Connection: close``), that asks ``hook(request_line, body)`` what to do with each."""

    def __init__(self, upstream_port: int, hook: Hook,
                 others: Optional[List[int]] = None) -> None:
        # Request i goes to ports[i % len(ports)]: ``others`` are more servers (on one
        # Redis), taken in turn, as behind a round-robin load balancer.
        self.ports = [upstream_port] + list(others or [])
        self.hook = hook
        self.requests: List[Tuple[str, Dict[str, Any]]] = []
        self.answers: List[bytes] = []  # the server's answers, also those never passed on
        self.abandoned = 0  # requests hung up on while the server still held them
        self.frozen = 0  # requests held unanswered ("freeze")
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = "http://127.0.0.1:{}".format(self.port)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            # A thread per connection: a held long poll must not block the next request.
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = 0
            for line in lines[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(body) < length:
                body += conn.recv(65536)
            request_line = lines[0].decode()
            parsed = json.loads(body) if body else {}
            self.requests.append((request_line, parsed))
            upstream = self.ports[(len(self.requests) - 1) % len(self.ports)]
            action = self.hook(request_line, parsed)
            if action == "drop-before":
                return
            if action == "freeze":
                self.frozen += 1
                self.stop.wait()
                return
            if isinstance(action, tuple):
                status, headers, payload = action
                raw = json.dumps(payload).encode() if payload is not None else b""
                head_out = ["HTTP/1.1 {} X".format(status), "Connection: close",
                            "Content-Length: {}".format(len(raw))]
                head_out += ["{}: {}".format(k, v) for k, v in headers.items()]
                conn.sendall("\r\n".join(head_out).encode() + b"\r\n\r\n" + raw)
                return
            with socket.create_connection(("127.0.0.1", upstream)) as up:
                kept = [line for line in lines[1:] if not line.lower().startswith(b"connection:")]
                up.sendall(b"\r\n".join([lines[0]] + kept + [b"Connection: close", b"", body]))
                answer = b""
                hang_up = action if isinstance(action, threading.Event) else None
                if action == "abandon":
                    up.settimeout(ABANDON_AFTER)
                elif hang_up is not None:
                    up.settimeout(0.02)
                while True:
                    try:
                        chunk = up.recv(65536)
                    except socket.timeout:
                        if hang_up is not None and not hang_up.is_set():
                            continue
                        self.abandoned += 1
                        return  # closes both connections with nothing answered
                    if not chunk:
                        break
                    answer += chunk
            self.answers.append(answer)
            if action == "drop-after":
                return  # the server answered; the client never hears it
            conn.sendall(answer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.listener.close()


def _acquires(proxy: Proxy) -> List[Dict[str, Any]]:
    return [body for line, body in proxy.requests if line.endswith("/acquire HTTP/1.1")]


def _drop_first(action: Action, path_part: str = "/acquire") -> Hook:
    left = [1]

    def hook(request_line: str, body: Dict[str, Any]) -> Action:
        if path_part in request_line and left[0] > 0:
            left[0] -= 1
            return action
        return "forward"

    return hook


# -- an acquire whose answer is lost ---------------------------------------------------------


def test_a_grant_whose_answer_is_lost_is_the_grant_the_retry_gets(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    """The server granted and answered, the connection broke before the client read it: the
    retry (same request_id) must get that same permit, not a second one."""
    name = limiter(2)
    proxy = Proxy(server.port, _drop_first("drop-after"))
    try:
        client = Floodgate(proxy.url, retries=2, backoff=0.01)
        p = client.acquire(name, wait=1, lease=30)
    finally:
        proxy.close()
    assert len(proxy.answers) == 2
    first = json.loads(proxy.answers[0].partition(b"\r\n\r\n")[2])
    assert first["permit_id"] == p.permit_id  # the lost answer's grant is the one returned
    ids = [b["request_id"] for b in _acquires(proxy)]
    assert len(ids) == 2 and ids[0] == ids[1]
    status = fg.limiter(name)
    assert status["in_use"] == 1 and status["counters"]["granted"] == 1
    p.client = fg
    assert p.release() is True
    assert fg.limiter(name)["in_use"] == 0


def test_a_queued_acquire_whose_connection_breaks_is_joined_by_its_retry(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    """The connection of a queued acquire breaks while the server holds the long poll; its
    retry (same request_id) joins that wait, and the holder's release hands over exactly one
    permit: nothing leaks."""
    name = limiter(1)
    holder = fg.acquire(name, wait=1, lease=30)
    hang_up = threading.Event()
    proxy = Proxy(server.port, _drop_first(hang_up))
    got: List[Any] = []
    client = Floodgate(proxy.url, retries=3, backoff=0.01, timeout=5)
    try:
        t = threading.Thread(target=lambda: got.append(client.acquire(name, wait=20, lease=30)))
        t.start()
        # The connection breaks only once the server has the first attempt queued.
        assert wait_until(lambda: fg.limiter(name)["waiting"] == 1, 20)
        hang_up.set()
        assert wait_until(lambda: proxy.abandoned == 1 and len(_acquires(proxy)) >= 2, 20)
        # The release must reach the server after the retry: one the proxy has is not yet
        # one the server joined, and a release first grants the wait nobody listens to (the
        # grant goes back at once) and the late retry a second permit.
        _wait_until_joined(server, name, holder.permit_id)
        assert fg.release(holder.permit_id) is True
        t.join(30)
        assert not t.is_alive() and got, "the retried acquire never returned"
    finally:
        proxy.close()
    p = got[0]
    acquires = _acquires(proxy)
    assert len({b["request_id"] for b in acquires}) == 1
    status = fg.limiter(name)
    assert status["in_use"] == 1
    assert status["counters"]["granted"] == 2  # the holder's and this one: no second grant
    p.client = fg
    assert p.release() is True
    assert fg.limiter(name)["in_use"] == 0


# How long the server keeps the wait of an acquire whose client went away for its retry to
# join (docs/api.md; ORPHANED_WAIT_GRACE in crates/floodgate/src/core/types.rs).
JOIN_WINDOW_MS = 5000


def _get(server: ServerProcess, path: str) -> bytes:
    with urllib.request.urlopen(server.url + path, timeout=5) as answer:
        return bytes(answer.read())


def _acquire_outcomes(server: ServerProcess, name: str) -> Dict[str, float]:
    """``floodgate_acquire_total`` of limiter ``name``, by outcome (the server's /metrics)."""
    prefix = 'floodgate_acquire_total{{limiter="{}",outcome="'.format(name)
    outcomes: Dict[str, float] = {}
    for line in _get(server, "/metrics").decode().splitlines():
        if line.startswith(prefix):
            outcome, _, value = line[len(prefix):].partition('"} ')
            outcomes[outcome] = float(value)
    return outcomes


def _wait_until_joined(server: ServerProcess, name: str, holder_id: str) -> None:
    """Waits until the server shows that the retry of the test's one queued acquire joined
    its wait (nothing shows a join at once): the server has let go of the first attempt
    (dropped with its connection: ``cancelled``; or answered ``superseded``, the retry having
    come first), then its clock (the age of the holder ``holder_id``, which holds throughout)
    has run past the join window from there, and the wait is still queued with no wait ended:
    a first attempt nobody joined would have ended with its window (``timed_out``), and a
    retry queued beside it would be a second waiter."""
    assert wait_until(lambda: sum(_acquire_outcomes(server, name).get(o, 0)
                                  for o in ("cancelled", "superseded")) >= 1, 20)

    def holders() -> Dict[str, Any]:
        view: Dict[str, Any] = json.loads(_get(server, "/v1/limiters/{}/holders".format(name)))
        return view

    def age() -> int:
        ages = [int(h["age_ms"]) for h in holders()["holders"] if h["permit_id"] == holder_id]
        assert ages, "the holder is no longer held"
        return ages[0]

    start = age()
    # (Past the window by a little more than the ages' rounding to whole milliseconds.)
    assert wait_until(lambda: age() > start + JOIN_WINDOW_MS + 10, 30, 0.1)
    view = holders()
    counters = json.loads(_get(server, "/v1/limiters/" + name))["counters"]
    assert (view["waiting"], counters["timed_out"], counters["cancelled"]) == (1, 0, 0), \
        (view, counters)


def test_a_waiter_that_goes_away_for_good_frees_its_grant(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    """A queued acquire whose client never comes back (no retries): the grant made while
    nobody waits for it goes back, so the slot is not held until the lease ends."""
    name = limiter(1)
    holder = fg.acquire(name, wait=1, lease=30)
    proxy = Proxy(server.port, _drop_first("abandon"))
    # Neither a retry nor the window in which one would look for a grant made meanwhile.
    client = Floodgate(proxy.url, retries=0, timeout=5, acquire_retry_window=0)
    try:
        with pytest.raises(Unavailable):
            client.acquire(name, wait=20, lease=60)
    finally:
        proxy.close()
    assert proxy.abandoned == 1
    assert fg.release(holder.permit_id) is True
    # Liveness only: the abandoned acquire leaves the queue (at once, or when its 5 s join
    # window ends) or its grant goes back at once, long before its 60 s lease would end.
    assert wait_until(lambda: fg.limiter(name)["in_use"] == 0, 30)
    with fg.permit(name, wait=20, lease=5):
        assert fg.limiter(name)["in_use"] == 1
    assert fg.limiter(name)["counters"]["expired"] == 0


# -- two servers on one Redis ----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_pair(floodgate_bin: str, redis_server: RedisProcess,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[List[ServerProcess]]:
    """Two servers sharing one Redis: two machines of one deployment."""
    log_dir = tmp_path_factory.mktemp("redis-pair")
    servers = [ServerProcess(floodgate_bin, log_dir, extra=["--redis", redis_server.url])
               for _ in range(2)]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.mark.e2e  # redis-server
def test_a_lost_grant_retried_through_another_server_is_the_same_grant(
    redis_pair: List[ServerProcess],
) -> None:
    a, b = redis_pair
    fg = Floodgate(a.url)
    name = "t-{}".format(os.urandom(6).hex())
    fg.define(name, 2)
    # The first attempt goes to server A, which grants; its answer is lost. The retry goes to
    # server B (round robin): it must find the same grant in Redis.
    proxy = Proxy(a.port, _drop_first("drop-after"), others=[b.port])
    try:
        client = Floodgate(proxy.url, retries=2, backoff=0.01)
        p = client.acquire(name, wait=1, lease=30)
    finally:
        proxy.close()
    first = json.loads(proxy.answers[0].partition(b"\r\n\r\n")[2])
    assert first["permit_id"] == p.permit_id
    assert len(_acquires(proxy)) == 2
    status = Floodgate(b.url).limiter(name)
    assert status["in_use"] == 1 and status["counters"]["granted"] == 1
    assert fg.release(p.permit_id) is True
    assert Floodgate(b.url).limiter(name)["in_use"] == 0


_PEAK = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


@pytest.mark.e2e  # redis-server
def test_processes_on_two_servers_never_exceed_the_limit(
    redis_pair: List[ServerProcess], redis_server: RedisProcess,
) -> None:
    """Six processes, each with its own client, half through each server: a counter in Redis
    incremented inside the guarded section never goes above the limit."""
    import redis

    limit, procs, rounds = 2, 6, 10
    name = "t-{}".format(os.urandom(6).hex())
    Floodgate(redis_pair[0].url).define(name, limit)
    inflight, peak = name + ":inflight", name + ":peak"
    pids = []
    for i in range(procs):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                r = redis.Redis.from_url(redis_server.url)
                fg = Floodgate(redis_pair[i % 2].url, timeout=5.0)
                for _ in range(rounds):
                    with fg.permit(name, wait=60, lease=5, heartbeat=0.5):
                        r.eval(_PEAK, 2, inflight, peak)
                        time.sleep(0.005)
                        r.decr(inflight)
                code = 0
            except BaseException as e:  # noqa: BLE001 - reported through the exit code
                os.write(2, "child failed: {!r}\n".format(e).encode())
            finally:
                os._exit(code)
        pids.append(pid)
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    assert codes == [0] * procs
    r = redis.Redis.from_url(redis_server.url)
    assert 1 <= int(r.get(peak) or 0) <= limit
    assert int(r.get(inflight) or 0) == 0
    status = Floodgate(redis_pair[1].url).limiter(name)
    assert status["in_use"] == 0 and status["counters"]["expired"] == 0


# -- the server frozen for longer than the lease ---------------------------------------------


def test_a_permit_lost_while_the_server_was_frozen_is_never_revived(
    floodgate_bin: str, tmp_path: Path, limiter: MakeLimiter
) -> None:
    proc = ServerProcess(floodgate_bin, tmp_path).start()
    assert proc.proc is not None
    fg = Floodgate(proc.url, timeout=2.0, retries=0)
    fg.define("frozen", 1, lease=1)
    lost_calls: List[Any] = []
    other: Optional[Any] = None
    try:
        with pytest.raises(PermitLost):
            with fg.permit("frozen", wait=1, lease=1, heartbeat=0.2,
                           on_lost=lost_calls.append) as p:
                os.kill(proc.proc.pid, signal.SIGSTOP)  # unreachable, state kept
                try:
                    assert wait_until(lambda: p.lost, 10)
                    assert wait_until(lambda: bool(lost_calls), 10)
                    with pytest.raises(PermitLost):
                        p.check()
                finally:
                    os.kill(proc.proc.pid, signal.SIGCONT)
                # The server reclaims the lease; another holder takes the slot.
                other = Floodgate(proc.url, timeout=5.0, retries=2).acquire(
                    "frozen", wait=10, lease=30)
                assert p.lost  # stays lost: nothing revives it
                with pytest.raises(PermitLost):
                    p.extend()  # the server says permit_lost
        # Leaving the block released nothing of the new holder's.
        status = fg.limiter("frozen")
        assert status["in_use"] == 1
        assert status["counters"]["expired"] == 1
        assert other is not None and fg.release(other.permit_id) is True
        assert fg.limiter("frozen")["in_use"] == 0
    finally:
        if proc.proc is not None:
            os.kill(proc.proc.pid, signal.SIGCONT)
        proc.stop()


# -- one client, many threads ----------------------------------------------------------------


def test_one_client_shared_by_threads_never_exceeds_the_limit(
    fg: Floodgate, limiter: MakeLimiter
) -> None:
    limit, threads, rounds = 3, 12, 8
    name = limiter(limit)
    lock = threading.Lock()
    inside = [0]
    peak = [0]
    done = [0]
    errors: List[BaseException] = []

    def work() -> None:
        try:
            for _ in range(rounds):
                with fg.permit(name, wait=30, lease=5, heartbeat=0.5):
                    with lock:
                        inside[0] += 1
                        peak[0] = max(peak[0], inside[0])
                    time.sleep(0.005)
                    with lock:
                        inside[0] -= 1
                        done[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    assert not errors, errors
    assert done[0] == threads * rounds
    assert 1 <= peak[0] <= limit
    status = fg.limiter(name)
    assert status["in_use"] == 0
    assert status["counters"]["granted"] == threads * rounds
    assert status["counters"]["released"] == threads * rounds
    assert status["counters"]["expired"] == 0
    assert fg.connections_opened <= threads + 8  # kept alive, not one per request


# -- 503 and 429 answers ---------------------------------------------------------------------


def _answer_first(n: int, status: int, headers: Dict[str, str],
                  body: Optional[Dict[str, Any]]) -> Hook:
    left = [n]

    def hook(request_line: str, _: Dict[str, Any]) -> Action:
        if left[0] > 0:
            left[0] -= 1
            return (status, headers, body)
        return "forward"

    return hook


def test_503_retries_are_bounded(server: ServerProcess, limiter: MakeLimiter) -> None:
    name = limiter(1)
    proxy = Proxy(server.port, _answer_first(
        1000, 503, {}, {"error": "store_unavailable", "message": "the store is down"}))
    try:
        client = Floodgate(proxy.url, retries=3, backoff=0.01, backoff_max=0.02)
        with pytest.raises(Unavailable) as info:
            client.acquire(name, wait=0)
    finally:
        proxy.close()
    assert len(proxy.requests) == 4  # the first attempt and 3 retries, then raised
    assert info.value.status == 503 and info.value.code == "store_unavailable"
    assert "the store is down" in str(info.value)


def test_503_retry_after_is_honoured(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    """A 503 with ``Retry-After: 1`` (the server's too_many_connections, a load balancer) is
    not retried sooner than that, even with a 10 ms backoff."""
    name = limiter(1)
    arrivals: List[float] = []
    inner = _answer_first(2, 503, {"Retry-After": "1"},
                          {"error": "too_many_connections", "message": "busy"})

    def hook(request_line: str, body: Dict[str, Any]) -> Action:
        arrivals.append(time.monotonic())
        return inner(request_line, body)

    proxy = Proxy(server.port, hook)
    try:
        client = Floodgate(proxy.url, retries=3, backoff=0.01, backoff_max=2.0)
        p = client.acquire(name, wait=0, lease=5)
    finally:
        proxy.close()
    assert len(arrivals) == 3
    # Lower bounds only (a sleep never ends early): each retry came at least 1 s later.
    assert arrivals[1] - arrivals[0] >= 1.0 and arrivals[2] - arrivals[1] >= 1.0
    assert fg.release(p.permit_id) is True


def test_a_503_retry_after_longer_than_the_backoff_is_raised_at_once(
    server: ServerProcess, limiter: MakeLimiter
) -> None:
    """A hint longer than ``backoff_max`` is not slept through inside a call: Unavailable is
    raised with it at once, for the caller (a Celery task's countdown) to honour."""
    name = limiter(1)
    proxy = Proxy(server.port, _answer_first(
        1000, 503, {"Retry-After": "120"}, {"error": "shutting_down", "message": "bye"}))
    try:
        client = Floodgate(proxy.url, retries=3, backoff=0.01, backoff_max=2.0)
        with pytest.raises(Unavailable) as info:
            client.acquire(name, wait=0)
    finally:
        proxy.close()
    assert len(proxy.requests) == 1
    assert info.value.retry_after == 120.0


def test_a_429_without_a_hint_has_retry_after_zero_and_is_not_retried(
    server: ServerProcess, limiter: MakeLimiter
) -> None:
    """A bare 429 (a proxy's, no body, no header) is a NoPermit raised at once."""
    name = limiter(1)
    proxy = Proxy(server.port, _answer_first(1000, 429, {}, None))
    try:
        client = Floodgate(proxy.url, retries=3, backoff=0.01)
        with pytest.raises(NoPermit) as info:
            client.acquire(name, wait=0)
    finally:
        proxy.close()
    assert len(proxy.requests) == 1
    assert info.value.status == 429 and info.value.retry_after == 0.0


# -- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, exc_type, needle",
    [
        (lambda fg, n: fg.acquire(None, wait=0), TypeError, "name"),  # type: ignore[arg-type]
        (lambda fg, n: fg.acquire(n, wait="5"), TypeError, "wait"),
        (lambda fg, n: fg.acquire(n, wait=0, lease="30"), TypeError, "lease"),
        (lambda fg, n: fg.acquire(n, wait=float("nan")), ValueError, "wait"),
        (lambda fg, n: fg.acquire(n, wait=0, heartbeat=-1), ValueError, "heartbeat"),
        (lambda fg, n: fg.acquire(n, wait=0, heartbeat="often"), ValueError, "heartbeat"),
        (lambda fg, n: fg.permit(n, wait=0, heartbeat=float("inf")), ValueError, "heartbeat"),
        (lambda fg, n: fg.permit(n, wait=0, lease=1, heartbeat=5), ValueError, "heartbeat"),
        # Types only the server checks: its 400 names the field.
        (lambda fg, n: fg.acquire(n, wait=0, permits="2"), BadRequest, "invalid_request: permits:"),
        (lambda fg, n: fg.acquire(n, wait=0, permits=True), BadRequest,
         "invalid_request: permits:"),
        (lambda fg, n: fg.acquire(n, wait=0, key=5), BadRequest, "invalid_request: key:"),
        (lambda fg, n: fg.acquire(n, wait=0, holder=5), BadRequest, "invalid_request: holder:"),
        (lambda fg, n: fg.set_key(n, None, weight=1), TypeError, "key"),  # type: ignore[arg-type]
        (lambda fg, n: fg.release(None), TypeError, "permit_id"),  # type: ignore[arg-type]
        (lambda fg, n: Floodgate("ftp://x"), ValueError, "url"),
        (lambda fg, n: Floodgate(fg.url, timeout=0), ValueError, "timeout"),
        # The client's own settings, refused when it is made (not at its first request or
        # retry, as an OverflowError or a negative sleep naming nothing).
        (lambda fg, n: Floodgate(fg.url, timeout="5"), TypeError, "timeout"),
        (lambda fg, n: Floodgate(fg.url, timeout=float("inf")).acquire(n, wait=0), ValueError,
         "timeout"),
        (lambda fg, n: Floodgate(fg.url, timeout=float("nan")).acquire(n, wait=0), ValueError,
         "timeout"),
        (lambda fg, n: Floodgate(fg.url, retries="3"), ValueError, "retries"),
        (lambda fg, n: Floodgate(fg.url, retries=2.5), ValueError, "retries"),
        (lambda fg, n: Floodgate(fg.url, backoff=-1), ValueError, "backoff"),
        (lambda fg, n: Floodgate(fg.url, backoff_max=float("nan")), ValueError, "backoff_max"),
        (lambda fg, n: Floodgate(fg.url, token=5), TypeError, "token"),
        (lambda fg, n: Floodgate(fg.url, holder=5).acquire(n, wait=0), TypeError, "holder"),
        # A bool is not a duration (True would be a 1 s wait, and take a permit).
        (lambda fg, n: fg.acquire(n, wait=True), TypeError, "wait"),
        # The server caps a wait, and says an absurd one is out of range; the read timeout
        # is capped too instead of overflowing.
        (lambda fg, n: fg.acquire(n, wait=1e300), BadRequest, "invalid_request: wait_ms:"),
        (lambda fg, n: fg.permit(n, wait=0, lease="30", heartbeat=5), TypeError, "lease"),
    ],
    ids=["name-none", "wait-str", "lease-str", "wait-nan", "heartbeat-negative",
         "heartbeat-str", "heartbeat-inf", "heartbeat-past-lease", "permits-str", "permits-bool", "key-int",
         "holder-int", "set-key-none", "permit-id-none", "url-scheme", "timeout-0",
         "timeout-str", "timeout-inf", "timeout-nan", "retries-str", "retries-float",
         "backoff-negative", "backoff-max-nan", "token-int", "client-holder-int", "wait-bool",
         "wait-huge", "lease-str-with-heartbeat"],
)
def test_bad_arguments_raise_naming_the_parameter_and_take_nothing(
    fg: Floodgate, limiter: MakeLimiter, call: Callable[[Floodgate, str], object],
    exc_type: type, needle: str,
) -> None:
    name = limiter(2)
    with pytest.raises(exc_type) as info:
        call(fg, name)
    assert str(info.value).startswith(needle), str(info.value)
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["granted"] == 0  # nothing leaked


def test_bad_arguments_to_a_permits_methods_raise_naming_the_parameter(
    fg: Floodgate, limiter: MakeLimiter
) -> None:
    name = limiter(1)
    with fg.permit(name, wait=0, lease=30, heartbeat=False) as p:
        for call, exc_type, needle in [
            (lambda: p.extend("30"), TypeError, "lease"),
            (lambda: p.extend(timeout="5"), TypeError, "timeout"),
            (lambda: p.extend(timeout=float("nan")), ValueError, "timeout"),
            (lambda: p.start_heartbeat("often"), TypeError, "heartbeat"),  # type: ignore[arg-type]
            (lambda: p.start_heartbeat(-1.0), ValueError, "heartbeat"),
        ]:
            with pytest.raises(exc_type) as info:
                call()
            assert str(info.value).startswith(needle), str(info.value)
        assert p.extensions == 0 and not p.lost
    assert fg.limiter(name)["in_use"] == 0


def test_keyed_acquires_from_threads_keep_each_key_and_the_total_under_their_limits(
    fg: Floodgate,
) -> None:
    total, per_key, keys, per_thread = 4, 2, 3, 6
    name = "k-{}".format(os.urandom(6).hex())
    fg.define(name, total, per_key={"concurrency": per_key})
    lock = threading.Lock()
    inside: Dict[str, int] = {}
    peaks: Dict[str, int] = {}
    errors: List[BaseException] = []

    def work(key: str) -> None:
        try:
            for _ in range(per_thread):
                with fg.permit(name, key=key, wait=30, lease=5, heartbeat=0.5):
                    with lock:
                        inside[key] = inside.get(key, 0) + 1
                        inside["*"] = inside.get("*", 0) + 1
                        for k in (key, "*"):
                            peaks[k] = max(peaks.get(k, 0), inside[k])
                    time.sleep(0.005)
                    with lock:
                        inside[key] -= 1
                        inside["*"] -= 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=("org-{}".format(i % keys),))
               for i in range(keys * 4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    assert not errors, errors
    assert 1 <= peaks["*"] <= total
    assert all(1 <= peaks["org-{}".format(i)] <= per_key for i in range(keys)), peaks
    status = fg.limiter(name)
    assert status["in_use"] == 0
    assert status["counters"]["granted"] == keys * 4 * per_thread
    assert status["counters"]["expired"] == 0


# -- a release whose answer is lost ----------------------------------------------------------


def test_a_release_whose_answer_is_lost_is_not_a_lost_permit(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    """The server released and answered, the client never read it; the retry finds the permit
    gone. The block kept its permit to the end: leaving it must not raise PermitLost."""
    name = limiter(1)
    proxy = Proxy(server.port, _drop_first("drop-after", "/release"))
    try:
        client = Floodgate(proxy.url, retries=2, backoff=0.01)
        with client.permit(name, wait=1, lease=30) as p:
            pass
        assert p.released and not p.lost
        q = client.acquire(name, wait=1, lease=30, heartbeat=False)
        proxy.hook = _drop_first("drop-after", "/release")
        assert q.release() is True  # released by this call's first attempt
    finally:
        proxy.close()
    releases = [line for line, _ in proxy.requests if "/release" in line]
    assert len(releases) == 4  # each release: the lost answer and its retry
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["released"] == 2
    assert status["counters"]["expired"] == 0


class KeepAliveProxy:
    """A front that keeps the client's connection alive between requests (unlike Proxy) and
    forwards each request on a fresh connection to the server. The first request whose line
    contains ``drop`` is forwarded and served, and then the client's kept-alive connection
    is closed without the answer: a server (or a balancer) that went away after serving."""

    def __init__(self, upstream_port: int, drop: str) -> None:
        self.upstream_port = upstream_port
        self.drop = drop
        self.dropped = 0
        self.requests: List[str] = []
        self.connections = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = "http://127.0.0.1:{}".format(self.listener.getsockname()[1])
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            data = b""
            while not self.stop.is_set():
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                length = 0
                for line in lines[1:]:
                    key, _, value = line.partition(b":")
                    if key.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(data) < length:
                    data += conn.recv(65536)
                body, data = data[:length], data[length:]
                self.requests.append(lines[0].decode())
                kept = [h for h in lines[1:] if not h.lower().startswith(b"connection:")]
                with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
                    up.sendall(b"\r\n".join([lines[0]] + kept + [b"Connection: close", b"",
                                                                 body]))
                    answer = b""
                    while True:
                        chunk = up.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
                if self.drop in lines[0].decode() and not self.dropped:
                    self.dropped += 1
                    return  # served; the kept-alive connection closes unanswered
                answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
                answer_lines = [h for h in answer_head.split(b"\r\n")
                                if not h.lower().startswith(b"connection:")]
                conn.sendall(b"\r\n".join(answer_lines) + b"\r\n\r\n" + answer_body)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def test_a_release_served_on_a_kept_alive_connection_that_then_broke_is_not_a_lost_permit(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    """The release went out on a kept-alive connection, was served, and the connection broke
    before the answer; the client sends it again on a new connection and the server says
    "not held". That is this release's own doing, as when a fresh connection breaks: the
    block kept its permit to the end and leaving it must not raise PermitLost."""
    name = limiter(1)
    proxy = KeepAliveProxy(server.port, "/release")
    try:
        client = Floodgate(proxy.url, retries=2, backoff=0.01)
        with client.permit(name, wait=1, lease=30, heartbeat=False) as p:
            client.limiter(name)  # the acquire's connection, kept alive, is used again
        assert p.released and not p.lost
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert [line.split()[1].rsplit("/", 1)[-1] for line in proxy.requests].count("release") == 2
    status = fg.limiter(name)
    assert status["in_use"] == 0 and status["counters"]["released"] == 1
    assert status["counters"]["expired"] == 0


@pytest.mark.e2e  # redis-server
def test_a_lost_grant_retried_on_redis_keeps_the_lease_asked_for(
    redis_pair: List[ServerProcess],
) -> None:
    """On Redis a repeat of a held grant is answered with what is left of its lease: the
    permit's deadline is that, but its lease (what extends renew) stays the one asked for.
    Before, the remnant became the lease, and every heartbeat renewed only that much (a
    retry near the lease's end left a lease of milliseconds, soon lost)."""
    a, _ = redis_pair
    fg = Floodgate(a.url)
    name = "t-{}".format(os.urandom(6).hex())
    fg.define(name, 1)
    seen = [0]

    def hook(request_line: str, body: Dict[str, Any]) -> Action:
        if "/acquire" in request_line:
            seen[0] += 1
            if seen[0] == 1:
                return "drop-after"
            time.sleep(0.3)  # the retry comes later: less of the lease is left
        return "forward"

    proxy = Proxy(a.port, hook)
    try:
        client = Floodgate(proxy.url, retries=2, backoff=0.01)
        p = client.acquire(name, wait=1, lease=30)
        retried = json.loads(proxy.answers[1].partition(b"\r\n\r\n")[2])
        assert retried["permit_id"] == p.permit_id and retried["lease_ms"] < 30000
        assert p.lease == 30.0 and not p.lost
        assert p.expires_in <= retried["lease_ms"] / 1000.0  # never later than the server's
        p.extend()
        extends = [b for line, b in proxy.requests if "/extend" in line]
        assert extends and extends[-1]["lease_ms"] == 30000
    finally:
        proxy.close()
    assert fg.release(p.permit_id) is True


@pytest.mark.e2e  # redis-server
def test_a_retried_grant_with_little_lease_left_is_extended_before_it_ends(
    redis_pair: List[ServerProcess],
) -> None:
    """A grant answered with less of its lease left than asked (a repeat on Redis, after the
    server was unreachable for 14 s of a 20 s lease) is not taken for lost: its deadline
    counts from the retry that was answered, not from the first attempt (before, it had passed
    on arrival), and its heartbeat beats before a third of what is left has passed, not at
    lease/3 of the lease asked for (6.7 s: the first beat would have come after the 6 s or less
    left). What is left (about 6 s: the retries' backoff is capped at 0.1 s, so the retry comes
    right after the 14 s) is what a test process stalled meanwhile (a busy machine) has to
    spare before the first beat; with 12 s and 8 s and the default 2 s backoff cap, 2.5 to 4 s
    were left, and a 3.5 s stall lost the permit."""
    a, _ = redis_pair
    fg = Floodgate(a.url)
    name = "t-{}".format(os.urandom(6).hex())
    fg.define(name, 1)
    first: List[float] = []

    def hook(request_line: str, body: Dict[str, Any]) -> Action:
        if "/acquire" in request_line:
            if not first:
                first.append(time.monotonic())
                return "drop-after"  # granted, the answer lost
            if time.monotonic() - first[0] < 14.0:
                return "drop-before"  # unreachable meanwhile: retried within the window
        return "forward"

    proxy = Proxy(a.port, hook)
    try:
        client = Floodgate(proxy.url, retries=2, backoff=0.01, backoff_max=0.1)
        with client.permit(name, wait=1, lease=20) as p:
            left = json.loads(proxy.answers[-1].partition(b"\r\n\r\n")[2])["lease_ms"]
            assert left <= 20000 // 3  # no more than the interval (lease/3) is left
            assert wait_until(lambda: p.extensions >= 2 or p.lost, 30, 0.02)
            assert not p.lost, p.heartbeat_error
    finally:
        proxy.close()
    assert fg.limiter(name)["in_use"] == 0


def test_an_extend_answered_after_the_release_is_not_a_loss(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    """A heartbeat extend still in flight when the block ends (the release waits at most
    half the bookkeeping deadline for it, then releases) is answered 410 by the server that
    has released the permit meanwhile: that answer is the release's doing, not a loss. The
    permit stays released and not lost (before, ``p.lost`` turned true afterwards, and
    ``@limited`` logged a finished task's permit as lost)."""
    name = limiter(1)
    extends: List[float] = []

    def hook(request_line: str, body: Dict[str, Any]) -> Action:
        if "/extend" in request_line and not extends:
            extends.append(time.monotonic())
            # Held until the server has released the permit (the release went round it).
            wait_until(lambda: fg.limiter(name)["in_use"] == 0, 30, 0.02)
        return "forward"

    proxy = Proxy(server.port, hook)
    try:
        client = Floodgate(proxy.url, bookkeeping_deadline=1.0)
        with client.permit(name, wait=1, lease=30, heartbeat=0.05) as p:
            assert wait_until(lambda: bool(extends), 30, 0.01)
            beat = [t for t in threading.enumerate() if t.name.endswith(p.permit_id)]
        assert p.released and len(beat) == 1
        # The held extend is forwarded once the release went through, and answered 410;
        # the heartbeat thread ends once it has that answer.
        beat[0].join(30)
        assert not beat[0].is_alive()
        assert any(b" 410 " in answer for answer in proxy.answers), proxy.answers
        assert not p.lost
    finally:
        proxy.close()
    assert fg.limiter(name)["in_use"] == 0
