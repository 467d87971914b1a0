"""A pool's members as real pools run them, through the XenAPI SDK: each on its own loopback
address at the pool's port, maintenance (disable, evacuate), live migration, a new master
(orderly or in an emergency), a member the master loses, and members with local SRs."""

from __future__ import annotations

import socket
import ssl
import time
import xmlrpc.client

import pytest
import XenAPI

from dynvm.sim.control import SimControlClient
from dynvm.sim.lab import Lab

from .simtools import guest_ip, login, new_vm, wait_for


def control(pool: Lab) -> SimControlClient:
    node = pool.nodes[0]
    return SimControlClient(pool.control_endpoint.url + "/", node.host.spec.password)


def member_named(xapi, suffix: str) -> str:
    return next(h for h in xapi.host.get_all() if xapi.host.get_name_label(h).endswith(suffix))


def login_at(url: str, pool: Lab) -> XenAPI.Session:
    session = XenAPI.Session(url)
    session.xenapi.login_with_password("root", pool.nodes[0].host.spec.password, "2.21", "test")
    return session


@pytest.fixture
def pool(make_lab) -> Lab:
    return make_lab(pool_size=3)


def test_members_answer_on_their_own_loopback_address_at_the_pools_port(pool):
    xapi = login(pool.nodes[0]).xenapi
    port = pool.nodes[0].endpoint.port
    assert [m.url for m in pool.members[1]] == [f"http://127.0.0.2:{port}", f"http://127.0.0.3:{port}"]
    addresses = sorted(xapi.host.get_address(h) for h in xapi.host.get_all())
    assert addresses == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    for member in pool.members[1]:  # each address is that member's: HOST_IS_SLAVE names the master's
        with pytest.raises(XenAPI.Failure) as failure:
            login_at(member.url, pool)
        assert failure.value.details == ["HOST_IS_SLAVE", "127.0.0.1"]


def test_a_disabled_member_starts_no_vm_until_it_is_enabled(pool):
    xapi = login(pool.nodes[0]).xenapi
    member = member_named(xapi, "-h2")
    xapi.host.disable(member)
    assert xapi.host.get_enabled(member) is False
    vm = new_vm(xapi, "blocked")
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.start_on(vm, member, False, False)
    assert failure.value.details == ["HOST_DISABLED", member]
    others = [new_vm(xapi, f"elsewhere{i}", start=True) for i in range(3)]  # xapi chooses around it
    assert member not in {xapi.VM.get_resident_on(v) for v in others}
    xapi.host.enable(member)
    xapi.VM.start_on(vm, member, False, False)
    assert xapi.VM.get_resident_on(vm) == member


def test_evacuate_moves_every_vm_with_its_guest_to_the_enabled_members(pool):
    xapi = login(pool.nodes[0]).xenapi
    member, disabled = member_named(xapi, "-h3"), member_named(xapi, "-h2")
    vms = [new_vm(xapi, f"ev{i}") for i in range(2)]
    for vm in vms:
        xapi.VM.start_on(vm, member, False, False)
    ips = {vm: wait_for(lambda vm=vm: guest_ip(xapi, vm)) for vm in vms}
    xapi.host.disable(member)
    xapi.host.disable(disabled)  # no target either
    free_before = int(xapi.host.compute_free_memory(member))
    xapi.host.evacuate(member)
    master = xapi.pool.get_master(xapi.pool.get_all()[0])
    for vm in vms:
        assert xapi.VM.get_resident_on(vm) == master
        assert xapi.VM.get_power_state(vm) == "Running"
        assert guest_ip(xapi, vm) == ips[vm]  # the same guest, still at its address
    assert int(xapi.host.compute_free_memory(member)) > free_before
    assert xapi.host.get_resident_VMs(member) == [xapi.host.get_control_domain(member)]
    assert xapi.host.get_enabled(member) is False  # evacuate leaves that to the admin


