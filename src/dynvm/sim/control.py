"""The simulator's control interface: ``sim.*`` XML-RPC methods, which are not part of
xapi. They are answered on every host's own port and on the lab's control port, and
each takes the password of the host it acts on as its first argument (that is how a call
on the control port picks its host). Answers use xapi's ``{Status, Value}`` envelope.

docs/SIMULATOR.md's "control interface" section lists the methods; each is a ``_<name>``
method of ``Control`` below.
"""

from __future__ import annotations

import dataclasses
import xmlrpc.client
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import maintenance
from .catalogue import template_for_key
from .errors import XapiError
from .node import failure, success
from .population import add_foreign_vm
from .server import Reply
from .settings import Faults

if TYPE_CHECKING:
    from .node import HostNode

FAILABLE_OPERATIONS = ("clone", "provision", "start", "hard_shutdown", "destroy", "vdi_destroy")


class Control:
    def __init__(self, find_node: Callable[[str], HostNode | None]) -> None:
        self._find_node = find_node

    def route(self, method: str, params: tuple[object, ...]) -> Reply:
        after: list[Callable[[], None]] = []
        try:
            handler = getattr(self, "_" + method.removeprefix("sim."), None)
            if handler is None or method.count(".") != 1:
                raise XapiError("MESSAGE_METHOD_UNKNOWN", method)
            if not params or not isinstance(params[0], str):
                raise XapiError("SESSION_AUTHENTICATION_FAILED", "", "sim.* methods take the host password first")
            node = self._find_node(params[0])
            if node is None:
                raise XapiError("SESSION_AUTHENTICATION_FAILED", "", "no simulated host has that password")
            try:
                value = handler(node, after, *params[1:])
            except TypeError as e:
                raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, str(e)) from None
            response = success(value)
        except XapiError as e:
            response = failure(e.description)
        except (ValueError, KeyError) as e:
            response = failure(["SIM_BAD_ARGUMENT", str(e)])
        return Reply.of(response, after[0] if after else None)

    # -- the methods (each gets the node and an "after the reply" list first) -----------

    def _status(self, node: HostNode, after: list[object]) -> dict[str, object]:
        host = node.host
        with host.store.lock:
            running = sum(
                1 for _, vm in host.store.items("VM") if vm["power_state"] == "Running" and not vm["is_control_domain"]
            )
        return {
            "name": host.spec.name_label,
            "url": node.url,
            "down": node.endpoint.down,
            "master": node.master_position(),
            "faults": {
                k: (v if not isinstance(v, dict) else {op: list(e) for op, e in v.items()})
                for k, v in dataclasses.asdict(host.faults).items()
            },
            "timing": dataclasses.asdict(host.timing),
            "running_vms": running,
            "calls": node.calls,
            "dhcp_free": host.dhcp.available,
            "memory_free": str(host.memory_free()),
            "sr_free": str(host.sr_free(host.refs.sr)),
            "members": [self._member_status(node, position, ref) for position, ref in enumerate(host.refs.members)],
        }

    @staticmethod
    def _member_status(node: HostNode, position: int, ref: str) -> dict[str, object]:
        host = node.host
        with host.store.lock:
            resident = len(host.store.get("host", ref)["resident_VMs"]) - 1  # type: ignore[arg-type]  # dom0 aside
        with host.store.lock:
            record = host.store.get("host", ref)
            live = bool(host.store.get("host_metrics", str(record["metrics"]))["live"])
        return {
            "name": host.spec.member_name(position),
            "ref": ref,
            "url": node.endpoints[position].url,
            "down": node.endpoints[position].down,
            "live": live,
            "enabled": bool(record["enabled"]),
            "memory_free": str(host.memory_free(ref)),
            "resident_vms": resident,
        }

    def _host_down(self, node: HostNode, after: list[object], mode: str) -> str:
        """The whole pool (a lone host) stops answering, every member's address at once."""
        if mode not in ("hang", "refuse"):
            raise ValueError(f"mode must be 'hang' or 'refuse', not {mode!r}")
        for endpoint in node.endpoints:
            if mode == "hang":
                # at once: sim.* calls are still answered on a hung port, and the caller's next
                # xapi call must already hang
                endpoint.go_down(mode)
            else:
                # a refusing host closes the port this answer may be travelling on: answer first
                after.append(lambda endpoint=endpoint: endpoint.go_down(mode))
        return ""

    def _host_up(self, node: HostNode, after: list[object]) -> str:
        for index, endpoint in enumerate(node.endpoints):
            if index not in node.host.members_down:
                endpoint.restore()
        return ""

    # -- one member of a pool (position 0 is the first master, 1 and on the others) ---------

    @staticmethod
    def _position(node: HostNode, position: object) -> int:
        index = int(position)  # type: ignore[call-overload]  # a control argument arrives as object from XML-RPC; it is an integer
        if not 0 <= index < len(node.endpoints):
            raise ValueError(f"member position {index} is not in this pool of {len(node.endpoints)}")
        return index

    def _member_down(self, node: HostNode, after: list[object], position: int, mode: str) -> str:
        """One member stops answering while the others go on: ``hang`` (a hung toolstack or
        a cut network: its guests run on, unreported) or ``refuse`` (switched off: its
        guests stop, and are Halted when it is back). A member that is not the master is
        also lost to the master: ``host_metrics.live`` turns false after
        ``Timing.heartbeat_seconds`` (at once by default). The master going down leaves
        the others naming it until an emergency transition."""
        index = self._position(node, position)
        if mode not in ("hang", "refuse"):
            raise ValueError(f"mode must be 'hang' or 'refuse', not {mode!r}")
        host = node.host
        host.members_down.add(index)
        if mode == "refuse":  # switched off: its guests stop with it
            host.crashed.add(index)
            maintenance.crash(host, index)
        endpoint = node.endpoints[index]
        if mode == "hang" or index > 0:
            # at once: the next call must find it down (only the first member's port also
            # answers sim.* calls, and may be carrying this answer)
            endpoint.go_down(mode)
        else:
            after.append(lambda: endpoint.go_down(mode))
        if index != host.master_position():
            delay = host.timing.scaled(host.timing.heartbeat_seconds)

            def lost() -> None:
                if index in host.members_down:
                    maintenance.set_live(host, index, False)

            if delay > 0:
                host.scheduler.call_later(delay, lost)
            else:
                lost()
        return ""

    def _member_up(self, node: HostNode, after: list[object], position: int) -> str:
        """The member answers again and the master hears it: live, its VMs as they were."""
        index = self._position(node, position)
        host = node.host
        host.members_down.discard(index)
        if host.master_of(index) == index and host.master_position() != index:
            # an old master back after an emergency transition: an admin points it at the new
            # one (pool.emergency_reset_master), or two masters would share one pool
            host.believed_master[index] = host.master_position()
        node.endpoints[index].restore()
        maintenance.set_live(host, index, True)
        if index in host.crashed:  # it booted again: the guests it had are halted
            host.crashed.discard(index)
            maintenance.restart_after_crash(host, index)
        return ""

    def _member_slow(self, node: HostNode, after: list[object], position: int, seconds: float) -> str:
        """Every call that comes to this member's address takes ``seconds`` longer (scaled)."""
        index = self._position(node, position)
        node.host.member_slow[index] = max(0.0, float(seconds))
        return ""

    def _apipa_next(self, node: HostNode, after: list[object], count: int) -> str:
        node.host.faults.apipa_next = int(count)
        return ""

    def _set_apipa_rate(self, node: HostNode, after: list[object], rate: float) -> str:
        rate = float(rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError("the APIPA rate is a fraction between 0 and 1")
        node.host.faults.apipa_rate = rate
        return ""

    def _dhcp_exhausted(self, node: HostNode, after: list[object], flag: bool) -> str:
        node.host.faults.dhcp_exhausted = bool(flag)
        return ""

    def _service_never(self, node: HostNode, after: list[object], flag: bool) -> str:
        node.host.faults.service_never = bool(flag)
        return ""

    def _service_never_next(self, node: HostNode, after: list[object], count: int) -> str:
        node.host.faults.service_never_next = int(count)
        return ""

    def _fail_next(self, node: HostNode, after: list[object], operation: str, code: str, count: int = 1) -> str:
        if operation not in FAILABLE_OPERATIONS:
            raise ValueError(f"operation must be one of {', '.join(FAILABLE_OPERATIONS)}")
        node.host.faults.fail_next[operation] = (str(code), int(count))
        return ""

    def _invalidate_sessions(self, node: HostNode, after: list[object]) -> int:
        return node.api.invalidate_sessions()

    def _set_sr_free(self, node: HostNode, after: list[object], free: str) -> str:
        host = node.host
        with host.store.lock:
            host.faults.sr_reserved = 0
            host.refresh_sr_usage(host.refs.sr)
            wanted = int(free)
            if wanted >= 0:
                host.faults.sr_reserved = max(0, host.sr_free(host.refs.sr) - wanted)
                host.refresh_sr_usage(host.refs.sr)
            return str(host.sr_free(host.refs.sr))

    def _set_timing(self, node: HostNode, after: list[object], changes: dict[str, float]) -> dict[str, object]:
        timing = node.host.timing
        names = {f.name for f in dataclasses.fields(timing)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown timing {key!r}; known: {', '.join(sorted(names))}")
            setattr(timing, key, float(value))
        return dataclasses.asdict(timing)

    def _add_foreign_vm(
        self, node: HostNode, after: list[object], name: str, os_key: str = "centos", running: bool = True
    ) -> str:
        return add_foreign_vm(node.host, str(name), template_for_key(str(os_key)), bool(running))

    def _reset(self, node: HostNode, after: list[object]) -> str:
        host = node.host
        host.faults = Faults()
        host.refresh_sr_usage(host.refs.sr)
        for index, endpoint in enumerate(node.endpoints):
            endpoint.restore()
            if index in host.members_down:
                maintenance.set_live(host, index, True)
        for index in list(host.crashed):
            maintenance.restart_after_crash(host, index)
        host.crashed.clear()
        host.members_down.clear()
        host.member_slow.clear()
        return ""


class SimControlClient:
    """A small client for ``sim.*`` (tests and users' rehearsal scripts use it)."""

    def __init__(self, url: str, password: str, **proxy_options: object) -> None:
        self._proxy = xmlrpc.client.ServerProxy(url, allow_none=True, **proxy_options)  # type: ignore[arg-type]  # ServerProxy's options are typed per keyword; this passes them through
        self._password = password

    def __getattr__(self, name: str) -> Callable[..., object]:
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._proxy, f"sim.{name}")

        def call(*args: object) -> object:
            result = method(self._password, *args)
            if result.get("Status") != "Success":
                raise XapiError(*result.get("ErrorDescription", ["INTERNAL_ERROR"]))
            return result["Value"]

        return call
