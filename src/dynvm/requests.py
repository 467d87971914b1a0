"""Progress of lease requests, per VM, for ``GET /api/v1/requests/{id}`` and the CLI's live
display. Kept in memory: a request's outcome outlives it in the leases and the history;
its step-by-step progress only matters while someone is watching."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

STAGES = ("reserved", "cloning", "provisioning", "booting", "waiting for IP", "ready", "failed")


@dataclass
class VmProgress:
    name: str
    host: str
    stage: str = "reserved"
    ip: str | None = None
    error: str | None = None


@dataclass
class RequestStatus:
    id: str
    username: str
    os: str
    count: int
    created_at: float
    state: str = "pending"  # pending -> ready | failed
    error: str | None = None
    error_status: int | None = None
    vms: dict[str, VmProgress] = field(default_factory=dict)
    finished_at: float | None = None
    # resolved when the request finishes (or is forgotten), for waiters on the event loop
    done: Future[None] = field(default_factory=Future, repr=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "username": self.username,
            "os": self.os,
            "count": self.count,
            "state": self.state,
            "error": self.error,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "vms": [vars(vm).copy() for vm in self.vms.values()],
        }


class RequestTracker:
    """Thread-safe; keeps the newest ``limit`` requests."""

    def __init__(self, limit: int = 2000, clock: Callable[[], float] = time.time) -> None:
        self._limit = limit
        self._clock = clock
        self._requests: OrderedDict[str, RequestStatus] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, request_id: str, username: str, os: str, count: int) -> None:
        """Begin tracking; a request already announced (by the API, before it queued the
        work) is left as it is."""
        with self._lock:
            if request_id in self._requests:
                return
            self._requests[request_id] = RequestStatus(request_id, username, os, count, self._clock())
            while len(self._requests) > self._limit:
                _, forgotten = self._requests.popitem(last=False)
                _resolve(forgotten.done)

    def placed(self, request_id: str, names_and_hosts: list[tuple[str, str]]) -> None:
        with self._lock:
            status = self._requests.get(request_id)
            if status is not None:
                for name, host in names_and_hosts:
                    status.vms[name] = VmProgress(name, host)

    def stage(
        self,
        request_id: str,
        name: str,
        stage: str,
        ip: str | None = None,
        error: str | None = None,
        host: str | None = None,
    ) -> None:
        with self._lock:
            status = self._requests.get(request_id)
            vm = status.vms.get(name) if status else None
            if vm is not None:
                vm.stage = stage
                vm.host = host or vm.host
                vm.ip = None if stage == "removed" else (ip or vm.ip)  # a removed VM's IP is no one's
                vm.error = error or vm.error

    def finish(self, request_id: str, error: str | None = None, error_status: int | None = None) -> None:
        with self._lock:
            status = self._requests.get(request_id)
            if status is not None:
                status.state = "failed" if error else "ready"
                status.error = error
                status.error_status = error_status
                status.finished_at = self._clock()
                _resolve(status.done)

    def get(self, request_id: str) -> dict[str, object] | None:
        with self._lock:
            status = self._requests.get(request_id)
            return status.as_dict() if status else None

    async def wait(self, request_id: str, timeout: float) -> dict[str, object] | None:
        """Await the request's end (or ``timeout``) on the event loop, then return its
        status. Called by ``?wait=true``; it must not block a thread: a hundred clients
        waiting for slow creates would otherwise take every worker the other routes need."""
        with self._lock:
            status = self._requests.get(request_id)
        if status is None:
            return None
        # shield: a waiter that gives up must not cancel the future other waiters share
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(status.done)), timeout)
        return self.get(request_id)


def _resolve(done: Future[None]) -> None:
    if not done.done():
        done.set_result(None)
