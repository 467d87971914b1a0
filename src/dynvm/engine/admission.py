"""Admission: whether a request may have VMs, and the one transaction that gives it room.

``validate`` refuses at once what can never be served as asked. ``reserve`` names the VMs
(SPEC.md §1), then, in one write transaction, locks the hosts, refuses names held by a
lease or by any VM on any host, reads what is reserved, takes idle ready-pool VMs first and
places the rest, checks the quota, and inserts the leases with their reservations: two
requests never both get the last slot. The same lock-and-place transaction
(``_locked``, ``_place_one``) serves a create that moves to another host (``place_again``),
a ready VM made cold (``reserve_in_place_of``) and a pools pass's refills (``reserve_pool_vms``).

Which hosts' locks: ``host_locks.py``. Names that could clash are checked one after the
other under the lock of their root (``LeaseStore.lock_names``), and with a host's lock held
(a replica of the version before checks them with every host locked, and takes no root's).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Connection

from ..bounds import capped_lifetime_minutes
from ..config import Settings
from ..model import (
    BadRequest,
    Lease,
    LeaseRequest,
    NotEnoughCapacity,
    QuotaExceeded,
    ShuttingDown,
    name_root,
    vm_names,
)
from ..states import RequestState
from ..store.leases import reservation_row
from ..store.requests import RequestRecord
from . import names, placement
from .capacity import Capacity
from .context import EngineContext
from .host_locks import HostLocks, RoomTakenMeanwhile
from .queue_policy import QueuePolicy
from .quota import check_quota
from .ready_stock import POOL_USER, ReadyStock, pool_name

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, ctx: EngineContext, capacity: Capacity, stock: ReadyStock, policy: QueuePolicy) -> None:
        self.ctx = ctx
        self.capacity = capacity
        self.stock = stock
        self.policy = policy
        self.host_locks = HostLocks(ctx, capacity, stock)

    # -- refusing at once --------------------------------------------------------------

    def counted_host(self, request: LeaseRequest) -> LeaseRequest:
        """A request pinned (``xhostref``) to a section that names the same pool as an
        earlier one goes to that earlier one, which counts the pool."""
        host = self.ctx.settings().host(request.host_ref) if request.host_ref is not None else None
        status = self.ctx.provider.status(host) if host is not None else None
        if status is None or not status.same_pool_as:
            return request
        return dataclasses.replace(request, host_ref=status.same_pool_as)

    def validate(self, request: LeaseRequest) -> None:
        """Refuse, at once, a request that can never be served as asked (a count over the
        limit, an unknown OS, a host that does not exist or lacks the OS). Cheap: reads
        only the configuration."""
        self.ctx.refuse_if_contested()
        settings = self.ctx.settings()
        if request.count > settings.quota.max_count_per_request:
            raise QuotaExceeded(
                f"count {request.count} is over the limit of {settings.quota.max_count_per_request} VMs per request "
                "([quota] max.count.per.request)"
            )
        self.capacity.check_os(settings, request.os)
        if request.host_ref is not None:
            host = settings.host(request.host_ref)
            if host is None:
                refs = ", ".join(h.ref for h in settings.hosts)
                raise BadRequest(f"no host {request.host_ref}; xhostref is one of: {refs}")
            if request.os not in host.templates:
                raise BadRequest(
                    f"host {request.host_ref} has no {request.os} template; choose another xhostref or leave it out"
                )

    def refuse_names_taken(self, request: LeaseRequest) -> None:
        """409 when the request's names are leased, or fall under another user's prefix."""
        names.refuse_taken(self.ctx, request)

    # -- the lock-and-place transaction ------------------------------------------------

    @contextmanager
    def _locked(self, settings: Settings) -> Iterator[tuple[Connection, list[dict[str, object]]]]:
        """A write transaction with every host's lock taken, and what is reserved as read
        under those locks (a getservers may lock fewer: ``reserve``)."""
        with self.ctx.leases.db.write() as conn:
            self.ctx.leases.lock_hosts(conn, [h.ref for h in settings.hosts])
            yield conn, self.capacity.reservations(conn)

    def _locked_candidates(
        self,
        settings: Settings,
        reserved: list[dict[str, object]],
        os: str,
        cpus: int | None,
        memory: int | None,
        only: str | None = None,
        exclude: Iterable[str] = (),
        refused: Iterable[tuple[str, str]] = (),
    ) -> list[placement.Candidate]:
        """Candidates as the locked transaction sees them: not on hosts in ``exclude``, nor
        on a (host, member) in ``refused``."""
        excluded, refused = set(exclude), list(refused)
        return [
            placement.without_members(c, {member for host, member in refused if host == c.host.ref})
            for c in self.capacity.candidates(settings, os, cpus, memory, reserved, only)
            if c.host.ref not in excluded
        ]

    def _place_one(
        self,
        settings: Settings,
        reserved: list[dict[str, object]],
        os: str,
        cpus: int | None = None,
        memory: int | None = None,
        only: str | None = None,
        exclude: Iterable[str] = (),
        refused: Iterable[tuple[str, str]] = (),
    ) -> placement.Placement | None:
        """Where one VM goes, inside the locked transaction; None when nowhere has room."""
        return placement.Spread(
            self._locked_candidates(settings, reserved, os, cpus, memory, only, exclude, refused)
        ).take()

    def reserve(
        self,
        settings: Settings,
        request: LeaseRequest,
        request_id: str,
        immediate: bool,
        record: RequestRecord | None = None,
    ) -> list[Lease]:
        """Name the VMs, reserve their room, insert their leases and write them into the
        request's row, in one transaction; ready-pool VMs of the OS are taken first, the
        rest made cold. ``immediate``: a
        request that does not wait, which may take room (or ready VMs) only if that delays
        no queued request (``QueuePolicy.may_serve_now``). ``record``: the request's row,
        written by this transaction unless it exists (a request that does not wait: one
        refused leaves no row).

        Its locks: its names' root's, then every host's or only those it places on
        (``host_locks.py``); if their room was taken meanwhile, again with every host's."""
        if self.ctx.stopping.is_set():
            raise ShuttingDown("dynvm is stopping; try again in a moment")
        self.validate(request)
        if self.host_locks.may_lock_narrowly(settings, request, immediate):
            try:
                return self._reserve(settings, request, request_id, immediate, record, narrowly=True)
            except RoomTakenMeanwhile:
                log.debug(
                    "request %s: the room of the hosts it chose was taken meanwhile; again, locking every host",
                    request_id,
                )
        return self._reserve(settings, request, request_id, immediate, record, narrowly=False)

    def _reserve(
        self,
        settings: Settings,
        request: LeaseRequest,
        request_id: str,
        immediate: bool,
        record: RequestRecord | None,
        narrowly: bool,
    ) -> list[Lease]:
        ctx = self.ctx
        wanted = vm_names(request.username, request.count)
        now = ctx.clock()
        lifetime = capped_lifetime_minutes(settings, request.expires_in_minutes) * 60
        with ctx.leases.db.write() as conn:
            # a name prefix has no unique index: two requests whose names could clash
            # check them one after the other, under the lock of their names' root...
            ctx.leases.lock_names(conn, name_root(request.username))
            hosts = self.host_locks.lock_the_hosts_it_would_place_on(conn, settings, request) if narrowly else None
            if hosts is None:
                ctx.leases.lock_hosts(conn, [h.ref for h in settings.hosts])
            # ...and of at least one host: a replica of an older version, which takes no
            # root's lock, checks them with every host locked
            names.refuse_taken(ctx, request, conn)
            names.refuse_on_hosts(ctx, settings, wanted)  # the hosts' mirrors: no database read
            warm: list[Lease] = []
            if hosts is not None:
                chosen = self.host_locks.place_on_locked(conn, settings, request, hosts)
            else:
                warm, chosen = self._choose_with_every_host_locked(conn, settings, request, request_id, immediate)
            cold_names = wanted[len(warm) :]
            memory = [lease.memory for lease in warm] + [c.need.static_max for c in chosen]
            check_quota(ctx, settings, request, memory, conn)
            taken = []
            for name, lease in zip(wanted, warm, strict=False):
                mine = dataclasses.replace(
                    lease,
                    request_id=request_id,
                    name=name,
                    username=request.username,
                    caller=request.caller,
                    owner=ctx.owner,
                    created_at=now,
                    expires_at=now + lifetime,
                )
                if not ctx.leases.take_pooled(conn, lease, mine):
                    raise NotEnoughCapacity(f"a ready {request.os} VM went away as it was taken; ask again")
                taken.append(
                    dataclasses.replace(
                        mine, pooled=False, created_at=lease.created_at, expires_at=lease.created_at + lifetime
                    )
                )
            new = [
                choice.new_lease(
                    request_id=request_id,
                    name=name,
                    username=request.username,
                    os=request.os,
                    owner=ctx.owner,
                    now=now,
                    lifetime_seconds=lifetime,
                    caller=request.caller,
                )
                for name, choice in zip(cold_names, chosen, strict=True)
            ]
            if new:
                ctx.leases.insert(conn, new, [choice.need.memory for choice in chosen])
            progress = [
                {"name": lease.name, "host": lease.host_ref, "stage": "reserved", "ip": None, "error": None}
                for lease in taken + new
            ]
            # its VMs, as the request's status shows them: in its row as it is written, or into the row
            if record is None or not ctx.requests.ensure(dataclasses.replace(record, vms=progress), conn):
                ctx.requests.set_vms(request_id, progress, conn)
        new = taken + new
        log.info(
            "request %s: %s x %s for %s on host(s) %s%s",
            request_id,
            request.count,
            request.os,
            request.username,
            ", ".join(sorted({lease.host_ref for lease in new})),
            f" ({len(taken)} from the ready pool)" if taken else "",
        )
        return new

    def _choose_with_every_host_locked(
        self, conn: Connection, settings: Settings, request: LeaseRequest, request_id: str, immediate: bool
    ) -> tuple[list[Lease], list[placement.Placement]]:
        """With every host locked, choose: the ready VMs the request takes, and where the
        rest are made. Refuses when they do not fit, or would delay a queued request."""
        ctx = self.ctx
        reserved = self.capacity.reservations(conn)
        queued = ctx.requests.in_state(RequestState.QUEUED, conn=conn) if immediate else []
        ready = []
        takes = self.stock.eligible(settings, request.os, request.cpus, request.memory)
        if takes and not any(r.os == request.os for r in queued):
            # read with the hosts locked, so what another request took is seen taken
            # (and those who wait for this OS are served from its pool first)
            ready = self.stock.idle(settings, request.os, request.host_ref, limit=request.count, conn=conn)
        warm = ready[: request.count]
        cold = request.count - len(warm)
        if not cold:
            return warm, []
        try:
            candidates = self._locked_candidates(
                settings, reserved, request.os, request.cpus, request.memory, only=request.host_ref
            )
            chosen = placement.place(cold, request.os, candidates)
        except NotEnoughCapacity as e:
            raise NotEnoughCapacity(self.capacity.explain_shortage(settings, str(e), request)) from None
        record = dataclasses.replace(RequestRecord.of(request, request_id), count=cold)
        if queued and not self.policy.may_serve_now(settings, reserved, record, queued):
            raise NotEnoughCapacity(
                f"not enough capacity for {request.count} {request.os} VM(s) now: {len(queued)} request(s) "
                "wait in the queue for the room it would take; ask with wait=<minutes> to queue behind them"
            )
        return warm, chosen

    def place_again(
        self,
        settings: Settings,
        lease: Lease,
        exclude: set[str],
        refused: Iterable[tuple[str, str]] = (),
        only: str | None = None,
    ) -> Lease | None:
        """Place a lease still being created again, its own reservation aside: on a host
        not in ``exclude`` (``only``: that host), on no member in ``refused``."""
        with self._locked(settings) as (conn, reserved):
            reserved = [r for r in reserved if r["lease_id"] != lease.id]
            choice = self._place_one(settings, reserved, lease.os, lease.cpus, lease.memory, only, exclude, refused)
            if choice is None:
                return None
            return self.ctx.leases.move(
                conn,
                lease.id,
                choice.host.ref,
                choice.need.cpus,
                choice.need.static_max,
                choice.need.disk,
                choice.need.template,
                reserve_memory=choice.need.memory,
                member=choice.member or None,
            )

    def reserve_in_place_of(self, settings: Settings, lease: Lease, only: str | None = None) -> Lease | None:
        """A VM for the request of ``lease``, a ready-pool VM it took that cannot be handed
        out (and has ended): the same name, user and lifetime, its template's size, placed
        now (``only``: on that host). None when no host has room. Its quota and its place
        in the queue were counted when the request took the ready VM."""
        with self._locked(settings) as (conn, reserved):
            choice = self._place_one(settings, reserved, lease.os, only=only)
            if choice is None:
                return None
            new = choice.new_lease(
                request_id=lease.request_id,
                name=lease.name,
                username=lease.username,
                os=lease.os,
                owner=self.ctx.owner,
                now=self.ctx.clock(),
                lifetime_seconds=lease.lifetime,
                caller=lease.caller,
            )
            self.ctx.leases.insert(conn, [new], [choice.need.memory])
        return new

    def reserve_pool_vms(
        self,
        settings: Settings,
        wanted: list[tuple[str, int]],
        busy: Counter[str],
        blocked: set[str],
        headroom: int = 0,
    ) -> list[Lease]:
        """Reserve room for a pools pass's ready VMs, in one transaction: for each (OS, how
        many) in turn, one VM at a time on the host with most room that is not in
        ``blocked`` nor making ``[pools] refill.per.host`` VMs already (counted in ``busy``,
        which this updates). An OS stops at the first VM that has no such host, would
        leave room for no more than ``headroom`` VMs of it (room kept free for the requests
        expected while it is made), or would delay a queued request."""
        per_host = settings.ready_pools.refill_per_host

        def is_open(c: placement.Candidate) -> bool:
            return c.host.ref not in blocked and busy[c.host.ref] < per_host

        made: list[Lease] = []
        memory: list[int] = []
        with self._locked(settings) as (conn, reserved):
            reserved = list(reserved)  # and, as they are placed, this pass's own
            queued = self.ctx.requests.in_state(RequestState.QUEUED, conn=conn)
            # every host's room weighed once for all the OSes: a VM placed takes its room
            # there (``Spread.take``), and the next OS's candidates share that room
            rooms = self.capacity.rooms(settings, reserved)
            for os, count in wanted:
                spread = placement.Spread(self.capacity.candidates(settings, os, None, None, reserved, rooms=rooms))
                for _ in range(count):
                    if headroom > 0 and spread.available() <= headroom:
                        break
                    record = RequestRecord.of(LeaseRequest(username=POOL_USER, os=os, count=1), str(uuid.uuid4()))
                    # (with no queue it may: then take() alone says whether an open host has room)
                    if queued and (
                        spread.available(is_open) < 1
                        or not self.policy.may_serve_now(settings, reserved, record, queued)
                    ):
                        break
                    choice = spread.take(is_open)
                    if choice is None:
                        break
                    lease = choice.new_lease(
                        request_id=record.id,
                        name=pool_name(os),
                        username=POOL_USER,
                        os=os,
                        owner=self.ctx.owner,
                        now=self.ctx.clock(),
                        lifetime_seconds=settings.ready_pools.ready_ttl_minutes * 60,
                        pooled=True,
                    )
                    made.append(lease)
                    memory.append(choice.need.memory)
                    reserved.append(reservation_row(lease, choice.need.memory))
                    busy[lease.host_ref] += 1
            if made:
                self.ctx.leases.insert(conn, made, memory)
        return made
