"""The lease engine against simulated hosts and a real SQLite file, with an injected clock."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dynvm.model import (
    BadRequest,
    CreateFailed,
    LeaseRequest,
    NameInUse,
    NoSuchLease,
    NotEnoughCapacity,
    UnknownOs,
    vm_names,
)
from dynvm.sim.settings import Timing
from dynvm.states import Actor, LeaseState
from dynvm.xen.inventory import HostState
from dynvm.xen.provision import MARKER_KEY

from .conftest import FakeClock
from .sim.simtools import new_vm, wait_for

GiB = 1024**3


def test_names_follow_the_seed():
    assert vm_names("job42", 1) == ["job42"]
    assert vm_names("job42", 3) == ["job421", "job422", "job423"]


def dynvm_vms(lab, index: int = 0) -> dict[str, dict]:
    """The VMs on a host that carry dynvm's marker, by name."""
    xapi = lab.xapi(index)
    return {r["name_label"]: r for r in xapi.VM.get_all_records().values() if MARKER_KEY in r["other_config"]}


def test_acquire_gives_ready_vms_with_ips_and_release_removes_them(make_services):
    services, lab = make_services(hosts=2)
    service = services.engine
    before = service.available_count("centos")
    assert before == 2 * 8  # 32 CPUs / 4 vCPUs per CentOS VM, per host
    leases = service.acquire(LeaseRequest("demo", "centos", count=3))
    assert [lease.name for lease in leases] == ["demo1", "demo2", "demo3"]
    assert all(lease.state == "ready" and lease.ip.startswith("127.77.") for lease in leases)
    assert {lease.host_ref for lease in leases} == {"1", "2"}  # spread over hosts
    wait_for(lambda: service.available_count("centos") == before - 3, timeout=5)
    assert service.release("demo", 3).released == ["demo1", "demo2", "demo3"]
    assert dynvm_vms(lab, 0) == {}
    assert dynvm_vms(lab, 1) == {}
    wait_for(lambda: service.available_count("centos") == before, timeout=5)
    with pytest.raises(NoSuchLease):
        service.release("demo", 3)


def test_the_vms_of_a_release_are_destroyed_side_by_side(make_services):
    services, lab = make_services()
    services.engine.acquire(LeaseRequest("wide", "centos", count=4))
    lab.control().set_timing({"shutdown_seconds": 1.5})  # as on a real host: seconds per shutdown
    started = time.monotonic()
    assert services.engine.release("wide", 4).released == ["wide1", "wide2", "wide3", "wide4"]
    elapsed = time.monotonic() - started
    assert dynvm_vms(lab) == {}
    assert elapsed < 4 * 1.5 - 1.5  # one after the other would take at least 6 s; side by side about 1.5


def test_cpus_memory_and_a_pinned_host(make_services):
    services, lab = make_services(hosts=2)
    [lease] = services.engine.acquire(LeaseRequest("big", "centos", cpus=8, memory=16 * GiB, host_ref="2"))
    assert lease.host_ref == "2"
    record = dynvm_vms(lab, 1)["big"]
    assert (record["VCPUs_at_startup"], record["memory_static_max"]) == ("8", str(16 * GiB))
    with pytest.raises(BadRequest, match="no host 7; xhostref is one of: 1, 2"):
        services.engine.acquire(LeaseRequest("x", "centos", host_ref="7"))


def test_unknown_os_names_the_oses_that_exist(make_services):
    services, _ = make_services()
    with pytest.raises(UnknownOs, match="unknown OS 'rhel9'; the OSes that exist are: centos, centos7, centos8"):
        services.engine.acquire(LeaseRequest("x", "rhel9"))


def test_a_held_name_is_refused(make_services):
    services, lab = make_services(foreign_vms=1)
    services.engine.acquire(LeaseRequest("taken", "centos"))
    with pytest.raises(NameInUse, match="taken already leased by dynvm"):
        services.engine.acquire(LeaseRequest("taken", "centos"))
    foreign = next(
        r["name_label"]
        for r in lab.xapi().VM.get_all_records().values()
        if r["power_state"] == "Running" and not r["is_control_domain"] and MARKER_KEY not in r["other_config"]
    )
    with pytest.raises(NameInUse, match=r"already exist\(s\) on host 1"):
        services.engine.acquire(LeaseRequest(foreign, "centos"))


