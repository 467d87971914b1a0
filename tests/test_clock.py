"""Compressed time (``clock.py``), for ``dynvm replay --live``."""

from __future__ import annotations

import pytest

from dynvm.clock import CompressedTime


def test_compressed_time_starts_where_it_is_told_once_running_and_runs_speed_times_as_fast():
    wall = [100.0]
    clock = CompressedTime(60, start=28_800, wall=lambda: wall[0])
    wall[0] += 5  # the service starts up: the trace's time stands still meanwhile
    assert (clock.now(), clock.monotonic()) == (28_800, 0)
    clock.run()
    assert (clock.now(), clock.monotonic()) == (28_800, 0)
    wall[0] += 1.5  # a second and a half of wall time is a minute and a half of trace time
    assert clock.now() == pytest.approx(28_890)
    assert clock.monotonic() == pytest.approx(90)


def test_time_does_not_stand_still_nor_run_backwards():
    with pytest.raises(ValueError, match="positive"):
        CompressedTime(0, start=0)
    with pytest.raises(ValueError, match="positive"):
        CompressedTime(-2, start=0)
