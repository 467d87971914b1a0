"""Pooled PostgreSQL connections leave the pool without a round trip, unless the server
spoke to them while idle or they sat idle too long (``store/liveness.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

from dynvm.store.db import Database
from dynvm.store.liveness import check_on_checkout

from ..sim.simtools import wait_for

psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed: pip install -e '.[postgres]'")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(pg_url: str) -> Iterator[tuple[Engine, Clock, list[int]]]:
    """An engine of one pooled connection with the check, its clock, and its pings."""
    clock, pings = Clock(), []
    engine = create_engine(pg_url, pool_size=1, max_overflow=0)
    ping = engine.dialect.do_ping

    def counted(dbapi_connection: object) -> bool:
        pings.append(1)
        return ping(dbapi_connection)

    engine.dialect.do_ping = counted  # type: ignore[method-assign]  # count the dialect's own ping
    check_on_checkout(engine, ping_after_idle=10.0, clock=clock)
    yield engine, clock, pings
    engine.dispose()


def backend(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def terminate(pg_url: str, pid: int) -> None:
    """End a backend and wait until it is gone (``pg_terminate_backend`` only signals it)."""
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is None)


def test_a_connection_used_a_moment_ago_is_not_pinged(engine):
    engine, clock, pings = engine
    first = backend(engine)
    for _ in range(5):
        clock.now += 1.0
        assert backend(engine) == first  # the same pooled connection, every time
    assert pings == []


def test_a_connection_idle_longer_than_the_limit_is_pinged_before_use(engine):
    engine, clock, pings = engine
    first = backend(engine)
    clock.now += 10.5
    assert backend(engine) == first
    assert pings == [1]
    assert backend(engine) == first  # used a moment ago again: no second ping
    assert pings == [1]


def test_a_backend_terminated_while_idle_is_replaced_before_anyone_uses_it(engine, pg_url):
    """The server says why it closes the link; the socket reads as ready while idle, so
    the connection is pinged at once (not after the idle limit), fails, and the pool
    connects anew: the caller sees a working connection, no error."""
    engine, _clock, pings = engine
    first = backend(engine)
    terminate(pg_url, first)
    second = backend(engine)
    assert second != first
    assert pings == [1]


def test_the_service_database_survives_a_terminated_idle_backend(fresh_pg):
    """``Database`` on PostgreSQL installs the check: a read after every pooled backend
    was terminated works, without a ping on the reads before."""
    db = Database(fresh_pg)
    try:
        db.migrate()
        with db.read() as conn:
            pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        terminate(fresh_pg, pid)
        with db.read() as conn:
            assert int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one()) != pid
    finally:
        db.close()