def test_a_foreign_vm_is_never_touched(make_services):
    services, lab = make_services(foreign_vms=2)
    xapi = lab.xapi()
    foreign = {
        r["name_label"]
        for r in xapi.VM.get_all_records().values()
        if r["power_state"] == "Running" and not r["is_control_domain"]
    }
    name = sorted(foreign)[0]
    with pytest.raises(NoSuchLease):
        services.engine.release(name)
    report = services.engine.reconcile()
    assert report.orphans_destroyed == []
    assert foreign <= {r["name_label"] for r in xapi.VM.get_all_records().values() if r["power_state"] == "Running"}


def test_not_enough_capacity_says_how_much_there_is(make_services):
    services, lab = make_services(host_cpus=8)  # room for two CentOS VMs
    with pytest.raises(NotEnoughCapacity, match="not enough capacity for 3 centos VM\\(s\\): 2 can be made now"):
        services.engine.acquire(LeaseRequest("many", "centos", count=3))
    assert dynvm_vms(lab) == {}


def test_all_or_nothing_when_one_vm_cannot_be_made(make_services):
    services, lab = make_services(hosts=2, network_timeout=1)
    before = [lab.inventory_of(0), lab.inventory_of(1)]
    lab.control(1).fail_next("start", "BOOTLOADER_FAILED", 3)  # every attempt on host 2 fails
    with pytest.raises(CreateFailed) as error:
        services.engine.acquire(LeaseRequest("allornot", "centos", count=2))
    message = str(error.value)
    assert "could not create allornot2 on xenhost2" in message
    assert "BOOTLOADER_FAILED" in message
    assert "the other 1 VM(s) of the request were removed" in message
    assert [lab.inventory_of(0), lab.inventory_of(1)] == before
    assert services.engine.lease_store.active() == []
    with services.db.read() as conn:
        assert services.engine.lease_store.pending_reservations(conn) == []
    assert services.engine.available_count("centos") == 16


def test_apipa_is_retried_transparently(make_services):
    services, lab = make_services(network_timeout=0.5)
    lab.control().apipa_next(1)
    [lease] = services.engine.acquire(LeaseRequest("apipa", "windows"))
    assert not lease.ip.startswith("169.254.")
    assert list(dynvm_vms(lab)) == ["apipa"]


@pytest.mark.parametrize("operation", ["clone", "provision", "start"])
def test_a_failed_step_is_retried_transparently_leaving_only_the_vm_that_worked(make_services, operation):
    services, lab = make_services()
    before = lab.inventory_of()
    lab.control().fail_next(operation, "INTERNAL_ERROR", 2)  # the first two attempts fail; the third works
    [lease] = services.engine.acquire(LeaseRequest(f"flaky-{operation}", "centos"))
    vms, vdis = lab.inventory_of()
    assert vms - before[0] == {lease.vm_ref}
    assert len(vdis - before[1]) == 1  # and only its disk
    assert lease.create_seconds > 0


def test_concurrent_requests_never_over_commit(make_services):
    services, lab = make_services(host_cpus=16, timing=Timing(clone_seconds=0.05, boot_seconds=0.3))  # room: 4
    results: list[object] = []
    lock = threading.Lock()

    def ask(n: int) -> None:
        try:
            outcome: object = services.engine.acquire(LeaseRequest(f"storm{n}", "centos"))
        except NotEnoughCapacity as e:
            outcome = e
        with lock:
            results.append(outcome)

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(ask, range(12)))
    granted = [r for r in results if isinstance(r, list)]
    assert len(granted) == 4
    assert len(results) == 12
    host = lab.xapi().host.get_all()[0]
    running = [v for v in lab.xapi().host.get_resident_VMs(host) if MARKER_KEY in lab.xapi().VM.get_other_config(v)]
    assert len(running) == 4  # 4 x 4 vCPUs = the host's 16 CPUs, never more


def test_expiry_follows_the_clock(make_services):
    clock = FakeClock()
    services, lab = make_services(clock=clock)
    [lease] = services.engine.acquire(LeaseRequest("short", "centos", expires_in_minutes=0.5))
    assert lease.expires_at == pytest.approx(clock.now + 30)
    assert services.engine.expire_due() == []
    clock.advance(29)
    assert services.engine.expire_due() == []
    clock.advance(2)
    assert services.engine.expire_due() == ["short"]
    assert dynvm_vms(lab) == {}
    document = services.history.get(lease.vm_uuid)
    assert document["state"] == "deleted"
    assert document["live_duration_secs"] == 31


