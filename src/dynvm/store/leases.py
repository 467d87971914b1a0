"""Leases and their reservations in the database: the only code that writes those tables.
Every change of a lease's state is checked against ``states.LEASES`` first.

The statements of the hot paths (a reservation, a hand-over, a release) are built once,
with bound parameters, by the ``_*_statement`` functions below (cached on first use):
building a SQLAlchemy statement costs about three times what executing a built one does
(``docs/PERFORMANCE.md``). A change of state is one ``UPDATE ... RETURNING``, its
condition the check: on PostgreSQL, an update that waited for another's row lock checks
its WHERE again on the row as that one left it, so two releasers never both move a lease.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Integer,
    Table,
    bindparam,
    delete,
    false,
    func,
    insert,
    literal,
    literal_column,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ColumnElement, CompoundSelect, Delete, Insert, Select, Update
from sqlalchemy.sql.elements import BindParameter

from ..model import CreatedVm, Lease, NameInUse
from ..states import ACTIVE_LEASE_STATES, LEASES, Actor, LeaseState
from .db import Database
from .tables import active_lease, host_locks, leases, reservations, root_of_name

LEASE_FIELDS = [c.name for c in leases.columns]


def _lease(row: Sequence[Any]) -> Lease:
    """A row of every lease column, in the table's order (``select(leases)``, ``RETURNING``).

    Made without ``Lease.__init__``: a frozen dataclass of 27 fields sets each through
    ``object.__setattr__``, 14 µs a lease, and a pools pass at 140 hosts reads hundreds.
    The row holds every field (``tests/store/test_db.py`` holds the table's columns and the
    dataclass's fields to the same names), so the lease is the one ``__init__`` would make.
    """
    values = dict(zip(LEASE_FIELDS, row, strict=True))
    values["state"] = LeaseState(values["state"])
    lease = object.__new__(Lease)
    lease.__dict__.update(values)
    return lease


def reservation_row(lease: Lease, memory: int) -> dict[str, object]:
    """The reservation a new lease holds until its VM is made (``memory``: what it holds of
    the host's): what ``insert`` writes, and what a transaction placing more VMs before it
    inserts them counts."""
    return {
        "lease_id": lease.id,
        "host_ref": lease.host_ref,
        "member": lease.member,
        "cpus": lease.cpus,
        "memory": memory,
        "disk": lease.disk,
        "owner": lease.owner,
        "created_at": lease.created_at,
    }


def _ids(name: str = "ids") -> BindParameter[Any]:
    return bindparam(name, expanding=True)


@functools.cache
def _by_name_statement() -> Select[tuple[object, ...]]:
    return select(leases).where(_by_name_where()).order_by(leases.c.name)


def _by_name_where() -> ColumnElement[bool]:
    return leases.c.name.in_(_ids("names")) & active_lease() & (leases.c.pooled == false())


@functools.cache
def _active_statement(pooled: bool | None) -> Select[tuple[object, ...]]:
    """Active leases: all of them (``pooled`` None), the ready pools' or the requests'."""
    where = active_lease()
    if pooled is not None:
        where &= leases.c.pooled == (true() if pooled else false())
    return select(leases).where(where).order_by(leases.c.name)


@functools.cache
def _idle_pooled_statement() -> Select[tuple[object, ...]]:
    """A pool's VMs of one OS that are ready and in it: what a request may take."""
    where = (
        active_lease()  # implies the active-only index's condition, as SQLite must see it written
        & (leases.c.state == LeaseState.READY.value)
        & (leases.c.pooled == true())
        & leases.c.pooled_at.is_not(None)
        & (leases.c.os == bindparam("os"))
    )
    return select(leases).where(where).order_by(leases.c.name)


@functools.cache
def _pool_stock_statement() -> Select[tuple[str, int]]:
    stock_states = (LeaseState.CREATING, LeaseState.READY)
    stocked: list[ColumnElement[str]] = [literal_column(f"'{state.value}'") for state in stock_states]
    # active_lease() as written implies the active-only index's condition, as SQLite must see it
    where = active_lease() & (leases.c.pooled == true()) & leases.c.state.in_(stocked)
    return select(leases.c.os, func.count()).where(where).group_by(leases.c.os)


@functools.cache
def _count_in_state_statement() -> Select[int]:
    return select(func.count()).select_from(leases).where(leases.c.state == bindparam("state"))


@functools.cache
def _held_by_others_statement(anonymous: bool) -> Select[tuple[object, ...]]:
    return select(leases).where(_held_by_others_where(anonymous)).order_by(leases.c.name)


def _held_by_others_where(anonymous: bool) -> ColumnElement[bool]:
    where = (
        active_lease()
        & (leases.c.pooled == false())
        & leases.c.caller.is_not(None)
        & (root_of_name() == bindparam("root"))
    )
    if not anonymous:
        where &= leases.c.caller != bindparam("caller")
    return where


@functools.cache
def _in_the_way_statement(anonymous: bool) -> CompoundSelect[tuple[object, ...]]:
    """``_by_name_statement`` and ``_held_by_others_statement`` in one round trip, each
    row tagged with the one it came from (a row of both comes twice, as from both), in the
    database's order of names as theirs: each half searches its own index, where one
    ``OR`` would make SQLite scan every lease."""
    named = select(leases, literal(True).label("named")).where(_by_name_where())
    others = select(leases, literal(False).label("named")).where(_held_by_others_where(anonymous))
    return union_all(named, others).order_by(leases.c.name)


@functools.cache
def _made_since_statement() -> Select[tuple[object, ...]]:
    return (
        select(leases.c.id, leases.c.os, leases.c.ready_at, leases.c.create_seconds)
        .where((leases.c.ready_at >= bindparam("since")) & leases.c.create_seconds.is_not(None))
        .order_by(leases.c.ready_at.desc())
        .limit(bindparam("limit"))
    )


@functools.cache
def _ended_since_statement() -> Select[tuple[object, ...]]:
    return (
        select(leases.c.id, leases.c.os, leases.c.handed_over_at, leases.c.released_at, leases.c.expires_at)
        .where(
            leases.c.state.in_(_ids("states"))
            & leases.c.handed_over_at.is_not(None)
            & (leases.c.released_at >= bindparam("since"))
        )
        .order_by(leases.c.released_at.desc())
        .limit(bindparam("limit"))
    )


@functools.cache
def _lock_hosts_statement() -> Select[tuple[object, ...]]:
    where = host_locks.c.ref.in_(_ids("refs"))
    return select(host_locks.c.ref).where(where).order_by(host_locks.c.ref).with_for_update()


# the advisory locks of name roots are PostgreSQL's two-key kind, under this first key: apart
# from the one-key lock the leader holds (``leadership.py``), whatever the hashes
NAMES_LOCK_SPACE = 0x64796E76  # "dynv"


@functools.cache
def _lock_names_statement() -> Select[tuple[object, ...]]:
    space = bindparam("space", type_=Integer)
    return select(func.pg_advisory_xact_lock(space, bindparam("key", type_=Integer)))


def names_lock_key(root: str) -> int:
    """The advisory lock of a name root (``lock_names``): 32 bits of a hash of it, the
    same in every replica and every version (Python's own ``hash`` is salted per process).
    Two roots that share a key only check their names one after the other."""
    digest = hashlib.blake2b(f"dynvm names {root}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


@functools.cache
def _insert_statement(table: Table) -> Insert:
    """An insert of whole rows (their columns: ``Database.run_many``)."""
    return insert(table)


@functools.cache
def _insert_with_reservation_statement() -> Insert:
    """PostgreSQL: a lease and its reservation in one round trip (a statement in WITH
    runs once whether or not the outer one reads it); each column bound as ``l_<column>``
    for the lease, ``r_<column>`` for the reservation."""
    born = insert(leases).values({f: bindparam(f"l_{f}") for f in LEASE_FIELDS}).cte("born")
    holds = insert(reservations).values({c.name: bindparam(f"r_{c.name}") for c in reservations.columns})
    return holds.add_cte(born)


@functools.cache
def _reservations_statement() -> Select[tuple[object, ...]]:
    return select(reservations)


@functools.cache
def _by_id_statement() -> Select[tuple[object, ...]]:
    return select(leases).where(leases.c.id == bindparam("id"))


@functools.cache
def _set_state_statement(expect_owner: bool, pooled: bool | None, owner: bool) -> Update:
    where = leases.c.id.in_(_ids()) & leases.c.state.in_(_ids("sources"))
    if expect_owner:
        where &= leases.c.owner == bindparam("expect_owner")
    if pooled is not None:
        where &= leases.c.pooled == (true() if pooled else false())
    values: dict[str, Any] = {"state": bindparam("b_state")} | ({"owner": bindparam("b_owner")} if owner else {})
    return update(leases).where(where).values(**values).returning(leases.c.id)


@functools.cache
def _finish_statement() -> Update:
    where = leases.c.id.in_(_ids()) & leases.c.state.in_(_ids("sources"))
    values: dict[str, Any] = {"state": bindparam("b_state"), "released_at": bindparam("now")}
    values["error"] = bindparam("b_error")
    return update(leases).where(where).values(**values).returning(*leases.c)


@functools.cache
def _free_statement() -> Delete:
    return delete(reservations).where(reservations.c.lease_id.in_(_ids()))


@functools.cache
def _finish_and_free_statement() -> Select[tuple[object, ...]]:
    """PostgreSQL: ``_finish_statement`` and ``_free_statement`` in one round trip (a
    statement in WITH may change rows; both run on one snapshot, and touch different
    tables)."""
    ended = _finish_statement().cte("ended")
    return select(ended).add_cte(_free_statement().cte("freed"))


@functools.cache
def _mark_ready_and_free_statement(pooled: bool) -> Select[tuple[object, ...]]:
    """PostgreSQL: ``_mark_ready_statement`` and, if the lease turned ready, the end of its
    reservation, in one round trip."""
    made = _mark_ready_statement(pooled).cte("made")
    freed = delete(reservations).where(reservations.c.lease_id.in_(select(made.c.id))).cte("freed")
    return select(made).add_cte(freed)


@functools.cache
def _mark_ready_statement(pooled: bool) -> Update:
    """``pooled``: a ready-pool VM, which joins its pool in the same statement."""
    where = (leases.c.id == bindparam("b_id")) & (leases.c.state == LeaseState.CREATING)
    where &= leases.c.owner == bindparam("expect_owner")
    fields = ("vm_uuid", "vm_ref", "ip", "os_version", "cpus", "memory", "disk", "template", "member")
    values: dict[str, Any] = {field: bindparam(f"v_{field}") for field in fields}
    values |= {"state": LeaseState.READY, "ready_at": bindparam("now"), "create_seconds": bindparam("seconds")}
    if pooled:
        where &= leases.c.pooled == true()
        values |= {"pooled_at": bindparam("now"), "expires_at": bindparam("pooled_until")}
    return update(leases).where(where).values(**values).returning(*leases.c)


@functools.cache
def _hand_over_statement() -> Update:
    """Every lease ready and not handed over yet starts its lifetime now: its
    ``expires_at`` moves by as much as it counted from ``created_at`` (``Lease.lifetime``)."""
    where = leases.c.id.in_(_ids()) & (leases.c.state == LeaseState.READY) & leases.c.handed_over_at.is_(None)
    now: BindParameter[float] = bindparam("now")
    values: dict[str, Any] = {"handed_over_at": now, "expires_at": now + (leases.c.expires_at - leases.c.created_at)}
    return update(leases).where(where).values(**values).returning(*leases.c)


@functools.cache
def _take_pooled_statement() -> Update:
    where = (
        (leases.c.id == bindparam("b_id"))
        & (leases.c.pooled == true())
        & (leases.c.state == LeaseState.READY)
        & leases.c.handed_over_at.is_(None)
    )
    fields = ("request_id", "name", "username", "caller", "owner", "expires_at")
    return update(leases).where(where).values(pooled=False, **{f: bindparam(f"v_{f}") for f in fields})


class LeaseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reading -----------------------------------------------------------------------

    def active(self, conn: Connection | None = None) -> list[Lease]:
        return self._rows(_active_statement(None), {}, conn)

    def by_name(self, names: Iterable[str], conn: Connection | None = None) -> list[Lease]:
        """Active leases of these names; ready-pool VMs are nobody's lease yet and never match."""
        return self._rows(_by_name_statement(), {"names": list(names)}, conn)

    def held_by_others(self, caller: str | None, root: str, conn: Connection | None = None) -> list[Lease]:
        """Active leases of authenticated callers other than ``caller`` (all of them for an
        anonymous one) whose names have the root ``root`` (``model.name_root``: every name
        that can clash with a request whose username has that root), through the index
        ``ix_leases_active_root``."""
        values = {"root": root} | ({"caller": caller} if caller is not None else {})
        return self._rows(_held_by_others_statement(caller is None), values, conn)

    def in_the_way(
        self, names: Iterable[str], caller: str | None, root: str, conn: Connection | None = None
    ) -> tuple[list[Lease], list[Lease]]:
        """``by_name(names)`` and ``held_by_others(caller, root)``, read at once: what a
        reservation checks a request's names against."""
        values = {"names": list(names), "root": root} | ({"caller": caller} if caller is not None else {})
        named: list[Lease] = []
        others: list[Lease] = []
        with self.db.reading(conn) as reading:
            for row in self.db.run(reading, _in_the_way_statement(caller is None), values):
                (named if row[-1] else others).append(_lease(row[:-1]))
        return named, others

    def released_names(self, names: Iterable[str], request_ids: Iterable[str]) -> set[str]:
        """Which of these names a lease of these requests held and that was released: what
        an earlier try of the same release already did (never another request's names)."""
        wanted, requests_of = list(names), list(request_ids)
        if not wanted or not requests_of:
            return set()
        query = select(leases.c.name).where(
            leases.c.name.in_(wanted)
            & leases.c.request_id.in_(requests_of)
            & (leases.c.state == LeaseState.RELEASED)
            & (leases.c.pooled == false())
        )
        with self.db.read() as conn:
            return {name for (name,) in conn.execute(query)}

    def held(self, conn: Connection | None = None) -> list[Lease]:
        """Active leases a request made or took: not the ready pools' VMs."""
        return self._rows(_active_statement(False), {}, conn)

    def pooled(self, conn: Connection | None = None) -> list[Lease]:
        """The ready pools' VMs: being made (``creating``), ready, or being recycled."""
        return self._rows(_active_statement(True), {}, conn)

    def idle_pooled(self, os: str, conn: Connection | None = None) -> list[Lease]:
        """The ready pool's VMs of ``os`` that are ready and in it (``ready_stock.is_idle``):
        a request's look at the pool reads its own OS's VMs alone."""
        return self._rows(_idle_pooled_statement(), {"os": os}, conn)

    def ever_pooled(self) -> list[Lease]:
        """Every lease that was made as a ready-pool VM, in any state, handed out or not."""
        return self._select((leases.c.pooled == true()) | leases.c.pooled_at.is_not(None))

    def pool_stock(self) -> dict[str, int]:
        """Per OS, the ready pools' VMs being made or ready (what a pools pass counts as
        its stock), counted by the database: no OS without one."""
        with self.db.read() as conn:
            return {os: int(n) for os, n in self.db.run(conn, _pool_stock_statement())}

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
                elif row.state not in ACTIVE_LEASE_STATES:
                    recycled += 1
                out[row.os] = (handed, recycled)
        return out

    def by_request(self, request_id: str) -> list[Lease]:
        return self._select(leases.c.request_id == request_id)

    def get(self, lease_id: str, conn: Connection | None = None) -> Lease | None:
        found = self._rows(_by_id_statement(), {"id": lease_id}, conn)
        return found[0] if found else None

    def expired(self, now: float) -> list[Lease]:
        """Ready leases past their expiry. A lease whose request has not handed it over yet
        (its other VMs are still being made) never expires: its lifetime has not begun."""
        return self._select(
            (leases.c.state == LeaseState.READY) & leases.c.handed_over_at.is_not(None) & (leases.c.expires_at <= now)
        )

    def page(
        self, user: str | None = None, os: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Lease], int]:
        """Held leases, the latest handed out first (a ready-pool VM counts from when it was
        taken), for a list that pages (the dashboard): those whose user or caller contains
        ``user`` (any case) and of ``os``; and how many match in all."""
        where = active_lease() & (leases.c.pooled == false())
        if user:
            pattern = "%" + user.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where &= leases.c.username.ilike(pattern, escape="\\") | leases.c.caller.ilike(pattern, escape="\\")
        if os:
            where &= leases.c.os == os
        latest = func.coalesce(leases.c.handed_over_at, leases.c.created_at)
        # the VMs of one request share that time; their names are <user>1 ... <user>N:
        # shorter first, then as text, puts them in number order (fill2 before fill10)
        order = (latest.desc(), leases.c.request_id, func.length(leases.c.name), leases.c.name)
        query = select(leases).where(where).order_by(*order).limit(limit)
        with self.db.read() as conn:
            total = int(conn.execute(select(func.count()).select_from(leases).where(where)).scalar_one())
            return [_lease(row) for row in conn.execute(query.offset(offset))], total

    def held_oses(self) -> list[str]:
        """The OSes of held leases (what a filter offers)."""
        query = select(leases.c.os).where(active_lease() & (leases.c.pooled == false()))
        with self.db.read() as conn:
            return sorted(row.os for row in conn.execute(query.distinct()))

    def use_by_host(self) -> dict[str, tuple[int, int, int]]:
        """Per host ref: dynvm's VMs there (held, pooled or being made), their vCPUs and
        memory, summed by the database."""
        query = (
            select(leases.c.host_ref, func.count(), func.sum(leases.c.cpus), func.sum(leases.c.memory))
            .where(active_lease())
            .group_by(leases.c.host_ref)
        )
        with self.db.read() as conn:
            return {ref: (int(n), int(cpus or 0), int(memory or 0)) for ref, n, cpus, memory in conn.execute(query)}

    def in_state(self, *states: LeaseState) -> list[Lease]:
        return self._select(leases.c.state.in_(states))

    def count_in_state(self, state: LeaseState) -> int:
        with self.db.read() as conn:
            return int(self.db.run(conn, _count_in_state_statement(), {"state": state.value}).scalar_one())

    def _rows(
        self, statement: Select[tuple[object, ...]], values: dict[str, Any], conn: Connection | None
    ) -> list[Lease]:
        """Leases by a statement built once (``prepared.py``)."""
        with self.db.reading(conn) as reading:
            return [_lease(row) for row in self.db.run(reading, statement, values)]

    def _select(self, where: object, conn: Connection | None = None) -> list[Lease]:
        """Leases by a condition built for each call (the paths that are not hot)."""
        query = select(leases).where(where).order_by(leases.c.name)  # type: ignore[arg-type]  # a where clause is built by the callers as a SQLAlchemy expression
        with self.db.reading(conn) as reading:
            return [_lease(row) for row in reading.execute(query)]

    def made_since(self, since: float, limit: int = 2000) -> list[tuple[str, str, float, float]]:
        """(id, os, ready_at, create_seconds) of the leases whose VM was made at ``since``
        or later, the latest ``limit`` of them, oldest first: what the queue's forecast
        learns create times from (a lab's own, from its first VM on)."""
        with self.db.read() as conn:
            rows = self.db.run(conn, _made_since_statement(), {"since": since, "limit": limit})
            return [tuple(row) for row in reversed(rows.rows)]

    def ended_since(self, since: float, limit: int = 2000) -> list[tuple[str, str, float, float, float]]:
        """(id, os, handed_over_at, released_at, expires_at) of the leases a user held that
        ended (released or expired) at ``since`` or later, the latest ``limit``, oldest
        first: what the forecast learns hold times from."""
        values = {"since": since, "limit": limit, "states": [LeaseState.RELEASED.value, LeaseState.EXPIRED.value]}
        with self.db.read() as conn:
            rows = self.db.run(conn, _ended_since_statement(), values)
            return [tuple(row) for row in reversed(rows.rows)]

    def pending_reservations(self, conn: Connection) -> list[dict[str, object]]:
        """Reservations of creates still in flight, with the lease they belong to."""
        return self.db.run(conn, _reservations_statement()).mappings()

    # -- writing -----------------------------------------------------------------------

    def lock_hosts(self, conn: Connection, refs: Sequence[str]) -> None:
        """Take the hosts' row locks for the rest of the transaction.

        Why row locks: a reservation reads what is reserved, decides, then inserts; two
        replicas doing that at once on PostgreSQL (READ COMMITTED) could both see the last
        slot free. ``SELECT ... FOR UPDATE`` on one row per host makes the second wait until
        the first commits, and its reads then see the first's reservations. A reservation
        locks every host, or only those it places on (``Admission``): what matters is that
        a reservation on a host is only ever inserted with that host's lock held. Rows are created
        on first use (``ON CONFLICT DO NOTHING``, so replicas may race to create them), then
        locked in turn: the common case is one statement.
        SQLite has no row locks: ``Database.write()`` opens BEGIN IMMEDIATE, which
        serialises writers for the whole database instead, so there is nothing to take."""
        if not refs or self.db.is_sqlite:
            return
        locked = {ref for (ref,) in self.db.run(conn, _lock_hosts_statement(), {"refs": list(refs)})}
        missing = sorted(set(refs) - locked)  # a host's first reservation (or a restored database)
        if missing:
            conn.execute(
                postgresql.insert(host_locks).values([{"ref": ref} for ref in missing]).on_conflict_do_nothing()
            )
            self.db.run(conn, _lock_hosts_statement(), {"refs": missing})

    def lock_names(self, conn: Connection, root: str) -> None:
        """Take the lock of a name root for the rest of the transaction: two reservations
        whose names could clash (they have one root: ``model.name_root``) check them one
        after the other, each seeing what the other inserted. A prefix has no unique index,
        and since a reservation may lock only the hosts it places on (``Admission``), two
        of them can hold no host lock in common. On PostgreSQL an advisory lock (no row,
        nothing written); on SQLite, whose writers take turns, nothing to take."""
        if not self.db.is_sqlite:
            self.db.run(conn, _lock_names_statement(), {"space": NAMES_LOCK_SPACE, "key": names_lock_key(root)})

    def insert(self, conn: Connection, new: Sequence[Lease], reserve_memory: Sequence[int] | None = None) -> None:
        """Insert leases in state ``creating`` with their reservations; a name already held
        by an active lease raises ``NameInUse`` (the partial unique index decides).
        ``reserve_memory``: what each reservation holds of the host's memory (the VM's
        memory plus xapi's overhead for it); by default the lease's memory."""
        for lease in new:
            LEASES.check_born(lease.state)
        reserve = list(reserve_memory) if reserve_memory is not None else [lease.memory for lease in new]
        born = [{f: getattr(lease, f) for f in LEASE_FIELDS} for lease in new]
        holds = [reservation_row(lease, m) for lease, m in zip(new, reserve, strict=True)]
        try:
            if not self.db.is_sqlite:  # one round trip
                rows = [
                    {f"l_{f}": v for f, v in lease.items()} | {f"r_{c}": v for c, v in hold.items()}
                    for lease, hold in zip(born, holds, strict=True)
                ]
                self.db.run_many(conn, _insert_with_reservation_statement(), rows)
                return
            self.db.run_many(conn, _insert_statement(leases), born)
        except IntegrityError:  # the reservation's key is the new lease's own
            raise NameInUse("a VM name of this request is already in use by another lease") from None
        self.db.run_many(conn, _insert_statement(reservations), holds)

    def mark_ready(
        self,
        lease_id: str,
        vm: CreatedVm,
        now: float,
        owner: str,
        conn: Connection | None = None,
        pooled_until: float | None = None,
    ) -> Lease | None:
        """The lease's VM is ready. None (nothing changed) if the lease is no longer being
        created by ``owner``: another replica took it for dead and failed it meanwhile.
        ``conn``: inside the caller's transaction (which writes the VM's history with it).
        ``pooled_until``: a ready-pool VM joins its pool now, until then (its ready TTL)."""
        LEASES.check([LeaseState.CREATING], LeaseState.READY, Actor.BUILDER)
        values = {
            "v_vm_uuid": vm.uuid,
            "v_vm_ref": vm.ref,
            "v_ip": vm.ip,
            "v_os_version": vm.os_version.get("name", ""),
            "v_cpus": vm.cpus,
            "v_memory": vm.memory,
            "v_disk": vm.disk,
            "v_template": vm.template,
            "v_member": vm.member or None,
            "now": now,
            "seconds": vm.create_seconds,
        }
        pooled = pooled_until is not None
        values |= {"b_id": lease_id, "expect_owner": owner} | ({"pooled_until": pooled_until} if pooled else {})
        with self.db.writing(conn) as writing:
            if not self.db.is_sqlite:  # one round trip
                row = self.db.run(writing, _mark_ready_and_free_statement(pooled), values).first()
                return _lease(row) if row is not None else None
            row = self.db.run(writing, _mark_ready_statement(pooled), values).first()
            if row is None:
                return None
            self.db.run(writing, _free_statement(), {"ids": [lease_id]})
            return _lease(row)

    def finish(
        self,
        lease_ids: Sequence[str],
        state: LeaseState,
        now: float,
        error: str | None = None,
        *,
        by: Actor,
        conn: Connection | None = None,
    ) -> list[Lease]:
        """End leases (``released``, ``expired``, ``failed``) from whichever state ``by`` may
        end them from (``states.LEASES``), and free their reservations; those ended, as they
        now are. ``conn``: inside the caller's transaction."""
        sources = LEASES.sources(state, by)
        if not lease_ids:
            return []
        with self.db.writing(conn) as writing:
            values = {"ids": list(lease_ids), "sources": list(sources), "b_state": state, "now": now, "b_error": error}
            if not self.db.is_sqlite:  # one round trip
                return [_lease(row) for row in self.db.run(writing, _finish_and_free_statement(), values)]
            ended = [_lease(row) for row in self.db.run(writing, _finish_statement(), values)]
            self.db.run(writing, _free_statement(), {"ids": list(lease_ids)})
            return ended

    def set_state(
        self,
        lease_ids: Sequence[str],
        state: LeaseState,
        only_from: Sequence[LeaseState],
        *,
        by: Actor,
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
        sources = LEASES.check(only_from, state, by)
        if not lease_ids:
            return []
        statement = _set_state_statement(expect_owner is not None, pooled, bool(owner))
        values = {"ids": list(lease_ids), "sources": list(sources), "b_state": state}
        values |= {"expect_owner": expect_owner} if expect_owner is not None else {}
        values |= {"b_owner": owner} if owner else {}
        with self.db.write() as conn:
            return [lease_id for (lease_id,) in self.db.run(conn, statement, values)]

    def set_owner(self, lease_id: str, owner: str) -> None:
        with self.db.write() as conn:
            conn.execute(update(leases).where(leases.c.id == lease_id).values(owner=owner))

    def hand_over(self, conn: Connection, lease_ids: Sequence[str], now: float) -> list[Lease] | None:
        """The request answers with these leases: their lifetime starts now (inside the
        caller's transaction, which turns the request ready too: ``engine/build.py``). All
        or none: None unless every one of them is still ready and not handed over yet; the
        caller must then roll its transaction back, which undoes what moved. Returned in the
        order of ``lease_ids`` (the order of the answer)."""
        rows = self.db.run(conn, _hand_over_statement(), {"ids": list(lease_ids), "now": now}).rows
        if len(rows) != len(set(lease_ids)):
            return None  # the caller's transaction rolls back what did move
        found = {lease.id: lease for lease in map(_lease, rows)}
        return [found[lease_id] for lease_id in lease_ids]

    def take_pooled(self, conn: Connection, lease: Lease, new: Lease) -> bool:
        """Give a ready-pool VM to a request, inside its reservation's transaction: it takes
        ``new``'s name, user, request, owner and lifetime. False when it is not in its pool
        any more (another request, or another replica, took it first): the database decides,
        so no VM is ever handed out twice."""
        values = {
            "b_id": lease.id,
            "v_request_id": new.request_id,
            "v_name": new.name,
            "v_username": new.username,
            "v_caller": new.caller,
            "v_owner": new.owner,
            # the lifetime counts from created_at until the hand-over moves it
            "v_expires_at": lease.created_at + new.lifetime,
        }
        try:
            done = self.db.run(conn, _take_pooled_statement(), values)
        except IntegrityError:
            raise NameInUse(f"{new.name} is already in use by another lease") from None
        return done.rowcount == 1

    def rename(self, lease_id: str, name: str) -> Lease | None:
        """Give a lease another name (a ready-pool VM a request took but could not have
        gives the request's name back); None when the lease is gone."""
        with self.db.write() as conn:
            conn.execute(update(leases).where(leases.c.id == lease_id).values(name=name))
            row = conn.execute(select(leases).where(leases.c.id == lease_id)).first()
            return _lease(row) if row is not None else None

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

    def remember_vm(self, lease_id: str, vm_ref: str) -> None:
        with self.db.write() as conn:
            conn.execute(update(leases).where(leases.c.id == lease_id).values(vm_ref=vm_ref))

    def rehome(self, from_ref: str, to_ref: str) -> int:
        """Move what is held on configured host ``from_ref`` to ``to_ref``, the same pool
        named by an earlier section (``[xenhostN]`` sections that turned out to name one
        pool): active leases and their reservations (``CloneStore.rehome`` moves the clones). The number of
        leases moved."""
        with self.db.write() as conn:
            moved = conn.execute(
                update(leases).where((leases.c.host_ref == from_ref) & active_lease()).values(host_ref=to_ref)
            ).rowcount
            conn.execute(update(reservations).where(reservations.c.host_ref == from_ref).values(host_ref=to_ref))
            return int(moved or 0)
