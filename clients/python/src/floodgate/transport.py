"""The HTTP transport under :class:`~floodgate.Floodgate`: a keep-alive connection pool that
belongs to one process, requests with retries of connection errors and 503s, and the parsing
of answers into values or :mod:`floodgate.errors`.

Standard library only (``http.client``). One request at a time per connection, so a client is
safe to share between threads. After ``fork()`` the child starts an empty pool of its own and
never touches the parent's sockets (as redis-py's pool does: it checks ``os.getpid()``).
"""

import http.client
import json
import logging
import math
import os
import random
import select
import ssl
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import FloodgateError, ServerError, Unavailable, error_for

log = logging.getLogger("floodgate")

_USER_AGENT = "floodgate-python/0.1"

#: Idle keep-alive connections kept per client (and process).
_POOL_SIZE = 8

#: Errors of a request on a kept-alive connection that the server had already closed while it
#: was idle: the request never reached the server, so it is sent again on a new connection.
_STALE = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)


def _quote(segment: str, what: str = "name") -> str:
    """A path segment, percent-encoded; ``what`` names the parameter in a ``TypeError``."""
    if not isinstance(segment, str):
        raise TypeError("{}: expected a string, not {!r}".format(what, segment))
    return urllib.parse.quote(segment, safe="")


class _Transport:
    """The pool and the request loop, as a base of :class:`~floodgate.Floodgate` (which sets
    these attributes in its ``__init__``)."""

    url: str
    token: Optional[str]
    timeout: float
    retries: int
    backoff: float
    backoff_max: float
    _https: bool
    _host: str
    _port: int
    _prefix: str
    _ssl_context: Optional[ssl.SSLContext]
    _pool_pid: int
    _pool: List[http.client.HTTPConnection]
    _pool_lock: threading.Lock
    _opened: int

    def _headers(self, data: Optional[bytes]) -> Dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        return headers

    def _send(
        self,
        method: str,
        path: str,
        data: Optional[bytes],
        headers: Mapping[str, str],
        timeout: float,
        idempotent: bool = True,
        sent: Optional[List[bool]] = None,
    ) -> Tuple[int, bytes, http.client.HTTPMessage]:
        """One exchange. A request on a kept-alive connection that breaks is sent again on a
        new one (the server had closed it while idle) when it is ``idempotent``, or when it
        broke before the whole request was written (an incomplete request is never served).
        A call that is not idempotent (``schedule``, ``unschedule``, ``feedback``) is not sent
        again once written: the server may have served it, and a second one would count
        twice. ``sent`` gets a ``True`` each time the request was written in full (two: it
        was written on a kept-alive connection that broke, then sent again)."""
        while True:
            conn, reused = self._checkout(timeout)
            written = False
            try:
                conn.request(method, self._prefix + path, body=data, headers=dict(headers))
                written = True
                if sent is not None:
                    sent.append(True)
                response = conn.getresponse()
                raw = response.read()
            except _STALE:
                conn.close()
                if reused and (idempotent or not written):
                    continue  # closed by the server while idle: sent again on a new one
                raise
            except BaseException:
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                self._checkin(conn)
            return response.status, raw, response.headers

    def _pool_of_this_process(self) -> None:
        """Starts an empty pool (and a new lock: another thread may have held the old one at
        the fork) in a forked child. The parent's connections are left alone: closing or using
        them here would break the parent's requests on the shared sockets."""
        pid = os.getpid()
        if self._pool_pid != pid:
            self._pool_lock = threading.Lock()
            self._pool = []
            self._pool_pid = pid
            self._opened = 0

    def _checkout(self, timeout: float) -> Tuple[http.client.HTTPConnection, bool]:
        """An idle connection of this process's pool (``True``), or a new one (``False``).
        An idle connection the server has already closed (readable while idle: its end of
        file) is dropped rather than used, so that a call that is not sent twice seldom meets
        the race of a keep-alive close."""
        self._pool_of_this_process()
        while True:
            with self._pool_lock:
                conn = self._pool.pop() if self._pool else None
            if conn is None or not _dropped(conn):
                break
            conn.close()
        if conn is not None:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            return conn, True
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ssl_context
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        self._opened += 1
        return conn, False

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        if self._pool_pid != os.getpid():
            conn.close()  # made before a fork that happened during the request
            return
        with self._pool_lock:
            if len(self._pool) < _POOL_SIZE:
                self._pool.append(conn)
                return
        conn.close()

    def _request(
        self,
        method: str,
        path: str,
        body: Optional[Mapping[str, Any]] = None,
        *,
        timeout: Optional[float] = None,
        retries: Optional[int] = None,
        broken: Optional[List[BaseException]] = None,
        deadline: Optional[float] = None,
        idempotent: bool = True,
        retry_window: float = 0.0,
        attempts: Optional[List[float]] = None,
    ) -> Dict[str, Any]:
        """One request, retried after connection errors and 503s. ``broken`` collects the
        connection errors of attempts that may have reached the server before the connection
        broke (their request was written in full: a refused connection is not one), also of
        a write on a kept-alive connection sent again on a new one, so a retry's answer may
        describe the state the first attempt left.

        ``deadline`` bounds the whole call, retries included, in seconds: each attempt's
        timeout is cut to what is left of it, and no retry starts past it (a release and a
        feedback report are bookkeeping: they must not hold the caller for ``(retries + 1)
        * timeout`` when the server stops answering). A call that is not ``idempotent`` is
        retried only when its request was never written in full (see :meth:`_send`).

        ``retry_window`` (an acquire's): once an attempt may have been served (written in
        full, its answer lost), retries go on past ``retries`` until that many seconds have
        passed since then, so that a server restarting meanwhile answers the retry (same
        ``request_id``) with the grant the lost answer carried. ``attempts`` gets the
        monotonic time each attempt started at."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = self._headers(data)
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        ends = None if deadline is None else time.monotonic() + deadline
        attempt = 0
        # When an attempt first may have been served: the retry window runs from then.
        maybe_served_at: Optional[float] = None
        while True:
            cause: Optional[BaseException] = None
            sent: List[bool] = []
            left = timeout if ends is None else min(timeout, max(0.001, ends - time.monotonic()))
            if attempts is not None:
                attempts.append(time.monotonic())
            try:
                status, raw, response_headers = self._send(
                    method, path, data, headers, left, idempotent=idempotent, sent=sent
                )
            except (OSError, http.client.HTTPException) as e:
                cause = e
                if sent and maybe_served_at is None:
                    maybe_served_at = time.monotonic()
                if broken is not None and sent:
                    # Only an attempt whose request was written may have been served: a
                    # refused connection reached no server, so a later "not held" is not
                    # its doing.
                    broken.append(e)
                failure: FloodgateError = Unavailable(
                    "unavailable",
                    "{} {}{}: {}".format(method, self.url, path, e or type(e).__name__),
                )
                if sent and not idempotent:
                    # It may have been served: a second one could count twice.
                    raise failure from cause
            else:
                if len(sent) > 1 and maybe_served_at is None:
                    maybe_served_at = time.monotonic()
                if broken is not None and len(sent) > 1:
                    # Written on a kept-alive connection that then broke, and sent again on a
                    # new one (see _send): the first may have been served, its answer lost.
                    broken.append(ConnectionError("a kept-alive connection broke after the "
                                                  "request was written"))
                if 200 <= status < 300:
                    return _parse_body(raw, status)
                failure = _parse_error(status, raw, response_headers)
                if not isinstance(failure, Unavailable):
                    raise failure
            # Until when a grant whose answer was lost may still be got by a retry.
            window_ends = (None if maybe_served_at is None or retry_window <= 0
                           else maybe_served_at + retry_window)
            if attempt >= retries and (window_ends is None or time.monotonic() >= window_ends):
                raise failure from cause
            delay = min(self.backoff_max, self.backoff * (2 ** min(attempt, 62)))
            delay = random.uniform(delay / 2, delay)
            hint = getattr(failure, "retry_after", None)
            if hint is not None:
                if hint > self.backoff_max and (window_ends is None
                                                or time.monotonic() + hint >= window_ends):
                    # Longer than this call would wait: the caller is told when to come back.
                    raise failure from cause
                delay = max(delay, hint)  # never sooner than the server (or proxy) asked
            if ends is not None and time.monotonic() + delay >= ends:
                raise failure from cause  # the retry could not end before the deadline
            log.debug("floodgate: %s %s failed (%s); retry %d in %.3f s",
                      method, path, failure, attempt + 1, delay)
            time.sleep(delay)
            attempt += 1


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection was closed by the server (or is unusable): an
    idle connection has nothing to read, so being readable means its end of file (or bytes
    nobody asked for)."""
    sock = conn.sock
    if sock is None:
        return False  # not connected yet: it connects on use
    try:
        if hasattr(select, "poll"):
            # poll, not select: select cannot watch a descriptor above FD_SETSIZE (1024).
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _parse_body(raw: bytes, status: int) -> Dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise ServerError(
            "bad_response", "the server answered {} with a body that is not JSON".format(status),
            status,
        ) from None
    if not isinstance(value, dict):
        raise ServerError("bad_response", "expected a JSON object, got {!r}".format(value), status)
    return value


