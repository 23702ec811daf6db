"""The HTTP client: :class:`Floodgate` and the :class:`Permit` it grants.

Standard library only (``http.client``, ``json``, ``threading``). Connections are kept alive
in a small pool, one request at a time per connection, so a client is safe to share between
threads. The pool belongs to the process that made it: after ``fork()`` (Celery's prefork pool)
the child starts an empty pool of its own and never touches the parent's sockets, as redis-py's
pool does (it checks ``os.getpid()``). Permits belong to their process in the same way.
"""

import datetime
import http.client
import json
import logging
import math
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

from .errors import (
    FloodgateError,
    NotFound,
    PermitLost,
    ServerError,
    Unavailable,
    error_for,
)
from .backoff import Backoff, retry_after_of

__all__ = ["Floodgate", "Permit", "Rate", "Adaptive", "KEEP", "Seconds", "DEFAULT_URL"]

T = TypeVar("T")

log = logging.getLogger("floodgate")

#: A duration in seconds (``int`` or ``float``) or a :class:`datetime.timedelta`.
Seconds = Union[int, float, datetime.timedelta]

#: Where ``floodgate serve`` listens by default.
DEFAULT_URL = "http://127.0.0.1:8750"

#: The longest wait a limiter can have (``max_wait_ms`` is capped at one hour): an acquire
#: without an explicit ``wait`` may be held this long.
MAX_SERVER_WAIT = 3600.0

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


def _seconds(value: Seconds) -> float:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError("a duration is a number of seconds or a timedelta, not {!r}".format(value))


