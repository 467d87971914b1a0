"""PostgreSQL's plans for the reads every reservation makes, on a lab that holds many leases."""

from __future__ import annotations

from sqlalchemy import text

from dynvm.store.db import Database
from dynvm.store.leases import LeaseStore, _in_the_way_statement

from .test_replicas import lease


def test_the_other_callers_names_in_a_requests_way_are_found_by_their_root(fresh_pg: str):
    """Each reservation, with every host's lock held, reads the other callers' leases whose
    names could clash with its own. By their names' first letter it went through every
    active lease; by their root it is one look-up in ``ix_leases_active_root``, however
    many leases the lab holds."""
    db = Database(fresh_pg)
    db.migrate()
    store = LeaseStore(db)
    with db.write() as conn:
        store.insert(conn, [lease(f"job{n}x{k}", caller=f"c{n}") for n in range(300) for k in range(2)])
    with db.engine.connect() as conn:
        conn.execute(text("ANALYZE leases"))
        conn.commit()
        sql, args = db.prepare(_in_the_way_statement(False)).bind({"names": ["job7x"], "root": "job7x", "caller": "zz"})
        plan = "\n".join(row[0] for row in conn.connection.driver_connection.execute("EXPLAIN " + sql, args))
    assert "Index Cond: (rtrim((name)::text, '0123456789'::text) =" in plan, plan
    assert "ix_leases_active_root" in plan, plan
    named, others = store.in_the_way(["job7x"], "zz", "job7x")
    assert named == []
    assert sorted(x.name for x in others) == ["job7x0", "job7x1"]
    db.close()
