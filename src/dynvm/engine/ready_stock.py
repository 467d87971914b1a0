"""The ready pools' VMs as a request sees them: which idle ready VMs of an OS it may take,
and the room they would give back if they made way. Reads only: making, recycling and
sizing the pools is ``ready_pools.py``'s; taking one is ``admission.py``'s transaction.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable

from sqlalchemy import Connection

from ..config import Settings
from ..model import Lease
from ..provider import HostRoom, Provider
from ..states import LeaseState
from ..store.leases import LeaseStore
from . import placement

POOL_USER = "dynvm-pool"  # the username of a ready VM no request has taken yet


def oldest_first(lease: Lease) -> tuple[float, float, int, str]:
    """Ready VMs in the order they joined their pool; VMs that joined at the same moment by
    when they were made, then by host (not by their random names), so the same demand always
    takes the same hosts' VMs (``dynvm replay`` is repeatable)."""
    ref = lease.host_ref
    return (lease.pooled_at or 0.0, lease.created_at, int(ref) if ref.isdigit() else 0, ref)


def pool_name(os: str) -> str:
    """A ready VM's name until a request takes it: never one getservers would make for a
    user (``vm_names`` keeps a user's name; this one is dynvm's)."""
    return f"{POOL_USER}-{os}-{uuid.uuid4().hex[:8]}"


def give_back(room: HostRoom, lease: Lease) -> None:
    """Count a ready VM's CPUs, memory and disk as free again in ``room`` (its memory
    without xapi's overhead: the estimate errs on the side of too little room)."""
    member = next((m for m in room.members if m.ref == (lease.member or "")), room.members[0] if room.members else None)
    if member is not None:
        member.cpus += lease.cpus
        member.memory += lease.memory
    room.disk += lease.disk


def is_idle(lease: Lease) -> bool:
    """Ready, in its pool, and no request has it."""
    return lease.state == LeaseState.READY and lease.pooled and lease.pooled_at is not None


class ReadyStock:
    def __init__(self, provider: Provider, leases: LeaseStore, clock: Callable[[], float]) -> None:
        self.provider = provider
        self.leases = leases
        self._clock = clock

    @staticmethod
    def eligible(settings: Settings, os: str, cpus: int | None, memory: int | None) -> bool:
        """Whether a request may take ready VMs: it asks for the template's own size, of an
        OS a pool is kept for (``ReadyPoolSettings.keeps``; the idle VMs left of a pool taken
        out of the configuration are like other OSes' until the next pass recycles them)."""
        return cpus is None and memory is None and settings.ready_pools.keeps(os)

    def idle(
        self,
        settings: Settings,
        os: str,
        host_ref: str | None = None,
        limit: int | None = None,
        conn: Connection | None = None,
    ) -> list[Lease]:
        """Ready VMs of ``os`` waiting for a request (on ``host_ref`` when pinned), oldest
        first, and only those whose host shows them running with their address: a VM that
        died or lost its address is never handed out. ``limit``: at most that many;
        ``conn``: read inside the caller's transaction."""
        now = self._clock()
        pooled = sorted(
            (
                lease
                for lease in self.leases.idle_pooled(os, conn)
                if lease.expires_at > now  # stale: the next pass recycles it
                and (host_ref is None or lease.host_ref == host_ref)
            ),
            key=oldest_first,
        )
        found: list[Lease] = []
        running: dict[str, dict[str, tuple[str, ...]]] = {}  # host ref -> uuid -> addresses, if running
        for lease in pooled:
            if limit is not None and len(found) >= limit:
                break
            if lease.host_ref not in running:
                running[lease.host_ref] = self.running_on(settings, lease.host_ref)
            if (lease.ip or "") in running[lease.host_ref].get(lease.vm_uuid or "", ()):
                found.append(lease)
        return found

    def running_on(self, settings: Settings, host_ref: str) -> dict[str, tuple[str, ...]]:
        """uuid -> addresses of the machines running on a configured host."""
        host = settings.host(host_ref)
        if host is None:
            return {}
        return {m.uuid: m.addresses for m in self.provider.machines(host) if m.running}

    def give_back_idle(
        self, candidates: list[placement.Candidate], exclude: set[str], pooled: list[Lease] | None = None
    ) -> list[placement.Candidate]:
        """``candidates`` with the room of every ready VM no request has (but ``exclude``)
        counted as free: what a request could have once they make way. ``pooled``: the
        pools as already read. The rooms given are never changed: a host that gets room
        back gets a copy of its own, the others keep theirs (shared rooms cost nothing)."""
        by_host = {c.host.ref: n for n, c in enumerate(candidates)}
        out = list(candidates)
        copied: set[int] = set()
        for lease in self.leases.pooled() if pooled is None else pooled:
            n = by_host.get(lease.host_ref)
            if n is None or lease.state != LeaseState.READY or lease.id in exclude:
                continue
            if n not in copied:
                out[n] = dataclasses.replace(out[n], room=out[n].room.copy())
                copied.add(n)
            give_back(out[n].room, lease)
        return out
