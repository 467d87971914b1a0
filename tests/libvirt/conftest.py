"""Real guests under libvirt/QEMU on this machine (software emulation), for the libvirt
provider's tests.

They run inside a network namespace of their own (``tests/libvirt/in-netns``, which
``make test`` uses): libvirtd is started there, the guests' network is made there, and this
process, which talks to the service and SSHes to the guests, runs there too. Outside it
they skip and say so; under ``CI=true`` a libvirt that cannot start fails the run."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dynvm.runtime import Services, build_services

from ..conftest import QUIET, FakeClock

TIMEOUT_SECS = 90  # vm.network.timeout.secs: eight TCG guests booting at once on 2 cores take ~45 s


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI: real guests cannot run: {reason}")
    pytest.skip(reason)


@dataclass
class LibvirtLab:
    lab: Any  # dynvm.libvirt.lab.Lab
    image: Any  # dynvm.libvirt.image.GuestImage

    def connection(self) -> Any:
        import libvirt

        return libvirt.open("qemu:///system")

    def config(
        self, directory: Path, common: str = "", extra: str = "", network: str = "", timeout: float = TIMEOUT_SECS
    ) -> Path:
        """A config of the lab's one host; ``network``: another libvirt network for its guests."""
        section = self.lab.section(1, self.image)
        if network:
            section = section.replace(f"network={self.lab.name}\n", f"network={network}\n")
        path = directory / "dynvmservice.ini"
        path.write_text(
            f"[common]\ncpu.overcommit=8\nvm.network.timeout.secs={timeout:g}\n{common}\n" + section + extra
        )
        return path

    def ours(self) -> tuple[list[str], list[str]]:
        """The names of the domains and clone volumes dynvm made in this lab (any installation)."""
        connection = self.connection()
        try:
            domains = [d.name() for d in connection.listAllDomains(0) if d.name().startswith("dynvm-")]
            pool = connection.storagePoolLookupByName(self.lab.name)
            volumes = [v.name() for v in pool.listAllVolumes(0) if v.name() != self.image.disk.name]
        finally:
            connection.close()
        return sorted(domains), sorted(volumes)

    def clean(self) -> None:
        """Remove every domain and clone volume of the lab: each test starts from none."""
        from dynvm.libvirt import lab

        for path in self.lab.pool_path.iterdir():  # a test may have left one undeletable
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        lab.clear(self.lab, keep=self.image.disk.name)


@pytest.fixture(scope="session")
def libvirt_lab() -> Iterator[LibvirtLab]:
    allowed = os.environ.get("DYNVM_LIBVIRT_TESTS")
    if allowed is None:
        pytest.skip("real guests run inside a network namespace of their own: tests/libvirt/in-netns (make test)")
    if allowed != "1":
        unavailable(allowed)
    try:
        import libvirt  # noqa: F401
    except ImportError:
        unavailable("the libvirt binding is not installed (make install, with Debian's libvirt-dev)")
    from dynvm.libvirt import image, lab
    from dynvm.libvirt.commands import image_dir, libvirtd_elsewhere

    elsewhere = libvirtd_elsewhere()
    if elsewhere is not None:
        unavailable(f"libvirtd (pid {elsewhere}) runs in another network namespace; its guests are out of reach")
    try:
        built = image.build(image_dir())
        directory = Path(tempfile.mkdtemp(prefix="dynvm-libvirt-", dir="/var/tmp"))
        directory.chmod(0o755)  # QEMU runs as its own user
        made = lab.start("dynvm-test", directory, built)
    except (image.ImageError, lab.LabError) as e:
        unavailable(str(e))
    found = LibvirtLab(made, built)
    yield found
    found.clean()
    lab.stop(made)
    subprocess.run(["rm", "-rf", str(directory)], check=False)


@pytest.fixture
def libvirt_services(libvirt_lab: LibvirtLab, tmp_path: Path) -> Iterator[Callable[..., tuple[Services, FakeClock]]]:
    """dynvm's services on the lab's one libvirt host and a SQLite file, on a clock the test
    moves; background loops parked (the test calls reconcile and expiry)."""
    libvirt_lab.clean()
    made: list[Services] = []

    def make(db: str = "dynvm.db", **config: Any) -> tuple[Services, FakeClock]:
        clock = FakeClock(time.time())
        directory = tmp_path / db.removesuffix(".db")
        directory.mkdir(exist_ok=True)
        services = build_services(
            libvirt_lab.config(directory, **config),
            f"sqlite:///{tmp_path / db}",
            clock=clock,
            intervals=QUIET,
            event_timeout=1.0,
        )
        services.start()
        made.append(services)
        return services, clock

    yield make
    for services in made:
        services.stop()
    libvirt_lab.clean()


def ssh(lab: LibvirtLab, address: str, command: str) -> str:
    """Run ``command`` on a guest as root, over its real sshd; its output."""
    done = subprocess.run(
        [
            "ssh",
            "-i",
            str(lab.image.key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            f"root@{address}",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"ssh {address} {command!r} failed: {done.stderr}"
    return done.stdout
