"""The replay's model hosts (``dynvm.replay.model``): what they show of their VMs."""

from __future__ import annotations

import threading
from pathlib import Path

from dynvm.config import load_settings
from dynvm.engine.ready_stock import POOL_USER
from dynvm.hosts import HostSettings
from dynvm.model import VmSpec
from dynvm.replay.model import CountedBuilders, ModelHosts, VirtualClock
from dynvm.replay.runner import ReplayOptions, _config


def _hosts(tmp_path: Path) -> tuple[ModelHosts, VirtualClock, HostSettings]:
    settings = load_settings(_config(tmp_path / "model.ini", {"centos"}, ReplayOptions(hosts=2, policy="none")))
    clock = VirtualClock(100.0)
    hosts = ModelHosts(clock, create_seconds=65.0)
    hosts.apply(settings)
    return hosts, clock, settings.hosts[0]


def _make(hosts: ModelHosts, host: HostSettings, name: str) -> str:
    spec = VmSpec(name=name, os="centos", template="model-centos", lease_id=f"lease-{name}")
    return hosts.create(host, spec, lambda *_: None, threading.Event(), lambda _: None, 1).ref


def test_the_listing_follows_every_change_to_a_host_even_when_looked_at_in_between(tmp_path: Path) -> None:
    """The list a host shows is kept between looks; a VM made, renamed (a hand-out) or
    destroyed, and a create that ends as the clock moves, each show at the next look."""
    hosts, clock, host = _hosts(tmp_path)
    assert hosts.machines(host) == []
    first = _make(hosts, host, "alice")
    shown = hosts.machines(host)
    assert [(m.name, m.running) for m in shown] == [("alice", False)]  # made for a request: running at runs_at
    clock.advance(164.0)
    assert [m.running for m in hosts.machines(host)] == [False]
    clock.advance(165.0)
    assert [(m.running, m.addresses != ()) for m in hosts.machines(host)] == [(True, True)]
    second = _make(hosts, host, "bob")
    assert sorted(m.name for m in hosts.machines(host)) == ["alice", "bob"]
    hosts.hand_out(host, second, VmSpec("carol", "centos", "model-centos", "lease-bob"))
    assert sorted(m.name for m in hosts.machines(host)) == ["alice", "carol"]
    hosts.destroy(host, first, "lease-alice")
    assert [m.name for m in hosts.machines(host)] == ["carol"]


def test_a_listing_handed_out_is_the_callers_own(tmp_path: Path) -> None:
    hosts, _, host = _hosts(tmp_path)
    _make(hosts, host, "alice")
    mine = hosts.machines(host)
    mine.clear()
    assert [m.name for m in hosts.machines(host)] == ["alice"]


def test_the_replay_is_told_when_its_builds_have_ended_or_wait_for_the_clock(tmp_path: Path) -> None:
    """``CountedBuilders.settled``: not while a build runs; yes once every build has ended
    or waits for the virtual clock; not again once the clock wakes a create, until its
    build has ended."""
    hosts, clock, host = _hosts(tmp_path)
    builders = CountedBuilders(clock)
    try:
        go = threading.Event()
        running = builders.submit(go.wait, 5)
        assert not builders.settled(hosts, timeout=0.05)  # a build runs
        go.set()
        running.result(timeout=5)
        assert builders.settled(hosts, timeout=5)
        spec = VmSpec(name=f"{POOL_USER}-centos-1", os="centos", template="model-centos", lease_id="lease-pool")
        made = builders.submit(lambda: hosts.create(host, spec, lambda *_: None, threading.Event(), lambda _: None, 1))
        assert builders.settled(hosts, timeout=5)  # its create waits for the clock
        assert hosts.blocked == 1
        assert not made.done()
        finish = threading.Event()
        after = builders.submit(finish.wait, 5)
        clock.advance(clock.now + 65.0)  # the create's end: it is woken
        assert not builders.settled(hosts, timeout=0.05)  # the other build still runs
        finish.set()
        after.result(timeout=5)
        assert builders.settled(hosts, timeout=5)
        assert made.result(timeout=5).ref
        assert hosts.blocked == 0
    finally:
        builders.shutdown(wait=True)
