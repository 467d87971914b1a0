"""The providers of a configuration behind the one seam: a provider per kind of host the
configuration names (``[xenhostN]``, ...), made by that kind's plugin the first time a host
of it appears, and every call about a host given to its kind's provider. The engine holds
this as its ``Provider`` and never learns which kinds there are."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import cast

from . import hosts
from .config import Settings
from .hosts import HostSettings
from .model import CreatedVm, ProvisionError, VmSpec
from .provider import (
    Cancel,
    DestroyResult,
    HostRoom,
    HostStatus,
    LeakJudge,
    Machine,
    Need,
    Progress,
    Provider,
    ProviderContext,
    ProviderPlugin,
    QuarantinedVm,
    ReconcileReport,
)
from .store.db import Database


def only(settings: Settings, prefix: str) -> Settings:
    """The configuration as one kind's provider sees it: only its own hosts."""
    return dataclasses.replace(settings, hosts=tuple(h for h in settings.hosts if h.section_prefix == prefix))


class Providers:
    def __init__(
        self,
        settings: Callable[[], Settings],
        installation: Callable[[], str],
        monotonic: Callable[[], float] = time.monotonic,
        event_timeout: float = 5.0,
        database: Database | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """The kinds the configuration names now get their providers at once (so that a
        caller may look at them before ``apply``); later kinds on their first ``apply``."""
        self._settings = settings
        self._installation = installation
        self._monotonic = monotonic
        self._event_timeout = event_timeout
        self._database = database
        self._clock = clock
        self._parts: dict[str, Provider] = {}
        self._views: dict[str, tuple[Settings, Settings]] = {}  # prefix -> (settings, its view)
        self._lock = threading.Lock()
        for prefix in sorted({host.section_prefix for host in settings().hosts}):
            self._part(prefix)

    def part(self, prefix: str) -> Provider | None:
        """The provider of one kind (``"xenhost"``), if the configuration named one."""
        with self._lock:
            return self._parts.get(prefix)

    def _part(self, prefix: str) -> Provider:
        with self._lock:
            if prefix in self._parts:
                return self._parts[prefix]
        kind = hosts.kind(prefix)
        if kind is None or not hasattr(kind, "make_provider"):
            raise ProvisionError(f"no provider for [{prefix}N] sections is installed")
        context = ProviderContext(
            lambda: self._view(prefix),
            self._installation,
            self._monotonic,
            self._event_timeout,
            self._database,
            self._clock,
        )
        made = cast("ProviderPlugin", kind).make_provider(context)
        with self._lock:
            return self._parts.setdefault(prefix, made)

    def _view(self, prefix: str) -> Settings:
        current = self._settings()
        cached = self._views.get(prefix)
        if cached is not None and cached[0] is current:
            return cached[1]
        view = only(current, prefix)
        self._views[prefix] = (current, view)
        return view

    def _of(self, host: HostSettings) -> Provider:
        return self._part(host.section_prefix)

    def _all(self) -> list[Provider]:
        with self._lock:
            return list(self._parts.values())

    # -- life ------------------------------------------------------------------------------

    def apply(self, settings: Settings) -> None:
        kinds = {host.section_prefix for host in settings.hosts} | set(self._parts)
        for prefix in sorted(kinds):
            self._part(prefix).apply(only(settings, prefix))

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        synced = [part.wait_synced(max(0.0, deadline - time.monotonic())) for part in self._all()]  # each waits
        return all(synced)

    def stop(self) -> None:
        for part in self._all():
            part.stop()

    # -- hosts, their room and their machines: the host's kind answers ----------------------

    def status(self, host: HostSettings) -> HostStatus | None:
        return self._of(host).status(host)

    def need(self, host: HostSettings, os: str, cpus: int | None, memory: int | None) -> Need | None:
        return self._of(host).need(host, os, cpus, memory)

    def room(
        self, host: HostSettings, overcommit: float, reserved: Iterable[Mapping[str, object]], empty: bool = False
    ) -> HostRoom | None:
        return self._of(host).room(host, overcommit, reserved, empty)

    def shortage(self, host: HostSettings, os: str) -> str | None:
        return self._of(host).shortage(host, os)

    def template_problems(self, host: HostSettings) -> list[str]:
        return self._of(host).template_problems(host)

    def create(
        self,
        host: HostSettings,
        spec: VmSpec,
        progress: Progress,
        cancel: Cancel | threading.Event,
        on_pending: Callable[[str], None],
        attempt: int,
    ) -> CreatedVm:
        return self._of(host).create(host, spec, progress, cancel, on_pending, attempt)

    def hand_out(self, host: HostSettings, machine_ref: str, spec: VmSpec) -> None:
        self._of(host).hand_out(host, machine_ref, spec)

    def pending_job(self, machine_ref: str) -> str | None:
        """A machine ref names no host: each kind says whether it is one of its jobs."""
        for part in self._all():
            job = part.pending_job(machine_ref)
            if job is not None:
                return job
        return None

    def adopt(self, host: HostSettings, job: str, lease_id: str, wait: float) -> str | None:
        return self._of(host).adopt(host, job, lease_id, wait)

    def destroy(
        self, host: HostSettings, machine_ref: str, lease_id: str | None, holder: str | None = None
    ) -> DestroyResult:
        return self._of(host).destroy(host, machine_ref, lease_id, holder)

    def read_claim(self, host: HostSettings) -> str | None:
        return self._of(host).read_claim(host)

    def write_claim(self, host: HostSettings, claim: str) -> None:
        self._of(host).write_claim(host, claim)

    def machines(self, host: HostSettings) -> list[Machine]:
        return self._of(host).machines(host)

    def made_for(self, host: HostSettings, machine: Machine, os: str) -> bool:
        return self._of(host).made_for(host, machine, os)

    def collect_leaks(self, host: HostSettings, judge: LeakJudge, report: ReconcileReport) -> None:
        self._of(host).collect_leaks(host, judge, report)

    def quarantined(self, host: HostSettings, keep_seconds: float) -> list[QuarantinedVm]:
        return self._of(host).quarantined(host, keep_seconds)
