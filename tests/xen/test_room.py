"""What a Xen pool has left and what a VM needs there (``xen/room.py``; views built by hand)."""

from __future__ import annotations

from dynvm.config import Secret
from dynvm.provider import Need
from dynvm.xen.inventory import HostState, HostView, MemberView, TemplateView, VmView
from dynvm.xen.memory import memory_overhead
from dynvm.xen.room import find_template, need_on, room_on
from dynvm.xen.settings import XenHostSettings

GiB = 1024**3
MiB = 1024**2


def host(ref: str = "1", **templates: str) -> XenHostSettings:
    return XenHostSettings(
        number=int(ref),
        templates=templates or {"centos": "tmpl-cnt7"},
        url=f"http://h{ref}",
        user="root",
        password=Secret("x"),
        storage_name="SR",
    )


def vm(name: str, cpus: int, memory: int, lease: str | None = None, on: str = "OpaqueRef:NULL") -> VmView:
    other = {"dynvm_lease": lease} if lease else {}
    return VmView(name, name, name, "", "Running", str(cpus), str(memory), other, {}, {}, resident_on=on)


def view(
    vms: tuple[VmView, ...] = (),
    cpus: int = 32,
    memory: int = 128 * GiB,
    sr_free: int = 2048 * GiB,
    state: HostState = HostState.UP,
) -> HostView:
    templates = (
        TemplateView("t1", "tmpl-cnt7.7", 4, 4 * GiB, 35 * GiB, memory_overhead=38 * MiB),
        TemplateView("t2", "tmpl-cnt8", 4, 8 * GiB, 0, memory_overhead=70 * MiB),
        TemplateView("t3", "CentOS 7", 2, 2 * GiB, 0, builtin=True),
    )
    return HostView(
        "1",
        state,
        cpus=cpus,
        memory_total=memory,
        dom0_memory=4 * GiB,
        vms=vms,
        templates=templates,
        storage={"SR": (2048 * GiB, 2048 * GiB - sr_free)},
    )


def test_the_smallest_of_cpu_memory_and_disk_decides():
    need = need_on(host(), view(), "centos", None, None)
    assert need == Need(4, 4 * GiB + 38 * MiB, 35 * GiB, "tmpl-cnt7.7", 4 * GiB)  # xapi admits on static_max + overhead
    assert room_on(host(), view(), 1.0, []).fits(need) == 8  # CPU: 32 / 4
    assert room_on(host(), view(), 2.0, []).fits(need) == 16  # overcommit doubles CPU room
    assert room_on(host(), view(memory=20 * GiB), 1.0, []).fits(need) == 3  # (20 - 4 dom0) / (4 GiB + 38 MiB)
    assert room_on(host(), view(sr_free=100 * GiB), 1.0, []).fits(need) == 2  # 100 / 35
    busy = (vm("a", 8, 8 * GiB), vm("b", 8, 8 * GiB))
    assert room_on(host(), view(busy), 1.0, []).fits(need) == 4  # (32 - 16) / 4


def test_reservations_count_until_their_vm_runs():
    need = need_on(host(), view(), "centos", None, None)
    reserved = [
        {"lease_id": "L1", "cpus": 4, "memory": 4 * GiB, "disk": 35 * GiB},
        {"lease_id": "L2", "cpus": 4, "memory": 4 * GiB, "disk": 35 * GiB},
    ]
    assert room_on(host(), view(), 1.0, reserved).fits(need) == 6
    running = (vm("x", 4, 4 * GiB, lease="L1"),)  # L1's VM runs: the host counts it, not the reservation
    assert room_on(host(), view(running), 1.0, reserved).fits(need) == 6


def test_a_down_host_or_a_missing_template_counts_nothing():
    assert room_on(host(), view(state=HostState.DOWN), 1.0, []).fits(Need(4, GiB, GiB, "t")) == 0
    assert need_on(host(), view(state=HostState.DOWN), "centos", None, None) is None
    assert need_on(host(), view(), "windows", None, None) is None
    assert need_on(host(windows="tmpl-win"), view(), "windows", None, None) is None  # no such template on it


