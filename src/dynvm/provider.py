"""The seam between the lease engine and what makes the machines.

The engine (``engine/``) and the API see hosts, their room and their
machines only through a ``Provider``. Xen is the one provider today (``xen/provider.py``);
everything Xen-specific — xapi sessions, the marker in ``other_config``, template choice,
memory overhead, IP extraction, clone tasks, quarantine by halting and tagging — lives
under ``xen/``, each rule in one place.

What the engine keeps, whatever the provider: the leases and requests (the database),
naming, placement (``engine/placement.py``: one VM at a time to the pool with most room), the
queue and its forecast, quotas, expiry, and the judgement of what a machine is (held by an
active lease, left behind by an ended one, or unknown to this database: ``LeakJudge``).

Adding a provider (a static pool of existing machines, libvirt, a cloud) is a new package
beside ``xen/`` with a ``ProviderPlugin`` (below): a kind of host section of its own
(``hosts.py``) and the ``Provider`` for those hosts, named in ``hosts.BUILTIN`` or
installed as a ``dynvm.providers`` entry point. The config picks it by its sections;
nothing in the engine or the API changes (``providers.py`` gives each host to its kind). A
provider that cannot do something answers in the engine's terms: a static pool has no
``need`` for an OS it does not hold, ``create`` hands out an idle machine of that OS
(marking it taken), ``destroy`` gives it back wiped, ``pending_job`` is always ``None``.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from .config import Settings
from .hosts import HostKind, HostSettings
from .model import CreatedVm, VmSpec
from .store.db import Database

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


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
    disk: int | None = None  # its own storage's free bytes (local SRs); None: the pool's is shared

    def fits(self, need: Need) -> int:
        if need.cpus <= 0 or need.memory <= 0:
            return 0
        fit = min(self.cpus // need.cpus, self.memory // need.memory)
        if self.disk is not None and need.disk > 0:
            fit = min(fit, self.disk // need.disk)
        return max(0, int(fit))


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
        """How many VMs of ``need`` fit: weighed for every host at every look, so a host of
        one member (most of them) is weighed without a generator."""
        members = self.members
        fit = members[0].fits(need) if len(members) == 1 else sum(m.fits(need) for m in members)
        if need.disk > 0:
            fit = min(fit, self.disk // need.disk)
        return max(0, fit)

    def shape(self) -> tuple[object, ...]:
        """What decides how many VMs of any need fit here (``placement.Weigher``): its
        disk and each member's room, the members' refs aside."""
        return (self.disk, *((m.cpus, m.memory, m.disk) for m in self.members))

    def copy(self) -> HostRoom:
        """A room of its own to take from (its members copied)."""
        return HostRoom(self.ref, self.disk, [replace(m) for m in self.members])

    def take(self, need: Need) -> str:
        """Take one VM's room on the member with most room for it; its ref."""
        best = max(self.members, key=lambda m: (m.fits(need), m.memory))
        best.cpus -= need.cpus
        best.memory -= need.memory
        if best.disk is not None:
            best.disk -= need.disk
        self.disk -= need.disk
        return best.ref


@dataclass(frozen=True)
class MemberStatus:
    """One host of a pool (a lone host's only one)."""

    ref: str
    name: str
    master: bool
    enabled: bool
    live: bool
    cpus: int
    memory_total: int
    memory_free: int
    running_vms: int

    @property
    def reason(self) -> str:
        """Why no VM goes there now, or "" when they may."""
        if not self.live:
            return "down: the pool's master has lost touch with it"
        if not self.enabled:
            return "disabled (maintenance): xapi starts no VM there"
        return ""


@dataclass(frozen=True)
class HostStatus:
    """What a configured host (a pool) is now, as the provider last saw it."""

    ref: str
    up: bool
    state: str  # "up", "down", "connecting": the provider's words, shown as they are
    error: str = ""
    name: str = ""
    cpus: int = 0
    memory_total: int = 0
    memory_free: int = 0
    running_vms: int = 0
    members: tuple[MemberStatus, ...] = ()
    same_pool_as: str = ""  # the ref of the configured host that counts this one's pool, if another
    pool_id: str = ""  # what the provider knows the pool by (its uuid on Xen); "" while not known

    @property
    def is_pool(self) -> bool:
        return len(self.members) > 1