def test_evacuate_that_cannot_place_every_vm_moves_none(make_lab):
    pool = make_lab(pool_size=2, host_memory_gib=14)  # room for two 4 GiB VMs per member, not three
    xapi = login(pool.nodes[0]).xenapi
    master, member = xapi.pool.get_master(xapi.pool.get_all()[0]), member_named(xapi, "-h2")
    for i in range(2):
        xapi.VM.start_on(new_vm(xapi, f"m{i}"), master, False, False)
        xapi.VM.start_on(new_vm(xapi, f"n{i}"), member, False, False)
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.host.evacuate(member, "OpaqueRef:NULL", "0")  # the parameters later releases added
    assert failure.value.details[0] == "HOST_NOT_ENOUGH_FREE_MEMORY"
    assert failure.value.details[1] in xapi.host.get_resident_VMs(member)  # the VM that found no place
    assert len(xapi.host.get_resident_VMs(member)) == 3  # dom0 and both VMs: nothing moved


def test_pool_migrate_moves_a_running_vm_and_refuses_what_xapi_refuses(pool):
    xapi = login(pool.nodes[0]).xenapi
    h2, h3 = member_named(xapi, "-h2"), member_named(xapi, "-h3")
    vm = new_vm(xapi, "mover")
    xapi.VM.start_on(vm, h2, False, False)
    xapi.VM.pool_migrate(vm, h3, {"live": "true"})
    assert xapi.VM.get_resident_on(vm) == h3
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.pool_migrate(vm, h3, {})
    assert failure.value.details[0] == "OPERATION_NOT_ALLOWED"
    halted = new_vm(xapi, "halted")
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.pool_migrate(halted, h2, {})
    assert failure.value.details == ["VM_BAD_POWER_STATE", halted, "running", "halted"]


def test_a_new_master_serves_logins_and_the_old_one_names_it(pool):
    xapi = login(pool.nodes[0]).xenapi
    h2 = member_named(xapi, "-h2")
    xapi.pool.designate_new_master(h2)
    assert xapi.pool.get_master(xapi.pool.get_all()[0]) == h2
    with pytest.raises(XenAPI.Failure) as failure:
        login(pool.nodes[0])
    assert failure.value.details == ["HOST_IS_SLAVE", "127.0.0.2"]
    new_master = login_at(pool.members[1][0].url, pool).xenapi
    assert len(new_master.host.get_all()) == 3


def test_a_member_that_goes_down_is_lost_to_the_master_and_its_vms_wait_for_it(pool):
    xapi = login(pool.nodes[0]).xenapi
    h3 = member_named(xapi, "-h3")
    vm = new_vm(xapi, "stranded")
    xapi.VM.start_on(vm, h3, False, False)
    control(pool).member_down(2, "refuse")
    metrics = xapi.host.get_metrics(h3)
    wait_for(lambda: xapi.host_metrics.get_live(metrics) is False)
    with pytest.raises(ConnectionRefusedError):  # its own address refuses
        login_at(pool.members[1][1].url, pool)
    assert len(xapi.host.get_all()) == 3  # the master answers
    assert xapi.VM.get_power_state(vm) == "Running"
    assert xapi.VM.get_resident_on(vm) == h3
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.hard_shutdown(vm)
    assert failure.value.details == ["HOST_OFFLINE", h3]
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.start_on(new_vm(xapi, "not-there"), h3, False, False)
    assert failure.value.details == ["HOST_NOT_LIVE"]
    control(pool).member_up(2)  # it was switched off: it boots again, without its guests
    assert xapi.host_metrics.get_live(metrics) is True
    assert xapi.VM.get_power_state(vm) == "Halted"
    assert xapi.VM.get_resident_on(vm) == "OpaqueRef:NULL"


def test_a_hung_member_keeps_its_guests_running_unreported(pool):
    xapi = login(pool.nodes[0]).xenapi
    h2 = member_named(xapi, "-h2")
    running = new_vm(xapi, "unreported")
    xapi.VM.start_on(running, h2, False, False)
    wait_for(lambda: guest_ip(xapi, running))
    ip = guest_ip(xapi, running)
    control(pool).member_down(1, "hang")
    with pytest.raises(XenAPI.Failure) as failure:  # the master cannot reach it: not yet dead to it
        xapi.VM.hard_shutdown(running)
    assert failure.value.details[0] in ("CANNOT_CONTACT_HOST", "HOST_OFFLINE")
    control(pool).member_up(1)
    assert xapi.VM.get_power_state(running) == "Running"  # a hang is no reboot: the guest ran on
    assert guest_ip(xapi, running) == ip


