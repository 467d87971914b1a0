"""History documents (SPEC.md §3) and their export to an optional sink."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from dynvm.model import Lease
from dynvm.store.db import Database
from dynvm.store.history import HistoryStore, created_document, deleted_document
from dynvm.xen.settings import origin_of

from ..conftest import FakeClock

SPEC_FIELDS = {
    "ipaddr",
    "origin",
    "os",
    "state",
    "poolId",
    "prevUser",
    "username",
    "ver",
    "memory",
    "os_version",
    "name",
    "created_time",
    "create_duration_secs",
    "cpu",
    "disk",
    "deleted_time",
    "live_duration_secs",
    "delete_duration_secs",
}


def lease(**changes: object) -> Lease:
    values: dict[str, object] = {
        "id": "l1",
        "request_id": "r1",
        "name": "job421",
        "username": "job42",
        "os": "centos",
        "host_ref": "1",
        "state": "ready",
        "cpus": 4,
        "memory": 4294967296,
        "disk": 37580963840,
        "created_at": 1_800_000_000.0,
        "expires_at": 1_800_043_200.0,
        "owner": "me",
        "template": "tmpl-cnt7.7",
        "vm_uuid": "c5db1298-3e97-53bb-4f97-bd039ca8c217",
        "ip": "127.77.0.9",
        "os_version": "CentOS Linux release 7.7.1908 (Core)",
        "ready_at": 1_800_000_042.6,
        "create_seconds": 42.6,
    }
    values.update(changes)
    return Lease(**values)  # type: ignore[arg-type]


def test_a_created_document_has_every_field_of_the_spec():
    document = created_document(lease(), "172.23.0.10")
    assert set(document) == SPEC_FIELDS | {"create_duration_ms"}
    assert document == {
        "ipaddr": "127.77.0.9",
        "origin": "172.23.0.10",
        "os": "centos",
        "state": "available",
        "poolId": "dynamicpool",
        "prevUser": "",
        "username": "job42",
        "ver": 1,
        "memory": 4294967296,
        "os_version": "CentOS Linux release 7.7.1908 (Core)",
        "name": "job421",
        "created_time": 1_800_000_042,
        "create_duration_secs": 43,
        "create_duration_ms": 42600,
        "cpu": 4,
        "disk": 37580963840,
        "deleted_time": None,
        "live_duration_secs": None,
        "delete_duration_secs": None,
    }


def test_a_deleted_document_says_how_long_it_lived_and_who_used_it():
    document = deleted_document(created_document(lease(), "h"), 1_800_003_642.0, 7.4)
    assert set(document) == SPEC_FIELDS | {"create_duration_ms"}
    assert document["state"] == "deleted"
    assert document["prevUser"] == "job42"
    assert document["deleted_time"] == 1_800_003_642
    assert document["live_duration_secs"] == 3600
    assert document["delete_duration_secs"] == 7


def test_origin_is_the_hosts_address():
    assert origin_of("https://172.23.0.10") == "172.23.0.10"
    assert origin_of("http://127.0.0.1:9001") == "127.0.0.1:9001"


class RecordingSink:
    def __init__(self, failing: bool = False) -> None:
        self.documents: dict[str, dict] = {}
        self.failing = failing

    def upsert(self, key: str, document: dict) -> None:
        if self.failing:
            raise ConnectionError("couchbase is down")
        self.documents[key] = document


def test_documents_reach_the_sink_and_an_outage_is_retried(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'h.db'}")
    db.migrate()
    sink = RecordingSink(failing=True)
    store = HistoryStore(db, sink, FakeClock())
    created = store.record_created(lease(), "172.23.0.10")
    assert store.export_pending() == 0  # the sink is down: nothing lost, nothing raised
    sink.failing = False
    assert store.export_pending() == 1
    assert sink.documents == {lease().vm_uuid: created}
    assert store.export_pending() == 0  # nothing left to send
    deleted = store.record_deleted(lease(), 3.0)
    assert store.export_pending() == 1
    assert sink.documents[lease().vm_uuid] == deleted
    assert store.get(lease().vm_uuid) == deleted


def check_stats_and_query(db: Database) -> None:
    """Twenty CentOS VMs taking 1..20 s to create, each living 600 s; one Windows VM still
    alive. Shared by the SQLite test here and the PostgreSQL one in tests/pg."""
    clock = FakeClock()
    store = HistoryStore(db, None, clock)
    for n in range(1, 21):
        made = lease(
            id=f"l{n}",
            vm_uuid=str(uuid.UUID(int=n)),
            username="ann" if n <= 5 else "bob",
            create_seconds=float(n),
            ready_at=clock.now,
        )
        store.record_created(made, "172.23.0.10")
        clock.advance(600)
        store.record_deleted(made, 2.0)
    windows = lease(id="w", vm_uuid=str(uuid.UUID(int=99)), os="windows", username="ann", create_seconds=300.0)
    store.record_created(windows, "172.23.0.10")
    stats = store.stats()
    assert stats["per_os"]["centos"] == {
        "vms_created": 20,
        "mean_create_secs": 10.5,
        "p95_create_secs": 19.0,  # nearest rank: the 19th of 20
        "mean_lifetime_secs": 600.0,
    }
    assert stats["per_os"]["windows"] == {
        "vms_created": 1,
        "mean_create_secs": 300.0,
        "p95_create_secs": 300.0,
        "mean_lifetime_secs": None,  # still alive
    }
    alive = clock.now - int(windows.ready_at)  # the Windows VM still held: it counts up to now
    assert stats["per_user"] == {
        "ann": {"vms_created": 6, "vm_hours": round((5 * 600 + alive) / 3600, 2)},
        "bob": {"vms_created": 15, "vm_hours": round(15 * 600 / 3600, 2)},
    }
    page, total = store.query(user="bob", state="deleted", limit=4, offset=2)
    assert total == 15
    assert [d["create_duration_secs"] for d in page] == [18, 17, 16, 15]  # newest first


def test_stats_and_queries_are_answered_by_the_database(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'h.db'}")
    db.migrate()
    check_stats_and_query(db)
    db.close()


@pytest.mark.skipif(not os.environ.get("DYNVM_TEST_COUCHBASE_URL"), reason="set DYNVM_TEST_COUCHBASE_URL to run")
def test_documents_land_in_a_real_couchbase_bucket(tmp_path: Path):
    """DYNVM_TEST_COUCHBASE_URL=couchbase://user:password@host/bucket"""
    import urllib.parse

    from dynvm.config import CouchbaseSettings, Secret
    from dynvm.store.history import CouchbaseSink

    url = urllib.parse.urlsplit(os.environ["DYNVM_TEST_COUCHBASE_URL"])
    settings = CouchbaseSettings(
        server=f"{url.scheme}://{url.hostname}",
        bucket=url.path.strip("/"),
        username=url.username or "",
        password=Secret(url.password or ""),
    )
    sink = CouchbaseSink(settings)
    db = Database(f"sqlite:///{tmp_path / 'h.db'}")
    db.migrate()
    key = str(uuid.uuid4())
    store = HistoryStore(db, sink)
    store.record_created(lease(vm_uuid=key), "it")
    assert store.export_pending() == 1
    assert sink._collection.get(key).content_as[dict]["name"] == "job421"


