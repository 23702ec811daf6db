"""The client's value types: durations, and the rate and adaptive specs of a limiter.

Importable from ``floodgate`` (and, as before, ``floodgate.client``).
"""

import datetime
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

__all__ = ["Rate", "Adaptive", "KEEP", "Seconds"]

#: A duration in seconds (``int`` or ``float``) or a :class:`datetime.timedelta`.
Seconds = Union[int, float, datetime.timedelta]


def _seconds(value: Seconds) -> float:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    # (A bool is an int to Python: `wait=True` would silently be a 1 s wait.)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError("a duration is a number of seconds or a timedelta, not {!r}".format(value))


def _setting(value: object, field: str, positive: bool) -> float:
    """A client setting in seconds (``timeout``, ``backoff``...): a finite number, above 0
    when ``positive`` else at least 0; ``TypeError``/``ValueError`` naming ``field``
    otherwise, when the client is made rather than at its first request or retry."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("{}: a number of seconds, not {!r}".format(field, value))
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        raise ValueError("{}: a finite number of seconds {}, not {!r}".format(
            field, "above 0" if positive else "of 0 or more", value))
    return seconds


def _ms(value: Seconds, field: str) -> int:
    """Seconds to the API's integer milliseconds. Range checks are the server's: a zero or
    negative value is sent as is and answered with the server's message naming ``field``."""
    try:
        seconds = _seconds(value)
    except TypeError as e:
        raise TypeError("{}: {}".format(field, e)) from None
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


@dataclass(frozen=True)
class Reservation:
    """What :meth:`Floodgate.reserve` reserved on a rate limiter: each child's start offset in
    seconds, and the id with which :meth:`Floodgate.unschedule` gives back unused tokens (a
    keyed schedule's gives back the key's and the total's; ``None`` only from a server that
    answered none, as older servers did for keyed schedules)."""

    offsets: List[float]
    id: Optional[int]


def _spec(value: Any) -> Any:
    if value is None or isinstance(value, dict):
        return value
    return value.to_json()

