"""PostgreSQL going away under a running service: clear 503 answers, then back to work."""

from __future__ import annotations

import pytest

from dynvm.api.errors import DATABASE_DOWN

from ..api.conftest import RunningService
from ..sim.simtools import wait_for
from .conftest import ADMIN_URL

psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed: pip install -e '.[postgres]'")


def set_connections(database: str, allowed: bool) -> None:
    """Refuse (and cut) every connection to the database, or allow them again."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))


@pytest.fixture
def service(make_services, fresh_pg):  # type: ignore[no-untyped-def]
    services, lab = make_services(db=fresh_pg)
    running = RunningService(services, lab)
    yield running
    set_connections(fresh_pg.rsplit("/", 1)[1], True)
    running.stop()


def test_a_database_outage_answers_503_and_the_service_recovers(service):
    database = service.services.db.url.rsplit("/", 1)[1]
    assert service.get("/getavailablecount").text == "8"
    set_connections(database, False)
    try:
        legacy = service.get("/getservers/blocked")
        assert legacy.status_code == 503
        assert legacy.text == f"Error: {DATABASE_DOWN}\n"
        v1 = service.http.get("/api/v1/leases")
        assert v1.status_code == 503
        assert v1.json()["detail"].startswith("dynvm's database does not answer")
        assert "postgres" not in legacy.text + v1.text  # no connection details leak to callers
    finally:
        set_connections(database, True)
    wait_for(lambda: service.get("/getavailablecount").text == "8", timeout=15)
    answer = service.get("/getservers/after")
    assert answer.status_code == 200, answer.text
    assert service.get("/getavailablecount").text == "7"
