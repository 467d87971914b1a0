"""The live mirror: loaded once, kept by event.from, answers from memory, follows outages
and configuration reloads."""

from __future__ import annotations

import dataclasses
import time

import pytest

from dynvm.config import Settings
from dynvm.xen.inventory import HostState, Inventory, VmView

from ..sim.simtools import new_vm, wait_for

GiB = 1024**3


@pytest.fixture
def inventory():
    made = []

    def make(settings: Settings, event_timeout: float = 5.0) -> Inventory:
        inv = Inventory(event_timeout=event_timeout)
        inv.apply(settings)
        made.append(inv)
        assert inv.wait_synced(10)
        return inv

    yield make
    for inv in made:
        inv.stop()


def test_the_mirror_holds_what_dynvm_needs(sim_lab, inventory):
    lab = sim_lab(hosts=2, foreign_vms=2)
    inv = inventory(lab.settings)
    assert inv.refs() == ["1", "2"]
    view = inv.view("1")
    assert view.state is HostState.UP
    assert (view.cpus, view.memory_total, view.dom0_memory) == (32, 128 * GiB, 4 * GiB)
    [member] = view.members
    assert 4 * GiB < member.memory_overhead < 5 * GiB  # Xen's own share of the host
    # two foreign VMs, overhead too
    assert view.memory_free == 128 * GiB - member.memory_overhead - 4 * GiB - 2 * (4 * GiB + 38 * 1024**2)
    assert all(vm.memory_overhead == 38 * 1024**2 for vm in view.running_vms)
    names = {t.name: t for t in view.templates}
    assert names["tmpl-cnt7.7"].disk == 35 * GiB
    assert (names["tmpl-win16dc - PATCHED (1)"].vcpus, names["tmpl-win16dc - PATCHED (1)"].memory) == (6, 6 * GiB)
    assert view.storage_free("Local Storage 01") == 2 * 1024 * GiB - 2 * 35 * GiB
    assert view.storage_free("No such SR") is None
    running = view.running_vms
    assert len(running) == 2
    assert all(vm.ip and vm.ip.startswith("127.77.0.") for vm in running)
    assert all(vm.vcpus == "4" and vm.memory == str(4 * GiB) for vm in running)  # as xapi gives them


def test_a_change_on_the_host_shows_in_the_mirror_quickly(sim_lab, inventory):
    lab = sim_lab()
    inv = inventory(lab.settings)
    xapi = lab.xapi()
    vm = new_vm(xapi, "appears", start=True)
    # "within 1 s" is the contract; the wait allows for a loaded CI machine
    seen = wait_for(lambda: next((v for v in inv.view("1").vms if v.ref == vm and v.ip), None), timeout=3)
    assert seen.name == "appears"
    xapi.VM.hard_shutdown(vm)
    xapi.VM.destroy(vm)
    wait_for(lambda: all(v.ref != vm for v in inv.view("1").vms), timeout=3)


def test_queries_are_answered_from_memory(sim_lab, inventory):
    lab = sim_lab(foreign_vms=3)
    inv = inventory(lab.settings, event_timeout=30)
    node = lab.lab.nodes[0]
    before = node.calls
    for _ in range(200):
        assert len(inv.view("1").running_vms) == 3
        inv.views()
    assert node.calls - before <= 1  # at most the watcher's own long poll coming round


def test_a_hung_host_is_marked_down_and_resynced_when_back(sim_lab, inventory):
    lab = sim_lab(hosts=2)
    inv = inventory(lab.settings, event_timeout=0.5)  # long poll 0.5 s: socket time-out 3.5 s
    lab.control().host_down("hang")
    started = time.monotonic()
    wait_for(lambda: inv.view("1").state is HostState.DOWN, timeout=15)
    assert time.monotonic() - started < 10
    down = inv.view("1")
    assert "stopped answering" in down.error
    assert down.vms == ()  # a down host offers nothing
    assert inv.view("2").state is HostState.UP  # the other host is not affected
    lab.control().add_foreign_vm("made-while-down", "centos", True)  # the control port still works
    lab.control().host_up()
    wait_for(lambda: inv.view("1").state is HostState.UP, timeout=15)
    wait_for(lambda: any(v.name == "made-while-down" for v in inv.view("1").vms), timeout=5)


def test_a_refusing_host_is_marked_down_at_once(sim_lab, inventory):
    lab = sim_lab()
    inv = inventory(lab.settings)
    lab.control().host_down("refuse")
    wait_for(lambda: inv.view("1").state is HostState.DOWN, timeout=5)
    assert "does not answer" in inv.view("1").error or "stopped answering" in inv.view("1").error
    lab.control().host_up()
    wait_for(lambda: inv.view("1").state is HostState.UP, timeout=15)


def test_reloads_start_and_stop_watchers(sim_lab, inventory):
    lab = sim_lab(hosts=3)
    first_two = dataclasses.replace(lab.settings, hosts=lab.settings.hosts[:2])
    inv = inventory(first_two)
    assert inv.refs() == ["1", "2"]
    inv.apply(lab.settings)  # a host added
    assert inv.refs() == ["1", "2", "3"]
    assert inv.wait_synced(10)
    assert inv.view("3").state is HostState.UP
    old_pool = inv.pool("1")
    changed = dataclasses.replace(lab.settings.hosts[0], storage_name="Other SR")
    inv.apply(dataclasses.replace(lab.settings, hosts=(changed, lab.settings.hosts[2])))  # one changed, one gone
    assert inv.refs() == ["1", "3"]
    assert inv.pool("1") is not old_pool
    assert inv.mirror("1").settings.storage_name == "Other SR"
    assert inv.view("2") is None


def test_vm_addresses_skip_apipa():
    vm = VmView("r", "u", "n", "", "Running", "4", "0", {}, {"0/ip": "169.254.3.4", "1/ip": "127.77.0.9"}, {})
    assert vm.addresses == ["169.254.3.4", "127.77.0.9"]
    assert vm.ip == "127.77.0.9"
    assert VmView("r", "u", "n", "", "Running", "4", "0", {}, {"0/ip": "169.254.3.4"}, {}).ip is None
