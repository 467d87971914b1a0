"""Create and destroy one VM, the xapi way (SPEC.md §3).

Create: find the template (exact name first, then the first name that starts with it, in
name then uuid order), clone it, mark the clone as dynvm's at once (``other_config``
``dynvm_lease``), name and describe it, put its VIF on the right network, set vCPUs (in
the order xapi requires) and memory if asked, provision its disks on the SR named
``host.storage.name``, start it, and wait for the OS name (not for Windows) and a real IP
(not 169.254.x.y) until ``vm.network.timeout.secs``. A failed attempt is destroyed with
its disks and tried again, three attempts in all. Long operations run as ``Async.*``
tasks followed with ``event.from``, so no socket waits minutes and a dead host is noticed.

Destroy: only a VM carrying dynvm's marker; hard shutdown if running, destroy the VM, then
its disks (never CD/ISO images).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import XenAPI
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from ..config import HostSettings
from ..model import CreatedVm, HostUnreachable, NotDynvmVm, ProvisionError, VmSpec
from .inventory import is_real_ip
from .session import SessionPool

log = logging.getLogger(__name__)

MARKER_KEY = "dynvm_lease"
NULL_REF = "OpaqueRef:NULL"
UNREACHABLE_CLEANUP = 10.0  # seconds a failed attempt's cleanup waits for a host that stopped answering
EVENT_SLICE = 2.0  # longest single event.from wait: how soon a cancel is noticed

Progress = Callable[[str], None]


class AttemptFailed(Exception):
    """This attempt failed in a way another attempt may not (APIPA, time-out, a failed call)."""


class _VmLog(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['vm']}] {msg}", kwargs  # type: ignore[index]


def _details(error: XenAPI.Failure) -> str:
    return " ".join(str(d) for d in error.details)


class Provisioner:
    """Creates and destroys VMs on one host. Thread-safe: each call borrows its own session."""

    def __init__(
        self,
        host: HostSettings,
        pool: SessionPool,
        network_timeout: float,
        attempts: int = 3,
        cleanup_timeout: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.pool = pool
        self.network_timeout = network_timeout
        self.attempts = attempts
        self.cleanup_timeout = cleanup_timeout
        self.clock = clock

    # -- create ------------------------------------------------------------------------

    def create(
        self,
        spec: VmSpec,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        on_clone_task: Callable[[str], None] | None = None,
    ) -> CreatedVm:
        """Create the VM; ``cancel`` (set when dynvm stops) ends the attempt and removes
        what it built. ``on_clone_task`` is told the ref of each clone's xapi task before
        the clone ends: if dynvm dies meanwhile, the clone finishes on the host without
        dynvm's marker, and ``adopt_clone`` finds it through that task afterwards."""
        progress = progress or (lambda stage: None)
        vlog = _VmLog(log, {"vm": spec.name})
        started = self.clock()
        last_error = ""
        for attempt in range(1, self.attempts + 1):
            vm: str | None = None
            try:
                with self.pool.session() as xapi:
                    template, template_name = self._template(xapi, spec)
                    sr = self._sr(xapi)
                    network = self._network(xapi)
                    progress("cloning")
                    vlog.info(
                        "attempt %d/%d: cloning %r on %s", attempt, self.attempts, template_name, self.host.display
                    )
                    vm = self._task(xapi, "VM.clone", template, spec.name, on_task=on_clone_task)
                    xapi.VM.add_to_other_config(vm, MARKER_KEY, spec.lease_id)
                    self._check_cancel(cancel)
                    self._configure(xapi, vm, spec, template_name, sr, network, vlog)
                    progress("provisioning")
                    self._task(xapi, "VM.provision", vm)
                    self._check_cancel(cancel)
                    progress("booting")
                    vlog.info("starting")
                    self._task(xapi, "VM.start", vm, False, False)
                    progress("waiting for IP")
                    ip, os_version = self._wait_for_guest(xapi, vm, spec, vlog, cancel)
                    created = self._describe(xapi, vm, spec, template_name, ip, os_version, started, attempt)
                progress("ready")
                vlog.info("ready at %s after %.1f s", ip, created.create_seconds)
                return created
            except AttemptFailed as e:
                last_error = str(e)
                vlog.warning("attempt %d/%d failed: %s", attempt, self.attempts, e)
            except XenAPI.Failure as e:
                last_error = f"xapi error {_details(e)}"
                vlog.warning("attempt %d/%d failed: %s", attempt, self.attempts, last_error)
            except (HostUnreachable, ProvisionError) as e:
                unreachable = isinstance(e, HostUnreachable) or getattr(e, "unreachable", False)
                if vm is not None:
                    progress("cleaning up")
                    # a host that stopped answering gets a short while; reconcile does the rest
                    self._cleanup(vm, spec.lease_id, vlog, UNREACHABLE_CLEANUP if unreachable else None)
                raise ProvisionError(f"{spec.name}: {e}", self.host.ref, unreachable=unreachable) from None
            if vm is not None:
                progress("cleaning up")
                self._cleanup(vm, spec.lease_id, vlog)
            if attempt < self.attempts:
                progress("retrying")
        raise ProvisionError(
            f"{spec.name}: no usable VM on {self.host.display} after {self.attempts} attempts; last: {last_error}",
            self.host.ref,
        )

    def _check_cancel(self, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise ProvisionError("cancelled: dynvm is stopping", self.host.ref)

    def _task(self, xapi: Any, method: str, *args: Any, on_task: Callable[[str], None] | None = None) -> Any:
        """Run ``Async.<method>`` and follow its task with ``event.from`` until it ends.
        ``on_task`` hears the task's ref before the wait (see ``create``'s ``on_clone_task``)."""
        cls, name = method.split(".")
        task = getattr(getattr(xapi.Async, cls), name)(*args)
        if on_task is not None:
            on_task(task)
        try:
            token = ""
            while True:
                batch = xapi.event_from([f"task/{task}"], token, EVENT_SLICE)
                token = batch["token"]
                for event in batch["events"]:
                    record = event.get("snapshot", {})
                    status = record.get("status", "pending")
                    if status == "success":
                        result = record.get("result", "")
                        return result.removeprefix("<value>").removesuffix("</value>") if result else None
                    if status in ("failure", "cancelled"):
                        raise XenAPI.Failure(record.get("error_info") or [f"TASK_{status.upper()}"])
        finally:
            with contextlib.suppress(XenAPI.Failure):
                xapi.task.destroy(task)

    def _template(self, xapi: Any, spec: VmSpec) -> tuple[str, str]:
        exact = [r for r in xapi.VM.get_by_name_label(spec.template) if xapi.VM.get_is_a_template(r)]
        if exact:
            return sorted(exact, key=xapi.VM.get_uuid)[0], spec.template
        templates = xapi.VM.get_all_records_where('field "is_a_template" = "true"')
        matches = sorted(
            (r["name_label"], r["uuid"], ref)
            for ref, r in templates.items()
            if r["name_label"].startswith(spec.template)
        )
        if not matches:
            raise ProvisionError(
                f"no template named {spec.template!r} (or starting with it) on {self.host.display}; "
                f"fix {spec.os}.template in [{self.host.section}]",
                self.host.ref,
            )
        name, _, ref = matches[0]
        return ref, name

    def _sr(self, xapi: Any) -> str:
        found = sorted(xapi.SR.get_by_name_label(self.host.storage_name), key=xapi.SR.get_uuid)
        if found:
            return found[0]
        names = sorted(r["name_label"] for r in xapi.SR.get_all_records().values() if r["content_type"] != "iso")
        raise ProvisionError(
            f"no storage repository named {self.host.storage_name!r} on {self.host.display}; it has "
            f"{', '.join(repr(n) for n in names) or 'none'}: fix host.storage.name in [{self.host.section}]",
            self.host.ref,
        )

    def _network(self, xapi: Any) -> str:
        if self.host.network:
            found = xapi.network.get_by_name_label(self.host.network)
            if not found:
                names = sorted(r["name_label"] for r in xapi.network.get_all_records().values())
                raise ProvisionError(
                    f"no network named {self.host.network!r} on {self.host.display}; it has "
                    f"{', '.join(repr(n) for n in names)}: fix host.network in [{self.host.section}]",
                    self.host.ref,
                )
            return sorted(found)[0]
        management = xapi.PIF.get_all_records_where('field "management" = "true"')
        if not management:
            raise ProvisionError(f"{self.host.display} has no management interface to attach VMs to", self.host.ref)
        return next(iter(management.values()))["network"]

    def _configure(
        self, xapi: Any, vm: str, spec: VmSpec, template_name: str, sr: str, network: str, vlog: _VmLog
    ) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        xapi.VM.set_name_description(vm, f"{spec.name} from {template_name} on {stamp}")
        vifs = xapi.VM.get_VIFs(vm)
        on_network = [v for v in vifs if xapi.VIF.get_network(v) == network]
        if not on_network:
            for vif in vifs:
                if xapi.VIF.get_device(vif) == "0":
                    xapi.VIF.destroy(vif)
            xapi.VIF.create(
                {
                    "VM": vm,
                    "network": network,
                    "device": "0",
                    "MAC": "",
                    "MTU": "1500",
                    "other_config": {},
                    "qos_algorithm_type": "",
                    "qos_algorithm_params": {},
                    "locking_mode": "network_default",
                    "ipv4_allowed": [],
                    "ipv6_allowed": [],
                }
            )
        if spec.cpus is not None:
            current_max = int(xapi.VM.get_VCPUs_max(vm))
            if spec.cpus > current_max:  # growing: the maximum first
                xapi.VM.set_VCPUs_max(vm, spec.cpus)
                xapi.VM.set_VCPUs_at_startup(vm, spec.cpus)
            else:  # shrinking: at-startup first
                xapi.VM.set_VCPUs_at_startup(vm, spec.cpus)
                xapi.VM.set_VCPUs_max(vm, spec.cpus)
            vlog.info("vCPUs set to %d", spec.cpus)
        if spec.memory is not None:
            static_min = min(int(xapi.VM.get_memory_static_min(vm)), spec.memory)
            xapi.VM.set_memory_limits(vm, static_min, spec.memory, spec.memory, spec.memory)
            vlog.info("memory set to %d bytes", spec.memory)
        other = xapi.VM.get_other_config(vm)
        if "disks" in other:
            sr_uuid = xapi.SR.get_uuid(sr)
            other["disks"] = _with_sr(other["disks"], sr_uuid)
            xapi.VM.remove_from_other_config(vm, "disks")
            xapi.VM.add_to_other_config(vm, "disks", other["disks"])

    def _wait_for_guest(
        self, xapi: Any, vm: str, spec: VmSpec, vlog: _VmLog, cancel: threading.Event | None
    ) -> tuple[str, dict[str, str]]:
        deadline = self.clock() + self.network_timeout
        token = ""
        metrics_ref = NULL_REF
        seen_apipa = ""
        while True:
            self._check_cancel(cancel)
            remaining = deadline - self.clock()
            subscriptions = [f"VM/{vm}"] + ([f"VM_guest_metrics/{metrics_ref}"] if metrics_ref != NULL_REF else [])
            batch = xapi.event_from(subscriptions, token, max(0.0, min(EVENT_SLICE, remaining)) if token else 0.0)
            token = batch["token"]
            for event in batch["events"]:
                if event["class"] == "vm" and event["operation"] == "del":
                    raise AttemptFailed("the VM was destroyed while booting")
                if event["class"] == "vm" and "snapshot" in event:
                    if event["snapshot"]["power_state"] != "Running":
                        raise AttemptFailed(f"the VM stopped while booting ({event['snapshot']['power_state']})")
                    metrics_ref = event["snapshot"]["guest_metrics"]
            if metrics_ref != NULL_REF:
                try:
                    metrics = xapi.VM_guest_metrics.get_record(metrics_ref)
                except XenAPI.Failure:
                    metrics = {"networks": {}, "os_version": {}}
                os_ready = spec.windows or bool(metrics["os_version"].get("name"))
                addresses = [v for k, v in sorted(metrics["networks"].items()) if k.endswith("/ip") or "/ipv4/" in k]
                real = next((a for a in addresses if is_real_ip(a)), None)
                if real and os_ready:
                    return real, metrics["os_version"]
                apipa = next((a for a in addresses if a.startswith("169.254.")), "")
                if apipa and apipa != seen_apipa:
                    vlog.info("guest reports only %s (APIPA); waiting for a real address", apipa)
                    seen_apipa = apipa
            if remaining <= 0:
                what = f"only the APIPA address {seen_apipa}" if seen_apipa else "no address"
                raise AttemptFailed(f"{what} after {self.network_timeout:g} s (vm.network.timeout.secs)")

    def _describe(
        self,
        xapi: Any,
        vm: str,
        spec: VmSpec,
        template: str,
        ip: str,
        os_version: dict[str, str],
        started: float,
        attempt: int,
    ) -> CreatedVm:
        record = xapi.VM.get_record(vm)
        disk = 0
        for vbd in record["VBDs"]:
            vbd_record = xapi.VBD.get_record(vbd)
            if vbd_record["type"] == "Disk" and vbd_record["VDI"] != NULL_REF:
                disk += int(xapi.VDI.get_virtual_size(vbd_record["VDI"]))
        return CreatedVm(
            uuid=record["uuid"],
            ref=vm,
            name=spec.name,
            ip=ip,
            os_version=dict(os_version),
            cpus=int(record["VCPUs_at_startup"]),
            memory=int(record["memory_static_max"]),
            disk=disk,
            host=self.host.ref,
            template=template,
            create_seconds=self.clock() - started,
            attempts=attempt,
        )

    # -- destroy -----------------------------------------------------------------------

    def destroy(self, vm: str, lease_id: str | None = None) -> None:
        """Destroy a dynvm VM (by ref) and its disks. Refuses a VM without dynvm's marker
        (or with another lease's, when ``lease_id`` is given). A VM already gone is fine."""
        with self.pool.session() as xapi:
            try:
                record = xapi.VM.get_record(vm)
            except XenAPI.Failure as e:
                if e.details[:1] == ["HANDLE_INVALID"]:
                    return
                raise
            self._destroy(xapi, vm, record, lease_id, _VmLog(log, {"vm": record["name_label"]}))

    def _destroy(self, xapi: Any, vm: str, record: dict[str, Any], lease_id: str | None, vlog: _VmLog) -> None:
        marker = record["other_config"].get(MARKER_KEY)
        if marker is None or (lease_id is not None and marker != lease_id):
            raise NotDynvmVm(
                f"refusing to destroy {record['name_label']!r} ({record['uuid']}) on {self.host.display}: "
                + ("dynvm did not create it" if marker is None else f"it belongs to lease {marker}, not {lease_id}"),
                self.host.ref,
            )
        disks = []
        for vbd in record["VBDs"]:
            vbd_record = xapi.VBD.get_record(vbd)
            if vbd_record["type"] != "Disk" or vbd_record["VDI"] == NULL_REF:
                continue  # CD drives and their ISO images are not ours to destroy
            sr = xapi.VDI.get_SR(vbd_record["VDI"])
            if xapi.SR.get_content_type(sr) != "iso":
                disks.append(vbd_record["VDI"])
        if record["power_state"] != "Halted":
            vlog.info("hard shutdown")
            self._task(xapi, "VM.hard_shutdown", vm)
        vlog.info("destroying the VM and %d disk(s)", len(disks))
        self._task(xapi, "VM.destroy", vm)
        for vdi in disks:
            try:
                self._task(xapi, "VDI.destroy", vdi)
            except XenAPI.Failure as e:
                if e.details[:1] != ["HANDLE_INVALID"]:
                    raise

    def adopt_clone(self, task: str, lease_id: str, wait: float = 120.0) -> str | None:
        """The VM a clone task of ours made after dynvm stopped waiting for it (a crash, or
        a host that stopped answering), marked as that lease's so that it can be destroyed.
        Waits up to ``wait`` seconds for a clone still running, then raises
        ``ProvisionError`` (ask again later). None when the task is gone (xapi forgets
        finished tasks) or failed: there is no VM to find."""
        with self.pool.session() as xapi:
            deadline = self.clock() + wait
            token = ""
            record: dict[str, Any] | None = None
            while record is None or record.get("status") == "pending":
                slice_ = min(EVENT_SLICE, max(0.0, deadline - self.clock())) if token else 0.0
                try:
                    batch = xapi.event_from([f"task/{task}"], token, slice_)
                except XenAPI.Failure:
                    return None
                snapshots = [e["snapshot"] for e in batch["events"] if "snapshot" in e]
                if not token and not snapshots:
                    return None  # no such task (any more)
                token = batch["token"]
                record = snapshots[-1] if snapshots else record
                if self.clock() > deadline and record is not None and record.get("status") == "pending":
                    raise ProvisionError(f"clone task {task} is still running", self.host.ref)
            with contextlib.suppress(XenAPI.Failure):
                xapi.task.destroy(task)
            if record.get("status") != "success" or not record.get("result"):
                return None
        vm = record["result"].removeprefix("<value>").removesuffix("</value>")
        self._mark(vm, lease_id)
        return vm

    def _mark(self, vm: str, lease_id: str) -> None:
        with self.pool.session() as xapi:
            try:
                if MARKER_KEY not in xapi.VM.get_other_config(vm):
                    xapi.VM.add_to_other_config(vm, MARKER_KEY, lease_id)
            except XenAPI.Failure as e:
                if e.details[:1] != ["HANDLE_INVALID"]:  # already gone is fine
                    raise

    def _cleanup(self, vm: str, lease_id: str, vlog: _VmLog, within: float | None = None) -> None:
        """Destroy a failed attempt, retrying while the host is unreachable, up to
        ``cleanup_timeout``. What cannot be removed is logged: reconcile removes it later.

        The VM's ref came back from this attempt's own ``VM.clone``, so it is ours even if
        the host died before the marker was written: the marker is written first, then the
        VM is destroyed like any other dynvm VM (dynvm destroys only marked VMs)."""
        vlog.info("cleaning up the failed attempt")
        try:
            for attempt in Retrying(
                retry=retry_if_exception_type(HostUnreachable),
                stop=stop_after_delay(within if within is not None else self.cleanup_timeout),
                wait=wait_exponential(multiplier=0.5, max=10),
                reraise=True,
            ):
                with attempt:
                    self.pool.reset_backoff()
                    self._mark(vm, lease_id)
                    self.destroy(vm, lease_id)
        except Exception as e:
            vlog.error("could not clean up %s (%s); the reconcile pass will remove it", vm, e)


def _with_sr(disks_xml: str, sr_uuid: str) -> str:
    """Point every disk of a provision spec at one SR."""
    root = ET.fromstring(disks_xml)
    for disk in root.findall("disk"):
        disk.set("sr", sr_uuid)
    return ET.tostring(root, encoding="unicode")
