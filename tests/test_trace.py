"""Demand traces (``trace.py``): the CSV format, the history's trace, and the generator."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynvm.cli import build_cli
from dynvm.trace import Demand, TraceError, from_history, read_trace, write_trace


def test_a_trace_round_trips_and_says_which_line_is_wrong(tmp_path: Path):
    rows = [Demand(0.0, "job1", "centos", 2, 600.5), Demand(12.25, "job2", "windows", 1, 30.0)]
    path = tmp_path / "t.csv"
    assert write_trace(path, rows) == 2
    assert path.read_text().splitlines()[0] == "arrival_s,user,os,count,hold_s"
    assert read_trace(path) == rows
    bad = {
        "arrival_s,user,os,count\n": "line 1: the header must be",
        "arrival_s,user,os,count,hold_s\n5,a,centos,1,10\n4,b,centos,1,10\n": "line 3: arrival_s goes back in time",
        "arrival_s,user,os,count,hold_s\n5,a,centos,0,10\n": "line 2: count must be at least 1",
        "arrival_s,user,os,count,hold_s\nsoon,a,centos,1,10\n": "line 2: arrival_s and hold_s are seconds",
        "arrival_s,user,os,count,hold_s\n1,a,centos,1\n": "line 2: 4 fields, not 5",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(TraceError, match=message):
            read_trace(path)


def doc(user: str, os: str, created: float, create: float, deleted: float | None, **extra: object) -> dict:
    return {
        "username": user,
        "os": os,
        "created_time": created,
        "create_duration_secs": create,
        "deleted_time": deleted,
        "live_duration_secs": None if deleted is None else deleted - created,
        **extra,
    }


def test_the_history_becomes_one_row_per_request_arriving_a_create_time_before_ready():
    documents = [
        doc("ci42", "centos", 1065, 65, 1665),  # one request of three VMs, ready a second apart
        doc("ci42", "centos", 1066, 66, 1965),
        doc("ci42", "centos", 1064, 64, 1665),
        doc("ci42", "centos", 5065, 65, 5100),  # the same user, later: another request
        doc("win", "windows", 2300, 300, None),  # still alive at "now"
        # a ready-pool VM, made long before, handed out at 3000 and released at 3100
        doc("warm", "centos", 100, 65, 3100, pooled=True, pooled_time=165, handout_time=3000),
    ]
    trace = from_history(documents, now=4000)
    assert trace == [
        Demand(0.0, "ci42", "centos", 3, 899.0),  # handed over when the last was ready
        Demand(1000.0, "win", "windows", 1, 1700.0),
        Demand(2000.0, "warm", "centos", 1, 100.0),
        Demand(4000.0, "ci42", "centos", 1, 35.0),
    ]


def test_dynvm_history_export_writes_the_trace_of_a_database(make_services, tmp_path: Path):
    from dynvm.model import LeaseRequest

    services, lab = make_services()
    services.engine.acquire(LeaseRequest("exported", "centos", count=2))
    out = tmp_path / "mine.csv"
    result = CliRunner().invoke(
        build_cli(),
        [
            "history",
            "export",
            "--trace",
            str(out),
            "--config",
            str(lab.settings.source),
            "--db",
            f"sqlite:///{tmp_path / 'dynvm.db'}",
        ],
    )
    assert result.exit_code == 0, result.output
    [row] = read_trace(out)
    assert (row.user, row.os, row.count, row.arrival_s) == ("exported", "centos", 2, 0.0)


def test_the_synthetic_week_has_its_documented_shape_and_is_repeatable():
    from bench.demand import DAY, HOUR, WeekShape, generate

    shape = WeekShape()
    week = generate(shape, seed=3)
    assert week == generate(shape, seed=3)
    assert week != generate(shape, seed=4)
    assert week[-1].arrival_s < 7 * DAY
    by_hour = lambda lo, hi, days: sum(  # noqa: E731
        1 for d in week if (d.arrival_s // DAY) in days and lo * HOUR <= d.arrival_s % DAY < hi * HOUR
    )
    weekdays, weekend = range(5), (5, 6)
    assert by_hour(10, 17, weekdays) / 5 > 4 * by_hour(10, 17, weekend) / 2  # weekends are quiet
    assert by_hour(10, 17, weekdays) / 7 > 3 * by_hour(20, 24, weekdays) / 4  # the daytime peak
    wave = [d for d in week if d.user.startswith("nightly")]
    assert len(wave) == 5 * shape.wave_jobs  # weekdays only
    assert all(
        shape.wave_hour * HOUR <= d.arrival_s % DAY < shape.wave_hour * HOUR + shape.wave_minutes * 60 for d in wave
    )
    assert {d.os for d in week} == set(shape.os_mix)
    assert max(d.count for d in week) == 8
    holds = sorted(d.hold_s for d in week)
    assert holds[len(holds) // 2] < holds[int(0.99 * len(holds))] / 5  # heavy-tailed
