"""SQLite's write transactions, committed together when writers queue up.

SQLite has one writer at a time, and with ``synchronous=FULL`` every commit waits for the
disk (about 0.3 ms here; far longer on a busy or networked disk). A lease takes four or
five durable commits, so when several callers write at once they mostly wait for each
other's fsyncs. Here a writer that finds others queued behind it does not commit: it
hands its open transaction to the next, whose work runs in a ``SAVEPOINT`` inside it, and
the last of the queue (or the ``MAX_MEMBERS``-th) commits for all with one fsync. Every
writer still returns only once its work is durable, and a writer whose body raises undoes
only its own work (the savepoint), never another's. A lone writer pays nothing: no
savepoint, one commit, as before.

What changes for callers: while a writer's body runs, the writes batched before it are
not committed yet, so another connection would not see them. A read on the writer's own
thread therefore goes to the writer's connection (``current``; ``Database.read``), which
sees them, as it would have seen them committed before.

A write body must never wait for another thread's write to return (it never could: the
writer lock was always one at a time), and must not wait long for anything else: the
writers batched before it wait for it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import RootTransaction

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger(__name__)

MAX_MEMBERS = 8  # writers per commit: the first waits for at most seven others' bodies
STUCK_SECONDS = 30.0  # a writer waiting this long for its batch's commit says so in the log


@dataclass
class _Batch:
    connection: Connection
    root: RootTransaction
    members: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _Savepoint:
    """One writer's part of a batch, sent straight to the driver: SQLAlchemy's own
    ``begin_nested`` costs about as much as a statement of the engine's, twice per writer,
    and nothing here needs it to know (no dynvm code opens savepoints of its own)."""

    def __init__(self, connection: Connection) -> None:
        self._sqlite = cast("sqlite3.Connection", connection.connection.driver_connection)
        self._sqlite.execute("SAVEPOINT dynvm_writer")

    def commit(self) -> None:
        self._sqlite.execute("RELEASE dynvm_writer")

    def rollback(self) -> None:
        self._sqlite.execute("ROLLBACK TO dynvm_writer")
        self._sqlite.execute("RELEASE dynvm_writer")


class GroupCommit:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._turn = threading.Lock()  # one writer's body at a time
        self._queue = threading.Lock()  # guards ``_waiting``
        self._waiting = 0  # writers blocked on ``_turn``
        self._batch: _Batch | None = None  # the transaction open across writers, if any
        self._local = threading.local()
        # the writers' connection, kept from one transaction to the next (checking one out
        # and setting it up again cost a fortieth of a busy replay); dropped after a failure
        self._connection: Connection | None = None

    @property
    def queued(self) -> int:
        """Writers waiting for their turn now."""
        with self._queue:
            return self._waiting

    def current(self) -> Connection | None:
        """The write connection this thread is running a body on, if it is."""
        connection: Connection | None = getattr(self._local, "connection", None)
        return connection

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One writer's turn: ``BEGIN IMMEDIATE`` (or a savepoint in the batch already
        open), the body, then a commit shared with the writers queued behind. Returns once
        the commit is on disk; raises what the body raised, or what the commit raised."""
        with self._queue:
            self._waiting += 1
        self._turn.acquire()
        with self._queue:
            self._waiting -= 1
        try:
            batch = self._batch if self._batch is not None else self._open()
            batch.members += 1
            savepoint = _Savepoint(batch.connection) if batch.members > 1 else None
        except BaseException:
            if self._batch is not None:  # the savepoint failed: the connection is not to be trusted
                self._fail(self._batch)
            else:  # BEGIN failed: nothing is open
                self._turn.release()
            raise
        self._local.connection = batch.connection
        try:
            yield batch.connection
        except BaseException:
            self._local.connection = None
            self._undo(batch, savepoint)
            raise
        self._local.connection = None
        if savepoint is not None:
            try:
                savepoint.commit()  # RELEASE SAVEPOINT
            except BaseException as e:
                batch.error = e
                self._fail(batch)
                raise
        self._end_turn(batch)
        if not batch.done.wait(STUCK_SECONDS):
            log.warning("a database write has waited %.0f s for its group's commit", STUCK_SECONDS)
            batch.done.wait()
        if batch.error is not None:
            raise batch.error

    def _open(self) -> _Batch:
        """With the turn held: a new transaction (``BEGIN IMMEDIATE``)."""
        connection = self._connection or self._engine.connect().execution_options(dynvm_immediate=True)
        self._connection = None
        try:
            root = connection.begin()
        except BaseException:
            connection.close()
            raise
        self._batch = _Batch(connection, root)
        return self._batch

    def _undo(self, batch: _Batch, savepoint: _Savepoint | None) -> None:
        """With the turn held: the body raised. Alone in its batch, the whole transaction
        is rolled back; else only its savepoint, and the batch goes on."""
        if savepoint is None:
            self._finish(batch, commit=False)
            return
        try:
            savepoint.rollback()
        except BaseException as e:  # the connection is unusable: the whole batch fails
            batch.error = e
            self._fail(batch)
            return
        self._end_turn(batch)

    def _end_turn(self, batch: _Batch) -> None:
        """With the turn held: hand the open transaction to the next writer queued, or commit."""
        with self._queue:
            more = self._waiting > 0
        if more and batch.members < MAX_MEMBERS:
            self._turn.release()  # the next writer goes on in the same transaction
            return
        self._finish(batch, commit=True)

    def _fail(self, batch: _Batch) -> None:
        """With the turn held: the batch cannot go on; every writer in it gets ``error``."""
        if batch.error is None:
            batch.error = RuntimeError("the database write failed")
        self._finish(batch, commit=False)

    def _finish(self, batch: _Batch, commit: bool) -> None:
        """With the turn held: commit or roll back, wake the batch's writers, end the turn."""
        self._batch = None
        try:
            if commit:
                batch.root.commit()
            else:
                batch.root.rollback()
            if batch.error is None:
                self._connection = batch.connection  # kept for the next writer
        except BaseException as e:
            batch.error = batch.error or e
            with contextlib.suppress(Exception):
                batch.root.rollback()
        finally:
            if self._connection is not batch.connection:
                batch.connection.close()
            batch.done.set()
            self._turn.release()

    def close(self) -> None:
        """Give the kept connection back to the pool (``Database.close``, before the pool
        closes its connections); a writer after this checks one out again."""
        with self._turn:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
