"""The lease and request state machines: every state, every legal move, and who may make it.

This table is the one home of dynvm's lifecycle. The stores (``store/leases.py``,
``store/requests.py``) check each write against it before they touch a row: a move the
table does not hold raises ``IllegalMove`` (a bug, never a caller's error). Each write is
still a conditional UPDATE (``WHERE state IN <sources>``), so when two processes race for
one row the database decides which move happened. The database itself refuses a state
that is not here (check constraints, migration 0011), and docs/LIFECYCLES.md's state diagram is
drawn from this table (``mermaid``; a test keeps the two equal).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar


class LeaseState(enum.StrEnum):
    """Where one VM's lease is. Active: creating, ready, releasing (the VM may exist)."""

    CREATING = "creating"
    READY = "ready"
    RELEASING = "releasing"
    RELEASED = "released"
    EXPIRED = "expired"
    FAILED = "failed"


class RequestState(enum.StrEnum):
    """Where a request for VMs is, from acceptance to its answer."""

    QUEUED = "queued"
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed out"


class Actor(enum.StrEnum):
    """Who makes a move: the part of dynvm, or the person, that writes it."""

    ADMISSION = "admission"  # a request's (or a ready pool's) room is reserved
    BUILDER = "builder"  # the process making a request's VMs
    RELEASER = "releaser"  # a release: the caller's, expiry's, a roll-back's, a pool's recycle
    SCHEDULER = "scheduler"  # the leader serving the queue
    CALLER = "caller"  # the user who asked (a cancel)
    RECOVERY = "recovery"  # start-up and reconcile, finishing what a dead process left
    RECONCILE = "reconcile"  # the hosts say otherwise than the database
    OPERATOR = "operator"  # ``dynvm installation new``: the database starts a new installation


ACTIVE_LEASE_STATES = (LeaseState.CREATING, LeaseState.READY, LeaseState.RELEASING)
FINAL_REQUEST_STATES = (RequestState.READY, RequestState.FAILED, RequestState.CANCELLED, RequestState.TIMED_OUT)

S = TypeVar("S", LeaseState, RequestState)


class IllegalMove(RuntimeError):
    """dynvm's code asked for a move its state table does not allow (a bug)."""


@dataclass(frozen=True)
class Move(Generic[S]):
    """One legal move: from ``source`` (None: the row is written in ``target``) to
    ``target``, made only by ``by``, for the reason ``why`` says."""

    source: S | None
    target: S
    by: frozenset[Actor]
    why: str


def _move(source: S | None, target: S, by: Iterable[Actor], why: str) -> Move[S]:
    return Move(source, target, frozenset(by), why)


L, R, A = LeaseState, RequestState, Actor

LEASE_MOVES: tuple[Move[LeaseState], ...] = (
    _move(None, L.CREATING, [A.ADMISSION], "room reserved on a host; its VM is to be made"),
    _move(L.CREATING, L.READY, [A.BUILDER], "its VM answers"),
    _move(L.CREATING, L.FAILED, [A.BUILDER, A.RECOVERY, A.RECONCILE], "its create failed, or its process died"),
    _move(L.READY, L.FAILED, [A.BUILDER, A.RECONCILE], "made, but never handed out; reconcile removes its VM"),
    _move(L.READY, L.RELEASING, [A.RELEASER], "released, expired, rolled back or recycled: its VM goes"),
    _move(L.READY, L.RELEASED, [A.RECONCILE, A.OPERATOR], "its VM vanished, or a new installation begins"),
    _move(L.RELEASING, L.RELEASING, [A.RELEASER], "a release that failed, or whose process died, is taken over"),
    _move(L.RELEASING, L.RELEASED, [A.RELEASER, A.OPERATOR], "its VM is destroyed"),
    _move(L.RELEASING, L.EXPIRED, [A.RELEASER], "its VM is destroyed at the end of its lifetime"),
    _move(L.RELEASING, L.FAILED, [A.RELEASER, A.RECONCILE], "its VM is destroyed after a failed request"),
    _move(L.CREATING, L.RELEASED, [A.OPERATOR], "a new installation begins"),
)

