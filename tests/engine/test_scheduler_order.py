"""The queue's order (pure)."""

from __future__ import annotations

from dynvm.engine.queue_policy import fair_order
from dynvm.states import RequestState
from dynvm.store.requests import RequestRecord


def queued(request_id: str, user: str, at: float, priority: int = 0) -> RequestRecord:
    return RequestRecord(request_id, user, "centos", 1, RequestState.QUEUED, "me", at, priority=priority)


def test_users_take_turns_and_each_users_requests_keep_their_order():
    flood = [queued(f"a{i}", "alice", i) for i in range(5)]
    late = queued("b0", "bob", 10)
    order = [r.id for r in fair_order([*flood, late])]
    assert order == ["a0", "b0", "a1", "a2", "a3", "a4"]  # bob's one is second, not sixth


def test_a_higher_priority_class_goes_first_and_age_breaks_ties():
    order = [
        r.id
        for r in fair_order([queued("low", "alice", 0), queued("high", "carol", 5, priority=1), queued("b", "bob", 1)])
    ]
    assert order == ["high", "low", "b"]


def test_a_user_served_while_another_waited_falls_behind_them():
    # alice's a5 is older than bob's b0, but three of alice's were served since a5 came
    served = [("alice", 20.0), ("alice", 21.0), ("alice", 22.0)]
    order = [r.id for r in fair_order([queued("a5", "alice", 5), queued("b0", "bob", 10)], served)]
    assert order == ["b0", "a5"]
    # what was served before a request came does not count against it
    assert [r.id for r in fair_order([queued("a5", "alice", 30), queued("b0", "bob", 31)], served)] == ["a5", "b0"]
