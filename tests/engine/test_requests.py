"""The durable request row and waiting on it (``engine/requests.py``), on a real SQLite file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dynvm.store.requests as requests_module
from dynvm.states import Actor, RequestState
from dynvm.store.db import Database
from dynvm.store.requests import RequestRecord, RequestStore


def test_a_change_made_between_the_waiters_look_and_its_wait_is_not_missed(tmp_path: Path, monkeypatch):
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.migrate()
    store = RequestStore(db)
    store.insert(
        RequestRecord(
            id="r1", username="u", os="centos", count=1, state=RequestState.CREATING, owner="me", created_at=1
        )
    )
    monkeypatch.setattr(requests_module, "POLL_SECONDS", 3600.0)  # only a wake-up can end the wait now
    real_get = store.get
    looks = []

    def get_then_change(request_id: str):  # type: ignore[no-untyped-def]
        record = real_get(request_id)
        looks.append(record.state)
        if len(looks) == 1:  # the request becomes ready just after the waiter looked
            store.transition("r1", [RequestState.CREATING], RequestState.READY, by=Actor.BUILDER)
            store.notify("r1")
        return record

    monkeypatch.setattr(store, "get", get_then_change)
    final = asyncio.run(asyncio.wait_for(store.wait_finished("r1", timeout=7200), timeout=30))
    assert final.state == RequestState.READY
    assert looks == [RequestState.CREATING, RequestState.READY]
    db.close()
