"""Celery integration: a decorator that runs a bound task's body under a Floodgate permit.

    from celery import Celery
    from floodgate.celery import limited

    app = Celery(...)

    @app.task(bind=True)
    @limited("snuba-spike-projections", wait=5, lease=300,
             throttle_exceptions=(RateLimitExceeded,))
    def run_spike_projection(self, org_id, project_id):
        ...

What it does on each run of the task:

- acquires a permit of the limiter (waiting up to ``wait`` seconds in the server's queue), with
  a heartbeat that extends the lease while the body runs; releases it when the body ends.
- when the wait ends without a permit (``WaitTimeout``, ``QueueFull``), calls
  ``self.retry(countdown=retry_after)``: the task goes back to the broker with the server's
  hint and the worker is free for other work. Such retries are unbounded by default
  (``max_retries=None``): the work is never dropped because the backend was busy.
- when the body raises one of ``throttle_exceptions`` (the backend said "too much"), reports
  ``throttled`` feedback to the server and retries with exponential backoff and full jitter
  (or after the exception's own ``retry_after``, the backend's hint, when it has one),
  up to ``throttle_max_retries`` times (never for Celery's own control flow or time limits,
  a lost permit, or Python's exits, whatever is named).
- when the acquire cannot be served right now, the task is never dropped: a server that cannot
  be reached, answers a 5xx (503 ``store_unavailable``, ``shutting_down``, a proxy's 502/504,
  a 500) or 404
  ``unknown_limiter`` (a limiter not created yet, or lost with the store's state and not yet
  re-created) makes the task retry with backoff (``unavailable_backoff`` doubling to
  ``unavailable_backoff_max``, full jitter), up to ``unavailable_max_retries`` (unbounded by
  default), unless ``on_unavailable`` says otherwise.
- reports ``ok`` (with the body's latency) or ``error`` feedback otherwise, before releasing the
  permit (so the limiter's in-use counts the reporting call). A server without the feedback
  endpoint (404 ``not_found``) is remembered and not asked again for a minute. An exception
  landing in that report or release (Celery's ``SoftTimeLimitExceeded``) never leaves the
  permit held: the release is sent again, and a time limit there keeps the body's outcome.
- logs a warning when the permit was lost while the body ran, whatever the body did.

The two kinds of retry are counted separately, in the task message's headers
(``floodgate_wait_retries``, ``floodgate_throttle_retries``, ``floodgate_unavailable_retries``),
so a task that waited its turn many times still gets all its throttle retries. Celery's own
``max_retries`` of the task does not apply to them, and they leave it as it was; Celery still
counts them in ``self.request.retries`` (its retry mechanism does), which a body's own
``self.retry`` compares with ``max_retries``: give such a call a ``max_retries`` of its own.

Celery is an optional dependency: ``pip install 'floodgate[celery]'``.
"""

import functools
import logging
import math
import os
import random
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union, cast

try:
    from celery import Task
    from celery.exceptions import Ignore, Reject, Retry
    from celery.local import Proxy
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "floodgate.celery needs Celery: pip install 'floodgate[celery]'"
    ) from e

from .backoff import _check_throttles, _is_throttle, _time_limits, retry_after_of
from .client import Floodgate, Permit, Seconds, _heartbeat_interval
from .errors import (
    FloodgateError,
    NoPermit,
    NotFound,
    PermitLost,
    ServerError,
    Unavailable,
    UnknownLimiter,
)
from .types import _ms, _seconds

__all__ = ["limited", "paced_fan_out", "current_permit", "full_jitter", "client_from_env"]

log = logging.getLogger("floodgate.celery")

F = TypeVar("F", bound=Callable[..., Any])

WAIT_RETRIES = "floodgate_wait_retries"
THROTTLE_RETRIES = "floodgate_throttle_retries"
UNAVAILABLE_RETRIES = "floodgate_unavailable_retries"

# Celery reads ``max_retries=None`` as "the task's default" (3): this is how "no limit" is said.
_UNBOUNDED = 2**62

# Celery's control flow raised by the body (its own ``self.retry``...): never an outcome, so
# never a throttle either, whatever ``throttle_exceptions`` names.
_CONTROL_FLOW = (Retry, Ignore, Reject)

_local = threading.local()
_clients: Dict[int, Floodgate] = {}
_clients_lock = threading.Lock()


