"""The fault suite: each test drives a simulator fault through a real request and ends
with every request either granted or refused with a clear error, and the same invariant:
no VM or VDI on any host that dynvm does not account for, no open reservation, and the
capacity back where it started once everything is released."""

from __future__ import annotations

import contextlib
import threading
import xmlrpc.client

import pytest
import XenAPI

from dynvm.model import CreateFailed, LeaseError, LeaseRequest, NotEnoughCapacity
from dynvm.sim.settings import Timing
from dynvm.xen.provision import MARKER_KEY

from .sim.simtools import wait_for

QUICK = Timing(clone_seconds=0.02, boot_seconds=0.1, ip_seconds=0.05)


@pytest.fixture
def rig(make_services):
    services, lab = make_services(hosts=2, timing=QUICK, network_timeout=1, seed=11)
    baseline = take_baseline(services, lab)
    return services, lab, baseline


def take_baseline(services, lab) -> dict:  # type: ignore[no-untyped-def]
    """What must be true again once everything is released: capacity, VMs and disks."""
    hosts = range(len(lab.settings.hosts))
    return {
        "capacity": services.engine.available_count("centos"),
        "vms": [set(lab.xapi(i).VM.get_all()) for i in hosts],
        "vdis": [set(lab.xapi(i).VDI.get_all()) for i in hosts],
    }


def check_invariants(services, lab, baseline) -> None:  # type: ignore[no-untyped-def]
    """Release what is held (and drain the ready pools), then: nothing left on any host,
    nothing reserved, capacity back."""
    for lease in services.engine.lease_store.held():
        if lease.state == "ready":
            services.engine.release_names([lease.name])
    drain_ready_pools(services, lab)
    assert services.engine.lease_store.active() == []
    with services.db.read() as conn:
        assert services.engine.lease_store.pending_reservations(conn) == []
    for index in range(len(baseline["vms"])):
        xapi = lab.xapi(index)
        marked = [r["name_label"] for r in xapi.VM.get_all_records().values() if MARKER_KEY in r["other_config"]]
        assert marked == [], f"host {index + 1} keeps dynvm VMs no lease holds: {marked}"
        assert set(xapi.VM.get_all()) == baseline["vms"][index]
        assert set(xapi.VDI.get_all()) == baseline["vdis"][index], f"host {index + 1} leaks disks"
    wait_for(lambda: services.engine.available_count("centos") == baseline["capacity"], timeout=10)


def drain_ready_pools(services, lab) -> None:  # type: ignore[no-untyped-def]
    """Take ``[pools]`` out of the configuration and let the pools drain (no-op without)."""
    text = lab.settings.source.read_text()
    if "[pools]" in text:
        lab.settings.source.write_text(text.split("\n[pools]\n")[0] + "\n")
        services.watcher.reload()
    wait_for(lambda: not services.engine.ready_pools.tick().recycled and not services.engine.lease_store.pooled(), 15)


def attempt(services, name: str, count: int = 1, **options):  # type: ignore[no-untyped-def]
    """A request's outcome: its leases, or the error it ended with (which must be clear)."""
    try:
        return services.engine.acquire(LeaseRequest(name, options.pop("os", "centos"), count=count, **options))
    except LeaseError as e:
        error = e
    assert str(error)  # a sentence for the user ...
    assert "Traceback" not in str(error)  # ... never a stack trace
    return error


def test_apipa_on_thirty_percent_of_boots(rig):
    services, lab, baseline = rig
    for index in (0, 1):
        lab.control(index).set_apipa_rate(0.3)
    outcomes = [attempt(services, f"apipa{n}", count=2) for n in range(4)]
    granted = [o for o in outcomes if isinstance(o, list)]
    assert granted, "with three attempts per VM, most requests must succeed"
    assert all(lease.ip and not lease.ip.startswith("169.254.") for leases in granted for lease in leases)
    check_invariants(services, lab, baseline)


def test_an_exhausted_dhcp_pool(rig):
    services, lab, baseline = rig
    for index in (0, 1):
        lab.control(index).dhcp_exhausted(True)
    outcome = attempt(services, "nodhcp")
    assert isinstance(outcome, CreateFailed)
    assert "only the APIPA address 169.254." in str(outcome)
    for index in (0, 1):
        lab.control(index).dhcp_exhausted(False)
    check_invariants(services, lab, baseline)


