"""dynvm on Xen pools as operators run them (issue 23): a pool written as a section per
member is one pool, counted once; admission counts memory as xapi does; a member that goes
down, maintenance with evacuation, a new master and local SRs each leave dynvm's promises
whole (never over-commit, never lose a lease, never a 500)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from dynvm.api.app import create_app
from dynvm.model import CreateFailed, LeaseRequest, NotEnoughCapacity
from dynvm.sim.control import SimControlClient
from dynvm.xen.inventory import HostState

from .sim.simtools import wait_for
from .test_pools import resident_members as resident


def control(lab) -> SimControlClient:
    node = lab.lab.nodes[0]
    return SimControlClient(lab.lab.control_endpoint.url + "/", node.host.spec.password)


def vcpus_by_member(lab) -> Counter:
    xapi = lab.xapi()
    used: Counter = Counter()
    for r in xapi.VM.get_all_records().values():
        if r["power_state"] == "Running" and not r["is_control_domain"]:
            used[r["resident_on"]] += int(r["VCPUs_at_startup"])
    return used


def test_a_pool_named_by_every_member_is_counted_once(make_services, sim_lab):
    per_member = sim_lab(pool_size=3, host_memory_gib=64, members_in_config=True)
    assert [h.section for h in per_member.settings.hosts] == ["xenhost1", "xenhost2", "xenhost3"]
    services, lab = make_services(lab=per_member)
    masters_only, _ = make_services(lab=sim_lab(pool_size=3, host_memory_gib=64), db="other.db")
    room = services.engine.available_count("centos")
    assert room == masters_only.engine.available_count("centos")
    statuses = services.engine.host_statuses()
    assert statuses["1"].state == "up"
    for ref in ("2", "3"):
        assert statuses[ref].state == "same pool"
        assert statuses[ref].same_pool_as == "1"
        assert "the same pool as xenhost1 (" in statuses[ref].error
    # a fill to the room: every VM starts, no member is over-committed, one more is refused
    leases = services.engine.acquire(LeaseRequest("fill", "centos", count=room))
    assert {lease.host_ref for lease in leases} == {"1"}
    assert max(vcpus_by_member(lab).values()) <= 32
    with pytest.raises(NotEnoughCapacity):
        services.engine.acquire(LeaseRequest("onemore", "centos"))
    # each VM listed once, under the first section; the dashboard counts one host
    client = TestClient(create_app(services))
    summary = client.get("/api/v1/dashboard/overview").json()["summary"]
    assert (summary["hosts"], summary["hosts_up"]) == (1, 1)
    assert [h["same_pool_as"] for h in client.get("/api/v1/hosts").json()] == ["", "1", "1"]
    listed = json.loads(client.get("/showall").text)
    assert sorted(vm["name"] for vm in listed["1"]) == sorted(lease.name for lease in leases)
    assert listed["2"] == []
    assert listed["3"] == []


def test_xhostref_of_a_later_section_of_the_pool_goes_to_the_pool(make_services, sim_lab):
    services, _ = make_services(lab=sim_lab(pool_size=2, members_in_config=True))
    [lease] = services.engine.acquire(LeaseRequest("pinned", "centos", host_ref="2"))
    assert lease.host_ref == "1"
    assert lease.ip


def test_leases_of_a_database_that_counted_each_section_move_to_the_pool(make_services, sim_lab):
    """An upgrade: the old dynvm placed leases on [xenhost2], a member of the pool [xenhost1]
    also names. Reconcile moves them to the pool's section and destroys nothing."""
    lab = sim_lab(pool_size=2, members_in_config=True)
    services, _ = make_services(lab=lab)
    [lease] = services.engine.acquire(LeaseRequest("old", "centos"))
    services.engine.lease_store.rehome("1", "2")  # as the old dynvm had it
    assert services.engine.lease_store.get(lease.id).host_ref == "2"
    report = services.engine.reconcile()
    assert report.orphans_destroyed == []
    assert report.quarantined == []
    moved = services.engine.lease_store.get(lease.id)
    assert moved.host_ref == "1"
    assert moved.state == "ready"
    assert "old" in resident(lab)
    services.engine.release("old")
    assert "old" not in resident(lab)


