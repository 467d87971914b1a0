"""Input the database cannot hold is refused before it gets there, the same on SQLite and
PostgreSQL: NUL bytes and other control characters in a path or a query value, and values
longer than their column. A hostile client gets a 4xx with a sentence, never a 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from dynvm.api.app import create_app

BAD = [
    ("GET", "/api/v1/leases/%00"),
    ("GET", "/api/v1/requests/%00"),
    ("GET", "/api/v1/dashboard/leases?user=%00"),
    ("GET", "/api/v1/dashboard/leases?user=a%01b"),
    ("GET", "/getservers/u1?os=%00"),
    ("GET", "/getservers/u1?os=" + "c" * 65),
    ("GET", "/getservers/u1?os=centos%0Aevil"),
    ("GET", "/releaseservers/u1?os=%00"),
    ("GET", "/getavailablecount/%00"),
    ("GET", "/showall/%7F"),
    ("GET", "/api/v1/history?user=%00"),
    ("POST", "/api/v1/leases/%00/extend"),
    ("DELETE", "/api/v1/leases/%00"),
    ("DELETE", "/api/v1/requests/%00"),
]


@pytest.fixture(params=["sqlite", "postgres"])
def client(request, make_services):
    db = "bad.db" if request.param == "sqlite" else request.getfixturevalue("fresh_pg")
    services, _ = make_services(db=db)
    with TestClient(create_app(services, manage_services=False)) as client:
        yield client


@pytest.mark.parametrize(("method", "path"), BAD)
def test_input_the_database_cannot_hold_is_refused_with_a_sentence(client, method, path):
    answer = client.request(method, path, json={"expires_in_minutes": 5} if method == "POST" else None)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    if path.startswith("/api/"):
        assert answer.json()["detail"]
    else:
        assert answer.text.startswith("Error: ")
