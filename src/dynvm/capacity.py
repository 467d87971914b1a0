"""How many more VMs of an OS fit, and where a request's VMs go (SPEC.md §3).

A configured host is a pool: one host, or a master and its members. The provider says
what is left per member (CPU and memory) and per pool (disk), less what in-flight creates
have reserved (``xen/room.py`` for Xen), and what one VM of an OS needs there. From here
on it is the engine's rule, whatever the provider: a member fits
``min(cpu // need, memory // need)`` VMs; a pool fits the sum over its members, capped by
its disk; a pool is never summed into one big host. Placement takes one VM at a time to
the pool with the most room left for it, and there to the member with the most, so a
request spreads; ``xhostref`` pins it to one pool.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .config import HostSettings
from .model import NotEnoughCapacity

FULL_HINT = "; release some VMs or try again later"


@dataclass(frozen=True)
class Need:
    """What one VM takes on a host: from its template unless the request says otherwise."""

    cpus: int
    memory: int  # what the host must have free: memory_static_max + overhead
    disk: int
    template: str
    static_max: int = 0  # memory_static_max alone (what the lease records)


@dataclass
class MemberRoom:
    ref: str  # the member's host ref ("" when the pool's members are not known)
    cpus: float
    memory: int

    def fits(self, need: Need) -> int:
        if need.cpus <= 0 or need.memory <= 0:
            return 0
        return max(0, int(min(self.cpus // need.cpus, self.memory // need.memory)))


@dataclass
class HostRoom:
    """What is left in one configured host (a pool): per member, and the pool's disk."""

    ref: str
    disk: int
    members: list[MemberRoom] = field(default_factory=list)

    @property
    def cpus(self) -> float:
        return sum(m.cpus for m in self.members)

    @property
    def memory(self) -> int:
        return sum(m.memory for m in self.members)

    def fits(self, need: Need) -> int:
        by_disk = self.disk // need.disk if need.disk > 0 else 1 << 30
        return max(0, min(sum(m.fits(need) for m in self.members), by_disk))

    def take(self, need: Need) -> str:
        """Take one VM's room on the member with most room for it; its ref."""
        best = max(self.members, key=lambda m: (m.fits(need), m.memory))
        best.cpus -= need.cpus
        best.memory -= need.memory
        self.disk -= need.disk
        return best.ref


@dataclass(frozen=True)
class Candidate:
    host: HostSettings
    room: HostRoom
    need: Need


@dataclass(frozen=True)
class Placement:
    """Where one VM goes: a pool (``candidate``) and the member in it."""

    candidate: Candidate
    member: str

    @property
    def host(self) -> HostSettings:
        return self.candidate.host

    @property
    def need(self) -> Need:
        return self.candidate.need


def available(candidates: Iterable[Candidate]) -> int:
    return sum(c.room.fits(c.need) for c in candidates)


def place(count: int, os: str, candidates: list[Candidate]) -> list[Placement]:
    """A pool and a member per VM, most room first; ``NotEnoughCapacity`` when they do not fit."""
    room_left = available(candidates)
    if count > room_left:
        raise NotEnoughCapacity(
            f"not enough capacity for {count} {os} VM(s): {room_left} can be made now"
            + ("" if room_left else FULL_HINT)
        )
    chosen = []
    for _ in range(count):
        best = max(candidates, key=lambda c: (c.room.fits(c.need), -int(c.host.ref)))
        chosen.append(Placement(best, best.room.take(best.need)))
    return chosen
