"""dynvm's Xen side against simulated hosts, over real sockets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import XenAPI

from dynvm.config import Settings, load_settings
from dynvm.sim.control import SimControlClient
from dynvm.sim.lab import Lab


class SimLab:
    """A running lab, the dynvm settings that point at it, and ways to look inside."""

    def __init__(self, lab: Lab, settings: Settings) -> None:
        self.lab = lab
        self.settings = settings

    def host(self, index: int = 0):
        return self.settings.hosts[index]

    def xapi(self, index: int = 0):
        """A session of the test's own, to check what is really on the host."""
        host = self.settings.hosts[index]
        session = XenAPI.Session(host.url)
        session.xenapi.login_with_password(host.user, host.password.reveal(), "2.21", "test-observer")
        return session.xenapi

    def control(self, index: int = 0) -> SimControlClient:
        return SimControlClient(self.lab.control_endpoint.url + "/", self.lab.nodes[index].host.spec.password)

    def inventory_of(self, index: int = 0) -> tuple[set[str], set[str]]:
        """(VM refs, VDI refs) on the host: compare before and after to find leftovers."""
        xapi = self.xapi(index)
        return set(xapi.VM.get_all()), set(xapi.VDI.get_all())


@pytest.fixture
def sim_lab(make_lab: Callable[..., Lab], tmp_path: Path) -> Callable[..., SimLab]:
    def make(**options: object) -> SimLab:
        lab = make_lab(**options)
        path = tmp_path / f"lab{len(list(tmp_path.glob('lab*.ini')))}.ini"
        lab.write_config(path)
        return SimLab(lab, load_settings(path))

    return make