@dataclass(frozen=True)
class Machine:
    """A VM on a host, as the API lists it."""

    host_ref: str
    ref: str
    uuid: str
    name: str
    description: str
    power_state: str
    running: bool
    vcpus: str  # as the host gives it (the seed's /showall answers these strings)
    memory: str
    addresses: tuple[str, ...]
    networkinfo: str
    member: str = ""  # the name of the pool member it runs on ("" when not known)
    lease_id: str | None = None  # the lease its marker names
    ours: bool = False  # carries dynvm's marker (of any installation)


@dataclass(frozen=True)
class DestroyResult:
    """What a destroy did. ``disks_left``: disks that would not go (uuid: reason); they
    keep dynvm's marker and reconcile destroys them."""

    disks_left: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuarantinedVm:
    name: str
    uuid: str
    host_ref: str
    lease_id: str
    quarantined_at: float
    destroy_at: float
    held_by: str = ""  # the request its host says holds it ("" when none)


@dataclass
class ReconcileReport:
    orphans_destroyed: list[str] = field(default_factory=list)  # VM names
    vanished: list[str] = field(default_factory=list)  # lease names closed
    failed_creates: list[str] = field(default_factory=list)  # creates of a dead process
    quarantined: list[str] = field(default_factory=list)  # VMs (and disks) this database does not know
    disks_destroyed: list[str] = field(default_factory=list)  # uuids of disks no VM or lease held
    errors: list[str] = field(default_factory=list)

    def guarded(self, what: str, step: Callable[..., object], *args: object) -> None:
        """Run one step of a pass; one that fails is logged and counted, and the pass goes on."""
        try:
            step(*args)
        except Exception as e:
            log.warning("reconcile: %s: %s", what, e)
            self.errors.append(f"{what}: {e}")


class Verdict(enum.Enum):
    """What a machine (or disk) made for a lease is, in the engine's eyes."""

    KEEP = "keep"  # an active lease holds it
    ENDED = "ended"  # its lease ended, moved elsewhere, or holds another machine: destroy it
    UNKNOWN = "unknown"  # this database does not know its lease: quarantine it first


class QuarantineStep(enum.Enum):
    QUARANTINE = "quarantine"  # the first time it is seen: halt and tag it
    WAIT = "wait"  # its quarantine is not over
    DESTROY = "destroy"


class LeakJudge(Protocol):
    """The engine's side of a leak collection: the provider finds what this installation
    made; the judge says what each is."""

    def verdict(
        self,
        lease_id: str,
        host_ref: str | None = None,
        machine_uuid: str | None = None,
        held_by: str | None = None,
    ) -> Verdict:
        """A machine of ``lease_id`` found as ``machine_uuid`` on ``host_ref``, held (its
        host says) by request ``held_by``; a loose disk when both are None (kept while its
        lease is active anywhere)."""
        ...

    def quarantine_step(self, quarantined_at: float | None) -> QuarantineStep: ...

    def now(self) -> float: ...


class Cancel(Protocol):
    def is_set(self) -> bool: ...


