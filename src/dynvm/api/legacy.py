"""The seed service's routes, byte for byte (SPEC.md §1): what existing Jenkins jobs call.

All answers are plain bodies: JSON text or a number, and on error a non-2xx status with a
plain-text body that begins ``Error: ``. No business rule lives here: parsing, then the
lease service, then formatting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import uuid
from collections.abc import Callable

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from .. import bounds
from ..model import BadRequest, Caller, CreateFailed, Lease, LeaseRequest, RequestCancelled
from ..provider import Machine
from ..runtime import Services
from .deps import CallerDep, ServicesDep
from .errors import render, render_exception

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
DIGITS = re.compile(r"[0-9]+")  # ASCII only: int() would also take '２' or ' 5'
DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def error(status: int, message: str) -> Response:
    return render("/", status, message)


def as_error(e: Exception) -> Response:
    return render_exception("/", e)


def json_text(value: object, **options: object) -> Response:
    return Response(json.dumps(value, **options), media_type="application/json")  # type: ignore[arg-type]  # json.dumps's keyword options are typed per keyword; this passes them through


def _int(name: str, raw: str | None, default: int | None, low: int, high: int) -> int | None:
    if raw is None or raw == "":
        return default
    if not DIGITS.fullmatch(raw):
        raise BadRequest(f"{name} must be a whole number, not {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, not {value}")
    return value


def _username(raw: str) -> str:
    if not NAME.fullmatch(raw) or not raw.strip("."):
        raise BadRequest(
            "the username must be 1 to 64 characters of letters, digits, '.', '_' or '-', and not only dots"
        )
    return raw


# -- listing and counting (from memory) ------------------------------------------------------


def _vm_entry(vm: Machine, member: str | None = None) -> dict[str, str]:
    """The seed's six keys; in a pool of several hosts, also ``member``: the name of the
    host it runs on (a lone host's entries stay byte for byte the seed's)."""
    entry = {
        "name": vm.name,
        "name_description": vm.description,
        "power_state": vm.power_state,
        "vcpus": vm.vcpus,
        "memory_static_max": vm.memory,
        "networkinfo": vm.networkinfo,
    }
    if member is not None:
        entry["member"] = member
    return entry


def showall(services: Services, os: str | None) -> Response:
    engine = services.engine
    pools = {ref for ref, status in engine.host_statuses().items() if status.is_pool}
    result: dict[str, list[dict[str, str]]] = {}
    for host_ref, machines in engine.machines(os).items():  # a host that is down is listed with no VMs
        member = host_ref in pools
        result[host_ref] = [_vm_entry(m, m.member if member else None) for m in machines if m.running]
    return json_text(result, indent=2, sort_keys=True)


@router.get("/showall")
async def showall_all(services: ServicesDep, _: CallerDep) -> Response:
    return await _guard(showall, services, None)


@router.get("/showall/{os}")
async def showall_os(os: str, services: ServicesDep, _: CallerDep) -> Response:
    return await _guard(showall, services, os)


def available(services: Services, os: str) -> Response:
    return PlainTextResponse(str(services.engine.available_count(os)))


@router.get("/getavailablecount")
async def getavailablecount(services: ServicesDep, _: CallerDep) -> Response:
    return await _guard(available, services, "centos")


@router.get("/getavailablecount/{os}")
async def getavailablecount_os(os: str, services: ServicesDep, _: CallerDep) -> Response:
    return await _guard(available, services, os)


async def _guard(fn: Callable[..., Response], *args: object) -> Response:
    """Run a quick handler off the event loop and turn its errors into ``Error:`` bodies."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except Exception as e:
        return as_error(e)


# -- getting and releasing -------------------------------------------------------------------


def parse_wait(raw: str | None, default: float) -> float:
    """``wait=<minutes>``: how long a request that does not fit may wait in the queue."""
    if raw is None or raw == "":
        return default
    if not DECIMAL.fullmatch(raw):
        raise BadRequest(f"wait is minutes (digits 0-9, decimals allowed; 0 = do not wait), not {raw!r}")
    minutes = float(raw)
    if not math.isfinite(minutes) or minutes not in bounds.WAIT_MINUTES:
        raise BadRequest(f"wait is at most a week of minutes ({bounds.WAIT_MINUTES.high:g}), not {raw!r}")
    return minutes


