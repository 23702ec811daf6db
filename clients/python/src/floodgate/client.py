"""The HTTP client: :class:`Floodgate` and the :class:`Permit` it grants.

Cut along its seams: the pool and request loop are in :mod:`floodgate.transport`, the permit in
:mod:`floodgate.permit`, the value types in :mod:`floodgate.types`; every name importable from
this module before is still importable from it.

Standard library only (``http.client``, ``json``, ``threading``). Connections are kept alive
in a small pool, one request at a time per connection, so a client is safe to share between
threads. The pool belongs to the process that made it: after ``fork()`` (Celery's prefork pool)
the child starts an empty pool of its own and never touches the parent's sockets, as redis-py's
pool does (it checks ``os.getpid()``). Permits belong to their process in the same way.
"""

import http.client
import logging
import math
import os
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar, Union

from .backoff import Backoff, _check_throttles, _is_throttle, retry_after_of
from .errors import FloodgateError, NotFound
from .permit import Permit
from .transport import _Transport, _quote
from .types import (
    KEEP, Adaptive, Rate, Reservation, Seconds, _Keep, _ms, _seconds, _setting, _spec,
)

__all__ = ["Floodgate", "Permit", "Rate", "Adaptive", "Reservation", "KEEP", "Seconds", "DEFAULT_URL"]

T = TypeVar("T")

log = logging.getLogger("floodgate")

#: Where ``floodgate serve`` listens by default.
DEFAULT_URL = "http://127.0.0.1:8750"

#: The longest wait a limiter can have (``max_wait_ms`` is capped at one hour): an acquire
#: without an explicit ``wait`` may be held this long.
MAX_SERVER_WAIT = 3600.0


def _heartbeat_interval(heartbeat: Union[bool, float]) -> Optional[float]:
    """The heartbeat interval ``acquire`` was asked for: ``None`` for ``True`` (lease/3) or
    off (``False``, ``0``), else a positive number of seconds. ``ValueError`` naming
    ``heartbeat`` otherwise."""
    if heartbeat is True or heartbeat is False:
        return None
    if isinstance(heartbeat, (int, float)) and not math.isnan(heartbeat):
        if heartbeat == 0 or (heartbeat > 0 and not math.isinf(heartbeat)):
            return float(heartbeat) or None
    raise ValueError(
        "heartbeat: True, False or a positive number of seconds, not {!r}".format(heartbeat)
    )


