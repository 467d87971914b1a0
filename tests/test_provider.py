"""The provider seam (``provider.py``) and its plugins (``hosts.py``, ``providers.py``): the
lease engine runs on a second kind of machines with nothing of Xen in the way.
``tests/rack_plugin.py`` is the smallest honest plugin — racks of existing machines, a
``[rackN]`` section each, handed out and given back — written only against dynvm's seams,
as the README says a provider is added. The configuration chooses it by its sections."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynvm import hosts
from dynvm.config import ConfigError, load_settings
from dynvm.engine.service import LeaseService
from dynvm.model import LeaseRequest, NotEnoughCapacity
from dynvm.provider import Provider
from dynvm.providers import Providers
from dynvm.store.db import Database
from dynvm.store.history import HistoryStore
from dynvm.store.leases import LeaseStore

from .conftest import FakeClock
from .rack_plugin import RackPlugin, RackSettings, StaticPool

CONFIG = """
[common]
vm.expiry.minutes=60

; two racks of existing machines: a kind of host of their own, not Xen's
[rack1]
centos.boxes=a1@127.0.10.1, a2@127.0.10.2, a3@127.0.10.3

[rack2]
ubuntu.boxes=b1@127.0.11.1
"""
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def racks():
    hosts.register(RackPlugin())
    yield
    hosts.unregister("rack")


@pytest.fixture
def engine(tmp_path: Path, racks) -> tuple[LeaseService, StaticPool, FakeClock]:
    path = tmp_path / "static.ini"
    path.write_text(CONFIG)
    settings = load_settings(path)
    db = Database(f"sqlite:///{tmp_path / 'static.db'}")
    db.migrate()
    clock = FakeClock()
    providers = Providers(lambda: settings, lambda: "rack-installation")
    providers.apply(settings)
    pool = providers.part("rack")
    assert isinstance(pool, StaticPool)
    service = LeaseService(lambda: settings, providers, LeaseStore(db), HistoryStore(db, None, clock), clock=clock)
    yield service, pool, clock
    service.shutdown(grace=1)
    db.close()


def test_the_config_chooses_the_kind_by_its_sections(tmp_path: Path, racks):
    path = tmp_path / "static.ini"
    path.write_text(CONFIG)
    settings = load_settings(path)
    assert [type(host) for host in settings.hosts] == [RackSettings, RackSettings]
    assert settings.hosts[0].boxes == (
        ("centos", "a1", "127.0.10.1"),
        ("centos", "a2", "127.0.10.2"),
        ("centos", "a3", "127.0.10.3"),
    )
    assert settings.os_keys == ["centos", "ubuntu"]
    path.write_text(
        CONFIG + "\n[xenhost2]\nhost.name=h\nhost.user=u\nhost.password=p\nhost.storage.name=s\ncentos.template=t\n"
    )
    with pytest.raises(ConfigError, match=r"\[rack2\] and \[xenhost2\] share the number 2"):
        load_settings(path)  # a host's number is its ref in the API, whatever its kind
    hosts.unregister("rack")
    path.write_text(CONFIG)
    assert any("[rack1]: unknown section" in warning for warning in load_settings(path).warnings)


def test_an_engine_on_racks_never_loads_xen(tmp_path: Path):
    """In a fresh interpreter: the config names only racks, so nothing of Xen is imported."""
    script = f"""
import sys
from pathlib import Path
from dynvm import hosts
from dynvm.config import load_settings
from dynvm.engine.service import LeaseService
from dynvm.model import LeaseRequest
from dynvm.providers import Providers
from dynvm.store.db import Database
from dynvm.store.history import HistoryStore
from dynvm.store.leases import LeaseStore
from tests.rack_plugin import RackPlugin

hosts.register(RackPlugin())
path = Path({str(tmp_path / "racks.ini")!r})
path.write_text({CONFIG!r})
settings = load_settings(path)
db = Database("sqlite:///" + str(path.with_suffix(".db")))
db.migrate()
providers = Providers(lambda: settings, lambda: "rack-installation")
providers.apply(settings)
engine = LeaseService(lambda: settings, providers, LeaseStore(db), HistoryStore(db, None))
leases = engine.acquire(LeaseRequest("dave", "centos", 2))
assert sorted(lease.ip for lease in leases) == ["127.0.10.1", "127.0.10.2"], leases
assert engine.release("dave", 2).released == ["dave1", "dave2"]
engine.shutdown(grace=1)
xen = sorted(name for name in sys.modules if name.startswith("dynvm.xen") or name == "XenAPI")
assert xen == [], xen
print("no xen")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "no xen"


def test_a_static_pool_has_every_method_of_the_provider_protocol():
    methods = [name for name, value in vars(Provider).items() if callable(value) and not name.startswith("_")]
    assert len(methods) >= 15
    assert [name for name in methods if not callable(getattr(StaticPool, name, None))] == []


def test_the_engine_leases_counts_and_releases_machines_of_another_provider(engine):
    service, pool, _ = engine
    assert service.available_count("centos") == 3
    leases = service.acquire(LeaseRequest("alice", "centos", 3))
    assert sorted(lease.ip for lease in leases) == ["127.0.10.1", "127.0.10.2", "127.0.10.3"]
    assert service.available_count("centos") == 0
    assert service.available_count("ubuntu") == 1  # the ubuntu rack is untouched
    with pytest.raises(NotEnoughCapacity):
        service.acquire(LeaseRequest("bob", "centos", 1))
    names = [m.name for machines in service.machines("centos").values() for m in machines]
    assert sorted(names) == ["alice1", "alice2", "alice3"]
    outcome = service.release("alice", 3)
    assert sorted(outcome.released) == ["alice1", "alice2", "alice3"]
    assert sorted(pool.given_back) == ["a1", "a2", "a3"]
    assert service.available_count("centos") == 3


def test_expiry_and_reconcile_work_through_the_seam(engine):
    service, pool, clock = engine
    [lease] = service.acquire(LeaseRequest("carol", "ubuntu", 1))
    clock.advance(61 * 60)
    assert service.expire_due() == ["carol"]
    assert pool.given_back == ["b1"]
    # a box still marked for a lease that ended (its give-back was lost): reconcile collects it
    box = pool.boxes["2"][0]
    box.lease_id = lease.id
    report = service.reconcile()
    assert report.orphans_destroyed == ["b1"]
    assert box.lease_id is None
