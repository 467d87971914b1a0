"""Which existing machines are not idle (``[staticN]`` hosts): held by a lease, being reset
after one, or out of service. A machine with no row is idle. Taking one is an insert the
primary key lets only one writer win, whichever replica or process it is."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from .db import Database
from .tables import machine_holds

HELD, RESETTING, OUT = "held", "resetting", "out"


@dataclass(frozen=True)
class Hold:
    host_ref: str
    machine: str
    state: str
    lease_id: str | None
    label: str
    holder: str | None
    since: float
    error: str


class HoldStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def of(self, host_ref: str) -> dict[str, Hold]:
        """Machine name -> its hold, for every machine of ``host_ref`` that is not idle."""
        with self.db.read() as conn:
            rows = conn.execute(select(machine_holds).where(machine_holds.c.host_ref == host_ref))
            return {row.machine: Hold(**row._mapping) for row in rows}

    def take(self, host_ref: str, machine: str, lease_id: str, label: str, now: float) -> bool:
        """Hold an idle machine for ``lease_id``; False when someone holds it already."""
        try:
            with self.db.write() as conn:
                conn.execute(
                    insert(machine_holds).values(
                        host_ref=host_ref, machine=machine, state=HELD, lease_id=lease_id, label=label, since=now
                    )
                )
        except IntegrityError:
            return False
        return True

    def hand_to(self, host_ref: str, machine: str, lease_id: str, holder: str, label: str) -> str | None:
        """Write ``holder`` on a held machine unless another holder is written there (one
        compare-and-set statement); the holder it has now (``holder`` when this won)."""
        with self.db.write() as conn:
            conn.execute(
                update(machine_holds)
                .where(
                    machine_holds.c.host_ref == host_ref,
                    machine_holds.c.machine == machine,
                    machine_holds.c.lease_id == lease_id,
                    or_(machine_holds.c.holder.is_(None), machine_holds.c.holder == holder),
                )
                .values(holder=holder, label=label)
            )
            row = conn.execute(
                select(machine_holds.c.holder).where(
                    machine_holds.c.host_ref == host_ref, machine_holds.c.machine == machine
                )
            ).first()
        return None if row is None else row.holder

    def mark(
        self, host_ref: str, machine: str, state: str, now: float, error: str = "", lease_id: str | None = None
    ) -> bool:
        """Move a hold to ``state`` (from the lease ``lease_id``, when given); False when no
        such hold is there."""
        where = and_(machine_holds.c.host_ref == host_ref, machine_holds.c.machine == machine)
        if lease_id is not None:
            where = and_(where, machine_holds.c.lease_id == lease_id)
        with self.db.write() as conn:
            done = conn.execute(update(machine_holds).where(where).values(state=state, since=now, error=error))
        return bool(done.rowcount)

    def free(self, host_ref: str, machine: str) -> None:
        """The machine is idle again."""
        with self.db.write() as conn:
            conn.execute(
                delete(machine_holds).where(machine_holds.c.host_ref == host_ref, machine_holds.c.machine == machine)
            )
