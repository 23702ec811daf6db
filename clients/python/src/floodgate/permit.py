"""A granted :class:`Permit`: its lease, extends (by hand or by a heartbeat thread), release,
and what a forked child may do with it (nothing). Importable from ``floodgate`` (and, as
before, ``floodgate.client``).
"""

import logging
import os
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Type

from .errors import FloodgateError, PermitLost
from .types import Seconds, _seconds, _setting

if TYPE_CHECKING:
    from .client import Floodgate

__all__ = ["Permit"]

log = logging.getLogger("floodgate")


class Permit:
    """A granted permit. Hold it while calling the protected backend, passing
    :attr:`fencing_token` along; release it when done (or use it as a context manager).

    Attributes:
        limiter: the limiter's name.
        permit_id: the id for extend and release (``"NAME.TOKEN"``).
        fencing_token: strictly increases across the limiter's grants; give it to the backend.
        permits: how many permits this grant holds.
        lease: the lease in seconds; the permit is reclaimed that long after the last extend.
            The lease asked for (else the limiter's, as answered), also when a retried
            acquire's answer gave only what was left of it (:attr:`expires_in` says that).
        waited: how long the server held the acquire before granting, in seconds.
        key: a keyed limiter's key this permit was acquired with (``None`` for a plain
            limiter's); sent with every extend, so a server that lost its state re-adopts the
            permit under its key (docs/learning.md).
        heartbeat_error: the error of the heartbeat's last extend, or ``None`` when it
            succeeded (or none was made yet): a failure it rides out (the server unreachable,
            a 503) is set and then cleared by the next extend that succeeds; the ``PermitLost``
            that ends the heartbeat stays. Extends of :meth:`extend` do not change it.

    A permit belongs to the process that acquired it. In a process forked while it was held,
    :meth:`release` does nothing (returns ``False``), :meth:`extend` raises ``RuntimeError``
    and leaving its ``with`` block neither releases it nor raises: the parent still holds it
    and keeps it alive.
    """

    def __init__(
        self,
        client: "Floodgate",
        limiter: str,
        data: Mapping[str, Any],
        requested_at: Optional[float] = None,
        key: Optional[str] = None,
        asked_lease: Optional[float] = None,
        answered_attempt_at: Optional[float] = None,
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.permit_id: str = str(data["permit_id"])
        self.fencing_token: int = int(data["fencing_token"])
        self.permits: int = int(data.get("permits", 1))
        self.lease: float = float(data.get("lease_ms", 0)) / 1000.0
        self.waited: float = float(data.get("waited_ms", 0)) / 1000.0
        self.key: Optional[str] = key
        started = time.monotonic() if requested_at is None else requested_at
        # The server's lease started when it granted, which is no earlier than the request
        # plus the wait: this local deadline is never later than the server's.
        self._deadline = started + self.waited + self.lease
        if asked_lease is not None and 0 < self.lease < asked_lease:
            # Less than asked (the server refuses a lease out of range, never cuts it): a
            # repeat of the acquire (its retry after a lost answer) answered, on Redis, with
            # what was left of the grant's lease when the server answered, which is after the
            # answered attempt started (not the first: a deadline from there would be early
            # by the retries' time, and lost at once after a long one). Extends renew the lease
            # asked for, not that remnant.
            base = started if answered_attempt_at is None else answered_attempt_at
            self._deadline = base + self.lease
            self.lease = asked_lease
        self._lock = threading.Lock()
        self._lost = False
        # Whether _lost came from the server's answer to an extend, or to the release (rather
        # than the local deadline).
        self._server_said_lost = False
        self._release_found_it_gone = False
        self._released = False
        self._release_interrupted = False
        self._stop = threading.Event()
        # Set with _stop, and by an extend that shortened the lease: wakes the heartbeat to
        # beat at the new lease's interval rather than sleep out the old one's.
        self._wake = threading.Event()
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
        server has reclaimed it too), or the release found it no longer held (and nothing this
        process sent could have released it). Stop the work: another holder may have the
        slot.

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
        # One way only: a lost permit is never revived (another holder may have the slot).
        if value:
            self._lost = True
        elif self.lost:
            raise ValueError("a lost permit is never revived")

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
        if self._server_said_lost:
            reason = "the server answered permit_lost"
        elif self._release_found_it_gone:
            reason = "the server no longer held it at its release"
        else:
            reason = "the lease ran out without a confirmed extend"
        return PermitLost(
            "permit_lost", "permit {} is lost: {}".format(self.permit_id, reason), None
        )

    @property
    def owned(self) -> bool:
        """Whether this process holds the permit (``False`` in a process forked meanwhile)."""
        return self._pid == os.getpid()

    # -- extend and release ----------------------------------------------------------------

    def extend(self, lease: Optional[Seconds] = None, *, timeout: Optional[float] = None) -> None:
        """Moves the lease's end to now plus ``lease`` (default: this permit's lease). A
        shorter lease than the permit's becomes its lease: the local deadline (:attr:`lost`)
        comes nearer with the server's, and a running heartbeat beats at a third of it.

        Raises:
            PermitLost: the permit expired or was released; :attr:`lost` is set.
        """
        if not self.owned:
            raise RuntimeError(
                "permit {} belongs to process {}, not to this one (forked while it was held)"
                .format(self.permit_id, self._pid)
            )
        try:
            seconds = self.lease if lease is None else _seconds(lease)
        except TypeError as e:
            raise TypeError("lease: {}".format(e)) from None
        if timeout is not None:
            timeout = _setting(timeout, "timeout", positive=True)
        self._extend(seconds, timeout=timeout, retries=None)

    def _extend(self, seconds: float, timeout: Optional[float], retries: Optional[int],
                beat: bool = False) -> None:
        # Asked after the lease ended (as far as this process can tell) without a confirmed
        # extend: the server's answer is still asked for (410 says why), but even a success
        # cannot cover the work done meanwhile.
        too_late = self.lost
        started = time.monotonic()
        lease_before = self.lease
        if self.lease > 0 and not too_late:
            # An answer that comes after the lease ended is too late to be relied upon.
            remaining = self._deadline - started
            base = self.client.timeout if timeout is None else timeout
            timeout = max(0.001, min(base, remaining))
        try:
            self.client._extend(
                self.permit_id,
                seconds,
                timeout=timeout,
                retries=retries,
                permits=self.permits,
                key=self.key,
            )
        except PermitLost:
            if not (beat and self._released):
                # (A heartbeat's extend still in flight when the permit was released: its 410
                # is the release's doing, not a loss.)
                self._lost = True
                self._server_said_lost = True
            raise
        if too_late:
            raise self._lost_error()
        with self._lock:
            # Measured from before the request: never later than the server's new deadline.
            shortened = False
            if self.lease != lease_before:
                # Another extend changed the lease while this one was in flight, and which
                # of the two the server took last is unknown: the nearer deadline.
                self._deadline = min(self._deadline, started + seconds)
            else:
                # A shorter lease moved the server's deadline nearer, so it moves the local
                # one (max() guards against an older extend's answer read after a newer one's).
                shortened = seconds < self.lease
                if shortened:
                    self._deadline = started + seconds
                else:
                    self._deadline = max(self._deadline, started + seconds)
                self.lease = seconds
            self.extensions += 1
        if shortened:
            self._wake.set()

    def release(self) -> bool:
        """Stops the heartbeat and releases the permit. Returns whether the server still held
        it (``False`` after expiry, a previous release or a loss). Calling it again is a no-op
        (but see an interrupted release, below).
        In a process forked while the permit was held it does nothing and returns ``False``.

        When an attempt's connection broke after the request may have reached the server and
        the retry finds the permit no longer held, that first attempt is taken to have
        released it (its answer lost): ``True``, unless the permit was already known lost.

        A release interrupted by an exception that is not Floodgate's (Celery's
        ``SoftTimeLimitExceeded``, ``KeyboardInterrupt``...) raises it and does not count as
        done: calling it again sends the release again (taking "not held" for the interrupted
        attempt's doing, as above)."""
        if not self.owned:
            return False
        # The whole release takes at most the client's bookkeeping deadline: half of it for an
        # extend in flight to end, the rest (at least half) for the release's request.
        ends = time.monotonic() + self.client.bookkeeping_deadline
        self.stop_heartbeat(self.client.bookkeeping_deadline / 2.0)
        # Known lost before the request (the heartbeat's permit_lost, or the lease ran out):
        # "not held" is then the loss, never this release's doing.
        lost_before = self.lost
        with self._lock:
            if self._released:
                return False
            self._released = True
        if self.lease <= 0:
            # A rate-only grant (or a fail-open one) holds no slot: nothing to release.
            return False
        try:
            released, broken = self.client._release(
                self.permit_id, deadline=max(0.001, ends - time.monotonic())
            )
        except FloodgateError:
            raise
        except BaseException:
            # Interrupted (e.g. Celery's SoftTimeLimitExceeded, raised by a signal handler
            # anywhere) with the request maybe unsent: a later release() sends it again, rather
            # than finding the permit "released" and leaving it held until its lease ends.
            with self._lock:
                self._released = False
                self._release_interrupted = True
            raise
        # A release interrupted before may have reached the server: "not held" is then its doing.
        broken = broken or self._release_interrupted
        if not released and not lost_before:
            if broken:
                log.info("floodgate: release of %s: an attempt broke after it may have reached "
                         "the server and the retry found it released; taken as released by it",
                         self.permit_id)
                return True
            # The server no longer held it and nothing of ours released it: it was lost while
            # held (expired, released by id elsewhere, forgotten by a restart). Recorded, so
            # that a holder that only looks after the release (the Celery decorator) learns it.
            self._release_found_it_gone = True
            self._lost = True
        return released

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
        interval = _setting(interval, "heartbeat", positive=True)
        if interval >= self.lease:
            # The limiter's own lease (none was asked for) is shorter than the interval.
            log.warning("floodgate: heartbeat interval %.3f s is not shorter than the lease of "
                        "%s (%.3f s): it will be lost before its first extend",
                        interval, self.permit_id, self.lease)
        self._stop.clear()
        self._wake.clear()
        self._thread = threading.Thread(
            target=self._heartbeat,
            args=(interval,),
            name="floodgate-heartbeat-{}".format(self.permit_id),
            daemon=True,
        )
        self._thread.start()

    def stop_heartbeat(self, wait: Optional[float] = None) -> None:
        """Stops the heartbeat thread (waiting for an extend in flight to finish, at most
        ``wait`` seconds: by default the client's timeout and one more). An extend still in
        flight after that, answered once the permit is released, is 410 and not a loss: the
        thread was told to stop."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.client.timeout + 1.0 if wait is None else wait)
        self._thread = None

    def _heartbeat(self, interval: float) -> None:
        """Extends every ``interval``. A server that cannot be reached, or answers 503 (a
        restart, a store outage), does not end it: the extend is tried again every quarter
        interval until it succeeds or the lease has ended without a confirmed extend. Only
        ``permit_lost``, or that end, count as a loss."""
        # The first beat before a third of what is left of the grant's lease has passed: a
        # repeat's answer may have come with less of it left than ``lease`` (see __init__).
        delay = min(interval, max(0.0, self.expires_in) / 3.0)
        while True:
            woken = self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            if woken:
                # The lease was shortened by an extend that just succeeded: the next beat
                # comes a third of the new lease from now (or at the interval asked for, if
                # shorter).
                interval = min(interval, self.lease / 3.0)
                delay = interval
                continue
            started = time.monotonic()
            # Each extend gets at most half a lease to answer, and is not retried inside: the
            # loop tries again soon, while the lease still runs.
            timeout = min(self.client.timeout, max(self.lease / 2.0, 0.05))
            try:
                self._extend(self.lease, timeout=timeout, retries=0, beat=True)
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
            # The last beat succeeded: an earlier failure (e.g. a server restarting) is over.
            self.heartbeat_error = None
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
        goes on, with a note). A release interrupted by an exception not Floodgate's (a Celery
        time limit...) is sent again before that exception goes on. In a process forked inside
        the block, does nothing."""
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
        except BaseException:
            # Interrupted (e.g. Celery's SoftTimeLimitExceeded): send it again, so the slot is
            # not held until the lease ends, then let the interruption go on.
            try:
                self.release()
            except FloodgateError as e:
                log.warning("floodgate: release of %s failed: %s", self.permit_id, e)
            raise
        if released_before or self.lease <= 0:
            return
        if not lost and not still_held:
            # The server no longer held it: it expired (or someone released it) meanwhile
            # (release() has recorded it).
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