def test_expiry_is_capped_at_the_configured_maximum(make_services):
    clock = FakeClock()
    services, _ = make_services(clock=clock)
    [lease] = services.engine.acquire(LeaseRequest("long", "centos", expires_in_minutes=10_000))
    assert lease.expires_at == pytest.approx(clock.now + 720 * 60)


def test_an_expiry_survives_a_restart(make_services, sim_lab):
    clock = FakeClock()
    lab = sim_lab()
    first, _ = make_services(lab=lab, clock=clock)
    first.engine.acquire(LeaseRequest("persist", "centos", expires_in_minutes=1))
    first.stop()  # dynvm goes away; the VM stays; the expiry is in the database
    clock.advance(120)
    second, _ = make_services(lab=lab, clock=clock)
    assert second.engine.expire_due() == ["persist"]
    assert dynvm_vms(lab) == {}


def test_reconcile_destroys_vms_of_ended_leases_and_closes_vanished_leases(make_services):
    clock = FakeClock()
    services, lab = make_services(clock=clock)
    xapi = lab.xapi()
    [ended] = services.engine.acquire(LeaseRequest("leftover", "centos"))
    # as a VM whose create failed after it was made: ended, never handed out (no holder on it)
    services.engine.lease_store.finish([ended.id], LeaseState.FAILED, clock(), by=Actor.BUILDER)
    xapi.VM.remove_from_other_config(ended.vm_ref, "dynvm_holder")
    [lease] = services.engine.acquire(LeaseRequest("vanishing", "centos"))
    xapi.VM.hard_shutdown(lease.vm_ref)
    xapi.VM.destroy(lease.vm_ref)  # someone removed it behind dynvm's back
    wait_for(lambda: all(vm.name != "vanishing" for vm in services.inventory.view("1").vms), timeout=5)
    clock.advance(60)
    report = services.engine.reconcile()
    assert report.orphans_destroyed == ["leftover"]
    assert report.vanished == ["vanishing"]
    assert "leftover" not in {r["name_label"] for r in xapi.VM.get_all_records().values()}
    assert services.engine.lease_store.active() == []
    assert services.history.get(lease.vm_uuid)["state"] == "deleted"


def test_start_up_fails_creates_a_dead_process_left_behind_and_removes_their_vms(make_services, sim_lab, tmp_path):
    """What kill -9 during a create leaves: a lease row in 'creating' owned by the dead
    process, and a marked VM on the host. (tests/test_serve.py kills a real process.)"""
    from dynvm.store.db import Database
    from dynvm.store.leases import LeaseStore

    lab = sim_lab()
    store = LeaseStore(Database(f"sqlite:///{tmp_path / 'dynvm.db'}"))
    store.db.migrate()
    lease = leave_a_crashed_create(store, lab, "lease-of-the-dead", "crashed", "dynvm-that-died", 1.0)

    services, _ = make_services(lab=lab)  # recover + reconcile run at start-up
    assert "crashed" not in dynvm_vms(lab)
    assert services.engine.lease_store.get(lease.id).state == "failed"
    with services.db.read() as conn:
        assert services.engine.lease_store.pending_reservations(conn) == []
    assert services.engine.available_count("centos") == 8


def test_a_new_host_in_the_config_is_used_without_a_restart(make_services, sim_lab):
    lab = sim_lab(hosts=2)
    text = lab.settings.source.read_text()
    only_first = text[: text.index("[xenhost2]")]
    lab.settings.source.write_text(only_first)
    services, _ = make_services(lab=lab)
    assert services.engine.available_count("centos") == 8
    with pytest.raises(BadRequest):
        services.engine.acquire(LeaseRequest("pinned", "centos", host_ref="2"))
    lab.settings.source.write_text(text)
    wait_for(lambda: services.engine.available_count("centos") == 16, timeout=10)
    [lease] = services.engine.acquire(LeaseRequest("pinned", "centos", host_ref="2"))
    assert lease.host_ref == "2"
    assert services.inventory.view("2").state is HostState.UP


