"""The database engine from a URL, with migrations applied at start.

SQLite (the default, a file in ``~/.local/share/dynvm/``) runs in WAL mode with a busy
time-out; ``Database.write()`` opens ``BEGIN IMMEDIATE`` so that writers queue up instead
of failing mid-transaction, which is what makes a reservation's check-then-insert atomic.
Within the process, writers take turns on one connection (``group_commit.py``): SQLite's
own busy handler waits by sleeping and polling (up to 100 ms a turn), and each waiting
writer would hold a pooled connection meanwhile, so a burst of writers would starve quick
readers of connections; and writers queued together share one commit. PostgreSQL gets the
same guarantee from row locks (``host_locks``, ``FOR UPDATE``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.sql import ClauseElement

from .group_commit import GroupCommit
from .liveness import check_on_checkout
from .prepared import Outcome, Prepared, execute, execute_many

if TYPE_CHECKING:
    import sqlite3

DEFAULT_DB_PATH = Path("~/.local/share/dynvm/dynvm.db")


def default_db_url() -> str:
    return f"sqlite:///{DEFAULT_DB_PATH.expanduser()}"


def describe_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self._group: GroupCommit | None = None
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            _sqlite_transactions(self.engine)
            self._group = GroupCommit(self.engine)
        else:
            # checked as it leaves the pool without a round trip unless it needs one (``liveness.py``)
            self.engine = create_engine(url, pool_size=10, max_overflow=20)
            check_on_checkout(self.engine)
        # Reads run without BEGIN and COMMIT. On PostgreSQL, under READ COMMITTED each
        # statement sees what was committed when it began, in a transaction or not, so a
        # read transaction gave nothing but two more round trips. SQLite then reads each
        # statement from its own snapshot, as PostgreSQL does; no caller relies on more
        # (the engine runs on both). SQLite's is an option of ours (``_begin``):
        # SQLAlchemy's AUTOCOMMIT would hand pysqlite its own transaction handling back.
        if self.is_sqlite:
            self._reader = self.engine.execution_options(dynvm_read=True)
        else:
            self._reader = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._prepared: dict[tuple[ClauseElement, tuple[str, ...]], Prepared] = {}

    def prepare(self, statement: ClauseElement, column_keys: tuple[str, ...] = ()) -> Prepared:
        """``statement`` compiled for this database, once (``prepared.py``): only for
        statements built once, which live as long as the process."""
        key = (statement, column_keys)
        known = self._prepared.get(key)
        if known is None:
            known = self._prepared[key] = Prepared(statement, self.engine.dialect, column_keys)
        return known

    def run(self, conn: Connection, statement: ClauseElement, values: Mapping[str, Any] | None = None) -> Outcome:
        """Execute a statement built once, in ``conn``'s transaction, straight through the
        driver (``prepared.py``)."""
        return execute(self.prepare(statement), conn, values or {})

    def run_many(self, conn: Connection, statement: ClauseElement, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert ``rows`` (each with the same columns) with an INSERT built once."""
        if rows:
            execute_many(self.prepare(statement, tuple(rows[0])), conn, rows)

    def migrate(self) -> None:
        """Bring the schema to the newest revision (run at every start; cheap when current)."""
        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that may write; on SQLite it holds the write lock from the start,
        and returns once committed (with the writers queued behind it: ``group_commit.py``)."""
        if self._group is not None:
            with self._group.transaction() as connection:
                yield connection
            return
        with self.engine.connect() as connection, connection.begin():
            yield connection

    def queued_writers(self) -> int:
        """Writers waiting for their turn (SQLite; always 0 on PostgreSQL)."""
        return self._group.queued if self._group is not None else 0

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read; on SQLite, inside this thread's write, the write's own connection (which
        sees what the writes committed with it wrote before it)."""
        current = self._group.current() if self._group is not None else None
        if current is not None:
            yield current
            return
        # no begin(): a read has no transaction to open or to end (see __init__), and its
        # statements go straight to the driver; opening and committing SQLAlchemy's cost a
        # fiftieth of a busy replay
        with self._reader.connect() as connection:
            yield connection

    @contextlib.contextmanager
    def reading(self, conn: Connection | None) -> Iterator[Connection]:
        """``conn`` when the caller reads inside its own transaction, else a read of its own."""
        if conn is not None:
            yield conn
            return
        with self.read() as own:
            yield own

    @contextlib.contextmanager
    def writing(self, conn: Connection | None) -> Iterator[Connection]:
        """``conn`` when the caller writes inside its own transaction (whose commit it awaits
        before anyone is told), else a write transaction of its own."""
        if conn is not None:
            yield conn
            return
        with self.write() as own:
            yield own

    @contextlib.contextmanager
    def counting(self) -> Iterator[StatementCount]:
        """Count the statements sent to the database while the block runs (every thread's;
        ``BEGIN`` and ``COMMIT`` are counted apart): what the hot-path test and the engine
        bench measure. Not for serving: each statement then pays for a Python callback."""
        count = StatementCount()

        def seen(conn: Connection, cursor: object, statement: str, *args: object) -> None:
            count.add(statement)

        def committed(conn: Connection) -> None:
            count.transactions += 1

        event.listen(self.engine, "before_cursor_execute", seen)
        event.listen(self.engine, "commit", committed)
        try:
            yield count
        finally:
            event.remove(self.engine, "before_cursor_execute", seen)
            event.remove(self.engine, "commit", committed)

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
        self.engine.dispose()


@dataclass
class StatementCount:
    """What ``Database.counting`` saw: statements (``BEGIN`` aside), and commits: the
    write transactions (a read opens none, ``Database.read``)."""

    statements: int = 0
    transactions: int = 0

    def add(self, statement: str) -> None:
        if not statement.startswith("BEGIN"):
            self.statements += 1


def _sqlite_transactions(engine: Engine) -> None:
    """pysqlite's own transaction handling begins late and never IMMEDIATE; take it over
    (the recipe in SQLAlchemy's SQLite documentation) and pick the BEGIN per transaction."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get("dynvm_read", False):
            return  # each read statement its own snapshot (``Database.read``); COMMIT is then a no-op
        immediate = options.get("dynvm_immediate", False)
        # straight to the driver: through SQLAlchemy's execution a BEGIN cost as much as
        # one of the engine's statements, on every transaction
        driver = cast("sqlite3.Connection", connection.connection.driver_connection)
        driver.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
