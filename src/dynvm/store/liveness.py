"""Whether a pooled PostgreSQL connection still works, asked as it leaves the pool.

SQLAlchemy's ``pool_pre_ping`` asks the server on every checkout: a round trip before
every transaction and every read, about a seventh of a lease's cost on PostgreSQL. A
connection in use a moment ago needs no such question, and one that died while idle
almost always says so without being asked: a server that restarts, or whose backend is
terminated, first sends the client its reason and closes the socket, so the socket reads
as ready while no statement is running. So a connection is pinged (the dialect's own
``do_ping``) only when its socket has something to say or it sat in the pool for more
than ``PING_AFTER_IDLE`` seconds (a link that went silent: a failover, a firewall's
idle cut-off). One that fails is replaced, as ``pool_pre_ping`` would replace it
(SQLAlchemy's ``DisconnectionError`` from a ``checkout`` listener: the pool connects
anew, the caller never sees it).

A backend that dies in the middle of a statement still fails that statement; then
``prepared.py`` and SQLAlchemy invalidate the connection, as before.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import DisconnectionError

PING_AFTER_IDLE = 10.0  # seconds in the pool after which a connection is asked before use
_IDLE_SINCE = "dynvm_idle_since"


def check_on_checkout(
    engine: Engine, ping_after_idle: float = PING_AFTER_IDLE, clock: Callable[[], float] = time.monotonic
) -> None:
    """Install the check on ``engine``'s pool (once, when the engine is made). ``clock``:
    seconds, for how long a connection sat in the pool."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = clock()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop(_IDLE_SINCE, None)
        if idle_since is None:
            return  # just connected
        if not spoke_while_idle(dbapi_connection) and clock() - idle_since <= ping_after_idle:
            return
        try:
            alive = dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as e:
            raise DisconnectionError(f"a pooled connection did not answer: {e}") from e
        if not alive:
            raise DisconnectionError("a pooled connection did not answer")


def spoke_while_idle(dbapi_connection: Any) -> bool:
    """The server sent something to a connection that runs nothing (or closed it): its
    socket is readable. Nothing to read, or no socket to ask: False."""
    try:
        fileno = dbapi_connection.fileno()
    except Exception:  # closed, or a driver without a socket: the ping after idle still applies
        return bool(getattr(dbapi_connection, "closed", False))
    if fileno < 0:
        return True
    readable, _, _ = select.select([fileno], [], [], 0)
    return bool(readable)
