"""Requests as the engine takes them: accept one (``open_request``, or ``acquire`` for a
caller that blocks), queue one that may wait (``submit``), serve a queued one when the
scheduler says so (``grant``), cancel one, and find its leases. Admission decides whether
and where; the build makes the VMs; this is the way in and the bookkeeping between.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

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
from ..states import ACTIVE_LEASE_STATES, Actor, RequestState
from ..store.requests import RequestRecord
from .admission import Admission
from .build import Builder
from .context import EngineContext
from .queue_policy import QueuePolicy, never_fits
from .ready_pools import ReadyPools
from .tracker import DurableTracker

log = logging.getLogger(__name__)

ROOM_SHOWS_WITHIN = 5.0  # seconds the hosts may take to report the room of VMs just destroyed


def may_requeue(record: RequestRecord, alive: set[str]) -> bool:
    """Whether a request whose VMs stopped being made goes back to the queue: it waits,
    and whoever waits for its answer is still there."""
    return record.wait_until is not None and (record.origin == "v1" or record.owner in alive)


class Queue:
    def __init__(
        self,
        ctx: EngineContext,
        admission: Admission,
        builder: Builder,
        ready_pools: ReadyPools,
        policy: QueuePolicy,
        tracker: DurableTracker,
    ) -> None:
        self.ctx = ctx
        self.admission = admission
        self.builder = builder
        self.ready_pools = ready_pools
        self.policy = policy
        self.tracker = tracker

    def acquire(self, request: LeaseRequest) -> list[Lease]:
        """Create ``request.count`` VMs and return their leases, ready, with IPs. Blocks
        for as long as the VMs take to boot: call it from a worker thread."""
        request = self.admission.counted_host(request)
        request_id = request.request_id or str(uuid.uuid4())
        try:
            self.admission.validate(request)
        except LeaseError as e:
            self.refuse(request, e)
            raise
        record = self.tracker.started(request_id, request.username, request.os, request.count)
        settings = self.ctx.settings()
        new = self._reserve_or_refuse(settings, request, record)
        try:
            return self.builder.build(settings, new, request_id, pinned=request.host_ref is not None)
        except Exception as e:
            self.tracker.finish(request_id, Actor.BUILDER, e)
            raise  # (a request built whole ended ready in its hand-over)

    def open_request(self, request: LeaseRequest, wait_seconds: float, origin: str) -> RequestRecord:
        """Accept a request: the one way in for both APIs, which then follow its row
        (``RequestStore.wait_finished``) to its end. With ``wait_seconds`` it is queued
        (``submit``). Without, its room is reserved now or it is refused at once, with the
        error ``acquire`` raises (the seed's 429, a 409, ...), and its VMs are made in the
        background. Either way it is a row from here on."""
        request = self.admission.counted_host(request)
        try:
            self.admission.validate(request)  # what can never be served is refused before it is written down
        except LeaseError as e:
            self.refuse(request, e)
            raise
        if wait_seconds > 0:
            return self.submit(request, wait_seconds, origin)
        request_id = request.request_id or str(uuid.uuid4())
        request = dataclasses.replace(request, request_id=request_id)
        started = self.tracker.started(request_id, request.username, request.os, request.count, origin)
        settings = self.ctx.settings()
        new = self._reserve_or_refuse(settings, request, started)
        record = self.ctx.requests.get(request_id)
        assert record is not None  # written by its reservation, ended only by this process
        self.ctx.builders.submit(self._build_request, settings, record, new, request.host_ref is not None)
        return record

    def _reserve_or_refuse(self, settings: Settings, request: LeaseRequest, record: RequestRecord) -> list[Lease]:
        """Reserve a request that does not wait; its reservation writes its row. A refusal
        leaves none (``refuse``); any other failure ends it failed, written for the purpose."""
        try:
            return self._reserve_now(settings, request, record)
        except LeaseError as e:
            self.refuse(request, e)
            raise
        except Exception as e:
            self.tracker.start(record)  # the reservation rolled its row back with it
            self.tracker.finish(record.id, Actor.ADMISSION, e)
            raise

    def _reserve_now(self, settings: Settings, request: LeaseRequest, record: RequestRecord) -> list[Lease]:
        """Reserve a request that does not wait. When it does not fit, idle ready-pool VMs
        make way (``ReadyPools.make_room``) and it is tried again once their room shows
        (the hosts report a destroyed VM's room a moment later); else the shortage stands."""
        self.ready_pools.observe(request.os, request.count)
        try:
            return self.admission.reserve(settings, request, record.id, immediate=True, record=record)
        except NotEnoughCapacity as shortage:
            queued = self.ctx.requests.in_state(RequestState.QUEUED)
            waits = any(r.os == request.os for r in queued)  # then it takes none
            takes = self.ready_pools.stock.eligible(settings, request.os, request.cpus, request.memory) and not waits
            warm = len(self.ready_pools.stock.idle(settings, request.os, request.host_ref)) if takes else 0
            cold = request.count - min(warm, request.count)
            if not self.ready_pools.make_room(settings, request, cold):
                raise shortage from None
        for attempt in Retrying(
            retry=retry_if_exception_type(NotEnoughCapacity),
            stop=stop_after_delay(ROOM_SHOWS_WITHIN),
            wait=wait_fixed(0.05),
            reraise=True,
        ):
            with attempt:
                return self.admission.reserve(settings, request, record.id, immediate=True, record=record)
        raise AssertionError("unreachable: Retrying reraises")

    def refuse(self, request: LeaseRequest, error: LeaseError) -> None:
        """A request refused at once (nothing reserved): counted and logged, not kept (its
        row, if its reservation began one, went with the reservation's roll-back)."""
        log.info("refused %s (%s x%d): %s", request.username, request.os, request.count, error)
        self.ctx.report("refused", type(error).__name__)

    def submit(self, request: LeaseRequest, wait_seconds: float, origin: str = "v1") -> RequestRecord:
        """Queue a request that may wait up to ``wait_seconds`` for room. Refused at once
        (as ``acquire`` would) when it can never be served as asked. Returns the queued
        request; the leader's scheduler serves it."""
        try:
            return self._queue_request(request, wait_seconds, origin)
        except LeaseError as e:
            self.refuse(request, e)
            raise

    def _queue_request(self, request: LeaseRequest, wait_seconds: float, origin: str) -> RequestRecord:
        ctx = self.ctx
        if ctx.stopping.is_set():
            raise ShuttingDown("dynvm is stopping; try again in a moment")
        self.admission.validate(request)
        request_id = request.request_id or str(uuid.uuid4())
        record = dataclasses.replace(
            RequestRecord.of(request, request_id),
            state=RequestState.QUEUED,
            owner=ctx.owner,
            origin=origin,
            created_at=ctx.clock(),
            wait_until=ctx.clock() + wait_seconds,
        )
        if not self.policy.can_ever_fit(ctx.settings(), record):
            raise NotEnoughCapacity(never_fits(record) + "; ask for fewer")
        self.admission.refuse_names_taken(request)
        ctx.requests.insert(record)
        self.ready_pools.observe(request.os, request.count)
        ctx.room_freed.set()  # the scheduler looks at the queue now
        return record

    def grant(self, record: RequestRecord) -> bool:
        """Serve a queued request now (the scheduler decided): reserve its room and start
        making its VMs in the background. False, and the request still queued, when its
        room is gone after all; a request that can no longer be served as asked (its name
        taken meanwhile, a quota) ends failed with the reason (True: it was dealt with)."""
        ctx = self.ctx
        queued, creating = [RequestState.QUEUED], [RequestState.CREATING]
        if not ctx.requests.transition(
            record.id, queued, RequestState.CREATING, by=Actor.SCHEDULER, builder=ctx.owner, position=None, eta_at=None
        ):
            return False  # cancelled or timed out meanwhile
        request = record.request()
        settings = ctx.settings()
        try:
            new = self.admission.reserve(settings, request, record.id, immediate=False)
        except NotEnoughCapacity:
            ctx.requests.transition(
                record.id, creating, RequestState.QUEUED, by=Actor.SCHEDULER, builder=None, started_at=None
            )
            return False
        except Exception as e:
            if not isinstance(e, LeaseError):
                log.exception("request %s: could not be served", record.id)
            self.tracker.finish(record.id, Actor.ADMISSION, e)
            return True
        ctx.builders.submit(self._build_request, settings, record, new, request.host_ref is not None)
        return True

    def _build_request(self, settings: Settings, record: RequestRecord, new: list[Lease], pinned: bool) -> None:
        """Make a reserved request's VMs (a builder thread). Its row turns ready with the
        hand-over (``Builder``), or failed here."""
        ctx = self.ctx
        try:
            self.builder.build(settings, new, record.id, pinned=pinned)
        except Exception as e:
            if ctx.stopping.is_set() and record.owner != ctx.owner and may_requeue(record, {record.owner}):
                # this replica stops; the caller waits on another: another leader makes them
                ctx.requests.transition(
                    record.id,
                    [RequestState.CREATING],
                    RequestState.QUEUED,
                    by=Actor.BUILDER,
                    builder=None,
                    started_at=None,
                    vms=[],
                )
                log.warning("request %s: stopping while making its VMs; queued again", record.id)
                return
            if not isinstance(e, LeaseError):
                log.exception("request %s failed", record.id)
            self.tracker.finish(record.id, Actor.BUILDER, e)

    def cancel(self, request_id: str, caller: Caller = ANONYMOUS) -> RequestRecord:
        """Cancel a request before it is ready: a queued one ends at once; a creating one
        has its VMs removed by the process making them. Cancelling a ready request is
        refused (release its VMs instead)."""
        ctx = self.ctx
        record = ctx.requests.get(request_id)
        if record is None:
            raise NoSuchLease(f"no request {request_id}")
        if not (caller.admin or record.caller is None or record.caller == caller.user):
            raise Forbidden(f"request {request_id} belongs to {record.caller}: only they or an admin may cancel it")
        if record.state == RequestState.READY:
            raise NameInUse(
                f"request {request_id} is ready: its VMs were handed over; release them instead "
                f"(releaseservers/{record.username}?count={record.count})"
            )
        if record.finished:
            return record
        updated = ctx.requests.request_cancel(request_id)
        if updated is not None and updated.state == RequestState.CANCELLED:
            ctx.request_event("cancelled", request_id)
        ctx.room_freed.set()
        return updated or record

    def leases_of(self, request_id: str) -> list[Lease]:
        """The ready leases of a request, in the order of its answer."""
        found = {
            lease.name: lease for lease in self.ctx.leases.by_request(request_id) if lease.state in ACTIVE_LEASE_STATES
        }
        record = self.ctx.requests.get(request_id)
        names = vm_names(record.username, record.count) if record else sorted(found)
        return [found[name] for name in names if name in found]