def parse_getservers(username: str, query: dict[str, str], caller: Caller) -> tuple[LeaseRequest, str]:
    fmt = query.get("format") or "servermanager"
    if fmt not in ("servermanager", "detailed"):
        raise BadRequest(f"format must be servermanager or detailed, not {fmt!r}")
    expires = None
    raw = query.get("expiresin")
    if raw:
        if not DECIMAL.fullmatch(raw):
            raise BadRequest(f"expiresin is minutes (digits 0-9, decimals allowed), not {raw!r}")
        expires = float(raw)
        if not math.isfinite(expires) or expires <= 0:
            raise BadRequest(f"expiresin must be a positive number of minutes, not {raw!r}")
        expires = min(expires, bounds.LIFETIME_MINUTES.high)  # the engine caps it at vm.expiry.minutes
    request = LeaseRequest(
        username=_username(username),
        os=query.get("os") or "centos",
        count=_int("count", query.get("count"), 1, *_int_bound(bounds.COUNT)) or 1,
        cpus=_int("cpus", query.get("cpus"), None, *_int_bound(bounds.CPUS)),
        memory=_int("mem", query.get("mem"), None, *_int_bound(bounds.MEMORY)),
        expires_in_minutes=expires,
        caller=caller.user,
        host_ref=str(_int("xhostref", query.get("xhostref"), None, *_int_bound(bounds.HOST_REF)))
        if query.get("xhostref")
        else None,
    )
    return request, fmt


@router.get("/getservers/{username}")
async def getservers(username: str, request: Request, services: ServicesDep, caller: CallerDep) -> Response:
    try:
        common = services.current_settings().common
        lease_request, fmt = parse_getservers(username, dict(request.query_params), caller)
        minutes = parse_wait(request.query_params.get("wait"), common.queue_wait_minutes)
        leases = await _leases_for(services, request, lease_request, minutes)
    except Exception as e:
        return as_error(e)
    if fmt == "detailed":
        return json_text({lease.name: lease.ip for lease in leases}, indent=2)
    return json_text([lease.ip for lease in leases])


async def _leases_for(services: Services, request: Request, lease_request: LeaseRequest, minutes: float) -> list[Lease]:
    """Open the request (queued when it may wait) and hold the answer until its VMs are
    ready or it ends otherwise; a queued one whose wait runs out ends ``timed out`` (a 429
    saying how long it waited). A client that hangs up cancels a request that may wait:
    everything built for it is removed. One that does not wait carries on, as the seed's
    did: its VMs become leases the user can release, or that expire."""
    engine = services.engine
    lease_request = dataclasses.replace(lease_request, request_id=str(uuid.uuid4()))
    record = await anyio.to_thread.run_sync(engine.open_request, lease_request, minutes * 60, "legacy")
    waits = minutes > 0

    async def connected() -> bool:
        return not await request.is_disconnected()

    # once served, its create may take up to three attempts of vm.network.timeout.secs
    longest = minutes * 60 + 3 * services.current_settings().common.network_timeout_secs + 600
    try:
        final = await engine.request_store.wait_finished(record.id, longest, still_wanted=connected if waits else None)
    except BaseException:  # the server is stopping and cancels this wait: nobody will be answered
        if waits:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(engine.request_store.request_cancel, record.id)
        raise
    if final is None or not final.finished:
        if not waits:
            raise CreateFailed(f"{lease_request.username}: its VMs are still being made after {longest:.0f} s")
        await anyio.to_thread.run_sync(engine.cancel, record.id)
        raise RequestCancelled("the client hung up while its request waited; it was cancelled")
    if final.state != "ready":
        raise final.failure()
    return await anyio.to_thread.run_sync(engine.leases_of, record.id)


DETAIL_LIMIT = 4000  # characters of X-Dynvm-Detail


def release(services: Services, username: str, count: int, caller: Caller) -> Response:
    """200 and the names: all gone. 202 and the names: the VMs are gone, and dynvm finishes
    the rest (a disk, or a release already under way) by itself; ``X-Dynvm-Detail`` says
    what. 502 ``Error: …``: a VM could not be destroyed; dynvm retries within a minute."""
    outcome = services.engine.release(_username(username), count, caller)
    if outcome.failed:  # every VM named, with what became of it
        return error(502, "; ".join(outcome.states()))
    response = json_text(outcome.names, indent=2)
    if outcome.finishing:
        response.status_code = 202
    if outcome.finishing or outcome.already:
        notes = [state for state in outcome.states() if not state.endswith(" is released")]
        detail = " ".join("; ".join(notes).split())  # one line: no CR/LF in a header
        if len(detail) > DETAIL_LIMIT:  # headers have limits (h11's is 16 KiB in all)
            detail = detail[: DETAIL_LIMIT - 20].rsplit(";", 1)[0] + "; and more"
        response.headers["X-Dynvm-Detail"] = detail.encode("ascii", "replace").decode()
    return response


@router.get("/releaseservers/{username}")
async def releaseservers(username: str, request: Request, services: ServicesDep, caller: CallerDep) -> Response:
    try:
        count = _int("count", request.query_params.get("count"), 1, *_int_bound(bounds.COUNT)) or 1
        return await services.run_long(release, services, username, count, caller)
    except Exception as e:
        return as_error(e)


@router.get("/releaseservers/{username}/{state}")
async def releaseservers_state(
    username: str, state: str, request: Request, services: ServicesDep, caller: CallerDep
) -> Response:
    """The seed took a state here; it is accepted and the VMs are destroyed all the same."""
    return await releaseservers(username, request, services, caller)


def _int_bound(bound: bounds.Bound) -> tuple[int, int]:
    return int(bound.low), int(bound.high)
