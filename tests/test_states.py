"""The lease and request state machines (``states.py``): one table, enforced by the stores
and by the database, and drawn in docs/LIFECYCLES.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from dynvm.states import LEASES, REQUESTS, Actor, IllegalMove, LeaseState, RequestState
from dynvm.store.db import Database
from dynvm.store.leases import LeaseStore
from dynvm.store.requests import RequestRecord, RequestStore

LIFECYCLES = Path(__file__).resolve().parents[1] / "docs" / "LIFECYCLES.md"


@pytest.mark.parametrize("table", [LEASES, REQUESTS], ids=["lease", "request"])
def test_the_readme_draws_the_table(table):
    found = re.search(
        rf"<!-- states:{table.name} -->\n```mermaid\n(.*?)\n```\n<!-- /states:{table.name} -->",
        LIFECYCLES.read_text(),
        re.S,
    )
    assert found, f"docs/LIFECYCLES.md has no states:{table.name} block"
    assert found.group(1) == table.mermaid(), (
        "docs/LIFECYCLES.md's diagram differs from states.py; paste:\n" + table.mermaid()
    )


@pytest.mark.parametrize("table", [LEASES, REQUESTS], ids=["lease", "request"])
def test_every_state_is_born_or_reached_and_every_active_one_can_end(table):
    reached = {move.target for move in table.moves}
    assert set(table.states) == reached  # no state that nothing enters
    assert any(move.source is None for move in table.moves)
    leaving = {move.source for move in table.moves if move.source is not None and move.source != move.target}
    final = set(table.states) - leaving
    if table is LEASES:
        assert final == {LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.FAILED}
    else:
        assert final == {RequestState.READY, RequestState.FAILED, RequestState.CANCELLED, RequestState.TIMED_OUT}


def test_a_move_the_table_lacks_raises_and_one_by_the_wrong_actor_too():
    with pytest.raises(IllegalMove, match="may not move a lease from released to ready"):
        LEASES.check([LeaseState.RELEASED], LeaseState.READY, Actor.BUILDER)
    with pytest.raises(IllegalMove, match="caller may not move a lease from ready to releasing"):
        LEASES.check([LeaseState.READY], LeaseState.RELEASING, Actor.CALLER)  # only the releaser takes one
    with pytest.raises(IllegalMove):
        REQUESTS.check([RequestState.READY], RequestState.QUEUED, Actor.SCHEDULER)
    assert LEASES.check([LeaseState.READY], LeaseState.RELEASING, Actor.RELEASER) == [LeaseState.READY]


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'states.db'}")
    database.migrate()
    yield database
    database.close()


def test_the_stores_refuse_an_illegal_write_before_touching_a_row(db):
    leases = LeaseStore(db)
    with pytest.raises(IllegalMove):
        leases.set_state(["any"], LeaseState.READY, [LeaseState.RELEASED], by=Actor.RELEASER)
    with pytest.raises(IllegalMove):
        leases.finish(["any"], LeaseState.EXPIRED, 0.0, by=Actor.BUILDER)  # only a release expires a lease
    requests = RequestStore(db)
    with pytest.raises(IllegalMove, match="never written in state ready"):
        requests.insert(RequestRecord("r0", "u", "centos", 1, RequestState.READY, "me", 1.0))
    assert requests.get("r0") is None
    requests.insert(RequestRecord("r1", "u", "centos", 1, RequestState.QUEUED, "me", 1.0))
    with pytest.raises(IllegalMove):
        requests.transition("r1", [RequestState.QUEUED], RequestState.READY, by=Actor.BUILDER)
    assert requests.get("r1").state == RequestState.QUEUED
    assert requests.transition("r1", [RequestState.QUEUED], RequestState.TIMED_OUT, by=Actor.SCHEDULER)
    assert requests.get("r1").state == RequestState.TIMED_OUT


def test_the_database_refuses_a_state_it_does_not_know(db):
    requests = RequestStore(db)
    requests.insert(RequestRecord("r1", "u", "centos", 1, RequestState.QUEUED, "me", 1.0))
    with pytest.raises(IntegrityError), db.write() as conn:
        conn.execute(text("UPDATE requests SET state = 'redy' WHERE id = 'r1'"))
    with pytest.raises(IntegrityError), db.write() as conn:
        conn.execute(
            text(
                "INSERT INTO leases (id, request_id, name, username, os, host_ref, template, state, cpus, memory,"
                " disk, created_at, expires_at, owner, pooled) VALUES ('l1', 'r1', 'n', 'u', 'centos', '1', '',"
                " 'handed out', 1, 1, 1, 0, 0, 'me', false)"
            )
        )
