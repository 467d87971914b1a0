"""The engine's reads as the history grows: a lab keeps every lease it ever held, and a
read that scans them costs more each week dynvm runs. For databases that have held 1,000,
10,000 and 100,000 leases (50 of them active), the per-call time of the reads every
getservers, release and scheduler pass makes: the look-up by name, the look at other users'
leases under a name's first letter, the pools' VMs (a quarter of the leases ever held were
ready-pool VMs, recycled since), the forecast's reads of the leases made and ended since
its last look, and the pools' counts of the last day.

``python -m bench history``; SQLite, a file in a temporary folder.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.table import Table
from sqlalchemy import false, insert, select

from dynvm.store.db import Database
from dynvm.store.leases import LeaseStore
from dynvm.store.tables import active_lease, leases

SIZES = (1_000, 10_000, 100_000)
ACTIVE = 50
CALLS = 200


def _recycled(i: int) -> bool:
    """A ready-pool VM that ended without a request: it stays ``pooled``."""
    return i >= ACTIVE and i % 4 == 0


def _fill(db: Database, n: int) -> None:
    rows = [
        {
            "id": f"l{i}",
            "request_id": f"r{i}",
            "name": f"job{i}",
            "username": f"job{i}",
            "os": "centos",
            "host_ref": "1",
            "template": "t",
            "state": "ready" if i < ACTIVE else "released",
            "cpus": 4,
            "memory": 4 << 30,
            "disk": 35 << 30,
            "created_at": float(i),
            "ready_at": float(i) + 60,
            "create_seconds": 60.0,
            "handed_over_at": float(i) + 60,
            "released_at": None if i < ACTIVE else float(i) + 600,
            "expires_at": float(i) + 3600,
            "owner": "bench",
            "caller": None if _recycled(i) else "alice",
            "pooled": _recycled(i),
        }
        for i in range(n)
    ]
    with db.write() as conn:
        conn.execute(insert(leases), rows)


def _ms(call: Callable[[int], object]) -> float:
    started = time.perf_counter()
    for k in range(CALLS):
        call(k)
    return (time.perf_counter() - started) / CALLS * 1000


def _row(db: Database, n: int) -> list[str]:
    """One size: the per-call times, in the table's order."""
    store = LeaseStore(db)
    recent = float(n)  # the last few hundred leases: what a forecast that keeps up reads

    def written(k: int) -> object:
        where = leases.c.name.in_([f"job{k % ACTIVE}"]) & active_lease() & (leases.c.pooled == false())
        with db.read() as conn:
            return conn.execute(select(leases).where(where)).all()

    calls: list[Callable[[int], object]] = [
        written,
        lambda k: store.held_by_others("bob", "j"),
        lambda k: store.pooled(),
        lambda k: store.made_since(recent, limit=200),
        lambda k: store.ended_since(recent, limit=200),
        lambda k: store.pool_counts(recent),
    ]
    return [f"{n:,}", *(f"{_ms(call):.2f}" for call in calls)]


def run() -> Table:
    table = Table(title=f"the engine's reads as the history grows (SQLite; ms per call, mean of {CALLS})")
    for column in (
        "leases held",
        "by name",
        "other users' names",
        "the pools' VMs",
        "made since",
        "ended since",
        "pool counts",
    ):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="dynvm-history-bench-") as tmp:
        for n in SIZES:
            db = Database(f"sqlite:///{Path(tmp) / f'{n}.db'}")
            db.migrate()
            _fill(db, n)
            table.add_row(*_row(db, n))
            db.close()
    return table
