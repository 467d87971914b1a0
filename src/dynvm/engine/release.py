"""Releasing leases: a user's release, expiry, a failed request's roll-back, reconcile and a
ready pool's recycling all go through ``Releaser.release``. It takes each lease into
``releasing`` as this process's (so two releasers, two threads or two replicas, never take
the same one), destroys its VM and disks side by side with the others, and ends it. A
destroy that fails never loses the lease: it stays ``releasing`` and reconcile tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..bounds import capped_lifetime_minutes
from ..config import Settings
from ..model import (
    ANONYMOUS,
    BadRequest,
    Caller,
    Forbidden,
    Lease,
    LeaseError,
    NameInUse,
    NoSuchLease,
    NotDynvmVm,
    vm_names,
)
from ..provider import DestroyResult
from ..states import Actor, LeaseState
from .context import EngineContext
from .tracker import DurableTracker

log = logging.getLogger(__name__)

RELEASE_RETRY = "release-retry"  # the owner of a lease whose destroy failed: whichever replica leads retries it


@dataclass
class ReleaseOutcome:
    """What a release did, name by name.

    ``released``: gone, VM and disks. ``finishing``: the user's part is done, and dynvm
    finishes the rest in the background (a disk that would not go yet, or a release
    another process is doing): name -> sentence. ``failed``: the VM could not be
    destroyed; the lease stays ``releasing`` and reconcile tries again: name -> sentence.
    ``already``: names of the same release that an earlier try already released (a retry
    after a partial failure names every VM it was asked for)."""

    released: list[str] = field(default_factory=list)
    finishing: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    already: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Every name the release took on (the seed's answer)."""
        return sorted([*self.released, *self.finishing, *self.failed, *self.already])

    def states(self) -> list[str]:
        """A sentence per VM, in name order: what became of each."""
        out = []
        for name in self.names:
            if name in self.failed:
                out.append(self.failed[name])
            elif name in self.finishing:
                out.append(self.finishing[name])
            elif name in self.already:
                out.append(f"{name} was already released")
            else:
                out.append(f"{name} is released")
        return out

    def add(self, other: ReleaseOutcome) -> None:
        self.released.extend(other.released)
        self.finishing.update(other.finishing)
        self.failed.update(other.failed)
        self.already.extend(other.already)


