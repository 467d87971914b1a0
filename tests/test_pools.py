"""dynvm on XenServer pools of several hosts (``dynvm sim --pool-size``): a member in
``host.name`` leads to the master, capacity is counted per member, each VM is started on
the member its room was reserved on, and the API shows the members."""

from __future__ import annotations

import pytest

from dynvm.model import LeaseRequest, NotEnoughCapacity
from dynvm.xen.inventory import HostState

from .sim.simtools import wait_for


def resident_members(lab) -> dict[str, str]:
    """VM name -> the name of the member it runs on, as the host itself says."""
    xapi = lab.xapi()
    names = {ref: rec["name_label"] for ref, rec in xapi.host.get_all_records().items()}
    return {
        r["name_label"]: names[r["resident_on"]]
        for r in xapi.VM.get_all_records().values()
        if r["power_state"] == "Running" and not r["is_control_domain"]
    }


def test_a_member_in_host_name_leads_dynvm_to_the_master(sim_lab, make_services, tmp_path):
    lab = sim_lab(pool_size=3)
    member_url = lab.lab.members[1][1].url
    path = tmp_path / "via-member.ini"
    path.write_text(lab.settings.source.read_text().replace(lab.lab.nodes[0].url, member_url))
    from dynvm.config import load_settings

    via_member = type(lab)(lab.lab, load_settings(path))
    assert via_member.settings.hosts[0].url == member_url
    services, _ = make_services(lab=via_member)
    view = services.inventory.view("1")
    assert view.state is HostState.UP
    assert [m.name for m in view.members] == ["sim-xen-01", "sim-xen-01-h2", "sim-xen-01-h3"]
    assert view.members[0].master
    [lease] = services.engine.acquire(LeaseRequest("via-member", "centos"))
    assert lease.state == "ready"
    assert lease.ip


def test_capacity_is_counted_per_member_not_summed_over_the_pool(make_services):
    # 10 GiB per host, 4 of them dom0's: 6 GiB free on each member holds one 4 GiB CentOS
    # VM (plus its overhead), not one and a half; a summed pool would promise four
    services, lab = make_services(pool_size=3, host_memory_gib=10)
    assert services.engine.available_count("centos") == 3
    leases = services.engine.acquire(LeaseRequest("spread", "centos", count=3))
    on = resident_members(lab)
    assert sorted(on[lease.name] for lease in leases) == ["sim-xen-01", "sim-xen-01-h2", "sim-xen-01-h3"]
    view = services.inventory.view("1")
    for lease in leases:  # each started where its room was reserved (VM.start_on)
        assert view.member(lease.member).name == on[lease.name]
    wait_for(lambda: services.engine.available_count("centos") == 0, timeout=5)
    with pytest.raises(NotEnoughCapacity, match="0 can be made now"):
        services.engine.acquire(LeaseRequest("more", "centos"))


def test_vms_are_started_on_the_member_dynvm_chose(make_services):
    # xapi alone (VM.start) would put a VM where most memory is free: the emptier member.
    # dynvm places by CPU first here, so its choice differs and only VM.start_on honours it.
    services, lab = make_services(pool_size=2)
    xapi = lab.xapi()
    members = {rec["name_label"]: ref for ref, rec in xapi.host.get_all_records().items()}
    # take CPUs, not memory, on the master: 28 of its 32 vCPUs in one small VM
    from .sim.simtools import new_vm

    hog = new_vm(xapi, "cpu-hog")
    xapi.VM.set_VCPUs_max(hog, "28")
    xapi.VM.set_VCPUs_at_startup(hog, "28")
    xapi.VM.set_memory_limits(hog, str(2**30), str(2**30), str(2**30), str(2**30))
    xapi.VM.start_on(hog, members["sim-xen-01"], False, False)
    # and memory, not CPUs, on the other member: 100 GiB in a one-vCPU VM
    big = new_vm(xapi, "memory-hog")
    xapi.VM.set_VCPUs_at_startup(big, "2")
    xapi.VM.set_VCPUs_max(big, "2")
    xapi.VM.set_memory_limits(big, str(100 * 2**30), str(100 * 2**30), str(100 * 2**30), str(100 * 2**30))
    xapi.VM.start_on(big, members["sim-xen-01-h2"], False, False)
    wait_for(lambda: len(services.inventory.view("1").running_vms) == 2, timeout=5)
    # master: 4 vCPUs left (room for 1); member 2: 30 vCPUs, ~20 GiB (room for 4 by memory)
    [lease] = services.engine.acquire(LeaseRequest("placed", "centos"))
    assert resident_members(lab)["placed"] == "sim-xen-01-h2"
    assert services.inventory.view("1").member(lease.member).name == "sim-xen-01-h2"