def _ms(value: Seconds, field: str) -> int:
    """Seconds to the API's integer milliseconds. Range checks are the server's: a zero or
    negative value is sent as is and answered with the server's message naming ``field``."""
    seconds = _seconds(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError("{}: {!r} is not a finite duration".format(field, value))
    ms = int(round(seconds * 1000.0))
    if ms == 0 and seconds > 0:
        ms = 1  # a positive duration below half a millisecond is not zero ("try once")
    return ms


class _Keep:
    """The default of :meth:`Floodgate.define`'s fields: leave the current value as it is."""

    def __repr__(self) -> str:
        return "KEEP"


#: Leave a limiter field as it is (``None`` removes ``concurrency``, ``rate`` or ``adaptive``).
KEEP: Any = _Keep()


@dataclass(frozen=True)
class Rate:
    """A rate limit (GCRA): ``limit`` tokens per ``period`` seconds, ``burst`` back to back
    (server default 1: evenly paced)."""

    limit: int
    period: Seconds = 1.0
    burst: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {"limit": self.limit, "period_ms": _ms(self.period, "period_ms")}
        if self.burst is not None:
            body["burst"] = self.burst
        return body


@dataclass(frozen=True)
class Reservation:
    """What :meth:`Floodgate.reserve` reserved on a rate limiter: each child's start offset in
    seconds, and the id with which :meth:`Floodgate.unschedule` gives back unused tokens
    (``None`` for a keyed schedule, which cannot be given back yet)."""

    offsets: List[float]
    id: Optional[int]


@dataclass(frozen=True)
class Adaptive:
    """An adaptive concurrency limit moved by :meth:`Floodgate.feedback`, between ``min`` and
    ``max``; the limiter's ``concurrency`` is where it starts. ``algorithm``: ``"aimd"`` (the
    server's default: throttles only) or ``"gradient"`` (also uses the reported latencies, and
    plateaus where throttling began; ``tolerance`` and ``probe_rounds`` tune it). See
    ``docs/api.md``."""

    min: int
    max: int
    increase: Optional[int] = None
    decrease: Optional[float] = None
    cooldown: Optional[Seconds] = None
    algorithm: Optional[str] = None
    tolerance: Optional[float] = None
    probe_rounds: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {"min": self.min, "max": self.max}
        if self.algorithm is not None:
            body["algorithm"] = self.algorithm
        if self.tolerance is not None:
            body["tolerance"] = self.tolerance
        if self.probe_rounds is not None:
            body["probe_rounds"] = self.probe_rounds
        if self.increase is not None:
            body["increase"] = self.increase
        if self.decrease is not None:
            body["decrease"] = self.decrease
        if self.cooldown is not None:
            body["cooldown_ms"] = _ms(self.cooldown, "cooldown_ms")
        return body


def _spec(value: Any) -> Any:
    if value is None or isinstance(value, dict):
        return value
    return value.to_json()


def _quote(segment: str) -> str:
    if not isinstance(segment, str):
        raise TypeError("expected a string, not {!r}".format(segment))
    return urllib.parse.quote(segment, safe="")


class Floodgate:
    """A client of one Floodgate server (or a load balancer in front of several).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8750`` (a path prefix is kept).
        token: the bearer token, when the server requires one.
        timeout: seconds to connect and to wait for each answer. A long-poll acquire is given
            ``wait + timeout`` to answer, so the HTTP read never ends before the server's wait.
        retries: how many times a request is retried after a connection error or a 503
            (``shutting_down``, ``store_unavailable``) before :class:`Unavailable` is raised.
        backoff: the first retry's delay in seconds; it doubles each retry (with jitter), up to
            ``backoff_max``.
        holder: the default label of acquires (shown by the server); ``"HOSTNAME/PID"`` of the
            process that acquires when left out (so it follows a forked child's pid). Pass
            ``""`` for none.
        ssl_context: for ``https://`` URLs; the default context verifies certificates.
        ca_file: a PEM file of CA certificates to trust besides the system's, for a server
            whose certificate a private CA signed (``from_env`` reads ``FLOODGATE_CA_FILE``).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: Optional[str] = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        backoff_max: float = 2.0,
        holder: Optional[str] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        ca_file: Optional[str] = None,
    ) -> None:
        if ca_file:
            if ssl_context is not None:
                raise ValueError("give ssl_context or ca_file, not both")
            ssl_context = ssl.create_default_context()
            ssl_context.load_verify_locations(cafile=ca_file)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be http://HOST[:PORT] or https://..., not {!r}".format(url))
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries < 0:
            raise ValueError("retries must be zero or more")
        self.url = url.rstrip("/")
        self.token = token or None
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self._holder = holder
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._ssl_context = ssl_context
        # A server without the feedback endpoint (404 not_found) is not asked again for a while.
        self._no_feedback_until = 0.0
        # The keep-alive pool and the process it belongs to (see _pool_of_this_process).
        self._pool_pid = os.getpid()
        self._pool: List[http.client.HTTPConnection] = []
        self._pool_lock = threading.Lock()
        # Connections this process has opened (see connections_opened).
        self._opened = 0

    @property
    def connections_opened(self) -> int:
        """Connections this process has opened to the server (keep-alive makes it small)."""
        self._pool_of_this_process()
        return self._opened

    @property
    def holder(self) -> str:
        """The default holder label: the one given, else ``"HOSTNAME/PID"`` of this process."""
        if self._holder is not None:
            return self._holder
        return "{}/{}".format(socket.gethostname(), os.getpid())

    @holder.setter
    def holder(self, value: Optional[str]) -> None:
        self._holder = value

    def close(self) -> None:
        """Closes the idle keep-alive connections (new requests open new ones)."""
        self._pool_of_this_process()
        with self._pool_lock:
            idle, self._pool = self._pool, []
        for conn in idle:
            conn.close()

    @classmethod
    def from_env(cls, **kwargs: Any) -> "Floodgate":
        """A client from ``FLOODGATE_URL`` (default ``http://127.0.0.1:8750``),
        ``FLOODGATE_TOKEN`` and ``FLOODGATE_CA_FILE``; keyword arguments are passed on (and
        win)."""
        kwargs.setdefault("url", os.environ.get("FLOODGATE_URL") or DEFAULT_URL)
        kwargs.setdefault("token", os.environ.get("FLOODGATE_TOKEN") or None)
        if "ssl_context" not in kwargs:
            kwargs.setdefault("ca_file", os.environ.get("FLOODGATE_CA_FILE") or None)
        return cls(**kwargs)

    def __repr__(self) -> str:
        return "Floodgate({!r})".format(self.url)

    # -- permits ---------------------------------------------------------------------------

    def acquire(
        self,
        name: str,
        *,
        permits: int = 1,
        wait: Optional[Seconds] = None,
        lease: Optional[Seconds] = None,
        holder: Optional[str] = None,
        heartbeat: Union[bool, float] = False,
        on_lost: Optional[Callable[["Permit"], None]] = None,
        key: Optional[str] = None,
    ) -> "Permit":
        """Acquires ``permits`` of limiter ``name``, waiting up to ``wait`` seconds.

        Args:
            wait: how long the server may hold the request for a permit; ``0`` tries once;
                ``None`` uses the limiter's ``max_wait``. The server caps it to ``max_wait``.
            lease: how long the permit is held without an extend; ``None`` is the limiter's.
            heartbeat: ``True`` extends the lease in a background thread every lease/3 while
                the permit is held; a number is the interval in seconds; ``False`` does not.
            on_lost: called (in the heartbeat thread) when the heartbeat learns that the permit
                was lost.
            key: for a keyed limiter (docs/keyed.md), the key this acquire counts against (a
                tenant, an organization): waiters queue per key and keys share the total
                fairly. Required by a keyed limiter, refused (``BadRequest``) by a plain one.

        Returns:
            a :class:`Permit`; use it as a context manager, or call :meth:`Permit.release`.

        Raises:
            WaitTimeout: the wait ended without a permit (``retry_after`` is the server's hint,
                in seconds). Re-enqueue the work.
            QueueFull: the limiter's queue is full (``retry_after`` likewise).
            TooManyKeys: a keyed limiter already tracks ``max_keys`` keys and ``key`` is new.
            UnknownLimiter, BadRequest, PermitsExceedLimit, Unauthorized: as the server answers.
            Unavailable: the server could not be reached.
        """
        body: Dict[str, Any] = {"permits": permits}
        if wait is not None:
            body["wait_ms"] = _ms(wait, "wait_ms")
        if lease is not None:
            body["lease_ms"] = _ms(lease, "lease_ms")
        label = self.holder if holder is None else holder
        if label:
            body["holder"] = label
        if key is not None:
            body["key"] = key
        # The long poll is answered at the latest when the wait ends: give the read that long
        # plus the ordinary timeout.
        held_for = MAX_SERVER_WAIT if wait is None else max(0.0, _seconds(wait))
        # One id per logical acquire, resent unchanged when a connection error makes the
        # request go again: the server answers the repeat with the same grant (or the same
        # wait), never a second permit.
        body["request_id"] = uuid.uuid4().hex
        started = time.monotonic()
        data = self._request(
            "POST",
            "/v1/limiters/{}/acquire".format(_quote(name)),
            body,
            timeout=held_for + self.timeout,
        )
        permit = Permit(self, name, data, requested_at=started)
        if heartbeat:
            interval = None if heartbeat is True else float(heartbeat)
            permit.start_heartbeat(interval, on_lost=on_lost)
        elif on_lost is not None:
            permit._on_lost = on_lost
        return permit

    def permit(
        self,
        name: str,
        *,
        wait: Optional[Seconds] = None,
        lease: Optional[Seconds] = None,
        permits: int = 1,
        holder: Optional[str] = None,
        heartbeat: Union[bool, float] = True,
        on_lost: Optional[Callable[["Permit"], None]] = None,
        key: Optional[str] = None,
    ) -> "Permit":
        """:meth:`acquire` with the heartbeat on, for ``with``::

            with fg.permit("snuba", wait=60, lease=300) as p:
                query(fencing_token=p.fencing_token)
                p.check()        # raises PermitLost if the lease was lost meanwhile

        The permit is acquired by this call (before the ``with`` block starts) and released
        when the block ends, by an exception too.
        """
        return self.acquire(
            name,
            permits=permits,
            wait=wait,
            lease=lease,
            holder=holder,
            heartbeat=heartbeat,
            on_lost=on_lost,
            key=key,
        )

    def extend(
        self, permit_id: str, lease: Optional[Seconds] = None, permits: Optional[int] = None
    ) -> Dict[str, Any]:
        """Extends a permit by id (see :meth:`Permit.extend`); ``permits`` is its size, which
        lets a server that lost its state re-adopt it. Raises :class:`PermitLost`."""
        return self._extend(permit_id, lease, permits=permits)

    def release(self, permit_id: str) -> bool:
        """Releases a permit by id; ``False`` when it was not held. Idempotent."""
        data = self._request("POST", "/v1/permits/{}/release".format(_quote(permit_id)))
        return bool(data.get("released"))

    def _extend(
        self,
        permit_id: str,
        lease: Optional[Seconds],
        timeout: Optional[float] = None,
        retries: Optional[int] = None,
        permits: Optional[int] = None,
    ) -> Dict[str, Any]:
        body: Dict[str, Any] = {}
        if lease is not None:
            body["lease_ms"] = _ms(lease, "lease_ms")
        if permits is not None:
            body["permits"] = permits
        return self._request(
            "POST",
            "/v1/permits/{}/extend".format(_quote(permit_id)),
            body,
            timeout=timeout,
            retries=retries,
        )

    # -- fan-out scheduling and feedback (issue 5) -----------------------------------------

    def schedule(self, name: str, count: int, *, key: Optional[str] = None) -> List[float]:
        """Start offsets, in seconds, for a fan-out of ``count`` tasks on limiter ``name``:
        give task *i* a countdown of ``offsets[i]`` so they do not all arrive at once. With
        ``key`` (a keyed limiter), the offsets satisfy the total's and the key's rate.

        Raises :class:`NotFound` (code ``not_found``) against a server without the endpoint.
        """
        return self.reserve(name, count, key=key).offsets

    def reserve(self, name: str, count: int, *, key: Optional[str] = None) -> Reservation:
        """Like :meth:`schedule`, and also returns the reservation's id, so that a producer
        that enqueues fewer than ``count`` children can give the rest back
        (:meth:`unschedule`). The id is ``None`` for a keyed schedule (not given back yet)."""
        body: Dict[str, Any] = {"count": count}
        if key is not None:
            body["key"] = key
        data = self._request("POST", "/v1/limiters/{}/schedule".format(_quote(name)), body)
        offsets = [float(ms) / 1000.0 for ms in data["offsets_ms"]]
        reservation = data.get("reservation")
        return Reservation(offsets=offsets, id=None if reservation is None else int(reservation))

    def unschedule(self, name: str, reservation: int, count: int) -> int:
        """Gives back ``count`` tokens of ``reservation`` whose children were not enqueued.
        Returns how many went back: only the reservation's last, not yet started tokens, and
        only while it is the limiter's latest (docs/api.md says why); 0 otherwise."""
        data = self._request(
            "POST",
            "/v1/limiters/{}/unschedule".format(_quote(name)),
            {"reservation": reservation, "count": count},
        )
        return int(data["returned"])

    def feedback(
        self, name: str, outcome: str, latency: Optional[Seconds] = None
    ) -> Optional[int]:
        """Reports how a call to the protected backend went: ``outcome`` is ``"ok"``,
        ``"throttled"`` (the backend refused for load: RateLimitExceeded, 429) or ``"error"``;
        ``latency`` in seconds. An adaptive limiter moves its limit on these reports.

        Returns:
            the concurrency limit in force after the report (``None`` for a rate-only limiter).

        Raises :class:`NotFound` (code ``not_found``) against a server without the endpoint.
        """
        body: Dict[str, Any] = {"outcome": outcome}
        if latency is not None:
            body["latency_ms"] = _ms(latency, "latency_ms")
        data = self._request("POST", "/v1/limiters/{}/feedback".format(_quote(name)), body)
        limit = data.get("limit")
        return int(limit) if isinstance(limit, int) else None

    def report(self, name: str, outcome: str, latency: Optional[Seconds] = None) -> None:
        """:meth:`feedback` that never raises: errors are logged, and a server without the
        endpoint (404 ``not_found``) is not asked again for a minute. For use on the hot path
        of every call, where feedback must not fail the work."""
        now = time.monotonic()
        if self._no_feedback_until > now:
            return
        try:
            self.feedback(name, outcome, latency=latency)
        except NotFound as e:
            if e.code == "not_found":
                self._no_feedback_until = now + 60.0
            else:
                log.warning("floodgate: feedback to %s failed: %s", name, e)
        except FloodgateError as e:
            log.warning("floodgate: feedback to %s failed: %s", name, e)

    def call(
        self,
        name: str,
        fn: Callable[["Permit"], T],
        *,
        throttle_exceptions: Tuple[Type[BaseException], ...] = (),
        wait: Optional[Seconds] = None,
        lease: Optional[Seconds] = None,
        permits: int = 1,
        heartbeat: Union[bool, float] = True,
        backoff: Backoff = Backoff(),
        feedback: bool = True,
    ) -> T:
        """Runs ``fn(permit)`` under a permit and reports the outcome. When ``fn`` raises one of
        ``throttle_exceptions`` (the backend said "too much"), reports ``throttled``, releases
        the permit, backs off (full jitter; an exception's ``retry_after`` is honoured) and
        tries again with a new permit, up to ``backoff.max_attempts`` attempts in all.

        A wait that ends without a permit raises :class:`WaitTimeout` as :meth:`acquire` does:
        re-enqueue the work rather than sleeping here.
        """
        attempt = 0
        while True:
            with self.permit(name, wait=wait, lease=lease, permits=permits,
                             heartbeat=heartbeat) as p:
                started = time.monotonic()
                try:
                    result = fn(p)
                except throttle_exceptions as e:
                    failure: BaseException = e
                    latency = time.monotonic() - started
                except Exception:
                    if feedback:
                        self.report(name, "error", time.monotonic() - started)
                    raise
                else:
                    if feedback:
                        self.report(name, "ok", time.monotonic() - started)
                    return result
            # The permit is released before the backoff: nobody holds a slot while sleeping.
            if feedback:
                self.report(name, "throttled", latency)
            attempt += 1
            if attempt >= backoff.max_attempts:
                raise failure
            delay = backoff.delay(attempt - 1, retry_after_of(failure))
            log.info("floodgate: %s throttled (%r); attempt %d in %.3f s",
                     name, failure, attempt + 1, delay)
            time.sleep(delay)

    # -- limiters --------------------------------------------------------------------------

    def define(
        self,
        name: str,
        concurrency: Union[int, None, _Keep] = KEEP,
        *,
        rate: Union[Rate, Dict[str, Any], None, _Keep] = KEEP,
        adaptive: Union[Adaptive, Dict[str, Any], None, _Keep] = KEEP,
        lease: Optional[Seconds] = None,
        max_wait: Optional[Seconds] = None,
        max_queue: Optional[int] = None,
        per_key: Union[Dict[str, Any], None, _Keep] = KEEP,
        max_keys: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Creates or changes a limiter (``PUT``). Fields left out keep their value (for a new
        limiter: the server's defaults); ``None`` removes ``concurrency``, ``rate`` or
        ``adaptive``. Returns the limiter as the server shows it.

            fg.define("snuba", 50, lease=300)
            fg.define("fanout", None, rate=Rate(20, period=1.0))          # rate only
            fg.define("snuba", 50, adaptive=Adaptive(min=5, max=100))       # AIMD from 50
            fg.define("orgs", 50, per_key={"concurrency": 5})              # keyed (docs/keyed.md)
        """
        body: Dict[str, Any] = {}
        if concurrency is not KEEP:
            body["concurrency"] = concurrency
        if rate is not KEEP:
            body["rate"] = _spec(rate)
        if adaptive is not KEEP:
            body["adaptive"] = _spec(adaptive)
        if lease is not None:
            body["lease_ms"] = _ms(lease, "lease_ms")
        if max_wait is not None:
            body["max_wait_ms"] = _ms(max_wait, "max_wait_ms")
        if max_queue is not None:
            body["max_queue"] = max_queue
        if per_key is not KEEP:
            body["per_key"] = _spec(per_key)
        if max_keys is not None:
            body["max_keys"] = max_keys
        return self._request("PUT", "/v1/limiters/{}".format(_quote(name)), body)

    def set_key(
        self, name: str, key: str, *, concurrency: Optional[int] = None, weight: int = 1
    ) -> Dict[str, Any]:
        """Sets keyed limiter ``name``'s override for ``key``: its own concurrency limit
        (``None``: the per-key default) and its weight in the fair share of the total."""
        body: Dict[str, Any] = {"weight": weight}
        if concurrency is not None:
            body["concurrency"] = concurrency
        path = "/v1/limiters/{}/keys/{}".format(_quote(name), _quote(key))
        return self._request("PUT", path, body)

    def delete_key(self, name: str, key: str) -> bool:
        """Removes keyed limiter ``name``'s override for ``key``."""
        path = "/v1/limiters/{}/keys/{}".format(_quote(name), _quote(key))
        return bool(self._request("DELETE", path, None).get("deleted"))

    def limiter(self, name: str) -> Dict[str, Any]:
        """The limiter's settings, in-use count and counters."""
        return self._request("GET", "/v1/limiters/{}".format(_quote(name)))

    def limiters(self) -> List[Dict[str, Any]]:
        """Every limiter, ordered by name."""
        return list(self._request("GET", "/v1/limiters")["limiters"])

    def delete(self, name: str) -> bool:
        """Deletes a limiter; ``False`` when there was none."""
        try:
            data = self._request("DELETE", "/v1/limiters/{}".format(_quote(name)))
        except NotFound as e:
            if e.code == "unknown_limiter":
                return False
            raise
        return bool(data.get("deleted"))

    def healthy(self) -> bool:
        """Whether ``/healthz`` answers 200 (one attempt, no retries)."""
        try:
            status, _, _ = self._send("GET", "/healthz", None, self._headers(None), self.timeout)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    # -- HTTP ------------------------------------------------------------------------------

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
    ) -> Dict[str, Any]:
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


class Permit:
    """A granted permit. Hold it while calling the protected backend, passing
    :attr:`fencing_token` along; release it when done (or use it as a context manager).

    Attributes:
        limiter: the limiter's name.
        permit_id: the id for extend and release (``"NAME.TOKEN"``).
        fencing_token: strictly increases across the limiter's grants; give it to the backend.
        permits: how many permits this grant holds.
        lease: the lease in seconds; the permit is reclaimed that long after the last extend.
        waited: how long the server held the acquire before granting, in seconds.

    A permit belongs to the process that acquired it. In a process forked while it was held,
    :meth:`release` does nothing (returns ``False``), :meth:`extend` raises ``RuntimeError``
    and leaving its ``with`` block neither releases it nor raises: the parent still holds it
    and keeps it alive.
    """

    def __init__(
        self,
        client: Floodgate,
        limiter: str,
        data: Mapping[str, Any],
        requested_at: Optional[float] = None,
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.permit_id: str = str(data["permit_id"])
        self.fencing_token: int = int(data["fencing_token"])
        self.permits: int = int(data.get("permits", 1))
        self.lease: float = float(data.get("lease_ms", 0)) / 1000.0
        self.waited: float = float(data.get("waited_ms", 0)) / 1000.0
        started = time.monotonic() if requested_at is None else requested_at
        # The server's lease started when it granted, which is no earlier than the request
        # plus the wait: this local deadline is never later than the server's.
        self._deadline = started + self.waited + self.lease
        self._lock = threading.Lock()
        self._lost = False
        # Whether _lost came from the server's answer (rather than the local deadline).
        self._server_said_lost = False
        self._released = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._on_lost: Optional[Callable[["Permit"], None]] = None
        self.heartbeat_error: Optional[BaseException] = None
        self.extensions = 0
        # The process that holds the permit; a forked child must leave it alone.
        self._pid = os.getpid()

    def __repr__(self) -> str:
        state = "released" if self._released else ("lost" if self.lost else "held")
        return "<Permit {} token={} {}>".format(self.permit_id, self.fencing_token, state)

    # -- state -----------------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """Whether the permit is known or must be assumed to be lost: the server answered
        ``permit_lost`` to an extend, or the lease ran out with no confirmed extend (then the
        server has reclaimed it too). Stop the work: another holder may have the slot.

        Once true it stays true: an extend that reaches the server after the local deadline
        does not revive the permit."""
        if self._lost:
            return True
        if self._released or self.lease <= 0:
            return False
        if time.monotonic() >= self._deadline:
            self._lost = True
            return True
        return False

    @lost.setter
    def lost(self, value: bool) -> None:
        self._lost = bool(value)

    @property
    def released(self) -> bool:
        return self._released

    @property
    def expires_in(self) -> float:
        """Seconds until the lease ends, as far as this process knows (never later than the
        server's deadline); negative once past it."""
        return self._deadline - time.monotonic()

    def check(self) -> None:
        """Raises :class:`PermitLost` if the permit was lost (see :attr:`lost`). Call it between
        steps of long work: Python cannot safely interrupt the thread doing the work, so the
        heartbeat only records the loss."""
        if self.lost:
            raise self._lost_error()

    def _lost_error(self) -> PermitLost:
        reason = (
            "the server answered permit_lost" if self._server_said_lost
            else "the lease ran out without a confirmed extend"
        )
        return PermitLost(
            "permit_lost", "permit {} is lost: {}".format(self.permit_id, reason), None
        )

    @property
    def owned(self) -> bool:
        """Whether this process holds the permit (``False`` in a process forked meanwhile)."""
        return self._pid == os.getpid()

    # -- extend and release ----------------------------------------------------------------

    def extend(self, lease: Optional[Seconds] = None, *, timeout: Optional[float] = None) -> None:
        """Moves the lease's end to now plus ``lease`` (default: this permit's lease).

        Raises:
            PermitLost: the permit expired or was released; :attr:`lost` is set.
        """
        if not self.owned:
            raise RuntimeError(
                "permit {} belongs to process {}, not to this one (forked while it was held)"
                .format(self.permit_id, self._pid)
            )
        seconds = self.lease if lease is None else _seconds(lease)
        self._extend(seconds, timeout=timeout, retries=None)

    def _extend(self, seconds: float, timeout: Optional[float], retries: Optional[int]) -> None:
        # Asked after the lease ended (as far as this process can tell) without a confirmed
        # extend: the server's answer is still asked for (410 says why), but even a success
        # cannot cover the work done meanwhile.
        too_late = self.lost
        started = time.monotonic()
        if self.lease > 0 and not too_late:
            # An answer that comes after the lease ended is too late to be relied upon.
            remaining = self._deadline - started
            base = self.client.timeout if timeout is None else timeout
            timeout = max(0.001, min(base, remaining))
        try:
            self.client._extend(
                self.permit_id, seconds, timeout=timeout, retries=retries, permits=self.permits
            )
        except PermitLost:
            self._lost = True
            self._server_said_lost = True
            raise
        if too_late:
            raise self._lost_error()
        with self._lock:
            # Measured from before the request: never later than the server's new deadline.
            self._deadline = max(self._deadline, started + seconds)
            self.lease = seconds
            self.extensions += 1

    def release(self) -> bool:
        """Stops the heartbeat and releases the permit. Returns whether the server still held
        it (``False`` after expiry, a previous release or a loss). Calling it again is a no-op.
        In a process forked while the permit was held it does nothing and returns ``False``."""
        if not self.owned:
            return False
        self.stop_heartbeat()
        with self._lock:
            if self._released:
                return False
            self._released = True
        if self.lease <= 0:
            # A rate-only grant (or a fail-open one) holds no slot: nothing to release.
            return False
        return self.client.release(self.permit_id)

    # -- heartbeat -------------------------------------------------------------------------

    def start_heartbeat(
        self,
        interval: Optional[float] = None,
        on_lost: Optional[Callable[["Permit"], None]] = None,
    ) -> None:
        """Extends the lease every ``interval`` seconds (default: lease/3) in a daemon thread
        until :meth:`release` or :meth:`stop_heartbeat`. When the server answers
        ``permit_lost`` the thread sets :attr:`lost`, calls ``on_lost(permit)`` and stops."""
        if on_lost is not None:
            self._on_lost = on_lost
        if self.lease <= 0:
            # A fail-open grant (token 0) has no lease to keep alive.
            return
        if self._thread is not None:
            return
        if interval is None:
            interval = self.lease / 3.0
        if interval <= 0:
            raise ValueError("the heartbeat interval must be positive")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat,
            args=(interval,),
            name="floodgate-heartbeat-{}".format(self.permit_id),
            daemon=True,
        )
        self._thread.start()

    def stop_heartbeat(self) -> None:
        """Stops the heartbeat thread (waiting for an extend in flight to finish)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.client.timeout + 1.0)
        self._thread = None

    def _heartbeat(self, interval: float) -> None:
        """Extends every ``interval``. A server that cannot be reached, or answers 503 (a
        restart, a store outage), does not end it: the extend is tried again every quarter
        interval until it succeeds or the lease has ended without a confirmed extend. Only
        ``permit_lost``, or that end, count as a loss."""
        delay = interval
        while not self._stop.wait(delay):
            started = time.monotonic()
            # Each extend gets at most half a lease to answer, and is not retried inside: the
            # loop tries again soon, while the lease still runs.
            timeout = min(self.client.timeout, max(self.lease / 2.0, 0.05))
            try:
                self._extend(self.lease, timeout=timeout, retries=0)
            except PermitLost as e:
                if not self._stop.is_set():  # else released meanwhile: not a loss
                    self._heartbeat_lost(e)
                return
            except FloodgateError as e:
                if self.lost and not self._stop.is_set():
                    # The lease ended while the server could not be reached.
                    self._heartbeat_lost(self._lost_error())
                    return
                self.heartbeat_error = e
                delay = max(0.05, interval / 4.0)
                log.warning(
                    "floodgate: extend of %s failed (%s); trying again in %.2f s",
                    self.permit_id, e, delay,
                )
                continue
            except Exception as e:  # noqa: BLE001 - keep the thread alive, log everything
                self.heartbeat_error = e
                delay = max(0.05, interval / 4.0)
                log.exception("floodgate: heartbeat of %s failed", self.permit_id)
                continue
            delay = max(0.0, interval - (time.monotonic() - started))

    def _heartbeat_lost(self, e: PermitLost) -> None:
        self.heartbeat_error = e
        log.warning("floodgate: permit %s was lost: %s", self.permit_id, e)
        callback = self._on_lost
        if callback is not None:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - the callback is the user's
                log.exception("floodgate: on_lost callback failed")

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> "Permit":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """Releases the permit. Raises :class:`PermitLost` when the block ran past the loss of
        its permit (the heartbeat learned ``permit_lost``, the lease ran out without a confirmed
        extend, e.g. because a C call held the GIL longer than the lease, or the release found
        it no longer held), unless the block is already raising its own exception (that one
        goes on, with a note). In a process forked inside the block, does nothing."""
        if not self.owned:
            return
        released_before = self._released
        lost = self.lost
        try:
            still_held = self.release()
        except FloodgateError as e:
            # The lease reclaims it; do not hide the block's own exception (or fail a block
            # that succeeded) because the release could not be delivered.
            log.warning("floodgate: release of %s failed: %s", self.permit_id, e)
            still_held = True
        if released_before or self.lease <= 0:
            return
        if not lost and not still_held:
            # The server no longer held it: it expired (or someone released it) meanwhile.
            self._lost = True
            lost = True
        if not lost:
            return
        error = self._lost_error()
        if exc is None:
            raise error
        log.warning("floodgate: %s; the block raised %r", error, exc)
        add_note = getattr(exc, "add_note", None)
        if add_note is not None:
            add_note("floodgate: {}".format(error))
