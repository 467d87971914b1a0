"""A copy of the database started as a second dynvm (a staging copy), on SQLite and
PostgreSQL: it carries production's installation id, so it must touch nothing until
``dynvm installation new`` makes it an installation of its own."""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynvm.cli import build_cli
from dynvm.engine.claim import Contested
from dynvm.model import LeaseRequest
from dynvm.runtime import build_services
from dynvm.xen.marker import MARKER_KEY

from ..conftest import QUIET, FakeClock
from .conftest import ADMIN_URL, Backup
from .test_restore import vms


@pytest.fixture
def copy_url(db_url: str, tmp_path: Path):
    """Where the copy goes: another SQLite file, or another PostgreSQL database."""
    if db_url.startswith("sqlite:///"):
        yield f"sqlite:///{tmp_path / 'copy.db'}"
        return
    import psycopg

    name = f"dynvm_copy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield db_url.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def copy_database(source: str, target: str, folder: Path) -> None:
    backup = Backup(source, folder)
    backup.take()
    if source.startswith("sqlite:///"):
        shutil.copyfile(backup.file, target.removeprefix("sqlite:///"))
    else:
        Backup(target, folder).restore()  # the dump of the source, into the target


def test_a_copy_started_beside_production_touches_nothing_until_it_is_a_new_installation(
    copy_url, make_services, sim_lab, db_url, tmp_path
):  # copy_url first: its database is dropped only once every dynvm on it has stopped
    lab = sim_lab()
    production, _ = make_services(lab=lab, db=db_url)
    production.engine.acquire(LeaseRequest("prod", "centos"))
    copy_database(db_url, copy_url, tmp_path)
    production.engine.claim.renew()  # its leader renews the claim every 20 s

    # a staging dynvm runs elsewhere, under a replica name of its own
    copy = build_services(lab.settings.source, copy_url, intervals=QUIET, event_timeout=1.0, replica="staging:5000")
    try:
        with pytest.raises(Contested, match="dynvm installation new"):
            copy.start()
        outcome = copy.engine.release("prod")  # what the copy's /releaseservers/prod would do
        assert outcome.released == []
        assert "prod" in outcome.failed
        with pytest.raises(Contested):
            copy.engine.acquire(LeaseRequest("staging", "centos"))
        assert copy.engine.reconcile().orphans_destroyed == []
    finally:
        copy.stop()
    assert vms(lab)["prod"]["power_state"] == "Running"  # production's VM, untouched
    production.engine.claim.renew()  # production goes on: nothing contests it

    runner = CliRunner()
    # --force: the copy, seconds old, still carries production's heartbeat
    result = runner.invoke(build_cli(), ["installation", "new", "--db", copy_url, "--yes", "--force"])
    assert result.exit_code == 0, result.output
    staging, _ = make_services(lab=lab, db=copy_url)  # now an installation of its own
    assert staging.engine.installation != production.engine.installation
    [own] = staging.engine.acquire(LeaseRequest("staging", "centos"))
    assert staging.engine.reconcile().orphans_destroyed == []
    assert production.engine.reconcile().orphans_destroyed == []
    on_host = vms(lab)
    assert on_host["prod"]["power_state"] == "Running"
    assert on_host["staging"]["power_state"] == "Running"
    assert production.engine.release("prod").released == ["prod"]
    assert staging.engine.release("staging").released == ["staging"]
    assert own.ip


def test_installation_new_refuses_while_a_dynvm_runs_on_the_database(make_services, sim_lab, db_url):
    make_services(lab=sim_lab(), db=db_url)
    result = CliRunner().invoke(build_cli(), ["installation", "new", "--db", db_url, "--yes"])
    assert result.exit_code == 1
    assert "a dynvm is running on this database" in result.output


def test_a_copy_started_before_production_renewed_its_claim_waits_and_finds_out(
    copy_url, make_services, sim_lab, db_url, tmp_path
):
    """The copy carries the very claim the hosts have (production has not renewed since
    the dump): it waits for the claim's writer to renew, and refuses when it does."""
    clock = FakeClock()
    production, lab = make_services(lab=sim_lab(), db=db_url, clock=clock)
    copy_database(db_url, copy_url, tmp_path)
    clock.advance(15)  # production's heartbeat in the copy is stale; its claim is not
    copy = build_services(
        lab.settings.source, copy_url, clock=clock, intervals=QUIET, event_timeout=1.0, replica="staging:5000"
    )
    renewal = threading.Timer(1.0, production.engine.claim.renew)  # production's next renewal
    renewal.start()
    try:
        with pytest.raises(Contested, match="COPY's database"):
            copy.start()
    finally:
        renewal.join()
        copy.stop()
    assert [name for name, r in vms(lab).items() if MARKER_KEY in r["other_config"]] == []  # it made nothing


def test_a_running_dynvm_that_finds_another_acting_for_it_stops_acting_and_says_so(make_services, sim_lab, db_url):
    """Found out after start-up (a follower, or a later renewal): it touches no host, and
    /healthz answers 503 so that a load balancer takes it out."""
    from fastapi.testclient import TestClient

    from dynvm.api.app import create_app
    from dynvm.engine.claim import Claim
    from dynvm.xen.marker import claim_key

    services, lab = make_services(lab=sim_lab(), db=db_url)
    seq, _ = services.engine.installation_store.claim_mark()
    xapi = lab.xapi()
    [pool] = xapi.pool.get_all()
    key = claim_key(services.engine.installation)
    xapi.pool.remove_from_other_config(pool, key)  # another database's dynvm renews its claim
    xapi.pool.add_to_other_config(
        pool, key, Claim(seq + 1, "f" * 32, "elsewhere:5000#1", services.engine.clock()).dump()
    )
    services._renew_claim()
    client = TestClient(create_app(services, manage_services=False))
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert "elsewhere:5000#1" in answer.text
    assert client.get("/healthz", params={"detail": "true"}).json()["status"] == "contested"
    assert client.get("/getservers/u1").status_code == 503
    assert services.engine.expire_due() == []
