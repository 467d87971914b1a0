"""dynvm's marker: the ``other_config`` keys on every VM and disk dynvm makes, and how to
read them. The one place that knows the keys.

- ``dynvm_lease``: the lease the VM (or disk) was made for.
- ``dynvm_installation``: the installation that made it (an id kept in its database). A
  second dynvm on the same hosts, with a database of its own, has another id and never
  touches these VMs.
- ``dynvm_holder``: the request that holds the VM, written at its hand-out (compare-and-set
  on the host, in the step before the database hands it over). A ready-pool VM has none
  while it waits. The host, not the database, says who holds a VM: a database restored
  from a backup may think a held VM is still waiting in its pool, or still being made.
- ``dynvm_quarantined_at``: set (Unix seconds) when reconcile found a VM of this
  installation that its database does not know — say, the database was restored from a
  backup older than the VM. Such a VM is halted and kept, not destroyed, until the
  quarantine ends (``[common] orphan.quarantine.hours``).

The pool record carries ``dynvm_claim_<installation id>``: the installation's claim on the
pool (``engine/claim.py``), renewed by its leader.

VMs made before installations had ids carry only ``dynvm_lease``: they are this
installation's when its database knows that lease, and are left alone otherwise.

A clone is made under a name of its own, ``dynvm-clone-<lease id>-of-<installation id>``,
and renamed once it is marked: a clone that lost its marker race (dynvm died, or its host
stopped answering, between the clone and the marker) is still recognisable by that name.
Its lease id is one only dynvm knows; its installation id says whose it is even when the
database no longer knows the lease (restored from a backup older than the clone), so that
it is quarantined as any VM of an unknown lease, not left on the host for ever. Clones
made before the installation was in the name (``dynvm-clone-<lease id>``) are known by
their lease alone, as they always were.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

MARKER_KEY = "dynvm_lease"
INSTALLATION_KEY = "dynvm_installation"
HOLDER_KEY = "dynvm_holder"
CLAIM_KEY_PREFIX = "dynvm_claim_"  # on the pool record, + the installation id
QUARANTINE_KEY = "dynvm_quarantined_at"
QUARANTINE_TAG = "dynvm-quarantined"  # also in the VM's tags, so that XenCenter shows it


class Ownership(enum.Enum):
    OURS = "ours"  # carries this installation's id
    UNNAMED = "unnamed"  # dynvm's marker without an installation id (made before ids existed)
    OTHER_INSTALLATION = "other installation"
    NOT_DYNVM = "not dynvm"


def ownership(other_config: Mapping[str, str], installation: str) -> Ownership:
    if MARKER_KEY not in other_config:
        return Ownership.NOT_DYNVM
    made_by = other_config.get(INSTALLATION_KEY)
    if made_by is None:
        return Ownership.UNNAMED
    return Ownership.OURS if made_by == installation else Ownership.OTHER_INSTALLATION


CLONE_NAME_PREFIX = "dynvm-clone-"
CLONE_OF = "-of-"  # never in a lease id (a UUID: hex digits and '-')


def clone_name(lease_id: str, installation: str) -> str:
    """The name a clone is made under, until it is marked and renamed."""
    return f"{CLONE_NAME_PREFIX}{lease_id}{CLONE_OF}{installation}"


def lease_of_clone_name(name: str) -> str | None:
    """The lease a clone's name was made for (either form), None if it is no clone's name."""
    if not name.startswith(CLONE_NAME_PREFIX):
        return None
    return name.removeprefix(CLONE_NAME_PREFIX).partition(CLONE_OF)[0]


def installation_of_clone_name(name: str) -> str | None:
    """The installation a clone's name says made it; None for a name without one."""
    if not name.startswith(CLONE_NAME_PREFIX) or CLONE_OF not in name:
        return None
    return name.rpartition(CLONE_OF)[2]


def marker(lease_id: str, installation: str) -> dict[str, str]:
    """The keys to write on a VM or disk made for ``lease_id``."""
    return {MARKER_KEY: lease_id, INSTALLATION_KEY: installation}


def lease_of(other_config: Mapping[str, str]) -> str | None:
    return other_config.get(MARKER_KEY)


def claim_key(installation: str) -> str:
    return f"{CLAIM_KEY_PREFIX}{installation}"


def holder_of(other_config: Mapping[str, str]) -> str | None:
    """The request the host says holds this VM; None while nobody does."""
    return other_config.get(HOLDER_KEY)


def quarantined_at(other_config: Mapping[str, str]) -> float | None:
    raw = other_config.get(QUARANTINE_KEY)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None
