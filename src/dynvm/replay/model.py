"""The hosts of a replay: a ``Provider`` (``provider.py``) over an in-process model, on
the replay's virtual clock, so that dynvm's own engine — placement, the queue, the ready
pools and their sizing — runs a week of demand in seconds.

Each host is the simulator's default size (32 CPUs, 128 GiB with 4 for dom0, a 2 TiB SR).
A VM takes its OS's size (``SIZES``) and holds its room from its create on. A VM made for
a request is made at once (the replay counts its create time for the user); a ready-pool
VM's create returns only once the virtual clock has moved ``create_seconds`` on, as a real
one would, so the pool is never ready sooner than a real lab's. Destroying one gives its
room back at once. Nothing here talks to anything: no sockets.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from ..config import Settings, windows_os
from ..engine.ready_stock import POOL_USER
from ..hosts import HostSettings
from ..model import CreatedVm, HeldElsewhere, NotDynvmVm, ProvisionError, VmSpec
from ..provider import (
    Cancel,
    DestroyResult,
    HostRoom,
    HostStatus,
    LeakJudge,
    Machine,
    MemberRoom,
    Need,
    Progress,
    QuarantinedVm,
    ReconcileReport,
)

GiB = 1024**3
HOST_CPUS = 32
HOST_MEMORY = 128 * GiB
DOM0_MEMORY = 4 * GiB
HOST_DISK = 2 * 1024 * GiB
SIZES = {"linux": (4, 4 * GiB, 35 * GiB), "windows": (6, 6 * GiB, 71 * GiB)}  # vCPUs, memory, disk


P = ParamSpec("P")
T = TypeVar("T")


def size_of(os: str) -> tuple[int, int, int]:
    return SIZES["windows" if windows_os(os) else "linux"]


CANCEL_LOOK = 0.02  # wall seconds: a request waiting for that room retries every 50 ms


class VirtualClock:
    """Seconds from the trace's start, moved only by the replay; threads may wait for it."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._moved = threading.Condition()
        self._waiting: set[ModelHosts] = set()  # the hosts whose creates wait for this clock
        # told when a create begins to wait for this clock, or a build ends (``CountedBuilders``)
        self.work_moved = threading.Condition()

    def __call__(self) -> float:
        return self.now

    def advance(self, to: float) -> None:
        """Move to ``to``. The creates this wakes stop counting as blocked at once, not when
        their threads get to run: the replay then waits for them to finish (``_settle``)
        before the next event, so every run of a seed sees the same ready VMs."""
        with self._moved:
            self.now = max(self.now, to)
            if self._hosts_woken():
                self._moved.notify_all()

    def _hosts_woken(self) -> int:
        """Take the creates whose end the clock reached off the count; how many."""
        woken = 0
        for hosts in list(self._waiting):
            due = [at for at in hosts.wakes if at <= self.now]
            for at in due:
                hosts.wakes.remove(at)
            hosts.blocked -= len(due)
            woken += len(due)
        return woken

    def wait_until(self, at: float, hosts: ModelHosts, cancel: Cancel | None = None) -> bool:
        """Block until the clock reaches ``at``; False when ``cancel`` is set first (a
        ready-pool VM being made that makes way for a request), seen within ``CANCEL_LOOK``.

        A waiter is woken only when the clock reaches a create's end (``advance``), not at
        every event: with a refill's creates waiting, waking them all at every event was a
        fifth of a busy replay's CPU, in thread switches."""
        with self._moved:
            if at <= self.now:
                return True
            hosts.blocked += 1
            hosts.wakes.append(at)
            self._waiting.add(hosts)
            with self.work_moved:
                self.work_moved.notify_all()
            while self.now < at:  # advance() takes it off the count
                if cancel is not None and cancel.is_set():
                    hosts.wakes.remove(at)
                    hosts.blocked -= 1
                    return False
                self._moved.wait(CANCEL_LOOK)
            return True


