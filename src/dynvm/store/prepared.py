"""The hot paths' statements, compiled once per dialect and sent straight to the driver.

SQLAlchemy's execution of a statement it has compiled and cached still costs about
50 µs here: an execution context, the parameters processed through the compiled form, a
cursor wrapper, a result object and its rows. The driver itself (sqlite3, psycopg) takes
about 3 µs for the same indexed look-up, and a lease takes about twenty statements, so
that layer was a third of a lease's CPU (``docs/PERFORMANCE.md``). A ``Prepared`` does
once what SQLAlchemy does at each execution: it renders the SQL with SQLAlchemy's own
compiler, notes where each bound value goes and the type conversions SQLAlchemy would
apply (JSON, SQLite's booleans), and then only binds, executes and converts.

What a caller keeps: the statement is the same SQLAlchemy statement, built once
(``functools.cache``) where it is defined; it runs in the caller's transaction on the
caller's connection; a driver error is raised as SQLAlchemy's own (``IntegrityError``,
an invalidated connection on a lost PostgreSQL link), so handlers do not change; and
``before_cursor_execute`` listeners (the statement counter, the query-plan tests) see
every statement. Only statements built once belong here: the cache holds each for the
life of its ``Database``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

_EXPANDING = re.compile(r"__\[POSTCOMPILE_(\w+)\]")

Processor = Callable[[Any], Any]


class Prepared:
    """One statement compiled for one dialect (``column_keys``: for an INSERT, the
    columns its rows give)."""

    def __init__(self, statement: ClauseElement, dialect: Dialect, column_keys: Sequence[str] | None = None) -> None:
        compiled: Any = statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        self.statement = statement
        self.sql = compiled.string
        self.positional = bool(dialect.positional)
        self.names: list[str] = list(compiled.positiontup or []) if self.positional else []
        self.defaults: dict[str, Any] = dict(compiled.params)  # the values written into the statement
        self.expanding = frozenset(name for name, bind in compiled.binds.items() if bind.expanding)
        self.binds: dict[str, Processor] = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self.binds[name] = process
        returned = _returned(statement)
        self.columns: list[str] = [str(getattr(c, "key", None) or getattr(c, "name", "")) for c in returned]
        self._types = [c.type for c in returned]
        self._results: list[Processor | None] | None = None  # from the first result's column types
        self._dialect = dialect
        # per lengths of the IN lists; threads that meet a new length at once compute the
        # same entry, and the last one kept is as good as the first
        self._expanded: dict[tuple[int, ...], tuple[str, list[str]]] = {}

    # -- binding ---------------------------------------------------------------------------

    def _value(self, name: str, values: Mapping[str, Any]) -> Any:
        value = values[name] if name in values else self.defaults[name]
        process = self.binds.get(name)
        return process(value) if process is not None and value is not None else value

    def _expand(self, lengths: tuple[int, ...]) -> tuple[str, list[str]]:
        """The SQL and its parameters' names with each expanding parameter (``IN``) given
        as many places as its list has values, once per set of lengths."""
        known = self._expanded.get(lengths)
        if known is not None:
            return known
        sizes = dict(zip(sorted(self.expanding), lengths, strict=True))

        def places(match: re.Match[str]) -> str:
            name = match.group(1)
            if self.positional:
                return ", ".join("?" for _ in range(sizes[name]))
            return ", ".join(f"%({name}_{n})s" for n in range(1, sizes[name] + 1))

        sql = _EXPANDING.sub(places, self.sql)
        names: list[str] = []
        for name in self.names:
            names += [f"{name}_{n}" for n in range(1, sizes[name] + 1)] if name in sizes else [name]
        self._expanded[lengths] = (sql, names)
        return sql, names

    def bind(self, values: Mapping[str, Any]) -> tuple[str, Sequence[Any] | dict[str, Any]]:
        """The SQL and the driver's parameters for ``values`` (by the statement's names)."""
        sql, names = self.sql, self.names
        flat = values
        if self.expanding:
            lists = {name: list(values[name]) for name in self.expanding}
            sql, names = self._expand(tuple(len(lists[name]) for name in sorted(self.expanding)))
            flat = dict(values)
            for name, items in lists.items():
                process = self.binds.get(name)  # every place of a list converts alike
                if process is not None:
                    items = [process(item) if item is not None else None for item in items]
                flat |= {f"{name}_{n}": item for n, item in enumerate(items, 1)}
        if self.positional:
            return sql, [self._value(name, flat) for name in names]
        every = self.defaults.keys() | flat.keys()
        return sql, {name: self._value(name, flat) for name in every if name not in self.expanding}

    # -- results ---------------------------------------------------------------------------

    def _processors(self, cursor: Any) -> list[Processor | None]:
        """Per returned column, SQLAlchemy's conversion for the driver's column type (as
        SQLAlchemy asks it, of the first result's description). Read once: psycopg builds
        a description anew each time it is asked for."""
        if self._results is None:
            self._results = [
                kind.dialect_impl(self._dialect).result_processor(self._dialect, column[1])
                for kind, column in zip(self._types, cursor.description, strict=True)
            ]
        return self._results

    def convert(self, rows: list[tuple[Any, ...]], cursor: Any) -> list[tuple[Any, ...]]:
        """``rows`` as ``cursor`` (the driver's, which returned them) gave them, with
        SQLAlchemy's conversions applied."""
        if not rows:
            return rows
        processors = self._processors(cursor)
        if not any(processors):
            return rows
        pairs = [(n, p) for n, p in enumerate(processors) if p is not None]
        out = []
        for row in rows:
            values = list(row)
            for n, process in pairs:
                if values[n] is not None:
                    values[n] = process(values[n])
            out.append(tuple(values))
        return out


class Outcome:
    """What a prepared statement returned: its rows (tuples, in the statement's column
    order) and how many rows it changed."""

    __slots__ = ("columns", "rowcount", "rows")

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int, columns: list[str]) -> None:
        self.rows = rows
        self.rowcount = rowcount
        self.columns = columns

    def __iter__(self) -> Any:
        return iter(self.rows)

    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def scalar_one(self) -> Any:
        [row] = self.rows
        return row[0]

    def mappings(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def execute(prepared: Prepared, conn: Connection, values: Mapping[str, Any]) -> Outcome:
    """Execute ``prepared`` with ``values`` on ``conn``, in its transaction (begun here
    if the caller had none, as SQLAlchemy's autobegin would)."""
    if prepared.expanding and any(not values[name] for name in prepared.expanding):
        # an empty IN list: SQLAlchemy renders its own never-true form; rare, so let it
        result = conn.execute(prepared.statement, dict(values))  # type: ignore[call-overload]  # a prepared statement is always executable
        rows = [tuple(row) for row in result] if result.returns_rows else []
        return Outcome(rows, result.rowcount, prepared.columns)
    sql, parameters = prepared.bind(values)
    with _driver_cursor(conn, sql, parameters, many=False) as cursor:
        cursor.execute(sql, parameters)
        rows = cursor.fetchall() if prepared.columns else []  # a statement that returns none has no columns
        return Outcome(prepared.convert(rows, cursor), cursor.rowcount, prepared.columns)


def execute_many(prepared: Prepared, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Execute ``prepared`` (an INSERT without lists) once per row of ``rows``, as one
    ``executemany``."""
    if not rows:
        return
    parameters = [prepared.bind(row)[1] for row in rows]
    if len(parameters) == 1:  # psycopg's executemany sets up a pipeline even for one row
        with _driver_cursor(conn, prepared.sql, parameters[0], many=False) as cursor:
            cursor.execute(prepared.sql, parameters[0])
        return
    with _driver_cursor(conn, prepared.sql, parameters, many=True) as cursor:
        cursor.executemany(prepared.sql, parameters)


@contextlib.contextmanager
def _driver_cursor(conn: Connection, sql: str, parameters: Any, many: bool) -> Iterator[Any]:
    """A cursor of ``conn``'s driver connection, in its transaction, once the statement
    listeners have seen what it will run; the driver's errors raised as SQLAlchemy's."""
    if not conn.in_transaction():
        conn.begin()
    driver = conn.connection.driver_connection
    assert driver is not None
    cursor = driver.cursor()
    try:
        for listener in conn.dispatch.before_cursor_execute:
            listener(conn, cursor, sql, parameters, None, many)
        yield cursor
    except conn.dialect.loaded_dbapi.Error as error:
        raise _as_sqlalchemy_error(conn, cursor, error, sql, parameters) from error
    finally:
        cursor.close()


def _as_sqlalchemy_error(conn: Connection, cursor: Any, error: Any, sql: str, parameters: Any) -> Exception:
    """The driver's error as SQLAlchemy raises it (``IntegrityError``, ...); a lost link
    invalidates the connection, so the pool never hands it out again."""
    lost = conn.dialect.is_disconnect(error, conn.connection.driver_connection, cursor)
    if lost:
        conn.invalidate(error)
    dbapi_error = conn.dialect.loaded_dbapi.Error
    wrapped: Exception = DBAPIError.instance(
        sql, parameters, error, dbapi_error, connection_invalidated=lost, dialect=conn.dialect
    )
    return wrapped


def _returned(statement: ClauseElement) -> list[Any]:
    """The columns a statement returns: a SELECT's, or an INSERT's or UPDATE's RETURNING."""
    return list(getattr(statement, "exported_columns", ()))
