"""History documents: one per VM ever created, keyed by its xapi uuid (SPEC.md §3).

They are kept in dynvm's database and, when ``[couchbase]`` is filled in and the
``couchbase`` extra installed, also upserted into that bucket. The sink is written from a
background pass, never from a request: a Couchbase outage is logged and retried later and
never blocks or fails a request.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Connection, Float, Select, bindparam, case, func, insert, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import Insert

from ..config import CouchbaseSettings
from ..model import Lease
from ..states import LeaseState
from ..trace import Demand, create_seconds
from .db import Database
from .tables import history

log = logging.getLogger(__name__)

POOL_ID = "dynamicpool"
INDEXED = ("username", "os", "state", "created_time", "create_duration_secs", "live_duration_secs")
DOCUMENT_VERSION = 1


def created_document(lease: Lease, origin: str) -> dict[str, Any]:
    """The document written when a VM is ready (state "available")."""
    return {
        "ipaddr": lease.ip or "",
        "origin": origin,
        "os": lease.os,
        "state": "available",
        "poolId": POOL_ID,
        "prevUser": "",
        "username": lease.username,
        "ver": DOCUMENT_VERSION,
        "memory": lease.memory,
        "os_version": lease.os_version or "",
        "name": lease.name,
        "created_time": int(lease.ready_at or lease.created_at),
        "create_duration_secs": round(lease.create_seconds or 0),  # whole seconds, as the seed's documents
        "create_duration_ms": round((lease.create_seconds or 0) * 1000),  # beyond the SPEC: what the figures use
        "cpu": lease.cpus,
        "disk": lease.disk,
        "deleted_time": None,
        "live_duration_secs": None,
        "delete_duration_secs": None,
    }


def deleted_document(document: dict[str, Any], deleted_at: float, delete_seconds: float) -> dict[str, Any]:
    """The same document once the VM is gone (state "deleted")."""
    done = dict(document)
    done.update(
        state="deleted",
        prevUser=document["username"],
        deleted_time=int(deleted_at),
        live_duration_secs=max(0, int(deleted_at) - int(document["created_time"])),
        delete_duration_secs=round(delete_seconds),
    )
    return done


def indexed(document: dict[str, Any]) -> dict[str, Any]:
    """The columns copied from a document. ``create_duration_secs`` keeps the sub-second
    time (``trace.create_seconds``) where the document has it: the column is a float, and
    the create-time figures and ``/api/v1/stats`` read it, not the document's whole seconds."""
    return {column: document[column] for column in INDEXED} | {"create_duration_secs": create_seconds(document)}


def held() -> tuple[ColumnElement[float], ColumnElement[float]]:
    """When a user held each VM of the history, as SQL: from its hand-out (a ready-pool VM:
    when a request took it, not when it was made for the pool) to its deletion (NULL while
    it lives). An idle ready-pool VM is in no document: it enters the history when a
    request takes it, under that request's user."""
    handout = func.nullif(history.c.document["handout_time"].as_float(), 0)  # 0: never handed out
    return func.coalesce(handout, history.c.created_time), history.c.created_time + history.c.live_duration_secs


@functools.cache
def _save_statement(is_sqlite: bool) -> Insert:
    """Insert a document, or replace it: one statement, built once per dialect."""
    columns = ["document", "updated_at", "exported", *INDEXED, "create_duration_secs"]
    dialect = sqlite if is_sqlite else postgresql
    statement = dialect.insert(history).values(
        vm_uuid=bindparam("b_vm_uuid"), **{c: bindparam(f"b_{c}") for c in columns}
    )
    upsert: Insert = statement.on_conflict_do_update(
        index_elements=[history.c.vm_uuid], set_={c: statement.excluded[c] for c in columns}
    )
    return upsert


@functools.cache
def _document_statement() -> Select[tuple[Any]]:
    return select(history.c.document).where(history.c.vm_uuid == bindparam("vm_uuid"))


class HistorySink(Protocol):
    def upsert(self, key: str, document: dict[str, Any]) -> None: ...


class CouchbaseSink:
    """Upserts documents into the configured bucket (needs the ``couchbase`` extra)."""

    def __init__(self, settings: CouchbaseSettings, timeout: float = 10.0) -> None:
        try:
            from couchbase.auth import PasswordAuthenticator
            from couchbase.cluster import Cluster
            from couchbase.options import ClusterOptions, ClusterTimeoutOptions
        except ImportError as e:
            raise RuntimeError(
                "[couchbase] is filled in but the Couchbase SDK is missing: install dynvm's couchbase extra "
                "(pip install '<the dynvm wheel>[couchbase]')"
            ) from e
        from datetime import timedelta

        server = settings.server if "://" in settings.server else f"couchbase://{settings.server}"
        options = ClusterOptions(
            PasswordAuthenticator(settings.username, settings.password.reveal()),
            timeout_options=ClusterTimeoutOptions(kv_timeout=timedelta(seconds=timeout)),
        )
        self._cluster = Cluster(server, options)
        self._cluster.wait_until_ready(timedelta(seconds=timeout))
        self._collection = self._cluster.bucket(settings.bucket).default_collection()

    def upsert(self, key: str, document: dict[str, Any]) -> None:
        self._collection.upsert(key, document)