class Provider(Protocol):
    """What the engine asks of a kind of machines. Every method may be called from any
    thread at once; none may block for long except ``create``, ``destroy`` and ``adopt``.
    ``host`` is always a configured host (``Settings.hosts``)."""

    # -- the provider's own life (runtime.Services calls these) ---------------------------

    def apply(self, settings: Settings) -> None:
        """The configuration changed (or was loaded): watch the hosts it names."""
        ...

    def wait_synced(self, timeout: float) -> bool: ...

    def stop(self) -> None: ...

    # -- hosts and their room (read from memory: no remote call) ----------------------------

    def status(self, host: HostSettings) -> HostStatus | None:
        """None: not known yet (configured a moment ago)."""
        ...

    def need(self, host: HostSettings, os: str, cpus: int | None, memory: int | None) -> Need | None:
        """What one VM of ``os`` takes on ``host`` (None: it cannot be made there now)."""
        ...

    def room(
        self, host: HostSettings, overcommit: float, reserved: Iterable[Mapping[str, object]], empty: bool = False
    ) -> HostRoom | None:
        """What is left on ``host`` less ``reserved`` (its reservations: lease_id, member,
        cpus, memory, disk); None while it is down. ``empty``: as if no machine of dynvm's
        were on it (the most it could ever hold)."""
        ...

    def shortage(self, host: HostSettings, os: str) -> str | None:
        """Why ``host`` gives no VM of ``os`` however empty (down, no template), or None."""
        ...

    def template_problems(self, host: HostSettings) -> list[str]:
        """Configuration lines for ``host`` that pick nothing to make VMs from."""
        ...

    # -- one machine ------------------------------------------------------------------------

    def create(
        self,
        host: HostSettings,
        spec: VmSpec,
        progress: Progress,
        cancel: Cancel | threading.Event,
        on_pending: Callable[[str], None],
        attempt: int,
    ) -> CreatedVm:
        """One attempt at a machine, ready with an address; when it fails, nothing it made
        is left and ``ProvisionError`` says why (its ``kind``: the engine alone decides
        whether and where to try again). ``on_pending(handle)`` is called when a remote job
        starts whose result would be a machine not yet marked: the engine stores the handle
        as the lease's machine ref until the create returns. ``attempt``: the engine's count
        (1 first), for the provider's log."""
        ...

    def hand_out(self, host: HostSettings, machine_ref: str, spec: VmSpec) -> None:
        """A ready machine (made for ``spec.lease_id``) becomes ``spec.holder``'s, just
        before the database hands it over: the holder is written where the machine lives
        (compare-and-set: ``HeldElsewhere`` when it says another request holds it), and a
        ready-pool machine is named and described as if made for it. Raises
        ``ProvisionError`` when it cannot be (gone, stopped)."""
        ...

    def pending_job(self, machine_ref: str) -> str | None:
        """The job a handle from ``on_pending`` names, or None for a real machine ref."""
        ...

    def adopt(self, host: HostSettings, job: str, lease_id: str, wait: float) -> str | None:
        """The machine a job the engine stopped waiting for made (marked for ``lease_id``),
        waiting up to ``wait`` seconds for it to end; None when it made none."""
        ...

    def destroy(
        self, host: HostSettings, machine_ref: str, lease_id: str | None, holder: str | None = None
    ) -> DestroyResult:
        """Destroy one machine and its disks. Raises ``NotDynvmVm`` for one without this
        installation's marker (never touched), ``HeldElsewhere`` for one the host says a
        request other than ``holder`` holds, and any error when it could not."""
        ...

    # -- the installation's claim (engine/claim.py) --------------------------------------------

    def read_claim(self, host: HostSettings) -> str | None:
        """This installation's claim as ``host`` keeps it (None: none, or the host is not
        reached, or it is counted under another section)."""
        ...

    def write_claim(self, host: HostSettings, claim: str) -> None:
        """Keep ``claim`` on ``host`` for this installation (nothing while it is down)."""
        ...

    # -- what this installation owns ----------------------------------------------------------

    def machines(self, host: HostSettings) -> list[Machine]:
        """Every machine on ``host`` (not only dynvm's), or [] while it is down."""
        ...

    def made_for(self, host: HostSettings, machine: Machine, os: str) -> bool:
        """Whether ``machine`` was made for ``os`` by what it carries (without a lease)."""
        ...

    def collect_leaks(self, host: HostSettings, judge: LeakJudge, report: ReconcileReport) -> None:
        """Walk what this installation made on ``host`` (machines and disks) and act on the
        judge's verdict: destroy the ended, quarantine then destroy the unknown. Machines
        of other installations, and anything without the marker, are never touched."""
        ...

    def quarantined(self, host: HostSettings, keep_seconds: float) -> list[QuarantinedVm]: ...


@dataclass(frozen=True)
class ProviderContext:
    """What a plugin's provider is made with: the configuration (only its own kind's
    hosts), the installation id (written into every machine's mark), the clock it times
    creates on, and the engine's database, for a provider whose machines keep no mark of
    their own (``[staticN]``: which machine a lease holds is kept beside the lease)."""

    settings: Callable[[], Settings]
    installation: Callable[[], str]
    monotonic: Callable[[], float]
    event_timeout: float = 5.0  # how long a remote event watch waits before it looks again
    database: Database | None = None
    clock: Callable[[], float] = time.time  # Unix time, as the engine keeps it


class ProviderPlugin(HostKind, Protocol):
    """A kind of host (its section and settings) and the provider that leases from it."""

    def make_provider(self, context: ProviderContext) -> Provider:
        """Called once, the first time the configuration names a host of this kind."""
        ...