def test_imported_demand_reads_back_as_the_same_requests_and_is_never_exported(tmp_path: Path):
    from dynvm.trace import Demand, requests_in_history

    db = Database(f"sqlite:///{tmp_path / 'h.db'}")
    db.migrate()
    sent: list[str] = []

    class Sink:
        def upsert(self, key: str, document: dict) -> None:  # type: ignore[type-arg]
            sent.append(key)

    store = HistoryStore(db, Sink(), FakeClock(10_000.0))
    past = [Demand(-7200.0, "nightly", "centos", 3, 600.0), Demand(-3600.0, "job1", "windows", 1, 1200.0)]
    assert store.import_demands(past, create_seconds=65) == 4  # one document per VM
    documents = store.all()
    assert {d["state"] for d in documents} == {"deleted"}
    assert requests_in_history(documents, 10_000.0) == past
    assert store.export_pending() == 0  # not this lab's VMs: nothing for the sink
    assert sent == []
    db.close()


def test_create_times_keep_their_fraction_of_a_second(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'h.db'}")
    db.migrate()
    store = HistoryStore(db, None, FakeClock())
    store.record_created(lease(create_seconds=4.2), "h")
    [(_, _, _, _, create)] = store.lifetimes(0)
    assert create == pytest.approx(4.2)  # what the dashboard's create-time figures read
    assert store.stats()["per_os"]["centos"]["mean_create_secs"] == 4.2
    assert store.get(lease().vm_uuid)["create_duration_secs"] == 4  # the SPEC's field, whole seconds as before
    db.close()


def test_vm_hours_have_one_definition_for_the_stats_and_the_dashboard(tmp_path: Path):
    """Held from the hand-out (not the time in a ready pool) to the deletion, or to now."""
    db = Database(f"sqlite:///{tmp_path / 'h.db'}")
    db.migrate()
    clock = FakeClock()
    store = HistoryStore(db, None, clock)
    made = clock.now
    alive = lease(id="a", vm_uuid=str(uuid.UUID(int=1)), username="alice", ready_at=made)
    store.record_created(alive, "h")  # held 2 h, still alive
    warm = lease(id="w", vm_uuid=str(uuid.UUID(int=2)), username="bob", ready_at=made, pooled_at=made)
    store.record_created(warm, "h", handed_out_at=made + 3600)  # an hour in a pool, then held 1 h
    clock.advance(2 * 3600)
    store.record_deleted(warm, 1.0)
    expected = [{"user": "alice", "vm_hours": 2.0, "vms": 1}, {"user": "bob", "vm_hours": 1.0, "vms": 1}]
    assert store.vm_hours(None, clock.now) == expected
    assert {u: v["vm_hours"] for u, v in store.stats()["per_user"].items()} == {"alice": 2.0, "bob": 1.0}
    assert sorted(store.lifetimes(0)) == [  # the usage plot's rows: the same held time
        ("alice", "centos", made, None, 42.6),
        ("bob", "centos", made + 3600, 3600.0, 42.6),
    ]
    assert store.vm_hours(clock.now - 1800, clock.now) == [  # the last half hour only
        {"user": "alice", "vm_hours": 0.5, "vms": 1},
        {"user": "bob", "vm_hours": 0.5, "vms": 1},
    ]
    db.close()
