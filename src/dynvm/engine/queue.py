"""Waiting requests as the lease engine takes them: queue one (``submit``), serve it when
the scheduler says so (``grant``), cancel it, and find its leases. The order and the
forecast are the scheduler's (``scheduler.py``); the rows are ``requests.py``'s.

``Queueing`` is a part of ``LeaseService`` (``leases.py``), which it extends.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

from ..config import Settings
from ..model import (
    ANONYMOUS,
    Caller,
    Forbidden,
    Lease,
    LeaseError,
    LeaseRequest,
    NameInUse,
    NoSuchLease,
    NotEnoughCapacity,
    ShuttingDown,
    vm_names,
)
from ..store.tables import ACTIVE_STATES
from .requests import CANCELLED, CREATING, QUEUED, RequestRecord, RequestStore
from .scheduler import never_fits

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy.engine import Connection

    from ..store.leases import LeaseStore
    from .ready_pools import ReadyPools
    from .requests import DurableTracker
    from .scheduler import Scheduler

log = logging.getLogger(__name__)


class Queueing:
    """The queue's side of ``LeaseService``."""

    # LeaseService's (leases.py) and its other parts', which these methods use
    leases: LeaseStore
    requests: RequestStore
    tracker: DurableTracker
    scheduler: Scheduler
    ready_pools: ReadyPools
    clock: Callable[[], float]
    owner: str
    _builders: ThreadPoolExecutor
    _stopping: threading.Event

    if TYPE_CHECKING:

        @property
        def settings(self) -> Settings: ...
        def _report(self, event: str, *args: object) -> None: ...
        def counted_host(self, request: LeaseRequest) -> LeaseRequest: ...
        def validate(self, request: LeaseRequest) -> None: ...
        def _reserve_now(self, settings: Settings, request: LeaseRequest, request_id: str) -> list[Lease]: ...
        def _reserve(
            self, settings: Settings, request: LeaseRequest, request_id: str, immediate: bool
        ) -> list[Lease]: ...
        def _build(self, settings: Settings, new: list[Lease], request_id: str, pinned: bool) -> list[Lease]: ...
        def _refuse_names_of_others(self, request: LeaseRequest, conn: Connection | None = None) -> None: ...
        def _refuse_leased_names(self, taken: list[Lease], request: LeaseRequest) -> None: ...
        @staticmethod
        def may_requeue(record: RequestRecord, alive: set[str]) -> bool: ...

    def open_request(self, request: LeaseRequest, wait_seconds: float, origin: str) -> RequestRecord:
        """Accept a request: the one way in for both APIs, which then follow its row
        (``RequestStore.wait_finished``) to its end. With ``wait_seconds`` it is queued
        (``submit``). Without, its room is reserved now or it is refused at once, with the
        error ``acquire`` raises (the seed's 429, a 409, ...), and its VMs are made in the
        background. Either way it is a row from here on."""
        request = self.counted_host(request)
        try:
            self.validate(request)  # what can never be served is refused before it is written down
        except LeaseError as e:
            self.refuse(None, request, e)
            raise
        if wait_seconds > 0:
            return self.submit(request, wait_seconds, origin)
        request_id = request.request_id or str(uuid.uuid4())
        request = dataclasses.replace(request, request_id=request_id)
        self.tracker.start(request_id, request.username, request.os, request.count, origin)
        settings = self.settings
        try:
            new = self._reserve_now(settings, request, request_id)
        except LeaseError as e:
            self.refuse(request_id, request, e)
            raise
        except Exception as e:
            self.tracker.finish(request_id, e)
            raise
        record = self.requests.get(request_id)
        assert record is not None  # written by tracker.start, ended only by this process
        self._builders.submit(self._build_request, settings, record, new, request.host_ref is not None)
        return record

    def refuse(self, request_id: str | None, request: LeaseRequest, error: LeaseError) -> None:
        """A request refused at once (nothing reserved): counted and logged, not kept
        (``request_id``: its row, written before it was refused, goes)."""
        if request_id is not None:
            try:
                self.tracker.refused(request_id)
            except Exception:  # the answer stays the refusal; the row ends failed instead
                log.warning("request %s: refused, but its row could not be removed", request_id, exc_info=True)
                self.tracker.finish(request_id, error)
        log.info("refused %s (%s x%d): %s", request.username, request.os, request.count, error)
        self._report("refused", type(error).__name__)

    def submit(self, request: LeaseRequest, wait_seconds: float, origin: str = "v1") -> RequestRecord:
        """Queue a request that may wait up to ``wait_seconds`` for room. Refused at once
        (as ``acquire`` would) when it can never be served as asked. Returns the queued
        request; the leader's scheduler serves it."""
        try:
            return self._queue_request(request, wait_seconds, origin)
        except LeaseError as e:
            self.refuse(None, request, e)
            raise

    def _queue_request(self, request: LeaseRequest, wait_seconds: float, origin: str) -> RequestRecord:
        if self._stopping.is_set():
            raise ShuttingDown("dynvm is stopping; try again in a moment")
        self.validate(request)
        request_id = request.request_id or str(uuid.uuid4())
        record = dataclasses.replace(
            _record_of(request, request_id),
            state=QUEUED,
            owner=self.owner,
            origin=origin,
            created_at=self.clock(),
            wait_until=self.clock() + wait_seconds,
        )
        if not self.scheduler.can_ever_fit(self.settings, record):
            raise NotEnoughCapacity(never_fits(record) + "; ask for fewer")
        self._refuse_leased_names(self.leases.by_name(vm_names(request.username, request.count)), request)
        self._refuse_names_of_others(request)
        self.requests.insert(record)
        self.ready_pools.observe(request.os, request.count)
        self.scheduler.wake()
        return record

    def grant(self, record: RequestRecord) -> bool:
        """Serve a queued request now (the scheduler decided): reserve its room and start
        making its VMs in the background. False, and the request still queued, when its
        room is gone after all; a request that can no longer be served as asked (its name
        taken meanwhile, a quota) ends failed with the reason (True: it was dealt with)."""
        if not self.requests.transition(record.id, [QUEUED], CREATING, builder=self.owner, position=None, eta_at=None):
            return False  # cancelled or timed out meanwhile
        request = _request_of(record)
        settings = self.settings
        try:
            new = self._reserve(settings, request, record.id, immediate=False)
        except NotEnoughCapacity:
            self.requests.transition(record.id, [CREATING], QUEUED, builder=None, started_at=None)
            return False
        except LeaseError as e:
            self.tracker.finish(record.id, e)
            return True
        except Exception as e:
            log.exception("request %s: could not be served", record.id)
            self.tracker.finish(record.id, e)
            return True

        self._builders.submit(self._build_request, settings, record, new, request.host_ref is not None)
        return True

    def _build_request(self, settings: Settings, record: RequestRecord, new: list[Lease], pinned: bool) -> None:
        """Make a reserved request's VMs (a builder thread). Its row turns ready with the
        hand-over (``LeaseStore.hand_over``), or failed here."""
        try:
            self._build(settings, new, record.id, pinned=pinned)
        except Exception as e:
            if self._stopping.is_set() and record.owner != self.owner and self.may_requeue(record, {record.owner}):
                # this replica stops; the caller waits on another: another leader makes them
                self.requests.transition(record.id, [CREATING], QUEUED, builder=None, started_at=None, vms=[])
                log.warning("request %s: stopping while making its VMs; queued again", record.id)
                return
            if not isinstance(e, LeaseError):
                log.exception("request %s failed", record.id)
            self.tracker.finish(record.id, e)

    def cancel(self, request_id: str, caller: Caller = ANONYMOUS) -> RequestRecord:
        """Cancel a request before it is ready: a queued one ends at once; a creating one
        has its VMs removed by the process making them. Cancelling a ready request is
        refused (release its VMs instead)."""
        record = self.requests.get(request_id)
        if record is None:
            raise NoSuchLease(f"no request {request_id}")
        if not (caller.admin or record.caller is None or record.caller == caller.user):
            raise Forbidden(f"request {request_id} belongs to {record.caller}: only they or an admin may cancel it")
        if record.state == "ready":
            raise NameInUse(
                f"request {request_id} is ready: its VMs were handed over; release them instead "
                f"(releaseservers/{record.username}?count={record.count})"
            )
        if record.finished:
            return record
        updated = self.requests.request_cancel(request_id)
        if updated is not None and updated.state == CANCELLED:
            self._request_event("cancelled", request_id)
        self.scheduler.wake()
        return updated or record

    def leases_of(self, request_id: str) -> list[Lease]:
        """The ready leases of a request, in the order of its answer."""
        found = {lease.name: lease for lease in self.leases.by_request(request_id) if lease.state in ACTIVE_STATES}
        record = self.requests.get(request_id)
        names = vm_names(record.username, record.count) if record else sorted(found)
        return [found[name] for name in names if name in found]

    def _end_cancelled(self, request_id: str | None) -> None:
        if request_id is not None:
            self.requests.end_cancelled(request_id, [CREATING], "cancelled by its caller; what was built was removed")

    def _request_event(self, kind: str, request_id: str | None) -> None:
        """Tell the listeners a request moved (served from the queue, ready, ended)."""
        if request_id is None:
            return
        record = self.requests.get(request_id)
        if record is not None:
            self._report("request_event", kind, record)


