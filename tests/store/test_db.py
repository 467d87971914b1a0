"""The database wrapper on a real SQLite file."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
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


def _plans(db: Database, action: Callable[[], object], table: str = "leases") -> list[list[str]]:
    """The query plans of the statements on ``table`` that ``action`` sends."""
    from sqlalchemy import event

    seen: list[tuple[str, object]] = []

    def record(conn, cursor, sql, params, context, many):  # type: ignore[no-untyped-def]
        seen.append((sql, params))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    with db.read() as conn:
        raw = conn.connection.dbapi_connection
        return [
            [row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()]
            for sql, params in seen
            if f"FROM {table}" in sql
        ]


def test_a_look_up_by_name_searches_the_active_name_index_instead_of_scanning_every_lease(tmp_path: Path):
    """With the active states as bound parameters SQLite could not use the partial index
    uq_leases_active_name and scanned every lease ever made: a by-name look-up (each
    getservers and release makes one) grew with the history (``python -m bench history``)."""
    from dynvm.store.leases import LeaseStore

    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    db.migrate()
    [plan] = _plans(db, lambda: LeaseStore(db).by_name(["ci421", "ci422"]))
    assert plan == ["SEARCH leases USING INDEX uq_leases_active_name (name=?)"]
    db.close()


def test_the_hot_reads_of_active_leases_search_only_the_active_ones(tmp_path: Path):
    """Every pools pass reads the pools' VMs, and every getservers the pool of its OS and
    the leases of other users under its names' first letter. Through the index on
    (pooled, os) over every lease ever made, each read went through every pool VM ever
    recycled, or every lease ever handed out: on the 10x Monday replay the look at other
    users' names alone grew to an eighth of all the time. They search an index of the
    active leases only."""
    from dynvm.store.leases import LeaseStore

    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    db.migrate()
    store = LeaseStore(db)
    reads = {
        "pooled": store.pooled,
        "held": store.held,
        "idle_pooled": lambda: store.idle_pooled("centos"),
        "held_by_others (anonymous)": lambda: store.held_by_others(None, "ci"),
        "held_by_others": lambda: store.held_by_others("bob", "ci"),
        "pool_stock": store.pool_stock,
    }
    active_only = {"uq_leases_active_name", "ix_leases_active_pooled_os", "ix_leases_active_root"}
    for what, read in reads.items():
        [plan] = _plans(db, read)
        index = plan[0].partition(" USING INDEX ")[2].partition(" ")[0]
        assert index in active_only, (what, plan)
    db.close()


def test_the_names_in_a_requests_way_are_read_at_once_each_half_through_its_own_index(tmp_path: Path):
    """A reservation reads the leases of its names and the other callers' leases under its
    username's root in one statement (``LeaseStore.in_the_way``): the same leases as the two
    reads it replaces, and neither half scans (an ``OR`` would make SQLite scan them all):
    the other callers' half finds its root in ``ix_leases_active_root``, not by going
    through every active lease."""
    from dynvm.store.leases import LeaseStore

    from ..pg.test_replicas import lease

    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    db.migrate()
    store = LeaseStore(db)
    rows = [("ci1", "alice"), ("ci2", "bob"), ("ci", "dave"), ("cx", "bob"), ("c_", "carol"), ("dz", "bob")]
    with db.write() as conn:
        store.insert(conn, [lease(name, caller=caller) for name, caller in [*rows, ("ci3", None)]])
    for caller, root, names in (("alice", "ci", ["ci1", "ci2"]), (None, "ci", ["ci2", "dz"]), ("bob", "d", ["zz"])):
        named, others = store.in_the_way(names, caller, root)
        assert [x.name for x in named] == [x.name for x in store.by_name(names)]
        assert [x.name for x in others] == [x.name for x in store.held_by_others(caller, root)]
    named, others = store.in_the_way(["ci1", "ci2"], "alice", "ci")
    assert [x.name for x in named] == ["ci1", "ci2"]
    # bob's ci2 is both (in each list, as from each read); cx and c_ have other roots, and
    # the anonymous ci3 owns no prefix
    assert [x.name for x in others] == ["ci", "ci2"]
    [plan] = _plans(db, lambda: store.in_the_way(["ci1", "ci2"], "alice", "ci"))
    searches = [line for line in plan if line.startswith(("SEARCH", "SCAN"))]
    assert searches == [
        "SEARCH leases USING INDEX uq_leases_active_name (name=?)",
        "SEARCH leases USING INDEX ix_leases_active_root (<expr>=?)",
    ]
    db.close()


def test_the_forecasts_and_the_pools_reads_search_by_time(tmp_path: Path):
    """The leases made and ended since the forecast's last look, and the pool VMs of the
    last day, are read through an index on that time, not through every lease that ever
    ended (the state's index holds them all)."""
    from dynvm.store.leases import LeaseStore

    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    db.migrate()
    store = LeaseStore(db)
    [made] = _plans(db, lambda: store.made_since(1000.0))
    [ended] = _plans(db, lambda: store.ended_since(1000.0))
    [pooled] = _plans(db, lambda: store.pool_counts(1000.0))
    assert made[0] == "SEARCH leases USING INDEX ix_leases_ready_at (ready_at>?)"
    assert ended[0] == "SEARCH leases USING INDEX ix_leases_state_released (state=? AND released_at>?)"
    assert pooled[0] == "SEARCH leases USING INDEX ix_leases_pooled_at (pooled_at>?)"
    db.close()


def test_the_queues_reads_by_time_search_by_time(tmp_path: Path):
    """A finished request's row stays a week (its status stays readable). The scheduler's
    fairness reads the requests started in its window on every pass while requests wait,
    and the dashboard the requests finished in the last day: through an index on those
    times, not through a week of requests."""
    from dynvm.store.requests import RequestStore

    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    db.migrate()
    store = RequestStore(db)
    [started] = _plans(db, lambda: store.started_since(1000.0), table="requests")
    [finished] = _plans(db, lambda: store.finished_since(1000.0), table="requests")
    assert started[0] == "SEARCH requests USING INDEX ix_requests_started_at (started_at>?)"
    assert finished[0] == "SEARCH requests USING INDEX ix_requests_finished_at (finished_at>?)"
    db.close()


def test_a_lease_read_from_its_row_is_the_lease_its_fields_make(tmp_path: Path):
    """``_lease`` fills a ``Lease`` from a row without its ``__init__`` (hundreds a pools
    pass): only sound while the table's columns are the dataclass's fields, no more, no
    fewer, and the lease then equals, and hashes as, one made the usual way."""
    import dataclasses

    from dynvm.model import Lease
    from dynvm.states import LeaseState
    from dynvm.store.leases import LEASE_FIELDS, _lease

    assert sorted(LEASE_FIELDS) == sorted(f.name for f in dataclasses.fields(Lease))
    made = Lease(
        id="l1",
        request_id="r1",
        name="vm-1",
        username="u",
        os="centos",
        host_ref="1",
        state=LeaseState.READY,
        cpus=4,
        memory=4 << 30,
        disk=35 << 30,
        created_at=1.0,
        expires_at=2.0,
        owner="o",
        pooled=True,
        pooled_at=1.5,
    )
    row = [getattr(made, name) for name in LEASE_FIELDS]
    row[LEASE_FIELDS.index("state")] = "ready"  # as the database returns it
    read = _lease(row)
    assert read == made
    assert hash(read) == hash(made)
    assert read.state is LeaseState.READY
    assert dataclasses.replace(read, name="vm-2") == dataclasses.replace(made, name="vm-2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        read.name = "vm-3"  # type: ignore[misc]  # frozen, as one made by __init__
