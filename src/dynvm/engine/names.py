"""Which VM names a request may have (SPEC.md: ``<username>``, or ``<username>1`` ...
``<username>N``): none an active lease holds, none under another authenticated user's
prefix, and none a machine on a host already has (dynvm never reuses or touches a VM it
did not create). Each check raises ``NameInUse``, a 409 that says what to do."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from ..config import Settings
from ..model import Lease, LeaseRequest, NameInUse, name_root, vm_names
from .context import EngineContext


def refuse_leased(taken: list[Lease], request: LeaseRequest) -> None:
    """409, with the command that releases exactly the names that clash: the same user and
    count when they are all of them, else the names one by one."""
    if not taken:
        return
    clash = sorted(lease.name for lease in taken)
    if clash == sorted(vm_names(request.username, request.count)):
        how = f"releaseservers/{request.username}?count={request.count}"
    else:
        how = f"dynvm release {' '.join(clash)}"
    raise NameInUse(f"{', '.join(clash)} already leased by dynvm: release them first ({how}) or use another name")


def refuse_taken(ctx: EngineContext, request: LeaseRequest, conn: Connection | None = None) -> None:
    """``refuse_leased``, then ``refuse_under_others``, on one read of the leases in their
    way (``LeaseStore.in_the_way``). ``conn``: the reservation's transaction, with the
    hosts locked (a prefix has no unique index)."""
    wanted = vm_names(request.username, request.count)
    named, others = ctx.leases.in_the_way(wanted, request.caller, name_root(request.username), conn)
    refuse_leased(named, request)
    refuse_under_others(others, request)


def refuse_under_others(others: list[Lease], request: LeaseRequest) -> None:
    """With tokens, a name prefix is its first holder's until all of its VMs are gone: 409
    when this request's names fall under another user's prefix (bob's ``al3`` under
    alice's ``al1``, ``al2``), or another user's names fall under this one's. An anonymous
    request (``[auth] required=false``) may not take a token holder's either; anonymous
    leases own no prefix, as the seed's never did. ``others``: the active leases of other
    callers whose names have the root of the request's (``LeaseStore.held_by_others``)."""
    mine = vm_names(request.username, request.count)
    for lease in others:
        theirs_over_mine = any(_under(name, lease.username) for name in mine)
        if theirs_over_mine or _under(lease.name, request.username):
            raise NameInUse(
                f"names under {lease.username if theirs_over_mine else request.username!r} belong to "
                f"{lease.caller} while {lease.name} is leased: use another name"
            )


def refuse_on_hosts(ctx: EngineContext, settings: Settings, names: list[str]) -> None:
    """409 when a machine on a host (dynvm's or not) already has one of the names."""
    wanted = set(names)
    for host in settings.hosts:
        clash = sorted({machine.name for machine in ctx.provider.machines(host) if machine.name in wanted})
        if clash:
            raise NameInUse(
                f"{', '.join(clash)} already exist(s) on host {host.ref}: choose another name "
                "(dynvm never reuses or touches a VM it did not create)"
            )


def _under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` itself or ``prefix`` and digits: a name a request for
    ``prefix`` makes."""
    rest = name[len(prefix) :] if name.startswith(prefix) else None
    return rest is not None and (rest == "" or (rest.isascii() and rest.isdigit()))