class _RequestCancel:
    """What a create checks between its steps: dynvm stopping, or its request cancelled
    (read from the request's row at most every ``CANCEL_CHECK`` seconds)."""

    CANCEL_CHECK = 1.0

    def __init__(self, stopping: threading.Event, store: RequestStore, request_id: str | None) -> None:
        self._stopping = stopping
        self._store = store
        self._request_id = request_id
        self._checked_at = -self.CANCEL_CHECK
        self._cancelled = False
        self._lock = threading.Lock()

    def is_set(self) -> bool:
        if self._stopping.is_set() or self._cancelled:
            return True
        if self._request_id is None:
            return False
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= self.CANCEL_CHECK:
                self._checked_at = now
                record = self._store.get(self._request_id)
                self._cancelled = bool(record and record.cancel_requested)
        return self._cancelled


def _record_of(request: LeaseRequest, request_id: str) -> RequestRecord:
    return RequestRecord(
        id=request_id,
        username=request.username,
        os=request.os,
        count=request.count,
        state=CREATING,
        owner="",
        created_at=0.0,
        caller=request.caller,
        cpus=request.cpus,
        memory=request.memory,
        expires_in_minutes=request.expires_in_minutes,
        host_ref=request.host_ref,
    )


def _request_of(record: RequestRecord) -> LeaseRequest:
    return LeaseRequest(
        username=record.username,
        os=record.os,
        count=record.count,
        cpus=record.cpus,
        memory=record.memory,
        expires_in_minutes=record.expires_in_minutes,
        host_ref=record.host_ref,
        caller=record.caller,
        request_id=record.id,
    )