class HistoryStore:
    def __init__(self, db: Database, sink: HistorySink | None = None, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.sink = sink
        self.clock = clock

    def import_demands(self, demands: Iterable[Demand], create_seconds: float) -> int:
        """Write past demand as the history of VMs that came and went (``dynvm replay --live
        --history``: the service then knows that past as a running lab would). One document
        per VM, made ``create_seconds`` after its request arrived and deleted after its hold;
        they are marked as already exported: they are not this lab's VMs to report."""
        rows = []
        for demand in demands:
            created = int(demand.arrival_s + create_seconds)
            for n in range(demand.count):
                vm = Lease(
                    id="",
                    request_id="",
                    name=f"{demand.user}-{n}",
                    username=demand.user,
                    os=demand.os,
                    host_ref="",
                    state=LeaseState.RELEASED,
                    cpus=0,
                    memory=0,
                    disk=0,
                    created_at=created,
                    expires_at=created + demand.hold_s,
                    owner="trace",
                    create_seconds=create_seconds,
                )
                document = deleted_document(created_document(vm, "trace"), created + demand.hold_s, 0)
                rows.append(
                    {
                        "vm_uuid": f"trace-{uuid.uuid4().hex[:30]}",  # 36 characters, as a uuid
                        "document": document,
                        "updated_at": created,
                        "exported": True,
                        **indexed(document),
                    }
                )
        if rows:
            with self.db.write() as conn:
                conn.execute(insert(history), rows)
        return len(rows)

    def record_created(
        self, lease: Lease, origin: str, handed_out_at: float | None = None, conn: Connection | None = None
    ) -> dict[str, Any]:
        """``handed_out_at``: a ready-pool VM a request took then (its document says so).
        ``conn``: inside the caller's transaction (the lease's turn to ready)."""
        assert lease.vm_uuid, "a VM is in the history once it exists"
        document = created_document(lease, origin)
        if lease.pooled_at is not None:
            document.update(pooled=True, pooled_time=int(lease.pooled_at), handout_time=int(handed_out_at or 0))
        self._save(lease.vm_uuid, document, conn)
        return document

    def record_deleted(
        self, lease: Lease, delete_seconds: float, conn: Connection | None = None
    ) -> dict[str, Any] | None:
        """``conn``: inside the caller's transaction (the lease's end)."""
        if not lease.vm_uuid:
            return None
        document = self.get(lease.vm_uuid, conn)
        if document is None:
            return None
        done = deleted_document(document, self.clock(), delete_seconds)
        self._save(lease.vm_uuid, done, conn)
        return done

    def get(self, vm_uuid: str, conn: Connection | None = None) -> dict[str, Any] | None:
        with self.db.reading(conn) as reading:
            row = self.db.run(reading, _document_statement(), {"vm_uuid": vm_uuid}).first()
        return dict(row[0]) if row else None

    def all(self, created_since: float | None = None) -> list[dict[str, Any]]:
        """Every document (``created_since``: of the VMs created then or later, read through
        the index on created_time rather than the whole history)."""
        query = select(history.c.document).order_by(history.c.updated_at)
        if created_since is not None:
            query = query.where(history.c.created_time >= int(created_since))  # the column is whole seconds
        with self.db.read() as conn:
            return [dict(r.document) for r in conn.execute(query)]

    def _save(self, vm_uuid: str, document: dict[str, Any], conn: Connection | None = None) -> None:
        values = {"vm_uuid": vm_uuid, "document": document, "updated_at": self.clock(), "exported": False}
        bound = {f"b_{column}": value for column, value in (values | indexed(document)).items()}
        with self.db.writing(conn) as writing:
            self.db.run(writing, _save_statement(self.db.is_sqlite), bound)

    def query(
        self,
        user: str | None = None,
        os: str | None = None,
        state: str | None = None,
        since: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        """Documents matching the filters, newest first, and how many match in all."""
        where = []
        if user is not None:
            where.append(history.c.username == user)
        if os is not None:
            where.append(history.c.os == os)
        if state is not None:
            where.append(history.c.state == state)
        if since is not None:
            where.append(history.c.created_time >= since)
        with self.db.read() as conn:
            total = conn.execute(select(func.count()).select_from(history).where(*where)).scalar_one()
            rows = conn.execute(
                select(history.c.vm_uuid, history.c.document)
                .where(*where)
                .order_by(history.c.created_time.desc(), history.c.vm_uuid)
                .limit(limit)
                .offset(offset)
            ).all()
        return [{"uuid": r.vm_uuid, **dict(r.document)} for r in rows], total

    def stats(self) -> dict[str, Any]:
        """Per OS: VMs created, mean and p95 create time, mean lifetime; per user: totals.
        Aggregated by the database (a history of millions of VMs is never loaded); the p95
        is one indexed row per OS. A create time not recorded counts as 0 s; a lifetime
        only once the VM is gone."""
        create = func.coalesce(history.c.create_duration_secs, 0.0)
        with self.db.read() as conn:
            by_os = conn.execute(
                select(history.c.os, func.count(), func.avg(create), func.avg(history.c.live_duration_secs))
                .group_by(history.c.os)
                .order_by(history.c.os)
            ).all()
            per_os: dict[str, dict[str, Any]] = {}
            for os_key, created, mean_create, mean_life in by_os:
                rank = min(created - 1, round(0.95 * (created - 1)))  # nearest rank, as before
                p95 = conn.execute(
                    select(create).where(history.c.os == os_key).order_by(create).limit(1).offset(rank)
                ).scalar_one()
                per_os[os_key] = {
                    "vms_created": created,
                    "mean_create_secs": round(float(mean_create), 1),
                    "p95_create_secs": float(p95),
                    "mean_lifetime_secs": round(float(mean_life), 1) if mean_life is not None else None,
                }
            by_user = conn.execute(
                select(history.c.username, func.count()).group_by(history.c.username).order_by(history.c.username)
            ).all()
        hours = {row["user"]: row["vm_hours"] for row in self.vm_hours(None, self.clock())}
        per_user = {user: {"vms_created": created, "vm_hours": hours.get(user, 0.0)} for user, created in by_user}
        return {"per_os": per_os, "per_user": per_user}

    def vm_hours(self, since: float | None, now: float, limit: int | None = None) -> list[dict[str, Any]]:
        """VM-hours per user, most first: the one definition, for ``/api/v1/stats`` (since
        None: all time) and the dashboard's top users (the last days): the time users held
        VMs (``held``), clipped to [since, now], a VM still alive counting up to ``now``.
        Summed by the database."""
        start, end = held()
        end = func.coalesce(end, now)
        end = case((end > now, literal(now, Float())), else_=end)
        if since is not None:
            start = case((start < since, literal(float(since), Float())), else_=start)
        seconds = end - start
        total = func.sum(seconds).label("seconds")
        query = (
            select(history.c.username, total, func.count())
            .where(seconds > 0)
            .group_by(history.c.username)
            .order_by(total.desc(), history.c.username)
            .limit(limit)
        )
        with self.db.read() as conn:
            return [
                {"user": user, "vm_hours": round(float(total) / 3600, 2), "vms": vms}
                for user, total, vms in conn.execute(query)
            ]

    def lifetimes(self, since: float) -> list[tuple[str, str, float, float | None, float | None]]:
        """(user, os, in use from, in use for or None while alive, create seconds) of every
        VM held at some time since ``since`` (``held``): what the dashboard's usage plots
        and create times are drawn from. The indexed columns are read, and of the documents
        only ``handout_time``."""
        start, end = held()
        query = select(history.c.username, history.c.os, start, end - start, history.c.create_duration_secs).where(
            end.is_(None) | (end >= literal(float(since), Float()))
        )
        with self.db.read() as conn:
            return [
                (user or "", os or "", float(begun or 0), None if lived is None else max(0.0, float(lived)), create)
                for user, os, begun, lived, create in conn.execute(query)
            ]

    def export_pending(self, limit: int = 500) -> int:
        """Send documents not yet in the sink; returns how many went. A failure is logged
        and those documents stay pending for the next pass."""
        if self.sink is None:
            return 0
        with self.db.read() as conn:
            rows = conn.execute(
                select(history.c.vm_uuid, history.c.document, history.c.updated_at)
                .where(history.c.exported.is_(False))
                .limit(limit)
            ).all()
        sent = 0
        for row in rows:
            try:
                self.sink.upsert(row.vm_uuid, dict(row.document))
            except Exception as e:
                log.warning("history export failed, will retry: %s", e)
                break
            with self.db.write() as conn:  # only if unchanged since it was read
                conn.execute(
                    update(history)
                    .where((history.c.vm_uuid == row.vm_uuid) & (history.c.updated_at == row.updated_at))
                    .values(exported=True)
                )
            sent += 1
        return sent
