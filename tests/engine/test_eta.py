"""The queue's forecast (pure: rooms and releases built by hand)."""

from __future__ import annotations

from dynvm.engine.eta import Release, Timing, Waiting, expected_end, fit, forecast
from dynvm.provider import HostRoom, MemberRoom, Need

GiB = 1024**3
NEED = Need(4, 4 * GiB, 0, "t", 4 * GiB)
TIMING = Timing(create={"centos": 10.0}, hold_fraction={"centos": 0.5})


def full_host(ref: str = "1") -> HostRoom:
    return HostRoom(ref, 1 << 50, [MemberRoom("", 0, 0)])


def test_each_request_starts_when_the_room_it_needs_is_given_back():
    rooms = {"1": full_host()}
    releases = [Release(100, "1", "", 4, 4 * GiB, 0), Release(200, "1", "", 4, 4 * GiB, 0)]
    queue = [Waiting("a", "centos", 1, {"1": NEED}), Waiting("b", "centos", 1, {"1": NEED})]
    etas = forecast(0, rooms, releases, queue, TIMING, {"centos": 1000})
    assert etas == {"a": 110, "b": 210}  # release + the OS's create time
    assert rooms["1"].members[0].cpus == 0  # the caller's rooms are not changed


def test_a_request_of_two_waits_for_both_and_one_that_never_fits_has_no_eta():
    rooms = {"1": full_host()}
    releases = [Release(50, "1", "", 4, 4 * GiB, 0), Release(80, "1", "", 4, 4 * GiB, 0)]
    queue = [Waiting("pair", "centos", 2, {"1": NEED}), Waiting("huge", "centos", 3, {"1": NEED})]
    etas = forecast(0, rooms, releases, queue, TIMING, {"centos": 1000})
    assert etas["pair"] == 90
    assert etas["huge"] is None  # the pair holds what there is, past every release known


def test_the_vms_a_served_request_holds_come_back_after_its_hold_time():
    rooms = {"1": HostRoom("1", 1 << 50, [MemberRoom("", 4, 8 * GiB)])}
    queue = [Waiting("first", "centos", 1, {"1": NEED}), Waiting("second", "centos", 1, {"1": NEED})]
    etas = forecast(0, rooms, [], queue, TIMING, {"centos": 300})
    assert etas == {"first": 10, "second": 10 + 300 + 10}  # first fits now; second when first's VM goes


def test_a_pinned_request_only_looks_at_its_host():
    rooms = {"1": full_host("1"), "2": HostRoom("2", 1 << 50, [MemberRoom("", 32, 64 * GiB)])}
    pinned = Waiting("pinned", "centos", 1, {"1": NEED})
    assert fit(rooms, pinned) is None
    releases = [Release(30, "1", "", 4, 4 * GiB, 0)]
    assert forecast(0, rooms, releases, [pinned], TIMING, {})["pinned"] == 40


def test_a_lease_is_expected_back_after_the_share_of_its_lifetime_its_os_is_held():
    # handed over at 0 for 1000 s; centos VMs are held half their lifetime: back at 500
    assert expected_end(100, "centos", "ready", 0, 0, 1000, TIMING) == 500
    # held past that already: the expiry is the bound it cannot pass
    assert expected_end(600, "centos", "ready", 0, 0, 1000, TIMING) == 1000
    assert expected_end(600, "centos", "releasing", 0, 0, 1000, TIMING) == 600
    # still being made: the create, then the share of its lifetime
    assert expected_end(100, "centos", "creating", None, 100, 1100, TIMING) == 100 + 10 + 500


def test_an_os_with_no_lease_ended_yet_is_expected_to_be_held_as_the_labs_others_are():
    """In a new lab the first OS to end a lease teaches the rest: a Windows lease is not
    forecast to the expiry (12 h by default) because no Windows lease has ended yet, when
    the lab's CentOS leases are held a tenth of theirs (an ETA 10x too long otherwise)."""
    learned = Timing(create={"centos": 10.0}, hold_fraction={"centos": 0.1}, any_create=10.0, any_hold_fraction=0.1)
    assert expected_end(100, "windows", "ready", 0, 0, 43_200, learned) == 4_320
    assert expected_end(100, "windows", "creating", None, 100, 43_300, learned) == 100 + 10 + 4_320
    # a lab that has ended nothing yet: held to the expiry, made in the seed's 65 s (an upper bound)
    nothing = Timing(create={}, hold_fraction={})
    assert expected_end(100, "windows", "ready", 0, 0, 43_200, nothing) == 43_200
    assert nothing.create_seconds("windows") == 65.0
