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
import os
import random
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
    ) -> Tuple[int, bytes, http.client.HTTPMessage]:
        while True:
            conn, reused = self._checkout(timeout)
            try:
                conn.request(method, self._prefix + path, body=data, headers=dict(headers))
                response = conn.getresponse()
                raw = response.read()
            except _STALE:
                conn.close()
                if reused:
                    continue  # closed by the server while idle: the request never arrived
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
        """An idle connection of this process's pool (``True``), or a new one (``False``)."""
        self._pool_of_this_process()
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
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
    ) -> Dict[str, Any]:
        """One request, retried after connection errors and 503s. ``broken`` collects the
        connection errors of attempts that may have reached the server before the connection
        broke (so a retry's answer may describe the state the first attempt left)."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = self._headers(data)
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            cause: Optional[BaseException] = None
            try:
                status, raw, response_headers = self._send(method, path, data, headers, timeout)
            except (OSError, http.client.HTTPException) as e:
                cause = e
                if broken is not None:
                    broken.append(e)
                failure: FloodgateError = Unavailable(
                    "unavailable",
                    "{} {}{}: {}".format(method, self.url, path, e or type(e).__name__),
                )
            else:
                if 200 <= status < 300:
                    return _parse_body(raw, status)
                failure = _parse_error(status, raw, response_headers)
                if not isinstance(failure, Unavailable):
                    raise failure
            if attempt >= retries:
                raise failure from cause
            delay = min(self.backoff_max, self.backoff * (2 ** attempt))
            delay = random.uniform(delay / 2, delay)
            hint = getattr(failure, "retry_after", None)
            if hint is not None:
                if hint > self.backoff_max:
                    # Longer than this call would wait: the caller is told when to come back.
                    raise failure from cause
                delay = max(delay, hint)  # never sooner than the server (or proxy) asked
            log.debug("floodgate: %s %s failed (%s); retry %d in %.3f s",
                      method, path, failure, attempt + 1, delay)
            time.sleep(delay)
            attempt += 1



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
            retry_after = float(value["retry_after_ms"]) / 1000.0
    if retry_after is None:
        header = headers.get("Retry-After")
        if header is not None:
            try:
                retry_after = float(header)
            except ValueError:
                retry_after = None
    return error_for(status, code, message, retry_after)

