"""Leases and reservations in the database: the only code that writes those tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Connection, delete, false, func, insert, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from ..model import CreatedVm, Lease, NameInUse, RequestCancelled
from .db import Database
from .tables import (
    ACTIVE_STATES,
    abandoned_clones,
    host_locks,
    installation,
    leases,
    replicas,
    requests,
    reservations,
)

LEASE_FIELDS = [c.name for c in leases.columns]


def _lease(row: object) -> Lease:
    return Lease(**{name: getattr(row, name) for name in LEASE_FIELDS})


class LeaseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reading -----------------------------------------------------------------------

    def active(self, conn: Connection | None = None) -> list[Lease]:
        return self._select(leases.c.state.in_(ACTIVE_STATES), conn)

    def by_name(self, names: Iterable[str], conn: Connection | None = None) -> list[Lease]:
        """Active leases of these names; ready-pool VMs are nobody's lease yet and never match."""
        where = leases.c.name.in_(list(names)) & leases.c.state.in_(ACTIVE_STATES) & (leases.c.pooled == false())
        return self._select(where, conn)

    def held_by_others(self, caller: str | None, first: str, conn: Connection | None = None) -> list[Lease]:
        """Active leases of authenticated callers other than ``caller`` (all of them for an
        anonymous one) whose names start with ``first`` (every name that can share a
        prefix with a request starting so)."""
        pattern = first.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where = (
            leases.c.state.in_(ACTIVE_STATES)
            & (leases.c.pooled == false())
            & leases.c.caller.is_not(None)
            & leases.c.name.like(pattern, escape="\\")
        )
        if caller is not None:
            where = where & (leases.c.caller != caller)
        return self._select(where, conn)

    def released_names(self, names: Iterable[str], request_ids: Iterable[str]) -> set[str]:
        """Which of these names a lease of these requests held and that was released: what
        an earlier try of the same release already did (never another request's names)."""
        wanted, requests_of = list(names), list(request_ids)
        if not wanted or not requests_of:
            return set()
        query = select(leases.c.name).where(
            leases.c.name.in_(wanted)
            & leases.c.request_id.in_(requests_of)
            & (leases.c.state == "released")
            & (leases.c.pooled == false())
        )
        with self.db.read() as conn:
            return {name for (name,) in conn.execute(query)}

    def held(self, conn: Connection | None = None) -> list[Lease]:
        """Active leases a request made or took: not the ready pools' VMs."""
        return self._select(leases.c.state.in_(ACTIVE_STATES) & (leases.c.pooled == false()), conn)

    def pooled(self, conn: Connection | None = None) -> list[Lease]:
        """The ready pools' VMs: being made (``creating``), ready, or being recycled."""
        return self._select(leases.c.state.in_(ACTIVE_STATES) & (leases.c.pooled == true()), conn)

    def ever_pooled(self) -> list[Lease]:
        """Every lease that was made as a ready-pool VM, in any state, handed out or not."""
        return self._select((leases.c.pooled == true()) | leases.c.pooled_at.is_not(None))

    def pool_counts(self, since: float) -> dict[str, tuple[int, int]]:
        """Per OS, since ``since``: ready-pool VMs handed out to a request, and those that
        ended without one (recycled: stale, dead, surplus, or making room)."""
        query = select(leases.c.os, leases.c.pooled, leases.c.state).where(
            leases.c.pooled_at.is_not(None) & (leases.c.pooled_at >= since)
        )
        out: dict[str, tuple[int, int]] = {}
        with self.db.read() as conn:
            for row in conn.execute(query):
                handed, recycled = out.get(row.os, (0, 0))
                if not row.pooled:
                    handed += 1
                elif row.state not in ACTIVE_STATES:
                    recycled += 1
                out[row.os] = (handed, recycled)
        return out

    def by_request(self, request_id: str) -> list[Lease]:
        return self._select(leases.c.request_id == request_id)

    def get(self, lease_id: str) -> Lease | None:
        found = self._select(leases.c.id == lease_id)
        return found[0] if found else None

    def expired(self, now: float) -> list[Lease]:
        """Ready leases past their expiry. A lease whose request has not handed it over yet
        (its other VMs are still being made) never expires: its lifetime has not begun."""
        return self._select(
            (leases.c.state == "ready") & leases.c.handed_over_at.is_not(None) & (leases.c.expires_at <= now)
        )

    def page(
        self, user: str | None = None, os: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Lease], int]:
        """Held leases, the latest handed out first (a ready-pool VM counts from when it was
        taken), for a list that pages (the dashboard): those whose user or caller contains
        ``user`` (any case) and of ``os``; and how many match in all."""
        where = leases.c.state.in_(ACTIVE_STATES) & (leases.c.pooled == false())
        if user:
            pattern = "%" + user.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where &= leases.c.username.ilike(pattern, escape="\\") | leases.c.caller.ilike(pattern, escape="\\")
        if os:
            where &= leases.c.os == os
        latest = func.coalesce(leases.c.handed_over_at, leases.c.created_at)
        query = select(leases).where(where).order_by(latest.desc(), leases.c.name).limit(limit)
        with self.db.read() as conn:
            total = int(conn.execute(select(func.count()).select_from(leases).where(where)).scalar_one())
            return [_lease(row) for row in conn.execute(query.offset(offset))], total

    def held_oses(self) -> list[str]:
        """The OSes of held leases (what a filter offers)."""
        query = select(leases.c.os).where(leases.c.state.in_(ACTIVE_STATES) & (leases.c.pooled == false()))
        with self.db.read() as conn:
            return sorted(row.os for row in conn.execute(query.distinct()))

    def use_by_host(self) -> dict[str, tuple[int, int, int]]:
        """Per host ref: dynvm's VMs there (held, pooled or being made), their vCPUs and
        memory, summed by the database."""
        query = (
            select(leases.c.host_ref, func.count(), func.sum(leases.c.cpus), func.sum(leases.c.memory))
            .where(leases.c.state.in_(ACTIVE_STATES))
            .group_by(leases.c.host_ref)
        )
        with self.db.read() as conn:
            return {ref: (int(n), int(cpus or 0), int(memory or 0)) for ref, n, cpus, memory in conn.execute(query)}

    def installation_id(self) -> str:
        """This installation's id (made once by migration 0006, kept for ever)."""
        with self.db.read() as conn:
            return str(conn.execute(select(installation.c.id)).scalar_one())

    def claim_mark(self) -> tuple[int, str | None]:
        """The sequence number and token of the last claim this database wrote on the hosts."""
        with self.db.read() as conn:
            row = conn.execute(select(installation.c.claim_seq, installation.c.claim_token)).one()
            return int(row.claim_seq), row.claim_token

    def record_claim(self, seq: int, token: str) -> bool:
        """Remember a claim about to be written on the hosts; False when this database
        already remembers a later one (another replica renewed it meanwhile)."""
        with self.db.write() as conn:
            done = conn.execute(
                update(installation).where(installation.c.claim_seq < seq).values(claim_seq=seq, claim_token=token)
            )
            return done.rowcount == 1

    def become_new_installation(self, new_id: str, now: float, reason: str) -> tuple[str, int]:
        """Give this database a new installation id (``dynvm installation new``): every
        lease still active ends without its VM being touched (the VM is the old
        installation's), and nothing of the old installation is waited for. Returns the
        old id and how many leases ended."""
        with self.db.write() as conn:
            old = str(conn.execute(select(installation.c.id)).scalar_one())
            ended = conn.execute(
                update(leases)
                .where(leases.c.state.in_(ACTIVE_STATES))
                .values(state="released", released_at=now, error=reason)
            ).rowcount
            conn.execute(delete(reservations))
            conn.execute(delete(abandoned_clones))
            conn.execute(  # the old installation's callers asked it, not this one
                update(requests)
                .where(requests.c.state.in_(["queued", "creating"]))
                .values(state="cancelled", finished_at=now, error=reason, error_status=503)
            )
            conn.execute(update(installation).values(id=new_id, created_at=now, claim_seq=0, claim_token=None))
            return old, int(ended or 0)

    def in_state(self, *states: str) -> list[Lease]:
        return self._select(leases.c.state.in_(states))

    def _select(self, where: object, conn: Connection | None = None) -> list[Lease]:
        query = select(leases).where(where).order_by(leases.c.name)  # type: ignore[arg-type]
        if conn is not None:
            return [_lease(row) for row in conn.execute(query)]
        with self.db.read() as own:
            return [_lease(row) for row in own.execute(query)]

    def recent_ended(self, limit: int = 2000) -> list[Lease]:
        """The leases that ended last (released or expired, after a hand-over): what the
        queue's forecast learns create and hold times from."""
        query = (
            select(leases)
            .where(leases.c.state.in_(["released", "expired"]) & leases.c.handed_over_at.is_not(None))
            .order_by(leases.c.released_at.desc())
            .limit(limit)
        )
        with self.db.read() as conn:
            return [_lease(row) for row in conn.execute(query)]

    def pending_reservations(self, conn: Connection) -> list[dict[str, object]]:
        """Reservations of creates still in flight, with the lease they belong to."""
        return [dict(row._mapping) for row in conn.execute(select(reservations))]

    # -- writing -----------------------------------------------------------------------

    def lock_hosts(self, conn: Connection, refs: Sequence[str]) -> None:
        """Take the hosts' row locks for the rest of the transaction.

        Why row locks: a reservation reads what is reserved, decides, then inserts; two
        replicas doing that at once on PostgreSQL (READ COMMITTED) could both see the last
        slot free. ``SELECT ... FOR UPDATE`` on one row per host makes the second wait until
        the first commits, and its reads then see the first's reservations. Rows are created
        on first use (``ON CONFLICT DO NOTHING``, so replicas may race to create them).
        SQLite has no row locks: ``Database.write()`` opens BEGIN IMMEDIATE, which
        serialises writers for the whole database instead, so there is nothing to take."""
        if not refs or self.db.is_sqlite:
            return
        dialect = sqlite if self.db.is_sqlite else postgresql
        conn.execute(dialect.insert(host_locks).values([{"ref": ref} for ref in refs]).on_conflict_do_nothing())
        conn.execute(
            select(host_locks.c.ref).where(host_locks.c.ref.in_(refs)).order_by(host_locks.c.ref).with_for_update()
        )

    def insert(self, conn: Connection, new: Sequence[Lease], reserve_memory: Sequence[int] | None = None) -> None:
        """Insert leases in state ``creating`` with their reservations; a name already held
        by an active lease raises ``NameInUse`` (the partial unique index decides).
        ``reserve_memory``: what each reservation holds of the host's memory (the VM's
        memory plus xapi's overhead for it); by default the lease's memory."""
        reserve = list(reserve_memory) if reserve_memory is not None else [lease.memory for lease in new]
        try:
            conn.execute(insert(leases), [{f: getattr(lease, f) for f in LEASE_FIELDS} for lease in new])
        except IntegrityError:
            raise NameInUse("a VM name of this request is already in use by another lease") from None
        conn.execute(
            insert(reservations),
            [
                {
                    "lease_id": lease.id,
                    "host_ref": lease.host_ref,
                    "member": lease.member,
                    "cpus": lease.cpus,
                    "memory": memory,
                    "disk": lease.disk,
                    "owner": lease.owner,
                    "created_at": lease.created_at,
                }
                for lease, memory in zip(new, reserve, strict=True)
            ],
        )

    def mark_ready(self, lease_id: str, vm: CreatedVm, now: float, owner: str) -> Lease | None:
        """The lease's VM is ready. None (nothing changed) if the lease is no longer being
        created by ``owner``: another replica took it for dead and failed it meanwhile."""
        with self.db.write() as conn:
            done = conn.execute(
                update(leases)
                .where((leases.c.id == lease_id) & (leases.c.state == "creating") & (leases.c.owner == owner))
                .values(
                    state="ready",
                    vm_uuid=vm.uuid,
                    vm_ref=vm.ref,
                    ip=vm.ip,
                    os_version=vm.os_version.get("name", ""),
                    cpus=vm.cpus,
                    memory=vm.memory,
                    disk=vm.disk,
                    template=vm.template,
                    member=vm.member or None,
                    ready_at=now,
                    create_seconds=vm.create_seconds,
                )
            )
            if done.rowcount != 1:
                return None
            conn.execute(delete(reservations).where(reservations.c.lease_id == lease_id))
            return _lease(conn.execute(select(leases).where(leases.c.id == lease_id)).one())

    def finish(self, lease_ids: Sequence[str], state: str, now: float, error: str | None = None) -> None:
        """End leases (``released``, ``expired``, ``failed``) and free their reservations."""
        if not lease_ids:
            return
        with self.db.write() as conn:
            conn.execute(
                update(leases).where(leases.c.id.in_(lease_ids)).values(state=state, released_at=now, error=error)
            )
            conn.execute(delete(reservations).where(reservations.c.lease_id.in_(lease_ids)))

    def set_state(
        self,
        lease_ids: Sequence[str],
        state: str,
        only_from: Sequence[str],
        owner: str | None = None,
        expect_owner: str | None = None,
        pooled: bool | None = None,
    ) -> list[str]:
        """Move leases to ``state`` if they are in one of ``only_from`` (and, with
        ``expect_owner``, still owned by it; with ``pooled``, still in a ready pool, or
        not: a pool recycling a VM a request took meanwhile must not touch it); returns
        those moved, so two releasers — two threads, or two replicas — never both take
        the same lease. ``owner``: the process
        that now works on them (a release is its releaser's, not its creator's). The rows
        are locked while deciding (``FOR UPDATE`` on PostgreSQL; SQLite serialises writers)."""
        if not lease_ids:
            return []
        with self.db.write() as conn:
            where = leases.c.id.in_(lease_ids) & leases.c.state.in_(only_from)
            if expect_owner is not None:
                where &= leases.c.owner == expect_owner
            if pooled is not None:
                where &= leases.c.pooled == (true() if pooled else false())
            movable = [row.id for row in conn.execute(select(leases.c.id).where(where).with_for_update())]
            values = {"state": state} | ({"owner": owner} if owner else {})
            if movable:
                conn.execute(update(leases).where(leases.c.id.in_(movable)).values(**values))
            return movable

    def set_owner(self, lease_id: str, owner: str) -> None:
        with self.db.write() as conn:
            conn.execute(update(leases).where(leases.c.id == lease_id).values(owner=owner))

    def hand_over(self, lease_ids: Sequence[str], now: float, request_id: str | None = None) -> list[Lease] | None:
        """The request answers with these leases: their lifetime starts now. All or none:
        None (and nothing changed) unless every one of them is still ready and not handed
        over yet. Returned in the order of ``lease_ids`` (the order of the answer).

        With ``request_id``, the request turns ``ready`` in the same transaction, unless
        its caller cancelled it: then ``RequestCancelled`` and nothing changed (a cancel and
        a hand-over that race: the database decides, and only one happens)."""
        with self.db.write() as conn:
            if request_id is not None:
                done = conn.execute(
                    update(requests)
                    .where(
                        (requests.c.id == request_id)
                        & (requests.c.state == "creating")
                        & (requests.c.cancel_requested == false())
                    )
                    .values(state="ready", finished_at=now)
                )
                if done.rowcount != 1:
                    raise RequestCancelled("the request was cancelled before its VMs were handed over")
            query = select(leases).where(leases.c.id.in_(lease_ids)).with_for_update()
            rows = {lease.id: lease for lease in (_lease(r) for r in conn.execute(query))}
            if set(rows) != set(lease_ids) or any(
                lease.state != "ready" or lease.handed_over_at is not None for lease in rows.values()
            ):
                return None
            for lease in rows.values():
                conn.execute(
                    update(leases)
                    .where(leases.c.id == lease.id)
                    .values(handed_over_at=now, expires_at=now + lease.lifetime)
                )
            found = {lease.id: lease for lease in (_lease(r) for r in conn.execute(query))}
            return [found[lease_id] for lease_id in lease_ids]

    def mark_pooled(self, lease_id: str, now: float, expires_at: float) -> Lease | None:
        """A ready-pool VM is ready: it joins its pool until ``expires_at`` (its ready TTL)."""
        with self.db.write() as conn:
            done = conn.execute(
                update(leases)
                .where((leases.c.id == lease_id) & (leases.c.state == "ready") & (leases.c.pooled == true()))
                .values(pooled_at=now, expires_at=expires_at)
            )
            if done.rowcount != 1:
                return None
            return _lease(conn.execute(select(leases).where(leases.c.id == lease_id)).one())

    def take_pooled(self, conn: Connection, lease: Lease, new: Lease) -> bool:
        """Give a ready-pool VM to a request, inside its reservation's transaction: it takes
        ``new``'s name, user, request, owner and lifetime. False when it is not in its pool
        any more (another request, or another replica, took it first): the database decides,
        so no VM is ever handed out twice."""
        try:
            done = conn.execute(
                update(leases)
                .where(
                    (leases.c.id == lease.id)
                    & (leases.c.pooled == true())
                    & (leases.c.state == "ready")
                    & leases.c.handed_over_at.is_(None)
                )
                .values(
                    pooled=False,
                    request_id=new.request_id,
                    name=new.name,
                    username=new.username,
                    caller=new.caller,
                    owner=new.owner,
                    # the lifetime counts from created_at until the hand-over moves it
                    expires_at=lease.created_at + new.lifetime,
                )
            )
        except IntegrityError:
            raise NameInUse(f"{new.name} is already in use by another lease") from None
        return done.rowcount == 1

    def extend(self, lease_id: str, expires_at: float) -> None:
        with self.db.write() as conn:
            conn.execute(update(leases).where(leases.c.id == lease_id).values(expires_at=expires_at))

    def move(
        self,
        conn: Connection,
        lease_id: str,
        host_ref: str,
        cpus: int,
        memory: int,
        disk: int,
        template: str,
        reserve_memory: int | None = None,
        member: str | None = None,
    ) -> Lease:
        """Put a lease still being created, and its reservation, on another host (and member)."""
        values = {"host_ref": host_ref, "member": member, "cpus": cpus, "memory": memory, "disk": disk}
        conn.execute(update(leases).where(leases.c.id == lease_id).values(template=template, vm_ref=None, **values))
        reserved = values | {"memory": reserve_memory if reserve_memory is not None else memory}
        conn.execute(update(reservations).where(reservations.c.lease_id == lease_id).values(**reserved))
        return _lease(conn.execute(select(leases).where(leases.c.id == lease_id)).one())

    def heartbeat(self, owner: str, now: float) -> None:
        dialect = sqlite if self.db.is_sqlite else postgresql
        statement = dialect.insert(replicas).values(owner=owner, started_at=now, heartbeat_at=now)
        statement = statement.on_conflict_do_update(index_elements=[replicas.c.owner], set_={"heartbeat_at": now})
        with self.db.write() as conn:
            conn.execute(statement)

    def forget_owner(self, owner: str) -> None:
        """A process that stopped cleanly: no longer alive, without waiting for staleness."""
        with self.db.write() as conn:
            conn.execute(delete(replicas).where(replicas.c.owner == owner))

    def live_owners(self, now: float, stale_after: float) -> set[str]:
        with self.db.read() as conn:
            return {
                row.owner
                for row in conn.execute(select(replicas.c.owner).where(replicas.c.heartbeat_at >= now - stale_after))
            }

    def remember_vm(self, lease_id: str, vm_ref: str) -> None:
        with self.db.write() as conn:
            conn.execute(update(leases).where(leases.c.id == lease_id).values(vm_ref=vm_ref))

    def rehome(self, from_ref: str, to_ref: str) -> int:
        """Move what is held on configured host ``from_ref`` to ``to_ref``, the same pool
        named by an earlier section (``[xenhostN]`` sections that turned out to name one
        pool): active leases, their reservations and clones left behind. The number of
        leases moved."""
        with self.db.write() as conn:
            moved = conn.execute(
                update(leases)
                .where((leases.c.host_ref == from_ref) & leases.c.state.in_(ACTIVE_STATES))
                .values(host_ref=to_ref)
            ).rowcount
            conn.execute(update(reservations).where(reservations.c.host_ref == from_ref).values(host_ref=to_ref))
            conn.execute(
                update(abandoned_clones).where(abandoned_clones.c.host_ref == from_ref).values(host_ref=to_ref)
            )
            return int(moved or 0)

    # -- clones left behind on hosts that stopped answering ----------------------------

    def abandon_clone(self, host_ref: str, task: str, lease_id: str, name: str, now: float) -> None:
        """Remember a clone task dynvm stopped waiting for (its host stopped answering)."""
        row = {"host_ref": host_ref, "task": task, "lease_id": lease_id, "name": name, "abandoned_at": now}
        with self.db.write() as conn:
            exists = conn.execute(
                select(abandoned_clones.c.task).where(
                    abandoned_clones.c.host_ref == host_ref, abandoned_clones.c.task == task
                )
            ).first()
            if exists is None:
                conn.execute(insert(abandoned_clones).values(**row))

    def abandoned_clones(self) -> list[dict[str, object]]:
        with self.db.read() as conn:
            return [dict(row._mapping) for row in conn.execute(select(abandoned_clones))]

    def forget_clone(self, host_ref: str, task: str) -> None:
        with self.db.write() as conn:
            conn.execute(
                delete(abandoned_clones).where(abandoned_clones.c.host_ref == host_ref, abandoned_clones.c.task == task)
            )