def client_from_env() -> Floodgate:
    """This process's client from ``FLOODGATE_URL`` / ``FLOODGATE_TOKEN``, made on first use
    (after the prefork pool has forked)."""
    pid = os.getpid()
    with _clients_lock:
        fg = _clients.get(pid)
        if fg is None:
            fg = Floodgate.from_env()
            _clients.clear()
            _clients[pid] = fg
        return fg


def current_permit() -> Optional[Permit]:
    """The permit the running ``@limited`` task body holds (for its fencing token and
    :meth:`Permit.check`), or ``None`` outside one."""
    return cast(Optional[Permit], getattr(_local, "permit", None))


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2**attempt)]``."""
    return random.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 62))))


def _count(request: Any, header: str) -> int:
    headers = getattr(request, "headers", None) or {}
    value = headers.get(header) if isinstance(headers, dict) else None
    if value is None:
        value = getattr(request, header, None)
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _headers(request: Any, header: str, value: int) -> Dict[str, Any]:
    headers = getattr(request, "headers", None)
    merged: Dict[str, Any] = dict(headers) if isinstance(headers, dict) else {}
    for key in (WAIT_RETRIES, THROTTLE_RETRIES, UNAVAILABLE_RETRIES):
        if key not in merged:
            current = getattr(request, key, None)
            if current is not None:
                merged[key] = current
    merged[header] = value
    return merged


def _holder(task: Any) -> str:
    request = task.request
    label = "{}/{}/{}".format(
        getattr(request, "hostname", None) or "celery",
        getattr(task, "name", "task"),
        getattr(request, "id", None) or "-",
    )
    return label[:256]


def paced_fan_out(
    signatures: Sequence[Any],
    limiter: str,
    client: Optional[Floodgate] = None,
) -> List[Any]:
    """Enqueues every signature now, each with the countdown the server's schedule of
    ``limiter`` (a rate limiter) gives it, instead of sleeping between batches in a worker::

        paced_fan_out([calculate_for_org.s(org.id) for org in orgs], "spike-fanout")

    The children should not acquire from the same limiter again (the schedule already took
    their tokens). Against a server without the schedule endpoint (404 ``not_found``) they are
    enqueued at once; other errors (no such limiter, a limiter without a rate) are raised. If
    enqueueing fails half-way, the tokens of the children not enqueued are given back
    (:meth:`Floodgate.unschedule`) before the error is raised; so are all of them when the
    server answers fewer or more start offsets than asked for (``ServerError``
    ``bad_schedule``, nothing enqueued).

    Returns the ``AsyncResult`` of each.
    """
    fg = client if client is not None else client_from_env()
    reservation: Optional[int] = None
    try:
        if signatures:
            reserved = fg.reserve(limiter, len(signatures))
            offsets, reservation = reserved.offsets, reserved.id
            if len(offsets) != len(signatures):
                # zip() below would skip the signatures without an offset: work silently
                # dropped. A server answers one offset per token asked for. Nothing is
                # enqueued, so whatever it reserved goes back (it gives back at most that).
                if reservation is not None:
                    _give_back(fg, limiter, reservation, len(signatures))
                raise ServerError(
                    "bad_schedule",
                    "asked {} for {} start offsets, got {}".format(
                        limiter, len(signatures), len(offsets)),
                )
        else:
            offsets = []
    except NotFound as e:
        if e.code != "not_found":
            raise
        log.warning("floodgate: %s has no schedule endpoint; enqueueing %d tasks at once",
                    fg.url, len(signatures))
        offsets = [0.0] * len(signatures)
    results: List[Any] = []
    try:
        for sig, offset in zip(signatures, offsets):
            results.append(sig.apply_async(countdown=offset or None))
    except BaseException:
        # The broker failed half-way: give back the tokens of the children not enqueued, so
        # they do not hold up every later acquire (best effort: the error is what matters).
        unused = len(signatures) - len(results)
        if reservation is not None and unused > 0:
            _give_back(fg, limiter, reservation, unused)
        raise
    return results


def _give_back(fg: Floodgate, limiter: str, reservation: int, unused: int) -> None:
    """Best effort: the error that made the tokens unused is what matters."""
    try:
        fg.unschedule(limiter, reservation, unused)
    except FloodgateError as e:
        log.warning("floodgate: could not give back %d reserved tokens of %s: %s",
                    unused, limiter, e)


def _retry(task: Any, **kwargs: Any) -> BaseException:
    """``task.retry(**kwargs)`` past the task's own ``max_retries`` (the decorator bounds its
    retries by its headers), without what that leaves behind: ``retry(max_retries=N)`` sets
    ``override_max_retries`` on the task object, which every later run of the task in this
    worker process shares, and ``autoretry_for`` would then retry the body's own exceptions
    without bound. The attribute is put back as it was. (``retry`` raises; the return is for
    ``raise _retry(...)``.)"""
    missing = object()
    previous = vars(task).get("override_max_retries", missing)
    try:
        return task.retry(max_retries=_UNBOUNDED, **kwargs)  # type: ignore[no-any-return]
    finally:
        if previous is missing:
            vars(task).pop("override_max_retries", None)
        else:
            task.override_max_retries = previous


def _release(permit: Permit) -> None:
    try:
        permit.release()
    except FloodgateError as e:
        log.warning("floodgate: release of %s failed (the lease reclaims it): %s",
                    permit.permit_id, e)


def _report_and_release(fg: Floodgate, limiter: str, permit: Permit, outcome: Optional[str],
                        latency: float, task: Any, ended: str) -> None:
    """The end of a run: reports ``outcome`` (``None``: nothing), releases, and logs a loss of
    the permit (``ended`` says how the body ended; empty: the body's error already told it).

    An exception landing meanwhile (Celery's ``SoftTimeLimitExceeded`` is raised by a signal
    handler, anywhere) does not leave the release unsent: it is sent again. A Celery time
    limit is then logged and the body's outcome stands (its work is done; failing it would
    lose its result or have it redone); any other exception is raised after the release."""
    try:
        if outcome is not None:
            fg.report(limiter, outcome, latency)
        _release(permit)
    except BaseException as e:
        _release(permit)  # sends it again (an interrupted release is not done)
        if not isinstance(e, _time_limits()):
            raise
        log.warning("floodgate: %s[%s]: %r landed while reporting and releasing permit %s "
                    "after the body ended; the permit was released and the body's outcome "
                    "stands", getattr(task, "name", "task"), task.request.id, e,
                    permit.permit_id)
    if ended and permit.lost:
        log.warning("floodgate: %s[%s] %s after its permit %s was lost",
                    getattr(task, "name", "task"), task.request.id, ended, permit.permit_id)


def _check_arguments(
    *,
    name: Any,
    key: Any,
    wait: Seconds,
    lease: Optional[Seconds],
    permits: int,
    heartbeat: Union[bool, float],
    throttle_exceptions: Tuple[Type[BaseException], ...],
    counts: Dict[str, Optional[int]],
    durations: Dict[str, Optional[float]],
) -> None:
    """Refuses ``@limited``'s bad arguments when the task is decorated (at import), naming
    the parameter: found at run time they would fail every run of the task instead."""
    if not (isinstance(name, str) or callable(name)):
        raise TypeError("name: a limiter name or a function returning one, not {!r}"
                        .format(name))
    if not (key is None or isinstance(key, str) or callable(key)):
        raise TypeError("key: None, a key or a function returning one, not {!r}".format(key))
    if _ms(wait, "wait") < 0:
        raise ValueError("wait: 0 or more seconds, not {!r}".format(wait))
    if lease is not None and _ms(lease, "lease") < 1:
        raise ValueError("lease: at least 1 ms, not {!r}".format(lease))
    interval = _heartbeat_interval(heartbeat)
    if interval is not None and heartbeat and lease is not None and interval >= _seconds(lease):
        raise ValueError("heartbeat: an interval of {} s is not shorter than the lease of {} s"
                         .format(interval, _seconds(lease)))
    if isinstance(permits, bool) or not isinstance(permits, int) or permits < 1:
        raise ValueError("permits: a whole number of at least 1, not {!r}".format(permits))
    _check_throttles(throttle_exceptions, never=_CONTROL_FLOW)
    for field, count in counts.items():
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 0):
            raise ValueError("{}: None or a whole number of 0 or more, not {!r}"
                             .format(field, count))
    for field, seconds in durations.items():
        if seconds is None:
            continue
        if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                or not math.isfinite(seconds) or seconds < 0):
            raise ValueError("{}: a finite number of seconds of 0 or more, not {!r}"
                             .format(field, seconds))


def limited(
    name: Union[str, Callable[..., str]],
    *,
    key: Union[str, Callable[..., str], None] = None,
    wait: Seconds = 5.0,
    lease: Optional[Seconds] = 300.0,
    permits: int = 1,
    heartbeat: Union[bool, float] = True,
    throttle_exceptions: Tuple[Type[BaseException], ...] = (),
    client: Union[Floodgate, Callable[[], Floodgate], None] = None,
    max_retries: Optional[int] = None,
    throttle_max_retries: Optional[int] = 10,
    backoff: float = 1.0,
    backoff_max: float = 300.0,
    retry_jitter: float = 0.1,
    max_countdown: Optional[float] = None,
    feedback: bool = True,
    on_unavailable: str = "retry",
    unavailable_max_retries: Optional[int] = None,
    unavailable_backoff: Optional[float] = None,
    unavailable_backoff_max: Optional[float] = None,
) -> Callable[[F], F]:
    """Runs a bound Celery task's body under a permit of limiter ``name``. Put it under
    ``@app.task(bind=True)``.

    Args:
        name: the limiter, or a function of the task's arguments returning its name.
        key: for a keyed limiter (docs/keyed.md), a function of the task's arguments returning
            the key (``key=lambda org_id, project_id: str(org_id)``), or a fixed key: each
            key's tasks queue FIFO and keys share the limiter's total fairly, so one
            organization's large batch does not hold back the others.
        wait: seconds the worker may wait in the server's queue before the task is retried
            later instead (keep it short: a waiting worker does nothing else).
        lease: the permit's lease in seconds (``None``: the limiter's); the heartbeat keeps it
            alive while the body runs, so it only bounds how long a dead worker holds a slot.
        permits: permits per run.
        heartbeat: as :meth:`Floodgate.acquire` (``True``: extend every lease/3).
        throttle_exceptions: exceptions meaning "the backend is overloaded" (e.g. Snuba's
            ``RateLimitExceeded``): reported as ``throttled`` and retried with backoff. Never
            taken for one, whatever the classes named (``Exception``, ``BaseException``
            included): Celery's ``Retry``, ``Ignore`` and ``Reject`` (the body's own control
            flow, passed on), ``PermitLost`` (fails the task), ``SystemExit``,
            ``KeyboardInterrupt`` and ``GeneratorExit`` (passed on), and Celery's
            ``SoftTimeLimitExceeded`` and ``TimeLimitExceeded`` (the task's time ran out: fails
            the task, reported as ``error``); naming them is a ``TypeError``. Floodgate's other
            errors (e.g. a nested acquire's ``WaitTimeout``) only when a Floodgate class of
            theirs is named.
        client: a :class:`Floodgate`, a function returning one, or ``None`` for one from
            ``FLOODGATE_URL`` / ``FLOODGATE_TOKEN``.
        max_retries: retries after a wait that ended without a permit; ``None`` is unbounded
            (the task is re-enqueued until it runs). Past it, the ``WaitTimeout`` is raised.
        throttle_max_retries: retries after a throttle exception; ``None`` is unbounded. Past
            it, the exception is raised.
        backoff, backoff_max: the throttle retry's countdown is uniform in
            ``[0, min(backoff_max, backoff * 2**n)]`` after the n-th throttle (full jitter);
            when the exception has a ``retry_after`` (seconds, a finite number, a day at
            most: the backend's hint), that long plus ``U(0, backoff)`` instead, as
            :meth:`Floodgate.call`.
        retry_jitter: a wait-timeout retry comes back after ``retry_after * (1 + U(0, j))``,
            so re-enqueued tasks do not all return at once. A 429 without a hint (a proxy's)
            backs off as an unavailable server does instead.
        max_countdown: cap on that countdown (the server's hint is the typical hold times the
            rounds of the limit queued ahead: long when holds are long); ``None``: no cap.
        feedback: report ``ok`` / ``throttled`` / ``error`` with the body's latency.
        on_unavailable: when the Floodgate server cannot be reached or answers a 5xx (503
            ``store_unavailable``, ``shutting_down``, a 500, a proxy's 502/504): ``"retry"`` (retry the task with
            backoff; unbounded unless ``unavailable_max_retries``), ``"run"`` (fail open: run
            the body without a permit, logged; its throttles are still retried) or ``"raise"``. A 404 ``unknown_limiter`` is
            retried the same way under ``"retry"`` and ``"run"`` (a missing limiter never runs
            the body unlimited) and raised under ``"raise"``.
        unavailable_max_retries: the bound on those retries (counted in the
            ``floodgate_unavailable_retries`` header); ``None`` is unbounded. Past it, the
            error is raised.
        unavailable_backoff, unavailable_backoff_max: their countdown is uniform in
            ``[0, min(max, base * 2**n)]`` after the n-th (default: ``backoff`` and
            ``backoff_max``).
    """
    if on_unavailable not in ("retry", "run", "raise"):
        raise ValueError("on_unavailable must be 'retry', 'run' or 'raise'")
    if not (client is None or isinstance(client, Floodgate) or callable(client)):
        # E.g. a URL: every run would fail with "'str' object is not callable".
        raise TypeError("client: a Floodgate, a function returning one, or None, not {!r}"
                        .format(client))
    _check_arguments(
        name=name, key=key, wait=wait, lease=lease, permits=permits, heartbeat=heartbeat,
        throttle_exceptions=throttle_exceptions,
        counts={"max_retries": max_retries, "throttle_max_retries": throttle_max_retries,
                "unavailable_max_retries": unavailable_max_retries},
        durations={"backoff": backoff, "backoff_max": backoff_max,
                   "retry_jitter": retry_jitter, "max_countdown": max_countdown,
                   "unavailable_backoff": unavailable_backoff,
                   "unavailable_backoff_max": unavailable_backoff_max},
    )
    throttles = tuple(throttle_exceptions)
    retry_base = backoff if unavailable_backoff is None else float(unavailable_backoff)
    retry_cap = backoff_max if unavailable_backoff_max is None else float(unavailable_backoff_max)

    def resolve_client() -> Floodgate:
        if client is None:
            return client_from_env()
        if isinstance(client, Floodgate):
            return client
        return client()

    def retry_throttled(task: Any, e: BaseException) -> None:
        """Retries a run the backend throttled with backoff (Celery's retry raises), unless
        past ``throttle_max_retries``: then it returns and the caller raises ``e``."""
        request = task.request
        n = _count(request, THROTTLE_RETRIES)
        if throttle_max_retries is not None and n >= throttle_max_retries:
            return
        hint = retry_after_of(e)
        if hint is not None:
            # The backend said how long (e.g. a Retry-After carried on the exception): that
            # long plus jitter up to ``backoff``, as fg.call and floodgate.retry do.
            countdown = max(0.0, hint) + random.uniform(0.0, backoff)
        else:
            countdown = full_jitter(n, backoff, backoff_max)
        log.info("floodgate: %s[%s] throttled by the backend (%r); retry in %.3f s",
                 task.name, request.id, e, countdown)
        raise _retry(
            task,
            countdown=countdown,
            exc=e,
            headers=_headers(request, THROTTLE_RETRIES, n + 1),
        ) from e

    def decorator(fun: F) -> F:
        # type(), not isinstance(): a lazy app's task is a Proxy, and isinstance() would
        # evaluate it (creating the task) at import.
        if issubclass(type(fun), (Task, Proxy)):
            # Above @app.task the registered task is the undecorated one: the worker would
            # run its body without a permit, and nothing would say so.
            raise TypeError("limited: put @limited under @app.task(bind=True), not above it "
                            "(it got the task {!r})".format(fun))

        @functools.wraps(fun)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not (hasattr(self, "request") and hasattr(self, "retry")):
                # Not bound: `self` is the task's first argument, and the run would fail
                # with an AttributeError naming nothing (or use it as the task).
                raise TypeError("limited: the task must be bound: @app.task(bind=True), "
                                "then @limited (its first argument was {!r})".format(self))
            fg = resolve_client()
            limiter = name(*args, **kwargs) if callable(name) else name
            limiter_key = key(*args, **kwargs) if callable(key) else key
            request = self.request
            try:
                # The heartbeat starts below, not in acquire: an exception that lands between
                # acquire's return and the `try` that releases (Celery's SoftTimeLimitExceeded
                # is raised from a signal handler, anywhere) then leaves a lease that ends, as a
                # crashed worker's does, not one a heartbeat keeps alive until the process exits.
                permit = fg.acquire(
                    limiter,
                    permits=permits,
                    wait=wait,
                    lease=lease,
                    holder=_holder(self),
                    heartbeat=False,
                    key=limiter_key,
                )
            except NoPermit as e:
                n = _count(request, WAIT_RETRIES)
                if max_retries is not None and n >= max_retries:
                    raise
                if e.retry_after > 0:
                    countdown = e.retry_after * (1.0 + random.uniform(0.0, retry_jitter))
                else:
                    # No hint (a bare 429, e.g. a proxy's): back off rather than come straight
                    # back through the broker, again and again.
                    countdown = full_jitter(n, retry_base, retry_cap)
                if max_countdown is not None:
                    countdown = min(countdown, max_countdown)
                log.info("floodgate: %s[%s] got no permit of %s (%s); retry in %.3f s",
                         self.name, request.id, limiter, e.code, countdown)
                raise _retry(
                    self,
                    countdown=countdown,
                    exc=e,
                    headers=_headers(request, WAIT_RETRIES, n + 1),
                ) from e
            except (Unavailable, UnknownLimiter, ServerError) as e:
                # A 5xx of the limiter service (a 500 included: a server-side failure, not
                # the task's fault) is retried later like an unreachable server; a 4xx naming
                # a bad request is not caught here and fails the task.
                if on_unavailable == "raise":
                    raise
                if on_unavailable == "run" and not isinstance(e, UnknownLimiter):
                    log.warning("floodgate: %s unreachable (%s); running %s without a permit",
                                fg.url, e, self.name)
                    try:
                        return fun(self, *args, **kwargs)
                    except BaseException as body_error:
                        # Unlimited, but the backend's "too much" is still retried (5).
                        if (not isinstance(body_error, _CONTROL_FLOW)
                                and _is_throttle(body_error, throttles)):
                            retry_throttled(self, body_error)
                        raise
                n = _count(request, UNAVAILABLE_RETRIES)
                if unavailable_max_retries is not None and n >= unavailable_max_retries:
                    raise
                countdown = full_jitter(n, retry_base, retry_cap)
                hint = getattr(e, "retry_after", None)
                if isinstance(hint, (int, float)):
                    countdown = max(countdown, float(hint))  # a 503's Retry-After
                log.warning("floodgate: %s cannot grant %s now (%s); retry %s in %.3f s",
                            fg.url, limiter, e, self.name, countdown)
                raise _retry(
                    self,
                    countdown=countdown,
                    exc=e,
                    headers=_headers(request, UNAVAILABLE_RETRIES, n + 1),
                ) from e

            previous = getattr(_local, "permit", None)
            started = time.monotonic()
            body_ran = False

            def finish(outcome: Optional[str], ended: str) -> None:
                # Reported while the permit is still held: the limiter's in-use then counts
                # this call, as a gradient limit's ceiling (and its growth guard) expects.
                _report_and_release(fg, limiter, permit, outcome if feedback else None,
                                    time.monotonic() - started, self, ended)

            try:
                # First in the try whose `finally` releases: from the moment a heartbeat keeps
                # the permit alive, every way out gives it back.
                if heartbeat:
                    permit.start_heartbeat(_heartbeat_interval(heartbeat))
                _local.permit = permit
                body_ran = True
                result = fun(self, *args, **kwargs)
            except _CONTROL_FLOW as e:
                # The body's own control flow (e.g. its own self.retry): not an outcome.
                finish(None, "ended with {!r}".format(e))
                raise
            except BaseException as e:
                # A heartbeat that could not start is no backend's answer: the body never ran.
                if not (body_ran and _is_throttle(e, throttles)):
                    # (Not when the heartbeat could not start: the backend was never called.)
                    outcome = "error" if body_ran and isinstance(e, Exception) else None
                    # A PermitLost the body raised is the loss told already.
                    finish(outcome, "" if isinstance(e, PermitLost) else "raised {!r}".format(e))
                    raise
                finish("throttled", "was throttled ({!r})".format(e))
                retry_throttled(self, e)
                raise
            else:
                finish("ok", "finished")
                return result
            finally:
                _local.permit = previous
                _release(permit)  # idempotent: covers BaseException (e.g. SystemExit)

        return cast(F, wrapper)

    return decorator
