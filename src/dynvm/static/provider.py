"""Static machines as the lease engine's provider: ``create`` takes an idle machine (one
insert in the database that only one replica wins), ``destroy`` gives it back through its
reset command, and a machine whose reset fails is out of service until a later reset
succeeds. Room is the number of idle machines in service, less reservations not yet held.

Which machine a lease holds is kept in the database beside the lease (``store/holds.py``),
not on the machine: these machines carry no mark, and dynvm never logs into them except to
probe their service port. A reset runs on a thread of its own, so a release never waits for
a reimage; one interrupted by a restart runs again at the next reconcile."""

from __future__ import annotations

import logging
import os as os_module
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from .. import backoff, probe
from ..config import Settings
from ..hosts import HostSettings
from ..model import CreatedVm, FailureKind, HeldElsewhere, NotDynvmVm, ProvisionError, VmSpec
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
    QuarantineStep,
    ReconcileReport,
    Verdict,
)
from ..store.holds import HELD, OUT, RESETTING, Hold, HoldStore
from .settings import StaticHostSettings, StaticMachine

log = logging.getLogger(__name__)

TEMPLATE = "machines"


class StaticProvider:
    def __init__(
        self,
        holds: HoldStore,
        settings: Callable[[], Settings],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.holds = holds
        self._settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._claims: dict[str, str] = {}
        self._resetting: set[tuple[str, str]] = set()  # (host ref, machine) with a reset running here
        self._lock = threading.Lock()
        self._retry = backoff.Backoff(backoff.REFILL, monotonic)

    # -- life ------------------------------------------------------------------------------

    def apply(self, settings: Settings) -> None: ...

    def wait_synced(self, timeout: float) -> bool:
        return True

    def stop(self) -> None: ...

    # -- hosts and room --------------------------------------------------------------------

    def status(self, host: HostSettings) -> HostStatus:
        static = static_host(host)
        holds = self.holds.of(host.ref)
        out = [holds[name] for name in out_of_service(static, holds)]
        error = ""
        if out:
            shown = "; ".join(f"{h.machine}: {h.error}" for h in out)
            error = f"{len(out)} of {len(static.machines)} machine(s) out of service ({shown})"
        return HostStatus(
            ref=host.ref,
            up=True,
            state="up",
            error=error,
            name=host.section,
            cpus=len(static.machines),
            running_vms=sum(1 for h in holds.values() if h.state == HELD),
        )

    def need(self, host: HostSettings, os: str, cpus: int | None, memory: int | None) -> Need | None:
        """One machine, whatever it has: a request that asks for CPUs or memory gets none
        here (a static machine is what it is)."""
        if os != static_host(host).os or cpus is not None or memory is not None:
            return None
        return Need(1, 1, 0, TEMPLATE, 1)

    def room(
        self, host: HostSettings, overcommit: float, reserved: Iterable[Mapping[str, object]], empty: bool = False
    ) -> HostRoom:
        static = static_host(host)
        holds = self.holds.of(host.ref)
        out = out_of_service(static, holds)
        in_service = [m for m in static.machines if m.name not in out]
        if empty:
            idle = len(in_service)
        else:
            idle = sum(1 for m in in_service if m.name not in holds)
            held_by = {h.lease_id for h in holds.values()}
            idle -= sum(1 for r in reserved if r["lease_id"] not in held_by)
        return HostRoom(host.ref, 0, [MemberRoom("", idle, idle)])

    def shortage(self, host: HostSettings, os: str) -> str | None:
        static = static_host(host)
        if os != static.os:
            return f"{host.section} holds no {os} machine"
        holds = self.holds.of(host.ref)
        if static.machines and len(out_of_service(static, holds)) == len(static.machines):
            return f"{host.section}: every machine is out of service (its reset failed)"
        return None

    def template_problems(self, host: HostSettings) -> list[str]:
        return []

    # -- one machine -----------------------------------------------------------------------

    def create(
        self,
        host: HostSettings,
        spec: VmSpec,
        progress: Progress,
        cancel: Cancel | threading.Event,
        on_pending: Callable[[str], None],
        attempt: int,
    ) -> CreatedVm:
        """Take an idle machine for ``spec.lease_id`` and wait until its service port
        answers; one that does not answer is taken out of service and the attempt fails
        (the engine tries another)."""
        static = static_host(host)
        started = self._monotonic()
        holds = self.holds.of(host.ref)
        taken = next(
            (
                m
                for m in static.machines
                if m.name not in holds and self.holds.take(host.ref, m.name, spec.lease_id, spec.name, self._clock())
            ),
            None,
        )
        if taken is None:
            raise ProvisionError(f"{spec.name}: {host.section} has no idle machine", host.ref, kind=FailureKind.AGAIN)
        log.info("%s: took %s (%s) on %s", spec.name, taken.name, taken.address, host.display)
        port = static.probe_port or spec.probe_port
        if port:
            progress("waiting for service")
            deadline = self._monotonic() + self._settings().common.network_timeout_secs
            try:
                probe.wait_until_answering(taken.address, port, deadline, cancel, clock=self._monotonic)
            except probe.ServiceDown:
                why = f"port {port} of {taken.address} did not answer"
                if cancel.is_set():
                    self.holds.free(host.ref, taken.name)
                    raise ProvisionError("cancelled: dynvm is stopping", host.ref) from None
                self.holds.mark(host.ref, taken.name, OUT, self._clock(), why)
                log.warning("%s: %s is out of service: %s", spec.name, taken.name, why)
                raise ProvisionError(f"{spec.name}: {taken.name}: {why}", host.ref, kind=FailureKind.AGAIN) from None
        progress("ready")
        return CreatedVm(
            uuid=machine_uuid(host, taken),
            ref=taken.name,
            name=spec.name,
            ip=taken.address,
            os_version={"name": static.os, "machine": taken.name},
            host=host.ref,
            template=TEMPLATE,
            create_seconds=self._monotonic() - started,
            attempts=attempt,
        )

    def hand_out(self, host: HostSettings, machine_ref: str, spec: VmSpec) -> None:
        hold = self.holds.of(host.ref).get(machine_ref)
        if hold is None or hold.state != HELD or hold.lease_id != spec.lease_id:
            raise NotDynvmVm(f"refusing to hand out {machine_ref}: lease {spec.lease_id} does not hold it")
        if spec.holder is None:
            return
        now = self.holds.hand_to(host.ref, machine_ref, spec.lease_id, spec.holder, spec.name)
        if now != spec.holder:
            raise HeldElsewhere(f"refusing to hand out {machine_ref}: request {now} holds it", host.ref)

    def pending_job(self, machine_ref: str) -> str | None:
        return None

    def adopt(self, host: HostSettings, job: str, lease_id: str, wait: float) -> str | None:
        return None

    def destroy(
        self, host: HostSettings, machine_ref: str, lease_id: str | None, holder: str | None = None
    ) -> DestroyResult:
        """Give the machine back: it is marked resetting and its reset runs on a thread of
        its own (the release does not wait for it)."""
        static = static_host(host)
        machine = static.machine(machine_ref)
        hold = self.holds.of(host.ref).get(machine_ref)
        if machine is None or hold is None or hold.state != HELD:
            return DestroyResult()  # gone from the config, or given back already
        if lease_id is not None and hold.lease_id != lease_id:
            raise NotDynvmVm(f"refusing to give back {machine_ref}: lease {hold.lease_id} holds it, not {lease_id}")
        if hold.holder is not None and holder is not None and hold.holder != holder:
            raise HeldElsewhere(f"refusing to give back {machine_ref}: request {hold.holder} holds it", host.ref)
        if self.holds.mark(host.ref, machine_ref, RESETTING, self._clock(), lease_id=hold.lease_id):
            self._reset_later(static, machine, hold.lease_id or "")
        return DestroyResult()

    def _reset_later(self, host: StaticHostSettings, machine: StaticMachine, lease_id: str) -> None:
        key = (host.ref, machine.name)
        with self._lock:
            if key in self._resetting:
                return
            self._resetting.add(key)
        threading.Thread(
            target=self._reset, args=(host, machine, lease_id), name=f"reset-{machine.name}", daemon=True
        ).start()

    def _reset(self, host: StaticHostSettings, machine: StaticMachine, lease_id: str) -> None:
        """Run the reset command; the machine is idle again when it exits 0, out of service
        otherwise (tried again later, backing off)."""
        try:
            error = run_reset(host, machine, lease_id)
            if error:
                self.holds.mark(host.ref, machine.name, OUT, self._clock(), error)
                self._retry.failed((host.ref, machine.name))
                log.warning("%s on %s is out of service: its reset failed: %s", machine.name, host.display, error)
            else:
                self.holds.free(host.ref, machine.name)
                self._retry.succeeded((host.ref, machine.name))
                log.info("%s on %s is reset and idle", machine.name, host.display)
        finally:
            with self._lock:
                self._resetting.discard((host.ref, machine.name))

    # -- the installation's claim ------------------------------------------------------------

    def read_claim(self, host: HostSettings) -> str | None:
        return self._claims.get(host.ref)

    def write_claim(self, host: HostSettings, claim: str) -> None:
        self._claims[host.ref] = claim

    # -- what this installation owns -------------------------------------------------------

    def machines(self, host: HostSettings) -> list[Machine]:
        static = static_host(host)
        holds = self.holds.of(host.ref)
        listed = []
        for m in static.machines:
            hold = holds.get(m.name)
            state = {None: "Idle", HELD: "Running", RESETTING: "Resetting", OUT: "Out of service"}[
                hold.state if hold is not None else None
            ]
            listed.append(
                Machine(
                    host_ref=host.ref,
                    ref=m.name,
                    uuid=machine_uuid(host, m),
                    name=hold.label if hold is not None and hold.state == HELD and hold.label else m.name,
                    description=f"{m.name}: {static.os}, existing machine"
                    + (f" ({hold.error})" if hold and hold.error else ""),
                    power_state=state,
                    running=hold is not None and hold.state == HELD,
                    vcpus="",
                    memory="",
                    addresses=(m.address,),
                    networkinfo=f"0/ip: {m.address}",
                    member=m.name,
                    lease_id=hold.lease_id if hold is not None and hold.state == HELD else None,
                    ours=hold is not None and hold.state == HELD,
                )
            )
        return listed

    def made_for(self, host: HostSettings, machine: Machine, os: str) -> bool:
        return os == static_host(host).os

    def collect_leaks(self, host: HostSettings, judge: LeakJudge, report: ReconcileReport) -> None:
        """Holds whose lease is over are given back; resets a dead process left unfinished
        run again; machines out of service are tried again once their back-off allows."""
        static = static_host(host)
        for hold in self.holds.of(host.ref).values():
            machine = static.machine(hold.machine)
            if machine is None:
                continue  # gone from the configuration: nothing to reset it with
            report.guarded(f"{hold.machine} on {host.display}", self._collect, static, machine, hold, judge, report)

    def _collect(
        self,
        host: StaticHostSettings,
        machine: StaticMachine,
        hold: Hold,
        judge: LeakJudge,
        report: ReconcileReport,
    ) -> None:
        if hold.state == HELD:
            verdict = judge.verdict(hold.lease_id or "", host.ref, machine_uuid(host, machine), hold.holder)
            if verdict is Verdict.KEEP:
                return
            if verdict is Verdict.UNKNOWN and judge.quarantine_step(hold.since) is not QuarantineStep.DESTROY:
                return  # a hold whose lease this database does not know: kept for the quarantine
            if self.holds.mark(host.ref, machine.name, RESETTING, self._clock(), lease_id=hold.lease_id):
                report.orphans_destroyed.append(hold.label or machine.name)
                self._reset_later(host, machine, hold.lease_id or "")
        elif hold.state == RESETTING:
            self._reset_later(host, machine, hold.lease_id or "")  # no-op while this process runs it
        elif self._retry.waiting((host.ref, machine.name)) == 0:
            self._reset_later(host, machine, hold.lease_id or "")

    def quarantined(self, host: HostSettings, keep_seconds: float) -> list[QuarantinedVm]:
        return []


def run_reset(host: StaticHostSettings, machine: StaticMachine, lease_id: str) -> str:
    """Run ``reset.command`` for ``machine``; "" when it succeeded, else why not."""
    if not host.reset_command:
        return ""
    env = {
        **os_module.environ,
        "DYNVM_MACHINE": machine.name,
        "DYNVM_ADDRESS": machine.address,
        "DYNVM_OS": host.os,
        "DYNVM_LEASE": lease_id,
    }
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", host.reset_command],
            env=env,
            capture_output=True,
            text=True,
            timeout=host.reset_timeout,
        )
    except subprocess.TimeoutExpired:
        return f"the reset command ran over {host.reset_timeout:g} s (reset.timeout.secs)"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return f"the reset command exited {done.returncode}" + (f": {said[-1]}" if said else "")
    return ""


def out_of_service(host: StaticHostSettings, holds: Mapping[str, Hold]) -> list[str]:
    """The configured machines that are out of service, in the configuration's order."""
    return [m.name for m in host.machines if (hold := holds.get(m.name)) is not None and hold.state == OUT]


def machine_uuid(host: HostSettings, machine: StaticMachine) -> str:
    return f"{host.section}/{machine.name}"


def static_host(host: HostSettings) -> StaticHostSettings:
    if not isinstance(host, StaticHostSettings):
        raise ProvisionError(f"{host.display} is not a static host", host.ref)
    return host