class Floodgate(_Transport):
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
        bookkeeping_deadline: seconds a release, or a feedback report of :meth:`report`, may
            take in all, retries included (default 5): the end of a ``with`` block or of a
            Celery task does not wait ``(retries + 1) * timeout`` for a server that stopped
            answering. An undelivered release costs capacity until the lease ends, never
            safety (the server reclaims the permit then).
        acquire_retry_window: seconds an acquire goes on retrying (past ``retries``, with the
            same ``request_id``) once an attempt may have been granted and its answer lost (the
            request was sent, the connection broke): long enough for a server that crashed or
            is being redeployed to come back and answer with that grant (default 30; 0: only
            ``retries``). Otherwise the grant would stay held, unused, until its lease ended.
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
        bookkeeping_deadline: float = 5.0,
        acquire_retry_window: float = 30.0,
    ) -> None:
        if ca_file:
            if ssl_context is not None:
                raise ValueError("give ssl_context or ca_file, not both")
            ssl_context = ssl.create_default_context()
            ssl_context.load_verify_locations(cafile=ca_file)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be http://HOST[:PORT] or https://..., not {!r}".format(url))
        # Checked here, naming the parameter: found at the first request (or the first retry)
        # they would surface as an OverflowError or a negative sleep from deep inside a call.
        self.timeout = _setting(timeout, "timeout", positive=True)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError("retries: a whole number of 0 or more, not {!r}".format(retries))
        self.backoff = _setting(backoff, "backoff", positive=False)
        self.backoff_max = _setting(backoff_max, "backoff_max", positive=False)
        # The bound on a release's or a report's whole time (see the docstring).
        self.bookkeeping_deadline = _setting(
            bookkeeping_deadline, "bookkeeping_deadline", positive=True)
        self.acquire_retry_window = _setting(
            acquire_retry_window, "acquire_retry_window", positive=False)
        if token is not None and not isinstance(token, str):
            raise TypeError("token: a string or None, not {!r}".format(token))
        if holder is not None and not isinstance(holder, str):
            raise TypeError("holder: a string or None, not {!r}".format(holder))
        self.url = url.rstrip("/")
        self.token = token or None
        self.retries = retries
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
            Unavailable: the server could not be reached (after ``retries``, and after
                ``acquire_retry_window`` once an attempt may have been granted).
        """
        # Checked before the request: a bad value found after the grant would leave the permit
        # held, out of the caller's reach, until its lease ended.
        interval = _heartbeat_interval(heartbeat)
        body: Dict[str, Any] = {"permits": permits}
        if wait is not None:
            body["wait_ms"] = _ms(wait, "wait_ms")
        if lease is not None:
            body["lease_ms"] = _ms(lease, "lease_ms")
        if interval is not None and heartbeat and lease is not None and interval >= _seconds(lease):
            raise ValueError(
                "heartbeat: an interval of {} s is not shorter than the lease of {} s: every "
                "permit would be lost before its first extend".format(interval, _seconds(lease))
            )
        label = self.holder if holder is None else holder
        if label:
            body["holder"] = label
        if key is not None:
            body["key"] = key
        # The long poll is answered at the latest when the wait ends: give the read that long
        # plus the ordinary timeout.
        # (The server caps a wait to its max_wait, at most MAX_SERVER_WAIT: so does the read,
        # which an absurd wait would otherwise overflow.)
        held_for = MAX_SERVER_WAIT if wait is None else min(max(0.0, _seconds(wait)),
                                                            MAX_SERVER_WAIT)
        # One id per logical acquire, resent unchanged when a connection error makes the
        # request go again: the server answers the repeat with the same grant (or the same
        # wait), never a second permit.
        body["request_id"] = uuid.uuid4().hex
        started = time.monotonic()
        attempts: List[float] = []
        data = self._request(
            "POST",
            "/v1/limiters/{}/acquire".format(_quote(name)),
            body,
            timeout=held_for + self.timeout,
            retry_window=self.acquire_retry_window,
            attempts=attempts,
        )
        permit = Permit(self, name, data, requested_at=started, key=key,
                        asked_lease=body["lease_ms"] / 1000.0 if lease is not None else None,
                        answered_attempt_at=attempts[-1] if attempts else None)
        if heartbeat:
            try:
                permit.start_heartbeat(interval, on_lost=on_lost)
            except BaseException:
                # E.g. no thread could be started: the caller never gets the permit, so give
                # it back rather than leave it held until its lease ends.
                try:
                    permit.release()
                except FloodgateError as e:
                    log.warning("floodgate: release of %s failed: %s", permit.permit_id, e)
                raise
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
        self,
        permit_id: str,
        lease: Optional[Seconds] = None,
        permits: Optional[int] = None,
        key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Extends a permit by id (see :meth:`Permit.extend`); ``permits`` is its size and
        ``key`` a keyed limiter's permit's key, which let a server that lost its state re-adopt
        it (under its key). Raises :class:`PermitLost`."""
        return self._extend(permit_id, lease, permits=permits, key=key)

    def release(self, permit_id: str) -> bool:
        """Releases a permit by id; ``False`` when it was not held. Idempotent."""
        return self._release(permit_id)[0]

    def _release(self, permit_id: str, deadline: Optional[float] = None) -> Tuple[bool, bool]:
        """Releases by id: (whether the answer said released, whether an earlier attempt
        broke after it may have reached the server: then ``released: false`` may be that
        attempt's doing, its answer lost). Takes at most ``deadline`` seconds in all (default
        :attr:`bookkeeping_deadline`)."""
        broken: List[BaseException] = []
        data = self._request(
            "POST", "/v1/permits/{}/release".format(_quote(permit_id, "permit_id")),
            broken=broken,
            deadline=self.bookkeeping_deadline if deadline is None else deadline,
        )
        return bool(data.get("released")), bool(broken)

    def _extend(
        self,
        permit_id: str,
        lease: Optional[Seconds],
        timeout: Optional[float] = None,
        retries: Optional[int] = None,
        permits: Optional[int] = None,
        key: Optional[str] = None,
    ) -> Dict[str, Any]:
        body: Dict[str, Any] = {}
        if lease is not None:
            body["lease_ms"] = _ms(lease, "lease_ms")
        if permits is not None:
            body["permits"] = permits
        if key is not None:
            body["key"] = key
        return self._request(
            "POST",
            "/v1/permits/{}/extend".format(_quote(permit_id, "permit_id")),
            body,
            timeout=timeout,
            retries=retries,
        )

    # -- fan-out scheduling and feedback (issue 5) -----------------------------------------

    def schedule(self, name: str, count: int, *, key: Optional[str] = None) -> List[float]:
        """Start offsets, in seconds, for a fan-out of ``count`` tasks on limiter ``name``:
        give task *i* a countdown of ``offsets[i]`` so they do not all arrive at once. With
        ``key`` (a keyed limiter), the offsets satisfy the total's and the key's rate.

        Raises :class:`TooManyKeys` (with ``retry_after``) for a new ``key`` beyond the
        limiter's ``max_keys``, :class:`NotFound` (code ``not_found``) against a server without
        the endpoint.
        """
        return self.reserve(name, count, key=key).offsets

    def reserve(self, name: str, count: int, *, key: Optional[str] = None) -> Reservation:
        """Like :meth:`schedule`, and also returns the reservation's id, so that a producer
        that enqueues fewer than ``count`` children can give the rest back
        (:meth:`unschedule`). With ``key``, giving back returns the key's and the total's
        tokens together."""
        body: Dict[str, Any] = {"count": count}
        if key is not None:
            body["key"] = key
        # Not sent again once written: the server has no idempotency key for a schedule, and a
        # second one would reserve the tokens twice.
        data = self._request(
            "POST", "/v1/limiters/{}/schedule".format(_quote(name)), body, idempotent=False
        )
        offsets = [float(ms) / 1000.0 for ms in data["offsets_ms"]]
        reservation = data.get("reservation")
        return Reservation(offsets=offsets, id=None if reservation is None else int(reservation))

    def unschedule(self, name: str, reservation: int, count: int) -> int:
        """Gives back ``count`` tokens of ``reservation`` whose children were not enqueued.
        Returns how many went back: only the reservation's last, not yet started tokens, and
        only while it is the limiter's latest (a keyed limiter's: its key's latest; docs/api.md
        says why); 0 otherwise."""
        data = self._request(
            "POST",
            "/v1/limiters/{}/unschedule".format(_quote(name)),
            {"reservation": reservation, "count": count},
            idempotent=False,  # a second one could give back tokens twice
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
        return self._feedback(name, outcome, latency, None)

    def _feedback(
        self, name: str, outcome: str, latency: Optional[Seconds], deadline: Optional[float]
    ) -> Optional[int]:
        body: Dict[str, Any] = {"outcome": outcome}
        if latency is not None:
            body["latency_ms"] = _ms(latency, "latency_ms")
        # Not sent again once written: a report counted twice would move the limit twice.
        data = self._request(
            "POST", "/v1/limiters/{}/feedback".format(_quote(name)), body,
            deadline=deadline, idempotent=False,
        )
        limit = data.get("limit")
        return int(limit) if isinstance(limit, int) else None

    def report(self, name: str, outcome: str, latency: Optional[Seconds] = None) -> None:
        """:meth:`feedback` that never raises: errors are logged, and a server without the
        endpoint (404 ``not_found``) is not asked again for a minute. For use on the hot path
        of every call, where feedback must not fail the work: it takes at most
        :attr:`bookkeeping_deadline` seconds in all."""
        now = time.monotonic()
        if self._no_feedback_until > now:
            return
        try:
            self._feedback(name, outcome, latency, self.bookkeeping_deadline)
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
        backoff: Backoff = Backoff(),  # noqa: B008 (a frozen dataclass: safe to share)
        feedback: bool = True,
    ) -> T:
        """Runs ``fn(permit)`` under a permit and reports the outcome. When ``fn`` raises one of
        ``throttle_exceptions`` (the backend said "too much"), reports ``throttled``, releases
        the permit, backs off (full jitter; an exception's ``retry_after`` is honoured) and
        tries again with a new permit, up to ``backoff.max_attempts`` attempts in all.
        Floodgate's own errors raised in ``fn`` are not throttles unless
        ``throttle_exceptions`` names their Floodgate class (``Exception`` does not take them).
        Never a throttle, whatever is named (naming one is a ``TypeError``): ``PermitLost``,
        ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``, Celery's time limits and its
        ``Retry``, ``Ignore`` and ``Reject``.

        A wait that ends without a permit raises :class:`WaitTimeout` as :meth:`acquire` does:
        re-enqueue the work rather than sleeping here.
        """
        _check_throttles(throttle_exceptions)
        throttles = tuple(throttle_exceptions)
        attempt = 0
        while True:
            with self.permit(name, wait=wait, lease=lease, permits=permits,
                             heartbeat=heartbeat) as p:
                started = time.monotonic()
                try:
                    result = fn(p)
                except BaseException as e:
                    if not _is_throttle(e, throttles):
                        if feedback and isinstance(e, Exception):
                            self.report(name, "error", time.monotonic() - started)
                        raise
                    failure: BaseException = e
                    # Reported before the release (the block's end), as ok and error are: the
                    # limiter's in-use then counts this call.
                    if feedback:
                        self.report(name, "throttled", time.monotonic() - started)
                else:
                    if feedback:
                        self.report(name, "ok", time.monotonic() - started)
                    return result
            # The permit is released before the backoff: nobody holds a slot while sleeping.
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
        path = "/v1/limiters/{}/keys/{}".format(_quote(name), _quote(key, "key"))
        return self._request("PUT", path, body)

    def delete_key(self, name: str, key: str) -> bool:
        """Removes keyed limiter ``name``'s override for ``key``."""
        path = "/v1/limiters/{}/keys/{}".format(_quote(name), _quote(key, "key"))
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