def test_clone_failures_are_retried(rig):
    services, lab, baseline = rig
    for index in (0, 1):
        lab.control(index).fail_next("clone", "SR_BACKEND_FAILURE_44", 2)
    [lease] = attempt(services, "clonefail")
    assert lease.state == "ready"
    check_invariants(services, lab, baseline)


def test_a_start_that_always_fails(rig):
    services, lab, baseline = rig
    for index in (0, 1):
        lab.control(index).fail_next("start", "BOOTLOADER_FAILED", 10)
    outcome = attempt(services, "nostart", count=2)
    assert isinstance(outcome, CreateFailed)
    assert "BOOTLOADER_FAILED" in str(outcome)
    check_invariants(services, lab, baseline)


def test_every_session_ends_in_the_middle_of_a_request(make_services):
    services, lab = make_services(
        hosts=2, timing=Timing(clone_seconds=0.02, boot_seconds=0.8, ip_seconds=0.05), network_timeout=5, seed=11
    )
    baseline = take_baseline(services, lab)
    killer = threading.Timer(0.4, lambda: [lab.control(i).invalidate_sessions() for i in (0, 1)])
    killer.start()
    leases = attempt(services, "relogin", count=2)
    killer.join()
    assert isinstance(leases, list), leases  # the SDK logged in again; nobody noticed
    check_invariants(services, lab, baseline)


@pytest.mark.parametrize("pinned", [False, True])
def test_a_host_going_down_in_the_middle_of_a_create(make_services, pinned):
    services, lab = make_services(
        hosts=2, timing=Timing(clone_seconds=0.02, boot_seconds=2, ip_seconds=0.05), network_timeout=10, seed=11
    )
    baseline = take_baseline(services, lab)
    control = lab.control(0)

    def outage() -> None:  # host 1 goes down once its VM exists, and stays down until the request is over
        wait_for(lambda: any(v.name.startswith("outage") for v in services.inventory.view("1").vms), timeout=10)
        control.host_down("refuse")

    thread = threading.Thread(target=outage)
    thread.start()
    if pinned:
        outcome = attempt(services, "outage", count=2, host_ref="1")
        assert isinstance(outcome, CreateFailed)  # pinned: nowhere else to go
        assert "xenhost1" in str(outcome)
        assert "stopped answering" in str(outcome)
    else:
        outcome = attempt(services, "outage", count=2)  # one VM per host at first
        assert isinstance(outcome, list), outcome
        assert {lease.host_ref for lease in outcome} == {"2"}  # host 1's VM was made again on host 2
        assert all(lease.state == "ready" for lease in outcome)
    thread.join()
    control.host_up()
    wait_for(lambda: services.inventory.view("1").state.value == "up", timeout=30)
    services.engine.reconcile()  # when the host is back, whatever is left there goes
    check_invariants(services, lab, baseline)


@pytest.mark.parametrize("pinned", [False, True])
def test_a_host_going_down_while_it_clones(make_services, pinned):
    """The clone goes on on the host while dynvm cannot see it, and ends without dynvm's
    marker; once the host answers again, reconcile finds that VM through its task."""
    services, lab = make_services(
        hosts=2, timing=Timing(clone_seconds=1.5, boot_seconds=0.1, ip_seconds=0.05), network_timeout=10, seed=11
    )
    baseline = take_baseline(services, lab)
    control = lab.control(0)

    def cloning_on_host_1() -> bool:
        return any(
            lease.host_ref == "1" and (lease.vm_ref or "").startswith("task/")
            for lease in services.engine.lease_store.active()
        )

    def clone_ended_on_host_1() -> bool:  # seen inside the simulator: host 1 answers no one meanwhile
        store = lab.lab.nodes[0].host.store
        with store.lock:
            return any(str(r["name_label"]).startswith("dynvm-clone-") for _, r in store.items("VM"))  # made at its end

    def outage() -> None:
        wait_for(cloning_on_host_1, timeout=10)
        control.host_down("refuse")
        wait_for(clone_ended_on_host_1, timeout=30)  # the clone ends on the host meanwhile
        control.host_up()

    thread = threading.Thread(target=outage)
    thread.start()
    outcome = attempt(services, "midclone", count=2, **({"host_ref": "1"} if pinned else {}))
    if pinned:
        assert isinstance(outcome, CreateFailed)
        assert "stopped answering" in str(outcome)
    else:
        assert isinstance(outcome, list), outcome
        assert {lease.host_ref for lease in outcome} == {"2"}
    thread.join()
    wait_for(lambda: services.inventory.view("1").state.value == "up", timeout=30)
    unmarked = [r for r in lab.xapi(0).VM.get_all_records().values() if r["name_label"].startswith("dynvm-clone-")]
    assert unmarked  # what the clone left: a VM under its clone name ...
    assert all(MARKER_KEY not in r["other_config"] for r in unmarked)  # ... without dynvm's marker
    report = services.engine.reconcile()
    assert any(name.startswith("dynvm-clone-") for name in report.orphans_destroyed), report
    check_invariants(services, lab, baseline)


