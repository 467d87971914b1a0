"""What a chaos soak and a second installation found (issue 11): dynvm never destroys another
installation's VMs, never hands out a VM that expired, never forgets a disk, answers a
release that hit a xapi failure honestly, and never lets one bad VM stop a reconcile pass."""

from __future__ import annotations

import sqlite3
import threading
import uuid

import pytest

from dynvm.engine.context import LeaseEvents
from dynvm.model import CreateFailed, LeaseRequest
from dynvm.states import Actor, LeaseState
from dynvm.xen.marker import INSTALLATION_KEY, MARKER_KEY, QUARANTINE_KEY, QUARANTINE_TAG

from .conftest import FakeClock
from .sim.simtools import new_vm, wait_for
from .test_fault_suite import check_invariants, take_baseline

HOUR = 3600


def record_of(lab, name: str, index: int = 0) -> dict | None:  # type: ignore[no-untyped-def]
    found = [r for r in lab.xapi(index).VM.get_all_records().values() if r["name_label"] == name]
    return found[0] if found else None


def disks_of(lab, record: dict, index: int = 0) -> list[str]:  # type: ignore[no-untyped-def]
    xapi = lab.xapi(index)
    vdis = [xapi.VBD.get_VDI(vbd) for vbd in record["VBDs"] if xapi.VBD.get_type(vbd) == "Disk"]
    return [vdi for vdi in vdis if vdi != "OpaqueRef:NULL"]


# -- 1. a second installation, and a database restored from an older backup --------------------


def test_a_second_installation_on_the_same_hosts_never_touches_the_first_ones_vms(make_services, sim_lab):
    lab = sim_lab()
    first, _ = make_services(lab=lab, db="first.db")
    [lease] = first.engine.acquire(LeaseRequest("precious", "centos"))
    record = record_of(lab, "precious")
    assert record["other_config"][INSTALLATION_KEY] == first.engine.installation
    for vdi in disks_of(lab, record):  # its disks carry the marker too
        assert lab.xapi().VDI.get_other_config(vdi)[INSTALLATION_KEY] == first.engine.installation

    second, _ = make_services(lab=lab, db="second.db")  # start-up: recover + reconcile
    assert second.engine.installation != first.engine.installation
    report = second.engine.reconcile()
    assert report.orphans_destroyed == []
    assert report.quarantined == []
    assert record_of(lab, "precious")["power_state"] == "Running"
    assert first.engine.lease_store.get(lease.id).state == "ready"


