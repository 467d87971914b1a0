"""The simulator's control interface: ``sim.*`` XML-RPC methods, which are not part of
xapi. They are answered on every host's own port and on the lab's control port, and
each takes the password of the host it acts on as its first argument (that is how a call
on the control port picks its host). Answers use xapi's ``{Status, Value}`` envelope.

The README's "control interface" section lists the methods; each is a ``_<name>``
method of ``Control`` below.
"""

from __future__ import annotations

import dataclasses
import xmlrpc.client
from collections.abc import Callable
from typing import TYPE_CHECKING

from .catalogue import template_for_key
from .errors import XapiError
from .node import failure, success
from .population import add_foreign_vm
from .server import Reply, encode_response
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
        return Reply(encode_response(response), after[0] if after else None)

    # -- the methods (each gets the node and an "after the reply" list first) -----------

    def _status(self, node: HostNode, after: list) -> dict[str, object]:
        host = node.host
        with host.store.lock:
            running = sum(
                1 for _, vm in host.store.items("VM") if vm["power_state"] == "Running" and not vm["is_control_domain"]
            )
        return {
            "name": host.spec.name_label,
            "url": node.url,
            "down": node.endpoint.down,
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
        return {
            "name": host.spec.member_name(position),
            "ref": ref,
            "memory_free": str(host.memory_free(ref)),
            "resident_vms": resident,
        }

    def _host_down(self, node: HostNode, after: list, mode: str) -> str:
        if mode not in ("hang", "refuse"):
            raise ValueError(f"mode must be 'hang' or 'refuse', not {mode!r}")
        if mode == "hang":
            # at once: sim.* calls are still answered on a hung port, and the caller's next
            # xapi call must already hang
            node.endpoint.go_down(mode)
        else:
            # a refusing host closes the port this answer may be travelling on: answer first
            after.append(lambda: node.endpoint.go_down(mode))
        return ""

    def _host_up(self, node: HostNode, after: list) -> str:
        node.endpoint.restore()
        return ""

    def _apipa_next(self, node: HostNode, after: list, count: int) -> str:
        node.host.faults.apipa_next = int(count)
        return ""

    def _set_apipa_rate(self, node: HostNode, after: list, rate: float) -> str:
        rate = float(rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError("the APIPA rate is a fraction between 0 and 1")
        node.host.faults.apipa_rate = rate
        return ""

    def _dhcp_exhausted(self, node: HostNode, after: list, flag: bool) -> str:
        node.host.faults.dhcp_exhausted = bool(flag)
        return ""

    def _service_never(self, node: HostNode, after: list, flag: bool) -> str:
        node.host.faults.service_never = bool(flag)
        return ""

    def _service_never_next(self, node: HostNode, after: list, count: int) -> str:
        node.host.faults.service_never_next = int(count)
        return ""

    def _fail_next(self, node: HostNode, after: list, operation: str, code: str, count: int = 1) -> str:
        if operation not in FAILABLE_OPERATIONS:
            raise ValueError(f"operation must be one of {', '.join(FAILABLE_OPERATIONS)}")
        node.host.faults.fail_next[operation] = (str(code), int(count))
        return ""

    def _invalidate_sessions(self, node: HostNode, after: list) -> int:
        return node.api.invalidate_sessions()

    def _set_sr_free(self, node: HostNode, after: list, free: str) -> str:
        host = node.host
        with host.store.lock:
            host.faults.sr_reserved = 0
            host.refresh_sr_usage(host.refs.sr)
            wanted = int(free)
            if wanted >= 0:
                host.faults.sr_reserved = max(0, host.sr_free(host.refs.sr) - wanted)
                host.refresh_sr_usage(host.refs.sr)
            return str(host.sr_free(host.refs.sr))

    def _set_timing(self, node: HostNode, after: list, changes: dict) -> dict[str, object]:
        timing = node.host.timing
        names = {f.name for f in dataclasses.fields(timing)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown timing {key!r}; known: {', '.join(sorted(names))}")
            setattr(timing, key, float(value))
        return dataclasses.asdict(timing)

    def _add_foreign_vm(
        self, node: HostNode, after: list, name: str, os_key: str = "centos", running: bool = True
    ) -> str:
        return add_foreign_vm(node.host, str(name), template_for_key(str(os_key)), bool(running))

    def _reset(self, node: HostNode, after: list) -> str:
        host = node.host
        host.faults = Faults()
        host.refresh_sr_usage(host.refs.sr)
        node.endpoint.restore()
        return ""


class SimControlClient:
    """A small client for ``sim.*`` (tests and users' rehearsal scripts use it)."""

    def __init__(self, url: str, password: str, **proxy_options: object) -> None:
        self._proxy = xmlrpc.client.ServerProxy(url, allow_none=True, **proxy_options)  # type: ignore[arg-type]
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
