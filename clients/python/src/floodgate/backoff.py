"""Retrying a throttled call (``floodgate.retry``, ``floodgate.Backoff``): exponential backoff with full jitter, a cap, a number of attempts,
and the server's (or backend's) retry-after hint honoured. The same policy as the Rust
library's ``floodgate::retry``.

Use it around the protected call (the query that answered RateLimitExceeded or 429), without
holding a permit while sleeping: :meth:`floodgate.Floodgate.call` releases, reports
``throttled``, backs off and acquires again. In a task system prefer re-enqueueing the task with
a countdown over sleeping in a worker (:mod:`floodgate.celery` does).
"""

import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Type, TypeVar, Union

from .errors import FloodgateError, PermitLost
from .transport import _sane_hint

__all__ = ["Backoff", "retry", "retry_after_of"]

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """The retry policy.

    Attributes:
        base: the first backoff ceiling in seconds; after failed attempt n (0-based) the delay
            is uniform in ``[0, min(cap, base * 2**n)]`` (full jitter).
        cap: the largest ceiling, in seconds.
        max_attempts: attempts in all, the first included.
    """

    base: float = 0.1
    cap: float = 30.0
    max_attempts: int = 5

    def __post_init__(self) -> None:
        # Refused when made, naming the field: found after a throttle they would raise from
        # time.sleep ("sleep length must be non-negative") in place of the throttle itself.
        for field in ("base", "cap"):
            value = getattr(self, field)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise ValueError("{}: a finite number of seconds of 0 or more, not {!r}"
                                 .format(field, value))
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError("max_attempts: a whole number of at least 1, not {!r}"
                             .format(attempts))

    def delay(
        self, attempt: int, retry_after: Optional[float] = None, unit: Optional[float] = None
    ) -> float:
        """The delay after failed attempt ``attempt`` (0-based). With a ``retry_after`` hint:
        that long plus jitter up to ``base``, so clients told the same time do not return
        together. ``unit`` (in [0, 1]) replaces the random draw, for tests."""
        u = random.random() if unit is None else min(1.0, max(0.0, unit))
        if retry_after is not None:
            return max(0.0, retry_after) + self.base * u
        ceiling = min(self.cap, self.base * (2.0 ** min(attempt, 62)))
        return ceiling * u


def retry_after_of(exc: BaseException) -> Optional[float]:
    """The exception's ``retry_after`` attribute in seconds (``WaitTimeout``, ``QueueFull`` have
    one), if it has a finite number of 0 or more there; one above a day is a day."""
    value = getattr(exc, "retry_after", None)
    # Not a finite number of 0 or more (NaN, infinity): no hint, rather than a sleep or
    # countdown that fails (or never ends) in place of the backoff. Above a day: a day, as a
    # 503's Retry-After (a Celery countdown of 1e15 s overflows, and Celery drops the task).
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _sane_hint(float(value))
    return None