def copy_sqlite(source, target) -> None:  # type: ignore[no-untyped-def]
    """A consistent copy of a live SQLite database (what a backup tool makes)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def test_a_database_restored_from_an_older_backup_quarantines_newer_vms_before_destroying_them(
    make_services, sim_lab, tmp_path
):
    clock = FakeClock()
    lab = sim_lab()
    live, _ = make_services(lab=lab, clock=clock, db="live.db")
    live.engine.acquire(LeaseRequest("early", "centos"))
    copy_sqlite(tmp_path / "live.db", tmp_path / "backup.db")
    live.engine.acquire(LeaseRequest("late", "centos"))  # made after the backup
    late_disks = disks_of(lab, record_of(lab, "late"))
    live.stop()

    restored, _ = make_services(lab=lab, clock=clock, db="backup.db")  # start-up reconcile runs here
    late = record_of(lab, "late")
    assert late is not None, "a VM the restored database does not know must not be destroyed at once"
    assert late["power_state"] == "Halted"
    assert late["other_config"][QUARANTINE_KEY] == f"{clock():.0f}"
    assert QUARANTINE_TAG in late["tags"]
    assert record_of(lab, "early")["power_state"] == "Running"  # the backup knows this one
    wait_for(lambda: [q.name for q in restored.engine.quarantined()] == ["late"], timeout=5)
    [held] = restored.engine.quarantined()
    assert held.destroy_at == held.quarantined_at + 24 * HOUR

    clock.advance(23 * HOUR)
    assert restored.engine.reconcile().orphans_destroyed == []
    assert record_of(lab, "late") is not None
    clock.advance(2 * HOUR)
    assert restored.engine.reconcile().orphans_destroyed == ["late"]
    assert record_of(lab, "late") is None
    assert set(late_disks).isdisjoint(lab.xapi().VDI.get_all())


def test_vms_marked_before_installation_ids_are_claimed_when_known_and_left_alone_when_not(make_services):
    services, lab = make_services()
    [lease] = services.engine.acquire(LeaseRequest("old", "centos"))
    xapi = lab.xapi()
    xapi.VM.remove_from_other_config(lease.vm_ref, INSTALLATION_KEY)  # as an older dynvm marked it
    stranger = new_vm(xapi, "stranger")
    xapi.VM.add_to_other_config(stranger, MARKER_KEY, "a-lease-of-another-old-dynvm")
    wait_for(lambda: any(vm.name == "stranger" for vm in services.inventory.view("1").vms), timeout=5)
    report = services.engine.reconcile()
    assert report.orphans_destroyed == []
    assert report.quarantined == []
    assert xapi.VM.get_other_config(lease.vm_ref)[INSTALLATION_KEY] == services.engine.installation
    assert MARKER_KEY in xapi.VM.get_other_config(stranger)  # untouched
    assert INSTALLATION_KEY not in xapi.VM.get_other_config(stranger)


def test_healthz_detail_names_the_installation(make_services):
    from fastapi.testclient import TestClient

    from dynvm.api.app import create_app

    services, _ = make_services()
    with TestClient(create_app(services, manage_services=False)) as http:
        assert http.get("/healthz").text == "ok"
        detail = http.get("/healthz", params={"detail": "true"}).json()
    assert detail["installation"] == services.engine.installation
    assert detail["status"] == "ok"
    assert detail["leader"] is True


# -- 2. the lifetime starts at the hand-over; nothing expired is ever handed out ---------------


def test_a_lease_never_expires_while_its_request_is_still_being_made(make_services):
    """count=2, one VM slowed by an APIPA retry, expires_in_minutes=0.15: before, the reaper
    destroyed the first VM while the second was still booting, and the request answered
    the destroyed VM's IP."""
    clock = FakeClock()
    services, lab = make_services(clock=clock, network_timeout=1)
    lab.control().apipa_next(1)  # one of the two boots waits out the time-out and is retried
    outcome: dict[str, object] = {}
    worker = threading.Thread(
        target=lambda: outcome.update(
            leases=services.engine.acquire(LeaseRequest("brief", "centos", count=2, expires_in_minutes=0.15))
        )
    )
    worker.start()

    def half_ready() -> bool:
        states = sorted(lease.state for lease in services.engine.lease_store.active())
        return states == ["creating", "ready"]

    wait_for(half_ready, timeout=10)
    clock.advance(60)  # well past 0.15 minutes since the request arrived
    assert services.engine.expire_due() == []
    worker.join(timeout=30)
    leases = outcome["leases"]
    assert [lease.state for lease in leases] == ["ready", "ready"]
    for lease in leases:
        assert lease.handed_over_at == clock()
        assert lease.expires_at == pytest.approx(clock() + 9)
        assert record_of(lab, lease.name)["power_state"] == "Running"
    clock.advance(8)
    assert services.engine.expire_due() == []
    clock.advance(2)
    assert services.engine.expire_due() == ["brief1", "brief2"]


def test_a_vm_cannot_be_released_while_its_request_is_still_being_made(make_services):
    services, lab = make_services(network_timeout=1)
    lab.control().apipa_next(1)
    worker = threading.Thread(target=services.engine.acquire, args=(LeaseRequest("busy", "centos", count=2),))
    worker.start()
    wait_for(lambda: any(lease.state == "ready" for lease in services.engine.lease_store.active()), timeout=10)
    ready = next(lease.name for lease in services.engine.lease_store.active() if lease.state == "ready")
    from dynvm.model import NameInUse

    with pytest.raises(NameInUse, match="still being created"):
        services.engine.release_names([ready])
    worker.join(timeout=30)
    assert sorted(lease.state for lease in services.engine.lease_store.active()) == ["ready", "ready"]


