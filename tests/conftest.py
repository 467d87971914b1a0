"""Fixtures shared by every test package."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import XenAPI

from dynvm.config import Settings, load_settings
from dynvm.runtime import Intervals, Services, build_services
from dynvm.sim.control import SimControlClient
from dynvm.sim.lab import Lab, LabOptions
from dynvm.sim.settings import Timing

REPO = Path(__file__).resolve().parents[1]
RUN_ID = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # one id for the whole run, handed to xdist workers so their reports can be matched to it
    run = os.environ.setdefault("DYNVM_TEST_RUN", f"{os.getpid()}-{time.time():.0f}")
    config.stash[RUN_ID] = run


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    """How much of xapi the simulator serves, per class (written by tests/sim/test_schema.py)."""
    coverage = config.cache.get("dynvm/xapi-coverage", None) if config.cache else None
    if not coverage or coverage.get("run") != config.stash[RUN_ID]:
        return
    terminalreporter.section("xapi messages dynvm sim serves, per class")
    for cls, mine, published, mine_explicit, explicit in coverage["rows"]:
        terminalreporter.write_line(
            f"{cls:<18} {mine:>4} of {published:<4} messages ({mine_explicit} of {explicit} explicit, rest accessors)"
        )


def shared_dir() -> Path:
    """``../shared`` beside the checkout (CI has it there); ``DYNVM_SHARED`` overrides."""
    return Path(os.environ.get("DYNVM_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def xenapi_model() -> dict[str, dict]:
    """xapi's published data model, by class name. Never copied into the project."""
    path = shared_dir() / "xapi" / "xenapi.json"
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must have ../shared/xapi/xenapi.json beside the checkout")
        pytest.skip(f"{path} not found (set DYNVM_SHARED to the shared/ folder)")
    return {c["name"]: c for c in json.loads(path.read_text())}


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


class SimLab:
    """A running lab, the dynvm settings that point at it, and ways to look inside."""

    def __init__(self, lab: Lab, settings: Settings) -> None:
        self.lab = lab
        self.settings = settings

    def host(self, index: int = 0):
        return self.settings.hosts[index]

    def xapi(self, index: int = 0):
        """A session of the test's own, to check what is really on the host: logged in at
        whichever member of the pool is master now (a test may move the master)."""
        host = self.settings.hosts[index]
        scheme, _, rest = host.url.partition("://")
        port = rest.rsplit(":", 1)[1]
        urls = [host.url] + [f"{scheme}://127.0.0.{n}:{port}" for n in range(1, self.lab.options.pool_size + 1)]
        error: Exception | None = None
        for url in dict.fromkeys(urls):
            session = XenAPI.Session(url)
            try:
                session.xenapi.login_with_password(host.user, host.password.reveal(), "2.21", "test-observer")
            except (XenAPI.Failure, OSError) as e:  # a member (HOST_IS_SLAVE), or one that is down
                error = e
                continue
            return session.xenapi
        raise AssertionError(f"no member of {host.section}'s pool answers as master: {error}")

    def control(self, index: int = 0) -> SimControlClient:
        return SimControlClient(self.lab.control_endpoint.url + "/", self.lab.nodes[index].host.spec.password)

    def inventory_of(self, index: int = 0) -> tuple[set[str], set[str]]:
        """(VM refs, VDI refs) on the host: compare before and after to find leftovers."""
        xapi = self.xapi(index)
        return set(xapi.VM.get_all()), set(xapi.VDI.get_all())


@pytest.fixture
def sim_lab(make_lab: Callable[..., Lab], tmp_path: Path) -> Callable[..., SimLab]:
    def make(network_timeout: float | None = None, **options: object) -> SimLab:
        lab = make_lab(**options)
        path = tmp_path / f"lab{len(list(tmp_path.glob('lab*.ini')))}.ini"
        lab.write_config(path)
        if network_timeout is not None:
            text = path.read_text().replace("vm.network.timeout.secs=400", f"vm.network.timeout.secs={network_timeout}")
            path.write_text(text)
        return SimLab(lab, load_settings(path))

    return make


class FakeClock:
    """Unix time that moves only when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


QUIET = Intervals(reap=3600, reconcile=3600, export=3600, pools=3600, sync_wait=10, shutdown_grace=5)


@pytest.fixture
def make_services(sim_lab: Callable[..., SimLab], tmp_path: Path):
    """dynvm's services (no HTTP) on a simulated lab and a SQLite file. Background loops
    are parked (QUIET): tests call the reaper and reconcile themselves."""
    made: list[Services] = []

    def make(
        lab: SimLab | None = None,
        clock: Callable[[], float] = time.time,
        intervals: Intervals = QUIET,
        db: str = "dynvm.db",
        replica: str | None = None,
        **lab_options: object,
    ) -> tuple[Services, SimLab]:
        lab = lab or sim_lab(**lab_options)
        url = db if "://" in db else f"sqlite:///{tmp_path / db}"  # a file name, or a full URL
        services = build_services(
            lab.settings.source,
            url,
            clock=clock,
            intervals=intervals,
            event_timeout=1.0,
            replica=replica,
        )
        services.start()
        made.append(services)
        return services, lab

    yield make
    for services in made:
        services.stop()
