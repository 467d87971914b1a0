"""The JSON API over real HTTP: async leases with progress, ownership, auth, quotas,
problem details, history and stats."""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dynvm.states import Actor

from ..sim.simtools import wait_for

GiB = 1024**3


def with_config(sim_lab, extra: str, **options):  # type: ignore[no-untyped-def]
    lab = sim_lab(**options)
    lab.settings.source.write_text(lab.settings.source.read_text() + "\n" + extra + "\n")
    return lab


def problem(answer) -> dict:  # type: ignore[no-untyped-def]
    assert answer.headers["content-type"].startswith("application/problem+json"), answer.text
    body = answer.json()
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == answer.status_code
    return body


def test_a_lease_request_is_accepted_then_followed_to_ready(serve):
    service = serve(hosts=2)
    answer = service.http.post("/api/v1/leases", json={"os": "centos", "name": "ci", "count": 2})
    assert answer.status_code == 202
    location = answer.headers["location"]
    assert location.startswith("/api/v1/requests/")
    assert answer.json()["state"] == "creating"
    done = service.http.get(location, params={"wait": "true", "timeout": 60}).json()
    assert done["state"] == "ready"
    assert sorted(vm["name"] for vm in done["vms"]) == ["ci1", "ci2"]
    assert all(vm["stage"] == "ready" and vm["ip"].startswith("127.77.") for vm in done["vms"])
    leases = service.http.get("/api/v1/leases").json()
    assert sorted(lease["name"] for lease in leases) == ["ci1", "ci2"]
    one = service.http.get("/api/v1/leases/ci1").json()
    assert (one["state"], one["os"], one["cpus"]) == ("ready", "centos", 4)
    assert service.http.delete("/api/v1/leases/ci1").json() == {"released": ["ci1"]}
    assert problem(service.http.get("/api/v1/leases/ci1"))["status"] == 404