class CountedBuilders(ThreadPoolExecutor):
    """The engine's builders' pool in a replay (``LeaseService(builders=...)``): it counts
    the builds and refills running on it, so that the replay knows, without asking the
    database, when all its engine has left to do waits for the virtual clock (``settled``)."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(max_workers=256, thread_name_prefix="build")
        self._clock = clock
        self.running = 0

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._clock.work_moved:
            self.running += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, _: object) -> None:
        with self._clock.work_moved:
            self.running -= 1
            self._clock.work_moved.notify_all()

    def settled(self, hosts: ModelHosts, timeout: float) -> bool:
        """Wait until every build and refill has ended or waits for the clock (a create
        the clock has woken is no longer counted as waiting: ``VirtualClock.advance``).
        False when ``timeout`` (wall seconds) passed first."""
        with self._clock.work_moved:
            return self._clock.work_moved.wait_for(lambda: self.running <= hosts.blocked, timeout)


@dataclass
class ModelVm:
    ref: str
    name: str
    lease_id: str
    cpus: int
    memory: int
    disk: int
    ip: str
    runs_at: float  # virtual time its create ends
    holder: str | None = None  # the request a hand-out gave it to
    shown: Machine | None = None  # what ``machines`` showed of it last (the engine looks at every host per request)


class ModelHosts:
    """``Provider`` of a replay. ``clock``: the virtual clock; ``create_seconds``: how long
    a create takes in it."""

    def __init__(self, clock: VirtualClock, create_seconds: float) -> None:
        self._clock = clock
        self.create_seconds = create_seconds
        self._vms: dict[str, dict[str, ModelVm]] = {}  # host ref -> ref -> VM
        self._used: dict[str, tuple[int, int, int]] = {}  # host ref -> its VMs' CPUs, memory, disk
        self._leases: dict[str, set[str]] = {}  # host ref -> the leases of its VMs
        self._lock = threading.Lock()
        self._claims: dict[str, str] = {}  # host ref -> the installation's claim there
        self._addresses = 0
        self._needs: dict[tuple[str, str, int | None, int | None], Need] = {}  # see ``need``
        self._listed: dict[str, tuple[float, list[Machine]]] = {}  # see ``machines``
        self.blocked = 0  # ready-pool creates waiting for the virtual clock
        self.wakes: list[float] = []  # when each of them ends

    def next_wake(self) -> float:
        """When the first create waiting for the clock ends (inf: none waits)."""
        return min(self.wakes, default=float("inf"))

    # -- life ------------------------------------------------------------------------------

    def apply(self, settings: Settings) -> None:
        with self._lock:
            for host in settings.hosts:
                self._vms.setdefault(host.ref, {})

    def wait_synced(self, timeout: float) -> bool:
        return True

    def stop(self) -> None: ...

    # -- hosts and room ----------------------------------------------------------------------

    def status(self, host: HostSettings) -> HostStatus | None:
        with self._lock:
            vms = self._vms.get(host.ref)
            if vms is None:
                return None
            now = self._clock()
            running = sum(1 for vm in vms.values() if vm.runs_at <= now)
        return HostStatus(host.ref, up=True, state="up", name=f"model-{host.ref}", cpus=HOST_CPUS, running_vms=running)

    def need(self, host: HostSettings, os: str, cpus: int | None, memory: int | None) -> Need | None:
        template = host.templates.get(os)
        if template is None:
            return None
        key = (template, os, cpus, memory)
        need = self._needs.get(key)
        if need is None:  # a Need is frozen: one per size and template, shared by every look
            vcpus, static_max, disk = size_of(os)
            vcpus, static_max = cpus or vcpus, memory or static_max
            need = self._needs[key] = Need(vcpus, static_max, disk, template, static_max)
        return need

    def room(
        self, host: HostSettings, overcommit: float, reserved: Iterable[Mapping[str, object]], empty: bool = False
    ) -> HostRoom | None:
        member = MemberRoom("", HOST_CPUS * overcommit, HOST_MEMORY - DOM0_MEMORY)
        room = HostRoom(host.ref, HOST_DISK, [member])
        if empty:
            return room
        with self._lock:  # a VM holds its room from its create on
            cpus, memory, disk = self._used.get(host.ref, (0, 0, 0))
            made = self._leases.get(host.ref, set())
            reserved = [r for r in reserved if r["lease_id"] not in made]  # those not made yet
        member.cpus -= cpus
        member.memory -= memory
        room.disk -= disk
        for reservation in reserved:
            member.cpus -= int(reservation["cpus"])  # type: ignore[call-overload]  # a reservation row is dict[str, object]; these columns are integers
            member.memory -= int(reservation["memory"])  # type: ignore[call-overload]  # a reservation row is dict[str, object]; these columns are integers
            room.disk -= int(reservation["disk"])  # type: ignore[call-overload]  # a reservation row is dict[str, object]; these columns are integers
        return room

    def shortage(self, host: HostSettings, os: str) -> str | None:
        return None if os in host.templates else f"{host.section} has no template for {os}"

    def template_problems(self, host: HostSettings) -> list[str]:
        return []

    # -- one machine -------------------------------------------------------------------------

    def create(
        self,
        host: HostSettings,
        spec: VmSpec,
        progress: Progress,
        cancel: Cancel | threading.Event,
        on_pending: Callable[[str], None],
        attempt: int,
    ) -> CreatedVm:
        cpus, memory, disk = size_of(spec.os)
        cpus, memory = spec.cpus or cpus, spec.memory or memory
        with self._lock:
            self._addresses += 1
            n = self._addresses
            vm = ModelVm(
                ref=f"model-vm-{uuid.uuid4().hex[:12]}",
                name=spec.name,
                lease_id=spec.lease_id,
                cpus=cpus,
                memory=memory,
                disk=disk,
                ip=f"127.90.{(n >> 8) & 255}.{n & 255}",  # loopback: a replay never sends anything anywhere
                runs_at=self._clock() + self.create_seconds,
            )
            self._add(host.ref, vm)
        if spec.name.startswith(POOL_USER) and not self._clock.wait_until(vm.runs_at, self, cancel):
            with self._lock:  # a ready-pool VM is ready when a real one would be, unless it makes way first
                self._remove(host.ref, vm.ref)
            raise ProvisionError(f"{spec.name}: cancelled while it was made", host.ref)
        progress("ready")
        return CreatedVm(
            uuid=vm.ref,
            ref=vm.ref,
            name=spec.name,
            ip=vm.ip,
            cpus=cpus,
            memory=memory,
            disk=disk,
            host=host.ref,
            template=spec.template,
            create_seconds=self.create_seconds,
        )

    def hand_out(self, host: HostSettings, machine_ref: str, spec: VmSpec) -> None:
        with self._lock:
            vm = self._vms[host.ref].get(machine_ref)
            if vm is None or vm.lease_id != spec.lease_id:
                raise NotDynvmVm(f"{machine_ref} is not lease {spec.lease_id}'s")
            if spec.holder is not None:
                if vm.holder not in (None, spec.holder):
                    raise HeldElsewhere(f"{machine_ref} is held by request {vm.holder}")
                vm.holder = spec.holder
            vm.name = spec.name
            self._listed.pop(host.ref, None)

    def _add(self, host_ref: str, vm: ModelVm) -> None:
        """With the lock held."""
        self._vms[host_ref][vm.ref] = vm
        self._listed.pop(host_ref, None)
        cpus, memory, disk = self._used.get(host_ref, (0, 0, 0))
        self._used[host_ref] = (cpus + vm.cpus, memory + vm.memory, disk + vm.disk)
        self._leases.setdefault(host_ref, set()).add(vm.lease_id)

    def _remove(self, host_ref: str, machine_ref: str) -> None:
        """With the lock held."""
        vm = self._vms.get(host_ref, {}).pop(machine_ref, None)
        if vm is None:
            return
        self._listed.pop(host_ref, None)
        cpus, memory, disk = self._used[host_ref]
        self._used[host_ref] = (cpus - vm.cpus, memory - vm.memory, disk - vm.disk)
        self._leases[host_ref].discard(vm.lease_id)

    def pending_job(self, machine_ref: str) -> str | None:
        return None

    def adopt(self, host: HostSettings, job: str, lease_id: str, wait: float) -> str | None:
        return None

    def destroy(
        self, host: HostSettings, machine_ref: str, lease_id: str | None, holder: str | None = None
    ) -> DestroyResult:
        with self._lock:
            vm = self._vms.get(host.ref, {}).get(machine_ref)
            if vm is not None and vm.holder not in (None, holder):
                raise HeldElsewhere(f"{machine_ref} is held by request {vm.holder}")
            self._remove(host.ref, machine_ref)
        return DestroyResult()

    # -- the installation's claim ------------------------------------------------------------------

    def read_claim(self, host: HostSettings) -> str | None:
        with self._lock:
            return self._claims.get(host.ref)

    def write_claim(self, host: HostSettings, claim: str) -> None:
        with self._lock:
            self._claims[host.ref] = claim

    # -- what this installation owns -------------------------------------------------------------

    def machines(self, host: HostSettings) -> list[Machine]:
        """The host's VMs as it shows them. The engine looks at every host for every
        request (names in use) and pass; the list is made again only when a VM came, went
        or was renamed there, or one of its creates ended since (``_listed``: the list, and
        the first time a create there ends)."""
        now = self._clock()
        with self._lock:
            listed = self._listed.get(host.ref)
            if listed is not None and now < listed[0]:
                return list(listed[1])
            vms = self._vms.get(host.ref, {}).values()
            shown = [self._shown(host, vm, now) for vm in vms]
            self._listed[host.ref] = (min((vm.runs_at for vm in vms if vm.runs_at > now), default=math.inf), shown)
            return list(shown)

    @staticmethod
    def _shown(host: HostSettings, vm: ModelVm, now: float) -> Machine:
        """With the lock held: the VM as its host shows it, made again only when it changed."""
        running = vm.runs_at <= now
        shown = vm.shown
        if shown is None or shown.running != running or shown.name != vm.name:
            shown = vm.shown = Machine(
                host_ref=host.ref,
                ref=vm.ref,
                uuid=vm.ref,
                name=vm.name,
                description="",
                power_state="Running" if running else "Halted",
                running=running,
                vcpus=str(vm.cpus),
                memory=str(vm.memory),
                addresses=(vm.ip,) if running else (),
                networkinfo=vm.ip,
                lease_id=vm.lease_id,
                ours=True,
            )
        return shown

    def made_for(self, host: HostSettings, machine: Machine, os: str) -> bool:
        return False

    def collect_leaks(self, host: HostSettings, judge: LeakJudge, report: ReconcileReport) -> None: ...

    def quarantined(self, host: HostSettings, keep_seconds: float) -> list[QuarantinedVm]:
        return []

    def count(self) -> int:
        with self._lock:
            return sum(len(vms) for vms in self._vms.values())
