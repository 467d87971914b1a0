"""A database restored from a backup, on SQLite and PostgreSQL: the hosts, not the
database, say who holds a VM. A restored dynvm never hands one user's VM to another and
never destroys a VM a user holds; what it cannot account for is quarantined, not removed.

Backups are taken as operators take them: SQLite's online backup API while dynvm runs,
``pg_dump`` for PostgreSQL; a restore is done with dynvm stopped."""

from __future__ import annotations

import threading

from dynvm.model import LeaseRequest
from dynvm.xen.marker import HOLDER_KEY, QUARANTINE_TAG

from ..conftest import FakeClock
from ..engine.test_ready_pools import fill, with_pools
from ..sim.simtools import wait_for
from .conftest import Backup


def vms(lab) -> dict[str, dict]:
    return {r["name_label"]: r for r in lab.xapi().VM.get_all_records().values() if not r["is_control_domain"]}


def test_an_idle_pool_vm_in_the_backup_is_never_handed_to_a_second_user(make_services, sim_lab, db_url, tmp_path):
    lab = with_pools(sim_lab, "centos.ready=1")
    services, _ = make_services(lab=lab, db=db_url)
    fill(services, ready=1)
    backup = Backup(db_url, tmp_path)
    backup.take()  # the pool VM idle in it
    [alice] = services.engine.acquire(LeaseRequest("alice", "centos"))
    assert alice.pooled_at is not None  # she got it warm
    assert vms(lab)["alice"]["other_config"][HOLDER_KEY] == alice.request_id
    services.stop()
    backup.restore()

    restored, _ = make_services(lab=lab, db=db_url)  # start-up reconcile runs first
    assert restored.engine.lease_store.pooled() == []  # the database's pool VM is the host's alice's
    [bob] = restored.engine.acquire(LeaseRequest("bob", "centos"))
    assert bob.vm_uuid != alice.vm_uuid  # made cold for him (alice's halted VM gave its address back)
    on_host = vms(lab)
    assert on_host["alice"]["other_config"][HOLDER_KEY] == alice.request_id  # never renamed, never bob's
    assert QUARANTINE_TAG in on_host["alice"]["tags"]  # kept, halted, shown
    assert on_host["bob"]["other_config"][HOLDER_KEY] == bob.request_id
    [shown] = restored.engine.quarantined()
    assert (shown.name, shown.held_by) == ("alice", alice.request_id)


def test_a_vm_whose_create_the_backup_caught_midway_is_quarantined_not_destroyed(
    make_services, sim_lab, db_url, tmp_path
):
    lab = sim_lab()
    services, _ = make_services(lab=lab, db=db_url)
    backup = Backup(db_url, tmp_path)
    lab.control().set_timing({"clone_seconds": 1.0})
    answered: list = []
    asking = threading.Thread(target=lambda: answered.extend(services.engine.acquire(LeaseRequest("mid", "centos"))))
    asking.start()
    wait_for(lambda: services.engine.lease_store.by_name(["mid"]), timeout=5)
    backup.take()  # "mid" is being made in it
    asking.join(timeout=30)
    [mid] = answered  # its user has it
    lab.control().set_timing({"clone_seconds": 0})
    services.stop()
    backup.restore()

    restored, _ = make_services(lab=lab, db=db_url)
    record = vms(lab)["mid"]  # still there: never destroyed at once
    assert record["other_config"][HOLDER_KEY] == mid.request_id
    assert QUARANTINE_TAG in record["tags"]
    assert restored.engine.reconcile().orphans_destroyed == []


def test_a_held_vm_stays_its_users_and_one_the_backup_never_saw_is_quarantined(
    make_services, sim_lab, db_url, tmp_path
):
    clock = FakeClock()
    lab = sim_lab()
    services, _ = make_services(lab=lab, db=db_url, clock=clock)
    services.engine.acquire(LeaseRequest("alice", "centos"))
    backup = Backup(db_url, tmp_path)
    backup.take()  # alice holds her VM in it
    [bob] = services.engine.acquire(LeaseRequest("bob", "centos"))  # after the backup
    services.stop()
    backup.restore()

    restored, _ = make_services(lab=lab, db=db_url, clock=clock)
    on_host = vms(lab)
    assert QUARANTINE_TAG not in on_host["alice"]["tags"]
    assert on_host["alice"]["power_state"] == "Running"
    assert QUARANTINE_TAG in on_host["bob"]["tags"]  # unknown to this database: kept, halted
    assert on_host["bob"]["other_config"][HOLDER_KEY] == bob.request_id
    assert restored.engine.release("alice").released == ["alice"]
    assert "alice" not in vms(lab)
    clock.advance(restored.settings.common.quarantine_hours * 3600 + 60)
    assert restored.engine.reconcile().orphans_destroyed == ["bob"]  # once its quarantine is over
