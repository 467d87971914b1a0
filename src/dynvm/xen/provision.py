"""Create and destroy one VM, the xapi way (SPEC.md §3).

Create: find the template (exact name first, then the first name that starts with it, in
name then uuid order), clone it, mark the clone and its disks as this installation's at
once (``xen/marker.py``), name and describe it, put its VIF on the right network, set vCPUs (in
the order xapi requires) and memory if asked, provision its disks on the SR named
``host.storage.name``, start it, and wait for the OS name (not for Windows) and a real IP
(not 169.254.x.y) until ``vm.network.timeout.secs``. One attempt: a failed one is
destroyed with its disks and raised with its kind (``model.FailureKind``); whether and
where to try again is the engine's (``engine/creator.py``). Long operations run as ``Async.*``
tasks followed with ``event.from``, so no socket waits minutes and a dead host is noticed.

Destroy: only a VM carrying this installation's marker; hard shutdown if running, destroy
the VM, then its disks (never CD/ISO images). A disk that will not go is reported, not
raised: it carries the marker, and reconcile destroys it later.
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

from .. import probe
from ..config import windows_os
from ..model import (
    CreatedVm,
    DestroyFailed,
    FailureKind,
    HeldElsewhere,
    HostUnreachable,
    NotDynvmVm,
    ProvisionError,
    VmSpec,
)
from ..provider import DestroyResult
from .inventory import guest_addresses, is_real_ip
from .marker import (
    HOLDER_KEY,
    INSTALLATION_KEY,
    MARKER_KEY,
    QUARANTINE_KEY,
    QUARANTINE_TAG,
    Ownership,
    clone_name,
    holder_of,
    lease_of,
    marker,
    ownership,
)
from .session import CONNECTION_ERRORS, SessionPool
from .settings import XenHostSettings
from .templates import candidate_of, choose

log = logging.getLogger(__name__)

__all__ = ["MARKER_KEY", "DestroyResult", "Provisioner"]

NULL_REF = "OpaqueRef:NULL"
UNREACHABLE_CLEANUP = 10.0  # seconds a failed attempt's cleanup waits for a host that stopped answering
EVENT_SLICE = 2.0  # longest single event.from wait: how soon a cancel is noticed

Progress = Callable[[str], None]


class AttemptFailed(Exception):
    """This attempt failed in a way another attempt may not (APIPA, time-out, a failed call)."""


class NoAddress(AttemptFailed):
    """The guest got no usable address in time (APIPA, an exhausted DHCP pool): another
    host, on another network segment or DHCP scope, may do better."""


# xapi's answers to VM.start_on that say the member will not take this VM now, whatever
# another attempt there does (xapi_vm_helpers.ml, assert_can_boot_here and its callers)
MEMBER_REFUSALS = frozenset(
    {
        "HOST_NOT_LIVE",
        "HOST_DISABLED",
        "HOST_OFFLINE",
        "HOST_NOT_ENOUGH_FREE_MEMORY",
        "HOST_CANNOT_ATTACH_NETWORK",
        "HOST_IN_EMERGENCY_MODE",
        "CANNOT_CONTACT_HOST",
        "VM_REQUIRES_SR",
    }
)


class MemberRefused(Exception):
    """The member the VM's room was reserved on will not start it: the VM goes, and the
    engine places the lease again (another member, or a clear failure)."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(reason)
        self.member = member


def describe(name: str, template: str) -> str:
    """A VM's ``name_description`` (SPEC.md §3): ``<name> from <template> on <utc time>``."""
    return f"{name} from {template} on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}"


class NoService(NoAddress):
    """The guest has an address but its service port (sshd, WinRM) never answered: another
    attempt, maybe on another host, gets a fresh guest (the APIPA retry path)."""


class _VmLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['vm']}] {msg}", kwargs  # type: ignore[index]  # LoggerAdapter.extra is a Mapping | None; this adapter is always made with one


def _details(error: XenAPI.Failure) -> str:
    return " ".join(str(d) for d in error.details)


