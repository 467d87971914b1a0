"""The engine's hot paths send a fixed, small number of statements to the database,
whatever the length of the queue or the size of the pools (issue 27: the engine's cost per
request was SQLAlchemy's per statement, and a transaction each for what one could do).
Counted with SQLAlchemy's events (``Database.counting``) on model hosts and a SQLite file."""

from __future__ import annotations

import pytest

from dynvm.replay.hot_paths import as_dict, hot_paths

# statements, write transactions: what each path may send for a request of one VM (a read
# is a statement, and no transaction: it sends no BEGIN and no COMMIT)
LIMITS = {
    "reservation (its transaction)": (6, 1),  # of an OS without a pool: the pools are not read
    "getservers, warm": (10, 3),
    "getservers, cold": (12, 3),  # of an OS without a pool
    "release": (6, 2),
    "scheduler pass": (7, 1),
    "pools pass: nothing to do": (4, 0),
    "pools pass: requests wait": (2, 0),
}


@pytest.fixture(scope="module")
def costs():
    return {
        "small": as_dict(hot_paths(waiting=5, ready=2)),
        "large": as_dict(hot_paths(waiting=40, ready=12)),
        "batch": as_dict(hot_paths(waiting=5, ready=2, count=3)),
    }


def test_each_hot_path_stays_within_its_statements_and_transactions(costs):
    print()
    for path, (statements, transactions) in LIMITS.items():
        cost = costs["small"][path]
        print(f"{path:32s} {cost.statements:3d} statements {cost.transactions:3d} transactions")
        assert cost.statements <= statements, path
        assert cost.transactions <= transactions, path


def test_no_hot_path_grows_with_the_queue_or_the_pools(costs):
    for path in LIMITS:
        small, large = costs["small"][path], costs["large"][path]
        assert (large.statements, large.transactions) == (small.statements, small.transactions), path


def test_a_refill_costs_the_same_for_each_vm_it_starts_and_a_batch_for_each_vm_it_makes(costs):
    small, large = costs["small"]["pools pass: refill"], costs["large"]["pools pass: refill"]
    per_vm = (large.statements - small.statements) / ((12 + 1) - (2 + 1))  # ready + count VMs started
    assert per_vm <= 4  # its reservation: what is reserved, the queue, the lease and its room
    for path in ("getservers, warm", "getservers, cold", "release"):
        one, three = costs["small"][path], costs["batch"][path]
        assert three.transactions - one.transactions <= 2 * 2, path  # at most two more per extra VM


def test_no_statement_of_a_replayed_hour_scans_a_table_that_grows_with_the_history(monkeypatch):
    """Every read of leases, requests and history goes through an index: a scan costs more
    with every lease the database ever held, and a service that runs for months would
    slow down on each getservers (the look-up by name once did, the forecast's reads of
    made and ended leases and the pools' reading of the history too)."""
    from bench.demand import WeekShape, generate
    from sqlalchemy import event

    from dynvm.replay.runner import Replay, ReplayOptions
    from dynvm.store.db import Database

    plans: dict[str, list[str]] = {}
    made = Database.__init__

    def explaining(self: Database, *args: object, **kwargs: object) -> None:
        made(self, *args, **kwargs)

        @event.listens_for(self.engine, "before_cursor_execute")
        def explain(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            if executemany or statement in plans or not statement.lstrip().startswith(("SELECT", "UPDATE", "DELETE")):
                return
            rows = cursor.connection.execute(f"EXPLAIN QUERY PLAN {statement}", parameters).fetchall()
            plans[statement] = [row[3] for row in rows]

    monkeypatch.setattr(Database, "__init__", explaining)
    trace, past = generate(WeekShape(), seed=1), generate(WeekShape(days=7), seed=2)
    Replay(trace, ReplayOptions(hosts=8, policy="learned", start=8 * 3600, hours=1.0), past).run()
    assert len(plans) > 30, "the replay's statements were not seen"
    growing = ("leases", "requests", "history")
    scans = {
        " ".join(statement.split())[:160]: plan
        for statement, plan in plans.items()
        if any(step in (f"SCAN {table}" for table in growing) for step in plan)
        and "leases.pooled_at IS NOT NULL ORDER BY" not in statement  # the replay's own idle count, once, at its end
        and "SET handed_over_at = COALESCE" not in statement  # migration 0009, once
    }
    assert scans == {}


def test_a_pools_pass_reserves_all_its_refills_in_one_transaction_within_the_per_host_limit():
    """Every refill of a pass is placed under one lock (the rooms shrink as it goes) and
    inserted together, however many; no host is given more than ``refill.per.host``."""
    import dataclasses
    from collections import Counter

    from dynvm.replay.model import VirtualClock
    from dynvm.replay.runner import ReplayOptions, model_engine

    options = ReplayOptions(hosts=4, policy="fixed", fixed={"centos": 1, "windows": 1})
    with model_engine({"centos", "windows"}, options, VirtualClock(1000.0)) as (service, _):
        settings = dataclasses.replace(
            service.settings, ready_pools=dataclasses.replace(service.settings.ready_pools, refill_per_host=2)
        )
        busy: Counter[str] = Counter({"1": 2})  # host 1 makes its most already
        with service.lease_store.db.counting() as count:
            made = service.admission.reserve_pool_vms(settings, [("centos", 4), ("windows", 9)], busy, {"2"})
        assert count.transactions == 1
        per_host = Counter(lease.host_ref for lease in made)
        assert set(per_host) == {"3", "4"}  # host 1 is at its limit, host 2 is blocked (backing off)
        assert per_host == {"3": 2, "4": 2}
        assert [lease.os for lease in made] == ["centos"] * 4  # the limit is reached before windows' turn
        assert {lease.id for lease in service.lease_store.pooled()} == {lease.id for lease in made}