def test_the_seeds_own_example_expiresin_lives_its_three_seconds_after_the_answer(make_services):
    clock = FakeClock()
    services, _ = make_services(clock=clock)
    leases = services.engine.acquire(LeaseRequest("quick", "centos", count=2, expires_in_minutes=0.05))
    assert all(lease.expires_at == pytest.approx(clock() + 3) for lease in leases)


# -- 3 and 4. a failed disk delete is retried; a release answers what happened ----------------


class Ended(LeaseEvents):
    def __init__(self) -> None:
        self.names: list[str] = []

    def ended(self, lease, state: str) -> None:  # type: ignore[no-untyped-def]
        self.names.append(lease.name)


def test_a_disk_that_will_not_delete_is_reported_and_reconcile_deletes_it(make_services):
    services, lab = make_services()
    baseline = lab.inventory_of()
    [lease] = services.engine.acquire(LeaseRequest("disky", "centos"))
    [disk] = disks_of(lab, record_of(lab, "disky"))
    lab.control().fail_next("vdi_destroy", "SR_BACKEND_FAILURE_1200", 1)
    outcome = services.engine.release_names(["disky"])
    assert outcome.released == []
    assert outcome.failed == {}
    assert "could not be deleted yet" in outcome.finishing["disky"]
    assert services.engine.lease_store.get(lease.id).state == "released"  # the user's part is done
    assert disk in lab.xapi().VDI.get_all()  # ... but the disk is still there
    wait_for(lambda: any(d.ref == disk and not d.attached for d in services.inventory.view("1").disks), timeout=5)
    uuid = lab.xapi().VDI.get_uuid(disk)
    assert services.engine.reconcile().disks_destroyed == [uuid]
    assert disk not in lab.xapi().VDI.get_all()
    assert lab.inventory_of() == baseline


def test_a_release_whose_destroy_fails_keeps_the_lease_and_a_retry_or_reconcile_finishes_it(make_services):
    services, lab = make_services()
    baseline = lab.inventory_of()
    [first, second] = services.engine.acquire(LeaseRequest("stuck", "centos", count=2))
    lab.control().fail_next("destroy", "INTERNAL_ERROR", 2)
    outcome = services.engine.release("stuck", 2)
    assert sorted(outcome.failed) == ["stuck1", "stuck2"]
    assert "tries again within a minute" in outcome.failed["stuck1"]
    assert {services.engine.lease_store.get(x.id).state for x in (first, second)} == {"releasing"}
    # a retry by the user tries again at once ...
    assert services.engine.release_names(["stuck1"]).released == ["stuck1"]
    # ... and reconcile finishes what is left
    services.engine.recover()
    assert services.engine.lease_store.get(second.id).state == "released"
    assert services.engine.lease_store.active() == []
    assert lab.inventory_of() == baseline


def test_reconcile_never_redoes_a_release_this_process_is_still_doing(make_services):
    services, lab = make_services()
    ended = Ended()
    services.engine.events = ended
    services.engine.acquire(LeaseRequest("slowgo", "centos"))
    lab.control().set_timing({"shutdown_seconds": 1.0})
    worker = threading.Thread(target=services.engine.release_names, args=(["slowgo"],))
    worker.start()
    wait_for(lambda: services.engine.lease_store.active()[0].state == "releasing", timeout=5)
    services.engine.recover()  # what the reconcile loop runs, while the release is under way
    worker.join(timeout=30)
    assert ended.names == ["slowgo"], "the release must end once, by the process doing it"