def _set_keys(xapi: Any, cls: str, ref: str, keys: dict[str, str]) -> None:
    """Write ``keys`` into an object's ``other_config``, replacing what is there."""
    api = getattr(xapi, cls)
    for key, value in keys.items():
        try:
            api.add_to_other_config(ref, key, value)
        except XenAPI.Failure as e:
            if e.details[:1] != ["MAP_DUPLICATE_KEY"]:
                raise
            api.remove_from_other_config(ref, key)
            api.add_to_other_config(ref, key, value)


class Provisioner:
    """Creates and destroys VMs on one host. Thread-safe: each call borrows its own session."""

    def __init__(
        self,
        host: XenHostSettings,
        pool: SessionPool,
        network_timeout: float,
        installation: str,
        cleanup_timeout: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        cpu_overcommit: float = 1.0,
    ) -> None:
        self.host = host
        self.pool = pool
        self.installation = installation
        self.network_timeout = network_timeout
        self.cleanup_timeout = cleanup_timeout
        self.clock = clock
        self.cpu_overcommit = cpu_overcommit

    # -- create ------------------------------------------------------------------------

    def create(
        self,
        spec: VmSpec,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        on_clone_task: Callable[[str], None] | None = None,
        attempt: int = 1,
    ) -> CreatedVm:
        """One attempt at the VM; a failure leaves nothing behind (unless the host stopped
        answering: then reconcile finishes the clean-up) and raises ``ProvisionError`` with
        its kind. ``cancel`` (set when dynvm stops) ends the attempt and removes what it
        built. ``on_clone_task`` is told the ref of each clone's xapi task before the clone
        ends: if dynvm dies meanwhile, the clone finishes on the host without dynvm's
        marker, and ``adopt_clone`` finds it through that task afterwards. ``attempt``: the
        engine's count, for the log and ``CreatedVm.attempts``."""
        progress = progress or (lambda stage: None)
        vlog = _VmLog(log, {"vm": spec.name})
        started = self.clock()
        vm: str | None = None
        try:
            with self.pool.session() as xapi:
                template, template_name = self._template(xapi, spec)
                sr = self._sr(xapi, spec.member)
                network = self._network(xapi)
                progress("cloning")
                vlog.info("attempt %d: cloning %r on %s", attempt, template_name, self.host.display)
                # the clone's task is let go only once the clone is marked: should dynvm die
                # in between, the task still names the VM and adopt_clone finds it (xapi
                # keeps a finished task until it is destroyed)
                name = clone_name(spec.lease_id, self.installation)
                task = self._begin(xapi, "VM.clone", template, name, on_task=on_clone_task)
                try:
                    vm = self._outcome(xapi, task)
                    _set_keys(xapi, "VM", vm, marker(spec.lease_id, self.installation))
                    self._forget_inherited(xapi, vm)
                finally:
                    with contextlib.suppress(XenAPI.Failure, *CONNECTION_ERRORS):
                        xapi.task.destroy(task)
                self._check_cancel(cancel)
                self._configure(xapi, vm, spec, template_name, sr, network, vlog)
                progress("provisioning")
                self._task(xapi, "VM.provision", vm)
                self._mark_disks(xapi, vm, spec.lease_id)  # the disks provision just made
                # its own name only once it is a VM: a dynvm clone that is still a template
                # always has its clone name, so no admin's template is ever taken for one
                xapi.VM.set_name_label(vm, spec.name)
                self._check_cancel(cancel)
                progress("booting")
                self._start(xapi, vm, spec, attempt, vlog)
                progress("waiting for IP")
                waiting_since = self.clock()
                ip, os_version = self._wait_for_guest(xapi, vm, spec, vlog, cancel)
                if spec.probe_port:
                    progress("waiting for service")
                    self._wait_for_service(ip, spec.probe_port, waiting_since + self.network_timeout, cancel, vlog)
                created = self._describe(xapi, vm, spec, template_name, ip, os_version, started, attempt)
            progress("ready")
            vlog.info("ready at %s after %.1f s", ip, created.create_seconds)
            return created
        except AttemptFailed as e:
            kind = FailureKind.NO_ADDRESS if isinstance(e, NoAddress) else FailureKind.AGAIN
            failure = ProvisionError(f"{spec.name}: {e}", self.host.ref, kind=kind)
        except XenAPI.Failure as e:
            failure = ProvisionError(f"{spec.name}: xapi error {_details(e)}", self.host.ref, kind=FailureKind.AGAIN)
        except MemberRefused as e:
            failure = ProvisionError(
                f"{spec.name}: member {e.member} of {self.host.display} will not start it: {e}",
                self.host.ref,
                kind=FailureKind.MEMBER_REFUSED,
                member=e.member,
            )
        except HostUnreachable as e:
            failure = ProvisionError(f"{spec.name}: {e}", self.host.ref, kind=FailureKind.HOST_UNREACHABLE)
        except ProvisionError as e:
            failure = ProvisionError(f"{spec.name}: {e}", self.host.ref, kind=e.kind, member=e.member)
        vlog.warning("attempt %d failed: %s", attempt, failure)
        if vm is not None:
            progress("cleaning up")
            # a host that stopped answering gets a short while; reconcile does the rest
            unreachable = failure.kind is FailureKind.HOST_UNREACHABLE
            self._cleanup(vm, spec.lease_id, vlog, UNREACHABLE_CLEANUP if unreachable else None)
        raise failure

    @staticmethod
    def _forget_inherited(xapi: Any, vm: str) -> None:
        """A clone copies its template's ``other_config``: a template an admin made from a
        dynvm VM would give every clone that VM's holder and quarantine stamp."""
        inherited = xapi.VM.get_other_config(vm)
        for key in (HOLDER_KEY, QUARANTINE_KEY):
            if key in inherited:
                xapi.VM.remove_from_other_config(vm, key)

    def _mark_vm_and_disks(self, xapi: Any, vm: str, lease_id: str) -> None:
        _set_keys(xapi, "VM", vm, marker(lease_id, self.installation))
        self._mark_disks(xapi, vm, lease_id)

    def _mark_disks(self, xapi: Any, vm: str, lease_id: str) -> None:
        """Mark the VM's disks (not its CD drives). Called once its disks exist (after
        provision); until then the VM's own marker, or its clone name, leads to them."""
        keys = marker(lease_id, self.installation)
        for vbd in xapi.VM.get_VBDs(vm):
            record = xapi.VBD.get_record(vbd)
            if record["type"] == "Disk" and record["VDI"] != NULL_REF:
                _set_keys(xapi, "VDI", record["VDI"], keys)

    def _disks(self, xapi: Any, vbds: list[str]) -> list[str]:
        """The VDIs behind these VBDs that are disks of the VM's own (not CD/ISO images)."""
        disks = []
        for vbd in vbds:
            vbd_record = xapi.VBD.get_record(vbd)
            if vbd_record["type"] != "Disk" or vbd_record["VDI"] == NULL_REF:
                continue  # CD drives and their ISO images are not ours to destroy
            sr = xapi.VDI.get_SR(vbd_record["VDI"])
            if xapi.SR.get_content_type(sr) != "iso":
                disks.append(vbd_record["VDI"])
        return disks

    def _check_cancel(self, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise ProvisionError("cancelled: dynvm is stopping", self.host.ref)

    def _task(self, xapi: Any, method: str, *args: Any, on_task: Callable[[str], None] | None = None) -> Any:
        """Run ``Async.<method>`` and follow its task with ``event.from`` until it ends.
        ``on_task`` hears the task's ref before the wait (see ``create``'s ``on_clone_task``)."""
        task = self._begin(xapi, method, *args, on_task=on_task)
        try:
            return self._outcome(xapi, task)
        finally:
            with contextlib.suppress(XenAPI.Failure):
                xapi.task.destroy(task)

    def _begin(self, xapi: Any, method: str, *args: Any, on_task: Callable[[str], None] | None = None) -> str:
        cls, name = method.split(".")
        task = getattr(getattr(xapi.Async, cls), name)(*args)
        if on_task is not None:
            on_task(task)
        return task

    def _outcome(self, xapi: Any, task: str) -> Any:
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

    def _template(self, xapi: Any, spec: VmSpec) -> tuple[str, str]:
        """The one template ``spec.template`` picks (``xen/templates.py``: never a snapshot,
        a built-in template only by its exact name, an ambiguous name refused). The exact
        name is looked up first, which is cheap; only a prefix needs every template's record
        (a real host has about a hundred)."""
        exact = {ref: xapi.VM.get_record(ref) for ref in xapi.VM.get_by_name_label(spec.template)}
        records = {ref: r for ref, r in exact.items() if r["is_a_template"]}
        choice = choose((candidate_of(ref, r) for ref, r in records.items()), spec.template)
        if choice.template is None and not any(not r["is_a_snapshot"] for r in records.values()):
            records = xapi.VM.get_all_records_where('field "is_a_template" = "true"')
            choice = choose((candidate_of(ref, r) for ref, r in records.items()), spec.template)
        if choice.template is None:
            raise ProvisionError(
                f"{choice.problem} on {self.host.display}: fix {spec.os}.template in [{self.host.section}]",
                self.host.ref,
            )
        return choice.template.ref, choice.template.name

    def _sr(self, xapi: Any, member: str | None) -> str:
        """The SR named ``host.storage.name`` the VM's disks go on. Where every member has
        its own SR of that name (local storage), the one the member the VM will start on
        reaches; else the first by uuid. Disks on an SR the member cannot reach would stop
        the VM from starting there (``VM_REQUIRES_SR``)."""
        found = sorted(xapi.SR.get_by_name_label(self.host.storage_name), key=xapi.SR.get_uuid)
        if len(found) > 1 and member:
            for sr in found:
                pbds = [xapi.PBD.get_record(p) for p in xapi.SR.get_PBDs(sr)]
                if any(p["host"] == member and p["currently_attached"] for p in pbds):
                    return sr
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
        xapi.VM.set_name_description(vm, describe(spec.name, template_name))
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
            self._fit_cores_per_socket(xapi, vm, spec.cpus, vlog)
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

    def _fit_cores_per_socket(self, xapi: Any, vm: str, cpus: int, vlog: _VmLog) -> None:
        """xapi starts a VM only if its VCPUs_max is a multiple of platform:cores-per-socket
        (VCPU_MAX_NOT_CORES_PER_SOCKET_MULTIPLE). Keep the template's value when it
        divides ``cpus``; else take the largest divisor of ``cpus`` below it (1 at worst)."""
        platform = xapi.VM.get_platform(vm)
        raw = platform.get("cores-per-socket", "")
        if not raw.isdigit() or int(raw) < 1 or cpus % int(raw) == 0:
            return
        cores = cores_per_socket_for(cpus, int(raw))
        xapi.VM.remove_from_platform(vm, "cores-per-socket")
        xapi.VM.add_to_platform(vm, "cores-per-socket", str(cores))
        vlog.info("cores-per-socket %s does not divide %d vCPUs: set to %d", raw, cpus, cores)

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
                os_ready = windows_os(spec.os) or bool(metrics["os_version"].get("name"))
                addresses = guest_addresses(metrics["networks"])
                real = next((a for a in addresses if is_real_ip(a)), None)
                if real and os_ready:
                    return real, metrics["os_version"]
                apipa = next((a for a in addresses if a.startswith("169.254.")), "")
                if apipa and apipa != seen_apipa:
                    vlog.info("guest reports only %s (APIPA); waiting for a real address", apipa)
                    seen_apipa = apipa
            if remaining <= 0:
                what = f"only the APIPA address {seen_apipa}" if seen_apipa else "no address"
                raise NoAddress(f"{what} after {self.network_timeout:g} s (vm.network.timeout.secs)")

    def _wait_for_service(
        self, ip: str, port: int, deadline: float, cancel: threading.Event | None, vlog: _VmLog
    ) -> None:
        """The guest's service answers on ``ip:port`` before the network time-out ends."""
        try:
            took = probe.wait_until_answering(ip, port, deadline, cancel, clock=self.clock)
        except probe.ServiceDown:
            self._check_cancel(cancel)
            raise NoService(
                f"{ip} has an address but port {port} never answered within {self.network_timeout:g} s "
                "(vm.network.timeout.secs; [probe] port)"
            ) from None
        vlog.info("port %d of %s answers after %.2f s", port, ip, took)

    def _start(self, xapi: Any, vm: str, spec: VmSpec, attempt: int, vlog: _VmLog) -> None:
        """Start the VM on the member its room was reserved on (``VM.start_on``), on every
        attempt. xapi is never left to choose (``VM.start``): it weighs memory only, and
        would start a retry on a member whose CPUs are full. A member that will not take
        the VM (down, disabled, full) raises ``MemberRefused``: the engine places it again."""
        if not spec.member:  # a lease placed before members were recorded
            vlog.info("starting (attempt %d)", attempt)
            self._task(xapi, "VM.start", vm, False, False)
            return
        vlog.info("starting on member %s (attempt %d)", spec.member, attempt)
        busy = self._vcpus_running_on(xapi, spec.member)
        if busy is not None and busy[0] + int(xapi.VM.get_VCPUs_at_startup(vm)) > busy[1]:
            # xapi admits on memory only: VMs that arrived since placement (an admin's
            # migration, say) may have taken the CPUs dynvm reserved there
            raise MemberRefused(spec.member, f"its CPUs are taken now ({busy[0]} of {busy[1]:g} vCPUs running)")
        try:
            self._task(xapi, "VM.start_on", vm, spec.member, False, False)
        except XenAPI.Failure as e:
            details = list(e.details or [""])
            if details[0] in MEMBER_REFUSALS or details[:2] == ["HANDLE_INVALID", "host"]:
                raise MemberRefused(spec.member, _details(e)) from None
            raise

    def _vcpus_running_on(self, xapi: Any, member: str) -> tuple[int, float] | None:
        """The vCPUs of the guests running on ``member`` now, and how many it may run
        (its CPUs times ``[common] cpu.overcommit``); None when xapi cannot say."""
        try:
            cpus = int(xapi.host.get_cpu_info(member).get("cpu_count", 0))
            running = xapi.VM.get_all_records_where(
                f'field "resident_on" = "{member}" and field "power_state" = "Running"'
            )
        except XenAPI.Failure:
            return None
        if cpus <= 0:
            return None
        used = sum(int(r["VCPUs_at_startup"]) for r in running.values() if not r["is_control_domain"])
        return used, cpus * self.cpu_overcommit

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
            member=record["resident_on"] if record["resident_on"] != NULL_REF else "",
        )

    # -- hand-out of a ready-pool VM --------------------------------------------------

    def hand_out(self, vm: str, spec: VmSpec, template: str) -> None:
        """A ready VM becomes ``spec.holder``'s: the holder is written on its marker first
        (compare-and-set on the host: ``HeldElsewhere`` when the host says another request
        holds it, whatever the database says), then a ready-pool VM takes its lease's name
        and description (its marker already names the lease, which keeps its id). Called
        just before the database hands the request's VMs over. Raises ``ProvisionError``
        when it is gone or stopped meanwhile."""
        with self.pool.session() as xapi:
            try:
                record = xapi.VM.get_record(vm)
                mine = ownership(record["other_config"], self.installation) is Ownership.OURS
                if not mine or lease_of(record["other_config"]) != spec.lease_id:
                    raise NotDynvmVm(f"refusing to hand out {record['name_label']!r}: not lease {spec.lease_id}'s")
                if record["power_state"] != "Running":
                    raise ProvisionError(f"{spec.name}: its ready VM is {record['power_state']}", self.host.ref)
                member = record["resident_on"]
                if member != NULL_REF and not xapi.host_metrics.get_live(xapi.host.get_metrics(member)):
                    raise ProvisionError(
                        f"{spec.name}: its ready VM is on {xapi.host.get_name_label(member)}, which the pool's "
                        "master has lost touch with",
                        self.host.ref,
                    )
                if spec.holder is not None:
                    self._hold(xapi, vm, record, spec.holder)
                if record["name_label"] != spec.name:
                    xapi.VM.set_name_label(vm, spec.name)
                    xapi.VM.set_name_description(vm, describe(spec.name, template))
            except XenAPI.Failure as e:
                raise ProvisionError(
                    f"{spec.name}: its ready VM cannot be handed out: {_details(e)}", self.host.ref
                ) from None

    def _hold(self, xapi: Any, vm: str, record: dict[str, Any], holder: str) -> None:
        """Write ``holder`` on the VM unless the host says someone holds it already: xapi's
        ``add_to_other_config`` refuses a key that is there (MAP_DUPLICATE_KEY), so of two
        installations' or databases' hand-outs of one VM, one wins on the host."""
        held = holder_of(record["other_config"])
        if held is None:
            try:
                xapi.VM.add_to_other_config(vm, HOLDER_KEY, holder)
                return
            except XenAPI.Failure as e:
                if e.details[:1] != ["MAP_DUPLICATE_KEY"]:
                    raise
                held = holder_of(xapi.VM.get_other_config(vm))
        if held is not None and held != holder:
            raise HeldElsewhere(
                f"refusing to hand out {record['name_label']!r}: the host says request {held} holds it, "
                f"not {holder} (is this database restored from a backup, or a copy?)",
                self.host.ref,
            )

    # -- destroy -----------------------------------------------------------------------

    def destroy(self, vm: str, lease_id: str | None = None, holder: str | None = None) -> DestroyResult:
        """Destroy a dynvm VM (by ref) and its disks. Refuses a VM without this
        installation's marker (or with another lease's, when ``lease_id`` is given), and one
        the host says a request holds unless ``holder`` names that request
        (``HeldElsewhere``); a VM marked before installations had ids is taken when
        ``lease_id`` names its lease.
        A VM already gone is fine. A failure to shut down or destroy the VM raises
        ``DestroyFailed``; disks that will not go are in the result."""
        with self.pool.session() as xapi:
            try:
                record = xapi.VM.get_record(vm)
            except XenAPI.Failure as e:
                if e.details[:1] == ["HANDLE_INVALID"]:
                    return DestroyResult()  # gone already
                raise DestroyFailed(
                    f"cannot read VM {vm} on {self.host.display}: {_details(e)}", self.host.ref
                ) from None
            held = holder_of(record["other_config"])
            if held is not None and held != holder:
                raise HeldElsewhere(
                    f"refusing to destroy {record['name_label']!r} ({record['uuid']}) on {self.host.display}: "
                    f"the host says request {held} holds it",
                    self.host.ref,
                )
            return self._destroy(xapi, vm, record, lease_id, _VmLog(log, {"vm": record["name_label"]}))

    def _refuse_unless_ours(self, what: str, record: dict[str, Any], lease_id: str | None) -> None:
        marked = record["other_config"].get(MARKER_KEY)
        owner = ownership(record["other_config"], self.installation)
        reason = ""
        if owner is Ownership.NOT_DYNVM:
            reason = "dynvm did not create it"
        elif owner is Ownership.OTHER_INSTALLATION:
            reason = f"another dynvm installation made it ({record['other_config'][INSTALLATION_KEY]})"
        elif owner is Ownership.UNNAMED and lease_id is None:
            reason = "it names no dynvm installation, and no lease of this one claims it"
        elif lease_id is not None and marked != lease_id:
            reason = f"it belongs to lease {marked}, not {lease_id}"
        if reason:
            raise NotDynvmVm(
                f"refusing to destroy {what} {record['name_label']!r} ({record['uuid']}) "
                f"on {self.host.display}: {reason}",
                self.host.ref,
            )

    def _destroy(self, xapi: Any, vm: str, record: dict[str, Any], lease_id: str | None, vlog: _VmLog) -> DestroyResult:
        self._refuse_unless_ours("VM", record, lease_id)
        try:
            disks = self._disks(xapi, record["VBDs"])
            if record["power_state"] != "Halted":
                vlog.info("hard shutdown")
                self._task(xapi, "VM.hard_shutdown", vm)
            vlog.info("destroying the VM and %d disk(s)", len(disks))
            self._task(xapi, "VM.destroy", vm)
        except XenAPI.Failure as e:
            raise DestroyFailed(
                f"cannot destroy {record['name_label']} on {self.host.display}: xapi error {_details(e)}",
                self.host.ref,
            ) from None
        left = []
        for vdi in disks:
            problem = self._destroy_vdi(xapi, vdi)
            if problem:
                left.append(problem)
                vlog.warning("disk left behind: %s; reconcile will destroy it", problem)
        return DestroyResult(disks_left=tuple(left))

    def _destroy_vdi(self, xapi: Any, vdi: str) -> str:
        """Destroy one disk; returns '' when it is gone, else '<uuid>: <reason>'."""
        try:
            uuid = xapi.VDI.get_uuid(vdi)
        except XenAPI.Failure as e:
            return "" if e.details[:1] == ["HANDLE_INVALID"] else f"{vdi}: xapi error {_details(e)}"
        try:
            self._task(xapi, "VDI.destroy", vdi)
        except XenAPI.Failure as e:
            if e.details[:1] != ["HANDLE_INVALID"]:
                return f"{uuid}: xapi error {_details(e)}"
        return ""

    def destroy_disk(self, vdi: str, lease_id: str) -> str:
        """Destroy a disk dynvm left behind (its VM is gone); refuses one without this
        installation's marker for ``lease_id``, or one a VM still uses. Returns '' when
        it is gone, else the reason it is not."""
        with self.pool.session() as xapi:
            try:
                record = xapi.VDI.get_record(vdi)
            except XenAPI.Failure as e:
                return "" if e.details[:1] == ["HANDLE_INVALID"] else f"{vdi}: xapi error {_details(e)}"
            self._refuse_unless_ours("disk", record, lease_id)
            if record["VBDs"]:
                return f"{record['uuid']}: still attached to a VM"
            return self._destroy_vdi(xapi, vdi)

    def quarantine(self, vm: str, now: float) -> bool:
        """Halt a VM of this installation that its database does not know, and tag it
        with the time (``dynvm_quarantined_at``): it is kept, not destroyed, until the
        quarantine ends. False if the VM is gone."""
        with self.pool.session() as xapi:
            try:
                record = xapi.VM.get_record(vm)
                if ownership(record["other_config"], self.installation) is not Ownership.OURS:
                    raise NotDynvmVm(f"refusing to quarantine {record['name_label']!r}: not this installation's")
                if record["power_state"] != "Halted":
                    self._task(xapi, "VM.hard_shutdown", vm)
                _set_keys(xapi, "VM", vm, {QUARANTINE_KEY: f"{now:.0f}"})
                if QUARANTINE_TAG not in record["tags"]:
                    xapi.VM.add_tags(vm, QUARANTINE_TAG)
            except XenAPI.Failure as e:
                if e.details[:1] == ["HANDLE_INVALID"]:
                    return False
                raise DestroyFailed(f"cannot quarantine VM {vm} on {self.host.display}: {_details(e)}") from None
        return True

    def quarantine_disk(self, vdi: str, now: float) -> None:
        """Tag a disk of this installation whose lease its database does not know."""
        with self.pool.session() as xapi:
            try:
                if ownership(xapi.VDI.get_other_config(vdi), self.installation) is Ownership.OURS:
                    _set_keys(xapi, "VDI", vdi, {QUARANTINE_KEY: f"{now:.0f}"})
            except XenAPI.Failure as e:
                if e.details[:1] != ["HANDLE_INVALID"]:
                    raise DestroyFailed(f"cannot quarantine disk {vdi} on {self.host.display}: {_details(e)}") from None

    def claim(self, vm: str, lease_id: str) -> None:
        """Write this installation's marker for ``lease_id`` on a VM and its disks: one
        marked before installation ids existed, or a clone (``marker.clone_name``) that
        dynvm died before marking. The caller knows that VM is this installation's."""
        with self.pool.session() as xapi:
            try:
                self._mark_vm_and_disks(xapi, vm, lease_id)
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
        """Mark a clone of ours for ``lease_id`` unless it already is (a marker it inherited
        from a template made out of a dynvm VM is not ours: it is replaced)."""
        with self.pool.session() as xapi:
            try:
                current = xapi.VM.get_other_config(vm)
                if any(current.get(key) != value for key, value in marker(lease_id, self.installation).items()):
                    self._mark_vm_and_disks(xapi, vm, lease_id)
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


def cores_per_socket_for(cpus: int, preferred: int) -> int:
    """The largest divisor of ``cpus`` not above ``preferred``."""
    return max(d for d in range(1, min(cpus, preferred) + 1) if cpus % d == 0)


def _with_sr(disks_xml: str, sr_uuid: str) -> str:
    """Point every disk of a provision spec at one SR."""
    root = ET.fromstring(disks_xml)
    for disk in root.findall("disk"):
        disk.set("sr", sr_uuid)
    return ET.tostring(root, encoding="unicode")
