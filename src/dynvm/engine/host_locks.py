"""Which hosts' locks a getservers takes (``Admission.reserve``).

Every reservation is inserted with its host's lock held, and the room it takes is decided
by what is reserved as read with that lock held: that is what keeps a host from being
over-committed, by one replica or several. Most reservations lock every host. A getservers
on PostgreSQL whose decision depends on its hosts alone locks only the hosts it places on
(``may_lock_narrowly``), so that two of them on different hosts do not wait for each other:
it places its VMs as the reservations read without a lock say, locks the hosts chosen
(``lock_the_hosts_it_would_place_on``), reads the reservations again and places them again
among those hosts (``place_on_locked``). When their room went to another request between
the two reads it starts over with every host locked (``RoomTakenMeanwhile``).
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from ..config import Settings
from ..model import LeaseRequest, NotEnoughCapacity
from ..states import RequestState
from . import placement
from .capacity import Capacity
from .context import EngineContext
from .ready_stock import ReadyStock


class RoomTakenMeanwhile(Exception):
    """The room of the hosts a getservers chose went to others between its read without a
    lock and its read with their locks (``HostLocks.place_on_locked``)."""


class HostLocks:
    def __init__(self, ctx: EngineContext, capacity: Capacity, stock: ReadyStock) -> None:
        self.ctx = ctx
        self.capacity = capacity
        self.stock = stock

    def may_lock_narrowly(self, settings: Settings, request: LeaseRequest, immediate: bool) -> bool:
        """A getservers may lock only the hosts it places on when what it decides depends on
        those hosts alone: on PostgreSQL (SQLite's writers take turns: nothing to gain), for
        a request that does not wait (the queue's turn is weighed over every host), with no
        per-user quota (counted over every host) and no ready pool it could take from (which
        idle VM another request took is seen with every host locked)."""
        quota = settings.quota
        return (
            immediate
            and not self.ctx.leases.db.is_sqlite
            and not quota.vms_per_user
            and not quota.memory_per_user
            and not self.stock.eligible(settings, request.os, request.cpus, request.memory)
        )

    def lock_the_hosts_it_would_place_on(
        self, conn: Connection, settings: Settings, request: LeaseRequest
    ) -> list[str] | None:
        """Place the request's VMs (all made cold) as the reservations read without a lock
        say, and lock the hosts chosen, with every section that names the same pool as one
        of them (a replica that does not know yet that they are one pool places on that
        section, and locks it); the refs locked. None when it is every host's lock that
        must decide (nothing is locked then): requests wait (whether this one may go before
        them is weighed over every host), or that read finds no room (the refusal then says
        why, host by host, after the names are checked).

        The queue is read here, before the lock: a request that joins it meanwhile is not
        waited for (a request joins the queue without any host's lock, so a getservers with
        every host locked has the same moment of not knowing, only shorter)."""
        if self.ctx.requests.in_state(RequestState.QUEUED, conn=conn):
            return None
        seen = self._candidates(settings, request, self.capacity.reservations(conn))
        try:
            guess = placement.place(request.count, request.os, seen)
        except NotEnoughCapacity:
            return None
        chosen = {choice.host.ref for choice in guess}
        refs = sorted(
            chosen | {ref for ref, counted_by in self.capacity.same_pools(settings).items() if counted_by in chosen}
        )
        self.ctx.leases.lock_hosts(conn, refs)
        return refs

    def place_on_locked(
        self, conn: Connection, settings: Settings, request: LeaseRequest, refs: list[str]
    ) -> list[placement.Placement]:
        """Place the request's VMs among the hosts ``refs`` whose locks this transaction
        holds, as the reservations read now say: every reservation on a host is inserted
        with that host's lock held, so this is what their room really is. Raises
        ``RoomTakenMeanwhile`` when their room went to others since the read without a lock."""
        locked = [
            c for c in self._candidates(settings, request, self.capacity.reservations(conn)) if c.host.ref in refs
        ]
        try:
            return placement.place(request.count, request.os, locked)
        except NotEnoughCapacity:
            raise RoomTakenMeanwhile from None

    def _candidates(
        self, settings: Settings, request: LeaseRequest, reserved: list[dict[str, object]]
    ) -> list[placement.Candidate]:
        return self.capacity.candidates(settings, request.os, request.cpus, request.memory, reserved, request.host_ref)
