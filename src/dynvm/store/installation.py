"""The installation row: this database's id, written into the mark of every VM and disk it
makes, and the last claim it wrote on the hosts (``engine/claim.py``)."""

from __future__ import annotations

from sqlalchemy import delete, select, update

from ..states import ACTIVE_LEASE_STATES, LEASES, REQUESTS, Actor, LeaseState, RequestState
from .db import Database
from .tables import abandoned_clones, installation, leases, requests, reservations


class InstallationStore:
    def __init__(self, db: Database) -> None:
        self.db = db

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
                .where(leases.c.state.in_(LEASES.check(ACTIVE_LEASE_STATES, LeaseState.RELEASED, Actor.OPERATOR)))
                .values(state=LeaseState.RELEASED, released_at=now, error=reason)
            ).rowcount
            conn.execute(delete(reservations))
            conn.execute(delete(abandoned_clones))
            conn.execute(  # the old installation's callers asked it, not this one
                update(requests)
                .where(requests.c.state.in_(REQUESTS.sources(RequestState.CANCELLED, Actor.OPERATOR)))
                .values(state=RequestState.CANCELLED, finished_at=now, error=reason, error_status=503)
            )
            conn.execute(update(installation).values(id=new_id, created_at=now, claim_seq=0, claim_token=None))
            return old, int(ended or 0)


def installation_of(db_url: str) -> str | None:
    """The installation id a database holds, or None (not made yet, or not reachable)."""
    database = Database(db_url)
    try:
        return InstallationStore(database).installation_id()
    except Exception:
        return None
    finally:
        database.close()
