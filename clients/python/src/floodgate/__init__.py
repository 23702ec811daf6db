"""Python client of Floodgate: global admission control for distributed workers.

    from floodgate import Floodgate, WaitTimeout

    fg = Floodgate("http://127.0.0.1:8750")
    with fg.permit("snuba-spike-projections", wait=60, lease=300) as p:
        run_query(fencing_token=p.fencing_token)

The Celery integration is in :mod:`floodgate.celery` (install the ``celery`` extra).
"""

from .client import DEFAULT_URL, KEEP, Adaptive, Floodgate, Permit, Rate, Reservation, Seconds
from .errors import (
    BadRequest,
    Conflict,
    FloodgateError,
    Forbidden,
    MethodNotAllowed,
    NoPermit,
    NotFound,
    PayloadTooLarge,
    PermitLost,
    PermitsExceedLimit,
    QueueFull,
    ServerError,
    TooManyKeys,
    Unauthorized,
    Unavailable,
    UnknownLimiter,
    WaitTimeout,
)
from .backoff import Backoff, retry

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "Floodgate",
    "Permit",
    "Rate",
    "Reservation",
    "Adaptive",
    "KEEP",
    "Seconds",
    "Backoff",
    "retry",
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
