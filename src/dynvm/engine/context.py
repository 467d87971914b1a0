"""What the parts of the lease engine share: the configuration, the provider, the stores,
the clock, this process's name, its listeners, and the signals of its life (stopping, a
room given back). Each part (``admission.py``, ``creator.py``, ``release.py``, ...) is
given this and the few other parts it calls; none is given the service itself.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import InitVar, dataclass, field

from ..config import Settings
from ..model import Lease
from ..provider import Provider, ReconcileReport
from ..store.clones import CloneStore
from ..store.history import HistoryStore
from ..store.leases import LeaseStore
from ..store.replicas import ReplicaStore
from ..store.requests import RequestRecord, RequestStore
from .claim import ClaimKeeper, Contested
from .side_by_side import SideBySide

log = logging.getLogger(__name__)

REPLICA_STALE_SECONDS = 10.0  # a replica silent this long is dead (it beats every 2 s)


class LeaseEvents:
    """What the engine reports as it works (metrics listen); every method is a no-op here."""

    def created(self, lease: Lease) -> None: ...
    def create_failed(self, reason: str) -> None: ...
    def ended(self, lease: Lease, state: str) -> None: ...
    def reconciled(self, report: ReconcileReport) -> None: ...
    def request_event(self, kind: str, record: RequestRecord) -> None: ...
    def handed_out(self, lease: Lease, how: str, seconds: float) -> None: ...
    def scheduler_passed(self, seconds: float) -> None: ...
    def refused(self, reason: str) -> None: ...


def process_name(replica: str | None) -> str:
    """ "<replica name>#<this boot>": a restarted replica knows its own earlier creates are dead."""
    return f"{replica or 'dynvm'}#{uuid.uuid4().hex[:12]}"


@dataclass
class EngineContext:
    settings: Callable[[], Settings]
    provider: Provider
    leases: LeaseStore
    requests: RequestStore
    history: HistoryStore
    replicas: ReplicaStore
    clones: CloneStore
    clock: Callable[[], float]
    owner: str
    events: LeaseEvents = field(default_factory=LeaseEvents)
    claim: ClaimKeeper | None = None  # set once made (it asks this context who is alive)
    stopping: threading.Event = field(default_factory=threading.Event)  # no new request is taken
    cancel: threading.Event = field(default_factory=threading.Event)  # creates in flight roll back
    room_freed: threading.Event = field(default_factory=threading.Event)  # the scheduler's wake-up
    max_workers: int = 256
    creates: ThreadPoolExecutor = field(init=False)
    # a request's build waits on its VMs' creates: never in the create pool, or a full pool
    # of builds would wait for creates that no thread is left to run
    builders: ThreadPoolExecutor = field(init=False)
    # the builders' pool when given: a replay's, which counts the work running on it (``replay/model.py``)
    given_builders: InitVar[ThreadPoolExecutor | None] = None
    side_by_side: SideBySide = field(init=False)  # destroys and hand-outs of several VMs at once

    def __post_init__(self, given_builders: ThreadPoolExecutor | None) -> None:
        self.creates = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="create")
        self.builders = given_builders or ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="build")
        self.side_by_side = SideBySide()

    def report(self, event: str, *args: object) -> None:
        """Tell the listeners (metrics); a failing listener never fails the lease work."""
        try:
            getattr(self.events, event)(*args)
        except Exception:
            log.exception("reporting %s failed", event)

    @property
    def contested(self) -> str | None:
        """Why another process group acts for this installation, once known (``claim.py``)."""
        return self.claim.contested if self.claim is not None else None

    def refuse_if_contested(self) -> None:
        """Raise ``Contested`` once another process group is known to act for this
        installation: from then on this process touches no host."""
        if self.contested is not None:
            raise Contested(self.contested)

    def request_event(self, kind: str, request_id: str | None) -> None:
        """Tell the listeners a request moved (served from the queue, ready, ended)."""
        record = self.requests.get(request_id) if request_id is not None else None
        if record is not None:
            self.report("request_event", kind, record)

    def live_owners(self) -> set[str]:
        return self.replicas.live_owners(self.clock(), REPLICA_STALE_SECONDS) | {self.owner}

    def live_processes(self) -> set[str]:
        """Live owners, less this replica's past lives (a restarted replica knows its
        earlier boots are dead, however fresh their last heartbeat)."""
        me = self.owner.partition("#")[0]
        return {owner for owner in self.live_owners() if owner == self.owner or owner.partition("#")[0] != me}
