"""A call whose kept-alive connection breaks after the request was written is sent again only
when it is idempotent. ``schedule``/``reserve``, ``unschedule`` and ``feedback`` have no
idempotency key on the server (only an acquire's ``request_id``): a second copy would reserve
the tokens twice (under-admission) or move an adaptive limit twice. A keep-alive proxy in
front of the real server serves a first request, then forwards the second on the same
connection and hangs up without passing its answer on: the server served it, the client saw a
reused connection break. The assertions are on the server's counters and the proxy's log."""

import socket
import threading
from typing import List, Optional, Set

import pytest

from floodgate import Floodgate, Rate, Unavailable

from conftest import MakeLimiter, ServerProcess, wait_until
from test_adversarial_client import Proxy, _drop_first


class KeepAliveProxy:
    """One client connection kept alive; each request is forwarded to the server on a
    connection of its own. The first request whose path contains one of ``drop`` (each once)
    is answered by the server and hung up on (the client connection closed, the answer never
    passed on)."""

    def __init__(self, upstream_port: int, drop: Set[str],
                 close_after: Optional[str] = None) -> None:
        self.upstream_port = upstream_port
        self.drop = drop
        # After answering a request whose path contains this, the proxy closes the connection
        # (a server ending an idle keep-alive connection); ``closed`` counts those closes.
        self.close_after = close_after
        self.closed = 0
        self.requests: List[str] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.url = "http://127.0.0.1:{}".format(self.listener.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket, buf: bytes) -> Optional[tuple]:  # type: ignore[type-arg]
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            rest += conn.recv(65536)
        return head, rest[:length], rest[length:]

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            buf = b""
            while True:
                got = self._read(conn, buf)
                if got is None:
                    return
                head, body, buf = got
                lines = head.split(b"\r\n")
                request_line = lines[0].decode()
                self.requests.append(request_line)
                kept = [x for x in lines[1:] if not x.lower().startswith(b"connection:")]
                with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
                    up.sendall(b"\r\n".join([lines[0]] + kept + [b"Connection: close", b""])
                               + b"\r\n" + body)
                    answer = b""
                    while True:
                        chunk = up.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
                part = next((p for p in self.drop if p in request_line), None)
                if part is not None:
                    self.drop.discard(part)
                    return  # served; the client's kept-alive connection just breaks
                a_head, _, a_body = answer.partition(b"\r\n\r\n")
                a_lines = [x for x in a_head.split(b"\r\n")
                           if not x.lower().startswith(b"connection:")]
                conn.sendall(b"\r\n".join(a_lines) + b"\r\n\r\n" + a_body)
                if self.close_after is not None and self.close_after in request_line:
                    conn.close()
                    self.closed += 1
                    return

    def sent(self, part: str) -> int:
        return sum(1 for line in self.requests if part in line)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(2)


def _client_of(url: str) -> Floodgate:
    return Floodgate(url, timeout=5, retries=3, backoff=0.01)


def test_a_reserve_on_a_broken_kept_alive_connection_is_not_sent_twice(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    name = limiter(None, rate=Rate(100, period=1.0, burst=100))
    proxy = KeepAliveProxy(server.port, {"/schedule"})
    try:
        client = _client_of(proxy.url)
        client.limiter(name)  # leaves the connection in the pool
        assert client.connections_opened == 1
        with pytest.raises(Unavailable):
            client.reserve(name, 5)
    finally:
        proxy.close()
    assert proxy.sent("/schedule") == 1  # the retries would have sent it four times
    assert fg.limiter(name)["counters"]["scheduled"] == 5


def test_a_feedback_on_a_broken_kept_alive_connection_is_not_counted_twice(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    name = limiter(2, adaptive={"min": 1, "max": 10})
    proxy = KeepAliveProxy(server.port, {"/feedback"})
    try:
        client = _client_of(proxy.url)
        client.limiter(name)
        client.report(name, "ok", 0.01)  # logged, never raised
    finally:
        proxy.close()
    assert proxy.sent("/feedback") == 1
    assert fg.limiter(name)["counters"]["feedback_ok"] == 1


def test_an_idempotent_call_on_a_broken_kept_alive_connection_is_sent_again(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    """A status read (and an acquire, which carries its request_id) is still sent again:
    the second copy changes nothing, and the caller gets its answer."""
    name = limiter(1)
    proxy = KeepAliveProxy(server.port, {"/v1/limiters/{} ".format(name)})
    try:
        client = _client_of(proxy.url)
        client.limiters()
        status = client.limiter(name)
    finally:
        proxy.close()
    assert status["name"] == name
    assert proxy.sent("/v1/limiters/{} ".format(name)) == 2
    assert client.connections_opened == 2  # the broken one and its replacement


def test_a_reserve_whose_answer_is_lost_is_not_retried(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    """The same on a fresh connection (a proxy that answers ``Connection: close``): the
    answer lost after the server served it raises, rather than a retry reserving again."""
    name = limiter(None, rate=Rate(100, period=1.0, burst=100))
    proxy = Proxy(server.port, _drop_first("drop-after", "/schedule"))
    try:
        client = _client_of(proxy.url)
        with pytest.raises(Unavailable):
            client.reserve(name, 5)
        # The next one, answered, is not held back by the first.
        assert len(client.reserve(name, 2).offsets) == 2
    finally:
        proxy.close()
    assert sum(1 for line, _ in proxy.requests if "/schedule" in line) == 2
    assert fg.limiter(name)["counters"]["scheduled"] == 7


def test_an_idle_connection_the_server_closed_is_not_used_for_a_reserve(
    server: ServerProcess, fg: Floodgate, limiter: MakeLimiter
) -> None:
    """The server closed the idle kept-alive connection (as hyper does after its idle
    timeout): a reserve (never sent again once written) still goes out, once, on a new
    connection instead of failing. The client notices the close before writing (the idle
    socket reads its end of file); failing that, http.client writes the body apart from the
    headers, so the write breaks before the request is complete and it is sent again."""
    name = limiter(None, rate=Rate(100, period=1.0, burst=100))
    proxy = KeepAliveProxy(server.port, set(), close_after="/v1/limiters/{} ".format(name))
    try:
        client = _client_of(proxy.url)
        client.limiter(name)
        assert wait_until(lambda: proxy.closed == 1, 10)
        assert len(client.reserve(name, 5).offsets) == 5
    finally:
        proxy.close()
    assert proxy.sent("/schedule") == 1
    assert client.connections_opened == 2
    assert fg.limiter(name)["counters"]["scheduled"] == 5
