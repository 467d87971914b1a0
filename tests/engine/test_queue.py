"""The durable queue against simulated hosts and a real SQLite file: waiting, position and
ETA, fairness, backfilling, cancel, time-outs, and what a restart keeps."""

from __future__ import annotations

import pytest

from dynvm.model import LeaseRequest, NotEnoughCapacity, RequestCancelled
from dynvm.sim.settings import Timing
from dynvm.states import RequestState

from ..conftest import FakeClock
from ..sim.simtools import wait_for

# 8 host CPUs: room for two 4-vCPU CentOS VMs
SMALL = {"host_cpus": 8}


def dynvm_vm_names(lab) -> list[str]:
    from dynvm.xen.marker import MARKER_KEY

    records = lab.xapi().VM.get_all_records().values()
    return sorted(r["name_label"] for r in records if MARKER_KEY in r["other_config"])


def state_of(services, request_id: str) -> str:
    return services.engine.request_store.get(request_id).state


def test_a_request_that_does_not_fit_waits_its_turn_and_is_served_when_room_frees(make_services):
    services, _ = make_services(**SMALL)
    engine = services.engine
    engine.acquire(LeaseRequest("holder", "centos", count=2))
    queued = engine.submit(LeaseRequest("waiter", "centos"), wait_seconds=600)
    engine.scheduler.run_pass()
    record = engine.request_store.get(queued.id)
    assert record.state == RequestState.QUEUED
    assert record.position == 1
    assert record.eta_at is not None  # from the holders' expiry: dynvm knows when room comes back
    status = record.as_dict(engine.clock())
    assert status["eta"].endswith("Z")
    assert status["eta_seconds"] > 0
    engine.release("holder", 2)
    wait_for(lambda: state_of(services, queued.id) == "ready", timeout=20)
    [lease] = engine.leases_of(queued.id)
    assert lease.name == "waiter"
    assert lease.ip
    assert lease.handed_over_at is not None


def test_without_wait_a_shortage_is_still_refused_at_once(make_services):
    services, _ = make_services(**SMALL)
    services.engine.acquire(LeaseRequest("holder", "centos", count=2))
    with pytest.raises(NotEnoughCapacity, match="0 can be made now"):
        services.engine.acquire(LeaseRequest("impatient", "centos"))


def test_a_request_that_does_not_wait_may_not_take_the_room_the_queue_head_waits_for(make_services):
    services, _ = make_services(**SMALL)
    engine = services.engine
    engine.acquire(LeaseRequest("holder", "centos"))  # one of two slots left
    head = engine.submit(LeaseRequest("pair", "centos", count=2), wait_seconds=600)  # needs both
    engine.scheduler.run_pass()
    assert state_of(services, head.id) == RequestState.QUEUED
    with pytest.raises(NotEnoughCapacity, match="wait in the queue"):
        engine.acquire(LeaseRequest("jumper", "centos"))  # it fits, but the pair would wait longer
    engine.release("holder")
    wait_for(lambda: state_of(services, head.id) == "ready", timeout=20)


def test_a_small_request_is_backfilled_when_it_does_not_delay_the_head(make_services):
    # two hosts of 8 CPUs; the head is pinned to host 1, which is full: host 2's room is
    # of no use to it, so a small request may take it now
    services, _ = make_services(hosts=2, **SMALL)
    engine = services.engine
    engine.acquire(LeaseRequest("fill", "centos", count=2, host_ref="1"))
    head = engine.submit(LeaseRequest("pinned", "centos", host_ref="1"), wait_seconds=600)
    small = engine.submit(LeaseRequest("small", "centos"), wait_seconds=600)
    engine.scheduler.run_pass()
    assert state_of(services, head.id) == RequestState.QUEUED
    wait_for(lambda: state_of(services, small.id) == "ready", timeout=20)
    assert engine.leases_of(small.id)[0].host_ref == "2"