def test_one_failing_vm_never_stops_a_reconcile_pass(make_services):
    clock = FakeClock()
    services, lab = make_services(clock=clock)
    leases = services.engine.acquire(LeaseRequest("left", "centos", count=2))
    # leftovers: VMs of creates that failed once they were made (ended, never handed out)
    services.engine.lease_store.finish([lease.id for lease in leases], LeaseState.FAILED, clock(), by=Actor.BUILDER)
    for lease in leases:
        lab.xapi().VM.remove_from_other_config(lease.vm_ref, "dynvm_holder")
    # the mirror sees the holder gone before the pass (a VM still shown held by the request
    # whose lease failed is a database older than the host: quarantined, not destroyed)
    refs = {lease.vm_ref for lease in leases}
    wait_for(
        lambda: all("dynvm_holder" not in vm.other_config for vm in services.inventory.view("1").vms if vm.ref in refs),
        timeout=5,
    )
    lab.control().fail_next("destroy", "INTERNAL_ERROR", 1)  # the first destroy of the pass fails
    report = services.engine.reconcile()
    assert len(report.orphans_destroyed) == 1
    assert len(report.errors) == 1
    assert "INTERNAL_ERROR" in report.errors[0]
    assert services.engine.reconcile().orphans_destroyed != []  # the next pass gets the other one
    assert all(record_of(lab, lease.name) is None for lease in leases)


# -- 6. APIPA retries move to another host ----------------------------------------------------


def test_a_host_whose_guests_get_no_address_hands_the_last_attempt_to_another_host(make_services):
    services, lab = make_services(hosts=2, network_timeout=0.3)
    baseline = take_baseline(services, lab)
    lab.control(1).dhcp_exhausted(True)  # host 2's guests never get an address
    leases = services.engine.acquire(LeaseRequest("moving", "centos", count=2))
    assert [lease.host_ref for lease in leases] == ["1", "1"]
    lab.control(1).dhcp_exhausted(False)
    check_invariants(services, lab, baseline)


def test_a_pinned_request_keeps_its_attempts_on_its_host(make_services):
    services, lab = make_services(hosts=2, network_timeout=0.3)
    lab.control(1).dhcp_exhausted(True)
    with pytest.raises(CreateFailed, match="after 3 attempts"):
        services.engine.acquire(LeaseRequest("pinned", "centos", host_ref="2"))


# -- races a review found: replicas, a lease taken for dead, the answer's order ---------------


def test_a_failed_release_is_retried_by_whichever_process_leads(make_services, sim_lab):
    lab = sim_lab()
    follower, _ = make_services(lab=lab, db="shared.db", replica="follower")
    leader, _ = make_services(lab=lab, db="shared.db", replica="leader")
    [lease] = follower.engine.acquire(LeaseRequest("handoff", "centos"))
    lab.control().fail_next("destroy", "INTERNAL_ERROR", 1)
    assert "handoff" in follower.engine.release_names(["handoff"]).failed
    assert follower.engine.lease_store.get(lease.id).state == "releasing"
    leader.engine.recover()  # the leader's reconcile loop, while the follower lives on
    assert leader.engine.lease_store.get(lease.id).state == "released"
    assert record_of(lab, "handoff") is None


def test_a_vm_whose_lease_was_failed_meanwhile_is_never_handed_out(make_services):
    """A replica taken for dead (its heartbeat went stale) has its creates failed by the
    leader; when its own create then finishes, it must not bring the lease back."""
    from dynvm.sim.settings import Timing

    services, lab = make_services(timing=Timing(clone_seconds=0.01, boot_seconds=1.0, ip_seconds=0.05))
    baseline = lab.inventory_of()
    outcome: dict[str, object] = {}

    def ask() -> None:
        try:
            services.engine.acquire(LeaseRequest("zombie", "centos"))
        except CreateFailed as e:
            outcome["error"] = e

    worker = threading.Thread(target=ask)
    worker.start()
    wait_for(lambda: (record_of(lab, "zombie") or {}).get("power_state") == "Running", timeout=10)
    [lease] = services.engine.lease_store.active()
    services.engine.lease_store.finish(
        [lease.id], LeaseState.FAILED, 0.0, "its replica was taken for dead", by=Actor.RECOVERY
    )
    worker.join(timeout=30)
    assert "the lease ended while its VM was being made" in str(outcome["error"])
    assert services.engine.lease_store.get(lease.id).state == "failed"
    assert lab.inventory_of() == baseline


