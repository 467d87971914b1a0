"""Clone tasks dynvm stopped waiting for (their host went silent, or their process died):
remembered until reconcile finds and removes the VM each made."""

from __future__ import annotations

from sqlalchemy import delete, insert, select, update

from .db import Database
from .tables import abandoned_clones


class CloneStore:
    def __init__(self, db: Database) -> None:
        self.db = db

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

    def rehome(self, from_ref: str, to_ref: str) -> None:
        """Clones left on configured host ``from_ref`` are looked for on ``to_ref``, the same
        pool named by an earlier section (``LeaseStore.rehome``)."""
        with self.db.write() as conn:
            conn.execute(
                update(abandoned_clones).where(abandoned_clones.c.host_ref == from_ref).values(host_ref=to_ref)
            )
