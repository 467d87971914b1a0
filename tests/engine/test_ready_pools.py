"""Ready pools (``engine/ready_pools.py``) on a simulated lab and a real SQLite file: filled,
handed out, given way, recycled, and safe across restarts."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dynvm import probe
from dynvm.model import LeaseRequest, NotEnoughCapacity
from dynvm.xen.provision import MARKER_KEY

from ..conftest import FakeClock
from ..sim.simtools import wait_for

GiB = 1024**3


def with_pools(sim_lab, pools: str, **options):  # type: ignore[no-untyped-def]
    lab = sim_lab(**options)
    lab.settings.source.write_text(lab.settings.source.read_text() + "\n[pools]\n" + pools + "\n")
    return lab


def pool_of(services, os: str = "centos"):  # type: ignore[no-untyped-def]
    return next((p for p in services.engine.ready_pools.status() if p.os == os), None)


def fill(services, os: str = "centos", ready: int = 2) -> None:  # type: ignore[no-untyped-def]
    """Run pool passes until ``ready`` VMs of ``os`` wait, probed and seen by the mirror."""

    def filled() -> bool:
        services.engine.ready_pools.tick()
        pool = pool_of(services, os)
        return pool is not None and pool.ready >= ready and pool.refilling == 0

    wait_for(filled, timeout=15, interval=0.05)


def vm_records(lab) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    xapi = lab.xapi()
    return {r["name_label"]: r for r in xapi.VM.get_all_records().values() if MARKER_KEY in r["other_config"]}


def test_a_pool_fills_to_its_target_and_getservers_takes_a_ready_vm_renamed_for_it(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=2")
    services, _ = make_services(lab=lab)
    fill(services)
    pooled = {lease.vm_uuid for lease in services.engine.lease_store.pooled()}
    assert len(pooled) == 2
    [lease] = services.engine.acquire(LeaseRequest("job42", "centos"))
    assert lease.vm_uuid in pooled
    assert lease.pooled_at is not None
    assert not lease.pooled
    assert lease.handed_over_at is not None
    record = vm_records(lab)["job42"]  # renamed on the host, described as if made for it
    assert record["name_description"].startswith("job42 from tmpl-cnt7.7 on ")
    assert record["other_config"][MARKER_KEY] == lease.id
    document = services.history.get(lease.vm_uuid)
    assert document["pooled"] is True
    assert document["name"] == "job42"
    assert document["username"] == "job42"
    assert document["pooled_time"] <= document["handout_time"]
    assert pool_of(services).ready == 1
    fill(services)  # the pass after refills it
    assert pool_of(services).handed_out == 1


def test_the_legacy_answer_from_a_pool_is_byte_for_byte_a_cold_one(make_services, sim_lab):
    from ..api.conftest import RunningService

    lab = with_pools(sim_lab, "centos.ready=1")
    services, _ = make_services(lab=lab)
    fill(services, ready=1)
    service = RunningService(services, lab)
    try:
        warm = service.get("/getservers/warmjob", count=1)
        cold = service.get("/getservers/coldjob", count=1)
    finally:
        service.stop()
    assert warm.status_code == cold.status_code == 200
    assert warm.headers["content-type"] == cold.headers["content-type"]
    [warm_ip], [cold_ip] = warm.json(), cold.json()
    assert warm.text == f'["{warm_ip}"]'
    assert cold.text == f'["{cold_ip}"]'
    leases = {lease.name: lease for lease in services.engine.lease_store.held()}
    assert leases["warmjob"].pooled_at is not None
    assert leases["coldjob"].pooled_at is None


def test_a_bigger_request_takes_the_ready_vms_and_makes_the_rest(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=2")
    services, _ = make_services(lab=lab)
    fill(services)
    leases = services.engine.acquire(LeaseRequest("batch", "centos", count=3))
    assert [lease.name for lease in leases] == ["batch1", "batch2", "batch3"]
    assert [lease.pooled_at is not None for lease in leases] == [True, True, False]


def test_other_cpus_or_memory_are_made_cold_and_leave_the_pool_alone(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=2")
    services, _ = make_services(lab=lab)
    fill(services)
    [lease] = services.engine.acquire(LeaseRequest("big", "centos", cpus=2, memory=2 * GiB))
    assert lease.pooled_at is None
    assert lease.cpus == 2
    assert pool_of(services).ready == 2


def test_requests_at_once_never_get_the_same_ready_vm(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=4")
    services, _ = make_services(lab=lab)
    fill(services, ready=4)
    start = threading.Barrier(6)

    def one(n: int):  # type: ignore[no-untyped-def]
        start.wait()
        return services.engine.acquire(LeaseRequest(f"racer{n}", "centos"))[0]

    with ThreadPoolExecutor(6) as pool:
        leases = list(pool.map(one, range(6)))
    assert len({lease.vm_uuid for lease in leases}) == 6  # six VMs, none handed out twice
    assert sum(lease.pooled_at is not None for lease in leases) == 4
    assert len({lease.ip for lease in leases}) == 6


def test_capacity_counts_ready_vms_and_the_pool_makes_way_for_another_os(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=2")  # one host: 32 CPUs, centos 4 vCPUs, windows 6
    services, _ = make_services(lab=lab)
    engine = services.engine
    fill(services)
    assert engine.available_count("centos") == 8  # 2 ready + 6 more fit
    assert engine.available_count("windows") == 5  # the ready VMs' 8 CPUs count: they make way
    leases = engine.acquire(LeaseRequest("win", "windows", count=5))  # 30 of 32 CPUs
    assert len(leases) == 5
    assert pool_of(services).ready == 0  # both ready VMs were destroyed for it
    assert [name for name in vm_records(lab) if name.startswith("dynvm-pool")] == []
    assert engine.available_count("centos") == 0
    with pytest.raises(NotEnoughCapacity):
        engine.acquire(LeaseRequest("more", "windows"))
    services.engine.ready_pools.tick()
    assert engine.lease_store.pooled() == []  # no room: the pool never takes what real demand holds


def test_a_stale_ready_vm_and_a_lowered_target_are_recycled(make_services, sim_lab):
    clock = FakeClock()
    lab = with_pools(sim_lab, "centos.ready=2\nready.ttl.minutes=30")
    services, _ = make_services(lab=lab, clock=clock)
    fill(services)
    before = {lease.id for lease in services.engine.lease_store.pooled()}
    clock.advance(31 * 60)
    report = services.engine.ready_pools.tick()
    assert len(report.recycled) == 2  # DHCP leases and clocks go stale: made afresh
    fill(services)
    assert before.isdisjoint({lease.id for lease in services.engine.lease_store.pooled()})
    text = lab.settings.source.read_text().replace("centos.ready=2", "centos.ready=1")
    lab.settings.source.write_text(text)
    assert services.watcher.reload()
    assert len(services.engine.ready_pools.tick().recycled) == 1  # the surplus drains
    assert pool_of(services).ready == 1
    assert pool_of(services).target == 1


def test_a_ready_vm_that_dies_while_waiting_is_never_handed_out_and_is_replaced(make_services, sim_lab):
    from ..test_fault_suite import check_invariants, take_baseline

    clock = FakeClock()
    lab = with_pools(sim_lab, "centos.ready=1")
    services, _ = make_services(lab=lab, clock=clock)
    baseline = take_baseline(services, lab)
    fill(services, ready=1)
    [dead] = services.engine.lease_store.pooled()
    lab.xapi().VM.hard_shutdown(dead.vm_ref)
    wait_for(lambda: pool_of(services).ready == 0, timeout=5)  # the mirror saw it stop
    [lease] = services.engine.acquire(LeaseRequest("fresh", "centos"))
    assert lease.vm_uuid != dead.vm_uuid
    assert lease.pooled_at is None
    clock.advance(10)  # past the moment a new ready VM may take to show in the mirror
    assert dead.name in services.engine.ready_pools.tick().recycled
    assert services.engine.lease_store.get(dead.id).state == "released"
    fill(services, ready=1)
    check_invariants(services, lab, baseline)


def test_reconcile_never_takes_a_ready_vm_for_an_orphan(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=2")
    services, _ = make_services(lab=lab)
    fill(services)
    report = services.engine.reconcile()
    assert report.orphans_destroyed == []
    assert report.quarantined == []
    assert pool_of(services).ready == 2


def test_after_a_kill_mid_refill_and_mid_handout_no_vm_is_both_pooled_and_leased_and_none_leaks(make_services, sim_lab):
    from ..sim.simtools import new_vm

    lab = with_pools(sim_lab, "centos.ready=2")
    first, _ = make_services(lab=lab, replica="r")
    fill(first)
    store = first.engine.lease_store
    dead = "r#boot-that-was-killed"
    # mid-handout: a request took a ready VM (one transaction) and dynvm died before answering
    kept, taken = sorted(store.pooled(), key=lambda lease: lease.name)
    with store.db.write() as conn:
        claimed = dataclasses.replace(taken, name="victim", username="victim", owner=dead, request_id="req-x")
        assert store.take_pooled(conn, taken, claimed)
    # mid-refill: a ready VM being made, its VM booted and marked, its maker gone
    half = dataclasses.replace(kept, id="lease-half", name="dynvm-pool-centos-halfmade", state="creating", owner=dead)
    half = dataclasses.replace(half, vm_ref=None, vm_uuid=None, ip=None, pooled_at=None)
    with store.db.write() as conn:
        store.insert(conn, [half])
    vm = new_vm(lab.xapi(), half.name, start=True)
    lab.xapi().VM.add_to_other_config(vm, MARKER_KEY, half.id)
    # a new boot of replica r starts on the same database: recover, then reconcile
    second, _ = make_services(lab=lab, replica="r")
    assert second.engine.lease_store.get(taken.id).state == "failed"  # nobody got it: rolled back
    assert second.engine.lease_store.get(half.id).state == "failed"
    assert [lease.id for lease in second.engine.lease_store.pooled()] == [kept.id]  # still ready to hand out
    second.engine.reconcile()
    assert set(vm_records(lab)) == {kept.name}  # nothing leaked
    [lease] = second.engine.acquire(LeaseRequest("after", "centos"))
    assert lease.id == kept.id
    assert lease.pooled_at is not None


def test_a_queued_request_is_served_from_the_pool_and_the_pool_yields_to_a_queue_of_another_os(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=2")
    services, _ = make_services(lab=lab)
    engine = services.engine
    fill(services)
    engine.acquire(LeaseRequest("hog", "windows", count=4))  # 24 of 32 CPUs; the pool holds the other 8
    waiting = engine.submit(LeaseRequest("patient", "centos", count=2), 600)
    engine.scheduler.run_pass()
    assert engine.request_store.get(waiting.id).state in ("creating", "ready")  # served warm at once
    wait_for(lambda: engine.request_store.get(waiting.id).state == "ready", timeout=5)
    assert all(lease.pooled_at is not None for lease in engine.leases_of(waiting.id))
    # no room left: a request of another OS waits; the pool refills nothing and gives way
    fill_blocked = engine.ready_pools.tick()
    assert fill_blocked.started == []  # nothing to refill into: no room
    engine.release("patient", 2)
    engine.ready_pools.tick()
    wait_for(lambda: pool_of(services).refilling == 0 and len(engine.lease_store.pooled()) == 2, timeout=10)
    wait_for(lambda: pool_of(services).ready == 2, timeout=10)
    other = engine.submit(LeaseRequest("winjob", "windows"), 600)
    engine.scheduler.run_pass()  # windows needs 6 CPUs: both idle ready VMs make way in this pass
    assert [lease.name for lease in engine.lease_store.pooled() if lease.state == "ready"] == []
    assert engine.ready_pools.tick().started == []  # and nothing refills while someone waits

    def served() -> bool:
        engine.scheduler.run_pass()
        return engine.request_store.get(other.id).state == "ready"

    wait_for(served, timeout=15, interval=0.1)


def test_refill_makes_at_most_refill_per_host_at_once_and_backs_off_a_failing_host(make_services, sim_lab):
    from dynvm.sim.settings import Timing

    lab = with_pools(sim_lab, "centos.ready=5\nrefill.per.host=2", timing=Timing(clone_seconds=0.3))
    services, _ = make_services(lab=lab)
    pools = services.engine.ready_pools
    assert len(pools.tick().started) == 2  # five wanted, two begun on the one host
    assert pools.tick().started == []  # both still being made
    fill(services, ready=5)
    lab.control().set_timing({"clone_seconds": 0.0})
    lab.control().fail_next("clone", "INTERNAL_ERROR", 9)  # every attempt of the next refills fails
    services.engine.acquire(LeaseRequest("one", "centos"))
    assert len(pools.tick().started) == 1
    wait_for(lambda: pool_of(services).refilling == 0, timeout=10)
    assert pools.tick().started == []  # the host failed: it is left alone for a while
    assert pool_of(services).ready == 4


def test_a_host_going_down_takes_its_ready_vms_out_of_the_pool(make_services, sim_lab):
    from dynvm.xen.inventory import HostState

    from ..test_fault_suite import check_invariants, take_baseline

    lab = with_pools(sim_lab, "centos.ready=2", hosts=2)
    services, _ = make_services(lab=lab)
    baseline = take_baseline(services, lab)
    fill(services)
    on_first = [lease for lease in services.engine.lease_store.pooled() if lease.host_ref == "1"]
    lab.control(0).host_down("refuse")
    wait_for(lambda: services.inventory.view("1").state is HostState.DOWN, timeout=15)
    assert pool_of(services).ready == 2 - len(on_first)  # never handed out while unreachable
    leases = services.engine.acquire(LeaseRequest("during", "centos", count=2))
    assert all(lease.host_ref == "2" for lease in leases)
    lab.control(0).host_up()
    wait_for(lambda: services.inventory.view("1").state is HostState.UP, timeout=30)
    idle = {lease.id for lease in services.engine.stock.idle(services.current_settings(), "centos")}
    assert {lease.id for lease in on_first} <= idle  # back, alive, and handed out again
    check_invariants(services, lab, baseline)


def test_learned_sizing_keeps_what_recent_demand_needs_with_the_fixed_lines_as_a_floor(make_services, sim_lab):
    from dynvm.engine.ready_pools import RESIZE_SECONDS

    clock = FakeClock()
    lab = with_pools(sim_lab, "sizing=learned\nsizing.margin=1\ncentos.max=3\nwindows.ready=1")
    services, _ = make_services(lab=lab, clock=clock)
    engine = services.engine
    for n in range(6):  # six centos requests in the last hour: a new OS, sized on its recent rate
        engine.acquire(LeaseRequest(f"seen{n}", "centos"))
        engine.release(f"seen{n}")
        clock.advance(60)
    clock.advance(RESIZE_SECONDS)  # the targets are computed again
    pools = {p.os: p for p in engine.ready_pools.status()}
    centos = pools["centos"]
    assert centos.sizing == "learned"
    assert centos.forecast is not None
    assert centos.forecast.recent_per_hour == 6
    assert centos.forecast.weight == 0  # no day of profile yet
    assert centos.target == 1  # a create takes a blink here: the margin keeps one ready
    assert pools["windows"].target == 1  # nobody asked, but windows.ready=1 is a floor
    assert pools["ubuntu18"].target == 0
    fill(services, "centos", ready=1)
    fill(services, "windows", ready=1)


def test_a_recycle_pass_never_destroys_a_vm_a_request_took_since_the_pass_read_the_pool(
    make_services, sim_lab, monkeypatch
):
    clock = FakeClock()
    lab = with_pools(sim_lab, "centos.ready=1\nready.ttl.minutes=30")
    services, _ = make_services(lab=lab, clock=clock)
    engine = services.engine
    fill(services, ready=1)
    stale = engine.lease_store.pooled()  # what a pass read before a request came
    [lease] = engine.acquire(LeaseRequest("job42", "centos"))
    assert lease.id == stale[0].id  # the request took that very VM
    clock.advance(31 * 60)  # and the pass finds it past its ready TTL
    monkeypatch.setattr(engine.lease_store, "pooled", lambda conn=None: stale)
    assert engine.ready_pools.tick().recycled == []
    assert engine.lease_store.get(lease.id).state == "ready"  # job42 still holds it ...
    assert "job42" in vm_records(lab)  # ... and its VM is still there


def test_a_ready_vm_whose_maker_died_before_it_joined_the_pool_is_recycled(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=1")
    services, _ = make_services(lab=lab, replica="r")
    fill(services, ready=1)
    [ready] = services.engine.lease_store.pooled()
    store = services.engine.lease_store
    with store.db.write() as conn:  # as a refill leaves it when its process dies between two writes
        from sqlalchemy import update

        from dynvm.store.tables import leases

        conn.execute(update(leases).where(leases.c.id == ready.id).values(pooled_at=None, owner="r#killed"))
    report = services.engine.ready_pools.tick()
    assert ready.name in report.recycled
    assert services.engine.lease_store.get(ready.id).state == "released"


def test_a_request_that_needs_room_never_has_its_own_oses_ready_vms_destroyed_for_it(make_services, sim_lab):
    lab = with_pools(sim_lab, "centos.ready=2")
    services, _ = make_services(lab=lab)
    engine = services.engine
    fill(services)
    engine.acquire(LeaseRequest("hog", "windows", count=4))  # 24 CPUs; the two ready centos hold 8
    with pytest.raises(NotEnoughCapacity):  # two warm and one cold: no room for the third
        engine.acquire(LeaseRequest("three", "centos", count=3))
    assert pool_of(services).ready == 2  # the two it would have taken were not destroyed for nothing


def test_a_ready_vm_whose_member_crashed_unnoticed_is_never_handed_out_and_is_made_cold(make_services, sim_lab):
    """A member crashes; for a while its master still says it is live and its VMs Running,
    as xapi does until the heartbeat times out. A ready VM there has no sshd any more: it
    is not handed out, and the request gets a VM made for it in its place."""
    from ..conftest import FAST

    lab = with_pools(sim_lab, "centos.ready=2", pool_size=2, timing=dataclasses.replace(FAST, heartbeat_seconds=600))
    services, _ = make_services(lab=lab)
    fill(services, ready=2)
    xapi = lab.xapi()
    on = {lease.id: xapi.VM.get_resident_on(lease.vm_ref) for lease in services.engine.lease_store.pooled()}
    assert len(set(on.values())) == 2  # one on each member
    crashed = next(h for h in xapi.host.get_all() if xapi.host.get_name_label(h).endswith("-h2"))  # member 1
    dead = next(lease_id for lease_id, member in on.items() if member == crashed)
    lab.control().member_down(1, "refuse")
    leases = services.engine.acquire(LeaseRequest("both", "centos", count=2))
    assert [lease.name for lease in leases] == ["both1", "both2"]
    assert all(xapi.VM.get_resident_on(lease.vm_ref) != crashed for lease in leases)
    assert dead not in {lease.id for lease in leases}
    assert sum(1 for lease in leases if lease.pooled_at is None) == 1  # one warm, one made for it
    gone = services.engine.lease_store.get(dead)
    assert gone.handed_over_at is None
    assert gone.state in ("releasing", "failed")
    assert gone.name.startswith("dynvm-pool-")  # it gave the request's name back
    port = services.current_settings().probe.port_for("centos")
    assert port is not None
    assert all(probe.answers(lease.ip, port) for lease in leases)  # both guests answer: neither is the dead one


def test_a_ready_vm_its_host_says_another_request_holds_is_left_alone_and_made_cold(make_services, sim_lab):
    """The compare-and-set at the hand-out refuses a ready VM (its host names another
    holder: a restored database's VM, say): the VM is left as it is, and the request gets
    one made for it."""
    from dynvm.xen.marker import HOLDER_KEY

    lab = with_pools(sim_lab, "centos.ready=1")
    services, _ = make_services(lab=lab)
    fill(services, ready=1)
    [pooled] = services.engine.lease_store.pooled()
    xapi = lab.xapi()
    xapi.VM.add_to_other_config(pooled.vm_ref, HOLDER_KEY, "a-request-of-another-database")
    [lease] = services.engine.acquire(LeaseRequest("bob", "centos"))
    assert (lease.name, lease.pooled_at) == ("bob", None)
    assert lease.id != pooled.id
    assert xapi.VM.get_name_label(pooled.vm_ref) == pooled.name  # not renamed, not destroyed
    assert xapi.VM.get_other_config(pooled.vm_ref)[HOLDER_KEY] == "a-request-of-another-database"
    assert services.engine.lease_store.get(pooled.id).state == "failed"


def test_a_ready_vm_the_host_says_another_request_holds_is_never_handed_out(make_services, sim_lab):
    """The compare-and-set at the hand-out: whatever the database says, a VM whose marker on
    the host names another holder is refused, and not renamed."""
    from dynvm.model import HeldElsewhere, VmSpec
    from dynvm.xen.marker import HOLDER_KEY

    lab = with_pools(sim_lab, "centos.ready=1")
    services, _ = make_services(lab=lab)
    fill(services, ready=1)
    [pooled] = services.engine.lease_store.pooled()
    xapi = lab.xapi()
    xapi.VM.add_to_other_config(pooled.vm_ref, HOLDER_KEY, "a-request-of-another-database")
    spec = VmSpec(name="bob", os="centos", template=pooled.template, lease_id=pooled.id, holder="bobs-request")
    with pytest.raises(HeldElsewhere, match="a-request-of-another-database"):
        services.provider.hand_out(lab.host(), pooled.vm_ref, spec)
    assert xapi.VM.get_name_label(pooled.vm_ref) == pooled.name  # not renamed for bob
    again = dataclasses.replace(spec, holder="a-request-of-another-database")
    services.provider.hand_out(lab.host(), pooled.vm_ref, again)  # its own holder: idempotent
    assert xapi.VM.get_name_label(pooled.vm_ref) == "bob"


def test_a_ready_vm_still_being_made_stops_and_gives_its_room_to_a_request():
    """A VM being made for a pool cannot be destroyed like an idle one, but it must not hold
    room a request needs either: its create is stopped, and the request gets the room."""
    from dynvm.replay.model import VirtualClock
    from dynvm.replay.runner import ReplayOptions, model_engine
    from dynvm.states import LeaseState

    clock = VirtualClock(1000.0)
    options = ReplayOptions(hosts=1, policy="fixed", fixed={"centos": 8})
    with model_engine({"centos", "windows"}, options, clock) as (engine, hosts):
        assert len(engine.ready_pools.tick().started) == 8  # the whole host, all of it being made
        wait_for(lambda: hosts.blocked == 8, timeout=10)  # each waits for its create time
        [lease] = engine.acquire(LeaseRequest("urgent", "windows"))  # 6 CPUs: two must stop
        assert lease.ip
        ended = [x for x in engine.lease_store.ever_pooled() if x.state == LeaseState.FAILED]
        assert len(ended) == 2
        assert all("its room went to a request" in (x.error or "") for x in ended)
        assert hosts.blocked == 6  # the other six are still being made
        assert engine.ready_pools._backoff.waiting("1") == 0  # making way is no failure of the host


def test_the_forecasts_room_per_os_is_what_a_request_of_that_os_could_have() -> None:
    """``_room_by_os`` weighs every OS in one look, each host's room given back once per OS
    whose idle VMs it holds: per OS, it is what ``available_count`` says a request of that
    OS could have (its idle VMs, and the room every other OS's idle VMs give back), and what
    weighing each OS's candidates on their own, as it once did, gave."""
    from dynvm.engine import placement
    from dynvm.replay.hot_paths import _settle
    from dynvm.replay.model import VirtualClock
    from dynvm.replay.runner import ReplayOptions, model_engine

    clock = VirtualClock(1000.0)
    options = ReplayOptions(hosts=3, policy="fixed", fixed={"centos": 5, "windows": 3})
    with model_engine({"centos", "windows", "debian"}, options, clock) as (service, hosts):
        service.ready_pools.tick()
        _settle(service, hosts, clock, 8)
        service.acquire(LeaseRequest("held", "debian", count=4))  # some room taken for good
        service.acquire(LeaseRequest("warm", "centos", count=2))  # and two idle VMs taken off
        settings = service.settings
        oses = settings.os_keys
        room = service.ready_pools._room_by_os(settings, oses, placement.Weigher())
        assert room == {os: service.available_count(os) for os in oses}
        stock, capacity = service.ready_pools.stock, service.capacity
        reserved = capacity.reserved_now()
        idle = [lease for lease in service.lease_store.pooled() if lease.pooled and lease.pooled_at is not None]
        for os in oses:
            mine = {lease.id for lease in idle if lease.os == os}
            alone = stock.give_back_idle(capacity.candidates(settings, os, None, None, reserved), mine, idle)
            assert room[os] == len(mine) + placement.available(alone), os
        # the look met idle VMs of two OSes (each OS's room has the other's given back) and an OS with none
        assert sorted(lease.os for lease in idle) == ["centos"] * 3 + ["windows"] * 3


def test_a_pool_taken_out_of_the_configuration_is_not_taken_from_until_its_vms_are_recycled() -> None:
    """Its idle VMs are like another OS's: a request of its OS is made cold (the pools are
    not even read), the scheduler does not count them as covering a queued request, and
    the next pass recycles them. Every part asks ``ReadyStock.eligible``, so none counts
    on ready VMs another part would not take."""
    from dynvm.replay.hot_paths import _settle
    from dynvm.replay.model import VirtualClock
    from dynvm.replay.runner import ReplayOptions, model_engine
    from dynvm.states import RequestState

    clock = VirtualClock(1000.0)
    options = ReplayOptions(hosts=2, policy="fixed", fixed={"centos": 2})
    with model_engine({"centos", "windows"}, options, clock) as (service, hosts):
        service.ready_pools.tick()
        _settle(service, hosts, clock, 2)
        stock, settings = service.ready_pools.stock, service.settings
        assert stock.eligible(settings, "centos", None, None)
        assert not stock.eligible(settings, "windows", None, None)  # no pool is kept for it
        assert not stock.eligible(settings, "centos", 8, None)  # another size than the template's
        learned = dataclasses.replace(settings.ready_pools, targets={}, sizing="learned")
        assert stock.eligible(dataclasses.replace(settings, ready_pools=learned), "windows", None, None)
        without = dataclasses.replace(settings, ready_pools=dataclasses.replace(settings.ready_pools, targets={}))
        service.ctx.settings = lambda: without
        idle = {lease.id for lease in service.lease_store.pooled()}
        assert len(idle) == 2
        with service.lease_store.db.counting() as count:
            [lease] = service.acquire(LeaseRequest("after", "centos"))
        assert lease.pooled_at is None  # made cold
        assert lease.id not in idle
        assert count.statements == 12  # a cold getservers, which does not read the pools
        record = service.submit(LeaseRequest("waiting", "centos"), 3600, "v1")
        assert not service.scheduler._served_warm(without, record, {})  # not served as if warm
        assert service.request_store.get(record.id).state == RequestState.QUEUED
        service.ready_pools.tick()
        assert {lease.id for lease in service.lease_store.pooled()} & idle == set()  # recycled