def test_a_request_a_dead_process_never_answered_is_rolled_back(make_services, sim_lab, tmp_path):
    from dynvm.store.db import Database
    from dynvm.store.leases import LeaseStore

    from .test_leases import a_creating_lease

    lab = sim_lab()
    store = LeaseStore(Database(f"sqlite:///{tmp_path / 'dynvm.db'}"))
    store.db.migrate()
    lease = a_creating_lease("lease-unanswered", "unanswered", "dynvm-that-died", 1.0)
    with store.db.write() as conn:
        store.insert(conn, [lease])
    xapi = lab.xapi()
    vm = new_vm(xapi, "unanswered", start=True)
    xapi.VM.add_to_other_config(vm, MARKER_KEY, lease.id)
    store.remember_vm(lease.id, vm)
    store.set_state(
        [lease.id], LeaseState.READY, [LeaseState.CREATING], by=Actor.BUILDER
    )  # ready, but its request never answered
    services, _ = make_services(lab=lab)  # start-up: recover
    assert services.engine.lease_store.get(lease.id).state == "failed"
    assert record_of(lab, "unanswered") is None


def test_the_answer_keeps_the_order_of_the_names_past_nine(make_services):
    services, _ = make_services(hosts=2)
    leases = services.engine.acquire(LeaseRequest("many", "centos", count=11))
    assert [lease.name for lease in leases] == [f"many{n}" for n in range(1, 12)]


def test_a_clone_left_unprovisioned_by_a_crash_is_still_found_and_removed(make_services):
    """kill -9 between VM.clone and VM.provision leaves a marked VM that is still a
    template (a clone of a template is one until provisioned): the soak found reconcile
    never looked at templates, and such clones stayed on the hosts for ever."""
    clock = FakeClock()
    services, lab = make_services(clock=clock)
    xapi = lab.xapi()
    baseline = lab.inventory_of()
    from dynvm.xen.marker import clone_name

    [lease] = services.engine.acquire(LeaseRequest("crashed", "centos"))
    services.engine.release_names(["crashed"])
    name = clone_name(lease.id, services.engine.installation)
    clone = xapi.VM.clone(xapi.VM.get_by_name_label("tmpl-cnt7.7")[0], name)
    xapi.VM.add_to_other_config(clone, MARKER_KEY, lease.id)  # marked for a lease that has ended
    xapi.VM.add_to_other_config(clone, INSTALLATION_KEY, services.engine.installation)
    assert xapi.VM.get_is_a_template(clone) is True
    wait_for(lambda: any(vm.ref == clone for vm in services.inventory.view("1").vms), timeout=5)
    assert all(t.ref != clone for t in services.inventory.view("1").templates)  # never offered as a template
    assert services.engine.reconcile().orphans_destroyed == [name]
    assert lab.inventory_of() == baseline


def test_an_admins_template_made_from_a_dynvm_vm_is_never_taken_for_a_clone(make_services):
    """A template an admin made out of a leased VM carries that VM's marker: it stays a
    template, is never reconciled away, and a clone of it gets its own marker."""
    services, lab = make_services()
    xapi = lab.xapi()
    [lease] = services.engine.acquire(LeaseRequest("golden", "centos"))
    admin = xapi.VM.clone(xapi.VM.get_by_name_label("tmpl-cnt7.7")[0], "tmpl-golden")
    for key, value in xapi.VM.get_other_config(lease.vm_ref).items():
        if key.startswith("dynvm_"):
            xapi.VM.add_to_other_config(admin, key, value)
    services.engine.release_names(["golden"])  # its lease ends: the template must stay all the same
    wait_for(lambda: any(t.ref == admin for t in services.inventory.view("1").templates), timeout=5)
    assert services.engine.reconcile().orphans_destroyed == []
    assert admin in xapi.VM.get_all()


