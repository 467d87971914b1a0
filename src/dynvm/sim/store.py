"""One simulated host's database: objects by class and ref, and the generation count that
``event.from`` reads.

Every change bumps the generation; each object remembers the generation at which it was
created and last modified, and deleted objects leave a tombstone, so ``event.from`` can
answer "what changed since token T" with coalescing for free: one event per object, the
latest state, as xapi does.

All access goes through ``lock`` (an ``RLock``); ``changed`` is notified after every
change so blocked ``event.from`` calls wake up.
"""

from __future__ import annotations

import threading
import uuid as uuid_mod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import cast

from .errors import XapiError, handle_invalid, uuid_invalid
from .schema import NULL_REF, schema

# (child class, child field) -> (parent class, parent set field): xapi keeps the parent's
# set of refs in step with the child's ref field, on both sides of the relationship.
RELATIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("VBD", "VM"): ("VM", "VBDs"),
    ("VBD", "VDI"): ("VDI", "VBDs"),
    ("VDI", "SR"): ("SR", "VDIs"),
    ("VIF", "VM"): ("VM", "VIFs"),
    ("VIF", "network"): ("network", "VIFs"),
    ("PIF", "host"): ("host", "PIFs"),
    ("PIF", "network"): ("network", "PIFs"),
    ("PBD", "host"): ("host", "PBDs"),
    ("PBD", "SR"): ("SR", "PBDs"),
    ("VM", "resident_on"): ("host", "resident_VMs"),
    ("host_cpu", "host"): ("host", "host_CPUs"),
    ("VM", "parent"): ("VM", "children"),
    ("VM", "snapshot_of"): ("VM", "snapshots"),
}

# Tombstones kept for del events. xapi's event.from never answers EVENTS_LOST (only the
# old event.next does: xen-api xapi_event.ml, Next.events_read); a token older than the
# oldest forgotten deletion simply does not hear of it, as on a real host.
MAX_TOMBSTONES = 100_000

WantedFn = Callable[[str, str], bool]


def new_ref() -> str:
    return f"OpaqueRef:{uuid_mod.uuid4()}"


def new_uuid() -> str:
    return str(uuid_mod.uuid4())


def copy_record(record: dict[str, object]) -> dict[str, object]:
    """A copy that is safe to marshal outside the lock (containers copied one level down;
    values inside them are immutable)."""
    return {k: (v.copy() if isinstance(v, list | dict) else v) for k, v in record.items()}


@dataclass(slots=True)
class _Stat:
    created: int
    modified: int
    deleted: int = 0


@dataclass(slots=True)
class Change:
    cls: str
    ref: str
    operation: str  # "add", "mod" or "del"
    generation: int