def test_wait_true_answers_with_the_finished_request(serve):
    service = serve()
    answer = service.http.post(
        "/api/v1/leases", params={"wait": "true"}, json={"os": "windows", "name": "win", "cpus": 2, "memory": 4 * GiB}
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["state"] == "ready"
    assert body["vms"][0]["name"] == "win"
    lease = service.http.get("/api/v1/leases/win").json()
    assert (lease["cpus"], lease["memory"]) == (2, 4 * GiB)


def test_waiting_clients_hold_no_worker_so_other_routes_still_answer(serve):
    from dynvm.runtime import Intervals
    from dynvm.sim.settings import Timing

    service = serve(
        timing=Timing(boot_seconds=3600),  # the VM never boots: the request ends when dynvm stops
        intervals=Intervals(reap=3600, reconcile=3600, export=3600, sync_wait=10, shutdown_grace=0.1),
    )
    location = service.http.post("/api/v1/leases", json={"os": "centos", "name": "stuck"}).headers["location"]
    with ThreadPoolExecutor(80) as pool:  # twice the threads the server lends to blocking handlers
        waiting = [pool.submit(service.http.get, location, params={"wait": "true"}) for _ in range(80)]
        wait_for(lambda: len(service.server.server_state.tasks) >= 80, timeout=30)  # all 80 are being served
        assert service.get("/getavailablecount").status_code == 200
        assert service.http.get("/api/v1/hosts").status_code == 200
        assert [f for f in waiting if f.done()] == []
        service.services.stop()  # the create is cancelled; every waiter gets the outcome
        answers = [f.result() for f in waiting]
    assert {a.json()["state"] for a in answers} == {"failed"}


def test_a_wait_that_times_out_answers_with_the_request_still_under_way(tmp_path):
    from dynvm.engine.tracker import DurableTracker
    from dynvm.store.db import Database
    from dynvm.store.requests import RequestStore

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.migrate()
    store = RequestStore(db)
    tracker = DurableTracker(store, "me")
    tracker.start(tracker.started("r1", "alice", "centos", 1))
    assert asyncio.run(store.wait_finished("r1", timeout=0.01)).state == "creating"
    assert asyncio.run(store.wait_finished("gone", timeout=0.01)) is None
    tracker.finish("r1", Actor.BUILDER)
    assert asyncio.run(store.wait_finished("r1", timeout=60)).state == "ready"
    db.close()


def test_progress_shows_the_stages_of_a_slow_create(serve):
    from dynvm.sim.settings import Timing

    service = serve(timing=Timing(clone_seconds=0.01, boot_seconds=1.5, ip_seconds=0.1))
    location = service.http.post("/api/v1/leases", json={"os": "centos", "name": "slow"}).headers["location"]
    seen = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = service.http.get(location).json()
        seen.add(status["vms"][0]["stage"] if status["vms"] else "reserved")
        if status["state"] not in ("queued", "creating"):
            break
        time.sleep(0.05)
    assert "waiting for IP" in seen or "booting" in seen
    assert status["state"] == "ready"


def test_extend_is_capped_at_the_maximum(serve):
    service = serve()
    service.http.post(
        "/api/v1/leases", params={"wait": "true"}, json={"os": "centos", "name": "ext", "expires_in_minutes": 5}
    )
    before = service.http.get("/api/v1/leases/ext").json()["expires_at"]
    after = service.http.patch("/api/v1/leases/ext", json={"expires_in_minutes": 10**6}).json()["expires_at"]
    assert after > before
    assert after <= time.time() + 720 * 60 + 5


def test_errors_are_problem_details(serve):
    service = serve()
    unknown = problem(service.http.post("/api/v1/leases", params={"wait": "true"}, json={"os": "rhel9", "name": "x"}))
    assert unknown["status"] == 400
    assert "the OSes that exist are" in unknown["detail"]
    invalid = problem(service.http.post("/api/v1/leases", json={"os": "centos", "name": "bad name!", "count": 0}))
    assert invalid["status"] == 422
    assert "name" in invalid["detail"]
    assert "count" in invalid["detail"]
    missing = problem(service.http.get("/api/v1/requests/nope"))
    assert missing["status"] == 404


def test_hosts_vms_and_capacity(serve):
    service = serve(hosts=2, foreign_vms=1)
    hosts = service.http.get("/api/v1/hosts").json()
    assert [h["ref"] for h in hosts] == ["1", "2"]
    assert hosts[0]["state"] == "up"
    assert hosts[0]["capacity"]["centos"] == 7
    assert hosts[0]["capacity"]["windows"] == 4
    assert service.http.get("/api/v1/capacity").json()["centos"] == 14
    vms = service.http.get("/api/v1/vms").json()
    assert len(vms) == 2
    assert all(not vm["dynvm"] and vm["ips"] for vm in vms)


def test_history_and_stats(serve):
    service = serve()
    service.http.post("/api/v1/leases", params={"wait": "true"}, json={"os": "centos", "name": "hist", "count": 2})
    service.http.delete("/api/v1/leases/hist1")
    everything = service.http.get("/api/v1/history").json()
    assert everything["total"] == 2
    deleted = service.http.get("/api/v1/history", params={"state": "deleted"}).json()
    assert [item["name"] for item in deleted["items"]] == ["hist1"]
    page = service.http.get("/api/v1/history", params={"limit": 1, "offset": 1}).json()
    assert (page["total"], len(page["items"])) == (2, 1)
    assert service.http.get("/api/v1/history", params={"user": "nobody"}).json()["total"] == 0
    stats = service.http.get("/api/v1/stats").json()
    assert stats["per_os"]["centos"]["vms_created"] == 2
    assert stats["per_os"]["centos"]["mean_lifetime_secs"] is not None
    assert stats["per_user"]["hist"]["vms_created"] == 2


def test_ownership_with_tokens(make_services, sim_lab):
    from .conftest import RunningService

    services, lab = make_services()
    service = RunningService(services, lab)
    try:
        alice = {"Authorization": f"Bearer {services.tokens.create('alice')}"}
        bob = {"Authorization": f"Bearer {services.tokens.create('bob')}"}
        admin = {"Authorization": f"Bearer {services.tokens.create('ops', admin=True)}"}
        service.http.post("/api/v1/leases", params={"wait": "true"}, headers=alice, json={"os": "centos", "name": "a"})
        assert service.http.get("/api/v1/leases/a").json()["caller"] == "alice"
        assert problem(service.http.delete("/api/v1/leases/a", headers=bob))["status"] == 403
        assert (
            problem(service.http.patch("/api/v1/leases/a", headers=bob, json={"expires_in_minutes": 5}))["status"]
            == 403
        )
        assert service.get("/releaseservers/a").status_code == 403  # anonymous legacy callers too
        assert service.http.patch("/api/v1/leases/a", headers=admin, json={"expires_in_minutes": 5}).status_code == 200
        assert service.http.delete("/api/v1/leases/a", headers=alice).json() == {"released": ["a"]}
        bad = problem(service.http.get("/api/v1/leases", headers={"Authorization": "Bearer dvm_wrong"}))
        assert bad["status"] == 401
    finally:
        service.stop()


def test_required_auth_guards_every_route_but_healthz(make_services, sim_lab):
    from .conftest import RunningService

    lab = with_config(sim_lab, "[auth]\nrequired=true")
    services, _ = make_services(lab=lab)
    service = RunningService(services, lab)
    try:
        assert service.get("/healthz").text == "ok"
        legacy = service.get("/getavailablecount")
        assert legacy.status_code == 401
        assert legacy.text.startswith("Error: this dynvm needs a token")
        assert problem(service.http.get("/api/v1/capacity"))["status"] == 401
        token = services.tokens.create("carol")
        assert service.http.get("/getavailablecount", headers={"Authorization": f"Bearer {token}"}).text == "8"
        # the API's description stays readable without a token, as the README says (and why):
        # it is the same for every dynvm, holds no data, and /docs can act only with a token
        for public in ("/openapi.json", "/docs"):
            assert service.get(public).status_code == 200, public
        assert problem(service.http.get("/api/v1/quarantine"))["status"] == 401
    finally:
        service.stop()


def test_quotas(make_services, sim_lab):
    from .conftest import RunningService

    lab = with_config(sim_lab, "[quota]\nmax.count.per.request=3\nvms.per.user=2\nmemory.gib.per.user=12")
    services, _ = make_services(lab=lab)
    service = RunningService(services, lab)
    try:
        too_many = problem(
            service.http.post("/api/v1/leases", params={"wait": "true"}, json={"os": "centos", "name": "q", "count": 4})
        )
        assert too_many["status"] == 429
        assert "max.count.per.request" in too_many["detail"]
        assert (
            service.http.post(
                "/api/v1/leases", params={"wait": "true"}, json={"os": "centos", "name": "q", "count": 2}
            ).status_code
            == 200
        )
        third = service.get("/getservers/q", count=1)  # anonymous legacy callers count by the VMs' user
        assert third.status_code == 429
        assert third.text.startswith("Error: q holds 2 VM(s); 1 more would pass the limit of 2")
        bob = {"Authorization": f"Bearer {services.tokens.create('bob')}"}
        first = service.http.post(
            "/api/v1/leases",
            params={"wait": "true"},
            headers=bob,
            json={"os": "windows", "name": "b1", "memory": 8 * GiB},
        )
        assert first.status_code == 200
        second = problem(
            service.http.post(
                "/api/v1/leases",
                params={"wait": "true"},
                headers=bob,
                json={"os": "windows", "name": "b2", "memory": 8 * GiB},
            )
        )
        assert second["status"] == 429  # bob's 8 GiB + 8 GiB would pass 12 GiB
        assert "bob holds 8 GiB of VM memory" in second["detail"]
        assert "memory.gib.per.user" in second["detail"]
    finally:
        service.stop()


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
def test_the_api_describes_itself(serve, path):
    assert serve().http.get(path).status_code == 200


def test_metrics_report_requests_vms_capacity_hosts_and_provisioning(serve):
    service = serve()
    service.get("/getservers/m", count=2)
    service.get("/getavailablecount")
    text = service.http.get("/metrics").text
    assert 'dynvm_http_requests_total{route="/getservers/{username}",status="200"} 1.0' in text
    assert 'dynvm_vms{host="1",os="centos",state="ready"} 2.0' in text
    assert 'dynvm_host_up{host="1"} 1.0' in text
    assert 'dynvm_capacity{os="centos"} 6.0' in text
    assert "dynvm_provision_seconds_count 2.0" in text
    service.get("/releaseservers/m", count=2)
    assert 'dynvm_leases_ended_total{state="released"} 2.0' in service.http.get("/metrics").text


def test_an_unknown_os_is_refused_at_once_and_a_shortage_is_not_called_a_quota(serve):
    service = serve()
    unknown = service.http.post("/api/v1/leases", json={"os": "rhel9", "name": "nope"})
    assert unknown.status_code == 400
    assert "the OSes that exist are" in problem(unknown)["detail"]
    full = problem(service.http.post("/api/v1/leases?wait=true", json={"os": "centos", "name": "lots", "count": 40}))
    assert (full["status"], full["title"]) == (429, "Not enough capacity")


def test_the_api_docs_are_served_whole_by_dynvm_for_air_gapped_labs(serve):
    service = serve()
    page = service.get("/docs")
    assert page.status_code == 200
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "/docs/assets/swagger-ui.css" in page.text
    external = [url for url in re.findall(r"""(?:src|href)=['"]([^'"]+)""", page.text) if "://" in url]
    assert external == [], f"the docs page loads from outside dynvm: {external}"
    assert '"validatorUrl": null' in page.text  # nor does Swagger UI ask swagger.io to validate
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        answer = service.get(f"/docs/assets/{asset}")
        assert answer.status_code == 200
        assert len(answer.content) > 100_000
    assert service.get("/redoc").status_code == 404  # its page needs a CDN: not served


def test_a_request_that_may_not_wait_is_refused_when_it_does_not_fit_not_accepted_then_failed(serve):
    service = serve()
    full = service.http.post("/api/v1/leases", json={"os": "centos", "name": "lots", "count": 40})
    assert full.status_code == 429  # at once, as getservers answers: no 202 for a request that cannot start
    assert problem(full)["title"] == "Not enough capacity"
    engine = service.services.engine
    assert [r.state for r in engine.request_store.in_state("queued", "creating")] == []
    assert engine.lease_store.active() == []  # nothing was reserved for it


def test_a_name_prefix_belongs_to_its_first_holder_until_its_vms_are_gone(make_services):
    from .conftest import RunningService

    services, lab = make_services()
    service = RunningService(services, lab)
    try:
        alice = {"Authorization": f"Bearer {services.tokens.create('alice')}"}
        bob = {"Authorization": f"Bearer {services.tokens.create('bob')}"}
        assert service.http.get("/getservers/al", params={"count": 2}, headers=alice).status_code == 200  # al1, al2
        taken = service.http.get("/getservers/al3", headers=bob)  # under alice's prefix
        assert taken.status_code == 409
        assert "belong to alice" in taken.text
        inside = service.http.get("/getservers/a", headers=bob)  # alice's al1 is not under "a"+digits: free
        assert inside.status_code == 200, inside.text
        over = service.http.get("/getservers/al", params={"count": 3}, headers=bob)  # al1.. are alice's
        assert over.status_code == 409
        assert service.http.get("/getservers/al3").status_code == 409  # nor may an anonymous caller
        # alice's own request under her prefix goes on; her release of the whole prefix works
        assert service.http.get("/getservers/al3", headers=alice).status_code == 200
        assert service.http.get("/releaseservers/al", params={"count": 2}, headers=alice).status_code == 200
        assert service.http.get("/releaseservers/al3", headers=alice).status_code == 200
        assert service.http.get("/getservers/al3", headers=bob).status_code == 200  # all gone: free again
    finally:
        service.stop()
