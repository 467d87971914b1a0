"""Placement (``engine/placement.py``): the engine's rule, whatever the provider says is left."""

from __future__ import annotations

import pytest

from dynvm.engine.placement import Candidate, Spread, place
from dynvm.hosts import HostSettings
from dynvm.model import NotEnoughCapacity
from dynvm.provider import HostRoom, MemberRoom, Need

GiB = 1024**3


def host(ref: str = "1", **templates: str) -> HostSettings:
    return HostSettings(number=int(ref), templates=templates or {"centos": "tmpl-cnt7"})


def lone(ref: str, cpus: float, memory: int, disk: int = 0) -> HostRoom:
    return HostRoom(ref, disk, [MemberRoom("", cpus, memory)])


def test_placement_spreads_and_refuses_what_does_not_fit():
    need = Need(4, 4 * GiB, 0, "t")
    candidates = [
        Candidate(host("1"), lone("1", 32, 128 * GiB), need),
        Candidate(host("2"), lone("2", 16, 128 * GiB), need),
    ]
    chosen = [c.host.ref for c in place(6, "centos", candidates)]
    # most room first: host 1 (room for 8) takes VMs until it has no more room than host 2 (4)
    assert chosen == ["1", "1", "1", "1", "1", "2"]
    equal = [
        Candidate(host("1"), lone("1", 32, 128 * GiB), need),
        Candidate(host("2"), lone("2", 32, 128 * GiB), need),
    ]
    assert [c.host.ref for c in place(4, "centos", equal)] == ["1", "2", "1", "2"]
    with pytest.raises(NotEnoughCapacity, match="not enough capacity for 7 centos VM\\(s\\): 6 can be made now"):
        place(7, "centos", [Candidate(host("1"), lone("1", 24, 128 * GiB), need)])


def test_placement_in_a_pool_names_the_member_with_most_room():
    need = Need(4, 4 * GiB, 0, "t")
    room = HostRoom("1", 1 << 50, [MemberRoom("m1", 8, 128 * GiB), MemberRoom("m2", 16, 128 * GiB)])
    chosen = place(4, "centos", [Candidate(host("1"), room, need)])
    assert [p.member for p in chosen] == ["m2", "m2", "m1", "m2"]  # a tie: more memory left wins
    assert {p.host.ref for p in chosen} == {"1"}


def test_a_spread_places_one_vm_at_a_time_only_where_it_is_allowed():
    """A pools pass places VMs one at a time on hosts it may use (not backing off, not
    making too many at once): the spread weighs each host's room once and keeps it as
    VMs are placed, and the rooms are the candidates' own."""
    need = Need(4, 4 * GiB, 0, "t")
    rooms = {"1": lone("1", 32, 128 * GiB), "2": lone("2", 16, 128 * GiB), "3": lone("3", 8, 128 * GiB)}
    spread = Spread(Candidate(host(ref), room, need) for ref, room in rooms.items())
    assert spread.available() == 8 + 4 + 2

    def not_one(c: Candidate) -> bool:
        return c.host.ref != "1"

    assert spread.available(not_one) == 6
    taken = [spread.take(not_one) for _ in range(6)]
    assert [p.host.ref for p in taken if p is not None] == ["2", "2", "2", "3", "2", "3"]
    assert spread.take(not_one) is None  # hosts 2 and 3 are full; host 1 is not allowed
    assert spread.available() == 8
    assert spread.available(not_one) == 0
    assert [rooms[ref].members[0].cpus for ref in ("2", "3")] == [0, 0]  # taken from the rooms themselves
    last = spread.take()
    assert last is not None
    assert last.host.ref == "1"


def test_the_weigher_weighs_each_room_shape_and_need_once_and_answers_as_the_room_does(monkeypatch):
    """A forecast weighs every host for every OS; the ``Weigher`` gives what ``fits`` gives
    and weighs a room shape and need it has seen (another host alike) from memory."""
    from dynvm.engine.placement import Weigher

    small, windows = Need(4, 4 * GiB, 35 * GiB, "t"), Need(6, 6 * GiB, 71 * GiB, "w")
    rooms = [
        lone("1", 32, 128 * GiB, 500 * GiB),
        lone("2", 32, 128 * GiB, 500 * GiB),  # as host 1
        lone("3", 8, 128 * GiB, 500 * GiB),  # fewer CPUs
        lone("4", 32, 128 * GiB, 100 * GiB),  # less disk
        HostRoom("5", 500 * GiB, [MemberRoom("a", 32, 128 * GiB), MemberRoom("b", 4, 8 * GiB)]),
        HostRoom("6", 500 * GiB, [MemberRoom("a", 32, 128 * GiB, 70 * GiB)]),  # its own storage
    ]
    weigher, weighed = Weigher(), []
    fits = HostRoom.fits

    def counted(room: HostRoom, need: Need) -> int:
        weighed.append((room.ref, need.template))
        return fits(room, need)

    monkeypatch.setattr(HostRoom, "fits", counted)  # count what the weigher weighs anew
    for need in (small, windows):
        assert [weigher.fits(room, need) for room in rooms] == [fits(room, need) for room in rooms]
    monkeypatch.undo()
    assert [ref for ref, _ in weighed].count("2") == 0  # host 2 is host 1's shape
    assert len(weighed) == 2 * (len(rooms) - 1)
    candidates = [Candidate(host(str(n)), room, small) for n, room in enumerate(rooms, 1)]
    assert weigher.available(candidates) == sum(room.fits(small) for room in rooms)
