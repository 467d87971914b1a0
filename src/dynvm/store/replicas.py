"""Every dynvm process beats in ``replicas`` every few seconds: who is alive."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from .db import Database
from .tables import replicas


class ReplicaStore:
    def __init__(self, db: Database) -> None:
        self.db = db

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
