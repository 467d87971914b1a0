"""The parts of a running service, built from a config file and a database URL, and the
background duties that keep leases honest: the reaper (expiry), reconcile, and the history
export. ``Services.start()`` / ``stop()`` are called from the app's lifespan; nothing
starts at import or construction time."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .auth import TokenStore
from .config import ConfigWatcher, Settings, load_settings
from .engine.claim import CLAIM_INTERVAL, Contested
from .engine.service import LeaseService
from .metrics import Metrics
from .providers import Providers
from .store.db import Database, default_db_url, describe_url
from .store.history import CouchbaseSink, HistorySink, HistoryStore
from .store.installation import InstallationStore
from .store.leadership import Leadership
from .store.leases import LeaseStore

if TYPE_CHECKING:
    from .xen.inventory import Inventory

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Intervals:
    reap: float = 2.0  # expiry is honoured within this (plus one destroy) of its time
    reconcile: float = 30.0  # also how soon a dead replica's creates are cleaned up
    export: float = 30.0
    pools: float = 1.0  # ready pools: recycle, give way, refill
    sync_wait: float = 15.0  # at start-up, how long to wait for hosts to answer once
    claim: float = CLAIM_INTERVAL  # the leader renews the installation's claim on its hosts
    shutdown_grace: float = 30.0


class Background:
    """One thread running a duty every ``interval`` seconds until stopped (and, with
    ``when``, only while that says so: the leader's duties)."""

    def __init__(
        self, name: str, interval: float, duty: Callable[[], object], when: Callable[[], bool] = lambda: True
    ) -> None:
        self.name = name
        self.interval = interval
        self.duty = duty
        self.when = when
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.when():
                    self.duty()
            except Exception:  # a failed pass is logged; the next one tries again
                log.exception("%s pass failed", self.name)


@dataclass
class Services:
    config_path: Path
    settings: Settings
    db: Database
    provider: Providers  # a provider per kind of host the config names (providers.py)
    engine: LeaseService  # the lease engine (engine/service.py)
    history: HistoryStore
    watcher: ConfigWatcher
    intervals: Intervals
    tokens: TokenStore
    metrics: Metrics
    leadership: Leadership
    requests: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=512, thread_name_prefix="request")
    )
    on_started: Callable[[], None] | None = None  # called once start() is done (dynvm replay --live's clock)
    _loops: list[Background] = field(default_factory=list)
    _stopped: bool = False

    @property
    def inventory(self) -> Inventory:
        """The Xen provider's mirror of its hosts, when the config names Xen hosts (tests
        and ``dynvm doctor`` read it)."""
        from .xen.provider import XenProvider  # only when asked: a config may name no Xen host

        xen = self.provider.part("xenhost")
        if not isinstance(xen, XenProvider):
            raise LookupError("the configuration names no [xenhostN] host")
        return xen.inventory

    def current_settings(self) -> Settings:
        return self.watcher.current

    async def run_long(self, work: Callable[..., T], *args: object) -> T:
        """Await ``work(*args)`` run on the request pool. For what may take minutes (creating
        or destroying VMs): the server's own thread limiter, which quick routes share, is
        never held by it, so counting and listing stay fast while VMs are made."""
        return await asyncio.get_running_loop().run_in_executor(self.requests, functools.partial(work, *args))

    def start(self) -> None:
        self.metrics.watch(self.engine, lambda: self.leadership.leading)
        self.provider.apply(self.settings)
        if not self.provider.wait_synced(self.intervals.sync_wait):
            log.warning("some hosts did not answer within %.0f s; going on without them", self.intervals.sync_wait)
        self.engine.heartbeat()
        try:  # before anything touches a host: is this database the installation, or a copy?
            self.engine.claim.check()
            self.engine.claim.settle()
            if self.leadership.is_leader():
                self.engine.claim.renew()
        except Contested as e:
            log.error("%s", e)
            raise
        for problem in self.engine.template_problems():
            log.error("%s: no VM of that OS is made there until the config names one template", problem)
        if self.leadership.is_leader():  # a follower leaves this to the leader's next pass
            recovered = self.engine.recover()
            if recovered:
                log.warning("creates interrupted by the last stop, now failed: %s", ", ".join(recovered))
            report = self.engine.reconcile(startup=True)
            log.info(
                "start-up reconcile: %d orphan(s) destroyed, %d vanished lease(s) closed",
                len(report.orphans_destroyed),
                len(report.vanished),
            )
        self.watcher.start()
        leading = self.leadership.is_leader
        self.engine.ready_pools.pass_seconds = self.intervals.pools  # learned sizing's lead: a refill waits for it
        self._loops = [
            Background("heartbeat", self.intervals.reap, self.engine.heartbeat),
            Background("reaper", self.intervals.reap, self.engine.expire_due, leading),
            Background("reconcile", self.intervals.reconcile, self._reconcile, leading),
            Background("history-export", self.intervals.export, self.history.export_pending, leading),
            Background("ready-pools", self.intervals.pools, self.engine.ready_pools.tick, leading),
            Background("claim", self.intervals.claim, self._renew_claim),
        ]
        for loop in self._loops:
            loop.start()
        self.engine.scheduler.start(leading)
        if self.on_started is not None:
            self.on_started()

    def _renew_claim(self) -> None:
        """The leader renews the claim; every replica checks it (a copy's followers too)."""
        if self.engine.claim.contested is not None:
            return  # said once; a restart after the operator's fix clears it
        try:
            if self.leadership.is_leader():
                self.engine.claim.renew()
            else:
                self.engine.claim.check()
        except Contested as e:
            log.error("%s", e)  # from now on this process touches no host

    def _reconcile(self) -> None:
        self.engine.recover()
        self.engine.reconcile()

    def stop(self) -> None:
        """Stop everything (in-flight creates finish or are rolled back). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.engine.scheduler.stop()
        self.engine.shutdown(self.intervals.shutdown_grace)
        for loop in self._loops:
            loop.stop()
        with contextlib.suppress(Exception):  # a stopped process is not alive: others need not wait
            self.engine.ctx.replicas.forget_owner(self.engine.owner)
        with contextlib.suppress(Exception):  # the last one out: a restore may start at once
            self.engine.claim.withdraw()
        self.leadership.resign()
        self.watcher.stop()
        self.provider.stop()
        self.requests.shutdown(wait=False, cancel_futures=True)
        self.db.close()


def build_services(
    config_path: Path,
    db_url: str | None = None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    intervals: Intervals | None = None,
    sink: HistorySink | None = None,
    event_timeout: float = 5.0,
    replica: str | None = None,
) -> Services:
    """Load the configuration (``ConfigError`` if invalid) and open the database, migrated.

    The database is ``db_url``, else ``[common] db.url``, else SQLite in
    ``~/.local/share/dynvm/``. ``clock`` and ``monotonic``: time as dynvm keeps it (only
    tests and ``dynvm replay --live`` change them)."""
    settings = load_settings(config_path)
    for warning in settings.warnings:
        log.warning("%s", warning)
    url = db_url or settings.common.db_url or default_db_url()
    db = Database(url)
    db.migrate()
    log.info("database: %s", describe_url(url))
    if sink is None and settings.couchbase.enabled:
        try:
            sink = CouchbaseSink(settings.couchbase)
        except Exception as e:  # history stays in the database and is exported once it works
            log.error("Couchbase history sink unavailable: %s", e)
    history = HistoryStore(db, sink, clock)
    holder: dict[str, ConfigWatcher] = {}
    lease_store = LeaseStore(db)
    installation = functools.cache(InstallationStore(db).installation_id)

    def current() -> Settings:  # the watcher's, once made: a reload reaches the providers too
        return holder["watcher"].current if "watcher" in holder else settings

    provider = Providers(current, installation, monotonic, event_timeout, database=db, clock=clock)
    engine = LeaseService(lambda: holder["watcher"].current, provider, lease_store, history, clock=clock, owner=replica)
    watcher = ConfigWatcher(config_path, settings, provider.apply)
    holder["watcher"] = watcher
    tokens = TokenStore(db, clock)
    metrics = Metrics()
    engine.events = metrics
    return Services(
        config_path=config_path,
        settings=settings,
        db=db,
        provider=provider,
        engine=engine,
        history=history,
        watcher=watcher,
        intervals=intervals or Intervals(),
        tokens=tokens,
        metrics=metrics,
        leadership=Leadership(db),
    )
