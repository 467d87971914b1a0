"""Which template an ``<os>.template=NAME`` line picks on a host: one rule, used by
capacity (from the mirror), by create (from xapi) and by ``dynvm doctor``.

SPEC.md §2: the template whose ``name_label`` is NAME, or else the one that starts with it.
A real host also holds about a hundred built-in templates (``is_default_template``, or
``other_config:default_template=true`` before XenServer 7.2) and every snapshot, which xapi
marks ``is_a_template`` too (xenapi.json: VM.is_a_snapshot, "Snapshotted VMs can never be
started, they are used only for cloning"). So:

- snapshots are never picked, not even by exact name, and nor are dynvm's own clones
  that are still templates (``dynvm-clone-<lease>``);
- built-in templates are picked only by their exact name, never by a prefix;
- more than one match is ambiguous: nothing is picked, and the error names the matches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .marker import lease_of_clone_name


@dataclass(frozen=True)
class Candidate:
    ref: str
    name: str
    uuid: str = ""
    snapshot: bool = False
    builtin: bool = False


@dataclass(frozen=True)
class Choice:
    """``template`` when exactly one matches; else ``problem`` says why none was picked."""

    template: Candidate | None
    problem: str = ""
    by_prefix: bool = False


def is_builtin(record: dict[str, object]) -> bool:
    other = record.get("other_config") or {}
    return bool(record.get("is_default_template")) or (
        isinstance(other, dict) and other.get("default_template") == "true"
    )


def candidate_of(ref: str, record: dict[str, object]) -> Candidate:
    return Candidate(
        ref=ref,
        name=str(record.get("name_label", "")),
        uuid=str(record.get("uuid", "")),
        snapshot=bool(record.get("is_a_snapshot")),
        builtin=is_builtin(record),
    )


def choose(templates: Iterable[Candidate], wanted: str) -> Choice:
    # a dynvm clone not provisioned yet is a template too, under its clone name: never a pick
    usable = [t for t in templates if not t.snapshot and lease_of_clone_name(t.name) is None]
    exact = [t for t in usable if t.name == wanted]
    if len(exact) == 1:
        return Choice(exact[0])
    if len(exact) > 1:
        return Choice(None, f"{len(exact)} templates are named {wanted!r}; rename all but one")
    prefixed = sorted((t for t in usable if not t.builtin and t.name.startswith(wanted)), key=lambda t: t.name)
    if len(prefixed) == 1:
        return Choice(prefixed[0], by_prefix=True)
    if prefixed:
        names = ", ".join(repr(t.name) for t in prefixed)
        return Choice(None, f"{len(prefixed)} templates start with {wanted!r} ({names}); give the whole name")
    return Choice(None, f"no template named {wanted!r} (or starting with it)")
