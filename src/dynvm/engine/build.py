"""A request's build: make its VMs side by side, hold each on its host, and hand them over
with the request in one transaction. All or nothing: if one VM still fails after its
retries, the others are destroyed, every reservation is given back, and the error says
what failed where.

Every exit gives a reservation back or turns it into a lease: success (ready), failure
(failed, VMs destroyed), an exception (same), the client going away (the build carries
on and becomes a lease the user can release, or that expires), dynvm stopping (builds in
flight are cancelled and rolled back).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait

from ..config import Settings
from ..model import CreateFailed, Lease, RequestCancelled
from ..states import Actor, LeaseState, RequestState
from ..store.requests import RequestRecord, RequestStore
from .context import EngineContext
from .creator import Creator
from .release import Releaser
from .tracker import DurableTracker

log = logging.getLogger(__name__)


class RequestCancel:
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


class _NotHandedOver(Exception):
    """Inside the hand-over's transaction: a lease is no longer ready (roll it all back)."""


class Builder:
    def __init__(self, ctx: EngineContext, creator: Creator, releaser: Releaser, tracker: DurableTracker) -> None:
        self.ctx = ctx
        self.creator = creator
        self.releaser = releaser
        self.tracker = tracker
        self._in_flight = 0
        self._idle = threading.Condition()

    def build(self, settings: Settings, new: list[Lease], request_id: str, pinned: bool) -> list[Lease]:
        """Make a reserved request's VMs and hand them over; blocks until they are (a
        builder thread, or the caller's own worker thread)."""
        with self._idle:
            self._in_flight += 1
        try:
            return self._create_all(settings, new, pinned, request_id)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
            self.ctx.room_freed.set()  # a failed request gave its room back

    def wait_idle(self, grace: float) -> None:
        """dynvm stops: let the builds in flight finish for ``grace`` seconds, then cancel
        the rest (their VMs are removed) and wait for the roll-back."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout=grace):
                log.warning("stopping: cancelling %d request(s) still in flight", self._in_flight)
                self.ctx.cancel.set()
                self._idle.wait_for(lambda: self._in_flight == 0, timeout=300)

    def _create_all(self, settings: Settings, new: list[Lease], pinned: bool, request_id: str) -> list[Lease]:
        ctx, releaser = self.ctx, self.releaser
        cancel = RequestCancel(ctx.cancel, ctx.requests, request_id)
        futures: dict[str, Future[Lease]] = {}
        if len(new) == 1:  # one VM is made on the calling thread: no hand-off to the create pool
            futures[new[0].id] = _run_here(self.creator.create_one, settings, new[0], pinned, cancel)
        else:
            futures = {
                lease.id: ctx.creates.submit(self.creator.create_one, settings, lease, pinned, cancel) for lease in new
            }
            wait(futures.values())
        ready, failed = [], []
        for lease in new:
            error = futures[lease.id].exception()
            if error is None:
                ready.append(futures[lease.id].result())
            else:
                failed.append((lease, error))
        if failed:
            for lease, error in failed:
                if lease.pooled_at is not None:  # a ready VM it took: its VM runs, and goes with it
                    releaser.release(settings, [lease], [LeaseState.READY], LeaseState.FAILED, str(error))
                else:
                    ctx.leases.finish([lease.id], LeaseState.FAILED, ctx.clock(), str(error), by=Actor.BUILDER)
            if cancel.is_set() and not ctx.cancel.is_set():
                self._cancelled(settings, ready, request_id)
            releaser.roll_back(settings, ready, "another VM of its request failed")  # all or nothing
            first_lease, first_error = failed[0]
            host = settings.host(first_lease.host_ref)
            where = host.display if host else f"host {first_lease.host_ref}"
            others = f"; the other {len(new) - 1} VM(s) of the request were removed" if len(new) > 1 else ""
            raise CreateFailed(f"could not create {first_lease.name} on {where}: {first_error}{others}")
        refused = self.creator.hold(settings, ready)
        if any(lease.pooled_at is not None for lease, _ in refused):
            ready, refused = self._cold_for_refused_warm(settings, ready, refused, pinned, cancel)
        if refused:
            for lease, why in refused:  # its VM is left alone when the host says it is another's
                releaser.release(settings, [lease], [LeaseState.READY], LeaseState.FAILED, str(why))
            not_held = {lease.id for lease, _ in refused}
            releaser.roll_back(settings, [lease for lease in ready if lease.id not in not_held], "another VM failed")
            not_given, why = refused[0]
            others = f"; the other {len(new) - 1} VM(s) of the request were removed" if len(new) > 1 else ""
            raise CreateFailed(f"could not hand out {not_given.name}: {why}{others}")
        try:
            handed, record = self._hand_over([lease.id for lease in ready], request_id)
        except RequestCancelled:
            self._cancelled(settings, ready, request_id)
        except _NotHandedOver:
            # only a process that died and left the request to recover ends a ready lease
            # before its hand-over; nothing that is not alive is ever handed out
            gone = [lease for lease in ready if (ctx.leases.get(lease.id) or lease).state != LeaseState.READY]
            releaser.roll_back(settings, [lease for lease in ready if lease not in gone], "another VM of it was ended")
            raise CreateFailed(
                f"{', '.join(lease.name for lease in gone)} ended before the request could hand it over; "
                "the request's other VMs were removed: ask again"
            ) from None
        except Exception:  # the database failed us: never leave ready leases nobody will hand over
            releaser.roll_back(settings, ready, "the request could not be handed over")
            raise
        ctx.requests.notify(request_id)  # its waiters answer now, not at their next look
        self._report_handed_out(record, handed)
        ctx.report("request_event", "ready", record)
        return handed

    def _cold_for_refused_warm(
        self,
        settings: Settings,
        ready: list[Lease],
        refused: list[tuple[Lease, Exception]],
        pinned: bool,
        cancel: RequestCancel,
    ) -> tuple[list[Lease], list[tuple[Lease, Exception]]]:
        """The ready-pool VMs the host would not hand over are made cold, side by side, and
        held in turn; the request's VMs then, and those still refused (a cold one refused,
        or a replacement that could not be made)."""
        warm = {lease.id: why for lease, why in refused if lease.pooled_at is not None}
        still = [(lease, why) for lease, why in refused if lease.pooled_at is None]

        def replace(lease: Lease) -> Lease | Exception:
            try:
                return self.creator.replace_with_cold(settings, lease, str(warm[lease.id]), pinned, cancel)
            except Exception as e:
                return e

        going = [lease for lease in ready if lease.id in warm]
        outcomes = dict(zip([lease.id for lease in going], self.ctx.side_by_side.map(replace, going), strict=True))
        made = [outcome for outcome in outcomes.values() if isinstance(outcome, Lease)]
        still += [(lease, outcome) for lease in going if isinstance(outcome := outcomes[lease.id], Exception)]
        still += self.creator.hold(settings, made)
        in_order = [outcomes.get(lease.id, lease) for lease in ready]  # the answer keeps the request's order
        return [lease for lease in in_order if isinstance(lease, Lease)], still

    def _hand_over(self, lease_ids: list[str], request_id: str) -> tuple[list[Lease], RequestRecord]:
        """The request turns ready, with its VMs' last stages, and its leases' lifetimes
        start, in one transaction: a cancel and a hand-over that race, the database
        decides, and only one happens. The leases handed over, and the request as it ends."""
        ctx = self.ctx
        with ctx.leases.db.write() as conn:
            record = ctx.requests.transition_to(
                request_id, [RequestState.CREATING], RequestState.READY, by=Actor.BUILDER, conn=conn
            )
            if record is None:
                raise RequestCancelled("the request was cancelled before its VMs were handed over")
            vms = self.tracker.flush(request_id, conn, current=record)  # its VMs' last stages, in the same commit
            if vms is not None:
                record = dataclasses.replace(record, vms=vms)
            handed = ctx.leases.hand_over(conn, lease_ids, ctx.clock())
            if handed is None:
                raise _NotHandedOver()
            return handed, record

    def _cancelled(self, settings: Settings, ready: list[Lease], request_id: str) -> None:
        self.releaser.roll_back(settings, ready, "its request was cancelled")
        self.ctx.requests.end_cancelled(
            request_id,
            [RequestState.CREATING],
            "cancelled by its caller; what was built was removed",
            by=Actor.BUILDER,
        )
        raise RequestCancelled("the request was cancelled; every VM made for it was removed")

    def _report_handed_out(self, record: RequestRecord, handed: list[Lease]) -> None:
        """Time-to-VM, by how each VM came: from a ready pool, made for it, or after waiting."""
        seconds = max(0.0, (record.finished_at or self.ctx.clock()) - record.created_at)
        for lease in handed:
            how = "queued" if record.wait_until is not None else ("warm" if lease.pooled_at else "cold")
            self.ctx.report("handed_out", lease, how, seconds)


def _run_here(work: Callable[..., Lease], *args: object) -> Future[Lease]:
    """``work(*args)`` on this thread, its outcome as a finished future."""
    future: Future[Lease] = Future()
    try:
        future.set_result(work(*args))
    except Exception as e:  # the future carries it, as the create pool's would
        future.set_exception(e)
    return future
