"""A simulated lab in the test process, reached over real sockets with the XenAPI SDK."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import XenAPI

from dynvm.sim.control import SimControlClient
from dynvm.sim.lab import Lab, LabOptions
from dynvm.sim.node import HostNode
from dynvm.sim.settings import Timing

from .simtools import login

# Fast but non-zero delays: every path through the timers runs, in milliseconds.
FAST = Timing(clone_seconds=0.01, boot_seconds=0.05, ip_seconds=0.05)


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(hosts: int = 1, timing: Timing | None = None, **options: object) -> Lab:
        options.setdefault("seed", 7)
        lab = Lab(LabOptions(hosts=hosts, timing=timing or FAST, **options))  # type: ignore[arg-type]
        lab.start()
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.stop()


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    return make_lab()


@pytest.fixture
def node(lab: Lab) -> HostNode:
    return lab.nodes[0]


@pytest.fixture
def session(node: HostNode) -> Iterator[XenAPI.Session]:
    session = login(node)
    yield session
    with contextlib.suppress(Exception):  # the test may have ended every session on purpose
        session.xenapi.session.logout()


@pytest.fixture
def xapi(session: XenAPI.Session):
    return session.xenapi


@pytest.fixture
def ctl(node: HostNode) -> SimControlClient:
    return SimControlClient(node.url + "/", node.host.spec.password)
