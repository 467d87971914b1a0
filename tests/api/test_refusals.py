"""A request refused at once never started: it is counted and logged, not stored (anyone
could otherwise grow the database with typos, issue 24), and the failures panel shows
failed creates only. A request that did start is stored with the API it came through."""

from __future__ import annotations

from sqlalchemy import select

from dynvm.store.tables import requests


def rows(services) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    with services.db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(select(requests))]


def refused_count(service, reason: str) -> float:  # type: ignore[no-untyped-def]
    for line in service.get("/metrics").text.splitlines():
        if line.startswith(f'dynvm_requests_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_refusals_are_counted_not_stored(serve):
    service = serve(host_cpus=8)  # 2 CentOS VMs of 4 vCPUs at most
    assert service.get("/getservers/typo", os="centoss").status_code == 400  # unknown OS
    assert service.get("/getservers/many", os="centos", count=5).status_code == 429  # no room
    assert service.http.post("/api/v1/leases", json={"os": "nope", "name": "x"}).status_code == 400
    made = service.get("/getservers/held", os="centos")
    assert made.status_code == 200
    assert service.get("/getservers/held", os="centos").status_code == 409  # the name is taken
    stored = rows(service.services)
    assert [(r["username"], r["origin"], r["state"]) for r in stored] == [("held", "legacy", "ready")]
    assert refused_count(service, "UnknownOs") == 2
    assert refused_count(service, "NotEnoughCapacity") == 1
    assert refused_count(service, "NameInUse") == 1
    assert service.get("/api/v1/dashboard/failures").json() == []  # no typo is a failure


def test_a_request_through_v1_is_stored_as_v1(serve):
    service = serve()
    answer = service.http.post("/api/v1/leases", params={"wait": "true"}, json={"os": "centos", "name": "viav1"})
    assert answer.status_code in (200, 201), answer.text
    assert [r["origin"] for r in rows(service.services)] == ["v1"]
