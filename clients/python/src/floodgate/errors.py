"""Exceptions raised by the Floodgate client.

Every error the server answers carries a stable ``code`` (the ``error`` field of the answer,
see docs/api.md) and a ``message`` for people that names the field at fault. The exception
class is chosen from the code, and from the HTTP status when the code is not one this client
knows, so ``except floodgate.BadRequest`` works for any 400.
"""

from typing import Dict, Optional, Type

__all__ = [
    "FloodgateError",
    "BadRequest",
    "PermitsExceedLimit",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "UnknownLimiter",
    "MethodNotAllowed",
    "Conflict",
    "PermitLost",
    "PayloadTooLarge",
    "NoPermit",
    "WaitTimeout",
    "QueueFull",
    "TooManyKeys",
    "ServerError",
    "Unavailable",
]


class FloodgateError(Exception):
    """Base of every error of this package.

    Attributes:
        code: the server's stable ``error`` code (``"invalid_request"``, ``"wait_timeout"``...),
            or ``"unavailable"`` when the server could not be reached at all.
        message: the server's explanation (or the connection error's).
        status: the HTTP status, or ``None`` when no answer came.
    """

    def __init__(self, code: str, message: str, status: Optional[int] = None) -> None:
        super().__init__(code, message, status)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        where = " (HTTP {})".format(self.status) if self.status is not None else ""
        return "{}: {}{}".format(self.code, self.message, where)

    def __repr__(self) -> str:
        return "{}(code={!r}, message={!r}, status={!r})".format(
            type(self).__name__, self.code, self.message, self.status
        )


class BadRequest(FloodgateError):
    """400: malformed or out-of-range input; the message starts with the field at fault."""


class PermitsExceedLimit(BadRequest):
    """400 ``permits_exceed_limit``: more permits asked than the limit; never grantable."""


class Unauthorized(FloodgateError):
    """401: missing or wrong bearer token."""


class Forbidden(FloodgateError):
    """403. ``code`` tells which: ``read_only`` (the server does not allow changing limiters
    over the API) or ``host_not_allowed`` (the request's ``Host`` names a host the server does
    not serve: see docs/api.md's Host check)."""


class NotFound(FloodgateError):
    """404. ``code`` tells which: ``unknown_limiter`` (see :class:`UnknownLimiter`) or
    ``not_found`` (no such route, e.g. an endpoint this server does not implement yet)."""


class UnknownLimiter(NotFound):
    """404 ``unknown_limiter``: no limiter of that name (or it was deleted while waiting)."""


class MethodNotAllowed(FloodgateError):
    """405: the route does not take that method."""


class Conflict(FloodgateError):
    """409: ``too_many_limiters`` (the server holds its maximum number of limiters), or
    ``superseded`` (a repeat of this acquire with the same ``request_id`` took its wait over
    while it waited; the repeat gets the outcome)."""


class PermitLost(FloodgateError):
    """410 ``permit_lost``: the permit expired or was released and is never revived.

    Stop the work, or acquire again and redo it under the new fencing token.
    """


class PayloadTooLarge(FloodgateError):
    """413: the request body is above the server's limit."""


class NoPermit(FloodgateError):
    """429: the acquire ended without a permit. Re-enqueue the work; never drop it.

    Attributes:
        retry_after: the server's hint, in seconds (float), of when to come back.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: Optional[int] = None,
        retry_after: float = 0.0,
    ) -> None:
        super().__init__(code, message, status)
        self.retry_after = retry_after
        # In args too: what rebuilds an exception from its args (Celery's result backend with
        # its default JSON serializer) would otherwise lose the hint.
        self.args = (code, message, status, retry_after)

    def __str__(self) -> str:
        return "{} (retry after {:.3f} s)".format(super().__str__(), self.retry_after)


class WaitTimeout(NoPermit):
    """429 ``wait_timeout``: no permit was free within the wait."""


class QueueFull(NoPermit):
    """429 ``queue_full``: the limiter's queue is at ``max_queue``; refused without waiting."""


class TooManyKeys(NoPermit):
    """429 ``too_many_keys``: a keyed limiter already tracks its ``max_keys`` keys and this
    acquire names a new one; refused without waiting (idle keys drop out, so retry later)."""


class ServerError(FloodgateError):
    """5xx other than 503: the server failed."""


class Unavailable(FloodgateError):
    """The server could not be reached (after the configured retries), or answered 503
    (``shutting_down``, ``store_unavailable``, ``too_many_connections``) or 408
    (``body_timeout``: the request did not reach it whole in time) on every attempt.

    Attributes:
        retry_after: the last answer's ``Retry-After`` hint in seconds, or ``None`` (no
            answer, or none given). The client waits at least that long before retrying, and
            raises at once when the hint is longer than its ``backoff_max``: the caller (the
            Celery decorator's countdown) honours it then.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: Optional[int] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(code, message, status)
        self.retry_after = retry_after
        self.args = (code, message, status, retry_after)  # as NoPermit's


_BY_CODE: Dict[str, Type[FloodgateError]] = {
    "invalid_request": BadRequest,
    "bad_body": BadRequest,
    "permits_exceed_limit": PermitsExceedLimit,
    "unauthorized": Unauthorized,
    "read_only": Forbidden,
    "host_not_allowed": Forbidden,
    "unknown_limiter": UnknownLimiter,
    "not_found": NotFound,
    "method_not_allowed": MethodNotAllowed,
    "too_many_limiters": Conflict,
    "superseded": Conflict,
    "permit_lost": PermitLost,
    "payload_too_large": PayloadTooLarge,
    "wait_timeout": WaitTimeout,
    "queue_full": QueueFull,
    "too_many_keys": TooManyKeys,
    "shutting_down": Unavailable,
    "store_unavailable": Unavailable,
    # The server did not get the whole request in time: it was not served, so trying again
    # is safe (and an acquire's request_id makes it so anyway).
    "body_timeout": Unavailable,
}

_BY_STATUS: Dict[int, Type[FloodgateError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    408: Unavailable,
    409: Conflict,
    410: PermitLost,
    413: PayloadTooLarge,
    429: NoPermit,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def error_for(
    status: int, code: str, message: str, retry_after: Optional[float] = None
) -> FloodgateError:
    """The exception for an error answer."""
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else FloodgateError
    if issubclass(cls, NoPermit):
        return cls(code, message, status, retry_after=retry_after or 0.0)
    if issubclass(cls, Unavailable):
        return cls(code, message, status, retry_after=retry_after)
    return cls(code, message, status)
