"""The engine's hot paths, measured in statements: what a reservation, a warm and a cold
getservers, a release, a scheduler pass and a pools pass send to the database, on model
hosts (``model_engine``) and a SQLite file. ``tests/engine/test_hot_paths.py`` holds each
to a fixed number whatever the size of the queue or the pools; ``python -m bench engine``
prints them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.service import LeaseService
from ..model import LeaseError, LeaseRequest
from ..states import LeaseState
from .model import ModelHosts, VirtualClock
from .runner import ReplayOptions, model_engine


@dataclass(frozen=True)
class PathCost:
    path: str
    statements: int
    transactions: int


def measure(service: LeaseService, path: str, action: Callable[[], object]) -> PathCost:
    with service.lease_store.db.counting() as count:
        action()
    return PathCost(path, count.statements, count.transactions)


def _settle(service: LeaseService, hosts: ModelHosts, clock: VirtualClock, creating: int) -> None:
    """Let the pools' creates begun finish: they wait for the virtual clock, then finish on
    their threads; returns once the pool's VMs are all ready (a loaded machine, a CI run
    beside other tests, takes longer than any fixed pause would allow)."""
    deadline = time.monotonic() + 30
    while hosts.blocked < creating and time.monotonic() < deadline:
        time.sleep(0.005)
    clock.advance(clock.now + 3600)
    while time.monotonic() < deadline:
        pooled = service.lease_store.pooled()
        joined = [lease for lease in pooled if lease.state == LeaseState.READY and lease.pooled_at is not None]
        if len(joined) >= creating:  # made, and joined its pool: the create's last write
            return
        time.sleep(0.005)
    raise AssertionError(f"the pool's {creating} VMs were not ready within 30 s")


def hot_paths(waiting: int = 10, ready: int = 3, count: int = 1) -> list[PathCost]:
    """Each hot path once: ``waiting`` requests queued for the scheduler's pass, ``ready``
    idle VMs in the pool, getservers and releases of ``count`` VMs."""
    clock = VirtualClock(1000.0)
    options = ReplayOptions(hosts=4, policy="fixed", fixed={"centos": ready + count})
    out: list[PathCost] = []
    with model_engine({"centos", "windows"}, options, clock) as (service, hosts):
        pools = service.ready_pools
        out.append(measure(service, "pools pass: refill", pools.tick))
        _settle(service, hosts, clock, ready + count)
        out.append(measure(service, "pools pass: nothing to do", pools.tick))
        warm = LeaseRequest("warm", "centos", count=count)
        out.append(measure(service, "getservers, warm", lambda: service.acquire(warm)))
        cold = LeaseRequest("cold", "windows", count=count)
        out.append(measure(service, "getservers, cold", lambda: service.acquire(cold)))
        out.append(measure(service, "release", lambda: service.release("warm", count)))
        settings = service.settings
        reservation = LeaseRequest("reserved", "windows", count=count)
        out.append(
            measure(
                service,
                "reservation (its transaction)",
                lambda: service.admission.reserve(settings, reservation, "reserved-request", immediate=True),
            )
        )
        for n in range(500):  # the hosts fill up: what follows waits
            try:
                service.acquire(LeaseRequest(f"fill{n}x", "windows"))
            except LeaseError:
                break
        queued = 0
        for n in range(waiting):
            try:
                service.acquire(LeaseRequest(f"q{n}x", "windows", count=2))
            except LeaseError:
                service.submit(LeaseRequest(f"q{n}x", "windows", count=2), 3600)
                queued += 1
        assert queued == waiting, f"{queued} of {waiting} queued: the hosts were not full"
        out.append(measure(service, "scheduler pass", service.scheduler.run_pass))
        out.append(measure(service, "pools pass: requests wait", pools.tick))
    return out


def as_dict(costs: list[PathCost]) -> dict[str, PathCost]:
    return {cost.path: cost for cost in costs}