def test_one_users_flood_does_not_starve_anothers_single_request(make_services):
    services, _ = make_services(**SMALL)
    engine = services.engine
    engine.acquire(LeaseRequest("holder", "centos", count=2))
    flood = [engine.submit(LeaseRequest(f"flood{i}x", "centos", caller="alice"), 600) for i in range(20)]
    lone = engine.submit(LeaseRequest("lone", "centos", caller="bob"), 600)
    engine.scheduler.run_pass()
    assert engine.request_store.get(lone.id).position == 2  # after the flood's first, not its twentieth
    engine.release_names(["holder1"])  # one slot: the flood's oldest has it
    wait_for(lambda: state_of(services, flood[0].id) == "ready", timeout=20)
    engine.scheduler.run_pass()
    # alice's next request is older than bob's, but alice was just served: bob's turn
    assert engine.request_store.get(lone.id).position == 1
    engine.release_names(["holder2"])
    wait_for(lambda: state_of(services, lone.id) == "ready", timeout=20)
    assert all(state_of(services, r.id) == RequestState.QUEUED for r in flood[1:])


def test_a_queued_request_that_is_cancelled_is_never_served(make_services):
    services, lab = make_services(**SMALL)
    engine = services.engine
    engine.acquire(LeaseRequest("holder", "centos", count=2))
    queued = engine.submit(LeaseRequest("changed-mind", "centos"), 600)
    assert engine.cancel(queued.id).state == RequestState.CANCELLED
    engine.release("holder", 2)
    engine.scheduler.run_pass()
    assert state_of(services, queued.id) == RequestState.CANCELLED
    assert dynvm_vm_names(lab) == []


def test_a_cancel_while_creating_removes_what_was_built(make_services):
    services, lab = make_services(timing=Timing(boot_seconds=2.0))
    engine = services.engine
    request = engine.submit(LeaseRequest("slow", "centos", count=2), 600)
    wait_for(lambda: state_of(services, request.id) == "creating", timeout=10)
    wait_for(lambda: dynvm_vm_names(lab), timeout=10)
    engine.cancel(request.id)
    wait_for(lambda: state_of(services, request.id) == RequestState.CANCELLED, timeout=30)
    assert engine.lease_store.active() == []
    wait_for(lambda: dynvm_vm_names(lab) == [], timeout=10)
    with pytest.raises(RequestCancelled.__mro__[1]):  # a ready request cannot be cancelled; nor one gone
        engine.cancel("no-such-request")


def test_a_cancel_that_loses_to_the_hand_over_leaves_the_vms_with_their_request(make_services):
    services, lab = make_services()
    engine = services.engine
    request = engine.submit(LeaseRequest("quick", "centos"), 600)
    wait_for(lambda: state_of(services, request.id) == "ready", timeout=20)
    from dynvm.model import NameInUse

    with pytest.raises(NameInUse, match="release them instead"):
        engine.cancel(request.id)
    assert dynvm_vm_names(lab) == ["quick"]  # handed over, and nothing else touched it


def test_a_request_still_queued_at_its_deadline_times_out(make_services):
    clock = FakeClock()
    services, _ = make_services(clock=clock, **SMALL)
    engine = services.engine
    engine.acquire(LeaseRequest("holder", "centos", count=2))
    queued = engine.submit(LeaseRequest("late", "centos"), wait_seconds=60)
    engine.scheduler.run_pass()
    clock.advance(30)
    scrape = services.metrics.exposition().decode()
    assert 'dynvm_queue_length{os="centos"} 1.0' in scrape
    assert 'dynvm_queue_oldest_wait_seconds{os="centos"} 30.0' in scrape
    clock.advance(31)
    engine.scheduler.run_pass()
    record = engine.request_store.get(queued.id)
    assert record.state == "timed out"
    assert "after waiting 1.0 minute(s)" in record.error
    assert "number 1 in the queue" in record.error
    assert record.error_status == 429
    assert 'dynvm_requests_ended_total{state="timed out"} 1.0' in services.metrics.exposition().decode()


