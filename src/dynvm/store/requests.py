"""The durable lease request: a row from the moment a request is accepted until it ends.

States: ``queued`` (waiting for room, until ``wait_until``) -> ``creating`` (its leases
reserved, its VMs being made) -> ``ready`` | ``failed``; a request can also end
``cancelled`` (by its caller, before ``ready``) or ``timed out`` (still queued at its
deadline). Per-VM progress is kept in the row, so every replica answers the same, and a
restart forgets nothing.

Every transition is one conditional UPDATE (``WHERE state = …``): when a cancel and a
grant, or a cancel and the hand-over, race, the database decides which one happened and
the other sees that it lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, delete, false, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import Insert, Select, Update

from .. import model
from ..model import LeaseRequest
from ..states import FINAL_REQUEST_STATES, REQUESTS, Actor, RequestState
from .db import Database
from .tables import requests

STAGES = ("reserved", "cloning", "provisioning", "booting", "waiting for IP", "ready", "failed", "removed", "moved")
log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often a waiter looks at the row when the change may come from another replica


@dataclass(frozen=True)
class RequestRecord:
    id: str
    username: str
    os: str
    count: int
    state: RequestState
    owner: str
    created_at: float
    origin: str = "v1"
    builder: str | None = None
    caller: str | None = None
    cpus: int | None = None
    memory: int | None = None
    expires_in_minutes: float | None = None
    host_ref: str | None = None
    priority: int = 0
    wait_until: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    error_status: int | None = None
    error_kind: str | None = None
    cancel_requested: bool = False
    position: int | None = None
    eta_at: float | None = None
    eta_first: float | None = None  # the first ETA forecast for it: what its ETA error is measured on
    vms: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, request: LeaseRequest, request_id: str) -> RequestRecord:
        """A request as its row holds it, before it is accepted (state ``creating``, no owner)."""
        return cls(
            id=request_id,
            username=request.username,
            os=request.os,
            count=request.count,
            state=RequestState.CREATING,
            owner="",
            created_at=0.0,
            caller=request.caller,
            cpus=request.cpus,
            memory=request.memory,
            expires_in_minutes=request.expires_in_minutes,
            host_ref=request.host_ref,
        )

    def request(self) -> LeaseRequest:
        """The request this row holds."""
        return LeaseRequest(
            username=self.username,
            os=self.os,
            count=self.count,
            cpus=self.cpus,
            memory=self.memory,
            expires_in_minutes=self.expires_in_minutes,
            host_ref=self.host_ref,
            caller=self.caller,
            request_id=self.id,
        )

    @property
    def finished(self) -> bool:
        return self.state in FINAL_REQUEST_STATES

    def failure(self) -> Exception:
        """The error a request that did not become ready answers with: the engine's own
        kind (a 429 shortage, a 409 clash, ...), rebuilt from the row."""
        kind = getattr(model, self.error_kind or "", None)
        cls = kind if isinstance(kind, type) and issubclass(kind, model.LeaseError) else model.LeaseError
        error = cls(self.error or f"the request ended {self.state}")
        if cls is model.LeaseError or self.error_status:
            error.status = self.error_status or 500
        return error

    def as_dict(self, now: float) -> dict[str, Any]:
        """What ``GET /api/v1/requests/{id}`` answers."""
        eta_seconds = None if self.eta_at is None else max(0.0, round(self.eta_at - now, 1))
        return {
            "id": self.id,
            "username": self.username,
            "os": self.os,
            "count": self.count,
            "state": self.state,
            "error": self.error,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "position": self.position if self.state == RequestState.QUEUED else None,
            "eta": _iso(self.eta_at) if self.state == RequestState.QUEUED and self.eta_at is not None else None,
            "eta_seconds": eta_seconds if self.state == RequestState.QUEUED else None,
            "wait_until": self.wait_until,
            "vms": [dict(vm) for vm in self.vms],
        }


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _record(row: Mapping[str, Any]) -> RequestRecord:
    values = dict(row)
    values["vms"] = list(values.get("vms") or [])
    values["cancel_requested"] = bool(values.get("cancel_requested"))
    values["state"] = RequestState(values["state"])
    return RequestRecord(**values)


@functools.cache
def _get_statement() -> Select[tuple[Any, ...]]:
    return select(requests).where(requests.c.id == bindparam("id"))


@functools.cache
def _in_state_statement() -> Select[tuple[Any, ...]]:
    where = requests.c.state.in_(bindparam("states", expanding=True))
    return select(requests).where(where).order_by(requests.c.created_at, requests.c.id)


@functools.cache
def _ensure_statement(is_sqlite: bool) -> Insert:
    dialect = sqlite if is_sqlite else postgresql
    values: dict[str, Any] = {column: bindparam(f"b_{column}") for column in requests.columns.keys()}  # noqa: SIM118 - a ColumnCollection
    statement: Insert = dialect.insert(requests).values(**values).on_conflict_do_nothing(index_elements=["id"])
    return statement


@functools.cache
def _set_vms_statement() -> Update:
    return update(requests).where(requests.c.id == bindparam("b_id")).values(vms=bindparam("b_vms"))


@functools.cache
def _vms_for_update_statement() -> Select[tuple[Any]]:
    return select(requests.c.vms).where(requests.c.id == bindparam("b_id")).with_for_update()


@functools.cache
def _transition_statement(fields: tuple[str, ...], not_cancelled: bool, whole: bool) -> Update:
    """A request's move: ``fields`` set (``b_<field>`` bound), from the states bound as
    ``sources``; ``not_cancelled``: unless a cancel was asked for first. It returns the
    row as moved (``whole``), else its id: no row, no move."""
    where = (requests.c.id == bindparam("b_id")) & requests.c.state.in_(bindparam("sources", expanding=True))
    if not_cancelled:
        where &= requests.c.cancel_requested == false()
    statement = update(requests).where(where).values(**{f: bindparam(f"b_{f}") for f in fields})
    return statement.returning(*requests.c) if whole else statement.returning(requests.c.id)


class RequestStore:
    """The ``requests`` table, and the in-process wake-ups that let a waiter on this
    replica hear of a change at once (a change made elsewhere is seen by polling)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._lock = threading.Lock()
        self._waiters: dict[str, list[Future[None]]] = {}

    # -- reading -----------------------------------------------------------------------

    def get(self, request_id: str, conn: Connection | None = None) -> RequestRecord | None:
        with self.db.reading(conn) as reading:
            rows = self.db.run(reading, _get_statement(), {"id": request_id}).mappings()
        return _record(rows[0]) if rows else None

    def in_state(self, *states: str, conn: Connection | None = None) -> list[RequestRecord]:
        """The requests in these states, oldest first (``conn``: inside the caller's
        transaction)."""
        with self.db.reading(conn) as reading:
            found = self.db.run(reading, _in_state_statement(), {"states": list(states)})
            return [_record(row) for row in found.mappings()]

    def started_since(self, since: float) -> list[tuple[str, float]]:
        """(user, started_at) of every request that got room since ``since``: what the
        scheduler's fairness counts."""
        query = select(requests.c.caller, requests.c.username, requests.c.started_at).where(
            requests.c.started_at >= since
        )
        with self.db.read() as conn:
            return [(caller or username, started) for caller, username, started in conn.execute(query)]

    def finished_since(self, since: float) -> list[RequestRecord]:
        """Requests that ended since ``since`` (ready, failed, timed out or cancelled):
        what the dashboard's time-to-VM and failures are counted from."""
        query = select(requests).where(requests.c.finished_at >= since).order_by(requests.c.finished_at)
        with self.db.read() as conn:
            return [_record(dict(row._mapping)) for row in conn.execute(query)]

    # -- writing -----------------------------------------------------------------------

    def insert(self, record: RequestRecord) -> None:
        REQUESTS.check_born(record.state)
        values = {k: getattr(record, k) for k in requests.columns.keys()}  # noqa: SIM118 - a ColumnCollection
        with self.db.write() as conn:
            conn.execute(requests.insert().values(**values))

    def ensure(self, record: RequestRecord, conn: Connection | None = None) -> bool:
        """Insert unless a row with this id exists (a request announced before its work):
        one statement, the database deciding (``conn``: inside the caller's transaction).
        Whether it inserted."""
        REQUESTS.check_born(record.state)
        values = {f"b_{k}": getattr(record, k) for k in requests.columns.keys()}  # noqa: SIM118 - a ColumnCollection
        with self.db.writing(conn) as writing:
            return self.db.run(writing, _ensure_statement(self.db.is_sqlite), values).rowcount == 1

    def transition(
        self,
        request_id: str,
        from_states: Iterable[RequestState],
        to: RequestState,
        *,
        by: Actor,
        conn: Connection | None = None,
        **values: Any,
    ) -> bool:
        """Move the request to ``to`` if it is in one of ``from_states``; whether it moved.
        The move must be in the state table for ``by`` (``states.REQUESTS``), else
        ``IllegalMove``. ``conn``: inside the caller's transaction (the hand-over), whose
        commit the caller awaits before anyone is told."""
        moved = self._move(request_id, from_states, to, by, conn, values, whole=False) is not None
        if moved and conn is None:  # committed here: tell the waiters
            self.notify(request_id)
        return moved

    def transition_to(
        self,
        request_id: str,
        from_states: Iterable[RequestState],
        to: RequestState,
        *,
        by: Actor,
        conn: Connection,
        **values: Any,
    ) -> RequestRecord | None:
        """``transition`` inside the caller's transaction, returning the request as it now
        is (None: it did not move), in the same statement."""
        row = self._move(request_id, from_states, to, by, conn, values, whole=True)
        return _record(row) if row is not None else None

    def _move(
        self,
        request_id: str,
        from_states: Iterable[RequestState],
        to: RequestState,
        by: Actor,
        conn: Connection | None,
        values: dict[str, Any],
        whole: bool,
    ) -> dict[str, Any] | None:
        """The one UPDATE of every move: the row it moved (``whole``: every column, else
        the id), None when it did not move."""
        sources = REQUESTS.check(from_states, to, by)
        now = self.clock()
        if to in FINAL_REQUEST_STATES:
            values.setdefault("finished_at", now)
        if to == RequestState.CREATING:
            values.setdefault("started_at", now)
        values["state"] = to
        fields = tuple(sorted(values))
        # a cancel asked for first wins over the hand-over
        statement = _transition_statement(fields, to == RequestState.READY, whole)
        bound = {f"b_{f}": values[f] for f in fields} | {"b_id": request_id, "sources": list(sources)}
        with self.db.writing(conn) as writing:
            rows = self.db.run(writing, statement, bound).mappings()
            return rows[0] if rows else None

    def end_cancelled(self, request_id: str, from_states: Iterable[RequestState], why: str, *, by: Actor) -> bool:
        """End the request ``cancelled`` (answered as a 409 saying ``why``)."""
        return self.transition(
            request_id,
            from_states,
            RequestState.CANCELLED,
            by=by,
            error=why,
            error_status=409,
            error_kind="RequestCancelled",
        )

    def request_cancel(self, request_id: str) -> RequestRecord | None:
        """Cancel: a queued request ends at once; a creating one is flagged, and the
        process making its VMs rolls them back. Returns the request as it is now."""
        if self.end_cancelled(request_id, [RequestState.QUEUED], "cancelled by its caller", by=Actor.CALLER):
            return self.get(request_id)
        with self.db.write() as conn:
            conn.execute(
                update(requests)
                .where((requests.c.id == request_id) & (requests.c.state == RequestState.CREATING))
                .values(cancel_requested=True)
            )
        self.notify(request_id)
        return self.get(request_id)

    def set_vms(self, request_id: str, vms: list[dict[str, Any]], conn: Connection | None = None) -> None:
        """Write a request's VMs' progress whole (``conn``: inside the caller's transaction,
        whose commit the caller awaits before anyone is told)."""
        with self.db.writing(conn) as writing:
            self.db.run(writing, _set_vms_statement(), {"b_id": request_id, "b_vms": vms})
        if conn is None:  # committed here: tell the waiters
            self.notify(request_id)

    def update_vms(
        self,
        changes: dict[str, dict[str, dict[str, Any]]],
        conn: Connection | None = None,
        current: dict[str, list[dict[str, Any]]] | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """Change VMs' progress entries (request id -> VM name -> fields), every request's
        in one transaction (row-locked: a request's VMs progress side by side; ``conn``:
        the caller's). ``current``: the VMs of requests the caller's transaction has
        already read (and locked), not read again. The VMs as written, by request."""
        if not changes:
            return {}
        written: dict[str, list[dict[str, Any]]] = {}
        with self.db.writing(conn) as writing:
            for request_id, by_name in changes.items():
                if current is not None and request_id in current:
                    before = current[request_id]
                else:
                    row = self.db.run(writing, _vms_for_update_statement(), {"b_id": request_id}).first()
                    if row is None:
                        continue
                    before = row[0] or []
                vms = [dict(vm) for vm in before]
                for vm in vms:
                    vm.update(by_name.get(vm["name"], {}))
                self.db.run(writing, _set_vms_statement(), {"b_id": request_id, "b_vms": vms})
                written[request_id] = vms
        if conn is None:  # committed here: tell the waiters
            for request_id in changes:
                self.notify(request_id)
        return written

    def set_forecast(self, forecast: dict[str, tuple[int, float | None]]) -> None:
        """Write each queued request's position and ETA, where they changed."""
        if not forecast:
            return
        with self.db.write() as conn:
            rows = conn.execute(
                select(requests.c.id, requests.c.position, requests.c.eta_at).where(
                    requests.c.id.in_(list(forecast)) & (requests.c.state == RequestState.QUEUED)
                )
            ).all()
            changed = []
            for request_id, position, eta_at in rows:
                new_position, new_eta = forecast[request_id]
                moved_eta = (eta_at is None) != (new_eta is None) or abs((eta_at or 0) - (new_eta or 0)) >= 1
                if position != new_position or moved_eta:
                    changed.append({"b_id": request_id, "b_position": new_position, "b_eta": new_eta})
            if changed:  # one statement for them all; the first ETA a request is given stays
                statement = (
                    update(requests)
                    .where(requests.c.id == bindparam("b_id"))
                    .values(
                        position=bindparam("b_position"),
                        eta_at=bindparam("b_eta"),
                        eta_first=func.coalesce(requests.c.eta_first, bindparam("b_eta")),
                    )
                )
                conn.execute(statement, changed)

    def eta_outcomes(self, since: float) -> list[tuple[float, float, float]]:
        """(created_at, eta_first, finished_at) of the requests that waited, were forecast,
        and were served (ready) since ``since``: what the ETA's measured error is made of."""
        query = select(requests.c.created_at, requests.c.eta_first, requests.c.finished_at).where(
            (requests.c.state == RequestState.READY)
            & requests.c.eta_first.is_not(None)
            & (requests.c.finished_at >= since)
        )
        with self.db.read() as conn:
            return [(float(c), float(e), float(f)) for c, e, f in conn.execute(query)]

    def forget_finished(self, before: float) -> int:
        """Drop requests that ended before ``before`` (their leases and history remain)."""
        with self.db.write() as conn:
            done = conn.execute(
                delete(requests).where(requests.c.state.in_(FINAL_REQUEST_STATES) & (requests.c.finished_at < before))
            )
            return done.rowcount

    # -- waiting -----------------------------------------------------------------------

    def notify(self, request_id: str) -> None:
        with self._lock:
            waiters = self._waiters.pop(request_id, [])
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _changed(self, request_id: str) -> Future[None]:
        future: Future[None] = Future()
        with self._lock:
            self._waiters.setdefault(request_id, []).append(future)
        return future

    async def _await_change(self, request_id: str, future: Future[None], timeout: float) -> None:
        """Return when ``future`` (registered by ``_changed``) is set by a change in this
        process, or after ``timeout`` (a change by another replica is found by the next read)."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            pass
        finally:
            self._forget(request_id, future)

    def _forget(self, request_id: str, future: Future[None]) -> None:
        with self._lock:
            waiting = self._waiters.get(request_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(request_id, None)

    async def wait_until_changed(self, request_id: str, timeout: float) -> None:
        """Return when this process changes the request, or after ``timeout``."""
        await self._await_change(request_id, self._changed(request_id), timeout)

    async def wait_finished(
        self, request_id: str, timeout: float, still_wanted: Callable[[], Any] | None = None
    ) -> RequestRecord | None:
        """Await the request's end, or ``timeout`` seconds; then the request as it is.
        ``still_wanted`` (awaitable factory) is asked between looks; when it says no, the
        wait ends early (a client that hung up). It listens for a change before each look,
        so a change made between the look and the wait is never missed (it would cost a
        whole ``POLL_SECONDS``)."""
        deadline = time.monotonic() + timeout
        while True:
            future = self._changed(request_id)
            record = await asyncio.to_thread(self.get, request_id)
            left = deadline - time.monotonic()
            done = record is None or record.finished or left <= 0
            if not done and still_wanted is not None and not await still_wanted():
                done = True
            if done:
                self._forget(request_id, future)
                return record
            await self._await_change(request_id, future, min(POLL_SECONDS, left))
