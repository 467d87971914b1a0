"""The dashboard's JSON (``/api/v1/dashboard/...``) and its page, over real HTTP on a
simulated lab and a real SQLite file."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from dynvm.model import LeaseRequest

from ..api.conftest import RunningService
from ..conftest import FakeClock


@pytest.fixture
def service(make_services) -> Iterator[Callable[..., RunningService]]:
    running: list[RunningService] = []

    def start(**options: object) -> RunningService:
        services, lab = make_services(**options)
        running.append(RunningService(services, lab))
        return running[-1]

    yield start
    for one in running:
        one.stop()


def test_the_page_and_its_files_are_served_without_anything_from_outside(service):
    running = service()
    for path in ("/", "/ui"):
        page = running.get(path)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "http://" not in page.text
        assert "https://" not in page.text
    for asset in ("dashboard.js", "dashboard.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"):
        assert running.get(f"/ui/static/{asset}").status_code == 200, asset


def test_leases_page_filter_and_say_where_each_came_from(service):
    running = service(hosts=2)
    engine = running.services.engine
    engine.acquire(LeaseRequest("alpha", "centos", count=3))
    engine.acquire(LeaseRequest("beta", "windows"))
    first = running.get("/api/v1/dashboard/leases", limit=2).json()
    assert (first["total"], len(first["items"]), first["oses"]) == (4, 2, ["centos", "windows"])
    assert first["items"][0]["from_pool"] is False
    rest = running.get("/api/v1/dashboard/leases", limit=2, offset=2).json()
    names = {item["name"] for item in first["items"] + rest["items"]}
    assert names == {"alpha1", "alpha2", "alpha3", "beta"}
    assert [i["name"] for i in running.get("/api/v1/dashboard/leases", user="ALP", os="centos").json()["items"]] == [
        "alpha1",
        "alpha2",
        "alpha3",
    ]
    assert running.get("/api/v1/dashboard/leases", user="%").json()["total"] == 0  # a wildcard is a character


def test_the_overview_counts_dynvm_others_and_free_per_host(service):
    running = service(hosts=1, foreign_vms=2)
    running.services.engine.acquire(LeaseRequest("gamma", "centos", count=2))
    answer = running.get("/api/v1/dashboard/overview")
    assert answer.headers["server-timing"].startswith("app;dur=")
    found = answer.json()
    [host] = found["hosts"]
    assert host["up"]
    assert host["state"] == "up"
    assert host["dynvm"]["vms"] == 2
    assert host["dynvm"]["vcpus"] > 0
    assert host["others"]["vms"] == 2  # the lab's own VMs, not dynvm's
    assert host["memory_free"] < host["memory_total"]
    assert found["summary"] == {"hosts": 1, "hosts_up": 1, "leased": 2, "ready": 0, "refilling": 0}
    assert found["auth"] == {"required": False, "user": None, "admin": False}


def test_the_plots_data_comes_from_the_history_and_the_requests(service):
    running = service(hosts=1)
    engine = running.services.engine
    engine.acquire(LeaseRequest("delta", "centos", count=2))
    engine.release_names(["delta1"])
    usage = running.get("/api/v1/dashboard/usage", span="24h").json()
    assert usage["series"]["centos"][-1] == 1  # delta2 is still in use
    timings = running.get("/api/v1/dashboard/timings").json()
    assert timings["time_to_vm"]["centos"]["n"] == 1  # one request
    assert timings["create"]["centos"]["n"] == 2  # two VMs made
    users = running.get("/api/v1/dashboard/users").json()
    assert [u["user"] for u in users] == ["delta"]
    assert running.get("/api/v1/dashboard/failures").json() == []
    assert running.get("/api/v1/dashboard/usage", span="1y").status_code == 422


def test_a_ready_pool_vm_counts_from_its_hand_out_not_from_when_it_was_made(make_services, sim_lab):
    from ..engine.test_ready_pools import fill, with_pools

    clock = FakeClock()
    services, lab = make_services(lab=with_pools(sim_lab, "centos.ready=1"), clock=clock)
    fill(services, ready=1)  # the pool's VM is made now
    clock.advance(3600)  # and waits an hour (a ready VM is kept two)
    running = RunningService(services, lab)
    try:
        services.engine.acquire(LeaseRequest("warm", "centos"))
        [item] = running.get("/api/v1/dashboard/leases").json()["items"]
        assert item["from_pool"] is True
        assert item["handed_out_at"] == pytest.approx(clock(), abs=1)
        assert item["created_at"] < clock() - 3600 + 60
        [(_, _, start, lived, _)] = [row for row in services.history.lifetimes(0) if row[0] == "warm"]
        assert start == pytest.approx(clock(), abs=1)  # in use from the hand-out
        assert lived is None  # and still held
        clock.advance(360)  # held six minutes
        [top] = running.get("/api/v1/dashboard/users").json()
        assert (top["user"], top["vm_hours"]) == ("warm", 0.1)  # not the hour it waited in the pool
        assert running.get("/api/v1/stats").json()["per_user"]["warm"]["vm_hours"] == 0.1  # one definition
    finally:
        running.stop()


def test_the_user_filter_takes_wildcards_as_characters(service):
    running = service(hosts=1)
    running.services.engine.acquire(LeaseRequest("a_b", "centos"))
    running.services.engine.acquire(LeaseRequest("axb", "centos"))
    assert [i["name"] for i in running.get("/api/v1/dashboard/leases", user="a_b").json()["items"]] == ["a_b"]


def test_the_vms_of_one_request_are_listed_in_number_order(service):
    running = service(hosts=2)
    running.services.engine.acquire(LeaseRequest("fill", "centos", count=12))
    names = [i["name"] for i in running.get("/api/v1/dashboard/leases").json()["items"]]
    assert names == [f"fill{n}" for n in range(1, 13)]  # not fill1, fill10, fill11, fill12, fill2
    page = running.get("/api/v1/dashboard/leases", limit=5, offset=5).json()["items"]
    assert [i["name"] for i in page] == ["fill6", "fill7", "fill8", "fill9", "fill10"]
