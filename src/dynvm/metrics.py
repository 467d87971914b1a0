"""Prometheus metrics, on a registry of the app's own (no global state).

Counters and the provisioning histogram are fed by the lease service's events and an
HTTP middleware; gauges (VMs, capacity, hosts) are read from memory at scrape time."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine.context import LeaseEvents
from .model import Lease
from .provider import ReconcileReport
from .states import RequestState
from .store.requests import RequestRecord

if TYPE_CHECKING:
    from .engine.service import LeaseService


class Metrics(LeaseEvents):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "dynvm_http_requests", "HTTP requests answered", ["route", "status"], registry=self.registry
        )
        self.provisioning = Histogram(
            "dynvm_provision_seconds",
            "Time from request to a ready VM",
            buckets=(5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200),
            registry=self.registry,
        )
        self.failures = Counter("dynvm_create_failures", "VM creates that failed", ["reason"], registry=self.registry)
        self.leases_ended = Counter("dynvm_leases_ended", "Leases ended, by how", ["state"], registry=self.registry)
        self.reconcile = Counter(
            "dynvm_reconcile_actions", "What reconcile passes did", ["action"], registry=self.registry
        )
        waits = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
        self.queue_wait = Histogram(
            "dynvm_queue_wait_seconds",
            "Time a request waited in the queue before it was served",
            ["os"],
            buckets=waits,
            registry=self.registry,
        )
        self.eta_error = Histogram(
            "dynvm_queue_eta_error_seconds",
            "|ready - ETA forecast when the request was first queued|, for queued requests that became ready",
            ["os"],
            buckets=waits,
            registry=self.registry,
        )
        self.scheduler_pass = Histogram(
            "dynvm_scheduler_pass_seconds",
            "Time one scheduler pass takes (time-outs, grants, the forecast of the whole queue)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.time_to_vm = Histogram(
            "dynvm_time_to_vm_seconds",
            "From a request's arrival to its VMs handed over, by how they came: "
            "warm (a ready pool), cold (made for it), queued (it waited for room)",
            ["how"],
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.requests_ended = Counter(
            "dynvm_requests_ended", "Lease requests that ended, by state", ["state"], registry=self.registry
        )
        self.requests_refused = Counter(
            "dynvm_requests_refused",
            "Lease requests refused at once, by why (never started, so not kept as requests)",
            ["reason"],
            registry=self.registry,
        )

    def watch(self, engine: LeaseService, leading: Callable[[], bool]) -> None:
        """Start reporting the gauges read from the running lease engine (``leading``: whether
        this replica leads)."""
        self.registry.register(_Gauges(engine, leading))

    # -- LeaseEvents ---------------------------------------------------------------------

    def created(self, lease: Lease) -> None:
        self.provisioning.observe(lease.create_seconds or 0.0)

    def create_failed(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def refused(self, reason: str) -> None:
        self.requests_refused.labels(reason).inc()

    def ended(self, lease: Lease, state: str) -> None:
        self.leases_ended.labels(state).inc()

    def handed_out(self, lease: Lease, how: str, seconds: float) -> None:
        self.time_to_vm.labels(how).observe(seconds)

    def scheduler_passed(self, seconds: float) -> None:
        self.scheduler_pass.observe(seconds)

    def request_event(self, kind: str, record: RequestRecord) -> None:
        if kind == "served" and record.created_at:
            self.queue_wait.labels(record.os).observe(max(0.0, (record.started_at or 0) - record.created_at))
        elif kind == "ready" and record.eta_first is not None and record.finished_at is not None:
            self.eta_error.labels(record.os).observe(abs(record.finished_at - record.eta_first))
        if kind in ("ready", "failed", "cancelled", "timed out"):
            self.requests_ended.labels(kind).inc()

    def reconciled(self, report: ReconcileReport) -> None:
        self.reconcile.labels("orphan_destroyed").inc(len(report.orphans_destroyed))
        self.reconcile.labels("vanished_closed").inc(len(report.vanished))
        self.reconcile.labels("error").inc(len(report.errors))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges(Collector):
    def __init__(self, engine: LeaseService, leading: Callable[[], bool]) -> None:
        self.engine = engine
        self.leading = leading

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self.engine
        settings = engine.settings
        vms = GaugeMetricFamily("dynvm_vms", "dynvm's VMs, by host, OS and lease state", labels=["host", "os", "state"])
        for (host_ref, os, state), n in sorted(
            Tally((lease.host_ref, lease.os, lease.state) for lease in engine.lease_store.active()).items()
        ):
            vms.add_metric([host_ref, os, state], n)
        yield vms
        up = GaugeMetricFamily("dynvm_host_up", "1 if the host answers, 0 if it is down or connecting", labels=["host"])
        for ref, status in engine.host_statuses().items():
            if not status.same_pool_as:  # a section naming a counted pool again
                up.add_metric([ref], 1.0 if status.up else 0.0)
        yield up
        capacity = GaugeMetricFamily("dynvm_capacity", "How many more VMs of an OS fit now", labels=["os"])
        for os in settings.os_keys:
            capacity.add_metric([os], engine.available_count(os))
        yield capacity
        length = GaugeMetricFamily("dynvm_queue_length", "Requests waiting in the queue", labels=["os"])
        oldest = GaugeMetricFamily(
            "dynvm_queue_oldest_wait_seconds", "How long the oldest waiting request has waited", labels=["os"]
        )
        now = engine.clock()
        waiting: dict[str, list[float]] = {}
        for record in engine.request_store.in_state(RequestState.QUEUED):
            waiting.setdefault(record.os, []).append(now - record.created_at)
        for os in sorted(set(settings.os_keys) | set(waiting)):
            length.add_metric([os], len(waiting.get(os, [])))
            oldest.add_metric([os], max(waiting.get(os, [0.0])))
        yield length
        yield oldest
        ready = GaugeMetricFamily("dynvm_pool_ready", "Idle ready VMs in the ready pool of an OS", labels=["os"])
        target = GaugeMetricFamily("dynvm_pool_target", "How many ready VMs an OS's pool keeps", labels=["os"])
        forecast = GaugeMetricFamily(
            "dynvm_pool_forecast_per_hour",
            "With learned sizing: the VMs an hour an OS's ready pool is sized for",
            labels=["os"],
        )
        for pool in engine.ready_pools.status():
            ready.add_metric([pool.os], pool.ready)
            target.add_metric([pool.os], pool.target)
            if pool.forecast is not None:
                forecast.add_metric([pool.os], pool.forecast.rate_per_hour)
        yield ready
        yield target
        yield forecast
        leader = GaugeMetricFamily(
            "dynvm_leader", "1 if this replica runs the reaper, reconcile and history export (one replica does)"
        )
        leader.add_metric([], 1.0 if self.leading() else 0.0)
        yield leader
