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

import dataclasses
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..hosts import HostSettings
from ..model import Lease, NotEnoughCapacity
from ..provider import HostRoom, Need
from ..states import LeaseState

FULL_HINT = "; release some VMs or try again later"


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

    def new_lease(
        self,
        *,
        request_id: str,
        name: str,
        username: str,
        os: str,
        owner: str,
        now: float,
        lifetime_seconds: float,
        caller: str | None = None,
        pooled: bool = False,
    ) -> Lease:
        """The lease of a VM to be made here, in state ``creating``, holding the room its
        need says (memory: the template's static maximum, what the VM is made with)."""
        return Lease(
            id=str(uuid.uuid4()),
            request_id=request_id,
            name=name,
            username=username,
            os=os,
            host_ref=self.host.ref,
            state=LeaseState.CREATING,
            cpus=self.need.cpus,
            memory=self.need.static_max,
            disk=self.need.disk,
            created_at=now,
            expires_at=now + lifetime_seconds,
            owner=owner,
            template=self.need.template,
            caller=caller,
            member=self.member or None,
            pooled=pooled,
        )


def without_members(candidate: Candidate, members: set[str]) -> Candidate:
    """The candidate with no room on these members (they refused a VM just now)."""
    if not members:
        return candidate
    room = dataclasses.replace(candidate.room, members=[m for m in candidate.room.members if m.ref not in members])
    return dataclasses.replace(candidate, room=room)


def available(candidates: Iterable[Candidate]) -> int:
    return sum(c.room.fits(c.need) for c in candidates)


class Weigher:
    """``HostRoom.fits``, each room shape and need weighed once: a look at every OS over
    every host (a forecast) meets the same rooms again and again, empty hosts and hosts
    that hold alike. Made for one look and dropped after it (it keeps what it weighed)."""

    def __init__(self) -> None:
        self._fits: dict[tuple[tuple[object, ...], Need], int] = {}

    def fits(self, room: HostRoom, need: Need) -> int:
        key = (room.shape(), need)
        fit = self._fits.get(key)
        if fit is None:
            fit = self._fits[key] = room.fits(need)
        return fit

    def available(self, candidates: Iterable[Candidate]) -> int:
        return sum(self.fits(c.room, c.need) for c in candidates)


class Spread:
    """Candidates and how many more VMs each fits, kept as VMs are placed one at a time:
    placing a VM changes one host's room, so only that host is weighed again. What
    ``place`` and a pools pass (which places a VM at a time, across every host) use.
    The rooms are the candidates' own: a VM placed here has taken its room there."""

    def __init__(self, candidates: Iterable[Candidate]) -> None:
        self.candidates = list(candidates)
        self._fits = [c.room.fits(c.need) for c in self.candidates]
        self._order = [-int(c.host.ref) if c.host.ref.isdigit() else 0 for c in self.candidates]
        self._total = sum(self._fits)  # kept as VMs are placed: a pools pass asks before each

    def available(self, among: Callable[[Candidate], bool] | None = None) -> int:
        """How many more VMs fit, on every candidate or on those ``among`` allows."""
        if among is None:
            return self._total
        return sum(fits for c, fits in zip(self.candidates, self._fits, strict=True) if among(c))

    def take(self, among: Callable[[Candidate], bool] | None = None) -> Placement | None:
        """Place one VM on the candidate (of those ``among`` allows) with most room for it,
        the lower host ref first; None when none has room."""
        best = -1
        for i, c in enumerate(self.candidates):
            if self._fits[i] < 1 or (among is not None and not among(c)):
                continue
            if best < 0 or (self._fits[i], self._order[i]) > (self._fits[best], self._order[best]):
                best = i
        if best < 0:
            return None
        chosen = self.candidates[best]
        member = chosen.room.take(chosen.need)
        fits = chosen.room.fits(chosen.need)
        self._total += fits - self._fits[best]
        self._fits[best] = fits
        return Placement(chosen, member)


def place(count: int, os: str, candidates: list[Candidate]) -> list[Placement]:
    """A pool and a member per VM, most room first; ``NotEnoughCapacity`` when they do not fit."""
    spread = Spread(candidates)
    room_left = spread.available()
    if count > room_left:
        raise NotEnoughCapacity(
            f"not enough capacity for {count} {os} VM(s): {room_left} can be made now"
            + ("" if room_left else FULL_HINT)
        )
    chosen = []
    for _ in range(count):
        one = spread.take()
        assert one is not None  # room_left counted it
        chosen.append(one)
    return chosen
