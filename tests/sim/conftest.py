"""A simulated lab in the test process, reached over real sockets with the XenAPI SDK."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import XenAPI

from dynvm.sim.control import SimControlClient
from dynvm.sim.lab import Lab
from dynvm.sim.node import HostNode

from .simtools import login


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
