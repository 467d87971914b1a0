"""``Async.*`` calls and their ``task`` records."""

from __future__ import annotations

import pytest
import XenAPI

from .simtools import wait_for


def finished(xapi, task: str) -> dict | None:
    record = xapi.task.get_record(task)
    return record if record["status"] != "pending" else None


def test_an_async_call_returns_a_task_that_ends_with_the_result(xapi):
    template = xapi.VM.get_by_name_label("tmpl-cnt7.7")[0]
    task = xapi.Async.VM.clone(template, "async-clone")
    assert task.startswith("OpaqueRef:")
    assert xapi.task.get_name_label(task) == "Async.VM.clone"
    record = wait_for(lambda: finished(xapi, task))
    assert record["status"] == "success"
    assert record["progress"] == 1.0
    clone = record["result"].removeprefix("<value>").removesuffix("</value>")
    assert xapi.VM.get_name_label(clone) == "async-clone"
    xapi.task.destroy(task)
    assert task not in xapi.task.get_all()


def test_a_failed_async_call_records_the_error(xapi):
    running = xapi.VM.get_by_name_label("Control domain on host: sim-xen-01")[0]
    task = xapi.Async.VM.clone(running, "impossible")
    record = wait_for(lambda: finished(xapi, task))
    assert record["status"] == "failure"
    assert record["error_info"] == ["VM_BAD_POWER_STATE", running, "halted", "running"]


def test_only_explicit_messages_have_an_async_form(xapi):
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.Async.VM.get_name_label(xapi.VM.get_all()[0])
    assert failure.value.details == ["MESSAGE_METHOD_UNKNOWN", "Async.VM.get_name_label"]


def test_async_calls_run_in_parallel(make_lab):
    from dynvm.sim.settings import Timing

    from .simtools import login

    node = make_lab(timing=Timing(clone_seconds=0.5)).nodes[0]
    xapi = login(node).xenapi
    template = xapi.VM.get_by_name_label("tmpl-cnt7.7")[0]
    tasks = [xapi.Async.VM.clone(template, f"p{n}") for n in range(10)]
    # ten half-second clones at once end long before five seconds
    records = wait_for(lambda: all(finished(xapi, t) for t in tasks), timeout=4.0)
    assert records
    assert all(xapi.task.get_status(t) == "success" for t in tasks)
