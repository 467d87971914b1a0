"""The database itself refuses a state dynvm does not know (migration 0011), on SQLite and
on PostgreSQL alike: a typo in code or a hand-edited row never reaches a reader."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from dynvm.states import RequestState
from dynvm.store.db import Database
from dynvm.store.requests import RequestRecord, RequestStore


def test_an_unknown_state_is_refused_and_every_known_one_taken(db_url):
    db = Database(db_url)
    db.migrate()
    requests = RequestStore(db)
    requests.insert(RequestRecord("r1", "u", "centos", 1, RequestState.QUEUED, "me", 1.0))
    with pytest.raises(IntegrityError), db.write() as conn:
        conn.execute(text("UPDATE requests SET state = 'redy' WHERE id = 'r1'"))
    for state in RequestState:  # what the migration lists is what the code knows
        with db.write() as conn:
            conn.execute(text("UPDATE requests SET state = :state WHERE id = 'r1'"), {"state": state.value})
        assert requests.get("r1").state == state
    db.close()