class ObjectStore:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._schema = schema()
        self._tables: dict[str, dict[str, dict[str, object]]] = {c: {} for c in self._schema}
        self._by_uuid: dict[str, dict[str, str]] = {c: {} for c in self._schema}
        self._stats: dict[str, dict[str, _Stat]] = {c: {} for c in self._schema}
        self._tombstones: dict[tuple[str, str], _Stat] = {}
        self.generation = 0
        self.forgotten_generation = 0

    # -- reading -----------------------------------------------------------------------

    def classes(self) -> Iterable[str]:
        return self._tables.keys()

    def has_class(self, cls: str) -> bool:
        return cls in self._tables

    def get(self, cls: str, ref: str) -> dict[str, object]:
        """The live record (callers hold ``lock`` and must not mutate it directly)."""
        try:
            return self._tables[cls][ref]
        except KeyError:
            raise handle_invalid(cls, ref) from None

    def exists(self, cls: str, ref: str) -> bool:
        return ref in self._tables.get(cls, {})

    def snapshot(self, cls: str, ref: str) -> dict[str, object]:
        with self.lock:
            return copy_record(self.get(cls, ref))

    def refs(self, cls: str) -> list[str]:
        with self.lock:
            return list(self._tables[cls])

    def items(self, cls: str) -> Iterator[tuple[str, dict[str, object]]]:
        """Live (ref, record) pairs; hold ``lock`` while iterating."""
        return iter(self._tables[cls].items())

    def by_uuid(self, cls: str, uuid: str) -> str:
        with self.lock:
            try:
                return self._by_uuid[cls][uuid]
            except KeyError:
                raise uuid_invalid(cls, uuid) from None

    def count(self, cls: str) -> int:
        return len(self._tables[cls])

    # -- changing ----------------------------------------------------------------------

    def _bump(self) -> int:
        self.generation += 1
        return self.generation

    def create(self, cls: str, fields: dict[str, object], ref: str | None = None) -> str:
        """Create an object from a partial record (unnamed fields get their defaults)."""
        with self.lock:
            record = self._schema[cls].blank_record()
            unknown = set(fields) - set(record)
            if unknown:
                raise XapiError("INTERNAL_ERROR", f"unknown fields for {cls}: {sorted(unknown)}")
            record.update(fields)
            if not record.get("uuid"):
                record["uuid"] = new_uuid()
            ref = ref or new_ref()
            gen = self._bump()
            self._tables[cls][ref] = record
            self._by_uuid[cls][str(record["uuid"])] = ref
            self._stats[cls][ref] = _Stat(created=gen, modified=gen)
            for field, value in record.items():
                self._link(cls, ref, field, None, value)
            self.changed.notify_all()
            return ref

    def update(self, cls: str, ref: str, **fields: object) -> None:
        with self.lock:
            record = self.get(cls, ref)
            for field, value in fields.items():
                if field not in record:
                    raise XapiError("INTERNAL_ERROR", f"{cls} has no field {field}")
                old = record[field]
                record[field] = value
                self._link(cls, ref, field, old, value)
            self.touch(cls, ref)

    def mutate(self, cls: str, ref: str, field: str) -> object:
        """The live container of a map or set field, for in-place edits. The caller holds
        ``lock`` and calls ``touch`` afterwards."""
        return self.get(cls, ref)[field]

    def touch(self, cls: str, ref: str) -> int:
        with self.lock:
            self.get(cls, ref)
            gen = self._bump()
            self._stats[cls][ref].modified = gen
            self.changed.notify_all()
            return gen

    def destroy(self, cls: str, ref: str) -> None:
        with self.lock:
            record = self.get(cls, ref)
            for field, value in record.items():
                self._link(cls, ref, field, value, None)
            del self._tables[cls][ref]
            self._by_uuid[cls].pop(str(record["uuid"]), None)
            stat = self._stats[cls].pop(ref)
            stat.deleted = self._bump()
            self._tombstones[(cls, ref)] = stat
            if len(self._tombstones) > MAX_TOMBSTONES:
                oldest = min(self._tombstones, key=lambda k: self._tombstones[k].deleted)
                self.forgotten_generation = self._tombstones.pop(oldest).deleted
            self.changed.notify_all()

    def _link(self, cls: str, ref: str, field: str, old: object, new: object) -> None:
        relation = RELATIONS.get((cls, field))
        if relation is None or old == new:
            return
        parent_cls, parent_field = relation
        if isinstance(old, str) and old != NULL_REF and self.exists(parent_cls, old):
            refs = cast("list[str]", self._tables[parent_cls][old][parent_field])
            if ref in refs:
                refs.remove(ref)
                self._stats[parent_cls][old].modified = self._bump()
        if isinstance(new, str) and new != NULL_REF and self.exists(parent_cls, new):
            cast("list[str]", self._tables[parent_cls][new][parent_field]).append(ref)
            self._stats[parent_cls][new].modified = self._bump()

    # -- events ------------------------------------------------------------------------

    def changes_since(self, generation: int, wanted: WantedFn) -> list[Change]:
        """Coalesced changes after ``generation`` (hold ``lock``), in xapi's manner: an
        object created since then yields one ``add`` (with its current record), one
        modified yields ``mod``, one deleted yields ``del`` unless it was also created
        since then."""
        adds: list[Change] = []
        mods: list[Change] = []
        dels: list[Change] = []
        for cls, stats in self._stats.items():
            for ref, stat in stats.items():
                if stat.modified <= generation or not wanted(cls, ref):
                    continue
                if stat.created > generation:
                    adds.append(Change(cls, ref, "add", stat.modified))
                else:
                    mods.append(Change(cls, ref, "mod", stat.modified))
        for (cls, ref), stat in self._tombstones.items():
            if stat.deleted > generation and stat.created <= generation and wanted(cls, ref):
                dels.append(Change(cls, ref, "del", stat.deleted))
        return adds + mods + dels
