"""xapi's message table for one simulated host: ``"VM.clone"`` -> handler.

Generated for every class the schema lists, as xapi generates them: ``get_record``,
``get_by_uuid``, ``get_all``, ``get_all_records``, ``get_all_records_where``,
``get_<field>``, and for writable fields ``set_<field>``, ``add_to_``/``remove_from_``
(maps), ``add_``/``remove_`` (sets). Then the messages with behaviour: login, VM power
and lifecycle, disks and devices, ``event.from``/``event.inject``, tasks, and every
explicit message as ``Async.<class>.<message>``.

``dispatch`` checks, in order: the method exists (``MESSAGE_METHOD_UNKNOWN``), the
parameter count (``MESSAGE_PARAMETER_COUNT_MISMATCH [method, expected, received]``, as
xapi's generated server counts: neither count holds the session, ``expected`` is the
required parameters only, and a message with optional ones takes extra trailing
arguments; xen-api idl/ocaml_backend/gen_server.ml), the session (``SESSION_INVALID``),
then runs the handler.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast
from xml.sax.saxutils import escape

from . import copies, lifecycle, maintenance
from .errors import (
    XapiError,
    field_type_error,
    handle_invalid,
    method_unknown,
    parameter_count_mismatch,
    session_invalid,
)
from .host import SimHost
from .query import parse as parse_query
from .schema import Field, schema
from .settings import INTRODUCED_IN
from .store import copy_record

# Classes with a generated get_by_name_label (xapi generates it only for some).
NAME_LABEL_CLASSES = {"VM", "host", "SR", "VDI", "network", "task"}
# Classes with get_all / get_all_records (sessions cannot be listed).
LISTABLE_EXCLUDED = {"session"}
EVENT_NEXT_WAIT = 30.0  # seconds event.next waits for a change before an empty answer

# Classes whose changes never show up in event.from (xapi generates no events for them).
NO_EVENT_CLASSES = {"session"}
# Read-only fields that xapi nevertheless sets through explicit messages of the same shape.
EXPLICIT_SETTERS: dict[str, tuple[str, ...]] = {
    "VM": ("other_config", "platform", "blocked_operations", "HVM_boot_policy", "actions_after_crash", "NVRAM"),
    "VDI": ("name_label", "name_description", "read_only", "sharable", "on_boot", "allow_caching"),
    "SR": ("name_label", "name_description", "shared"),
    "task": ("other_config",),
}

Handler = Callable[..., object]


@dataclass(frozen=True, slots=True)
class Message:
    name: str
    handler: Handler
    params: int  # not counting the session
    needs_session: bool = True
    explicit: bool = False  # has an Async.* form
    optional: int = 0  # trailing parameters a caller may leave out (added in later releases)


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise field_type_error(name)
    return value


def _int(value: object, name: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)  # type: ignore[call-overload]  # the value passed the type check of xenapi.json's int just above
    except (TypeError, ValueError):
        raise field_type_error(name) from None


def _str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise field_type_error(name)
    return value


class XapiApi:
    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.store = host.store
        self.messages: dict[str, Message] = {}
        self._current_session = threading.local()  # the caller's session, for event.from
        self._caller = threading.local()  # which member's address the call came to
        # event.register's subscriptions (the old event API): session -> (classes, generation read)
        self._registered: dict[str, tuple[set[str], int]] = {}
        self.event_waits = 0  # event.from calls waiting for a change right now
        for cls in schema().values():
            self._generate(cls.name, cls.fields)
        self._behaviour()

    # -- registration ------------------------------------------------------------------

    def _add(
        self,
        name: str,
        handler: Handler,
        params: int,
        needs_session: bool = True,
        explicit: bool = False,
        optional: int = 0,
    ) -> None:
        self.messages[name] = Message(name, handler, params, needs_session, explicit, optional)

    def _generate(self, cls: str, fields: dict[str, Field]) -> None:
        store = self.store
        self._add(f"{cls}.get_record", lambda ref: store.snapshot(cls, _str(ref, "self")), 1)
        self._add(f"{cls}.get_by_uuid", lambda uuid: store.by_uuid(cls, _str(uuid, "uuid")), 1)
        if cls not in LISTABLE_EXCLUDED:
            self._add(f"{cls}.get_all", lambda: store.refs(cls), 0)
            self._add(f"{cls}.get_all_records", lambda: self._records_where(cls, None), 0)
            self._add(f"{cls}.get_all_records_where", lambda expr: self._records_where(cls, _str(expr, "expr")), 1)
        if cls in NAME_LABEL_CLASSES:
            self._add(f"{cls}.get_by_name_label", lambda label: self._by_name_label(cls, _str(label, "label")), 1)
        for field in fields.values():
            self._add(f"{cls}.get_{field.name}", self._getter(cls, field.name), 1)
            if field.writable or field.name in EXPLICIT_SETTERS.get(cls, ()):
                self._add_setters(cls, field)

    def _add_setters(self, cls: str, field: Field) -> None:
        name = field.name
        self._add(f"{cls}.set_{name}", self._setter(cls, field), 2)
        if field.type.kind == "map":
            self._add(f"{cls}.add_to_{name}", self._map_add(cls, field), 3)
            self._add(f"{cls}.remove_from_{name}", self._map_remove(cls, field), 2)
        elif field.type.kind == "set":
            self._add(f"{cls}.add_{name}", self._set_add(cls, field), 2)
            self._add(f"{cls}.remove_{name}", self._set_remove(cls, field), 2)

    def _getter(self, cls: str, name: str) -> Handler:
        def get(ref: object) -> object:
            with self.store.lock:
                value = self.store.get(cls, _str(ref, "self"))[name]
                return value.copy() if isinstance(value, list | dict) else value

        return get

    def _setter(self, cls: str, field: Field) -> Handler:
        def set_(ref: object, value: object) -> str:
            try:
                wire = field.type.to_wire(value)
            except (TypeError, ValueError):
                raise field_type_error(field.name) from None
            self.store.update(cls, _str(ref, "self"), **{field.name: wire})
            return ""

        return set_

    def _map_add(self, cls: str, field: Field) -> Handler:
        def add(ref: object, key: object, value: object) -> str:
            ref, key = _str(ref, "self"), str(key)
            assert field.type.item is not None
            try:
                wire = field.type.item.to_wire(value)
            except (TypeError, ValueError):
                raise field_type_error(field.name) from None
            with self.store.lock:
                mapping = cast("dict[str, object]", self.store.mutate(cls, ref, field.name))
                if key in mapping:
                    raise XapiError("MAP_DUPLICATE_KEY", cls, field.name, ref, key)
                mapping[key] = wire
                self.store.touch(cls, ref)
            return ""

        return add

    def _map_remove(self, cls: str, field: Field) -> Handler:
        def remove(ref: object, key: object) -> str:
            ref = _str(ref, "self")
            with self.store.lock:
                mapping = cast("dict[str, object]", self.store.mutate(cls, ref, field.name))
                if str(key) in mapping:
                    del mapping[str(key)]
                    self.store.touch(cls, ref)
            return ""

        return remove

    def _set_add(self, cls: str, field: Field) -> Handler:
        def add(ref: object, value: object) -> str:
            ref = _str(ref, "self")
            with self.store.lock:
                items = cast("list[object]", self.store.mutate(cls, ref, field.name))
                if value not in items:
                    items.append(value)
                    self.store.touch(cls, ref)
            return ""

        return add

    def _set_remove(self, cls: str, field: Field) -> Handler:
        def remove(ref: object, value: object) -> str:
            ref = _str(ref, "self")
            with self.store.lock:
                items = cast("list[object]", self.store.mutate(cls, ref, field.name))
                if value in items:
                    items.remove(value)
                    self.store.touch(cls, ref)
            return ""

        return remove

    def _records_where(self, cls: str, expr: str | None) -> dict[str, dict[str, object]]:
        predicate = parse_query(expr) if expr else None
        with self.store.lock:
            return {
                ref: copy_record(record)
                for ref, record in self.store.items(cls)
                if predicate is None or predicate(record)
            }

    def _by_name_label(self, cls: str, label: str) -> list[str]:
        with self.store.lock:
            return [ref for ref, record in self.store.items(cls) if record.get("name_label") == label]

    # -- behaviour ---------------------------------------------------------------------

    def _behaviour(self) -> None:
        host, store = self.host, self.store
        add = self._add

        add("session.login_with_password", self._login, 2, needs_session=False, optional=2)  # old clients send 2
        add("session.logout", lambda: "", 0)  # replaced per call in dispatch (needs the session)

        add(
            "VM.clone", lambda vm, name: lifecycle.clone(host, _str(vm, "vm"), _str(name, "new_name")), 2, explicit=True
        )
        add("VM.provision", lambda vm: self._void(lifecycle.provision, _str(vm, "vm")), 1, explicit=True)
        add("VM.start", self._start, 3, explicit=True)
        add("VM.start_on", lambda vm, ref, paused, force: self._start(vm, paused, force, ref), 4, explicit=True)
        add("VM.hard_shutdown", lambda vm: self._void(lifecycle.hard_shutdown, _str(vm, "vm")), 1, explicit=True)
        add("VM.clean_shutdown", lambda vm: self._void(lifecycle.clean_shutdown, _str(vm, "vm")), 1, explicit=True)
        add("VM.shutdown", lambda vm: self._void(lifecycle.clean_shutdown, _str(vm, "vm")), 1, explicit=True)
        add("VM.destroy", lambda vm: self._void(lifecycle.destroy_vm, _str(vm, "self")), 1, explicit=True)
        add("VM.hard_reboot", lambda vm: self._void(lifecycle.reboot, _str(vm, "vm"), False), 1, explicit=True)
        add("VM.clean_reboot", lambda vm: self._void(lifecycle.reboot, _str(vm, "vm"), True), 1, explicit=True)
        add("VM.suspend", lambda vm: self._void(lifecycle.suspend, _str(vm, "vm")), 1, explicit=True)
        add("VM.resume", lambda vm, paused, force: self._void(lifecycle.resume, _str(vm, "vm")), 3, explicit=True)
        add("VM.set_VCPUs_max", self._vcpus("VCPUs_max"), 2, explicit=True)
        add("VM.set_VCPUs_at_startup", self._vcpus("VCPUs_at_startup"), 2, explicit=True)
        add("VM.set_memory_limits", self._memory_limits, 5, explicit=True)
        add(
            "VM.set_memory",
            self._memory("memory_static_max", "memory_dynamic_max", "memory_dynamic_min"),
            2,
            explicit=True,
        )
        for field in lifecycle.MEMORY_FIELDS:
            add(f"VM.set_{field}", self._memory(field), 2, explicit=True)
        add(
            "VM.set_memory_dynamic_range",
            self._memory_range("memory_dynamic_min", "memory_dynamic_max"),
            3,
            explicit=True,
        )
        add(
            "VM.set_memory_static_range", self._memory_range("memory_static_min", "memory_static_max"), 3, explicit=True
        )
        add("VM.pause", lambda vm: self._void(lifecycle.pause, _str(vm, "vm")), 1, explicit=True)
        add("VM.unpause", lambda vm: self._void(lifecycle.unpause, _str(vm, "vm")), 1, explicit=True)
        add(
            "VM.copy",
            lambda vm, name, sr: copies.copy(host, _str(vm, "vm"), _str(name, "new_name"), _str(sr, "sr")),
            3,
            explicit=True,
        )
        add(
            "VM.snapshot",
            lambda vm, name, ignore=(): copies.snapshot(
                host,
                _str(vm, "vm"),
                _str(name, "new_name"),
                [str(v) for v in ignore],
            ),
            2,
            explicit=True,
            optional=1,
        )
        add(
            "VBD.insert",
            lambda vbd, vdi: self._void(copies.insert, _str(vbd, "vbd"), _str(vdi, "vdi")),
            2,
            explicit=True,
        )
        add("VBD.eject", lambda vbd: self._void(copies.eject, _str(vbd, "vbd")), 1, explicit=True)
        add(
            "VDI.resize",
            lambda vdi, size: self._void(copies.resize, _str(vdi, "vdi"), _int(size, "size")),
            2,
            explicit=True,
        )
        add("VM.get_allowed_VBD_devices", lambda vm: self._free_devices("VBD", "userdevice", _str(vm, "vm"), 16), 1)
        add("VM.get_allowed_VIF_devices", lambda vm: self._free_devices("VIF", "device", _str(vm, "vm"), 7), 1)

        add("VDI.create", lambda rec: lifecycle.create_vdi(host, self._record("VDI", rec)), 1, explicit=True)
        add("VDI.destroy", lambda vdi: self._void(lifecycle.destroy_vdi, _str(vdi, "self")), 1, explicit=True)
        add("VBD.create", lambda rec: lifecycle.create_vbd(host, self._record("VBD", rec)), 1, explicit=True)
        add("VBD.destroy", lambda ref: self._void(lifecycle.destroy_device, "VBD", _str(ref, "self")), 1, explicit=True)
        add("VIF.create", lambda rec: lifecycle.create_vif(host, self._record("VIF", rec)), 1, explicit=True)
        add("VIF.destroy", lambda ref: self._void(lifecycle.destroy_device, "VIF", _str(ref, "self")), 1, explicit=True)
        add("VIF.move", self._vif_move, 2, explicit=True)
        for cls in ("VM", "network", "PBD"):  # plain constructors: the record as given
            add(f"{cls}.create", self._plain_create(cls), 1, explicit=True)
        add("network.destroy", self._network_destroy, 1, explicit=True)
        add("PBD.destroy", self._destroyer("PBD"), 1, explicit=True)

        add(
            "host.list_methods",
            lambda: sorted(m for m in self.messages if host.spec.xenserver_version >= INTRODUCED_IN.get(m, (0, 0))),
            0,
        )
        add("host.get_servertime", lambda ref: (store.get("host", _str(ref, "host")), host.now())[1], 1)
        add(
            "host.compute_free_memory",
            lambda ref: (store.get("host", _str(ref, "host")), str(host.memory_free(_str(ref, "host"))))[1],
            1,
        )

        self._pool_behaviour()

        add("task.destroy", self._destroyer("task"), 1)
        add("task.cancel", self._task_cancel, 1)

        add("event.from", self._event_from, 3)
        add("event.register", self._event_register, 1)
        add("event.unregister", self._event_unregister, 1)
        add("event.next", self._event_next, 0)
        add("event.inject", self._event_inject, 2)
        add("event.get_current_id", lambda: str(store.generation), 0)

    def _pool_behaviour(self) -> None:
        """Maintenance, migration and a new master (``maintenance.py``)."""
        host, add = self.host, self._add
        add("host.disable", lambda ref, auto=True: self._void(maintenance.disable, _str(ref, "host")), 1, optional=1)
        add("host.enable", lambda ref: self._void(maintenance.enable, _str(ref, "host")), 1, explicit=True)
        add(
            "host.evacuate",
            lambda ref, network=None, batch=None: self._void(maintenance.evacuate, _str(ref, "host")),
            1,
            explicit=True,
            optional=2,
        )
        add(
            "VM.pool_migrate",
            lambda vm, ref, options: self._void(
                maintenance.pool_migrate,
                _str(vm, "vm"),
                _str(ref, "host"),
                dict(options),
            ),
            3,
            explicit=True,
        )
        add(
            "pool.designate_new_master",
            lambda ref: self._void(maintenance.designate_new_master, _str(ref, "host")),
            1,
            explicit=True,
        )
        # run on a member whose master is gone, with a session from the member itself
        # (session.slave_local_login_with_password: what xe does there)
        add(
            "pool.emergency_transition_to_master",
            lambda: self._void(maintenance.emergency_transition_to_master, self._caller_position()),
            0,
        )
        add("pool.recover_slaves", lambda: maintenance.recover_slaves(host), 0, explicit=True)
        add("session.slave_local_login_with_password", self._login, 2, needs_session=False)

    def _caller_position(self) -> int:
        return int(getattr(self._caller, "position", 0))

    def _destroyer(self, cls: str) -> Handler:
        def destroy(ref: object) -> str:
            self.store.destroy(cls, _str(ref, "self"))
            return ""

        return destroy

    def _void(self, fn: Callable[..., object], *args: object) -> str:
        fn(self.host, *args)
        return ""

    def _start(self, vm: object, paused: object, force: object, host_ref: object | None = None) -> str:
        on = None if host_ref is None else _str(host_ref, "host")  # VM.start_on: that member only
        _bool(force, "force")
        lifecycle.start(self.host, _str(vm, "vm"), _bool(paused, "start_paused"), on=on)
        return ""

    def _vcpus(self, field: str) -> Handler:
        def set_(vm: object, value: object) -> str:
            lifecycle.set_vcpus(self.host, _str(vm, "self"), field, _int(value, "value"))
            return ""

        return set_

    def _memory(self, *fields: str) -> Handler:
        def set_(vm: object, value: object) -> str:
            amount = _int(value, "value")
            lifecycle.set_memory(self.host, _str(vm, "self"), **dict.fromkeys(fields, amount))
            return ""

        return set_

    def _memory_range(self, low: str, high: str) -> Handler:
        def set_(vm: object, lo: object, hi: object) -> str:
            lifecycle.set_memory(self.host, _str(vm, "self"), **{low: _int(lo, "min"), high: _int(hi, "max")})
            return ""

        return set_

    def _memory_limits(self, vm: object, smin: object, smax: object, dmin: object, dmax: object) -> str:
        lifecycle.set_memory(
            self.host,
            _str(vm, "self"),
            memory_static_min=_int(smin, "static_min"),
            memory_static_max=_int(smax, "static_max"),
            memory_dynamic_min=_int(dmin, "dynamic_min"),
            memory_dynamic_max=_int(dmax, "dynamic_max"),
        )
        return ""

    def _free_devices(self, cls: str, field: str, vm: str, limit: int) -> list[str]:
        with self.store.lock:
            used = {str(self.store.get(cls, d)[field]) for d in cast("list[str]", self.store.get("VM", vm)[f"{cls}s"])}
        return [str(n) for n in range(limit) if str(n) not in used]

    def _plain_create(self, cls: str) -> Handler:
        def create(record: object) -> str:
            fields = self._record(cls, record)
            if cls == "VM":
                fields.setdefault("power_state", "Halted")
                fields["metrics"] = self.store.create("VM_metrics", {"install_time": self.host.now()})
            return self.store.create(cls, fields)

        return create

    def _network_destroy(self, ref: object) -> str:
        ref = _str(ref, "self")
        with self.store.lock:
            if self.store.get("network", ref)["VIFs"] or self.store.get("network", ref)["PIFs"]:
                raise XapiError(
                    "NETWORK_CONTAINS_VIF" if self.store.get("network", ref)["VIFs"] else "NETWORK_CONTAINS_PIF", ref
                )
            self.store.destroy("network", ref)
        return ""

    def _vif_move(self, vif: object, network: object) -> str:
        vif, network = _str(vif, "self"), _str(network, "network")
        with self.store.lock:
            self.store.get("network", network)
            self.store.update("VIF", vif, network=network)
        return ""

    def _record(self, cls: str, record: object) -> dict[str, object]:
        """A record given to ``<class>.create``: known fields, each normalised to wire form."""
        if not isinstance(record, dict):
            raise field_type_error("args")
        fields = schema()[cls].fields
        out: dict[str, object] = {}
        for name, value in record.items():
            field = fields.get(name)
            if field is None or field.access == "r":
                continue  # xapi ignores fields the constructor does not take
            try:
                out[name] = field.type.to_wire(value)
            except (TypeError, ValueError):
                raise field_type_error(name) from None
        return out

    # -- sessions ----------------------------------------------------------------------

    def _login(self, user: object, password: object, version: object = "1.0", originator: object = "") -> str:
        user, password = _str(user, "uname"), _str(password, "pwd")
        if user != self.host.spec.user or password != self.host.spec.password:
            raise XapiError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        return self.store.create(
            "session",
            {
                "this_host": self.host.refs.host,
                "last_active": self.host.now(),
                "validation_time": self.host.now(),
                "originator": str(originator),
                "is_local_superuser": True,
                "auth_user_name": user,
                "rbac_permissions": [],
            },
        )

    def check_session(self, ref: object) -> str:
        if not isinstance(ref, str) or not self.store.exists("session", ref):
            raise session_invalid(str(ref))
        return ref

    def invalidate_sessions(self) -> int:
        with self.store.lock:
            refs = self.store.refs("session")
            for ref in refs:
                self.store.destroy("session", ref)
            return len(refs)

    # -- tasks -------------------------------------------------------------------------

    def _run_async(self, message: Message, session: str, args: tuple[object, ...]) -> str:
        now = self.host.now()
        task = self.store.create(
            "task",
            {
                "name_label": f"Async.{message.name}",
                "created": now,
                "finished": now,
                "status": "pending",
                "resident_on": self.host.refs.host,
                "progress": 0.0,
                "type": "<none/>",
                "allowed_operations": ["cancel"],
                "other_config": {},
            },
        )

        def run() -> None:
            try:
                value = message.handler(*args)
            except XapiError as e:
                outcome = {"status": "failure", "error_info": e.description}
            except Exception as e:  # an unexpected bug is still a failed task, not a hang
                outcome = {"status": "failure", "error_info": ["INTERNAL_ERROR", repr(e)]}
            else:
                result = f"<value>{escape(value)}</value>" if isinstance(value, str) and value else ""
                outcome = {"status": "success", "result": result}
            if self.store.exists("task", task):
                self.store.update(
                    "task", task, progress=1.0, finished=self.host.now(), allowed_operations=[], **outcome
                )

        threading.Thread(target=run, name=f"task-{message.name}", daemon=True).start()
        return task

    def _task_cancel(self, ref: object) -> str:
        ref = _str(ref, "task")
        with self.store.lock:
            if self.store.get("task", ref)["status"] != "pending":
                raise XapiError("OPERATION_NOT_ALLOWED", "task has already finished")
            # The simulator's operations are short or sleep without checkpoints, so a
            # cancel is recorded but the operation runs to completion, as xapi does for
            # operations that are not cancellable.
            self.store.update("task", ref, status="cancelling")
        return ""

    # -- events ------------------------------------------------------------------------

    def _event_from(self, classes: object, token: object, timeout: object) -> dict[str, object]:
        if not isinstance(classes, list):
            raise field_type_error("classes")
        token = _str(token, "token")
        try:
            since = int(token.split(",")[0]) if token else 0
        except ValueError:
            raise XapiError("EVENT_FROM_TOKEN_PARSE_FAILURE", token) from None
        try:
            wait = float(timeout)  # type: ignore[arg-type]  # event.from's timeout is a float or a string of one (xapi takes both)
        except (TypeError, ValueError):
            raise field_type_error("timeout") from None
        wanted = self._subscription(classes)
        deadline = time.monotonic() + max(0.0, wait)
        session = getattr(self._current_session, "value", None)
        with self.store.changed:
            while True:
                if session is not None and not self.store.exists("session", session):
                    raise session_invalid(session)
                changes = self.store.changes_since(since, wanted)
                last = self.store.generation
                remaining = deadline - time.monotonic()
                if changes or remaining <= 0:
                    break
                self.event_waits += 1  # under the store's lock; tests wait for a call to be waiting
                try:
                    self.store.changed.wait(remaining)
                finally:
                    self.event_waits -= 1
            events = []
            for change in changes:
                event: dict[str, object] = {
                    "id": str(change.generation),
                    "timestamp": "0.0",
                    "class": change.cls.lower(),
                    "operation": change.operation,
                    "ref": change.ref,
                }
                if change.operation != "del":
                    event["snapshot"] = copy_record(self.store.get(change.cls, change.ref))
                events.append(event)
            counts = {cls.lower(): self.store.count(cls) for cls in self.store.classes() if cls not in NO_EVENT_CLASSES}
        return {"events": events, "valid_ref_counts": counts, "token": f"{last:020d},{0:020d}"}

    # the old event API (event.register / event.next): what clients before event.from use

    def _event_register(self, classes: object) -> str:
        if not isinstance(classes, list):
            raise field_type_error("classes")
        session = self._current_session.value
        with self.store.lock:
            wanted, seen = self._registered.get(session, (set(), self.store.generation))
            self._registered[session] = (wanted | {str(c) for c in classes}, seen)
        return ""

    def _event_unregister(self, classes: object) -> str:
        if not isinstance(classes, list):
            raise field_type_error("classes")
        session = self._current_session.value
        with self.store.lock:
            if session in self._registered:
                wanted, seen = self._registered[session]
                self._registered[session] = (wanted - {str(c) for c in classes}, seen)
        return ""

    def _event_next(self) -> list[dict[str, object]]:
        """Block until something the session registered for changes (at most
        ``EVENT_NEXT_WAIT`` seconds, then an empty answer: clients call again); each event
        as event.from gives it. Unregistered: ``SESSION_NOT_REGISTERED [session]``."""
        session = self._current_session.value
        deadline = time.monotonic() + EVENT_NEXT_WAIT
        with self.store.changed:
            if session not in self._registered:
                raise XapiError("SESSION_NOT_REGISTERED", str(session))
            while True:
                classes, seen = self._registered[session]
                changes = self.store.changes_since(seen, self._subscription(sorted(classes)))
                remaining = deadline - time.monotonic()
                if changes or remaining <= 0:
                    break
                self.store.changed.wait(min(remaining, 1.0))
                if not self.store.exists("session", session):
                    raise session_invalid(session)
            self._registered[session] = (classes, self.store.generation)
            return [self._event_record(change) for change in changes]

    def _event_record(self, change: object) -> dict[str, object]:
        event: dict[str, object] = {
            "id": str(change.generation),  # type: ignore[attr-defined]  # the change log's entries are its own records, typed as object in the store
            "timestamp": "0.0",
            "class": change.cls.lower(),  # type: ignore[attr-defined]  # the change log's entries are its own records, typed as object in the store
            "operation": change.operation,  # type: ignore[attr-defined]  # the change log's entries are its own records, typed as object in the store
            "ref": change.ref,  # type: ignore[attr-defined]  # the change log's entries are its own records, typed as object in the store
        }
        if change.operation != "del":  # type: ignore[attr-defined]  # the change log's entries are its own records, typed as object in the store
            record = copy_record(self.store.get(change.cls, change.ref))  # type: ignore[attr-defined]  # the change log's entries are its own records, typed as object in the store
            event["snapshot"] = record
            event["obj_uuid"] = record.get("uuid", "")
        return event

    def _subscription(self, classes: Iterable[object]) -> Callable[[str, str], bool]:
        everything = False
        by_class: set[str] = set()
        by_object: set[tuple[str, str]] = set()
        for item in classes:
            text = str(item)
            if text == "*":
                everything = True
                continue
            cls, _, ref = text.partition("/")
            if not cls:
                raise XapiError("EVENT_SUBSCRIPTION_PARSE_FAILURE", text)
            if ref:
                by_object.add((cls.lower(), ref))
            else:
                by_class.add(cls.lower())

        def wanted(cls: str, ref: str) -> bool:
            if cls in NO_EVENT_CLASSES:
                return False
            lower = cls.lower()
            return everything or lower in by_class or (lower, ref) in by_object

        return wanted

    def _event_inject(self, cls: object, ref: object) -> str:
        cls, ref = _str(cls, "class"), _str(ref, "ref")
        match = next((c for c in self.store.classes() if c.lower() == cls.lower()), None)
        if match is None:
            raise handle_invalid(cls, ref)
        generation = self.store.touch(match, ref)
        return f"{generation - 1:020d},{0:020d}"

    # -- the entry point ---------------------------------------------------------------

    def dispatch(self, method: str, params: tuple[object, ...], position: int = 0) -> object:
        """Answer one call that came to member ``position``'s address; raises
        ``XapiError`` for every failure xapi would report."""
        self._caller.position = position
        if method == "event_from":  # Python cannot spell event.from; xapi accepts both
            method = "event.from"
        is_async = method.startswith("Async.")
        name = method[len("Async.") :] if is_async else method
        message = self.messages.get(name)
        too_old = self.host.spec.xenserver_version < INTRODUCED_IN.get(name, (0, 0))
        if message is None or (is_async and not message.explicit) or too_old:
            raise method_unknown(method)
        received = len(params) - (1 if message.needs_session else 0)
        if received < message.params or (received > message.params and not message.optional):
            raise parameter_count_mismatch(name, message.params, received)
        params = params[: message.params + message.optional + (1 if message.needs_session else 0)]
        if not message.needs_session:
            return message.handler(*params)
        session = self.check_session(params[0])
        args = params[1:]
        if name == "session.logout":
            self.store.destroy("session", session)
            return ""
        if is_async:
            return self._run_async(message, session, args)
        self._current_session.value = session
        try:
            return message.handler(*args)
        finally:
            self._current_session.value = None