def test_a_slow_member_answers_late_and_the_master_on_time(pool):
    control(pool).member_slow(1, 0.3)
    master = login(pool.nodes[0])  # a session from the master, used at the slow member's address
    on_member = XenAPI.Session(pool.members[1][0].url)
    on_member._session = master._session
    started = time.monotonic()
    on_member.xenapi.host.get_all()
    slow = time.monotonic() - started
    started = time.monotonic()
    master.xenapi.host.get_all()
    assert slow >= 0.3 > time.monotonic() - started


def test_an_emergency_transition_makes_a_member_master_when_the_master_is_gone(pool):
    xapi = login(pool.nodes[0]).xenapi
    old_master = xapi.pool.get_master(xapi.pool.get_all()[0])
    control(pool).member_down(0, "refuse")
    member = pool.members[1][0]
    with pytest.raises(XenAPI.Failure) as failure:  # the members still name the old master
        login_at(member.url, pool)
    assert failure.value.details == ["HOST_IS_SLAVE", "127.0.0.1"]
    raw = xmlrpc.client.ServerProxy(member.url)  # a member's own root session, as xe uses there
    answer = raw.session.slave_local_login_with_password("root", pool.nodes[0].host.spec.password)
    local = XenAPI.Session(member.url)
    local._session = answer["Value"]
    local.xenapi.pool.emergency_transition_to_master()
    new = login_at(member.url, pool).xenapi
    pool_ref = new.pool.get_all()[0]
    assert new.host.get_address(new.pool.get_master(pool_ref)) == "127.0.0.2"
    assert new.host_metrics.get_live(new.host.get_metrics(old_master)) is False
    with pytest.raises(XenAPI.Failure) as failure:  # the third member still names the old master ...
        login_at(pool.members[1][1].url, pool)
    assert failure.value.details == ["HOST_IS_SLAVE", "127.0.0.1"]
    assert new.pool.recover_slaves() == [new.host.get_by_name_label("sim-xen-01-h3")[0]]
    with pytest.raises(XenAPI.Failure) as failure:  # ... until the new master tells it
        login_at(pool.members[1][1].url, pool)
    assert failure.value.details == ["HOST_IS_SLAVE", "127.0.0.2"]


def test_local_srs_are_named_alike_and_a_vm_starts_only_where_its_disks_are(make_lab):
    pool = make_lab(pool_size=2, storage="local")
    xapi = login(pool.nodes[0]).xenapi
    srs = xapi.SR.get_by_name_label("Local Storage 01")
    assert len(srs) == 2
    assert not any(xapi.SR.get_shared(sr) for sr in srs)
    owners = {xapi.PBD.get_host(xapi.SR.get_PBDs(sr)[0]): sr for sr in srs}
    assert set(owners) == set(xapi.host.get_all())  # one each
    master = xapi.pool.get_master(xapi.pool.get_all()[0])
    member = member_named(xapi, "-h2")
    vm = new_vm(xapi, "local")  # new_vm puts its disk on the first such SR
    disk_sr = xapi.VDI.get_SR(xapi.VBD.get_VDI(next(v for v in xapi.VM.get_VBDs(vm) if xapi.VBD.get_type(v) == "Disk")))
    elsewhere = member if owners[master] == disk_sr else master
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.start_on(vm, elsewhere, False, False)
    assert failure.value.details == ["VM_REQUIRES_SR", vm, disk_sr]
    xapi.VM.start(vm, False, False)  # xapi chooses the member that reaches its disk
    assert owners[xapi.VM.get_resident_on(vm)] == disk_sr


def test_each_member_has_its_own_certificate_for_its_address(make_lab):
    pool = make_lab(pool_size=2, tls=True)
    context = ssl.create_default_context(cafile=str(pool.cert_path))  # the bundle the config names
    for url in (pool.nodes[0].url, pool.members[1][0].url):
        host, port = url.removeprefix("https://").split(":")
        with socket.create_connection((host, int(port))) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
            names = [v for k, v in tls.getpeercert()["subjectAltName"] if k == "IP Address"]
            assert names == [host]