def test_a_full_sr_is_a_capacity_answer_not_a_failure(rig):
    services, lab, baseline = rig
    for index in (0, 1):
        lab.control(index).set_sr_free(str(10 * 1024**3))  # less than one 35 GiB disk
    wait_for(lambda: services.engine.available_count("centos") == 0, timeout=5)
    outcome = attempt(services, "nodisk")
    assert isinstance(outcome, NotEnoughCapacity)
    assert "0 can be made now" in str(outcome)
    for index in (0, 1):
        lab.control(index).set_sr_free("-1")
    check_invariants(services, lab, baseline)


def test_a_slow_host(rig):
    services, lab, baseline = rig
    lab.control(0).set_timing({"latency_ms": 500})
    [lease] = attempt(services, "slow", host_ref="1")
    assert lease.state == "ready"
    lab.control(0).set_timing({"latency_ms": 0})
    check_invariants(services, lab, baseline)


def test_a_cancel_racing_the_grant_hands_the_vm_over_or_removes_it_never_both(rig):
    """Each round frees one slot for a queued request and cancels it a moment later, at
    a different point of its life each time: queued, being made, or handed over."""
    import contextlib
    import random

    from dynvm.model import NameInUse

    services, lab, baseline = rig
    engine = services.engine
    attempt(services, "fill", count=16)  # both hosts full
    rng = random.Random(5)
    ends = []
    for n in range(1, 9):
        waiter = engine.submit(LeaseRequest(f"race{n}x", "centos"), 600)
        engine.scheduler.run_pass()
        engine.release_names([f"fill{n}"])
        threading.Event().wait(rng.uniform(0, 0.4))  # somewhere in its grant, create or hand-over
        with contextlib.suppress(NameInUse):  # handed over first: the cancel lost, the VM is the request's
            engine.cancel(waiter.id)
        wait_for(lambda waiter=waiter: engine.request_store.get(waiter.id).finished, timeout=30)
        record = engine.request_store.get(waiter.id)
        mine = [lease for lease in engine.lease_store.active() if lease.request_id == waiter.id]
        if record.state == "ready":
            assert [lease.state for lease in mine] == ["ready"]  # handed over, and kept
        else:
            assert record.state == "cancelled"
            wait_for(lambda waiter=waiter: not [x for x in engine.lease_store.active() if x.request_id == waiter.id])
        ends.append(record.state)
    assert set(ends) <= {"ready", "cancelled"}
    check_invariants(services, lab, baseline)


def test_a_queued_request_whose_create_fails_ends_failed_and_leaves_nothing(rig):
    services, lab, baseline = rig
    engine = services.engine
    attempt(services, "fill", count=16)
    waiter = engine.submit(LeaseRequest("doomed", "centos"), 600)
    engine.scheduler.run_pass()
    for index in (0, 1):
        lab.control(index).fail_next("start", "BOOTLOADER_FAILED", 10)
    engine.release_names(["fill1"])
    wait_for(lambda: engine.request_store.get(waiter.id).finished, timeout=30)
    record = engine.request_store.get(waiter.id)
    assert record.state == "failed"
    assert "BOOTLOADER_FAILED" in record.error
    for index in (0, 1):
        lab.control(index).reset()
    check_invariants(services, lab, baseline)