class Releaser:
    def __init__(self, ctx: EngineContext, tracker: DurableTracker) -> None:
        self.ctx = ctx
        self.tracker = tracker
        self._releasing: Counter[str] = Counter()  # lease ids this process is releasing right now
        self._lock = threading.Lock()

    def release(
        self,
        settings: Settings,
        candidates: list[Lease],
        only_from: list[LeaseState],
        final_state: LeaseState,
        reason: str = "",
        expect_owner: str | None = None,
        pooled: bool | None = None,
    ) -> tuple[ReleaseOutcome, list[Lease]]:
        """Take these leases (those still in ``only_from``, owned by ``expect_owner`` and
        still in a ready pool or not as ``pooled`` says, when given) into ``releasing`` as
        this process's, destroy their VMs, end them in ``final_state``. They count as this
        process's releases from before the claim until the end, so a reconcile pass in
        this process never redoes one meanwhile. Returns what happened and the leases taken."""
        ids = [lease.id for lease in candidates]
        with self._lock:
            self._releasing.update(ids)
        try:
            moved = set(
                self.ctx.leases.set_state(
                    ids,
                    LeaseState.RELEASING,
                    only_from,
                    by=Actor.RELEASER,
                    owner=self.ctx.owner,
                    expect_owner=expect_owner,
                    pooled=pooled,
                )
            )
            taken = [lease for lease in candidates if lease.id in moved]
            return self._destroy_all(settings, taken, final_state, reason), taken
        finally:
            self.ctx.room_freed.set()  # room was given back: the scheduler looks again
            with self._lock:
                self._releasing.subtract(ids)
                for lease_id in ids:
                    if self._releasing[lease_id] <= 0:
                        del self._releasing[lease_id]

    def roll_back(self, settings: Settings, ready: list[Lease], reason: str) -> None:
        """Destroy the ready VMs of a request that failed. They go through ``releasing``
        first, so a destroy that fails now is redone by reconcile, never forgotten."""
        for lease in ready:
            self.tracker.stage(lease.request_id, lease.name, "removed", error=reason)
        self.release(settings, ready, [LeaseState.READY], LeaseState.FAILED, reason)

    def is_releasing(self, lease_id: str) -> bool:
        """Whether this process is releasing that lease right now."""
        with self._lock:
            return lease_id in self._releasing

    # -- what users ask ----------------------------------------------------------------

    def release_user(self, username: str, count: int = 1, caller: Caller = ANONYMOUS) -> ReleaseOutcome:
        """Destroy the VMs ``getservers`` made for this user and count. Only dynvm's VMs (a
        lease and the VM's marker) are touched."""
        return self.release_names(vm_names(username, count), caller)

    def release_names(self, names: list[str], caller: Caller = ANONYMOUS) -> ReleaseOutcome:
        """Release these leases and say, name by name, what happened. Retrying is harmless:
        a release another process is doing is reported as finishing; one that failed
        earlier (its lease still ``releasing``) is tried again now."""
        ctx = self.ctx
        held = ctx.leases.by_name(names)
        for lease in held:
            if not caller.may_touch(lease):
                raise Forbidden(f"{lease.name} belongs to {lease.caller}: only they or an admin may release it")
        if not held:
            raise NoSuchLease(
                f"no VM named {', '.join(names)} is leased from dynvm: nothing to release "
                "(check the name, and the username and count used with getservers)"
            )
        creating = [
            lease.name for lease in held if lease.handed_over_at is None and lease.state != LeaseState.RELEASING
        ]
        if creating and len(creating) == len(held):
            raise NameInUse(f"{', '.join(creating)} still being created: release it once getservers has answered")
        outcome = ReleaseOutcome()
        releasing = [lease for lease in held if lease.state == LeaseState.RELEASING]
        alive = ctx.live_owners() if releasing else set()  # read only when it decides something
        retry: dict[str, list[Lease]] = {}  # by the owner they must still have when taken
        for lease in releasing:
            if lease.owner in alive and (lease.owner != ctx.owner or self.is_releasing(lease.id)):
                outcome.finishing[lease.name] = f"{lease.name} is already being released; dynvm finishes it"
            else:  # an earlier release that failed (owner RELEASE_RETRY), or whose process died
                retry.setdefault(lease.owner, []).append(lease)
        settings = ctx.settings()
        ready = [lease for lease in held if lease.state == LeaseState.READY and lease.handed_over_at is not None]
        done, taken = self.release(settings, ready, [LeaseState.READY], LeaseState.RELEASED)
        outcome.add(done)
        for owner, leases in retry.items():
            done, again = self.release(
                settings, leases, [LeaseState.RELEASING], LeaseState.RELEASED, expect_owner=owner
            )
            outcome.add(done)
            taken += again
        if not taken and not outcome.finishing:
            raise NoSuchLease(f"{', '.join(lease.name for lease in held)} already released or expiring")
        asked = {lease.name for lease in held}
        requests_of = {lease.request_id for lease in held}
        outcome.already = sorted(ctx.leases.released_names([n for n in names if n not in asked], requests_of))
        return outcome

    def extend(self, name: str, minutes: float, caller: Caller = ANONYMOUS) -> Lease:
        """Move a ready lease's expiry to ``minutes`` from now, capped at the maximum."""
        ctx = self.ctx
        found = ctx.leases.by_name([name])
        lease = found[0] if found else None
        if lease is None or lease.state != LeaseState.READY:
            raise NoSuchLease(f"no ready VM named {name} is leased from dynvm")
        if lease.handed_over_at is None:
            raise NameInUse(f"{name} is still being created: extend it once its request has answered")
        if not caller.may_touch(lease):
            raise Forbidden(f"{lease.name} belongs to {lease.caller}: only they or an admin may extend it")
        if not minutes > 0:
            raise BadRequest("the new lifetime must be a positive number of minutes")
        minutes = capped_lifetime_minutes(ctx.settings(), minutes)
        ctx.leases.extend(lease.id, ctx.clock() + minutes * 60)
        return ctx.leases.get(lease.id) or lease

    # -- destroying --------------------------------------------------------------------

    def _destroy_all(
        self, settings: Settings, leases: list[Lease], final_state: LeaseState, reason: str = ""
    ) -> ReleaseOutcome:
        """Destroy these leases' VMs side by side: releasing eight VMs, or reaping a hundred,
        takes about as long as the slowest destroy, not the sum."""
        outcome = ReleaseOutcome()
        for one in self.ctx.side_by_side.map(lambda lease: self._destroy(settings, lease, final_state, reason), leases):
            outcome.add(one)
        return outcome

    def _destroy(self, settings: Settings, lease: Lease, final_state: LeaseState, reason: str = "") -> ReleaseOutcome:
        """Destroy one lease's VM and disks, then end the lease. When the VM cannot be
        destroyed (its host does not answer, xapi refuses), the lease stays ``releasing``
        and keeps its name, owned by ``RELEASE_RETRY``: the leader's reconcile tries again
        within a minute. A disk that will not go does not hold the lease: it keeps dynvm's
        marker and reconcile destroys it. Never raises for a VM's sake: one failing VM
        never stops the others. Called only through ``release``, which claimed it."""
        ctx = self.ctx
        outcome = ReleaseOutcome()
        started = time.monotonic()
        host = settings.host(lease.host_ref)
        result = DestroyResult()  # nothing left, unless the destroy below says otherwise
        try:
            ctx.refuse_if_contested()
        except LeaseError as e:
            ctx.leases.set_owner(lease.id, RELEASE_RETRY)  # redone by whichever dynvm may act
            outcome.failed[lease.name] = f"could not destroy {lease.name}: {e}"
            return outcome
        if lease.vm_ref and ctx.provider.pending_job(lease.vm_ref) is None:
            if host is None:  # out of dynvm's reach: the lease ends, the VM stays where it is
                reason = f"host {lease.host_ref} left the configuration; {lease.name} may still be on it"
                log.error("%s: %s", lease.name, reason)
            else:
                # a VM its host says this lease's request holds is destroyed only when this
                # database handed it over, or by the process that made it (a roll-back)
                holder = lease.request_id if lease.handed_over_at is not None or lease.owner == ctx.owner else None
                try:
                    result = ctx.provider.destroy(host, lease.vm_ref, lease.id, holder)
                except NotDynvmVm as e:
                    log.error("%s", e)  # never touched; the lease ends (it cannot hold this VM)
                except Exception as e:
                    ctx.leases.set_owner(lease.id, RELEASE_RETRY)
                    outcome.failed[lease.name] = (
                        f"could not destroy {lease.name} on {host.display} ({e}); dynvm tries again within a minute"
                    )
                    log.warning("%s: destroy failed (%s); reconcile will retry", lease.name, e)
                    return outcome
        with ctx.leases.db.write() as conn:  # the lease ends, and its VM's history says so, together
            ended = ctx.leases.finish(
                [lease.id], final_state, ctx.clock(), reason or None, by=Actor.RELEASER, conn=conn
            )
            current = ended[0] if ended else (ctx.leases.get(lease.id, conn) or lease)
            ctx.history.record_deleted(current, time.monotonic() - started, conn)
        if result.disks_left:
            outcome.finishing[lease.name] = (
                f"{lease.name} is gone, but {len(result.disks_left)} of its disk(s) could not be deleted yet "
                f"({'; '.join(result.disks_left)}); dynvm deletes them within a minute"
            )
        else:
            outcome.released.append(lease.name)
        ctx.report("ended", current, final_state)
        log.info("%s: %s%s", lease.name, final_state, f" ({reason})" if reason else "")
        return outcome
