"""How the ready pools give way to demand: a ready VM never holds room a request needs.

- A request that does not fit takes the room of idle ready VMs of other OSes (the newest
  first), and, when that is not enough, of those this process is still making: their
  creates stop and give the room back (``make_room``).
- While requests wait, every waiting request is given what ``make_room`` gives it, except
  the idle VMs the queue will take itself (``make_way``, from the scheduler's pass).
- When a request last waited or was refused for room (``short_within``): the pools' pass
  refills nothing within one create time of it.

The pools' pass, its targets and its refills are ``ready_pools.py``'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..config import Settings
from ..model import Lease, LeaseRequest
from ..states import LeaseState
from ..store.requests import RequestRecord
from . import placement
from .capacity import Capacity
from .context import EngineContext
from .ready_stock import ReadyStock, give_back, is_idle, oldest_first
from .release import Releaser

log = logging.getLogger(__name__)


class GivingWay:
    def __init__(self, ctx: EngineContext, stock: ReadyStock, capacity: Capacity, releaser: Releaser) -> None:
        self.ctx = ctx
        self.stock = stock
        self.capacity = capacity
        self.releaser = releaser
        self._clock: Callable[[], float] = ctx.clock
        self._short_at = float("-inf")  # when a request last waited, or was refused, for room
        self._making: dict[str, threading.Event] = {}  # lease id -> its stop, for the ready VMs this process makes
        self._lock = threading.Lock()

    # -- the ready VMs being made ----------------------------------------------------------

    def making(self, lease_id: str) -> threading.Event:
        """A ready VM's create begins: the event that stops it."""
        stop = threading.Event()
        with self._lock:
            self._making[lease_id] = stop
        return stop

    def made(self, lease_id: str) -> None:
        """Its create ended, made, stopped or failed."""
        with self._lock:
            self._making.pop(lease_id, None)

    # -- shortage --------------------------------------------------------------------------

    def short_now(self) -> None:
        self._short_at = self._clock()

    def short_within(self, seconds: float) -> bool:
        """A request waited or was refused for room less than ``seconds`` ago."""
        return self._clock() - self._short_at < seconds

    # -- giving way ------------------------------------------------------------------------

    def make_room(
        self,
        settings: Settings,
        request: LeaseRequest,
        count: int,
        keep: set[str] = frozenset(),  # type: ignore[assignment]  # read only
        pooled: list[Lease] | None = None,
    ) -> list[Lease]:
        """A request for ``count`` more VMs than fit now: destroy idle ready VMs (of any OS
        but those it could take itself, and but ``keep``), the newest first, and if that is
        not enough stop those this process is still making, until they would fit; the VMs
        taken off the pools, [] when they fit already or even that would not be enough
        (then nothing is touched). A stopped create gives its room back once it has
        removed what it made (the caller tries again for ``ROOM_SHOWS_WITHIN``). ``pooled``:
        the pools' VMs as the caller read them."""
        self.short_now()
        # then its own OS's ready VMs are its to take
        own = self.stock.eligible(settings, request.os, request.cpus, request.memory)
        with self._lock:
            making = dict(self._making)
        idle, being_made = [], []
        for lease in self.ctx.leases.pooled() if pooled is None else pooled:
            if lease.id in keep or (own and lease.os == request.os):
                continue
            if request.host_ref is not None and lease.host_ref != request.host_ref:
                continue
            if lease.state == LeaseState.READY:
                idle.append(lease)
            elif lease.state == LeaseState.CREATING and lease.id in making:
                being_made.append(lease)
        if not idle and not being_made:
            return []
        reserved = self.capacity.reserved_now()
        candidates = self.capacity.candidates(
            settings, request.os, request.cpus, request.memory, reserved, request.host_ref
        )
        if not candidates or placement.available(candidates) >= count:
            return []
        victims: list[Lease] = []
        newest_first = [
            *sorted(idle, key=oldest_first, reverse=True),
            *sorted(being_made, key=oldest_first, reverse=True),
        ]
        for lease in newest_first:
            if placement.available(candidates) >= count:
                break
            target = next((c for c in candidates if c.host.ref == lease.host_ref), None)
            if target is None:
                continue
            give_back(target.room, lease)
            victims.append(lease)
        if placement.available(candidates) < count:
            return []
        ready = [lease for lease in victims if lease.state == LeaseState.READY]
        reason = "recycled: its room went to a request"
        self.releaser.release(settings, ready, [LeaseState.READY], LeaseState.RELEASED, reason, pooled=True)
        for lease in victims:
            if lease.id in making:
                making[lease.id].set()
        log.info("ready pools: recycled %s to make room for %s", ", ".join(v.name for v in victims), request.username)
        return victims

    def make_way(self, settings: Settings, pooled: list[Lease], waiting: list[RequestRecord]) -> list[str]:
        """Requests wait: for each in turn, what ``make_room`` gives it, but never the idle
        VMs the waiting requests will take themselves (per OS, as many as they ask for, the
        oldest). ``pooled``: the pools' VMs as read once for this pass. The names taken off."""
        self.short_now()
        with self._lock:
            making = set(self._making)
        idle = sorted((lease for lease in pooled if is_idle(lease)), key=oldest_first)
        if not idle and not any(lease.id in making for lease in pooled):
            return []  # nothing holds room that could make way (the usual pass of a lab without pools)
        queue_takes: set[str] = set()  # idle VMs the waiting requests will take themselves, the oldest
        cold: list[tuple[RequestRecord, int]] = []  # each waiting request, and how many of its VMs need room
        for record in waiting:
            warm: list[Lease] = []
            if self.stock.eligible(settings, record.os, record.cpus, record.memory):
                free = [
                    lease
                    for lease in idle
                    if lease.os == record.os
                    and lease.id not in queue_takes
                    and record.host_ref in (None, lease.host_ref)
                ]
                warm = free[: record.count]
                queue_takes |= {lease.id for lease in warm}
            cold.append((record, record.count - len(warm)))
        recycled: list[str] = []
        for record, count in cold:
            if count > 0:
                victims = self.make_room(settings, record.request(), count, keep=queue_takes, pooled=pooled)
                recycled += [lease.name for lease in victims]
                gone = {lease.id for lease in victims}
                pooled = [lease for lease in pooled if lease.id not in gone]
        if recycled:
            self.ctx.room_freed.set()
        return recycled


class MakingCancel:
    """What a ready-pool VM's create checks between its steps: dynvm stopping, or the VM
    making way for a request (``GivingWay.make_room``)."""

    def __init__(self, stopping: threading.Event, stop: threading.Event) -> None:
        self._stopping = stopping
        self._stop = stop

    def is_set(self) -> bool:
        return self._stopping.is_set() or self._stop.is_set()
