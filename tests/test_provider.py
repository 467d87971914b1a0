"""The provider seam (``provider.py``): the lease engine runs on a second kind of machines
with nothing of Xen in the way. ``StaticPool`` is the smallest honest provider — a fixed
set of existing machines per host, handed out and given back — written only against the
``Provider`` protocol, as the README says a second provider is added."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynvm.config import HostSettings, Settings, load_settings
from dynvm.engine.service import LeaseService
from dynvm.model import CreatedVm, LeaseRequest, NotEnoughCapacity, VmSpec
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
    QuarantinedVm,
    ReconcileReport,
    Verdict,
)
from dynvm.store.db import Database
from dynvm.store.history import HistoryStore
from dynvm.store.leases import LeaseStore

from .conftest import FakeClock

CONFIG = """
[common]
vm.expiry.minutes=60

; a static rack: the provider never connects to host.name
[xenhost1]
host.name=http://127.0.0.1:9/rack-a
host.user=nobody
host.password=unused
host.storage.name=none
centos.template=centos-box

[xenhost2]
host.name=http://127.0.0.1:9/rack-b
host.user=nobody
host.password=unused
host.storage.name=none
ubuntu.template=ubuntu-box
"""


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

    def __init__(self, boxes: dict[str, list[Box]]) -> None:
        self.boxes = boxes
        self.lock = threading.Lock()
        self.claims: dict[str, str] = {}
        self.given_back: list[str] = []

    def apply(self, settings: Settings) -> None: ...
    def wait_synced(self, timeout: float) -> bool:
        return True

    def stop(self) -> None: ...

    def status(self, host: HostSettings) -> HostStatus | None:
        boxes = self.boxes.get(host.ref)
        if boxes is None:
            return None
        return HostStatus(host.ref, up=True, state="up", name=host.url, running_vms=len(boxes))

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


def _pool() -> StaticPool:
    return StaticPool(
        {
            "1": [Box(f"a{i}", f"127.0.10.{i}", "centos") for i in (1, 2, 3)],
            "2": [Box("b1", "127.0.11.1", "ubuntu")],
        }
    )


@pytest.fixture
def engine(tmp_path: Path) -> tuple[LeaseService, StaticPool, FakeClock]:
    path = tmp_path / "static.ini"
    path.write_text(CONFIG)
    settings = load_settings(path)
    db = Database(f"sqlite:///{tmp_path / 'static.db'}")
    db.migrate()
    clock = FakeClock()
    pool = _pool()
    service = LeaseService(lambda: settings, pool, LeaseStore(db), HistoryStore(db, None, clock), clock=clock)
    yield service, pool, clock
    service.shutdown(grace=1)
    db.close()


def test_a_static_pool_has_every_method_of_the_provider_protocol():
    methods = [name for name, value in vars(Provider).items() if callable(value) and not name.startswith("_")]
    assert len(methods) >= 15
    assert [name for name in methods if not callable(getattr(StaticPool, name, None))] == []


def test_the_engine_leases_counts_and_releases_machines_of_another_provider(engine):
    service, pool, _ = engine
    assert service.available_count("centos") == 3
    leases = service.acquire(LeaseRequest("alice", "centos", 3))
    assert sorted(lease.ip for lease in leases) == ["127.0.10.1", "127.0.10.2", "127.0.10.3"]
    assert service.available_count("centos") == 0
    assert service.available_count("ubuntu") == 1  # the ubuntu rack is untouched
    with pytest.raises(NotEnoughCapacity):
        service.acquire(LeaseRequest("bob", "centos", 1))
    names = [m.name for machines in service.machines("centos").values() for m in machines]
    assert sorted(names) == ["alice1", "alice2", "alice3"]
    outcome = service.release("alice", 3)
    assert sorted(outcome.released) == ["alice1", "alice2", "alice3"]
    assert sorted(pool.given_back) == ["a1", "a2", "a3"]
    assert service.available_count("centos") == 3


def test_expiry_and_reconcile_work_through_the_seam(engine):
    service, pool, clock = engine
    [lease] = service.acquire(LeaseRequest("carol", "ubuntu", 1))
    clock.advance(61 * 60)
    assert service.expire_due() == ["carol"]
    assert pool.given_back == ["b1"]
    # a box still marked for a lease that ended (its give-back was lost): reconcile collects it
    box = pool.boxes["2"][0]
    box.lease_id = lease.id
    report = service.reconcile()
    assert report.orphans_destroyed == ["b1"]
    assert box.lease_id is None