# -- a pool's own faults: one member, maintenance, a new master ---------------------------


@pytest.fixture
def pool_rig(make_services):
    services, lab = make_services(pool_size=3, host_memory_gib=16, timing=QUICK, network_timeout=2, seed=12)
    return services, lab, take_baseline(services, lab)


def member_of(lab, name: str) -> str:  # type: ignore[no-untyped-def]
    xapi = lab.xapi()
    return next(h for h in xapi.host.get_all() if xapi.host.get_name_label(h) == name)


def test_a_member_going_down_in_the_middle_of_a_create(make_services):
    services, lab = make_services(
        pool_size=3, host_memory_gib=16, timing=Timing(clone_seconds=0.02, boot_seconds=1.5), network_timeout=5
    )
    baseline = take_baseline(services, lab)

    def outage() -> None:  # the third member goes down once a VM of the request runs there
        h3 = member_of(lab, "sim-xen-01-h3")
        wait_for(lambda: any(v.resident_on == h3 for v in services.inventory.view("1").vms), timeout=10)
        lab.control().member_down(2, "refuse")

    thread = threading.Thread(target=outage)
    thread.start()
    outcome = attempt(services, "member", count=3)  # one VM per member at first
    thread.join()
    if isinstance(outcome, list):  # the lost member's VM was made again elsewhere
        h3 = member_of(lab, "sim-xen-01-h3")
        assert all(lease.member != h3 for lease in outcome)
    lab.control().member_up(2)
    wait_for(lambda: services.inventory.view("1").members[2].live, timeout=10)
    services.engine.recover()
    services.engine.reconcile()  # what the lost member kept goes once it is back
    check_invariants(services, lab, baseline)


def test_maintenance_with_evacuation_while_vms_are_held(pool_rig):
    services, lab, baseline = pool_rig
    held = attempt(services, "held", count=4)
    assert isinstance(held, list), held
    xapi = lab.xapi()
    h2 = member_of(lab, "sim-xen-01-h2")
    xapi.host.disable(h2)
    with contextlib.suppress(XenAPI.Failure):  # the others may lack room for every VM
        xapi.host.evacuate(h2)
    more = attempt(services, "during", count=2)
    if isinstance(more, list):
        assert all(lease.member != h2 for lease in more)
    services.engine.extend(held[0].name, 10)
    xapi.host.enable(h2)
    check_invariants(services, lab, baseline)


def test_a_new_master_in_the_middle_of_a_create(make_services):
    services, lab = make_services(pool_size=3, timing=Timing(clone_seconds=0.02, boot_seconds=1), network_timeout=5)
    baseline = take_baseline(services, lab)

    def handover() -> None:
        wait_for(lambda: any(v.name.startswith("moving") for v in services.inventory.view("1").vms), timeout=10)
        lab.xapi().pool.designate_new_master(member_of(lab, "sim-xen-01-h2"))

    thread = threading.Thread(target=handover)
    thread.start()
    outcome = attempt(services, "moving", count=2)
    thread.join()
    assert isinstance(outcome, list), outcome  # a hand-over loses nothing: sessions go on at the new master
    assert attempt(services, "after", count=1)
    check_invariants(services, lab, baseline)


def test_the_master_dying_while_vms_are_held(pool_rig):
    services, lab, baseline = pool_rig
    held = attempt(services, "kept", count=3)
    assert isinstance(held, list), held
    lab.control().member_down(0, "refuse")
    wait_for(lambda: services.inventory.view("1").state.value == "down", timeout=15)
    assert isinstance(attempt(services, "nowhere"), LeaseError)  # a clear refusal meanwhile
    member = lab.lab.members[1][0]
    local = XenAPI.Session(member.url)
    password = lab.settings.hosts[0].password.reveal()
    local._session = xmlrpc.client.ServerProxy(member.url).session.slave_local_login_with_password("root", password)[
        "Value"
    ]
    local.xenapi.pool.emergency_transition_to_master()
    local.xenapi.pool.recover_slaves()
    wait_for(lambda: services.inventory.view("1").state.value == "up", timeout=15)
    assert all(services.engine.lease_store.get(lease.id).state == "ready" for lease in held)  # nothing lost
    lab.control().member_up(0)
    check_invariants(services, lab, baseline)
