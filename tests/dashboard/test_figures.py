"""The dashboard's figures (``dashboard/figures.py``) on known input."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dynvm.dashboard import figures
from dynvm.engine.ready_stock import POOL_USER

HOUR = 3600.0
NOW = 1_800_000_000.0


@dataclass
class Record:  # the fields of a request the figures read
    os: str
    state: str
    created_at: float
    finished_at: float | None
    error_kind: str | None = None
    error: str | None = None
    error_status: int | None = None


def test_vms_in_use_count_from_creation_to_deletion_and_idle_pool_vms_do_not_count():
    lifetimes = [
        ("alice", "centos", NOW - 3 * HOUR, 2 * HOUR, 60.0),  # gone an hour ago
        ("bob", "centos", NOW - 1.5 * HOUR, None, 60.0),  # still alive
        ("carol", "windows", NOW - 30 * HOUR, 29.5 * HOUR, 300.0),  # from before the span, gone half an hour ago
        (POOL_USER, "centos", NOW - 2 * HOUR, None, 60.0),  # waiting in a pool: not in use
    ]
    found = figures.in_use(lifetimes, NOW, "24h")
    assert found["step"] == 300.0
    assert found["times"][-1] == NOW
    at = dict(zip(found["times"], zip(found["series"]["centos"], found["series"]["windows"], strict=True), strict=True))

    def level(t: float) -> tuple[int, int]:
        return at[max(x for x in at if x <= t)]

    assert level(NOW - 2.5 * HOUR) == (1, 1)  # alice, carol
    assert level(NOW - 1.2 * HOUR) == (2, 1)  # alice, bob; carol
    assert level(NOW - 0.2 * HOUR) == (1, 0)  # bob only
    assert level(NOW) == (1, 0)
    assert POOL_USER not in str(found["series"])
    assert len(figures.in_use(lifetimes, NOW, "7d")["times"]) <= 7 * 24 + 1


def test_a_distribution_counts_values_per_bin_with_its_p50_and_p95():
    values = [0.01] * 50 + [4.0] * 44 + [70.0] * 6  # rank round(0.95 x 99) = 94, a 70; rank 50, a 4.0
    found = figures.distribution(values)
    assert found["n"] == 100
    assert sum(found["counts"]) == 100
    assert found["counts"][0] == 50  # 0 to 50 ms
    assert found["counts"][figures.EDGES.index(2)] == 44  # 2 to 5 s
    assert found["counts"][figures.EDGES.index(60)] == 6  # 60 to 90 s
    assert (found["p50"], found["p95"]) == (4.0, 70.0)
    assert figures.distribution([])["p50"] is None
    assert figures.distribution([5000.0])["counts"][-1] == 1  # beyond the last edge: the open bin


def test_time_to_vm_comes_from_served_requests_and_create_time_from_recent_vms():
    since = NOW - 7 * 24 * HOUR
    requests = [
        Record("centos", "ready", NOW - 100, NOW - 99.99),  # warm: 10 ms
        Record("centos", "ready", NOW - 200, NOW - 135),  # cold: 65 s
        Record("centos", "failed", NOW - 300, NOW - 290),  # not served: no time to VM
        Record("windows", "ready", since - 500, since - 10),  # before the span
    ]
    lifetimes = [("a", "centos", NOW - 135, None, 65.0), ("b", "windows", since - 10, None, 300.0)]
    found = figures.timings(lifetimes, requests, since)
    assert found["time_to_vm"]["centos"]["n"] == 2
    assert found["time_to_vm"]["centos"]["p95"] == pytest.approx(65.0)
    assert found["create"]["centos"]["p50"] == 65.0
    assert "windows" not in found["create"]  # nothing of it in the span


def test_failures_are_grouped_by_reason_with_the_latest_message():
    since = NOW - HOUR
    requests = [
        Record("centos", "failed", NOW - 900, NOW - 800, "NotEnoughCapacity", "no room for 3 centos", 429),
        Record("centos", "failed", NOW - 700, NOW - 600, "NotEnoughCapacity", "no room for 8 centos", 429),
        Record("centos", "timed out", NOW - 500, NOW - 100),
        Record("centos", "ready", NOW - 50, NOW - 10),
        Record("centos", "failed", since - 900, since - 100, "ProvisionError", "clone failed", 500),  # before the span
    ]
    found = figures.failures(requests, since)
    assert [(f["reason"], f["count"]) for f in found] == [("NotEnoughCapacity", 2), ("timed out", 1)]
    assert found[0]["last_error"] == "no room for 8 centos"


def test_refusals_and_create_failures_are_told_apart_in_words():
    since = NOW - HOUR
    requests = [
        Record("centos", "failed", NOW - 900, NOW - 800, "QuotaExceeded", "q holds 12 VM(s)", 429),
        Record("centos", "failed", NOW - 900, NOW - 700, "UnknownOs", "unknown OS 'x'", 400),
        Record("centos", "failed", NOW - 900, NOW - 600, "CreateFailed", "no usable VM after 3 attempts", 502),
        Record("centos", "failed", NOW - 900, NOW - 500, "ProvisionError", "clone failed", 500),
        Record("centos", "timed out", NOW - 500, NOW - 100, "QueueTimedOut", "waited 5 min", 429),
    ]
    found = {f["reason"]: (f["group"], f["label"]) for f in figures.failures(requests, since)}
    assert found == {
        "QuotaExceeded": ("refused", "over a quota"),
        "UnknownOs": ("refused", "unknown OS"),
        "QueueTimedOut": ("refused", "waited too long in the queue"),
        "CreateFailed": ("create_failed", "VM could not be made"),
        "ProvisionError": ("create_failed", "VM could not be made"),
    }
    assert figures.reason_words("SomeNewError") == "some new error"  # never CamelCase on the page
