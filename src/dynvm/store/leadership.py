"""Which replica runs the reaper, reconcile and the history export: exactly one at a time.

On PostgreSQL, the holder of a session-level advisory lock, taken on a connection kept
open for it: when the leader dies its connection closes, the lock is freed, and another
replica takes it on its next try (every few seconds). On SQLite there is one process per
database file, and it leads.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from sqlalchemy import Connection, text

from .db import Database

log = logging.getLogger(__name__)

LOCK_KEY = 0x64796E766D  # "dynvm"


class Leadership:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._connection: Connection | None = None
        self._lock = threading.Lock()
        self._leading = db.is_sqlite

    def is_leader(self) -> bool:
        """Try to be (or stay) the leader; cheap to call every tick."""
        if self.db.is_sqlite:
            return True
        with self._lock:
            try:
                if self._connection is None:
                    connection = self.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                    got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}).scalar()
                    if not got:
                        connection.close()
                        return self._set(False)
                    self._connection = connection
                else:
                    self._connection.execute(text("SELECT 1"))  # still connected, so still holding the lock
                return self._set(True)
            except Exception as e:
                log.warning("leadership check failed (%s); not leading until the database answers", e)
                self._drop()
                return self._set(False)

    @property
    def leading(self) -> bool:
        """The outcome of the last ``is_leader()``, without touching the database (for
        metrics: a scrape must never take or drop the lock)."""
        return self._leading

    def _set(self, leading: bool) -> bool:
        if leading != self._leading:
            log.info(
                "this replica %s the leader (reaper, reconcile, history export)",
                "is now" if leading else "is no longer",
            )
        self._leading = leading
        return leading

    def _drop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # a dead connection may fail to close; it is gone anyway
                self._connection.close()
            self._connection = None

    def resign(self) -> None:
        """Give the lock up (at stop), so another replica leads at once."""
        with self._lock:
            self._drop()
            self._leading = self.db.is_sqlite
