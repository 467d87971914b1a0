"""Per-user limits (``[quota]``): how many VMs, and how much VM memory, one user may hold.
Counted inside a reservation's transaction, with every host locked (``host_locks.py``: a
reservation under a quota never locks only its own hosts), so that two requests of one user
never both pass the limit."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from ..config import Settings
from ..model import LeaseRequest, QuotaExceeded
from .context import EngineContext


def check_quota(
    ctx: EngineContext, settings: Settings, request: LeaseRequest, memory: list[int], conn: Connection
) -> None:
    """Refuse (``QuotaExceeded``) a request that would take its user past a limit;
    ``memory``: what each of its VMs holds. The user is the caller when authenticated,
    else the name the VMs are requested under."""
    quota = settings.quota
    if not quota.vms_per_user and not quota.memory_per_user:
        return
    subject = request.caller or request.username
    mine = [lease for lease in ctx.leases.active(conn) if (lease.caller or lease.username) == subject]
    if quota.vms_per_user and len(mine) + request.count > quota.vms_per_user:
        raise QuotaExceeded(
            f"{subject} holds {len(mine)} VM(s); {request.count} more would pass the limit of "
            f"{quota.vms_per_user} ([quota] vms.per.user): release some first"
        )
    held = sum(lease.memory for lease in mine)
    if quota.memory_per_user and held + sum(memory) > quota.memory_per_user:
        raise QuotaExceeded(
            f"{subject} holds {held / 1024**3:g} GiB of VM memory; {sum(memory) / 1024**3:g} GiB more would "
            f"pass the limit of {quota.memory_per_user / 1024**3:g} GiB ([quota] memory.gib.per.user)"
        )
