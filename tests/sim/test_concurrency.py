"""Many clients at once: delays overlap instead of adding up, and state stays consistent."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from dynvm.sim.settings import Timing

from .simtools import guest_ip, login, new_vm


def test_fifty_boots_at_once_overlap_instead_of_queueing(make_lab):
    node = make_lab(timing=Timing(boot_seconds=1.0, ip_seconds=0.0), host_memory_gib=512).nodes[0]
    xapi = login(node).xenapi
    vms = [new_vm(xapi, f"boot{n:02d}") for n in range(50)]
    started = time.monotonic()
    for vm in vms:
        xapi.VM.start(vm, False, False)
    pending = set(vms)
    while pending and time.monotonic() - started < 30:
        pending = {vm for vm in pending if not guest_ip(xapi, vm)}
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert not pending
    # one second each: serialised boots would take 50 s; overlapping ones about 1 s.
    # (The exact figure is in `make bench`; this only proves they overlap.)
    assert elapsed < 10, f"50 boots of 1 s took {elapsed:.1f} s"
    assert len({guest_ip(xapi, vm) for vm in vms}) == 50  # every guest has its own address


def test_parallel_clients_keep_the_host_consistent(make_lab):
    node = make_lab(host_memory_gib=512).nodes[0]

    def worker(n: int) -> list[str]:
        xapi = login(node).xenapi  # one session per thread, as a real client must
        made = []
        for i in range(5):
            vm = new_vm(xapi, f"w{n}-{i}", start=True)
            made.append(vm)
        for vm in made[:2]:
            xapi.VM.hard_shutdown(vm)
            vdis = [xapi.VBD.get_VDI(b) for b in xapi.VM.get_VBDs(vm) if xapi.VBD.get_type(b) == "Disk"]
            xapi.VM.destroy(vm)
            for vdi in vdis:
                xapi.VDI.destroy(vdi)
        return made[2:]

    with ThreadPoolExecutor(8) as pool:
        survivors = [vm for kept in pool.map(worker, range(8)) for vm in kept]

    xapi = login(node).xenapi
    host = xapi.host.get_all()[0]
    resident = set(xapi.host.get_resident_VMs(host)) - {xapi.host.get_control_domain(host)}
    assert resident == set(survivors)
    assert len(survivors) == 24
    sr = xapi.pool.get_default_SR(xapi.pool.get_all()[0])
    disks = xapi.SR.get_VDIs(sr)
    assert len(disks) == 24  # one root disk per surviving VM, none leaked
    used = sum(int(xapi.VDI.get_physical_utilisation(v)) for v in disks)
    assert int(xapi.SR.get_physical_utilisation(sr)) == used
