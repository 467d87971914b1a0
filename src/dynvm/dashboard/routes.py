"""The dashboard: the page at ``/`` and ``/ui``, its files, and the JSON it is drawn from
(``/api/v1/dashboard/...``, in the OpenAPI like the rest of the API).

The page is static: HTML, CSS and a script of our own, and uPlot for the plots, which
``make install`` takes from the npm registry (``web/package.json``, pinned by its lock file)
into ``static/vendor/``. Nothing is fetched from outside the service and nothing needs Node
at run time. The page itself needs no token; every JSON route it calls obeys ``[auth]`` as
the rest of the API does, and the page asks for a token when one is needed.

Each JSON answer carries ``Server-Timing: app;dur=<ms>``: the time the service spent on it,
which ``python -m bench dashboard`` reads.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..api.deps import CallerDep, ServicesDep
from ..api.v1 import ERRORS, OS_PATTERN, LeaseOut, queued
from ..model import Caller
from ..runtime import Services
from . import figures

STATIC = Path(__file__).parent / "static"
PAGE_SIZE = 50

router = APIRouter(prefix="/api/v1/dashboard", tags=["dashboard"])


def install_dashboard(app: FastAPI) -> None:
    """Serve the page and its files, and the JSON routes."""
    app.mount("/ui/static", StaticFiles(directory=str(STATIC)), name="dashboard-static")

    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.add_api_route("/", page, include_in_schema=False)
    app.add_api_route("/ui", page, include_in_schema=False)
    app.include_router(router)


def _timed(work: Any, *args: Any) -> Any:
    """Run ``work`` on a worker thread; its answer as JSON with the time it took."""

    async def run() -> JSONResponse:
        started = time.perf_counter()
        body = await anyio.to_thread.run_sync(work, *args)
        took = (time.perf_counter() - started) * 1000
        return JSONResponse(body, headers={"Server-Timing": f"app;dur={took:.1f}"})

    return run()


# -- the first screen ---------------------------------------------------------------------------


def _overview(services: Services, caller: Caller) -> dict[str, Any]:
    engine = services.engine
    settings = services.current_settings()
    reports = engine.host_reports()
    use = engine.lease_store.use_by_host()
    foreign: dict[str, tuple[int, int, int]] = {}
    for ref, machines in engine.machines().items():
        others = [m for m in machines if not m.ours and m.running]
        foreign[ref] = (len(others), sum(_int(m.vcpus) for m in others), sum(_int(m.memory) for m in others))
    hosts = []
    for report in reports:
        status, ref = report.status, report.host.ref
        vms, cpus, memory = use.get(ref, (0, 0, 0))
        other_vms, other_cpus, other_memory = foreign.get(ref, (0, 0, 0))
        hosts.append(
            {
                "ref": ref,
                "name": status.name,
                "url": report.host.address,
                "state": status.state,
                "up": status.up,
                "error": status.error,
                "cpus": status.cpus,
                "overcommit": settings.common.cpu_overcommit,
                "memory_total": status.memory_total,
                "memory_free": status.memory_free,
                "dynvm": {"vms": vms, "vcpus": cpus, "memory": memory},
                "others": {"vms": other_vms, "vcpus": other_cpus, "memory": other_memory},
                "capacity": report.capacity,
                "members": len(status.members),
                "same_pool_as": status.same_pool_as,
                "members_out": [{"name": m.name, "reason": m.reason} for m in status.members if m.reason],
            }
        )
    pools = [dataclasses.asdict(pool) for pool in engine.ready_pools.status()]
    held = engine.lease_store.page(limit=1)[1]
    return {
        "time": engine.clock(),
        "auth": {"required": settings.auth.required, "user": caller.user, "admin": caller.admin},
        "summary": {
            "hosts": sum(1 for h in hosts if not h["same_pool_as"]),  # a pool named twice is one host
            "hosts_up": sum(1 for h in hosts if h["up"]),
            "leased": held,
            "ready": sum(p["ready"] for p in pools),
            "refilling": sum(p["refilling"] for p in pools),
        },
        "hosts": hosts,
        "pools": pools,
    }


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


@router.get("/overview", responses=ERRORS)
async def overview(services: ServicesDep, caller: CallerDep) -> Any:
    """Hosts (up or down and why; dynvm's, others' and free CPU and memory; capacity per
    OS), the ready pools, and totals: what the dashboard's first screen shows."""
    return await _timed(_overview, services, caller)