def test_a_request_that_can_never_fit_is_refused_instead_of_queued(make_services):
    services, _ = make_services(**SMALL)
    with pytest.raises(NotEnoughCapacity, match="can never be served at once"):
        services.engine.submit(LeaseRequest("greedy", "centos", count=3), wait_seconds=600)


def test_queued_requests_survive_a_restart_and_keep_their_order(make_services, sim_lab, tmp_path):
    lab = sim_lab(**SMALL)
    first, _ = make_services(lab=lab, db="kept.db")
    first.engine.acquire(LeaseRequest("holder", "centos", count=2))
    a = first.engine.submit(LeaseRequest("first", "centos"), 600)
    b = first.engine.submit(LeaseRequest("second", "centos", caller="bob"), 600)
    first.engine.scheduler.run_pass()
    first.stop()
    second, _ = make_services(lab=lab, db="kept.db")
    assert [second.engine.request_store.get(r.id).state for r in (a, b)] == [RequestState.QUEUED, RequestState.QUEUED]
    second.engine.release_names(["holder1"])  # one slot: the older request gets it
    wait_for(lambda: state_of(second, a.id) == "ready", timeout=20)
    assert state_of(second, b.id) == RequestState.QUEUED
    second.engine.release_names(["holder2"])
    wait_for(lambda: state_of(second, b.id) == "ready", timeout=20)


def test_a_request_pinned_to_a_host_that_goes_down_waits_for_it_and_is_served_when_it_is_back(make_services):
    services, lab = make_services(hosts=2, **SMALL)
    engine = services.engine
    engine.acquire(LeaseRequest("fill", "centos", count=2, host_ref="1"))
    pinned = engine.submit(LeaseRequest("pinned", "centos", host_ref="1"), 600)
    engine.scheduler.run_pass()
    assert engine.request_store.get(pinned.id).eta_at is not None
    lab.control(0).host_down("refuse")
    wait_for(lambda: services.inventory.view("1").state.value == "down", timeout=20)
    engine.scheduler.run_pass()
    record = engine.request_store.get(pinned.id)
    assert record.state == RequestState.QUEUED  # not refused: the host may come back
    assert record.eta_at is None  # and no ETA is made up meanwhile
    lab.control(0).host_up()
    wait_for(lambda: services.inventory.view("1").state.value == "up", timeout=30)
    engine.release_names(["fill1"])
    wait_for(lambda: state_of(services, pinned.id) == "ready", timeout=30)
    assert engine.leases_of(pinned.id)[0].host_ref == "1"


def test_stopping_cancels_the_legacy_requests_queued_here_and_keeps_the_v1_ones(make_services, sim_lab):
    lab = sim_lab(**SMALL)
    first, _ = make_services(lab=lab, db="stop.db")
    first.engine.acquire(LeaseRequest("holder", "centos", count=2))
    legacy = first.engine.submit(LeaseRequest("legacy", "centos"), 600, origin="legacy")
    v1 = first.engine.submit(LeaseRequest("v1", "centos"), 600, origin="v1")
    first.stop()
    second, _ = make_services(lab=lab, db="stop.db")
    assert state_of(second, legacy.id) == RequestState.CANCELLED  # its caller's connection ended with the process
    assert state_of(second, v1.id) == RequestState.QUEUED  # read by id: it is still served


