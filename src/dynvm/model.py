"""Domain types shared across dynvm, and its error tree.

Every error dynvm raises on purpose is a ``DynvmError`` whose message is a sentence a
user can act on; it never contains a password.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .states import LeaseState


class DynvmError(Exception):
    """Base of every error dynvm raises on purpose."""


class XenError(DynvmError):
    """Something went wrong talking to a Xen host."""

    def __init__(self, message: str, host: str = "") -> None:
        super().__init__(message)
        self.host = host


class HostUnreachable(XenError):
    """The host does not answer (refused, timed out, or backing off after failures)."""


class HostAuthFailed(XenError):
    """The host refused dynvm's credentials."""


class FailureKind(enum.Enum):
    """Why one attempt at making a VM failed: all the engine's retries need to know
    (``engine/creator.py`` decides, from this alone, whether and where to try again)."""

    AGAIN = "again"  # this attempt went wrong (a failed call, a guest that never came up): try again
    NO_ADDRESS = "no address"  # the guest got no usable address (APIPA, DHCP exhausted): another host may do
    MEMBER_REFUSED = "member refused"  # the pool member it was placed on will not start it: another may
    HOST_UNREACHABLE = "host unreachable"  # the host stopped answering: another host may
    FINAL = "final"  # trying again cannot help (a configuration mistake, dynvm stopping)


class ProvisionError(XenError):
    """A VM could not be made; nothing it made is left behind unless ``leftovers`` says so.
    ``kind``: why, as the engine's retries need it; ``member``: with ``MEMBER_REFUSED``,
    the member that would not start it."""

    def __init__(
        self,
        message: str,
        host: str = "",
        leftovers: tuple[str, ...] = (),
        kind: FailureKind = FailureKind.FINAL,
        member: str = "",
    ) -> None:
        super().__init__(message, host)
        self.leftovers = leftovers
        self.kind = kind
        self.member = member


class NotDynvmVm(XenError):
    """dynvm refuses to touch a VM it did not create (no marker of this installation)."""


class HeldElsewhere(NotDynvmVm):
    """The host says another request holds this VM, whatever this database says (it was
    restored from a backup, say): it is not handed out or destroyed; reconcile quarantines it."""


class DestroyFailed(XenError):
    """xapi refused to shut down or destroy a VM; it keeps its marker, and reconcile
    tries again."""


@dataclass(frozen=True)
class VmSpec:
    """What to create: from which template, under which name, with which resources."""

    name: str
    os: str
    template: str  # name (or name prefix) of the template on the host
    lease_id: str  # written into other_config as dynvm's marker
    cpus: int | None = None  # None: the template's own
    memory: int | None = None  # bytes; None: the template's own
    member: str | None = None  # the pool member (host ref) to start it on; None: xapi chooses
    probe_port: int | None = None  # ready only once this TCP port of its address answers; None: no probe
    holder: str | None = None  # the request a hand-out gives it to (written on the host); None: no one yet


@dataclass(frozen=True)
class CreatedVm:
    uuid: str
    ref: str
    name: str
    ip: str
    os_version: dict[str, str] = field(default_factory=dict)
    cpus: int = 0
    memory: int = 0
    disk: int = 0  # bytes of its disks (not CD images)
    host: str = ""  # the host's ref ("1", "2", ...)
    template: str = ""
    create_seconds: float = 0.0
    attempts: int = 1
    member: str = ""  # the pool member (host ref) it runs on


class LeaseError(DynvmError):
    """A request the lease engine turns down; ``status`` is the fitting HTTP status and
    ``title`` the problem's title on /api/v1 (None: the status's own)."""

    status = 400
    title: str | None = None


class UnknownOs(LeaseError):
    status = 400


class NameInUse(LeaseError):
    status = 409


class NotEnoughCapacity(LeaseError):
    """A 4xx, not a 5xx: dynvm works; the pool is full. The answer says how many fit now,
    and why the hosts that give none do not (down, refusing dynvm's login, no template)."""

    status = 429
    title = "Not enough capacity"


class NoSuchLease(LeaseError):
    status = 404


class RequestCancelled(LeaseError):
    """The request's caller cancelled it (or hung up) before it was served; what was built
    for it was removed."""

    status = 409


class QueueTimedOut(LeaseError):
    """A request waited in the queue for as long as it was told to, and was not served."""

    status = 429


class BadRequest(LeaseError):
    status = 400


class CreateFailed(LeaseError):
    """Provisioning failed after its retries; everything built for the request was removed."""

    status = 502


class ReleaseFailed(LeaseError):
    """A VM could not be destroyed; its lease stays ``releasing`` and reconcile retries."""

    status = 502


class ShuttingDown(LeaseError):
    status = 503


class QuotaExceeded(LeaseError):
    status = 429
    title = "Quota exceeded"


class Forbidden(LeaseError):
    status = 403


class Unauthorized(LeaseError):
    status = 401


@dataclass(frozen=True)
class Lease:
    """One VM of a request, from reservation to release. Times are Unix seconds."""

    id: str
    request_id: str
    name: str
    username: str
    os: str
    host_ref: str
    state: LeaseState
    cpus: int
    memory: int
    disk: int
    created_at: float
    expires_at: float
    owner: str
    template: str = ""
    vm_uuid: str | None = None
    vm_ref: str | None = None
    ip: str | None = None
    os_version: str | None = None
    ready_at: float | None = None
    released_at: float | None = None
    create_seconds: float | None = None
    error: str | None = None
    caller: str | None = None  # the authenticated user who asked; None when anonymous
    handed_over_at: float | None = None  # when the request answered with it; the lifetime starts
    member: str | None = None  # the pool member (host ref) it was placed on and starts on
    pooled: bool = False  # a ready-pool VM no request has taken yet ([pools])
    pooled_at: float | None = None  # when it joined its ready pool (None: made for its request)

    @property
    def lifetime(self) -> float:
        """Seconds it lives once handed over (before that, ``expires_at`` is reckoned from
        ``created_at``; the hand-over moves it)."""
        start = self.handed_over_at if self.handed_over_at is not None else self.created_at
        return self.expires_at - start


@dataclass(frozen=True)
class LeaseRequest:
    username: str
    os: str
    count: int = 1
    cpus: int | None = None
    memory: int | None = None
    expires_in_minutes: float | None = None  # None: [common] vm.expiry.minutes
    host_ref: str | None = None
    caller: str | None = None  # the authenticated user; None when anonymous
    request_id: str | None = None  # given by callers that track progress; else made here


@dataclass(frozen=True)
class Caller:
    """Who asks: ``user`` None is anonymous (allowed only while [auth] required=false)."""

    user: str | None = None
    admin: bool = False

    def may_touch(self, lease: Lease) -> bool:
        return self.admin or lease.caller is None or lease.caller == self.user


ANONYMOUS = Caller()


def vm_names(username: str, count: int) -> list[str]:
    """``count=1``: the VM is named after the user; more: ``<user>1`` ... ``<user><count>``."""
    return [username] if count == 1 else [f"{username}{n}" for n in range(1, count + 1)]


NAME_DIGITS = "0123456789"  # what a request adds to its username to name its VMs


def name_root(name: str) -> str:
    """A name without its trailing digits. Two names of which one is the other plus
    digits have one root; so do a username and every name a request for it makes: two
    callers' names can only clash under one root (``engine/names.py``), and the database
    finds the leases under a root by an index of this same expression
    (``store/tables.py``: ``rtrim(name, '0123456789')``)."""
    return name.rstrip(NAME_DIGITS)