def test_doctor_says_which_sections_are_one_pool(sim_lab):
    from typer.testing import CliRunner

    from dynvm.cli import build_cli

    lab = sim_lab(pool_size=3, members_in_config=True)
    result = CliRunner().invoke(build_cli(), ["doctor", "--config", str(lab.settings.source)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "[xenhost1], [xenhost2], [xenhost3] name one pool (sim-pool-01): dynvm counts it once, as" in result.output
    assert "3 section(s) fine: 1 pool(s)" in result.output


def test_a_fill_to_the_memory_bound_room_starts_every_vm(make_services):
    # memory-bound: 12 GiB hosts (Xen keeps 0.43, dom0 4): room for one 4 GiB VM per member
    # only when Xen's own overhead is counted; xapi refuses the second, so must dynvm
    services, _ = make_services(pool_size=2, host_memory_gib=12.2)
    room = services.engine.available_count("centos")
    assert room == 2
    leases = services.engine.acquire(LeaseRequest("mem", "centos", count=room))
    assert all(lease.ip for lease in leases)
    with pytest.raises(NotEnoughCapacity):
        services.engine.acquire(LeaseRequest("mem-more", "centos"))


def test_a_member_that_goes_down_gets_no_vm_and_its_release_waits_for_it(make_services):
    services, lab = make_services(pool_size=3, host_memory_gib=16)  # two 4 GiB VMs per member
    leases = services.engine.acquire(LeaseRequest("spread", "centos", count=3))
    on = resident(lab)
    stranded = next(lease for lease in leases if on[lease.name] == "sim-xen-01-h3")
    before = services.engine.available_count("centos")
    control(lab).member_down(2, "refuse")
    wait_for(lambda: not services.inventory.view("1").members[2].live, timeout=5)
    assert services.engine.available_count("centos") == before - 1  # its one free slot is gone
    client = TestClient(create_app(services))
    [member] = [m for m in client.get("/api/v1/hosts").json()[0]["members"] if m["name"] == "sim-xen-01-h3"]
    assert member["live"] is False
    assert member["reason"] == "down: the pool's master has lost touch with it"
    overview = client.get("/api/v1/dashboard/overview").json()
    assert overview["hosts"][0]["members_out"] == [{"name": "sim-xen-01-h3", "reason": member["reason"]}]
    answer = client.get(f"/releaseservers/{stranded.name}")  # a sentence, never a 500
    assert answer.status_code == 502
    assert answer.text.startswith("Error: ")
    assert stranded.name in answer.text
    assert "HOST_OFFLINE" in answer.text
    [other] = [lease for lease in leases if lease is not stranded][:1]
    assert client.get(f"/releaseservers/{other.name}").status_code == 200
    control(lab).member_up(2)
    wait_for(lambda: services.inventory.view("1").members[2].live, timeout=5)
    services.engine.recover()  # the leader retries failed releases (with each reconcile)
    wait_for(lambda: stranded.name not in resident(lab), timeout=10)
    assert services.engine.lease_store.get(stranded.id).state == "released"


GIB = 1 << 30


def member_named(xapi, name: str) -> str:
    return next(h for h in xapi.host.get_all() if xapi.host.get_name_label(h) == name)


def test_a_retried_start_stays_on_the_member_its_room_was_reserved_on(make_services):
    """The soak's over-commit: a start that failed once (a bootloader hiccup) was retried with
    ``VM.start``, and xapi chose the member with most free memory, whose CPUs were full."""
    services, lab = make_services(pool_size=2, host_cpus=4, host_memory_gib=64)
    [cpu_full] = services.engine.acquire(LeaseRequest("cpu-full", "centos", cpus=4, memory=GIB))
    [memory_heavy] = services.engine.acquire(LeaseRequest("mem-heavy", "centos", cpus=1, memory=30 * GIB))
    assert cpu_full.member != memory_heavy.member  # the first member's CPUs are all taken
    control(lab).fail_next("start", "BOOTLOADER_FAILED")
    [retried] = services.engine.acquire(LeaseRequest("retried", "centos", cpus=1, memory=GIB))
    assert retried.member == memory_heavy.member
    xapi = lab.xapi()
    assert resident(lab)["retried"] == xapi.host.get_name_label(memory_heavy.member)
    assert max(vcpus_by_member(lab).values()) <= 4


def while_cloning(services, lab, name: str, action, **request: object) -> dict[str, object]:
    """Ask for one VM in a thread; once its lease is placed (its clone takes 1.5 s), run
    ``action(placed lease)``, as an admin working on the pool meanwhile would."""
    control(lab).set_timing({"clone_seconds": 1.5})
    outcome: dict[str, object] = {}

    def ask() -> None:
        try:
            outcome["leases"] = services.engine.acquire(LeaseRequest(name, "centos", **request))
        except Exception as e:  # the test reads it
            outcome["error"] = e

    thread = threading.Thread(target=ask)
    thread.start()
    [placed] = wait_for(lambda: services.engine.lease_store.by_name([name]), timeout=5)
    action(placed)
    thread.join(timeout=30)
    control(lab).set_timing({"clone_seconds": 0})
    return outcome


def start_while_member_is_disabled(services, lab, name: str, member_name: str) -> dict[str, object]:
    """Disable the member the VM was placed on while it is cloned (maintenance begins)."""
    xapi = lab.xapi()

    def disable(placed) -> None:
        assert xapi.host.get_name_label(placed.member) == member_name
        xapi.host.disable(placed.member)

    return while_cloning(services, lab, name, disable)


def test_a_vm_migrated_onto_the_member_before_the_start_sends_the_new_vm_elsewhere(make_services):
    """xapi admits a start on memory only: CPUs an admin's migration took since placement
    are seen at the start, and the VM is placed again."""
    services, lab = make_services(pool_size=2, host_cpus=4, host_memory_gib=64)
    [big] = services.engine.acquire(LeaseRequest("big", "centos", cpus=4, memory=GIB))
    xapi = lab.xapi()

    def migrate_big_there(placed) -> None:
        assert placed.member != big.member
        xapi.VM.pool_migrate(big.vm_ref, placed.member, {})

    outcome = while_cloning(services, lab, "after", migrate_big_there, cpus=2, memory=GIB)
    [lease] = outcome["leases"]
    assert lease.member == big.member  # where big was: the only member with its CPUs free
    assert max(vcpus_by_member(lab).values()) <= 4


def test_a_member_disabled_before_its_vm_starts_sends_the_vm_to_another(make_services):
    services, lab = make_services(pool_size=2)
    services.engine.acquire(LeaseRequest("first", "centos"))  # so the next goes to the second member
    outcome = start_while_member_is_disabled(services, lab, "moved", "sim-xen-01-h2")
    [lease] = outcome["leases"]
    assert lease.ip
    assert resident(lab)["moved"] == "sim-xen-01"
    assert lab.xapi().host.get_name_label(lease.member) == "sim-xen-01"
    assert services.engine.lease_store.get(lease.id).member == lease.member


def test_a_member_disabled_before_its_vm_starts_with_no_room_elsewhere_fails_cleanly(make_services):
    # 12.2 GiB members hold one 4 GiB VM each
    services, lab = make_services(pool_size=2, host_memory_gib=12.2)
    services.engine.acquire(LeaseRequest("first", "centos"))
    before = lab.inventory_of()
    outcome = start_while_member_is_disabled(services, lab, "stuck", "sim-xen-01-h2")
    error = outcome["error"]
    assert isinstance(error, CreateFailed)
    assert "HOST_DISABLED" in str(error)
    assert "no other member has room" in str(error)
    assert lab.inventory_of() == before  # nothing left behind
    assert "stuck" not in resident(lab)


def test_evacuation_moves_leases_with_their_vms(make_services):
    services, lab = make_services(pool_size=2)
    leases = services.engine.acquire(LeaseRequest("maint", "centos", count=2))
    xapi = lab.xapi()
    member = next(h for h in xapi.host.get_all() if xapi.host.get_name_label(h) == "sim-xen-01-h2")
    xapi.host.disable(member)
    wait_for(lambda: not services.inventory.view("1").members[1].enabled, timeout=5)
    more = services.engine.acquire(LeaseRequest("during", "centos", count=2))
    assert all(resident(lab)[lease.name] == "sim-xen-01" for lease in more)  # none on the disabled member
    xapi.host.evacuate(member)
    wait_for(lambda: set(resident(lab).values()) == {"sim-xen-01"}, timeout=5)
    wait_for(lambda: {m.member for m in services.engine.machines()["1"]} == {"sim-xen-01"}, timeout=5)
    view = services.inventory.view("1")
    master_vms = [vm for vm in view.running_vms if vm.resident_on == view.members[0].ref]
    assert len(master_vms) == 4  # counted where they run now
    services.engine.extend(leases[0].name, 30)
    outcome = services.engine.release("maint", count=2)
    assert sorted(outcome.released) == ["maint1", "maint2"]


def test_a_new_master_is_followed_without_a_restart(make_services):
    services, lab = make_services(pool_size=3)
    [first] = services.engine.acquire(LeaseRequest("before", "centos"))
    xapi = lab.xapi()
    h2 = next(h for h in xapi.host.get_all() if xapi.host.get_name_label(h) == "sim-xen-01-h2")
    xapi.pool.designate_new_master(h2)
    [second] = services.engine.acquire(LeaseRequest("after", "centos"))  # via HOST_IS_SLAVE from 127.0.0.1
    assert second.ip
    services.engine.release("before")
    assert first.name not in resident_via(lab, "127.0.0.2")


def resident_via(lab, address: str) -> dict[str, str]:
    import XenAPI

    host = lab.settings.hosts[0]
    session = XenAPI.Session(host.url.replace("127.0.0.1", address))
    session.xenapi.login_with_password(host.user, host.password.reveal(), "2.21", "test")
    xapi = session.xenapi
    return {r["name_label"]: r["power_state"] for r in xapi.VM.get_all_records().values()}


def test_the_master_gone_and_an_emergency_transition_dynvm_finds_the_new_master(make_services):
    services, lab = make_services(pool_size=3)
    [before] = services.engine.acquire(LeaseRequest("before", "centos"))
    control(lab).member_down(0, "refuse")  # the master, which the config names
    wait_for(lambda: services.inventory.view("1").state is not HostState.UP, timeout=10)
    member = lab.lab.members[1][0]
    import xmlrpc.client

    import XenAPI

    raw = xmlrpc.client.ServerProxy(member.url)
    local = XenAPI.Session(member.url)
    local._session = raw.session.slave_local_login_with_password("root", lab.settings.hosts[0].password.reveal())[
        "Value"
    ]
    local.xenapi.pool.emergency_transition_to_master()
    wait_for(lambda: services.inventory.view("1").state is HostState.UP, timeout=15)
    [after] = services.engine.acquire(LeaseRequest("after", "centos"))
    assert after.ip
    assert before.name in resident_via(lab, "127.0.0.2")
    services.engine.release("before")


def test_local_srs_put_each_vms_disk_where_it_starts(make_services):
    services, lab = make_services(pool_size=2, storage="local")
    leases = services.engine.acquire(LeaseRequest("local", "centos", count=4))
    on = resident(lab)
    assert {on[lease.name] for lease in leases} == {"sim-xen-01", "sim-xen-01-h2"}
    xapi = lab.xapi()
    hosts = {ref: r["name_label"] for ref, r in xapi.host.get_all_records().items()}
    for record in xapi.VM.get_all_records().values():
        if record["is_control_domain"] or record["is_a_template"]:
            continue
        for vbd in record["VBDs"]:
            vdi = xapi.VBD.get_VDI(vbd)
            if vdi == "OpaqueRef:NULL" or xapi.VBD.get_type(vbd) != "Disk":
                continue
            [pbd] = xapi.SR.get_PBDs(xapi.VDI.get_SR(vdi))
            assert hosts[xapi.PBD.get_host(pbd)] == on[record["name_label"]]


def test_a_restart_while_the_first_section_is_down_destroys_no_leased_vm(make_services, sim_lab):
    """After a master hand-over, the first section's address (the old master) goes down and
    dynvm restarts: the pool is now counted under the next section, which finds VMs whose
    leases say host 1. Those are the same pool's, and nothing of them is destroyed."""
    lab = sim_lab(pool_size=3, members_in_config=True)
    services, _ = make_services(lab=lab)
    leases = services.engine.acquire(LeaseRequest("keep", "centos", count=3))
    assert {lease.host_ref for lease in leases} == {"1"}
    xapi = lab.xapi()
    h2 = next(h for h in xapi.host.get_all() if xapi.host.get_name_label(h) == "sim-xen-01-h2")
    xapi.pool.designate_new_master(h2)
    services.stop()
    control(lab).member_down(0, "refuse")
    restarted, _ = make_services(lab=lab)  # the same database
    assert restarted.engine.host_statuses()["2"].state == "up"  # it counts the pool now
    report = restarted.engine.reconcile(startup=True)
    assert report.orphans_destroyed == []
    assert [restarted.engine.lease_store.get(lease.id).state for lease in leases] == ["ready"] * 3
    on_host = resident_via(lab, "127.0.0.2")
    assert all(on_host.get(lease.name) == "Running" for lease in leases)


def test_a_member_address_now_in_another_pool_is_never_used(sim_lab):
    """Pool 1 answers nowhere; the member address dynvm remembers for it now answers as
    another pool, with the same credentials (an address reused after a reinstall). A
    session there would count pool 2 as pool 1: the pool's uuid check refuses it."""
    from dynvm.model import HostUnreachable
    from dynvm.xen.session import open_session

    lab = sim_lab(hosts=2)
    first, second = lab.settings.hosts
    pool_one = lab.xapi(0).pool.get_all_records()
    [uuid_one] = [p["uuid"] for p in pool_one.values()]
    lab.lab.nodes[1].host.spec.password = first.password.reveal()  # the same root password
    control(lab).host_down("refuse")  # pool 1 answers nowhere ...
    wait_for(lambda: refuses(first.url), timeout=10)  # ... once its listener has closed
    stale = second.url.split("://", 1)[1]  # "127.0.0.1:<pool 2's port>": remembered for pool 1
    with pytest.raises(HostUnreachable):
        open_session(first, 2.0, members=[stale], pool_uuid=uuid_one)
    session, _ = open_session(first, 2.0, members=[stale])  # with no pool to check, it would be used
    [found] = session.xenapi.pool.get_all_records().values()
    assert found["uuid"] != uuid_one


def test_a_ready_vm_on_a_member_the_master_lost_is_never_handed_out(make_services, sim_lab):
    from .engine.test_ready_pools import fill, vm_records, with_pools

    lab = with_pools(sim_lab, "centos.ready=2", pool_size=2, host_memory_gib=12.2)  # one VM per member
    services, _ = make_services(lab=lab)
    fill(services)
    members = {record["name_label"]: record["resident_on"] for record in vm_records(lab).values()}
    assert len(set(members.values())) == 2  # one ready VM on each member
    xapi = lab.xapi()
    h2 = next(h for h in xapi.host.get_all() if xapi.host.get_name_label(h) == "sim-xen-01-h2")
    on_h2 = {lease.vm_uuid for lease in services.engine.lease_store.pooled()} & {
        xapi.VM.get_uuid(vm) for vm in xapi.host.get_resident_VMs(h2) if not xapi.VM.get_is_control_domain(vm)
    }
    control(lab).member_down(1, "refuse")
    wait_for(lambda: not services.inventory.view("1").members[1].live, timeout=5)
    leases = []
    for n in range(2):  # the one on the lost member is not taken, warm or otherwise
        with contextlib.suppress(NotEnoughCapacity, CreateFailed):
            leases += services.engine.acquire(LeaseRequest(f"warm{n}", "centos"))
    assert leases
    assert not {lease.vm_uuid for lease in leases} & on_h2


def refuses(url: str) -> bool:
    """Whether a TCP connection to the URL's address is refused."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=0.5).close()
    except OSError:
        return True
    return False
