"""The schema. Migrations in ``migrations/`` create it; this module is its description for
queries. SQLite and PostgreSQL behave alike: the partial unique index that keeps a VM
name held by one active lease at a time exists in both."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
    func,
    literal_column,
    text,
)
from sqlalchemy.sql.elements import ColumnElement

from ..model import NAME_DIGITS
from ..states import ACTIVE_LEASE_STATES, LeaseState, RequestState

metadata = MetaData()


def _in(states: Iterable[LeaseState] | Iterable[RequestState]) -> str:
    """``state IN (...)`` written out: the check that keeps a state column to the states
    dynvm knows (migration 0011), and the active leases' partial index (migration 0001)."""
    return "state IN (" + ", ".join(f"'{state.value}'" for state in states) + ")"


ACTIVE_SQL = _in(ACTIVE_LEASE_STATES)  # "state IN ('creating', 'ready', 'releasing')", as the index is made


leases = Table(
    "leases",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("request_id", String(36), nullable=False, index=True),
    Column("name", String(64), nullable=False),
    Column("username", String(64), nullable=False),
    Column("os", String(64), nullable=False),
    Column("host_ref", String(16), nullable=False),
    Column("template", String(255), nullable=False, default=""),
    Column("state", String(16), nullable=False),  # states.LeaseState; its moves: states.LEASES
    Column("cpus", Integer, nullable=False),
    Column("memory", BigInteger, nullable=False),
    Column("disk", BigInteger, nullable=False),
    Column("vm_uuid", String(36)),
    Column("vm_ref", String(80)),
    Column("ip", String(64)),
    Column("os_version", String(255)),
    Column("created_at", Float, nullable=False),
    Column("ready_at", Float),
    Column("expires_at", Float, nullable=False),
    Column("released_at", Float),
    Column("create_seconds", Float),
    Column("error", Text),
    Column("owner", String(64), nullable=False),  # the dynvm process creating it
    Column("caller", String(64)),  # the authenticated user who asked (None: anonymous)
    # when the request handed its VMs over; the lifetime counts from here (None: not yet)
    Column("handed_over_at", Float),
    Column("member", String(80)),  # the pool member (host ref) it was placed on; None: not known
    # a ready-pool VM ([pools]): made ahead of demand and handed to nobody yet
    Column("pooled", Boolean, nullable=False, default=False, server_default=false()),
    Column("pooled_at", Float),  # when it joined its ready pool (kept once handed out: it came warm)
    Index(
        "uq_leases_active_name",
        "name",
        unique=True,
        sqlite_where=text(ACTIVE_SQL),
        postgresql_where=text(ACTIVE_SQL),
    ),
    Index("ix_leases_state_expires", "state", "expires_at"),
    Index(  # the pools' VMs and the requests' leases, active only (every lease ever made is not)
        "ix_leases_active_pooled_os",
        "pooled",
        "os",
        sqlite_where=text(ACTIVE_SQL),
        postgresql_where=text(ACTIVE_SQL),
    ),
    Index("ix_leases_ready_at", "ready_at"),  # the forecast's made_since
    Index("ix_leases_state_released", "state", "released_at"),  # the forecast's ended_since
    Index("ix_leases_pooled_at", "pooled_at"),  # the pools' counts of the last day
    CheckConstraint(_in(LeaseState), name="ck_leases_state"),
)


def root_of_name() -> ColumnElement[str]:
    """A lease's ``name_root`` in SQL, as the index ``ix_leases_active_root`` is made: the
    digits written into the statement (a bound parameter would not match the index)."""
    return func.rtrim(leases.c.name, literal_column(f"'{NAME_DIGITS}'"))


# the other callers' leases a request's names could clash with: those under its root
Index("ix_leases_active_root", root_of_name(), sqlite_where=text(ACTIVE_SQL), postgresql_where=text(ACTIVE_SQL))

