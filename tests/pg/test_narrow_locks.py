"""A getservers on PostgreSQL that locks only the hosts it places on
(``HostLocks``), and the lock of its names' root
(``LeaseStore.lock_names``): what each one lets run side by side, and what each one makes
wait. A second connection holds the locks a competing replica would hold, so that each
race happens in the order the test says, not by chance. The engine runs on model hosts
(``dynvm.replay.model``): these are the database's rules, not a hypervisor's."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import Connection, create_engine, text

from dynvm.config import Settings, load_settings
from dynvm.engine.service import LeaseService
from dynvm.hosts import HostSettings
from dynvm.model import Lease, LeaseRequest, NameInUse
from dynvm.provider import HostStatus
from dynvm.replay.model import ModelHosts, VirtualClock
from dynvm.replay.runner import ReplayOptions, _config
from dynvm.store.db import Database
from dynvm.store.history import HistoryStore
from dynvm.store.leases import NAMES_LOCK_SPACE, LeaseStore, names_lock_key

from .test_replicas import lease

T = TypeVar("T")
WAITS = 0.5  # wall seconds in which a reservation that does not wait for a lock is done


class TwoSectionsOfOnePool(ModelHosts):
    """Model hosts whose section 2 names the pool section 1 counts (``same_pool_as``), as a
    replica that has found it out sees them."""

    def status(self, host: HostSettings) -> HostStatus | None:
        status = super().status(host)
        return dataclasses.replace(status, same_pool_as="1") if status is not None and host.ref == "2" else status


@pytest.fixture
def make_engine(fresh_pg: str, tmp_path: Path) -> Iterator[Callable[..., tuple[LeaseService, Database, Settings]]]:
    """dynvm's engine on two empty model hosts and the test's PostgreSQL database, with
    ``extra`` lines in its configuration; the hosts' lock rows made by a first lease,
    released."""
    made: list[tuple[LeaseService, Database]] = []

    def make(extra: str = "", hosts_kind: type[ModelHosts] = ModelHosts) -> tuple[LeaseService, Database, Settings]:
        path = _config(tmp_path / "two.ini", {"centos"}, ReplayOptions(hosts=2, policy="none"))
        path.write_text(path.read_text() + "\n" + extra)
        settings = load_settings(path)
        clock = VirtualClock(1_000_000.0)
        hosts = hosts_kind(clock, 65.0)
        hosts.apply(settings)
        db = Database(fresh_pg)
        db.migrate()
        service = LeaseService(lambda: settings, hosts, LeaseStore(db), HistoryStore(db, None, clock), clock=clock)
        made.append((service, db))
        with competitor(fresh_pg) as conn:  # both hosts' lock rows, as a first reservation makes them
            conn.execute(text("INSERT INTO host_locks (ref) VALUES ('1'), ('2') ON CONFLICT DO NOTHING"))
        return service, db, settings

    yield make
    for service, db in made:
        service.shutdown(grace=5)
        db.close()


@pytest.fixture
def engine(
    make_engine: Callable[..., tuple[LeaseService, Database, Settings]],
) -> tuple[LeaseService, Database, Settings]:
    return make_engine()


@contextmanager
def competitor(url: str) -> Iterator[Connection]:
    """Another replica's open transaction: what it locks stays locked until the block ends
    (it commits)."""
    other = create_engine(url)
    try:
        with other.begin() as conn:
            yield conn
    finally:
        other.dispose()


def waiting_for_a_lock(url: str) -> bool:
    """Whether some backend of this database waits for a lock now."""
    probe = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with probe.connect() as conn:
            query = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE NOT l.granted"
            return bool(conn.execute(text(query + " AND a.datname = current_database()")).scalar())
    finally:
        probe.dispose()


def until_it_waits(url: str, call: Future[T]) -> None:
    deadline = time.monotonic() + 10
    while not waiting_for_a_lock(url):
        assert not call.done(), call.result()  # it ended without waiting: say how
        assert time.monotonic() < deadline, "the reservation never waited for the lock held"
        time.sleep(0.01)


def lock_host(conn: Connection, ref: str) -> None:
    conn.execute(text("SELECT ref FROM host_locks WHERE ref = :ref FOR UPDATE"), {"ref": ref})


def reserved_cpus(db: Database, ref: str) -> int:
    with db.read() as conn:
        return int(
            conn.execute(
                text("SELECT coalesce(sum(cpus), 0) FROM reservations WHERE host_ref = :r"), {"r": ref}
            ).scalar_one()
        )


def test_a_reservation_waits_only_for_the_host_it_places_on(engine, fresh_pg):
    service, _, _ = engine
    with ThreadPoolExecutor(2) as pool:
        with competitor(fresh_pg) as other:
            lock_host(other, "2")  # another replica places on host 2
            alice = pool.submit(lambda: service.acquire(LeaseRequest("alice", "centos")))
            [placed] = alice.result(timeout=WAITS * 10)  # host 1 had as much room: it went there, not waiting
            assert placed.host_ref == "1"
            pinned = pool.submit(lambda: service.acquire(LeaseRequest("bob", "centos", host_ref="2")))
            until_it_waits(fresh_pg, pinned)  # host 2's room is the other replica's to decide first
            assert not pinned.done()
        [held] = pinned.result(timeout=10)  # the other committed: host 2's lock is free
        assert held.host_ref == "2"


def test_a_host_whose_room_went_to_another_meanwhile_is_not_over_committed(engine, fresh_pg):
    """The reservation read no lock, chose host 1 and waited for its lock; meanwhile another
    replica filled host 1. Read again with the lock, host 1 has no room: the reservation
    starts again with every host locked and goes to host 2."""
    service, db, _ = engine
    with ThreadPoolExecutor(1) as pool:
        with competitor(fresh_pg) as other:
            lock_host(other, "1")
            call = pool.submit(lambda: service.acquire(LeaseRequest("carol", "centos")))
            until_it_waits(fresh_pg, call)  # it chose host 1 (the lower ref of two alike)
            LeaseStore(Database(fresh_pg)).insert(other, [lease("filler", host_ref="1", cpus=10_000)])
        [placed] = call.result(timeout=10)
    assert placed.host_ref == "2"
    assert reserved_cpus(db, "1") == 10_000  # the filler alone: carol's VM was not added to it


def test_names_that_could_clash_are_checked_one_after_the_other_and_others_go_on(engine, fresh_pg):
    """bob asks for ``al7`` while another replica, holding the lock of the root ``al``,
    gives alice ``al1``: bob waits for it, then is refused (a name prefix is its first
    holder's). Meanwhile a request under another root goes on."""
    service, _, _ = engine
    with ThreadPoolExecutor(2) as pool:
        with competitor(fresh_pg) as other:
            other.execute(
                text("SELECT pg_advisory_xact_lock(:space, :key)"),
                {"space": NAMES_LOCK_SPACE, "key": names_lock_key("al")},
            )
            bob = pool.submit(lambda: service.acquire(LeaseRequest("al7", "centos", caller="bob")))
            until_it_waits(fresh_pg, bob)  # "al7" has the root "al": its lock, not one of "al7"
            zed = pool.submit(lambda: service.acquire(LeaseRequest("zed", "centos", caller="zed")))
            assert [v.name for v in zed.result(timeout=WAITS * 10)] == ["zed"]
            assert not bob.done()
            alices: Lease = lease("al1", username="al", caller="alice")
            LeaseStore(Database(fresh_pg)).insert(other, [alices])
        with pytest.raises(NameInUse, match="alice"):
            bob.result(timeout=10)


def test_every_name_root_has_its_own_lock_key_the_same_in_every_process_and_version():
    """The key is a hash of the root made here, not Python's salted ``hash``: replicas
    agree on it, and so must the next version during a rolling upgrade (this value is
    pinned: changing how it is made is a change of lock protocol)."""
    assert names_lock_key("al") == 1933445188
    assert names_lock_key("al") != names_lock_key("ala")
    assert -(2**31) <= names_lock_key("x" * 64) < 2**31  # an int4, as the two-key lock takes


def test_a_replica_of_the_version_before_which_takes_no_roots_lock_still_has_its_names_seen(engine, fresh_pg):
    """During a rolling upgrade an older replica locks every host, checks the names and
    inserts, taking no root's lock: a newer one checks names only once it holds a host's
    lock, so it waits for the older one and sees what it gave."""
    service, _, _ = engine
    with ThreadPoolExecutor(1) as pool:
        with competitor(fresh_pg) as older:
            older.execute(text("SELECT ref FROM host_locks ORDER BY ref FOR UPDATE"))  # every host, as it did
            bob = pool.submit(lambda: service.acquire(LeaseRequest("al", "centos", caller="bob")))
            until_it_waits(fresh_pg, bob)
            LeaseStore(Database(fresh_pg)).insert(older, [lease("al1", username="al", caller="alice")])
        with pytest.raises(NameInUse, match="alice"):
            bob.result(timeout=10)


@pytest.mark.parametrize(
    ("why", "extra"),
    [
        ("a per-user quota is counted over every host", "[quota]\nvms.per.user=10\n"),
        ("which ready VM another request took is seen with every host locked", "[pools]\ncentos.ready=1\n"),
    ],
)
def test_a_getservers_whose_decision_is_not_its_hosts_alone_locks_every_host(make_engine, fresh_pg, why, extra):
    service, _, _ = make_engine(extra)
    with ThreadPoolExecutor(1) as pool:
        with competitor(fresh_pg) as other:
            lock_host(other, "2")  # it would place on host 1
            call = pool.submit(lambda: service.acquire(LeaseRequest("dave", "centos")))
            until_it_waits(fresh_pg, call)
            assert not call.done(), why
        [placed] = call.result(timeout=10)
    assert placed.host_ref == "1"


def test_a_host_is_locked_with_every_section_that_names_its_pool(make_engine, fresh_pg):
    """Section 2 names the pool section 1 counts: a replica that has not found that out yet
    places on section 2 and locks it, so one that places on section 1 locks both."""
    service, _, _ = make_engine(hosts_kind=TwoSectionsOfOnePool)
    with ThreadPoolExecutor(1) as pool:
        with competitor(fresh_pg) as other:
            lock_host(other, "2")  # the replica that does not know
            call = pool.submit(lambda: service.acquire(LeaseRequest("erin", "centos", host_ref="1")))
            until_it_waits(fresh_pg, call)
            assert not call.done()
        [placed] = call.result(timeout=10)
    assert placed.host_ref == "1"
