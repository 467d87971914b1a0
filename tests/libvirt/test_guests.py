"""The lease life cycle on real guests: libvirt domains booted by QEMU on this machine, each
reached over its own sshd."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from bench.processes import free_port

from dynvm.model import NotDynvmVm
from dynvm.runtime import Services, build_services

from ..api.conftest import RunningService
from ..conftest import QUIET, FakeClock
from ..sim.simtools import wait_for
from ..test_serve import ServeProcess
from .conftest import LibvirtLab, ssh

MakeServices = Callable[..., tuple[Services, FakeClock]]


def test_the_seeds_curl_session_on_real_guests(libvirt_lab: LibvirtLab, libvirt_services: MakeServices) -> None:
    services, _clock = libvirt_services()
    service = RunningService(services, None)
    try:
        answer = service.get("/getservers/demoserver", os="tiny", count=3)
        assert answer.status_code == 200, answer.text
        addresses = answer.json()
        assert len(addresses) == 3
        assert len(set(addresses)) == 3
        for address in addresses:  # each is a guest of its own, answering on its real sshd
            assert ssh(libvirt_lab, address, "hostname").strip() == "dynvm-guest"
        names = {ssh(libvirt_lab, a, "cat /proc/sys/kernel/random/boot_id").strip() for a in addresses}
        assert len(names) == 3
        shown = service.get("/showall/tiny").json()["1"]
        assert sorted(vm["name"] for vm in shown) == ["demoserver1", "demoserver2", "demoserver3"]
        assert {vm["networkinfo"].split(": ")[1] for vm in shown} == set(addresses)
        assert all(vm["power_state"] == "Running" for vm in shown)
        domains, volumes = libvirt_lab.ours()
        assert len(domains) == 3
        assert len(volumes) == 3
        released = service.get("/releaseservers/demoserver", os="tiny", count=3)
        assert released.status_code == 200, released.text
        assert sorted(released.json()) == ["demoserver1", "demoserver2", "demoserver3"]
        assert libvirt_lab.ours() == ([], [])  # no domain, no clone volume left
        assert service.get("/showall/tiny").json()["1"] == []
    finally:
        service.stop()


def test_a_lease_expires_on_the_services_clock(libvirt_lab: LibvirtLab, libvirt_services: MakeServices) -> None:
    services, clock = libvirt_services()
    service = RunningService(services, None)
    try:
        [address] = service.get("/getservers/brief", os="tiny", expiresin=10).json()
        ssh(libvirt_lab, address, "true")
        clock.advance(9 * 60)
        assert services.engine.expire_due() == []
        assert len(libvirt_lab.ours()[0]) == 1
        clock.advance(2 * 60)
        assert services.engine.expire_due() == ["brief"]
        assert libvirt_lab.ours() == ([], [])
    finally:
        service.stop()


def test_a_domain_destroyed_by_hand_leaves_the_mirror_by_its_event(
    libvirt_lab: LibvirtLab, libvirt_services: MakeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynvm.libvirt.inventory

    monkeypatch.setattr(dynvm.libvirt.inventory, "REFRESH_SECONDS", 3600.0)  # only events can tell it
    services, clock = libvirt_services()
    service = RunningService(services, None)
    try:
        [address] = service.get("/getservers/byhand", os="tiny").json()
        ssh(libvirt_lab, address, "true")
        connection = libvirt_lab.connection()
        [dom] = [d for d in connection.listAllDomains(0) if d.name().startswith("dynvm-")]
        dom.destroy()
        dom.undefine()
        connection.close()
        # the mirror drops the domain
        wait_for(lambda: services.provider.machines(host(services)) == [], timeout=10, interval=0.1)
        clock.advance(60)  # past the grace a new VM has to show in the mirror
        report = services.engine.reconcile()
        assert report.vanished == ["byhand"]
        assert services.engine.reconcile().disks_destroyed  # its clone volume, left by the hand that undefined it
        assert libvirt_lab.ours() == ([], [])
    finally:
        service.stop()


def test_another_installation_never_touches_these_guests(
    libvirt_lab: LibvirtLab, libvirt_services: MakeServices
) -> None:
    ours, _ = libvirt_services("ours.db")
    theirs, _ = libvirt_services("theirs.db")
    service = RunningService(ours, None)
    try:
        [address] = service.get("/getservers/keepme", os="tiny").json()
        theirs.provider.wait_synced(10)
        # the other installation sees the domain
        wait_for(lambda: len(theirs.provider.machines(host(theirs))) == 1, timeout=60, interval=0.1)
        report = theirs.engine.reconcile()
        assert report.orphans_destroyed == []
        assert report.quarantined == []
        assert report.disks_destroyed == []
        [machine] = theirs.provider.machines(host(theirs))
        with pytest.raises(NotDynvmVm, match="another dynvm installation"):
            theirs.provider.destroy(host(theirs), machine.ref, machine.lease_id)
        assert ssh(libvirt_lab, address, "echo alive").strip() == "alive"
        assert len(libvirt_lab.ours()[0]) == 1
        assert service.get("/releaseservers/keepme", os="tiny").status_code == 200
        assert libvirt_lab.ours() == ([], [])
    finally:
        service.stop()


def test_a_volume_that_will_not_go_is_collected_later(libvirt_lab: LibvirtLab, libvirt_services: MakeServices) -> None:
    services, _ = libvirt_services()
    service = RunningService(services, None)
    try:
        service.get("/getservers/stuck", os="tiny").raise_for_status()
        [volume] = libvirt_lab.ours()[1]
        path = Path(libvirt_lab.lab.pool_path) / volume
        subprocess.run(["chattr", "+i", str(path)], check=True)  # a delete that fails, as a full or broken disk would
        released = service.get("/releaseservers/stuck", os="tiny")
        assert released.status_code == 202  # the VM is gone; dynvm finishes its disk in the background
        assert released.json() == ["stuck"]
        assert libvirt_lab.ours() == ([], [volume])  # the domain is gone; its volume stays, known by its name
        assert services.engine.reconcile().errors  # still stuck: counted, not lost
        subprocess.run(["chattr", "-i", str(path)], check=True)
        assert services.engine.reconcile().disks_destroyed == [volume]
        assert libvirt_lab.ours() == ([], [])
    finally:
        service.stop()


def test_a_ready_pool_hands_out_a_real_guest(libvirt_lab: LibvirtLab, libvirt_services: MakeServices) -> None:
    services, _ = libvirt_services(extra="\n[pools]\ntiny.ready=1\n")
    service = RunningService(services, None)
    try:
        services.engine.ready_pools.tick()
        # the ready VM
        wait_for(
            lambda: [lease.state.value for lease in services.engine.lease_store.pooled()] == ["ready"],
            timeout=60,
            interval=0.1,
        )
        [address] = service.get("/getservers/warm", os="tiny").json()
        [vm] = service.get("/showall/tiny").json()["1"]
        assert vm["name"] == "warm"  # the ready guest took the lease's name on the host
        assert ssh(libvirt_lab, address, "hostname").strip() == "dynvm-guest"
    finally:
        service.stop()


def host(services: Services):  # type: ignore[no-untyped-def]
    [configured] = services.settings.hosts
    return configured


def test_kill_9_during_creates_leaves_nothing_after_a_restart(libvirt_lab: LibvirtLab, tmp_path: Path) -> None:
    libvirt_lab.clean()
    config = libvirt_lab.config(tmp_path)
    db = tmp_path / "dynvm.db"
    first = ServeProcess(config, db)
    answers: list[object] = []

    def ask() -> None:
        try:
            answers.append(httpx.get(f"{first.url}/getservers/killed", params={"os": "tiny", "count": 2}, timeout=120))
        except httpx.HTTPError as e:
            answers.append(e)

    asking = threading.Thread(target=ask)
    asking.start()
    # the creates begin
    wait_for(lambda: len(libvirt_lab.ours()[0]) == 2, timeout=30, interval=0.1)
    first.process.kill()  # SIGKILL: no clean-up of its own
    first.process.wait()
    asking.join()
    assert isinstance(answers[0], httpx.HTTPError)  # the caller saw the service die
    assert len(libvirt_lab.ours()[0]) == 2  # what it was making is still there...
    second = ServeProcess(config, db, port=first.port)  # ...until the same replica starts again
    try:
        # the restart removes what the dead process made
        wait_for(lambda: libvirt_lab.ours() == ([], []), timeout=60, interval=0.1)
        leases = httpx.get(f"{second.url}/api/v1/leases", params={"all": "true"}).json()
        assert [lease["name"] for lease in leases if lease["state"] in ("creating", "ready")] == []
        answer = httpx.get(f"{second.url}/getservers/after", params={"os": "tiny"}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert ssh(libvirt_lab, answer.json()[0], "hostname").strip() == "dynvm-guest"
    finally:
        second.stop()


def test_a_guest_that_gets_no_address_is_tried_again_then_removed(
    libvirt_lab: LibvirtLab, libvirt_services: MakeServices
) -> None:
    """A network without DHCP: every attempt ends without an address (NO_ADDRESS), is
    removed, and the request fails with the reason; nothing is left."""
    from dynvm.libvirt.lab import network_xml

    connection = libvirt_lab.connection()
    xml = network_xml("dynvm-nodhcp", "192.168.250").replace("<dhcp>", "<!--").replace("</dhcp>", "-->")
    network = connection.networkCreateXML(xml)  # transient: gone when destroyed
    try:
        services, _ = libvirt_services(network="dynvm-nodhcp", timeout=3)
        service = RunningService(services, None)
        try:
            answer = service.get("/getservers/lost", os="tiny")
            assert answer.status_code == 502
            assert "no address after 3 s" in answer.text
            assert libvirt_lab.ours() == ([], [])
        finally:
            service.stop()
    finally:
        network.destroy()
        connection.close()


def test_dynvm_lab_serves_real_guests_and_tears_down_what_it_made(libvirt_lab: LibvirtLab, tmp_path: Path) -> None:
    libvirt_lab.clean()
    port = free_port()
    lab = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynvm",
            "lab",
            "--provider",
            "libvirt",
            "--port",
            str(port),
            "--directory",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        # the lab serves
        wait_for(lambda: lab.poll() is None and healthy(url), timeout=120, interval=0.1)
        answer = httpx.get(f"{url}/getservers/demoserver", params={"os": "tiny"}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert ssh(libvirt_lab, answer.json()[0], "hostname").strip() == "dynvm-guest"
    finally:
        lab.send_signal(signal.SIGINT)
        output = lab.communicate(timeout=120)[0]
    assert "lab stopped." in output
    connection = libvirt_lab.connection()
    try:
        assert "dynvm-lab" not in [n.name() for n in connection.listAllNetworks(0)]
        assert "dynvm-lab" not in [p.name() for p in connection.listAllStoragePools(0)]
        assert [d.name() for d in connection.listAllDomains(0) if d.name().startswith("dynvm-")] == []
    finally:
        connection.close()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_copy_of_the_database_started_beside_production_touches_nothing(
    libvirt_lab: LibvirtLab, libvirt_services: MakeServices, tmp_path: Path
) -> None:
    """The claim lives on the host (a libvirt secret), where a copy finds the one its
    original renews: the copy refuses to act until it is an installation of its own."""
    import sqlite3

    from dynvm.engine.claim import Contested
    from dynvm.model import LeaseRequest

    production, _ = libvirt_services("production.db")
    [prod] = production.engine.acquire(LeaseRequest("prod", "tiny"))
    with sqlite3.connect(tmp_path / "production.db") as source, sqlite3.connect(tmp_path / "copy.db") as target:
        source.backup(target)  # what a backup tool makes of a live database
    production.engine.claim.renew()
    config = production.config_path
    copy = build_services(config, f"sqlite:///{tmp_path / 'copy.db'}", intervals=QUIET, replica="staging:5000")
    try:
        with pytest.raises(Contested, match="dynvm installation new"):
            copy.start()
        assert "prod" in copy.engine.release("prod").failed
        with pytest.raises(Contested):
            copy.engine.acquire(LeaseRequest("staging", "tiny"))
        assert copy.engine.reconcile().orphans_destroyed == []
    finally:
        copy.stop()
    assert prod.ip is not None
    assert ssh(libvirt_lab, prod.ip, "echo untouched").strip() == "untouched"
    assert production.engine.release("prod").released == ["prod"]


def test_two_sections_that_reach_one_host_count_it_once(
    libvirt_lab: LibvirtLab, libvirt_services: MakeServices
) -> None:
    second = libvirt_lab.lab.section(2, libvirt_lab.image)  # the same qemu:///system, as people copy a section
    services, _ = libvirt_services(extra="\n" + second)
    # both sections read
    wait_for(lambda: all(services.provider.status(h) for h in services.settings.hosts), timeout=60, interval=0.1)
    first, again = (services.provider.status(h) for h in services.settings.hosts)
    assert first is not None
    assert again is not None
    assert first.up
    assert not again.up
    assert again.same_pool_as == "1"
    assert "the same host as [libvirthost1]" in again.error
    alone, _ = libvirt_services("alone.db")
    assert services.engine.available_count("tiny") == alone.engine.available_count("tiny") > 0
