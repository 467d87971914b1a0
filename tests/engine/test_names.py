"""The rule that a name prefix is its first holder's (``engine/names.py``), and the root the
database looks leases up by (``model.name_root``, ``ix_leases_active_root``)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from dynvm.engine.names import refuse_under_others
from dynvm.model import Lease, LeaseRequest, NameInUse, name_root, vm_names

from ..pg.test_replicas import lease

USERNAMES = ["a", "a1", "a12", "a2", "a21", "ab", "a1b", "a1b2", "1", "12", "b", "x9y9"]
COUNTS = [1, 2, 3, 12]


def _lease(username: str, name: str) -> Lease:
    return lease(name, username=username, caller=f"{username}-caller")


def _clashes(request: LeaseRequest, theirs: Lease) -> bool:
    try:
        refuse_under_others([theirs], request)
    except NameInUse:
        return True
    return False


def test_every_clash_under_the_prefix_rule_is_between_names_of_one_root():
    """The database hands the rule only the other callers' leases of the request's root: a
    lease of another root must never be one the rule would refuse. Every pair of these
    usernames and counts, both ways."""
    checked = clashing = 0
    for mine, theirs in itertools.product(USERNAMES, repeat=2):
        for count, their_count in itertools.product(COUNTS, repeat=2):
            request = LeaseRequest(mine, "centos", count=count, caller=f"{mine}-me")
            for name in vm_names(theirs, their_count):
                clash = _clashes(request, _lease(theirs, name))
                checked += 1
                clashing += clash
                if clash:
                    assert name_root(name) == name_root(mine), (mine, count, theirs, name)
    assert clashing > 100  # both kinds were met
    assert checked - clashing > 1000


@pytest.mark.parametrize(
    ("name", "root"), [("al3", "al"), ("al", "al"), ("a1b2", "a1b"), ("build2", "build"), ("123", ""), ("", "")]
)
def test_a_root_is_the_name_without_its_trailing_digits(name: str, root: str):
    assert name_root(name) == root


def test_the_rule_still_refuses_what_it_refused():
    """bob's al3 falls under alice's al1, al2; alice may not take bob's prefix either."""
    alice = _lease("al", "al1")
    assert _clashes(LeaseRequest("al3", "centos", caller="bob"), dataclasses.replace(alice, caller="alice"))
    assert _clashes(LeaseRequest("al", "centos", count=2, caller="alice"), _lease("al3", "al3"))
    assert not _clashes(LeaseRequest("al3x", "centos", caller="bob"), alice)