def test_a_request_whose_builder_died_goes_back_to_the_queue_while_its_caller_waits(make_services):
    import dataclasses

    from dynvm.states import RequestState

    services, _ = make_services(**SMALL)
    engine = services.engine
    now = engine.clock()
    base = engine.request_store.get(engine.submit(LeaseRequest("template-row", "centos"), 600).id)
    rows = {
        # its caller waits on this (live) process: queued again
        "waited-on-here": dataclasses.replace(base, id="r1", origin="legacy", owner=engine.owner),
        # its caller's process died too: nobody to answer
        "caller-gone": dataclasses.replace(base, id="r2", origin="legacy", owner="gone#1"),
        # read by id: queued again
        "v1": dataclasses.replace(base, id="r3", origin="v1", owner="gone#1"),
        # did not wait at all: failed
        "immediate": dataclasses.replace(base, id="r4", origin="legacy", owner=engine.owner, wait_until=None),
    }
    for record in rows.values():
        engine.request_store.insert(
            dataclasses.replace(record, state=RequestState.CREATING, builder="gone#2", created_at=now)
        )
    engine.recover()
    states = {name: state_of(services, record.id) for name, record in rows.items()}
    assert states["waited-on-here"] == RequestState.QUEUED
    assert states["v1"] == RequestState.QUEUED
    assert states["caller-gone"] == "failed"
    assert states["immediate"] == "failed"


def test_the_eta_of_requests_queued_behind_leases_that_expire_is_within_a_fifth_of_the_wait(make_services):
    """Issue 27: on a full host whose leases end by expiry 40 s and 80 s ahead, the two
    requests queued behind them were told 101 s and 145 s and served after 42 s and 84 s:
    a create time of 65 s this lab does not have. The ETA uses the lab's own create time
    (learned from the VMs it made, ended or not), and its error is measured and shown."""
    clock = FakeClock(1_000_000.0)
    services, _ = make_services(clock=clock, **SMALL)
    engine = services.engine
    engine.acquire(LeaseRequest("soon", "centos", expires_in_minutes=40 / 60))
    engine.acquire(LeaseRequest("later", "centos", expires_in_minutes=80 / 60))
    first = engine.submit(LeaseRequest("first", "centos"), 600)
    clock.advance(1)  # queued a second apart: the queue's order is theirs
    second = engine.submit(LeaseRequest("second", "centos"), 600)
    engine.scheduler.run_pass()
    told = {r.id: engine.request_store.get(r.id).eta_first - r.created_at for r in (first, second)}
    for at, record in ((40, first), (80, second)):
        clock.advance(at - (clock() - 1_000_000.0))
        engine.expire_due()
        wait_for(lambda r=record: (engine.scheduler.run_pass(), state_of(services, r.id))[1] == "ready", timeout=20)
    for record in (first, second):
        served = engine.request_store.get(record.id)
        waited = served.finished_at - served.created_at
        assert abs(told[record.id] - waited) <= 0.2 * waited, (told[record.id], waited)
    accuracy = engine.eta_accuracy()
    assert accuracy.samples == 2
    assert accuracy.p90 is not None
    assert accuracy.p90 <= 0.2


def test_the_soak_tells_its_429s_apart_by_what_dynvm_says(make_services):
    """The soak counts its 429s by why (``bench.soak.why_refused``): the hosts full, the
    queue's head first, or a wait that ran out. It reads the words the engine says."""
    from bench.soak import why_refused

    clock = FakeClock()
    services, _ = make_services(clock=clock, **SMALL)
    engine = services.engine
    engine.acquire(LeaseRequest("holder", "centos", count=2))
    with pytest.raises(NotEnoughCapacity) as full:
        engine.acquire(LeaseRequest("more", "centos"))
    assert why_refused(str(full.value)) == "the hosts were full"
    head = engine.submit(LeaseRequest("head", "centos", count=2), wait_seconds=60)
    engine.release_names(["holder2"])  # room for one: the head needs two, and comes first
    with pytest.raises(NotEnoughCapacity) as behind:
        engine.acquire(LeaseRequest("pushy", "centos"))
    assert why_refused(str(behind.value)) == "queued requests come first"
    clock.advance(61)
    engine.scheduler.run_pass()
    record = engine.request_store.get(head.id)
    assert record.state == "timed out"
    assert why_refused(record.error) == "waited its wait= and no room came"