def _parse_error(status: int, raw: bytes, headers: http.client.HTTPMessage) -> FloodgateError:
    code = "http_{}".format(status)
    message = raw.decode("utf-8", "replace").strip()[:500] or http.client.responses.get(
        status, "error"
    )
    retry_after: Optional[float] = None
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError:
        value = None
    if isinstance(value, dict):
        code = str(value.get("error") or code)
        message = str(value.get("message") or message)
        if isinstance(value.get("retry_after_ms"), (int, float)):
            retry_after = _sane_hint(float(value["retry_after_ms"]) / 1000.0)
    if retry_after is None:
        header = headers.get("Retry-After")
        if header is not None:
            try:
                retry_after = _sane_hint(float(header))
            except ValueError:
                retry_after = None
    return error_for(status, code, message, retry_after)


# The longest retry hint taken as given, in seconds: the server's own hints stay below it (a
# lease lasts 24 h at most). Longer ones, from a proxy or a broken server, are capped: a
# countdown of 1e15 s overflows Celery's date arithmetic, and Celery then drops the task.
MAX_RETRY_AFTER = 24 * 3600.0


def _sane_hint(seconds: float) -> Optional[float]:
    """A retry hint the caller can act on: `None` for one that is not a finite number of
    seconds, at least 0, capped at `MAX_RETRY_AFTER`."""
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)