REQUEST_MOVES: tuple[Move[RequestState], ...] = (
    _move(None, R.QUEUED, [A.CALLER], "asked with wait=: it waits for room"),
    _move(None, R.CREATING, [A.ADMISSION], "asked without wait: its room is reserved now"),
    _move(R.QUEUED, R.CREATING, [A.SCHEDULER], "the scheduler serves it: its room is reserved"),
    _move(R.CREATING, R.QUEUED, [A.SCHEDULER, A.BUILDER, A.RECOVERY], "its room went, or its builder stopped"),
    _move(R.CREATING, R.READY, [A.BUILDER], "every VM is handed over"),
    _move(R.CREATING, R.FAILED, [A.ADMISSION, A.BUILDER, A.RECOVERY], "a VM could not be made"),
    _move(R.QUEUED, R.FAILED, [A.SCHEDULER, A.RECOVERY], "it can never fit, or nobody waits for it"),
    _move(R.QUEUED, R.CANCELLED, [A.CALLER, A.SCHEDULER, A.RECOVERY, A.OPERATOR], "cancelled while it waited"),
    _move(R.CREATING, R.CANCELLED, [A.BUILDER, A.OPERATOR], "cancelled; what was built is removed"),
    _move(R.QUEUED, R.TIMED_OUT, [A.SCHEDULER], "its wait ran out"),
)


class StateTable(Generic[S]):
    """The legal moves of one kind of row (leases, or requests)."""

    def __init__(self, name: str, states: type[S], moves: tuple[Move[S], ...]) -> None:
        self.name = name
        self.states: type[S] = states
        self.moves: tuple[Move[S], ...] = moves
        self._allowed: dict[tuple[S | None, S], frozenset[Actor]] = {(m.source, m.target): m.by for m in moves}

    def check(self, sources: Iterable[S | None], target: S, by: Actor) -> list[S]:
        """The sources, once every move from one of them to ``target`` is legal for ``by``;
        else ``IllegalMove``. Called by the stores before each write."""
        sources = list(sources)
        if not sources:
            raise IllegalMove(f"a move of a {self.name} to {target} from no state")
        for source in sources:
            if by not in self._allowed.get((source, target), frozenset()):
                raise IllegalMove(f"{by} may not move a {self.name} from {source or 'nothing'} to {target}")
        return [s for s in sources if s is not None]

    def check_born(self, state: S) -> None:
        """A row may be written in ``state`` (some move starts there from nothing); else
        ``IllegalMove``. Called by the stores before each insert."""
        if not any(m.source is None and m.target == state for m in self.moves):
            raise IllegalMove(f"a {self.name} is never written in state {state}")

    def sources(self, target: S, by: Actor) -> list[S]:
        """Every state from which ``by`` may move a row to ``target`` (never empty: else
        ``IllegalMove``)."""
        found = [m.source for m in self.moves if m.target == target and by in m.by and m.source is not None]
        if not found:
            raise IllegalMove(f"{by} may not move a {self.name} to {target}")
        return found

    def mermaid(self) -> str:
        """The table as a Mermaid state diagram (docs/LIFECYCLES.md shows it)."""
        lines = ["stateDiagram-v2"]
        for m in self.moves:
            source = "[*]" if m.source is None else _node(m.source)
            lines.append(f"    {source} --> {_node(m.target)}: {', '.join(sorted(m.by))}")
        return "\n".join(lines)


def _node(state: enum.StrEnum) -> str:
    return state.value.replace(" ", "_")


LEASES: StateTable[LeaseState] = StateTable("lease", LeaseState, LEASE_MOVES)
REQUESTS: StateTable[RequestState] = StateTable("request", RequestState, REQUEST_MOVES)
