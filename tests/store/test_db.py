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


def test_a_look_up_by_name_searches_the_active_name_index_instead_of_scanning_every_lease(tmp_path: Path):
    """With the active states as bound parameters SQLite could not use the partial index
    uq_leases_active_name and scanned every lease ever made: a by-name look-up (each
    getservers and release makes one) grew with the history."""
    from sqlalchemy import event

    from dynvm.store.leases import LeaseStore

    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    db.migrate()
    seen: list[tuple[str, object]] = []
    event.listen(db.engine, "before_cursor_execute", lambda c, cur, sql, params, ctx, many: seen.append((sql, params)))
    LeaseStore(db).by_name(["ci421", "ci422"])
    [(sql, params)] = [(sql, params) for sql, params in seen if "FROM leases" in sql]
    with db.read() as conn:
        plan = conn.connection.dbapi_connection.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    assert [row[3] for row in plan] == ["SEARCH leases USING INDEX uq_leases_active_name (name=?)"]
    db.close()