def test_templates_match_exactly_first_then_by_prefix():
    assert find_template(view(), "tmpl-cnt8").name == "tmpl-cnt8"
    assert find_template(view(), "tmpl-cnt7").name == "tmpl-cnt7.7"
    assert find_template(view(), "tmpl-none") is None
    assert find_template(view(), "tmpl-cnt") is None  # two match: ambiguous, never the first by name
    assert find_template(view(), "CentOS 7").name == "CentOS 7"  # a built-in template by its whole name ...
    assert find_template(view(), "CentOS") is None  # ... never by a prefix


def test_requested_cpus_and_memory_replace_the_templates():
    need = need_on(host(), view(), "centos", 16, 64 * GiB)
    assert (need.cpus, need.static_max, need.disk) == (16, 64 * GiB, 35 * GiB)
    assert need.memory == 64 * GiB + memory_overhead(64 * GiB, 16)  # the overhead xapi will compute for it
    assert room_on(host(), view(), 1.0, []).fits(need) == 1


def pool_view(vms: tuple[VmView, ...] = (), sr_free: int = 2048 * GiB, **member_state: bool) -> HostView:
    """A pool of three 32-CPU, 128 GiB hosts (m1 the master) sharing one SR."""
    members = tuple(
        MemberView(f"m{i}", f"h{i}", 32, 128 * GiB, 0, 4 * GiB, master=i == 1, **member_state if i == 3 else {})
        for i in (1, 2, 3)
    )
    return HostView(
        "1",
        HostState.UP,
        cpus=96,
        memory_total=3 * 128 * GiB,
        vms=vms,
        templates=view().templates,
        storage={"SR": (2048 * GiB, 2048 * GiB - sr_free)},
        members=members,
    )


def test_a_pool_counts_room_per_member_and_its_shared_disk_once():
    need = need_on(host(centos="tmpl-cnt7.7"), pool_view(), "centos", None, None)
    assert room_on(host(), pool_view(), 1.0, []).fits(need) == 3 * 8  # CPUs: 32 / 4 per member
    # a big VM running on m2 takes m2's room only
    busy = pool_view((vm("big", 32, 8 * GiB, on="m2"),))
    room = room_on(host(), busy, 1.0, [])
    assert [m.fits(need) for m in room.members] == [8, 0, 8]
    # the SR is one for the pool: 10 VMs of 35 GiB fill 350 GiB, wherever their CPUs are
    assert room_on(host(), pool_view(sr_free=350 * GiB), 1.0, []).fits(need) == 10


def test_a_reservation_holds_room_on_its_member():
    need = need_on(host(centos="tmpl-cnt7.7"), pool_view(), "centos", None, None)
    reserved = [{"lease_id": "L1", "member": "m3", "cpus": 32, "memory": 4 * GiB, "disk": 0}]
    assert [m.fits(need) for m in room_on(host(), pool_view(), 1.0, reserved).members] == [8, 8, 0]
    older = [{"lease_id": "L2", "member": None, "cpus": 32, "memory": 4 * GiB, "disk": 0}]  # before members
    assert [m.fits(need) for m in room_on(host(), pool_view(), 1.0, older).members] == [0, 8, 8]


def test_a_disabled_or_lost_member_gives_no_room():
    need = need_on(host(centos="tmpl-cnt7.7"), pool_view(), "centos", None, None)
    assert room_on(host(), pool_view(enabled=False), 1.0, []).fits(need) == 16
    assert room_on(host(), pool_view(live=False), 1.0, []).fits(need) == 16


def test_an_empty_room_leaves_out_dynvm_vms_but_not_the_others():
    need = need_on(host(), view(), "centos", None, None)
    busy = view((vm("ours", 16, 4 * GiB, lease="L1"), vm("theirs", 8, 4 * GiB)))
    assert room_on(host(), busy, 1.0, []).fits(need) == 2  # (32 - 16 - 8) / 4
    assert room_on(host(), busy, 1.0, [], empty=True).fits(need) == 6  # dynvm's VM gone: (32 - 8) / 4
