"""Several dynvm replicas on one PostgreSQL database."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import text

from dynvm.model import Lease, LeaseRequest, NameInUse, NotEnoughCapacity
from dynvm.runtime import Intervals
from dynvm.sim.settings import Timing
from dynvm.states import Actor, LeaseState
from dynvm.store.db import Database
from dynvm.store.leases import LeaseStore
from dynvm.xen.provision import MARKER_KEY

from ..sim.simtools import wait_for
from ..store.test_db import schema_drift
from ..store.test_history import check_stats_and_query
from ..test_serve import ServeProcess

GiB = 1024**3


def lease(name: str, **changes: object) -> Lease:
    values: dict[str, object] = {
        "id": f"id-{name}-{time.monotonic_ns()}",
        "request_id": "r",
        "name": name,
        "username": name,
        "os": "centos",
        "host_ref": "1",
        "state": "creating",
        "cpus": 4,
        "memory": GiB,
        "disk": GiB,
        "created_at": 1.0,
        "expires_at": 2.0,
        "owner": "t#1",
    }
    values.update(changes)
    return Lease(**values)  # type: ignore[arg-type]


def test_the_schema_behaves_as_on_sqlite(fresh_pg):
    db = Database(fresh_pg)
    db.migrate()
    db.migrate()  # idempotent
    assert schema_drift(db) == []  # the migrations build what store/tables.py describes
    store = LeaseStore(db)
    first = lease("same")
    with db.write() as conn:
        store.insert(conn, [first])
    with pytest.raises(NameInUse), db.write() as conn:
        store.insert(conn, [lease("same")])  # the partial unique index, on PostgreSQL too
    store.finish([first.id], LeaseState.RELEASED, 3.0, by=Actor.OPERATOR)
    with db.write() as conn:
        store.insert(conn, [lease("same")])  # a released name may be used again
    db.close()


@pytest.mark.parametrize("batch", [1, 3])
def test_leases_and_their_reservations_are_inserted_together_and_a_clash_leaves_neither(db_url, batch):
    """On PostgreSQL one statement writes a lease and its reservation (``insert``); on
    SQLite two. Either way a batch's reservations hold what each lease was given, and a name
    in use leaves no lease and no reservation of the batch behind."""
    db = Database(db_url)
    db.migrate()
    store = LeaseStore(db)
    first = [lease(f"job{n}", memory=(n + 1) * GiB) for n in range(batch)]
    with db.write() as conn:
        store.insert(conn, first, [(n + 1) * GiB + 17 for n in range(batch)])
    with db.read() as conn:
        held = {row["lease_id"]: row for row in store.pending_reservations(conn)}
    assert {lease.id: held[lease.id]["memory"] for lease in first} == {
        lease.id: (n + 1) * GiB + 17 for n, lease in enumerate(first)
    }
    assert all(held[lease.id]["cpus"] == 4 and held[lease.id]["host_ref"] == "1" for lease in first)
    clashing = [lease(f"other{n}") for n in range(batch - 1)] + [lease(f"job{batch - 1}")]
    with pytest.raises(NameInUse), db.write() as conn:
        store.insert(conn, clashing)
    with db.read() as conn:
        assert sorted(row["lease_id"] for row in store.pending_reservations(conn)) == sorted(x.id for x in first)
    assert sorted(x.name for x in store.active()) == sorted(x.name for x in first)
    db.close()


def test_history_stats_and_queries_agree_with_sqlite(fresh_pg):
    db = Database(fresh_pg)
    db.migrate()
    check_stats_and_query(db)
    db.close()


def _storm(a, b, lab) -> None:
    """24 requests at once, split over two replicas, for room for 8: exactly 8 granted, and
    no host holds more than it has."""
    outcomes: list[object] = []
    lock = threading.Lock()

    def ask(n: int) -> None:
        service = (a, b)[n % 2].engine
        try:
            result: object = service.acquire(LeaseRequest(f"storm{n}", "centos"))
        except NotEnoughCapacity as e:
            result = e
        with lock:
            outcomes.append(result)

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(ask, range(24)))  # three times the capacity, split over two replicas
    granted = [o for o in outcomes if isinstance(o, list)]
    assert len(granted) == 8
    assert len(outcomes) == 24
    for index in (0, 1):
        mine = [
            r
            for r in lab.xapi(index).VM.get_all_records().values()
            if MARKER_KEY in r["other_config"] and r["power_state"] == "Running"
        ]
        assert len(mine) == 4  # 4 x 4 vCPUs = 16 CPUs per host, never more


def test_two_replicas_under_a_storm_grant_exactly_the_capacity(make_services, sim_lab, fresh_pg):
    lab = sim_lab(hosts=2, host_cpus=16, timing=Timing(clone_seconds=0.05, boot_seconds=0.3))  # room: 2 x 4
    a, _ = make_services(lab=lab, db=fresh_pg, replica="a")
    b, _ = make_services(lab=lab, db=fresh_pg, replica="b")
    assert not a.db.is_sqlite
    assert a.engine.available_count("centos") == b.engine.available_count("centos") == 8
    _storm(a, b, lab)


def test_a_database_without_the_hosts_lock_rows_still_grants_exactly_the_capacity(make_services, sim_lab, fresh_pg):
    """A restored or hand-made database may lack a host's lock row: the reservation makes
    the missing rows and locks them before it reads what is reserved."""
    lab = sim_lab(hosts=2, host_cpus=16, timing=Timing(clone_seconds=0.05, boot_seconds=0.3))  # room: 2 x 4
    a, _ = make_services(lab=lab, db=fresh_pg, replica="a")
    b, _ = make_services(lab=lab, db=fresh_pg, replica="b")
    a.engine.acquire(LeaseRequest("first", "centos"))  # the rows exist now...
    a.engine.release_names(["first"])
    with a.db.write() as conn:
        conn.execute(text("DELETE FROM host_locks"))  # ...and are gone, as in a backup taken before them
    _storm(a, b, lab)
    with a.db.read() as conn:
        assert sorted(conn.execute(text("SELECT ref FROM host_locks")).scalars()) == ["1", "2"]


def test_the_leader_runs_expiry_and_another_takes_over_when_it_dies(make_services, sim_lab, fresh_pg):
    quick = Intervals(reap=0.2, reconcile=3600, export=3600, sync_wait=10, shutdown_grace=1)
    lab = sim_lab()
    a, _ = make_services(lab=lab, db=fresh_pg, replica="a", intervals=quick)
    b, _ = make_services(lab=lab, db=fresh_pg, replica="b", intervals=quick)
    assert a.leadership.is_leader()
    assert not b.leadership.is_leader()  # exactly one leader
    [doomed] = b.engine.acquire(LeaseRequest("doomed", "centos", expires_in_minutes=0.05))  # 3 s
    a.stop()  # the leader goes away ...
    wait_for(lambda: b.leadership.is_leader(), timeout=30)  # ... another takes over ...
    wait_for(lambda: b.engine.lease_store.get(doomed.id).state == "expired", timeout=30)  # ... and expiry goes on
    assert not any(r["name_label"] == "doomed" for r in lab.xapi().VM.get_all_records().values())


def test_kill_9_of_the_leader_process_moves_expiry_to_the_other(sim_lab, fresh_pg):
    """Real processes: the leader dies without a word (its database connection just
    closes); the other replica takes the advisory lock and expires what was due."""
    lab = sim_lab()
    leader = ServeProcess(lab.settings.source, fresh_pg)
    other = ServeProcess(lab.settings.source, fresh_pg)
    try:
        assert (leader.metric("dynvm_leader"), other.metric("dynvm_leader")) == (1.0, 0.0)
        answer = httpx.get(f"{other.url}/getservers/doomed", params={"expiresin": "0.05"}, timeout=60)  # 3 s
        assert answer.status_code == 200, answer.text
        leader.process.kill()
        leader.process.wait(timeout=30)
        wait_for(lambda: other.metric("dynvm_leader") == 1.0, timeout=30)
        wait_for(lambda: httpx.get(f"{other.url}/api/v1/leases/doomed").status_code == 404, timeout=30)
        assert not any(r["name_label"] == "doomed" for r in lab.xapi().VM.get_all_records().values())
    finally:
        if leader.process.poll() is None:
            leader.process.kill()
        assert other.stop() == 0


def test_a_request_queued_on_a_follower_is_served_by_the_leader_and_by_the_next_one(make_services, sim_lab, fresh_pg):
    lab = sim_lab(host_cpus=8)  # room for two CentOS VMs
    a, _ = make_services(lab=lab, db=fresh_pg, replica="a")
    b, _ = make_services(lab=lab, db=fresh_pg, replica="b")
    assert a.leadership.is_leader()
    b.engine.acquire(LeaseRequest("holder", "centos", count=2))
    first = b.engine.submit(LeaseRequest("q1", "centos"), 600)  # accepted by the follower
    second = b.engine.submit(LeaseRequest("q2", "centos", caller="bob"), 600)
    wait_for(lambda: b.engine.request_store.get(first.id).position == 1, timeout=10)  # the leader's forecast
    b.engine.release_names(["holder1"])
    wait_for(lambda: b.engine.request_store.get(first.id).state == "ready", timeout=30)  # served by a, seen by b
    assert a.engine.request_store.get(first.id).builder == a.engine.owner
    a.stop()  # the leader goes away with a request still queued
    wait_for(lambda: b.leadership.is_leader(), timeout=30)
    b.engine.release_names(["holder2"])
    wait_for(lambda: b.engine.request_store.get(second.id).state == "ready", timeout=30)
    assert sorted(lease.name for lease in b.engine.lease_store.active()) == ["q1", "q2"]


def test_a_leader_that_stops_while_making_a_followers_request_gives_it_back_to_the_queue(
    make_services, sim_lab, fresh_pg
):
    from dynvm.sim.settings import Timing

    lab = sim_lab(timing=Timing(clone_seconds=0.05, boot_seconds=60, ip_seconds=0.05))  # outlasts a's grace
    a, _ = make_services(lab=lab, db=fresh_pg, replica="a")
    b, _ = make_services(lab=lab, db=fresh_pg, replica="b")
    assert a.leadership.is_leader()
    request = b.engine.submit(LeaseRequest("handed", "centos"), 600, origin="legacy")  # its caller waits on b
    wait_for(lambda: b.engine.request_store.get(request.id).state == "creating", timeout=10)
    assert b.engine.request_store.get(request.id).builder == a.engine.owner
    a.stop()  # the leader stops mid-create: it rolls its VMs back, and the request waits again
    assert b.engine.request_store.get(request.id).state == "queued"
    lab.control().set_timing({"boot_seconds": 0.1})
    wait_for(lambda: b.leadership.is_leader(), timeout=30)
    wait_for(lambda: b.engine.request_store.get(request.id).state == "ready", timeout=60)
    assert b.engine.request_store.get(request.id).builder == b.engine.owner


def test_two_replicas_never_hand_out_the_same_ready_vm(make_services, sim_lab, fresh_pg):
    from ..engine.test_ready_pools import fill, with_pools

    lab = with_pools(sim_lab, "centos.ready=4", hosts=2)
    a, _ = make_services(lab=lab, db=fresh_pg, replica="a")
    b, _ = make_services(lab=lab, db=fresh_pg, replica="b")
    fill(a, ready=4)
    ready = {lease.vm_uuid for lease in b.engine.lease_store.pooled()}
    start = threading.Barrier(8)

    def ask(n: int) -> Lease:
        start.wait()
        return (a, b)[n % 2].engine.acquire(LeaseRequest(f"warm{n}", "centos"))[0]

    with ThreadPoolExecutor(8) as pool:
        leases = list(pool.map(ask, range(8)))
    assert len({lease.vm_uuid for lease in leases}) == 8  # no VM twice, across replicas
    warm = [lease for lease in leases if lease.pooled_at is not None]
    assert len(warm) == 4
    assert {lease.vm_uuid for lease in warm} == ready