# What an in-flight create holds on a host until its VM runs (then the host's own figures
# count it) or the create fails.
reservations = Table(
    "reservations",
    metadata,
    Column("lease_id", String(36), ForeignKey("leases.id", ondelete="CASCADE"), primary_key=True),
    Column("host_ref", String(16), nullable=False, index=True),
    Column("member", String(80)),  # the pool member whose CPU and memory it holds
    Column("cpus", Integer, nullable=False),
    Column("memory", BigInteger, nullable=False),
    Column("disk", BigInteger, nullable=False),
    Column("owner", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

# One row per host ref: a reservation locks its hosts' rows (SELECT ... FOR UPDATE on
# PostgreSQL; SQLite serialises writers with BEGIN IMMEDIATE instead).
host_locks = Table("host_locks", metadata, Column("ref", String(16), primary_key=True))

history = Table(
    "history",
    metadata,
    Column("vm_uuid", String(36), primary_key=True),
    Column("document", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("exported", Boolean, nullable=False, default=False),  # sent to the Couchbase sink
    # copies of document fields that queries filter and aggregate on
    Column("username", String(64), index=True),
    Column("os", String(64), index=True),
    Column("state", String(16)),
    Column("created_time", BigInteger, index=True),
    Column("create_duration_secs", Float),
    Column("live_duration_secs", Float),
)

# API tokens: only a SHA-256 digest of each token is kept; the token is shown once.
tokens = Table(
    "tokens",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user", String(64), nullable=False, index=True),
    Column("digest", String(64), nullable=False, unique=True),
    Column("admin", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
)

# Every dynvm process beats here every few seconds; a process silent for longer than
# REPLICA_STALE_SECONDS is dead, and its unfinished creates are failed by the others.
replicas = Table(
    "replicas",
    metadata,
    Column("owner", String(64), primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
)

# A clone still running on a host when that host stopped answering: when it ends, the VM it
# made has no dynvm marker yet (the marker is added once the clone returns). Reconcile finds
# that VM through the task once the host answers again, marks it and destroys it. No foreign
# key: the lease may be long closed (or moved to another host) by then.
abandoned_clones = Table(
    "abandoned_clones",
    metadata,
    Column("host_ref", String(16), primary_key=True),
    Column("task", String(128), primary_key=True),
    Column("lease_id", String(36), nullable=False),
    Column("name", String(64), nullable=False),
    Column("abandoned_at", Float, nullable=False),
)

# Existing machines that providers hand out whole (``[staticN]``): a row while a machine is
# not idle: held by a lease, being reset after one, or out of service because its reset
# failed. The primary key makes taking a machine one atomic insert, across replicas.
machine_holds = Table(
    "machine_holds",
    metadata,
    Column("host_ref", String(16), primary_key=True),
    Column("machine", String(128), primary_key=True),
    Column("state", String(16), nullable=False),  # held, resetting, out
    Column("lease_id", String(36), nullable=True),
    Column("label", String(64), nullable=False, server_default=""),  # the lease's VM name while held
    Column("holder", String(36), nullable=True),  # the request it was handed to (compare-and-set)
    Column("since", Float, nullable=False),
    Column("error", Text, nullable=False, server_default=""),
    CheckConstraint("state IN ('held', 'resetting', 'out')", name="machine_holds_state_known"),
)

# One row, made by migration 0006: the id of this installation, written into the marker of
# every VM and disk it makes. Reconcile only ever touches VMs and disks carrying it.
installation = Table(
    "installation",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created_at", Float, nullable=False),
    # the last claim this database wrote on the hosts (engine/claim.py; migration 0010)
    Column("claim_seq", Integer, nullable=False, server_default="0"),
    Column("claim_token", String(36), nullable=True),
)

# Every lease request from acceptance to its end (store/requests.py; its states and moves are
# states.RequestState and states.REQUESTS). ``vms`` holds per-VM progress; ``position`` and
# ``eta_at`` are written by the scheduler while the request waits.
requests = Table(
    "requests",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("username", String(64), nullable=False),
    Column("caller", String(64)),
    Column("os", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("cpus", Integer),
    Column("memory", BigInteger),
    Column("expires_in_minutes", Float),
    Column("host_ref", String(16)),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("origin", String(16), nullable=False, server_default="v1"),  # legacy | v1
    Column("state", String(16), nullable=False),
    Column("owner", String(64), nullable=False),  # the process that accepted it (its caller waits there)
    Column("builder", String(64)),  # the process making its VMs (the leader, for a queued one)
    Column("created_at", Float, nullable=False),
    Column("wait_until", Float),  # a queued request times out then (None: it never waits)
    Column("started_at", Float),  # when its leases were reserved
    Column("finished_at", Float),
    Column("error", Text),
    Column("error_status", Integer),  # the HTTP status its error answers with
    Column("error_kind", String(32)),  # the engine's error class (NotEnoughCapacity, ...)
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    Column("position", Integer),
    Column("eta_at", Float),
    Column("eta_first", Float),
    Column("vms", JSON, nullable=False),
    Index("ix_requests_state_created", "state", "created_at"),
    Index("ix_requests_started_at", "started_at"),  # the scheduler's fairness window
    Index("ix_requests_finished_at", "finished_at"),  # the dashboard's and stats' last day
    CheckConstraint(_in(RequestState), name="ck_requests_state"),
)


def active_lease() -> ColumnElement[bool]:
    """``state IN ('creating', 'ready', 'releasing')`` with the states written into the
    statement, as the partial index ``uq_leases_active_name`` is made. With the states as
    bound parameters the planner cannot prove that a query implies the index's WHERE, so a
    look-up by name scans every lease ever made (measured: a by-name look-up grew with the
    history); written out, it is one index search. Written into the statement as it is
    compiled, not at each execution (a ``literal_execute`` parameter is rendered again
    every time, which cost as much as the rest of a look-up by name)."""
    return leases.c.state.in_([literal_column(f"'{state.value}'") for state in ACTIVE_LEASE_STATES])
