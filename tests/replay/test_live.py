"""``dynvm replay --live`` (``replay/live.py``): a trace against real ``dynvm serve`` and
``dynvm sim`` processes on 127.0.0.1, time compressed."""

from __future__ import annotations

import pytest

from dynvm.replay.live import LiveReplay
from dynvm.replay.runner import ReplayOptions
from dynvm.trace import Demand

START = 8 * 3600.0  # a slice of a week: Monday 08:00 on
SPEED = 60.0


def test_a_live_replay_serves_warm_from_the_pool_cold_without_and_keeps_time_compressed():
    trace = [Demand(START + 120 * (i + 1), f"job{i}", "centos", 1, 200.0) for i in range(5)]
    trace.append(Demand(START + 420, "win", "windows", 1, 100.0))  # no pool for windows: cold
    options = ReplayOptions(hosts=2, policy="fixed", fixed={"centos": 2}, create_seconds=65, start=START)
    seen: list[int] = []
    result = LiveReplay(sorted(trace, key=lambda d: d.arrival_s), options, SPEED, progress=lambda n, _: seen.append(n))
    figures = result.run().summary()
    assert (figures["requests"], figures["vms"], figures["refused"]) == (6, 6, 0)
    assert seen == [1, 2, 3, 4, 5, 6]
    assert figures["warm_requests"] >= 4  # the pool is ready from the first request on
    assert figures["ttv_p50_s"] < 1.0  # a warm handout: its wall time, measured
    assert 65 * 0.9 <= figures["ttv_p99_s"] <= 65 * 2  # the cold one: the create, in trace seconds
    assert figures["vm_hours_used"] == pytest.approx((5 * 200 + 100) / 3600, abs=0.01)
    # Two ready VMs waited most of the 10 trace minutes: hours of trace time, which the
    # service can only have counted on its compressed clock (the run takes seconds).
    assert 0.1 <= figures["vm_hours_idle"] <= 4 * 600 / 3600
