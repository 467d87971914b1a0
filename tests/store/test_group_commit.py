"""SQLite writers queued together share one commit (``store/group_commit.py``), on a real
SQLite file: each still returns only once its work is on disk, and one that fails undoes
only its own work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Connection, event, text
from sqlalchemy.exc import IntegrityError

from dynvm.store.db import Database
from dynvm.store.group_commit import MAX_MEMBERS


@pytest.fixture
def db(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'g.db'}")
    with db.write() as conn:
        conn.execute(text("CREATE TABLE rows (name TEXT PRIMARY KEY)"))
    yield db
    db.close()


def committed(db: Database) -> set[str]:
    """What another connection sees: only what was committed."""
    with db.engine.connect() as conn:
        return {name for (name,) in conn.execute(text("SELECT name FROM rows"))}


def commits_during(db: Database, action: Callable[[], None]) -> int:
    count = [0]

    def seen(_conn: object) -> None:
        count[0] += 1

    event.listen(db.engine, "commit", seen)
    try:
        action()
    finally:
        event.remove(db.engine, "commit", seen)
    return count[0]


def queue_behind_first(db: Database, bodies: dict[str, Callable[..., None]]) -> dict[str, BaseException | None]:
    """The first body holds the writer's turn until every other writer waits for it; then
    all run (the others in no set order: a lock is not a queue). What each raised (None:
    returned)."""
    names = list(bodies)
    release = threading.Event()
    outcome: dict[str, BaseException | None] = {}

    def writer(name: str) -> None:
        try:
            with db.write() as conn:
                if name == names[0]:
                    release.wait(10)
                bodies[name](conn)
            outcome[name] = None
        except BaseException as e:  # what the writer's caller would see
            outcome[name] = e

    threads = [threading.Thread(target=writer, args=(names[0],))]
    threads[0].start()
    for name in names[1:]:
        time.sleep(0.01)  # in this order
        threads.append(threading.Thread(target=writer, args=(name,)))
        threads[-1].start()
    deadline = time.monotonic() + 10
    while db.queued_writers() < len(names) - 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert db.queued_writers() == len(names) - 1
    release.set()
    for thread in threads:
        thread.join(10)
    return outcome


def insert(name: str) -> Callable[..., None]:
    def body(conn) -> None:  # type: ignore[no-untyped-def]
        conn.execute(text("INSERT INTO rows VALUES (:n)"), {"n": name})

    return body


def test_writers_queued_behind_one_share_its_commit(db: Database):
    names = [f"w{n}" for n in range(4)]
    outcome: dict[str, BaseException | None] = {}
    commits = commits_during(db, lambda: outcome.update(queue_behind_first(db, {name: insert(name) for name in names})))
    assert outcome == dict.fromkeys(names)
    assert commits == 1  # four writers, one commit
    assert committed(db) == set(names)


def test_a_writer_returns_only_after_the_commit_it_shares(db: Database):
    """No writer of a batch is told its work is done before the batch's commit: each
    looks, from another connection, the moment its write returns."""
    looked: dict[str, bool] = {}
    names = [f"w{n}" for n in range(3)]
    release = threading.Event()

    def writer(name: str) -> None:
        with db.write() as conn:
            if name == names[0]:
                release.wait(10)
            conn.execute(text("INSERT INTO rows VALUES (:n)"), {"n": name})
        looked[name] = name in committed(db)

    threads = []
    for name in names:
        threads.append(threading.Thread(target=writer, args=(name,)))
        threads[-1].start()
        time.sleep(0.01)
    while db.queued_writers() < 2:
        time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(10)
    assert looked == dict.fromkeys(names, True)


def test_a_writer_that_fails_undoes_only_its_own_work(db: Database):
    def fails(conn) -> None:  # type: ignore[no-untyped-def]
        conn.execute(text("INSERT INTO rows VALUES ('b')"))
        raise ValueError("b changed its mind")

    outcome = queue_behind_first(db, {"a": insert("a"), "b": fails, "c": insert("c")})
    assert outcome["a"] is None
    assert isinstance(outcome["b"], ValueError)
    assert outcome["c"] is None
    assert committed(db) == {"a", "c"}


def test_a_writer_whose_statement_fails_leaves_the_others_theirs(db: Database):
    """A constraint that fails mid-batch (a name taken by an earlier writer of the same
    batch, not yet committed) fails that writer alone, as it would have failed alone."""
    outcome = queue_behind_first(db, {"a": insert("x"), "b": insert("x"), "c": insert("c")})
    assert outcome["a"] is None
    assert isinstance(outcome["b"], IntegrityError)
    assert outcome["c"] is None
    assert committed(db) == {"x", "c"}


def test_a_read_inside_a_write_sees_what_the_writers_before_it_wrote(db: Database):
    """What a write decides on (the room reserved, say) it reads inside its transaction;
    a store read without the write's connection goes to it too, and sees the earlier
    writers' rows, committed with it but not yet on disk."""
    seen: list[set[str]] = []

    def reads(conn) -> None:  # type: ignore[no-untyped-def]
        with db.read() as own:
            seen.append({name for (name,) in own.execute(text("SELECT name FROM rows"))})

    outcome = queue_behind_first(db, {"a": insert("a"), "c": reads})
    assert outcome == dict.fromkeys("ac")
    assert seen == [{"a"}]


