"""Waiting in the queue over HTTP: legacy ``wait=``, v1 ``wait_minutes``, the queue's
listing, cancel, and a client that hangs up."""

from __future__ import annotations

import socket
import threading
import time

from dynvm.states import RequestState

from ..sim.simtools import wait_for

SMALL = {"host_cpus": 8}  # room for two CentOS VMs


def test_legacy_wait_holds_the_answer_until_room_frees_and_answers_as_the_seed_did(serve):
    service = serve(**SMALL)
    assert service.get("/getservers/holder", os="centos", count=2).status_code == 200
    answer: dict[str, object] = {}
    waiter = threading.Thread(
        target=lambda: answer.update(r=service.get("/getservers/patient", os="centos", wait="5", format="detailed"))
    )
    waiter.start()
    wait_for(lambda: service.services.engine.request_store.in_state(RequestState.QUEUED), timeout=10)
    # the scheduler numbers the queue on its pass after the request joins it
    [queued] = wait_for(lambda: [q for q in service.get("/api/v1/queue").json() if q["position"] is not None])
    assert queued["position"] == 1
    assert queued["user"] == "patient"
    assert service.get("/releaseservers/holder", count=2).status_code == 200
    waiter.join(timeout=30)
    response = answer["r"]
    assert response.status_code == 200
    [line] = [x for x in response.text.splitlines() if ":" in x]
    assert line.strip().startswith('"patient": "127.77.0.')  # the seed's detailed format
    # the ETAs given are measured against the waits, on the queue and on the dashboard (a
    # wait under a second is not measured: tests/engine/test_queue.py measures real ones)
    listing = service.get("/api/v1/queue")
    assert listing.json() == []
    samples = int(listing.headers["X-Dynvm-Eta-Error-Samples"])
    shown = service.get("/api/v1/dashboard/queue").json()["eta_error"]
    assert shown["samples"] == samples
    if samples:
        assert shown["p50"] == float(listing.headers["X-Dynvm-Eta-Error-P50"])
    else:
        assert "X-Dynvm-Eta-Error-P50" not in listing.headers
        assert shown["p50"] is None


def test_legacy_wait_that_runs_out_is_a_429_saying_how_long_it_waited(serve):
    service = serve(**SMALL)
    service.get("/getservers/holder", os="centos", count=2)
    started = time.monotonic()
    response = service.get("/getservers/late", os="centos", wait="0.02")  # 1.2 s
    assert time.monotonic() - started >= 1.0
    assert response.status_code == 429
    assert response.text.startswith("Error: not enough capacity for 1 centos VM(s) after waiting 0.0")
    assert "number 1 in the queue" in response.text


def test_a_legacy_client_that_hangs_up_while_queued_cancels_its_request(serve):
    service = serve(**SMALL)
    service.get("/getservers/holder", os="centos", count=2)
    port = int(service.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /getservers/gone?os=centos&wait=10 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: service.services.engine.request_store.in_state(RequestState.QUEUED), timeout=10)
        [record] = service.services.engine.request_store.in_state(RequestState.QUEUED)
    wait_for(lambda: service.services.engine.request_store.get(record.id).state == RequestState.CANCELLED, timeout=10)
    service.get("/releaseservers/holder", count=2)
    service.services.engine.scheduler.run_pass()
    assert service.get("/showall").json()["1"] == []  # nothing was made for it


def test_v1_queue_position_eta_and_cancel(serve):
    service = serve(**SMALL)
    service.get("/getservers/holder", os="centos", count=2)
    answer = service.http.post("/api/v1/leases", json={"os": "centos", "name": "queued1", "wait_minutes": 30})
    assert answer.status_code == 202
    location = answer.headers["location"]
    assert answer.json()["state"] == RequestState.QUEUED
    wait_for(lambda: service.http.get(location).json()["position"] == 1, timeout=10)
    status = service.http.get(location).json()
    assert status["eta"].endswith("Z")
    assert status["eta_seconds"] > 0
    cancelled = service.http.delete(location)
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == RequestState.CANCELLED
    assert service.get("/api/v1/queue").json() == []


def test_v1_wait_and_queue_answers_when_served(serve):
    service = serve(**SMALL)
    service.get("/getservers/holder", os="centos", count=2)
    done: dict[str, object] = {}

    def ask() -> None:
        body = {"os": "centos", "name": "later", "wait_minutes": 5}
        done["r"] = service.http.post("/api/v1/leases", params={"wait": "true"}, json=body)

    waiter = threading.Thread(target=ask)
    waiter.start()
    wait_for(lambda: service.services.engine.request_store.in_state(RequestState.QUEUED), timeout=10)
    service.get("/releaseservers/holder1")
    waiter.join(timeout=30)
    assert done["r"].status_code == 200
    assert done["r"].json()["state"] == "ready"
    assert done["r"].json()["vms"][0]["ip"].startswith("127.77.")


def test_a_cancel_of_a_ready_request_is_a_409(serve):
    service = serve()
    location = service.http.post("/api/v1/leases?wait=true", json={"os": "centos", "name": "done"}).headers["location"]
    refused = service.http.delete(location)
    assert refused.status_code == 409
    assert "release them instead" in refused.json()["detail"]


def test_the_eta_error_in_the_queues_headers_is_the_dashboards_to_the_digit(serve):
    """A large error (an ETA from an expiry hours ahead, met by an early release) lost its
    last digits in the header (six significant ones): 32921.7 against the dashboard's
    32921.702."""
    from sqlalchemy import insert

    from dynvm.store.tables import requests

    service = serve(**SMALL)
    now = time.time()
    with service.services.engine.request_store.db.write() as conn:
        conn.execute(
            insert(requests).values(
                id="r-eta", username="early", os="centos", count=1, state="ready", owner="t", vms=[],
                created_at=now - 2.0, eta_first=now + 65_843.404, finished_at=now,
            )
        )  # fmt: skip
    listing = service.get("/api/v1/queue")
    shown = service.get("/api/v1/dashboard/queue").json()["eta_error"]
    assert shown["p50"] == 32921.702
    assert listing.headers["X-Dynvm-Eta-Error-P50"] == "32921.702"
    assert float(listing.headers["X-Dynvm-Eta-Error-P90"]) == shown["p90"]
