"""The seed-compatible routes over real HTTP, byte for byte (SPEC.md §1)."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from dynvm.sim.settings import Timing
from dynvm.xen.provision import MARKER_KEY

from ..sim.simtools import wait_for


def test_the_specs_example_session(serve):
    service = serve(hosts=2)
    assert service.get("/getavailablecount/centos").text == "16"
    answer = service.get("/getservers/demoserver", os="centos", count=3)
    assert answer.status_code == 200
    ips = answer.json()
    assert len(ips) == 3
    assert answer.text == json.dumps(ips)  # ["127.77.0.2", "127.77.1.2", "127.77.0.3"]
    wait_for(lambda: service.get("/getavailablecount/centos").text == "13", timeout=5)
    released = service.get("/releaseservers/demoserver", os="centos", count=3)
    assert released.status_code == 200
    assert released.text == '[\n  "demoserver1",\n  "demoserver2",\n  "demoserver3"\n]'
    wait_for(lambda: service.get("/getavailablecount/centos").text == "16", timeout=5)


def test_getavailablecount_defaults_to_centos_and_is_plain_text(serve):
    service = serve()
    answer = service.get("/getavailablecount")
    assert answer.text == service.get("/getavailablecount/centos").text == "8"
    assert answer.headers["content-type"].startswith("text/plain")
    assert service.get("/getavailablecount/windows").text == "5"  # 32 CPUs / 6 vCPUs


def test_detailed_format_is_one_vm_per_line(serve):
    service = serve()
    answer = service.get("/getservers/job7", os="centos", count=2, format="detailed")
    body = answer.text
    mapping = json.loads(body)
    assert list(mapping) == ["job71", "job72"]
    lines = body.splitlines()
    assert lines[0] == "{"
    assert lines[-1] == "}"
    for name, line in zip(mapping, lines[1:-1], strict=True):
        assert line.strip().rstrip(",") == f'"{name}": "{mapping[name]}"'  # Jenkins greps and cuts at ':'


def test_a_single_vm_is_named_after_the_user(serve):
    service = serve()
    answer = service.get("/getservers/solo", os="centos", format="detailed")
    assert list(answer.json()) == ["solo"]
    assert service.get("/releaseservers/solo").text == '[\n  "solo"\n]'


def test_showall_lists_running_vms_as_xapi_gives_them(serve):
    service = serve(hosts=2, foreign_vms=1)
    service.get("/getservers/shown", os="windows", cpus=2, mem=4294967296)
    wait_for(lambda: "shown" in service.get("/showall").text, timeout=5)
    body = service.get("/showall").text
    listing = json.loads(body)
    assert body == json.dumps(listing, indent=2, sort_keys=True)
    assert sorted(listing) == ["1", "2"]
    mine = next(vm for vms in listing.values() for vm in vms if vm["name"] == "shown")
    assert set(mine) == {"name", "name_description", "power_state", "vcpus", "memory_static_max", "networkinfo"}
    assert (mine["vcpus"], mine["memory_static_max"], mine["power_state"]) == ("2", "4294967296", "Running")
    assert mine["networkinfo"].startswith("127.77.")
    assert mine["name_description"].startswith("shown from tmpl-win16dc - PATCHED (1) on ")
    windows_only = json.loads(service.get("/showall/windows").text)
    assert [vm["name"] for vms in windows_only.values() for vm in vms] == ["shown"]
    assert json.loads(service.get("/showall/centos").text) == {"1": [], "2": []} or all(
        vm["name"] != "shown" for vms in json.loads(service.get("/showall/centos").text).values() for vm in vms
    )


def test_xhostref_pins_the_host(serve):
    service = serve(hosts=3)
    service.get("/getservers/pinned", os="centos", count=2, xhostref=3)
    listing = json.loads(service.get("/showall").text)
    assert sorted(vm["name"] for vm in listing["3"]) == ["pinned1", "pinned2"]


def test_errors_are_plain_text_and_say_what_to_do(serve):
    service = serve(foreign_vms=1)
    cases = [
        (service.get("/getservers/x", os="rhel9"), 400, "Error: unknown OS 'rhel9'; the OSes that exist are: centos"),
        (service.get("/getavailablecount/rhel9"), 400, "Error: unknown OS 'rhel9'"),
        (service.get("/getservers/x", count="many"), 400, "Error: count must be a whole number, not 'many'"),
        (service.get("/getservers/x", count=0), 400, "Error: count must be between 1 and 1000"),
        (service.get("/getservers/x", count=51), 429, "Error: count 51 is over the limit of 50 VMs per request"),
        (service.get("/getservers/x", expiresin="soon"), 400, "Error: expiresin is minutes"),
        (service.get("/getservers/x", format="xml"), 400, "Error: format must be servermanager or detailed"),
        (service.get("/getservers/x", xhostref=9), 400, "Error: no host 9; xhostref is one of: 1"),
        (service.get("/getservers/x", count=9), 429, "Error: not enough capacity for 9 centos VM(s): 7 can be made"),
        (service.get("/releaseservers/nobody"), 404, "Error: no VM named nobody is leased from dynvm"),
        (service.get("/getservers/bad name!"), 400, "Error: the username must be 1 to 64 characters"),
    ]
    for answer, status, start in cases:
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("text/plain")
        assert answer.text.startswith(start), answer.text
    foreign = next(vm["name"] for vm in json.loads(service.get("/showall").text)["1"])
    clash = service.get(f"/getservers/{foreign}")
    assert clash.status_code == 409
    assert "dynvm never reuses or touches a VM it did not create" in clash.text
    assert service.get(f"/releaseservers/{foreign}").status_code == 404  # a foreign VM is never released


def test_release_with_a_state_in_the_path(serve):
    service = serve()
    service.get("/getservers/stateful", count=2)
    answer = service.get("/releaseservers/stateful/available", count=2)
    assert answer.text == '[\n  "stateful1",\n  "stateful2"\n]'


def test_a_short_expiry_destroys_the_vm_by_itself(serve):
    from dynvm.runtime import Intervals

    service = serve(intervals=Intervals(reap=0.1, reconcile=3600, export=3600, sync_wait=10, shutdown_grace=5))
    service.get("/getservers/brief", expiresin=0.02)  # 1.2 seconds
    xapi = service.lab.xapi()
    assert any(r["name_label"] == "brief" for r in xapi.VM.get_all_records().values())
    wait_for(lambda: all(r["name_label"] != "brief" for r in xapi.VM.get_all_records().values()), timeout=15)
    wait_for(lambda: service.services.engine.lease_store.active() == [], timeout=5)
    assert service.get("/releaseservers/brief").status_code == 404
    [expired] = service.services.engine.lease_store.in_state("expired")
    assert expired.name == "brief"


def test_a_client_that_goes_away_still_gets_a_lease_it_can_release(serve):
    service = serve(timing=Timing(clone_seconds=0.01, boot_seconds=1.0, ip_seconds=0.1))
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the VM is ready
        service.http.get("/getservers/impatient", timeout=0.3)

    def handed_over() -> bool:  # its request ended: the lease is the user's even though nobody heard
        return [
            (lease.state, lease.handed_over_at is not None) for lease in service.services.engine.lease_store.active()
        ] == [("ready", True)]

    wait_for(handed_over, timeout=15)
    with service.services.db.read() as conn:
        assert service.services.engine.lease_store.pending_reservations(conn) == []  # the reservation became a lease
    assert service.get("/releaseservers/impatient").text == '[\n  "impatient"\n]'


def test_healthz(serve):
    assert serve().get("/healthz").text == "ok"


def test_counting_stays_fast_while_a_hundred_getservers_wait_and_stopping_rolls_them_back(serve):
    from dynvm.runtime import Intervals

    service = serve(
        hosts=2,
        host_cpus=256,
        host_memory_gib=1024,
        timing=Timing(boot_seconds=3600),  # they wait until dynvm stops
        intervals=Intervals(reap=3600, reconcile=3600, export=3600, sync_wait=10, shutdown_grace=0.1),
    )
    # their own client, whose time-out outlasts every wait below (the default 60 s does not,
    # on a machine loaded by the rest of the suite and the real guests beside it)
    waiting = httpx.Client(base_url=service.url, timeout=600, limits=httpx.Limits(max_connections=200))
    with ThreadPoolExecutor(100) as pool:
        pending = [pool.submit(waiting.get, f"/getservers/wait{n}") for n in range(100)]
        # 100 creates at once write their leases and progress: slow on a loaded disk
        wait_for(lambda: len(service.services.engine.lease_store.active()) == 100, timeout=180)
        for _ in range(20):  # counting never queues behind them: else it would wait out their hour-long boot
            assert service.get("/getavailablecount/centos").status_code == 200
        assert [
            f.result().text for f in pending if f.done()
        ] == []  # all still waiting for their VMs (the bench times it)
        service.services.stop()  # as on SIGTERM: creates still in flight are cancelled and rolled back
        answers = [f.result() for f in pending]
    waiting.close()
    assert {a.status_code for a in answers} == {502}
    assert all("cancelled: dynvm is stopping" in a.text for a in answers)
    for index in (0, 1):
        marked = [r for r in service.lab.xapi(index).VM.get_all_records().values() if MARKER_KEY in r["other_config"]]
        assert marked == []
    assert service.services.engine.lease_store.active() == []


def test_a_host_that_stops_answering_is_shown_empty_and_gets_no_vms(serve):
    service = serve(hosts=2, foreign_vms=1)
    service.lab.control(0).host_down("hang")
    wait_for(lambda: service.services.inventory.view("1").state.value == "down", timeout=15)
    started = time.monotonic()
    listing = json.loads(service.get("/showall").text)
    assert time.monotonic() - started < 2
    assert listing["1"] == []  # documented: a down host is listed with no VMs
    assert len(listing["2"]) == 1
    assert service.get("/getavailablecount").text == "7"  # only host 2 counts
    answer = service.get("/getservers/elsewhere")
    assert answer.status_code == 200
    placed = json.loads(service.get("/showall").text)["2"]
    assert "elsewhere" in [vm["name"] for vm in placed]
    pinned = service.get("/getservers/pinned", xhostref=1)
    assert pinned.status_code == 429  # no room: the pinned host counts nothing while down
    service.lab.control(0).host_up()


# -- issue 11: honest release answers, strict numbers and names, the seed's networkinfo ---------


def test_a_release_that_leaves_a_disk_answers_202_with_the_names_and_a_sentence(serve):
    service = serve()
    assert service.get("/getservers/diskjob").status_code == 200
    service.lab.control().fail_next("vdi_destroy", "SR_BACKEND_FAILURE_1200", 1)
    answer = service.get("/releaseservers/diskjob")
    assert answer.status_code == 202
    assert answer.json() == ["diskjob"]  # the seed's body: existing jobs parse it as before
    assert "dynvm deletes them within a minute" in answer.headers["x-dynvm-detail"]
    again = service.get("/releaseservers/diskjob")  # retrying is harmless: nothing is leased any more
    assert again.status_code == 404


def test_a_release_whose_vm_cannot_be_destroyed_answers_502_and_a_retry_finishes_it(serve):
    service = serve()
    assert service.get("/getservers/stuckjob").status_code == 200
    service.lab.control().fail_next("destroy", "INTERNAL_ERROR", 1)
    answer = service.get("/releaseservers/stuckjob")
    assert answer.status_code == 502
    assert answer.text.startswith("Error: could not destroy stuckjob on xenhost1")
    assert "dynvm tries again within a minute" in answer.text
    retry = service.get("/releaseservers/stuckjob")
    assert (retry.status_code, retry.json()) == (200, ["stuckjob"])


def test_a_partial_release_names_every_vm_and_what_became_of_it(serve):
    service = serve()
    assert service.get("/getservers/d3", count=2).status_code == 200
    control = service.lab.control()
    control.fail_next("destroy", "INTERNAL_ERROR", 1)  # one VM will not go ...
    control.fail_next("vdi_destroy", "SR_BACKEND_FAILURE_1200", 1)  # ... the other leaves a disk
    answer = service.get("/releaseservers/d3", count=2)
    assert answer.status_code == 502
    assert "could not destroy d3" in answer.text
    stuck = "d31" if "could not destroy d31" in answer.text else "d32"
    other = "d32" if stuck == "d31" else "d31"
    assert f"{other} is gone, but 1 of its disk(s) could not be deleted yet" in answer.text
    retry = service.get("/releaseservers/d3", count=2)  # the retry names both, each with its state
    assert (retry.status_code, retry.json()) == (200, ["d31", "d32"])
    assert retry.headers["x-dynvm-detail"] == f"{other} was already released"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"count": "２"}, "Error: count must be a whole number, not '２'"),
        ({"count": " 2"}, "Error: count must be a whole number"),
        ({"cpus": "٣"}, "Error: cpus must be a whole number"),
        ({"expiresin": "１.５"}, "Error: expiresin is minutes"),
        ({"xhostref": "¹"}, "Error: xhostref must be a whole number"),
    ],
)
def test_only_ascii_digits_are_numbers(serve, query, message):
    answer = serve().get("/getservers/digits", **query)
    assert (answer.status_code, answer.text[: len(message)]) == (400, message)


def test_names_made_only_of_dots_are_refused(serve):
    service = serve()
    host, port = service.url.removeprefix("http://").split(":")
    for name in (".", "..", "..."):
        # sent as is with http.client: httpx (like curl) collapses '.' and '..' before sending
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("GET", f"/getservers/{name}")
        answer = connection.getresponse()
        text = answer.read().decode()
        connection.close()
        assert answer.status == 400, (name, text)
        assert "not only dots" in text
        v1 = service.http.post("/api/v1/leases", json={"os": "centos", "name": name})
        assert v1.status_code == 422, (name, v1.text)
    assert service.services.engine.lease_store.active() == []


def test_showall_networkinfo_joins_every_value_as_the_seed_did(serve):
    service = serve()
    [ip] = service.get("/getservers/netjob").json()
    xapi = service.lab.xapi()
    vm = xapi.VM.get_by_name_label("netjob")[0]
    metrics = xapi.VM.get_guest_metrics(vm)
    networks = xapi.VM_guest_metrics.get_networks(metrics)
    expected = ",".join(networks.values())
    assert expected.count(ip) == 2  # the sim reports it as 0/ip and 0/ipv4/0, like a real guest
    [entry] = [e for e in service.get("/showall").json()["1"] if e["name"] == "netjob"]
    assert entry["networkinfo"] == expected
