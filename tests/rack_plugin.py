"""A second kind of host, written only against dynvm's seams (``hosts.HostKind``,
``provider.ProviderPlugin``): racks of existing machines, a ``[rackN]`` section each. It
imports nothing of Xen: ``tests/test_provider.py`` checks that the engine, given a config of
racks, never loads ``dynvm.xen``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from dynvm.config import Settings
from dynvm.hosts import HostSettings, SectionReader, templates_of
from dynvm.model import CreatedVm, VmSpec
from dynvm.provider import (
    Cancel,
    DestroyResult,
    HostRoom,
    HostStatus,
    LeakJudge,
    Machine,
    MemberRoom,
    Need,
    Progress,
    Provider,
    ProviderContext,
    QuarantinedVm,
    ReconcileReport,
    Verdict,
)


@dataclass(frozen=True)
class RackSettings(HostSettings):
    """``templates``: OS key -> "boxes"; ``boxes``: (OS, name, address) of each machine."""

    section_prefix: ClassVar[str] = "rack"

    boxes: tuple[tuple[str, str, str], ...] = ()


class RackPlugin:
    section_prefix = "rack"
    os_key_suffix = ".boxes"  # centos.boxes=a1@127.0.10.1, a2@127.0.10.2
    os_key_extras: tuple[str, ...] = ()
    known_keys = frozenset({"rack.label"})

    def parse(self, reader: SectionReader, section: str, number: int, values: Mapping[str, str]) -> RackSettings:
        boxes = []
        for os, listed in templates_of(reader, section, values, self.os_key_suffix).items():
            for entry in listed.split(","):
                name, _, ip = entry.strip().partition("@")
                if not name or not ip:
                    raise reader.error(section, f"{os}.boxes", f"{entry.strip()!r} is not name@address")
                boxes.append((os, name, ip))
        return RackSettings(
            number=number, templates=dict.fromkeys({os for os, _, _ in boxes}, "boxes"), boxes=tuple(boxes)
        )

    def make_provider(self, context: ProviderContext) -> Provider:
        return StaticPool()


@dataclass
class Box:
    name: str
    ip: str
    os: str
    lease_id: str | None = None  # taken by this lease
    label: str = ""  # the lease's name while taken


class StaticPool:
    """A provider over machines that already exist: ``create`` takes an idle one,
    ``destroy`` gives it back. One box is one unit of room; since room is per host (not
    per OS), each configured host is a rack of one OS's boxes."""

    def __init__(self) -> None:
        self.boxes: dict[str, list[Box]] = {}
        self.lock = threading.Lock()
        self.claims: dict[str, str] = {}
        self.given_back: list[str] = []

    def apply(self, settings: Settings) -> None:
        """The racks the configuration names, with their boxes; a box taken stays taken."""
        with self.lock:
            for host in settings.hosts:
                assert isinstance(host, RackSettings)  # Providers gives a kind only its own hosts
                known = {box.name for box in self.boxes.get(host.ref, [])}
                rack = self.boxes.setdefault(host.ref, [])
                rack += [Box(name, ip, os) for os, name, ip in host.boxes if name not in known]

    def wait_synced(self, timeout: float) -> bool:
        return True

    def stop(self) -> None: ...

    def status(self, host: HostSettings) -> HostStatus | None:
        boxes = self.boxes.get(host.ref)
        if boxes is None:
            return None
        return HostStatus(host.ref, up=True, state="up", name=host.section, running_vms=len(boxes))

    def need(self, host: HostSettings, os: str, cpus: int | None, memory: int | None) -> Need | None:
        if cpus is not None or memory is not None or os not in host.templates:
            return None  # a static box is what it is
        return Need(1, 1, 0, host.templates[os], 1)

    def room(
        self, host: HostSettings, overcommit: float, reserved: Iterable[Mapping[str, object]], empty: bool = False
    ) -> HostRoom | None:
        with self.lock:
            boxes = self.boxes.get(host.ref, [])
            idle = len(boxes) if empty else sum(1 for b in boxes if b.lease_id is None)
            made = {b.lease_id for b in boxes}
        pending = 0 if empty else sum(1 for r in reserved if r["lease_id"] not in made)
        return HostRoom(host.ref, 1 << 40, [MemberRoom("", idle - pending, idle - pending)])

    def shortage(self, host: HostSettings, os: str) -> str | None:
        return None if os in host.templates else f"{host.section} holds no {os} box"

    def template_problems(self, host: HostSettings) -> list[str]:
        return []

    def create(
        self,
        host: HostSettings,
        spec: VmSpec,
        progress: Progress,
        cancel: Cancel | threading.Event,
        on_pending: Callable[[str], None],
        attempt: int,
    ) -> CreatedVm:
        with self.lock:
            box = next(b for b in self.boxes[host.ref] if b.lease_id is None and b.os == spec.os)
            box.lease_id, box.label = spec.lease_id, spec.name
        progress("ready")
        return CreatedVm(uuid=box.name, ref=box.name, name=spec.name, ip=box.ip, host=host.ref, cpus=1, memory=1)

    def hand_out(self, host: HostSettings, machine_ref: str, spec: VmSpec) -> None:
        with self.lock:
            box = next(b for b in self.boxes[host.ref] if b.name == machine_ref)
            box.label = spec.name

    def pending_job(self, machine_ref: str) -> str | None:
        return None

    def read_claim(self, host: HostSettings) -> str | None:
        return self.claims.get(host.ref)

    def write_claim(self, host: HostSettings, claim: str) -> None:
        self.claims[host.ref] = claim

    def adopt(self, host: HostSettings, job: str, lease_id: str, wait: float) -> str | None:
        return None

    def destroy(
        self, host: HostSettings, machine_ref: str, lease_id: str | None, holder: str | None = None
    ) -> DestroyResult:
        with self.lock:
            box = next(b for b in self.boxes[host.ref] if b.name == machine_ref)
            if box.lease_id == lease_id:
                box.lease_id, box.label = None, ""
                self.given_back.append(box.name)
        return DestroyResult()

    def machines(self, host: HostSettings) -> list[Machine]:
        with self.lock:
            return [
                Machine(host.ref, b.name, b.name, b.label or b.name, b.os, "Running", True, "1", "1", (b.ip,), b.ip)
                for b in self.boxes.get(host.ref, [])
            ]

    def made_for(self, host: HostSettings, machine: Machine, os: str) -> bool:
        return machine.description == os

    def collect_leaks(self, host: HostSettings, judge: LeakJudge, report: ReconcileReport) -> None:
        for box in list(self.boxes.get(host.ref, [])):
            if box.lease_id is not None and judge.verdict(box.lease_id, host.ref, box.name) is Verdict.ENDED:
                self.destroy(host, box.name, box.lease_id)
                report.orphans_destroyed.append(box.name)

    def quarantined(self, host: HostSettings, keep_seconds: float) -> list[QuarantinedVm]:
        return []
