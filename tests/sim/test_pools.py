"""Pools of several hosts (``--pool-size``): one database on the master, a host record per
member, a shared SR, logins on a member refused with ``HOST_IS_SLAVE``, and VMs placed on
members by ``VM.start`` or ``VM.start_on``, with memory admitted per member."""

from __future__ import annotations

import pytest
import XenAPI

from dynvm.sim.catalogue import GiB

from .simtools import login, new_vm


@pytest.fixture
def pool(make_lab):
    return make_lab(pool_size=3)


def test_a_pool_has_a_host_record_per_member_and_one_master(pool):
    xapi = login(pool.nodes[0]).xenapi
    hosts = xapi.host.get_all_records()
    assert sorted(h["name_label"] for h in hosts.values()) == ["sim-xen-01", "sim-xen-01-h2", "sim-xen-01-h3"]
    [pool_ref] = xapi.pool.get_all()
    assert xapi.host.get_name_label(xapi.pool.get_master(pool_ref)) == "sim-xen-01"
    assert xapi.pool.get_name_label(pool_ref) == "sim-pool-01"
    for ref, host in hosts.items():
        dom0 = host["control_domain"]
        assert xapi.VM.get_resident_on(dom0) == ref
        assert xapi.VM.get_is_control_domain(dom0)
        assert len(host["host_CPUs"]) == 32
        assert len(host["PIFs"]) == 1
        assert int(xapi.host_metrics.get_memory_total(host["metrics"])) == 128 * GiB


def test_the_pools_sr_is_shared_with_a_pbd_on_every_member(pool):
    xapi = login(pool.nodes[0]).xenapi
    [sr] = xapi.SR.get_by_name_label("Local Storage 01")
    record = xapi.SR.get_record(sr)
    assert record["shared"] is True
    assert record["type"] == "lvmohba"
    assert {xapi.PBD.get_host(p) for p in record["PBDs"]} == set(xapi.host.get_all())
    assert xapi.pool.get_default_SR(xapi.pool.get_all()[0]) == sr


def test_a_login_on_a_member_is_refused_with_the_masters_address(pool):
    member = pool.members[1][0]
    session = XenAPI.Session(member.url)
    with pytest.raises(XenAPI.Failure) as failure:
        session.xenapi.login_with_password("root", pool.nodes[0].host.spec.password, "2.21", "test")
    # a bare address, as xapi sends it: the members share the pool's port
    assert failure.value.details == ["HOST_IS_SLAVE", "127.0.0.1"]
    assert member.url == pool.nodes[0].url.replace("127.0.0.1", "127.0.0.2")
    # a session from the master is honoured on a member, as a member forwards calls
    master = login(pool.nodes[0])
    on_member = XenAPI.Session(member.url)
    on_member._session = master._session
    assert len(on_member.xenapi.host.get_all()) == 3


def test_vm_start_places_on_the_member_with_most_free_memory(pool):
    xapi = login(pool.nodes[0]).xenapi
    first = new_vm(xapi, "one", start=True)
    second = new_vm(xapi, "two", start=True)
    third = new_vm(xapi, "three", start=True)
    hosts = [xapi.VM.get_resident_on(vm) for vm in (first, second, third)]
    assert len(set(hosts)) == 3  # each went where the most memory was left
    for vm, host in zip((first, second, third), hosts, strict=True):
        free = int(xapi.host_metrics.get_memory_free(xapi.host.get_metrics(host)))
        needed = int(xapi.VM.get_memory_static_max(vm)) + int(xapi.VM.get_memory_overhead(vm))
        overhead = int(xapi.host.get_memory_overhead(host))
        assert 4 * GiB < overhead < 5 * GiB  # Xen's own share, as a real 128 GiB host reports
        assert free == 128 * GiB - overhead - 4 * GiB - needed
        assert xapi.host.compute_free_memory(host) == str(free)


def test_vm_start_on_uses_that_member_only(pool):
    xapi = login(pool.nodes[0]).xenapi
    member = next(h for h in xapi.host.get_all() if xapi.host.get_name_label(h) == "sim-xen-01-h3")
    vms = [new_vm(xapi, f"pinned{i}") for i in range(2)]
    for vm in vms:
        xapi.VM.start_on(vm, member, False, False)
    assert {xapi.VM.get_resident_on(vm) for vm in vms} == {member}
    assert set(xapi.host.get_resident_VMs(member)) >= set(vms)


def test_vm_start_on_refuses_a_member_without_room_and_a_ref_that_is_no_host(make_lab):
    pool = make_lab(pool_size=2, host_memory_gib=9)  # 5 GiB free per member: one 4 GiB VM each
    xapi = login(pool.nodes[0]).xenapi
    member = xapi.pool.get_master(xapi.pool.get_all()[0])
    xapi.VM.start_on(new_vm(xapi, "a"), member, False, False)
    second = new_vm(xapi, "b")
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.start_on(second, member, False, False)
    assert failure.value.details[0] == "HOST_NOT_ENOUGH_FREE_MEMORY"
    assert failure.value.details[2] == xapi.host.compute_free_memory(member)
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.start_on(second, "OpaqueRef:00000000-0000-0000-0000-000000000000", False, False)
    assert failure.value.details[0] == "HANDLE_INVALID"
    xapi.VM.start(second, False, False)  # xapi finds the other member
    assert xapi.VM.get_resident_on(second) != member


def test_a_full_pool_answers_no_hosts_available(make_lab):
    pool = make_lab(pool_size=2, host_memory_gib=9)
    xapi = login(pool.nodes[0]).xenapi
    new_vm(xapi, "a", start=True)
    new_vm(xapi, "b", start=True)
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.start(new_vm(xapi, "c"), False, False)
    assert failure.value.details == ["NO_HOSTS_AVAILABLE"]


def test_vm_start_honours_affinity_when_the_vm_fits(pool):
    xapi = login(pool.nodes[0]).xenapi
    member = next(h for h in xapi.host.get_all() if xapi.host.get_name_label(h) == "sim-xen-01-h2")
    vms = [new_vm(xapi, f"aff{i}") for i in range(3)]
    for vm in vms:
        xapi.VM.set_affinity(vm, member)
        xapi.VM.start(vm, False, False)
    assert {xapi.VM.get_resident_on(vm) for vm in vms} == {member}


def test_the_lab_config_names_each_pools_master_once(pool, tmp_path):
    from dynvm.config import load_settings

    path = tmp_path / "lab.ini"
    pool.write_config(path)
    text = path.read_text()
    assert text.count("[xenhost") == 1
    assert "its other members answer on" in text
    [host] = load_settings(path).hosts
    assert host.url == pool.nodes[0].url