def test_a_clone_dynvm_died_before_marking_is_known_by_its_name(make_services):
    """kill -9 after VM.clone, before the marker: the clone is made under the name
    dynvm-clone-<lease id>-of-<installation id>. This installation's is removed; another
    installation's, and one named the old way (no installation) for a lease this database
    never had, are left alone."""
    from dynvm.xen.marker import CLONE_NAME_PREFIX, clone_name

    clock = FakeClock()
    services, lab = make_services(clock=clock)
    xapi = lab.xapi()
    baseline = lab.inventory_of()
    [lease] = services.engine.acquire(LeaseRequest("unmarked", "centos"))
    services.engine.release_names(["unmarked"])
    template = xapi.VM.get_by_name_label("tmpl-cnt7.7")[0]
    ours = xapi.VM.clone(template, clone_name(lease.id, services.engine.installation))  # no marker at all
    others = xapi.VM.clone(template, clone_name(str(uuid.uuid4()), str(uuid.uuid4())))
    old_stranger = xapi.VM.clone(template, f"{CLONE_NAME_PREFIX}a-lease-this-database-never-had")
    wait_for(lambda: len([v for v in services.inventory.view("1").vms if v.name.startswith("dynvm-clone-")]) == 3, 5)
    assert services.engine.reconcile().orphans_destroyed == [clone_name(lease.id, services.engine.installation)]
    assert ours not in xapi.VM.get_all()
    for stranger in (others, old_stranger):  # not ours: untouched
        assert MARKER_KEY not in xapi.VM.get_other_config(stranger)
        xapi.VM.destroy(stranger)
    assert lab.inventory_of() == baseline


def test_a_clone_whose_lease_a_restored_database_forgot_is_quarantined_not_left_for_ever(make_services):
    """The soak found it: a host stopped answering while a clone was made, so dynvm never
    marked it, and a backup older than the clone was restored before the host came back.
    The database no longer knew the lease, and the unmarked clone stayed on the host for
    ever. Its name says which installation made it: it is quarantined like any VM of this
    installation whose lease the database does not know."""
    from dynvm.xen.marker import QUARANTINE_TAG, clone_name

    clock = FakeClock()
    services, lab = make_services(clock=clock)
    xapi = lab.xapi()
    forgotten = str(uuid.uuid4())  # a lease made after the backup the database came from
    name = clone_name(forgotten, services.engine.installation)
    clone = xapi.VM.clone(xapi.VM.get_by_name_label("tmpl-cnt7.7")[0], name)
    wait_for(lambda: any(v.name == name for v in services.inventory.view("1").vms), 5)
    report = services.engine.reconcile()
    assert report.quarantined == [name]
    assert QUARANTINE_TAG in xapi.VM.get_tags(clone)
    assert xapi.VM.get_other_config(clone)[MARKER_KEY] == forgotten  # claimed: this installation's from now on
    wait_for(lambda: [q.name for q in services.engine.quarantined()] == [name], timeout=5)
    clock.advance(25 * HOUR)  # past [common] orphan.quarantine.hours (24)
    assert services.engine.reconcile().orphans_destroyed == [name]
    assert clone not in xapi.VM.get_all()


def test_a_clone_is_named_for_its_lease_until_it_is_marked(make_services):
    services, lab = make_services()
    [lease] = services.engine.acquire(LeaseRequest("renamed", "centos"))
    record = record_of(lab, "renamed")
    assert record["other_config"][MARKER_KEY] == lease.id
    assert record_of(lab, f"dynvm-clone-{lease.id}") is None
