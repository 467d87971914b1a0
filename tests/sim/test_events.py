"""``event.from`` and ``event.inject`` as xapi implements them: tokens, add/mod/del,
coalescing, class and object subscriptions, and an empty answer at the time-out."""

from __future__ import annotations

import threading
import time

import pytest
import XenAPI

from .simtools import new_vm, wait_for


def events_of(batch: dict, cls: str = "vm") -> list[tuple[str, str]]:
    return [(e["operation"], e["ref"]) for e in batch["events"] if e["class"] == cls]


def test_an_empty_token_returns_the_current_state(xapi):
    batch = xapi.event_from(["vm"], "", 1.0)
    refs = {ref for op, ref in events_of(batch) if op == "add"}
    assert refs == set(xapi.VM.get_all())
    assert batch["valid_ref_counts"]["vm"] == len(refs)
    for event in batch["events"]:
        assert event["snapshot"] == xapi.VM.get_record(event["ref"])
    # tokens are two zero-padded generation counts, so they compare as strings
    first, second = batch["token"].split(",")
    assert len(first) == len(second) == 20


def test_add_mod_del_after_a_token(xapi):
    token = xapi.event_from(["vm"], "", 1.0)["token"]
    vm = new_vm(xapi, "watched")
    batch = xapi.event_from(["vm"], token, 1.0)
    assert ("add", vm) in events_of(batch)
    token = batch["token"]

    xapi.VM.set_name_description(vm, "changed")
    batch = xapi.event_from(["vm"], token, 1.0)
    assert events_of(batch) == [("mod", vm)]
    assert batch["events"][0]["snapshot"]["name_description"] == "changed"
    token = batch["token"]

    snapshot = xapi.VM.snapshot(vm, "watched before")
    token = xapi.event_from(["vm"], token, 1.0)["token"]
    xapi.VM.destroy(snapshot)
    batch = xapi.event_from(["vm"], token, 1.0)
    mine = [e for e in batch["events"] if e["ref"] == snapshot]
    assert [e["operation"] for e in mine] == ["del"]
    assert "snapshot" not in mine[0]
    # the VM it was a snapshot of lost one: that side of the relation changed too
    assert ("mod", vm) in events_of(batch)


def test_many_changes_to_one_object_coalesce_into_one_event(xapi):
    vm = new_vm(xapi, "busy")
    token = xapi.event_from(["vm"], "", 1.0)["token"]
    for n in range(10):
        xapi.VM.set_name_description(vm, f"step {n}")
    batch = xapi.event_from(["vm"], token, 1.0)
    assert events_of(batch) == [("mod", vm)]
    assert batch["events"][0]["snapshot"]["name_description"] == "step 9"


def test_an_object_created_and_destroyed_between_calls_is_not_reported(xapi):
    token = xapi.event_from(["vm"], "", 1.0)["token"]
    vm = new_vm(xapi, "ephemeral")
    xapi.VM.destroy(vm)
    batch = xapi.event_from(["vm"], token, 0.2)
    assert vm not in {ref for _, ref in events_of(batch)}


def test_nothing_new_means_an_empty_answer_at_the_timeout(xapi):
    token = xapi.event_from(["vm"], "", 1.0)["token"]
    started = time.monotonic()
    batch = xapi.event_from(["vm"], token, 0.3)
    assert batch["events"] == []
    assert time.monotonic() - started >= 0.3
    assert batch["token"] >= token


def test_a_waiting_call_returns_as_soon_as_something_changes(xapi, session, node):
    from .simtools import login

    token = xapi.event_from(["vm"], "", 1.0)["token"]
    other = login(node).xenapi
    template = other.VM.get_by_name_label("tmpl-cnt7.7")[0]
    timer = threading.Timer(0.2, lambda: other.VM.set_name_description(template, "touched"))
    timer.start()
    started = time.monotonic()
    batch = xapi.event_from(["vm"], token, 30.0)
    timer.join()
    assert events_of(batch) == [("mod", template)]
    assert time.monotonic() - started < 10


def test_subscriptions_select_classes_and_objects(xapi):
    one = new_vm(xapi, "one")
    two = new_vm(xapi, "two")
    token = xapi.event_from(["*"], "", 1.0)["token"]
    xapi.VM.set_name_description(one, "x")
    xapi.VM.set_name_description(two, "y")
    only_one = xapi.event_from([f"VM/{one}"], token, 1.0)  # class names are case-insensitive
    assert events_of(only_one) == [("mod", one)]
    nothing = xapi.event_from(["host"], token, 0.1)
    assert nothing["events"] == []


def test_guest_metrics_changes_are_events_too(xapi):
    token = xapi.event_from(["vm_guest_metrics"], "", 1.0)["token"]
    vm = new_vm(xapi, "booting", start=True)
    seen_ip = False
    deadline = time.monotonic() + 10
    while not seen_ip and time.monotonic() < deadline:
        batch = xapi.event_from(["vm_guest_metrics"], token, 1.0)
        token = batch["token"]
        seen_ip = any("0/ip" in e.get("snapshot", {}).get("networks", {}) for e in batch["events"])
    assert seen_ip, f"no guest metrics event with an address for {vm}"


def test_inject_makes_an_event_and_returns_a_token_before_it(xapi):
    template = xapi.VM.get_by_name_label("tmpl-oel8")[0]
    token = xapi.event.inject("VM", template)
    batch = xapi.event_from(["vm"], token, 1.0)
    assert events_of(batch) == [("mod", template)]


def test_bad_tokens_and_subscriptions_fail_cleanly(xapi):
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.event_from(["vm"], "not-a-token", 0.1)
    assert failure.value.details == ["EVENT_FROM_TOKEN_PARSE_FAILURE", "not-a-token"]


def test_a_waiting_call_ends_when_its_session_does(node, ctl):
    from .simtools import login

    raw_session = login(node)
    token = raw_session.xenapi.event_from(["vm"], "", 1.0)["token"]
    result: dict = {}

    def wait() -> None:
        proxy = raw_session  # call beneath the SDK's automatic re-login, to see the error itself
        result["answer"] = proxy.__getattr__("event.from")(raw_session.handle, ["vm"], token, 30.0)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_for(lambda: node.api.event_waits == 1, timeout=10)  # the call is waiting, not merely sent
    assert "answer" not in result
    ctl.invalidate_sessions()
    waiter.join(10)
    assert result["answer"]["ErrorDescription"][0] == "SESSION_INVALID"


def test_an_object_made_after_the_token_comes_as_one_add_with_its_current_record(session):
    xapi = session.xenapi
    token = xapi.event_from(["vm"], "", 0.0)["token"]
    vm = new_vm(xapi, "fresh")  # created, then changed many times (provision, names, disks)
    xapi.VM.set_name_description(vm, "changed after its creation")
    events = [e for e in xapi.event_from(["vm"], token, 0.0)["events"] if e["ref"] == vm]
    assert [e["operation"] for e in events] == ["add"]  # xapi_event.ml: a create is never also a mod
    assert events[0]["snapshot"]["name_description"] == "changed after its creation"