def test_a_commit_that_fails_fails_every_writer_of_its_batch(db: Database):
    """Nobody is told their work is saved when it is not. A deferred foreign key is the
    way to make SQLite refuse a commit at will."""
    with db.write() as conn:
        conn.execute(text("CREATE TABLE parent (id TEXT PRIMARY KEY)"))
        conn.execute(text("CREATE TABLE child (parent TEXT REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"))

    def orphan(conn) -> None:  # type: ignore[no-untyped-def]
        conn.execute(text("INSERT INTO child VALUES ('nobody')"))

    outcome = queue_behind_first(db, {"a": insert("a"), "b": orphan, "c": insert("c")})
    assert all(isinstance(e, IntegrityError) for e in outcome.values()), outcome
    assert committed(db) == set()
    with db.write() as conn:  # and the next writer starts afresh
        conn.execute(text("INSERT INTO rows VALUES ('after')"))
    assert committed(db) == {"after"}


def test_a_batch_commits_after_at_most_max_members_writers(db: Database):
    names = [f"w{n:02d}" for n in range(MAX_MEMBERS + 2)]
    commits = commits_during(db, lambda: queue_behind_first(db, {name: insert(name) for name in names}))
    assert commits == 2
    assert committed(db) == set(names)


def traced(db: Database) -> list[str]:
    """Every statement SQLite runs from now on, savepoints sent to the driver included."""
    statements: list[str] = []
    db.close()  # its connections, the writers' kept one too, are made again, traced

    def connected(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.set_trace_callback(statements.append)

    event.listen(db.engine, "connect", connected)
    return statements


def test_a_lone_writer_commits_at_once_without_a_savepoint(db: Database):
    statements = traced(db)
    with db.write() as conn:
        conn.execute(text("INSERT INTO rows VALUES ('alone')"))
    written = [s for s in statements if not s.startswith("PRAGMA")]
    assert committed(db) == {"alone"}
    assert written == [
        "BEGIN IMMEDIATE",
        "INSERT INTO rows VALUES ('alone')",
        "COMMIT",
    ]


def test_each_writer_after_the_first_is_a_savepoint_of_the_batch(db: Database):
    statements = traced(db)
    queue_behind_first(db, {"a": insert("a"), "b": insert("b")})
    writes = [s for s in statements if not s.startswith(("PRAGMA", "SELECT"))]
    assert writes == [
        "BEGIN IMMEDIATE",
        "INSERT INTO rows VALUES ('a')",
        "SAVEPOINT dynvm_writer",
        "INSERT INTO rows VALUES ('b')",
        "RELEASE dynvm_writer",
        "COMMIT",
    ]


def test_a_read_sends_sqlite_no_transaction_of_its_own_and_still_sees_what_was_committed(db: Database):
    """A read's BEGIN and COMMIT bought nothing (each statement reads its own snapshot, as
    on PostgreSQL) and cost two calls a read."""
    statements = traced(db)
    with db.read() as conn:
        before = conn.execute(text("SELECT count(*) FROM rows")).scalar_one()
    with db.write() as conn:
        conn.execute(text("INSERT INTO rows VALUES ('seen')"))
    with db.read() as conn:
        after = conn.execute(text("SELECT count(*) FROM rows")).scalar_one()
    assert after == before + 1
    read = [s for s in statements if not s.startswith("PRAGMA")]
    assert read == [
        "SELECT count(*) FROM rows",
        "BEGIN IMMEDIATE",
        "INSERT INTO rows VALUES ('seen')",
        "COMMIT",
        "SELECT count(*) FROM rows",
    ]


def test_writers_keep_their_connection_from_one_transaction_to_the_next(db: Database):
    """Checking a connection out of the pool for every write cost more than a statement. A
    writer whose body raised leaves it rolled back and clean for the next."""
    checkouts: list[object] = []
    event.listen(db.engine, "checkout", lambda dbapi, record, proxy: checkouts.append(dbapi))
    with db.write() as conn:
        conn.execute(text("INSERT INTO rows VALUES ('one')"))
    first = len(checkouts)  # none when the fixture's write kept one already

    def two_then_a_taken_name(conn: Connection) -> None:
        conn.execute(text("INSERT INTO rows VALUES ('two')"))
        conn.execute(text("INSERT INTO rows VALUES ('one')"))

    with pytest.raises(IntegrityError), db.write() as conn:
        two_then_a_taken_name(conn)
    for name in ("three", "four"):
        with db.write() as conn:
            conn.execute(text(f"INSERT INTO rows VALUES ('{name}')"))
    assert first <= 1
    assert len(checkouts) == first
    assert committed(db) == {"one", "three", "four"}