def test_a_dead_replicas_creates_are_failed_once_its_heartbeat_is_stale(make_services, sim_lab, tmp_path):
    """Another process (replica "a", still beating a moment ago) left a create behind."""
    from dynvm.engine.context import REPLICA_STALE_SECONDS

    clock = FakeClock()
    lab = sim_lab()
    services, _ = make_services(lab=lab, clock=clock, replica="b")
    store = services.engine.lease_store
    services.engine.ctx.replicas.heartbeat("a#1", clock.now)
    leave_a_crashed_create(store, lab, "lease-a", "half", "a#1", clock.now)
    wait_for(lambda: any(v.name == "half" for v in services.inventory.view("1").vms), timeout=5)

    assert services.engine.recover() == []  # replica a is alive: its create is its own business
    services.engine.reconcile()
    assert "half" in dynvm_vms(lab)
    clock.advance(REPLICA_STALE_SECONDS + 1)  # a has stopped beating
    assert services.engine.recover() == ["half"]
    assert services.engine.reconcile().orphans_destroyed == ["half"]
    assert dynvm_vms(lab) == {}


def test_a_clone_that_outlasts_the_start_up_wait_is_left_to_reconcile(make_services, sim_lab, monkeypatch):
    """A dead process's clone still runs when recover looks: start-up does not wait for it
    beyond its budget (here none); reconcile removes the VM once the clone has ended."""
    import dynvm.engine.upkeep

    monkeypatch.setattr(dynvm.engine.upkeep, "RECOVER_CLONE_WAIT", 0.0)
    lab = sim_lab(timing=Timing(clone_seconds=1.0))
    services, _ = make_services(lab=lab)
    xapi = lab.xapi()
    template = xapi.VM.get_by_name_label("tmpl-cnt7.7")[0]
    task = xapi.Async.VM.clone(template, "slowclone")  # as the dead process began it
    lease = a_creating_lease("lease-slow", "slowclone", "gone#1", 1.0, vm_ref=f"task/{task}")  # never beat: dead
    with services.db.write() as conn:
        services.engine.lease_store.insert(conn, [lease])
    assert services.engine.recover() == ["slowclone"]  # failed at once, its clone remembered
    assert services.engine.ctx.clones.abandoned_clones()[0]["task"] == task
    wait_for(lambda: xapi.task.get_status(task) == "success", timeout=10)
    assert services.engine.reconcile().orphans_destroyed == ["slowclone"]
    assert "slowclone" not in {r["name_label"] for r in xapi.VM.get_all_records().values()}
    assert services.engine.ctx.clones.abandoned_clones() == []


def a_creating_lease(lease_id: str, name: str, owner: str, created_at: float, vm_ref: str | None = None):  # type: ignore[no-untyped-def]
    """A lease row as a create in progress writes it (on host 1)."""
    from dynvm.model import Lease

    return Lease(
        id=lease_id,
        request_id=f"req-{lease_id}",
        name=name,
        username=name,
        os="centos",
        host_ref="1",
        state="creating",
        cpus=4,
        memory=4 * GiB,
        disk=35 * GiB,
        created_at=created_at,
        expires_at=created_at + 3600,
        owner=owner,
        template="tmpl-cnt7.7",
        vm_ref=vm_ref,
    )


def leave_a_crashed_create(store, lab, lease_id: str, name: str, owner: str, created_at: float):  # type: ignore[no-untyped-def]
    """What a process that died mid-create leaves: its lease row in 'creating', and a
    running VM with its marker on host 1."""
    lease = a_creating_lease(lease_id, name, owner, created_at)
    with store.db.write() as conn:
        store.insert(conn, [lease])
    xapi = lab.xapi()
    vm = new_vm(xapi, name, start=True)
    xapi.VM.add_to_other_config(vm, MARKER_KEY, lease.id)
    return lease


def test_a_shortage_names_the_hosts_that_give_nothing_and_why(make_services, sim_lab):
    lab = sim_lab(hosts=3)
    text = lab.settings.source.read_text()
    text = text.replace("windows.template=tmpl-win16dc - PATCHED (1)\n", "", 1)  # xenhost1: no windows key
    lab.settings.source.write_text(text)
    services, _ = make_services(lab=lab)
    lab.control(2).host_down("refuse")
    wait_for(lambda: services.inventory.view("3").state is HostState.DOWN, timeout=15)
    with pytest.raises(NotEnoughCapacity) as error:
        services.engine.acquire(LeaseRequest("big", "windows", count=40))
    message = str(error.value)
    assert message.startswith("not enough capacity for 40 windows VM(s): ")
    assert "xenhost1 has no template for windows" in message
    assert "xenhost3 is down: " in message
    assert "release some VMs" not in message  # the real cause instead
    lab.control(2).host_up()


