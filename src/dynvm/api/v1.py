"""The JSON API, ``/api/v1`` (OpenAPI at ``/openapi.json``, docs at ``/docs``).

Creating is asynchronous: ``POST /leases`` answers 202 with ``Location:
/api/v1/requests/{id}``, where per-VM progress can be followed (``?wait=true`` answers when
the request is done). With ``wait_minutes`` a request that does not fit now waits in the
queue (``GET /queue``), with its position and ETA in its status, and can be cancelled
(``DELETE /requests/{id}``). Errors are RFC 9457 problem details with a human sentence.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .. import bounds
from ..engine.eta import Accuracy
from ..model import Lease, LeaseRequest, NoSuchLease, ReleaseFailed
from ..runtime import Services
from .deps import CallerDep, ServicesDep
from .errors import render_exception

router = APIRouter(prefix="/api/v1", tags=["v1"])

NAME_PATTERN, OS_PATTERN = bounds.NAME_PATTERN, bounds.OS_PATTERN
PROBLEM = {"model": dict, "content": {"application/problem+json": {}}, "description": "problem details"}
ERRORS: dict[int | str, dict[str, Any]] = dict.fromkeys((400, 401, 403, 404, 409, 422, 429, 502, 503), PROBLEM)


class LeaseIn(BaseModel):
    os: str = Field(pattern=OS_PATTERN, description="OS key, e.g. centos")
    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=bounds.NAME_MAX,
        description="the VM name (count=1) or the prefix of <name>1..<name>N",
    )
    count: int = Field(1, ge=bounds.COUNT.low, le=bounds.COUNT.high)
    cpus: int | None = Field(
        None, ge=bounds.CPUS.low, le=bounds.CPUS.high, description="vCPUs; default: the template's"
    )
    memory: int | None = Field(
        None, ge=bounds.MEMORY.low, le=bounds.MEMORY.high, description="bytes; default: the template's"
    )
    expires_in_minutes: float | None = Field(
        None, gt=bounds.LIFETIME_MINUTES.low, le=bounds.LIFETIME_MINUTES.high, description="capped at vm.expiry.minutes"
    )
    host: str | None = Field(None, pattern=bounds.HOST_REF_PATTERN, description="pin to [xenhostN]")
    wait_minutes: float | None = Field(
        None,
        ge=bounds.WAIT_MINUTES.low,
        le=bounds.WAIT_MINUTES.high,
        description="wait in the queue up to this long when the VMs do not fit now; "
        "0: refuse at once (429); default: [common] queue.wait.minutes",
    )


class ExtendIn(BaseModel):
    expires_in_minutes: float = Field(
        gt=bounds.LIFETIME_MINUTES.low,
        le=bounds.LIFETIME_MINUTES.high,
        description="new lifetime from now, capped at the maximum",
    )


class LeaseOut(BaseModel):
    name: str
    username: str
    os: str
    host: str
    state: str
    ip: str | None
    cpus: int
    memory: int
    disk: int
    vm_uuid: str | None
    caller: str | None
    created_at: float
    ready_at: float | None
    expires_at: float

    @classmethod
    def of(cls, lease: Lease) -> LeaseOut:
        return cls(
            name=lease.name,
            username=lease.username,
            os=lease.os,
            host=lease.host_ref,
            state=lease.state,
            ip=lease.ip,
            cpus=lease.cpus,
            memory=lease.memory,
            disk=lease.disk,
            vm_uuid=lease.vm_uuid,
            caller=lease.caller,
            created_at=lease.created_at,
            ready_at=lease.ready_at,
            expires_at=lease.expires_at,
        )


class VmProgressOut(BaseModel):
    name: str
    host: str
    stage: str
    ip: str | None
    error: str | None


class RequestOut(BaseModel):
    id: str
    username: str
    os: str
    count: int
    state: str = Field(description="queued, creating, ready, failed, cancelled or timed out")
    error: str | None
    created_at: float
    finished_at: float | None
    position: int | None = Field(None, description="while queued: its place in the queue, 1 = next")
    eta: str | None = Field(None, description="while queued: when its VMs are expected ready (ISO-8601 UTC)")
    eta_seconds: float | None = Field(None, description="while queued: seconds from now to the ETA")
    wait_until: float | None = Field(None, description="Unix seconds: a queued request times out then")
    vms: list[VmProgressOut]


class MemberOut(BaseModel):
    ref: str = Field(description="xapi's ref of the member's host record")
    name: str
    master: bool
    enabled: bool = Field(description="false: xapi starts no VM there (disabled, maintenance)")
    live: bool = Field(description="false: the pool's master has lost touch with it")
    cpus: int
    memory_total: int
    memory_free: int
    running_vms: int
    reason: str = Field("", description="why no VM goes there now (down, disabled); empty when they may")


class HostOut(BaseModel):
    ref: str = Field(description="the N of [xenhostN]: what xhostref names")
    name: str = Field(description="the pool master's name (a one-host pool's host)")
    url: str
    state: str
    error: str
    cpus: int = Field(description="physical CPUs of every member together")
    memory_total: int
    memory_free: int
    running_vms: int
    capacity: dict[str, int]
    members: list[MemberOut] = Field(description="the hosts of the pool, the master first; one for a lone host")
    same_pool_as: str = Field(
        "", description="state 'same pool': the ref of the earlier [xenhostN] that names this pool and counts it"
    )


class VmOut(BaseModel):
    host: str
    member: str = Field(description="the name of the pool member it runs on; empty when halted")
    name: str
    description: str
    power_state: str
    vcpus: int
    memory: int
    ips: list[str]
    dynvm: bool


class HistoryOut(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[dict[str, Any]]


def _capacity(services: Services, os_keys: list[str]) -> dict[str, int]:
    return {os: services.engine.available_count(os) for os in os_keys}


@router.get("/hosts", response_model=list[HostOut], responses=ERRORS)
async def hosts(services: ServicesDep, _: CallerDep) -> list[HostOut]:
    reports = await anyio.to_thread.run_sync(services.engine.host_reports)
    return [
        HostOut(
            ref=report.host.ref,
            name=report.status.name,
            url=report.host.address,
            state=report.status.state,
            error=report.status.error,
            cpus=report.status.cpus,
            memory_total=report.status.memory_total,
            memory_free=report.status.memory_free,
            running_vms=report.status.running_vms,
            capacity=report.capacity,
            members=[MemberOut(**dataclasses.asdict(m), reason=m.reason) for m in report.status.members],
            same_pool_as=report.status.same_pool_as,
        )
        for report in reports
    ]


@router.get("/vms", response_model=list[VmOut], responses=ERRORS)
async def vms(services: ServicesDep, _: CallerDep) -> list[VmOut]:
    found = await anyio.to_thread.run_sync(services.engine.machines)
    return [
        VmOut(
            host=host_ref,
            member=m.member,
            name=m.name,
            description=m.description,
            power_state=m.power_state,
            vcpus=int(m.vcpus),
            memory=int(m.memory),
            ips=list(m.addresses),
            dynvm=m.ours,
        )
        for host_ref, machines in found.items()
        for m in machines
    ]


class QuarantinedOut(BaseModel):
    name: str
    uuid: str
    host: str
    lease_id: str = Field(description="the lease its marker names, unknown to this database")
    held_by: str = Field(
        "", description="the request its host says holds it (handed out after the backup, say); '' when none"
    )
    quarantined_at: float = Field(description="Unix seconds: when reconcile halted and tagged it")
    destroy_at: float = Field(description="Unix seconds: when reconcile destroys it ([common] orphan.quarantine.hours)")


@router.get("/quarantine", response_model=list[QuarantinedOut], responses=ERRORS)
async def quarantine(services: ServicesDep, _: CallerDep) -> list[QuarantinedOut]:
    """VMs this installation made whose lease its database does not know, or whose holder
    on the host it disagrees with (say, it was restored from an older backup): halted and
    kept until ``destroy_at``. To keep one,
    remove ``dynvm_lease`` from its ``other_config`` before then."""
    found = await anyio.to_thread.run_sync(services.engine.quarantined)
    return [
        QuarantinedOut(
            name=q.name,
            uuid=q.uuid,
            host=q.host_ref,
            lease_id=q.lease_id,
            held_by=q.held_by,
            quarantined_at=q.quarantined_at,
            destroy_at=q.destroy_at,
        )
        for q in found
    ]


@router.get("/capacity", response_model=dict[str, int], responses=ERRORS)
async def capacity(services: ServicesDep, _: CallerDep) -> dict[str, int]:
    """How many more VMs of each OS can be made now."""
    return await anyio.to_thread.run_sync(_capacity, services, services.current_settings().os_keys)


@router.post("/leases", status_code=202, response_model=RequestOut, responses=ERRORS)
async def create_leases(
    body: LeaseIn,
    services: ServicesDep,
    caller: CallerDep,
    response: Response,
    wait: Annotated[bool, Query(description="answer when the VMs are ready (or failed)")] = False,
) -> Any:
    request_id = str(uuid.uuid4())
    lease_request = LeaseRequest(
        username=body.name,
        os=body.os,
        count=body.count,
        cpus=body.cpus,
        memory=body.memory,
        expires_in_minutes=body.expires_in_minutes,
        host_ref=body.host,
        caller=caller.user,
        request_id=request_id,
    )
    minutes = body.wait_minutes
    if minutes is None:
        minutes = services.current_settings().common.queue_wait_minutes
    engine = services.engine
    await anyio.to_thread.run_sync(engine.open_request, lease_request, minutes * 60, "v1")
    location = f"/api/v1/requests/{request_id}"
    if wait:
        record = await engine.request_store.wait_finished(request_id, timeout=minutes * 60 + 24 * 3600)
        if record is not None and record.state != "ready":
            problem = render_exception("/api/", record.failure())
            problem.headers["Location"] = location
            return problem
        return JSONResponse(engine.tracker.get(request_id), headers={"Location": location})
    response.headers["Location"] = location
    return await anyio.to_thread.run_sync(engine.tracker.get, request_id)


@router.get("/requests/{request_id}", response_model=RequestOut, responses=ERRORS)
async def request_status(
    request_id: str,
    services: ServicesDep,
    _: CallerDep,
    wait: Annotated[bool, Query(description="answer when the request is done")] = False,
    timeout: Annotated[float, Query(gt=0, le=3600, description="longest wait, seconds")] = 600,
) -> Any:
    store = services.engine.request_store
    if wait:
        await store.wait_finished(request_id, timeout)
    status = await anyio.to_thread.run_sync(services.engine.tracker.get, request_id)
    if status is None:
        raise NoSuchLease(f"no request {request_id} (finished requests are kept for a week)")
    return status


@router.delete("/requests/{request_id}", response_model=RequestOut, responses=ERRORS)
async def cancel_request(request_id: str, services: ServicesDep, caller: CallerDep) -> Any:
    """Cancel a request in any state before ``ready``: a queued one ends at once; one
    being created ends once the VMs made for it are removed (follow it to ``cancelled``).
    A ready request is refused with 409: release its VMs instead."""
    await anyio.to_thread.run_sync(services.engine.cancel, request_id, caller)
    return await anyio.to_thread.run_sync(services.engine.tracker.get, request_id)


class QueuedOut(BaseModel):
    id: str
    position: int | None = Field(description="1 = next")
    user: str
    os: str
    count: int
    age_seconds: float
    eta: str | None
    eta_seconds: float | None


ETA_ERROR_HEADERS = {
    "X-Dynvm-Eta-Error-P50": "the median of |ETA - actual wait| / actual wait over the requests served in the last "
    "day (a fraction; absent when none waited)",
    "X-Dynvm-Eta-Error-P90": "its 90th percentile",
    "X-Dynvm-Eta-Error-Samples": "how many served requests it is measured on",
}


@router.get(
    "/queue",
    response_model=list[QueuedOut],
    responses={**ERRORS, 200: {"headers": {k: {"description": v} for k, v in ETA_ERROR_HEADERS.items()}}},
)
async def queue(services: ServicesDep, _: CallerDep, response: Response) -> list[QueuedOut]:
    """The requests waiting for room, in the order they will be served. The headers say
    how accurate the queue's ETAs have been: the first ETA each request was given against
    its actual wait, over the last day."""
    out, accuracy = await anyio.to_thread.run_sync(_queue_and_accuracy, services)
    response.headers["X-Dynvm-Eta-Error-Samples"] = str(accuracy.samples)
    if accuracy.p50 is not None and accuracy.p90 is not None:
        response.headers["X-Dynvm-Eta-Error-P50"] = str(accuracy.p50)  # as the dashboard shows it, every digit kept
        response.headers["X-Dynvm-Eta-Error-P90"] = str(accuracy.p90)
    return out


def _queue_and_accuracy(services: Services) -> tuple[list[QueuedOut], Accuracy]:
    return queued(services), services.engine.eta_accuracy()


def queued(services: Services) -> list[QueuedOut]:
    """The queue in the order it will be served (a worker thread: it reads the database)."""
    from ..states import RequestState

    waiting = services.engine.request_store.in_state(RequestState.QUEUED)
    now = services.engine.clock()
    out = []
    ordered = services.engine.policy.order(waiting) if waiting else []
    for record in ordered:
        status = record.as_dict(now)
        out.append(
            QueuedOut(
                id=record.id,
                position=record.position,
                user=record.caller or record.username,
                os=record.os,
                count=record.count,
                age_seconds=round(now - record.created_at, 1),
                eta=status["eta"],
                eta_seconds=status["eta_seconds"],
            )
        )
    return out


class ForecastOut(BaseModel):
    target: int = Field(description="the learned target, before the <os>.ready floor")
    rate_per_hour: float = Field(
        description="VMs asked per hour the target was sized on (the blend at its peak ahead; a burst: burst_per_hour)"
    )
    profile_per_hour: float | None = Field(
        description="the hour-of-week (or -day) profile's rate; null: no profile yet"
    )
    recent_per_hour: float = Field(description="VMs asked for in the last hour")
    weight: float = Field(description="the profile's share of the blend")
    create_seconds: float = Field(description="the median create time it hides (Little's law)")
    margin: float = Field(description="the safety margin ([pools] sizing.margin)")
    capped_by: str = Field(description='"", "max" (<os>.max), "room" or "share" (the OSes did not fit together)')
    burst_per_hour: float | None = Field(
        default=None, description="in an hour that comes in a burst (a nightly wave): the rate sized on, by its bins"
    )
    batch_target: int = Field(
        default=0, description="the ready VMs that serve whole the batches worth their idle hours (engine/sizing.py)"
    )


class PoolOut(BaseModel):
    os: str
    target: int = Field(description="ready VMs kept for this OS ([pools] <os>.ready)")
    ready: int = Field(description="idle, probed VMs a request takes at once")
    refilling: int = Field(description="being made")
    handed_out: int = Field(description="taken by requests in the last 24 h")
    recycled: int = Field(description="destroyed unused in the last 24 h: stale, dead, surplus, or making room")
    sizing: str = Field(description="fixed (<os>.ready) or learned (from the history)")
    forecast: ForecastOut | None = Field(description="with learned sizing: what made the target")


@router.get("/pools", response_model=list[PoolOut], responses=ERRORS)
async def pools(services: ServicesDep, _: CallerDep) -> list[PoolOut]:
    """The ready pools, per OS: a getservers takes these VMs first and makes only the rest."""
    found = await anyio.to_thread.run_sync(services.engine.ready_pools.status)
    return [PoolOut(**dataclasses.asdict(pool)) for pool in found]  # the forecast, a dict, becomes ForecastOut


@router.get("/leases", response_model=list[LeaseOut], responses=ERRORS)
async def list_leases(
    services: ServicesDep,
    _: CallerDep,
    user: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
) -> list[LeaseOut]:
    leases = await anyio.to_thread.run_sync(services.engine.lease_store.held)
    return [LeaseOut.of(lease) for lease in leases if user is None or (lease.caller or lease.username) == user]


@router.get("/leases/{name}", response_model=LeaseOut, responses=ERRORS)
async def get_lease(name: str, services: ServicesDep, _: CallerDep) -> LeaseOut:
    found = await anyio.to_thread.run_sync(services.engine.lease_store.by_name, [name])
    if not found:
        raise NoSuchLease(f"no VM named {name} is leased from dynvm")
    return LeaseOut.of(found[0])


class ReleaseOut(BaseModel):
    released: list[str] = Field(description="every name the release took on")
    finishing: dict[str, str] | None = Field(
        None, description="with 202 only: name -> what dynvm still finishes in the background"
    )


@router.delete(
    "/leases/{name}",
    response_model=ReleaseOut,
    responses=ERRORS | {202: {"model": ReleaseOut, "description": "released; dynvm finishes the rest by itself"}},
)
async def delete_lease(name: str, services: ServicesDep, caller: CallerDep) -> Response:
    """200: the VM and its disks are gone. 202: the VM is gone or being removed, and dynvm
    finishes the rest in the background (nothing to do for the caller). 502: the VM could
    not be destroyed; dynvm tries again within a minute, and so may the caller."""
    outcome = await services.run_long(services.engine.release_names, [name], caller)
    if outcome.failed:
        raise ReleaseFailed("; ".join(outcome.states()))
    if outcome.finishing:
        return JSONResponse({"released": outcome.names, "finishing": outcome.finishing}, status_code=202)
    return JSONResponse({"released": outcome.names})


@router.patch("/leases/{name}", response_model=LeaseOut, responses=ERRORS)
async def extend_lease(name: str, body: ExtendIn, services: ServicesDep, caller: CallerDep) -> LeaseOut:
    lease = await anyio.to_thread.run_sync(services.engine.extend, name, body.expires_in_minutes, caller)
    return LeaseOut.of(lease)


@router.get("/history", response_model=HistoryOut, responses=ERRORS)
async def history(
    services: ServicesDep,
    _: CallerDep,
    user: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
    os: Annotated[str | None, Query(pattern=OS_PATTERN)] = None,
    state: Annotated[str | None, Query(pattern=r"^(available|deleted)$")] = None,
    since: Annotated[float | None, Query(ge=0, le=10**11, description="Unix seconds")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> HistoryOut:
    items, total = await anyio.to_thread.run_sync(
        lambda: services.history.query(user=user, os=os, state=state, since=since, limit=limit, offset=offset)
    )
    return HistoryOut(total=total, limit=limit, offset=offset, items=items)


@router.get("/stats", responses=ERRORS)
async def stats(services: ServicesDep, _: CallerDep) -> dict[str, Any]:
    """Per OS: VMs created, mean and p95 create time, mean lifetime; per user: totals."""
    return await anyio.to_thread.run_sync(services.history.stats)