def retry(
    fn: Callable[[], T],
    *,
    retry_on: Union[Tuple[Type[BaseException], ...], Callable[[BaseException], bool]],
    backoff: Backoff = Backoff(),
    retry_after: Callable[[BaseException], Optional[float]] = retry_after_of,
    on_retry: Optional[Callable[[int, BaseException, float], Any]] = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> T:
    """Calls ``fn()`` until it returns, retrying the exceptions ``retry_on`` accepts (a tuple
    of types, or a predicate) up to ``backoff.max_attempts`` attempts in all; the last one's
    exception is raised. Other exceptions are raised at once.

    The same rule as :meth:`Floodgate.call` and ``@limited``: never retried, whatever
    ``retry_on`` names or answers (``Exception`` included): ``PermitLost``, Python's
    ``SystemExit``, ``KeyboardInterrupt`` and ``GeneratorExit``, Celery's time limits and its
    ``Retry``, ``Ignore`` and ``Reject``; a tuple naming one of them (or a subclass) is a
    ``TypeError``.

    ``on_retry(attempt, exc, delay)`` is called before each sleep.
    """
    if backoff.max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    # A bare class is callable too: taken for a predicate, its instance (truthy) would say yes
    # to every exception.
    if isinstance(retry_on, type):
        _check_throttles(retry_on, param="retry_on")  # type: ignore[arg-type]  # raises
    if isinstance(retry_on, (tuple, list)):
        _check_throttles(retry_on, param="retry_on")
        retry_on = tuple(retry_on)
    elif not callable(retry_on):
        raise TypeError("retry_on: a tuple of exception classes or a predicate, not {!r}"
                        .format(retry_on))
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            retryable = not isinstance(exc, _never_throttles()) and (
                isinstance(exc, retry_on) if isinstance(retry_on, tuple) else retry_on(exc))
            if not retryable or attempt + 1 >= backoff.max_attempts:
                raise
            delay = backoff.delay(attempt, retry_after(exc))
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            sleep(delay)
            attempt += 1


# Python's own ways of stopping (not an ``Exception``, so that ``except Exception`` lets them
# through): the process exits, the user interrupts, a generator is closed. Never the backend's
# "too much", whatever ``throttle_exceptions`` names (``BaseException`` included).
_EXITS: Tuple[Type[BaseException], ...] = (SystemExit, KeyboardInterrupt, GeneratorExit)

# Celery's time limits (billiard's classes, which celery.exceptions re-exports), by name:
# Celery is optional, and an instance can only exist once its module was imported.
_TIME_LIMIT_NAMES = ("SoftTimeLimitExceeded", "TimeLimitExceeded")


def _time_limits() -> Tuple[Type[BaseException], ...]:
    """Celery's ``SoftTimeLimitExceeded`` and ``TimeLimitExceeded`` when Celery is in use: the
    task ran out of its time, the task system's own signal (an ``Exception``, so a broad
    ``throttle_exceptions`` would otherwise take it and retry the task as throttled)."""
    module = sys.modules.get("billiard.exceptions")
    found = (getattr(module, name, None) for name in _TIME_LIMIT_NAMES)
    return tuple(c for c in found if isinstance(c, type) and issubclass(c, BaseException))


def _celery_control_flow() -> Tuple[Type[BaseException], ...]:
    """Celery's ``Retry``, ``Ignore`` and ``Reject`` when Celery is in use (a body's own
    ``self.retry()``...: ``Exception`` subclasses, so a broad class would otherwise take them)."""
    module = sys.modules.get("celery.exceptions")
    found = (getattr(module, name, None) for name in ("Retry", "Ignore", "Reject"))
    return tuple(c for c in found if isinstance(c, type) and issubclass(c, BaseException))


def _never_throttles() -> Tuple[Type[BaseException], ...]:
    """What is never a throttle nor retried, whatever ``throttle_exceptions`` or ``retry_on``
    names: a lost permit (the work's permit is gone), Python's exits, Celery's time limits and
    control flow."""
    return (PermitLost,) + _EXITS + _time_limits() + _celery_control_flow()


def _is_throttle(exc: BaseException, throttles: Tuple[Type[BaseException], ...]) -> bool:
    """Whether ``exc`` is one of ``throttles`` (the backend's "too much"). Never one of
    :func:`_never_throttles`, whatever is named. Floodgate's other errors are not taken by a
    broader class (``Exception``): one (e.g. a nested acquire's ``WaitTimeout``) is a throttle
    only when ``throttles`` names a Floodgate error class that it is."""
    if isinstance(exc, _never_throttles()):
        return False
    if isinstance(exc, FloodgateError):
        return isinstance(exc, tuple(t for t in throttles if issubclass(t, FloodgateError)))
    return isinstance(exc, throttles)


def _never_reason(exc: Type[BaseException]) -> str:
    if issubclass(exc, PermitLost):
        return "a lost permit fails the work"
    if issubclass(exc, _EXITS):
        return "Python's exit or interrupt always passes through"
    if issubclass(exc, _time_limits()):
        return "a Celery time limit is the task system's signal, not the backend's"
    return "it is the task system's control flow, passed on"


def _check_throttles(throttles: Tuple[Type[BaseException], ...],
                     never: Tuple[Type[BaseException], ...] = (),
                     param: str = "throttle_exceptions") -> None:
    """``TypeError`` naming ``throttle_exceptions`` for an entry that is not an exception
    class, or that is (a subclass of) one of ``never`` or of :func:`_never_throttles`:
    exceptions that are never a throttle, which naming would only hide. A base class of them
    (``Exception``, ``BaseException``) may be named: they still pass through."""
    if not isinstance(throttles, (tuple, list)):
        # A bare class would fail as "'type' object is not iterable", naming nothing; a
        # string would be taken letter by letter.
        raise TypeError("{}: a tuple of exception classes, not {!r}"
                        " (write (Name,) for one)".format(param, throttles))
    for exc in throttles:
        if not (isinstance(exc, type) and issubclass(exc, BaseException)):
            raise TypeError("{}: exception classes, not {!r}".format(param, exc))
        if issubclass(exc, _never_throttles() + never):
            raise TypeError("{}: {} is never a throttle ({})"
                            .format(param, exc.__name__, _never_reason(exc)))
