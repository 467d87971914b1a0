"""A request's per-VM progress as the engine reports it, written into the request's row
(``store/requests.py``) in batches."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import Connection

from ..states import REQUESTS, Actor, RequestState
from ..store.requests import RequestRecord, RequestStore

log = logging.getLogger(__name__)


class DurableTracker:
    """The progress the lease engine reports while it makes a request's VMs, written into
    the request's row. A request started directly (``LeaseService.acquire``, with no row
    yet) gets one in state ``creating``.

    Stage changes are gathered and written together, every ``FLUSH_SECONDS`` (a hundred
    VMs booting at once would otherwise be a hundred write transactions per stage, and on
    SQLite every one waits for the disk). Reads in this process see them at once; other
    replicas within ``FLUSH_SECONDS``. They are written before the request ends."""

    FLUSH_SECONDS = 0.2

    def __init__(self, store: RequestStore, owner: str) -> None:
        self.store = store
        self.owner = owner
        self._pending: dict[str, dict[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None

    def _queue(self, request_id: str, name: str, changes: dict[str, Any]) -> None:
        with self._lock:
            self._pending.setdefault(request_id, {}).setdefault(name, {}).update(changes)
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="progress", daemon=True)
                self._flusher.start()
        self._wake.set()

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.FLUSH_SECONDS)  # gather what comes meanwhile
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the database is away for a moment: the next change tries again
                log.warning("writing request progress failed; retrying with the next change", exc_info=True)

    def flush(
        self, request_id: str | None = None, conn: Connection | None = None, current: RequestRecord | None = None
    ) -> list[dict[str, Any]] | None:
        """Write what is gathered (only ``request_id``'s, when given) now (``conn``: inside
        the caller's transaction: the hand-over; ``current``: that request as the
        transaction has read it, whose VMs are then not read again). The VMs of
        ``request_id`` as written, or None when it had nothing gathered."""
        with self._lock:
            if request_id is None:
                taken, self._pending = self._pending, {}
            else:
                taken = {request_id: self._pending.pop(request_id)} if request_id in self._pending else {}
        try:
            written = self.store.update_vms(taken, conn, {current.id: current.vms} if current is not None else None)
        except Exception:
            with self._lock:  # put it back, older than anything gathered since
                for rid, by_name in taken.items():
                    newer = self._pending.get(rid, {})
                    merged = {n: {**c, **newer.get(n, {})} for n, c in by_name.items()}
                    self._pending[rid] = {**newer, **merged}
            raise
        return written.get(request_id) if request_id is not None else None

    def started(self, request_id: str, username: str, os: str, count: int, origin: str = "v1") -> RequestRecord:
        """The row of a request that does not wait, as it starts (``creating``): written by
        its reservation's transaction (``Admission.reserve``), so a request refused at
        once leaves none; ``start`` writes it when no reservation will."""
        now = self.store.clock()
        return RequestRecord(
            id=request_id,
            username=username,
            os=os,
            count=count,
            state=RequestState.CREATING,
            owner=self.owner,
            builder=self.owner,
            created_at=now,
            started_at=now,
            origin=origin,
        )

    def start(self, record: RequestRecord) -> None:
        self.store.ensure(record)

    def stage(
        self,
        request_id: str,
        name: str,
        stage: str,
        ip: str | None = None,
        error: str | None = None,
        host: str | None = None,
    ) -> None:
        changes: dict[str, Any] = {"stage": stage}
        if host:
            changes["host"] = host
        if stage == "removed":
            changes["ip"] = None  # a removed VM's address is no one's
        elif ip:
            changes["ip"] = ip
        if error:
            changes["error"] = error
        self._queue(request_id, name, changes)

    def finish(self, request_id: str, by: Actor, error: Exception | None = None) -> None:
        """The request ended: ready, or failed with ``error`` (its HTTP status and kind kept,
        so a waiter on any replica answers as the engine raised it). ``by``: who ends it
        (``states.REQUESTS`` says from which states it may)."""
        self.flush(request_id)
        to = RequestState.READY if error is None else RequestState.FAILED
        values: dict[str, Any] = {}
        if error is not None:
            values = {"error": str(error), "error_status": getattr(error, "status", 500)}
            values["error_kind"] = type(error).__name__
        self.store.transition(request_id, REQUESTS.sources(to, by), to, by=by, **values)

    def get(self, request_id: str) -> dict[str, Any] | None:
        record = self.store.get(request_id)
        if record is None:
            return None
        status = record.as_dict(self.store.clock())
        with self._lock:  # what this process has not written yet
            pending = {name: dict(changes) for name, changes in self._pending.get(request_id, {}).items()}
        for vm in status["vms"]:
            vm.update(pending.get(vm["name"], {}))
        return status
