"""Statements sent straight to the driver (``store/prepared.py``) answer as SQLAlchemy's own
execution of the same statement would, on a real SQLite file and a real PostgreSQL: the
same rows and types, SQLAlchemy's errors, the caller's transaction, and every statement
seen by the listeners that count and explain them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import bindparam, event, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from dynvm.store.db import Database
from dynvm.store.tables import leases, requests


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'p.db'}" if request.param == "sqlite" else request.getfixturevalue("fresh_pg")
    database = Database(url)
    database.migrate()
    yield database
    database.close()


def _lease_row(n: int, **values: object) -> dict[str, object]:
    row: dict[str, object] = {c.name: None for c in leases.columns}
    row |= {"id": f"id{n}", "request_id": "r", "name": f"vm{n}", "username": "u", "os": "centos"}
    row |= {"host_ref": "h1", "template": "t", "state": "ready", "cpus": 1, "memory": 1 << 30, "disk": 1 << 30}
    row |= {"created_at": 1.5, "expires_at": 100.25, "owner": "me", "pooled": n % 2 == 0}
    return row | values


BY_IDS = select(leases).where(leases.c.id.in_(bindparam("ids", expanding=True))).order_by(leases.c.id)
MOVE = (
    update(leases)
    .where(leases.c.id.in_(bindparam("ids", expanding=True)) & (leases.c.state == "ready"))
    .values(state=bindparam("b_state"))
    .returning(leases.c.id, leases.c.pooled)
)
INSERT_LEASES = insert(leases)
SET_VMS = update(requests).where(requests.c.id == bindparam("id")).values(vms=bindparam("vms"))
REQUEST = select(requests.c.vms, requests.c.cancel_requested).where(requests.c.id == bindparam("id"))


def test_rows_and_their_types_are_sqlalchemys_for_lists_of_any_length(db: Database):
    with db.write() as conn:
        db.run_many(conn, INSERT_LEASES, [_lease_row(n) for n in range(5)])
    for ids in (["id1"], ["id0", "id3", "id4"], ["id4", "id2"], []):
        with db.read() as conn:
            fast = db.run(conn, BY_IDS, {"ids": ids}).rows
            slow = [tuple(row) for row in conn.execute(BY_IDS, {"ids": ids})]
        assert fast == slow
        assert [type(row[leases.columns.keys().index("pooled")]) for row in fast] == [bool] * len(ids)
    with db.write() as conn:
        moved = db.run(conn, MOVE, {"ids": ["id0", "id1", "id9"], "b_state": "releasing"})
    assert sorted(moved.rows) == [("id0", True), ("id1", False)]
    assert moved.mappings()[0].keys() == {"id", "pooled"}


def test_json_is_written_and_read_back_as_sqlalchemy_would(db: Database):
    vms = [{"name": "vm1", "ip": None, "progress": [1, 2.5, "x"], "ready": True}]
    with db.write() as conn:
        conn.execute(
            insert(requests).values(
                id="r1", username="u", os="centos", count=1, state="queued", owner="me", created_at=1.0, vms=[]
            )
        )
        assert db.run(conn, SET_VMS, {"id": "r1", "vms": vms}).rowcount == 1
    with db.read() as conn:
        [fast] = db.run(conn, REQUEST, {"id": "r1"}).rows
        [slow] = [tuple(row) for row in conn.execute(REQUEST, {"id": "r1"})]
    assert fast == slow
    assert fast[0] == vms
    assert fast[1] is False


def test_a_driver_error_is_sqlalchemys_and_undoes_nothing_but_the_callers_transaction(db: Database):
    with db.write() as conn:
        db.run_many(conn, INSERT_LEASES, [_lease_row(1)])
    with pytest.raises(IntegrityError), db.write() as conn:
        db.run_many(conn, INSERT_LEASES, [_lease_row(2), _lease_row(1)])  # id1 again
    with db.read() as conn:
        assert [row[0] for row in db.run(conn, BY_IDS, {"ids": ["id1", "id2"]})] == ["id1"]


def test_it_runs_in_the_callers_transaction(db: Database):
    with db.write() as conn:
        db.run_many(conn, INSERT_LEASES, [_lease_row(1)])

    class Undo(Exception):
        pass

    moved = []

    def move_then_fail() -> None:
        with db.write() as conn:
            moved.extend(db.run(conn, MOVE, {"ids": ["id1"], "b_state": "releasing"}).rows)
            raise Undo

    with pytest.raises(Undo):
        move_then_fail()
    assert moved == [("id1", False)]
    with db.read() as conn:
        assert db.run(conn, BY_IDS, {"ids": ["id1"]}).mappings()[0]["state"] == "ready"


def test_the_statement_listeners_see_every_statement_with_its_parameters(db: Database):
    seen: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        with db.write() as conn:
            db.run_many(conn, INSERT_LEASES, [_lease_row(1), _lease_row(2)])
        with db.read() as conn:
            db.run(conn, BY_IDS, {"ids": ["id1", "id2"]})
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    statements = [s for s, _ in seen if not s.startswith("BEGIN")]
    assert [s.split()[0] for s in statements] == ["INSERT", "SELECT"]
    assert "id1" in str(seen[-1][1])
    assert "id2" in str(seen[-1][1])
    with db.counting() as count, db.read() as conn:
        db.run(conn, BY_IDS, {"ids": ["id1"]})
    assert count.statements == 1


def test_a_lost_postgresql_link_invalidates_the_connection(fresh_pg: str):
    import psycopg

    db = Database(fresh_pg)
    db.migrate()
    with db.engine.connect() as victim:
        pid = victim.connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
        with psycopg.connect(fresh_pg.replace("+psycopg", ""), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(DBAPIError) as raised:
            db.run(victim, BY_IDS, {"ids": ["id1"]})
        assert raised.value.connection_invalidated
        assert victim.invalidated
    with db.read() as conn:  # the pool hands out a working connection again
        assert db.run(conn, BY_IDS, {"ids": ["id1"]}).rows == []
    db.close()


def test_a_reservation_ends_with_its_create_and_only_then_on_either_database(db: Database):
    """On PostgreSQL the move and the end of its reservation are one statement
    (``_mark_ready_and_free_statement``, ``_finish_and_free_statement``); on SQLite two.
    Either way: a VM made by its owner frees its lease's room held in ``reservations``; a
    stale owner's changes nothing and frees nothing; an end frees what is left."""
    from dynvm.model import CreatedVm
    from dynvm.states import Actor, LeaseState
    from dynvm.store.leases import LeaseStore

    from .test_replicas import lease

    store = LeaseStore(db)
    made, failed = lease("made"), lease("failed")
    with db.write() as conn:
        store.insert(conn, [made, failed])

    def reserved() -> set[str]:
        with db.read() as conn:
            return {str(row["lease_id"]) for row in store.pending_reservations(conn)}

    vm = CreatedVm(uuid="u-made", ref="OpaqueRef:m", name="made", ip="127.0.0.9", cpus=4, memory=1 << 30)
    assert store.mark_ready(made.id, vm, 5.0, owner="someone else") is None
    assert reserved() == {made.id, failed.id}
    ready = store.mark_ready(made.id, vm, 5.0, owner=made.owner)
    assert ready is not None
    assert (ready.state, ready.ip, ready.ready_at) == (LeaseState.READY, "127.0.0.9", 5.0)
    assert reserved() == {failed.id}
    [ended] = store.finish([failed.id], LeaseState.FAILED, 6.0, "no room", by=Actor.BUILDER)
    assert (ended.id, ended.state, ended.released_at, ended.error) == (failed.id, LeaseState.FAILED, 6.0, "no room")
    assert reserved() == set()