def _queue(services: Services) -> dict[str, Any]:
    accuracy = services.engine.eta_accuracy()
    return {
        "time": services.engine.clock(),
        "items": [item.model_dump() for item in queued(services)],
        "eta_error": {"samples": accuracy.samples, "p50": accuracy.p50, "p90": accuracy.p90},
    }


@router.get("/queue", responses=ERRORS)
async def dashboard_queue(services: ServicesDep, _: CallerDep) -> Any:
    """The queue, as ``/api/v1/queue`` answers it, with the service's time and the ETA's
    measured error (its headers there)."""
    return await _timed(_queue, services)


def _leases(services: Services, user: str | None, os: str | None, limit: int, offset: int) -> dict[str, Any]:
    engine = services.engine
    found, total = engine.lease_store.page(user, os, limit, offset)
    items = []
    for lease in found:
        item = LeaseOut.of(lease).model_dump()
        item["from_pool"] = lease.pooled_at is not None
        item["handed_out_at"] = lease.handed_over_at  # a ready-pool VM was made long before it was taken
        items.append(item)
    return {
        "time": engine.clock(),
        "total": total,
        "limit": limit,
        "offset": offset,
        "oses": engine.lease_store.held_oses(),
        "items": items,
    }


@router.get("/leases", responses=ERRORS)
async def leases(
    services: ServicesDep,
    _: CallerDep,
    user: Annotated[str | None, Query(max_length=64, description="part of the user or caller, any case")] = None,
    os: Annotated[str | None, Query(pattern=OS_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, le=10**7)] = 0,
) -> Any:
    """Held leases, the latest handed out first, one page at a time, with how many match in
    all; each says whether it came from a ready pool (``from_pool``) or was made for its
    request, and when it was handed out (``handed_out_at``)."""
    return await _timed(_leases, services, user or None, os, limit, offset)


# -- the plots ---------------------------------------------------------------------------------


def _usage(services: Services, span: str) -> dict[str, Any]:
    now = services.engine.clock()
    seconds, _ = figures.SPANS[span]
    return figures.in_use(services.history.lifetimes(now - seconds), now, span)


@router.get("/usage", responses=ERRORS)
async def usage(services: ServicesDep, _: CallerDep, span: Annotated[str, Query(pattern=r"^(24h|7d)$")] = "24h") -> Any:
    """VMs in use per OS over the last 24 hours (5-minute steps) or 7 days (hourly)."""
    return await _timed(_usage, services, span)


def _timings(services: Services, days: float) -> dict[str, Any]:
    since = services.engine.clock() - days * 86400
    return figures.timings(
        services.history.lifetimes(since), services.engine.request_store.finished_since(since), since
    )


@router.get("/timings", responses=ERRORS)
async def timings(services: ServicesDep, _: CallerDep, days: Annotated[float, Query(gt=0, le=7)] = 7) -> Any:
    """Per OS: time to VM (asked to ready, from the requests) and create time (from the
    history) of the last ``days``: counts per bin, p50 and p95."""
    return await _timed(_timings, services, days)


def _users(services: Services, days: float, limit: int) -> list[dict[str, Any]]:
    now = services.engine.clock()
    return services.history.vm_hours(now - days * 86400, now, limit)


@router.get("/users", responses=ERRORS)
async def users(
    services: ServicesDep,
    _: CallerDep,
    days: Annotated[float, Query(gt=0, le=28)] = 7,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> Any:
    """The users who held most VM-hours in the last ``days``."""
    return await _timed(_users, services, days, limit)


def _failures(services: Services, days: float) -> list[dict[str, Any]]:
    since = services.engine.clock() - days * 86400
    return figures.failures(services.engine.request_store.finished_since(since), since)


@router.get("/failures", responses=ERRORS)
async def failures(services: ServicesDep, _: CallerDep, days: Annotated[float, Query(gt=0, le=7)] = 7) -> Any:
    """Requests that ended without their VMs in the last ``days``, by reason."""
    return await _timed(_failures, services, days)
