"""The database wrapper on a real SQLite file."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from dynvm.store.db import Database
from dynvm.store.tables import metadata


def schema_drift(db: Database) -> list[object]:
    """What the migrations built that ``store/tables.py`` does not say, or the reverse."""
    with db.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_the_migrations_build_the_tables_the_code_describes(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    db.migrate()
    assert schema_drift(db) == []
    db.close()


def test_sqlite_writers_queue_in_the_process_and_leave_connections_to_readers(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    db.migrate()
    with db.write() as conn:
        conn.execute(text("CREATE TABLE counter (n INTEGER)"))
        conn.execute(text("INSERT INTO counter VALUES (0)"))
    held_at_once: list[int] = []
    go = threading.Barrier(24)

    def write() -> None:
        go.wait()
        with db.write() as conn:
            held_at_once.append(db.engine.pool.checkedout())
            conn.execute(text("UPDATE counter SET n = n + 1"))

    with ThreadPoolExecutor(24) as pool:
        for future in [pool.submit(write) for _ in range(24)]:
            future.result()
    with db.read() as conn:
        assert conn.execute(text("SELECT n FROM counter")).scalar() == 24
    # one connection at a time: waiting writers hold none, so a reader always finds one
    assert held_at_once == [1] * 24
    db.close()
