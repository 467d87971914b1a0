"""What the hosts can hold, as the engine weighs it: where a VM could go (candidates, with
what in-flight creates reserve), why a host gives nothing, and the per-host views the API
shows. Reads only; the transaction that reserves room is ``admission.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from ..config import Settings
from ..hosts import HostSettings
from ..model import LeaseRequest, UnknownOs
from ..provider import HostRoom, HostStatus, Machine, Provider
from ..store.leases import LeaseStore
from . import placement


@dataclass(frozen=True)
class HostReport:
    """A configured host as the API shows it: what the provider sees, and how many more
    VMs of each of its OSes fit now."""

    host: HostSettings
    status: HostStatus
    capacity: dict[str, int]


class Capacity:
    def __init__(self, settings: Callable[[], Settings], provider: Provider, leases: LeaseStore) -> None:
        self._settings = settings
        self.provider = provider
        self.leases = leases

    def candidates(
        self,
        settings: Settings,
        os: str,
        cpus: int | None,
        memory: int | None,
        reserved: list[dict[str, object]],
        only: str | None = None,
        rooms: dict[str, HostRoom | None] | None = None,
    ) -> list[placement.Candidate]:
        """Where a VM of ``os`` (``cpus``/``memory``: as asked, None: its template's) could
        go, host by host (``only``: on that host), counting ``reserved`` as taken.
        ``rooms``: every host's room as ``rooms`` weighed it with the same ``reserved``,
        shared, not copied (a look at every OS weighs each host once): the caller only
        reads them, or copies one before it changes it (``ReadyStock.give_back_idle``)."""
        out = []
        by_host = reservations_by_host(reserved) if rooms is None else {}
        for host in settings.hosts:
            if only is not None and host.ref != only:
                continue
            need = self.provider.need(host, os, cpus, memory)
            if need is None:
                continue
            if rooms is not None:
                room = rooms.get(host.ref)
            else:
                room = self.provider.room(host, settings.common.cpu_overcommit, by_host.get(host.ref, []))
            if room is not None:
                out.append(placement.Candidate(host, room, need))
        return out

    def rooms(self, settings: Settings, reserved: list[dict[str, object]]) -> dict[str, HostRoom | None]:
        """Every host's room, ``reserved`` counted as taken: what ``candidates`` shares
        among the OSes when one look weighs them all (a room does not depend on the OS)."""
        by_host = reservations_by_host(reserved)
        overcommit = settings.common.cpu_overcommit
        return {host.ref: self.provider.room(host, overcommit, by_host.get(host.ref, [])) for host in settings.hosts}

    def reservations(self, conn: Connection) -> list[dict[str, object]]:
        """The reservations of creates in flight, each on the configured host that counts
        its pool: one made on a section that turned out to name a pool an earlier section
        counts (its leases move there at the next reconcile) holds room there at once."""
        rows = self.leases.pending_reservations(conn)
        # hot path: only the hosts that hold a reservation are looked at
        moved = self.same_pools(self._settings(), {str(row["host_ref"]) for row in rows}) if rows else {}
        if not moved:
            return rows
        return [{**row, "host_ref": moved.get(str(row["host_ref"]), row["host_ref"])} for row in rows]

    def reserved_now(self) -> list[dict[str, object]]:
        """The reservations as they are now (read outside any reservation's transaction:
        for views and estimates, never to decide a placement)."""
        with self.leases.db.read() as conn:
            return self.reservations(conn)

    def same_pools(self, settings: Settings, among: set[str] | None = None) -> dict[str, str]:
        """Configured host ref -> the ref of the earlier section that counts its pool, for
        every section (``among``: of these refs) that names a pool another section counts."""
        out = {}
        for host in settings.hosts:
            if among is not None and host.ref not in among:
                continue
            status = self.provider.status(host)
            if status is not None and status.same_pool_as:
                out[host.ref] = status.same_pool_as
        return out

    def other_pools(self, a: str, b: str) -> bool:
        """Whether configured hosts ``a`` and ``b`` are known to be different pools: both
        reached, with pools of their own. A host that is gone from the configuration, or
        not reached yet, may be the same pool, so nothing of it is judged left behind."""
        settings = self._settings()
        ids = []
        for ref in (a, b):
            host = settings.host(ref)
            status = self.provider.status(host) if host is not None else None
            if status is None or not status.pool_id:
                return False
            ids.append(status.pool_id)
        return ids[0] != ids[1]

    def explain_shortage(self, settings: Settings, message: str, request: LeaseRequest) -> str:
        """Add why the hosts that give nothing give nothing: down (and why), refusing
        dynvm's login, or without the template."""
        reasons = []
        for host in settings.hosts:
            if request.host_ref is not None and host.ref != request.host_ref:
                continue
            reason = self.provider.shortage(host, request.os)
            if reason is not None:
                reasons.append(reason)
        if not reasons:
            return message
        return message.removesuffix(placement.FULL_HINT) + "; " + "; ".join(reasons)

    @staticmethod
    def check_os(settings: Settings, os: str) -> None:
        if not any(os in host.templates for host in settings.hosts):
            known = ", ".join(settings.os_keys) or "none (no host is configured)"
            raise UnknownOs(f"unknown OS {os!r}; the OSes that exist are: {known}")

    def template_problems(self) -> list[str]:
        """Every ``<os>.template`` line that picks no template on its (answering) host:
        missing, or ambiguous. Logged at start-up; that OS gets no VM on that host."""
        return [problem for host in self._settings().hosts for problem in self.provider.template_problems(host)]

    def host_statuses(self) -> dict[str, HostStatus]:
        """What the provider sees of each configured host it knows, by ref (no capacity)."""
        out = {}
        for host in self._settings().hosts:
            status = self.provider.status(host)
            if status is not None:
                out[host.ref] = status
        return out

    def host_reports(self) -> list[HostReport]:
        """Every configured host the provider knows, in the configuration's order."""
        settings = self._settings()
        reserved = self.reserved_now()
        out = []
        by_host = reservations_by_host(reserved)
        for host in settings.hosts:
            status = self.provider.status(host)
            if status is None:
                continue
            # the host's room is the same for every OS: read it once (a host holds hundreds of VMs)
            mine = by_host.get(host.ref, [])
            room = self.provider.room(host, settings.common.cpu_overcommit, mine)
            per_os = {}
            for os in sorted(host.templates):
                need = self.provider.need(host, os, None, None)
                per_os[os] = room.fits(need) if room is not None and need is not None else 0
            out.append(HostReport(host, status, per_os))
        return out

    def machines(self, os: str | None = None) -> dict[str, list[Machine]]:
        """The machines on every configured host (a host that is down has none listed), by
        host ref; with ``os``, only the running ones made for that OS: by their lease's OS,
        or, for one without a lease, by what the provider finds on it."""
        settings = self._settings()
        if os is not None:
            self.check_os(settings, os)
        lease_os = {lease.id: lease.os for lease in self.leases.active()} if os else {}
        out: dict[str, list[Machine]] = {}
        for host in settings.hosts:
            found = self.provider.machines(host)
            if os is not None:
                found = [
                    m
                    for m in found
                    if m.running
                    and (
                        lease_os.get(m.lease_id or "") == os
                        or (os in host.templates and self.provider.made_for(host, m, os))
                    )
                ]
            out[host.ref] = found
        return out


def reservations_by_host(reserved: list[dict[str, object]]) -> dict[str, list[dict[str, object]]]:
    """The reservations grouped by host ref: read once, not filtered again host by host."""
    out: dict[str, list[dict[str, object]]] = {}
    for row in reserved:
        out.setdefault(str(row["host_ref"]), []).append(row)
    return out