def test_after_a_restart_on_a_fresh_lab_leases_whose_vms_are_gone_are_closed_at_start_up(make_services, sim_lab):
    """dynvm lab restarted with a fresh simulator: the old leases' VMs are gone. They are
    closed by the start-up reconcile, not up to a minute later."""
    lab = sim_lab()
    first, _ = make_services(lab=lab, db="kept.db")
    [lease] = first.engine.acquire(LeaseRequest("before", "centos"))
    first.stop()
    xapi = lab.xapi()
    xapi.VM.hard_shutdown(lease.vm_ref)
    xapi.VM.destroy(lease.vm_ref)  # as a fresh simulator would not have it
    second, _ = make_services(lab=lab, db="kept.db")  # seconds later: well within the grace
    assert second.engine.lease_store.get(lease.id).state == "released"
    assert second.engine.lease_store.active() == []


def test_templates_are_never_picked_from_snapshots_builtins_or_an_ambiguous_prefix(make_services, sim_lab, caplog):
    lab = sim_lab()
    text = lab.settings.source.read_text()
    text = text.replace("centos8.template=tmpl-cnt8.0", "centos8.template=tmpl-cnt")  # 7.7 and 8.0: ambiguous
    text = text.replace("oel8.template=tmpl-oel8", "oel8.template=Oracle")  # only built-ins start with it
    text = text.replace("windows.template=tmpl-win16dc - PATCHED (1)", "windows.template=tmpl-win16dc")
    lab.settings.source.write_text(text)
    services, _ = make_services(lab=lab)
    problems = services.engine.template_problems()
    assert any("centos8.template: 2 templates start with 'tmpl-cnt'" in p for p in problems)
    assert any("oel8.template: no template named 'Oracle'" in p for p in problems)  # built-ins need their whole name
    assert "no VM of that OS is made there" in caplog.text
    with pytest.raises(NotEnoughCapacity, match="2 templates start with 'tmpl-cnt'"):
        services.engine.acquire(LeaseRequest("amb", "centos8"))
    # a prefix that only a snapshot shares with the template still picks the template
    [lease] = services.engine.acquire(LeaseRequest("win", "windows"))
    assert lease.template == "tmpl-win16dc - PATCHED (1)"
    [lease] = services.engine.acquire(LeaseRequest("exact", "centos"))  # a snapshot "tmpl-cnt7.7 before patch" exists
    assert lease.template == "tmpl-cnt7.7"


def test_asked_vcpus_get_a_cores_per_socket_that_divides_them(make_services):
    services, lab = make_services()
    services.engine.acquire(LeaseRequest("three", "centos", cpus=3))  # the template says 2 per socket
    record = dynvm_vms(lab)["three"]
    assert (record["VCPUs_max"], record["platform"]["cores-per-socket"]) == ("3", "1")
    assert record["power_state"] == "Running"
    services.engine.acquire(LeaseRequest("six", "centos", cpus=6))
    assert dynvm_vms(lab)["six"]["platform"]["cores-per-socket"] == "2"  # the template's, as it divides 6


def test_dynvm_works_on_a_host_older_than_xenserver_7_1(make_services):
    """No VIF.move nor VM.set_memory before 7.1: dynvm puts a VIF on its network by
    destroying and creating it, and sets memory with set_memory_limits."""
    services, lab = make_services(xenserver_version=(7, 0))
    services.engine.acquire(LeaseRequest("oldie", "centos", cpus=2, memory=2 * GiB))
    record = dynvm_vms(lab)["oldie"]
    assert (record["power_state"], record["memory_static_max"], record["VCPUs_max"]) == ("Running", str(2 * GiB), "2")


def test_a_vm_is_handed_out_only_once_its_sshd_answers(make_services):
    from dynvm import probe

    timing = Timing(clone_seconds=0.01, boot_seconds=0.05, ip_seconds=0.05, service_seconds=0.5)
    services, lab = make_services(timing=timing)
    port = lab.lab.service_port
    assert services.current_settings().probe.port_for("centos") == port  # the lab's config says where
    [lease] = services.engine.acquire(LeaseRequest("probed", "centos"))
    assert probe.answers(lease.ip, port)  # the job's first ssh connects
    assert lease.create_seconds >= 0.5


def test_a_vm_whose_sshd_never_answers_is_replaced_and_never_handed_out(make_services):
    from dynvm import probe

    services, lab = make_services(network_timeout=1.0)
    lab.control().service_never_next(1)
    [lease] = services.engine.acquire(LeaseRequest("second", "centos"))
    assert probe.answers(lease.ip, lab.lab.service_port)
    assert list(dynvm_vms(lab)) == ["second"]  # the mute first attempt is gone
