"""Existing machines handed out whole (``[staticN]``), through the legacy API, the v1 API,
the queue and a restart: each machine a loopback address whose "sshd" is a real listener,
its reset a real shell command."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dynvm.config import ConfigError, load_settings
from dynvm.runtime import Services, build_services

from .api.conftest import RunningService
from .conftest import QUIET, FakeClock
from .sim.simtools import wait_for

ADDRESSES = ("127.0.77.1", "127.0.77.2", "127.0.77.3")


@pytest.fixture
def listeners() -> Iterator[int]:
    """A port on which every machine's address answers (their service is up)."""
    sockets = []
    port = 0
    for address in ADDRESSES:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        port = listener.getsockname()[1]
        listener.listen(16)
        sockets.append(listener)
    stop = threading.Event()

    def accept(listener: socket.socket) -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
                connection.close()
            except OSError:
                continue

    threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in sockets]
    for thread in threads:
        thread.start()
    yield port
    stop.set()
    for thread in threads:
        thread.join()
    for listener in sockets:
        listener.close()


def config_text(port: int, tmp_path: Path, reset: str = "", extra: str = "") -> str:
    machines = ", ".join(f"box{n}@{address}" for n, address in enumerate(ADDRESSES, 1))
    reset = reset or f'echo "$DYNVM_MACHINE $DYNVM_ADDRESS $DYNVM_OS" >> {tmp_path / "resets"}'
    return (
        "[common]\nvm.network.timeout.secs=5\n\n"
        f"[static5]\ncentos.machines={machines}\nreset.command={reset}\nprobe.port={port}\n" + extra
    )


@pytest.fixture
def static_services(tmp_path: Path) -> Iterator[Callable[..., tuple[Services, FakeClock]]]:
    made: list[Services] = []

    def make(text: str, db: str = "dynvm.db") -> tuple[Services, FakeClock]:
        config = tmp_path / "dynvmservice.ini"
        config.write_text(text)
        clock = FakeClock(time.time())
        services = build_services(config, f"sqlite:///{tmp_path / db}", clock=clock, intervals=QUIET)
        services.start()
        made.append(services)
        return services, clock

    yield make
    for services in made:
        services.stop()


def test_the_seeds_session_hands_out_each_machine_to_one_lease_at_a_time(
    static_services, listeners: int, tmp_path: Path
) -> None:
    services, _ = static_services(config_text(listeners, tmp_path))
    service = RunningService(services, None)
    try:
        assert service.get("/getavailablecount/centos").text == "3"
        first = service.get("/getservers/alice", os="centos", count=2)
        assert first.status_code == 200, first.text
        assert sorted(first.json()) == ["127.0.77.1", "127.0.77.2"]
        assert service.get("/getavailablecount/centos").text == "1"
        refused = service.get("/getservers/bob", os="centos", count=2)
        assert refused.status_code == 429  # one idle machine: never one handed out twice
        [listed] = service.get("/api/v1/hosts").json()  # as the dashboard reads it
        assert (listed["ref"], listed["state"], listed["running_vms"], listed["capacity"]) == (
            "5",
            "up",
            2,
            {"centos": 1},
        )
        assert service.get("/").status_code == 200
        shown = service.get("/showall/centos").json()["5"]
        assert sorted(vm["name"] for vm in shown if vm["power_state"] == "Running") == ["alice1", "alice2"]
        assert service.get("/releaseservers/alice", os="centos", count=2).status_code == 200
        # both resets
        wait_for(
            lambda: (tmp_path / "resets").exists() and len((tmp_path / "resets").read_text().splitlines()) == 2,
            timeout=10,
        )
        assert sorted((tmp_path / "resets").read_text().splitlines()) == [
            "box1 127.0.77.1 centos",
            "box2 127.0.77.2 centos",
        ]
        # idle again
        wait_for(lambda: service.get("/getavailablecount/centos").text == "3", timeout=10)
        again = service.get("/getservers/bob", os="centos", count=3)
        assert sorted(again.json()) == list(ADDRESSES)
    finally:
        service.stop()


def test_a_held_machine_stays_held_across_a_restart(static_services, listeners: int, tmp_path: Path) -> None:
    text = config_text(listeners, tmp_path)
    before, _ = static_services(text)
    [lease] = before.engine.acquire(request("keeper"))
    before.stop()
    after, _ = static_services(text)
    assert after.engine.reconcile(startup=True).orphans_destroyed == []
    assert [m.name for m in after.provider.machines(host(after)) if m.running] == ["keeper"]
    taken = after.engine.acquire(request("other", count=2))
    assert lease.ip not in {t.ip for t in taken}  # the kept machine is never handed out again
    with pytest.raises(Exception, match="capacity"):
        after.engine.acquire(request("third"))


def test_a_machine_whose_reset_fails_is_taken_out_and_shown(static_services, listeners: int, tmp_path: Path) -> None:
    reset = '[ "$DYNVM_MACHINE" != box1 ] || { echo "disk wipe failed" >&2; exit 3; }'
    services, _ = static_services(config_text(listeners, tmp_path, reset=reset))
    [lease] = services.engine.acquire(request("once"))
    assert lease.ip == "127.0.77.1"
    services.engine.release("once")
    # the failed reset
    wait_for(lambda: "out of service" in services.provider.status(host(services)).error, timeout=10)
    status = services.provider.status(host(services))
    assert "box1: the reset command exited 3: disk wipe failed" in status.error
    [box1] = [m for m in services.provider.machines(host(services)) if m.ref == "box1"]
    assert box1.power_state == "Out of service"
    assert services.engine.available_count("centos") == 2  # it is not counted, nor handed out
    taken = services.engine.acquire(request("next", count=2))
    assert sorted(t.ip for t in taken) == ["127.0.77.2", "127.0.77.3"]


def test_a_machine_that_does_not_answer_is_taken_out_and_another_given(
    static_services, listeners: int, tmp_path: Path
) -> None:
    text = config_text(listeners, tmp_path).replace("box1@127.0.77.1", "box0@127.0.78.1, box1@127.0.77.1")
    services, _ = static_services(text)
    [lease] = services.engine.acquire(request("someone"))
    assert lease.ip == "127.0.77.1"  # box0 never answered: out, and the next attempt took box1
    [box0] = [m for m in services.provider.machines(host(services)) if m.ref == "box0"]
    assert box0.power_state == "Out of service"


def test_two_replicas_never_take_the_same_machine(static_services, listeners: int, tmp_path: Path) -> None:
    text = config_text(listeners, tmp_path)
    one, _ = static_services(text)
    two, _ = static_services(text)  # the same database file: a second replica
    taken: list[str] = []
    errors: list[Exception] = []

    def take(services: Services, name: str) -> None:
        try:
            taken.extend(lease.ip or "" for lease in services.engine.acquire(request(name)))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=take, args=(s, f"user{n}")) for n, s in enumerate((one, two, one, two))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 3
    assert sorted(taken) == list(ADDRESSES)  # each machine once
    assert len(errors) == 1


def test_a_request_waits_in_the_queue_for_a_machine_given_back(static_services, listeners: int, tmp_path: Path) -> None:
    services, _ = static_services(config_text(listeners, tmp_path))
    service = RunningService(services, None)
    try:
        service.get("/getservers/full", os="centos", count=3).raise_for_status()
        posted = service.http.post(
            "/api/v1/leases", json={"name": "waiter", "os": "centos", "count": 1, "wait_minutes": 5}
        )
        assert posted.status_code == 202, posted.text
        location = posted.headers["Location"]
        assert service.http.get(location).json()["state"] == "queued"
        service.get("/releaseservers/full", os="centos", count=3).raise_for_status()
        # served from the queue
        wait_for(lambda: service.http.get(location).json()["state"] == "ready", timeout=30)
        [vm] = service.http.get(location).json()["vms"]
        assert vm["ip"] in ADDRESSES
    finally:
        service.stop()


def test_a_mixed_lab_serves_one_os_key_from_xen_and_static_hosts(sim_lab, listeners: int, tmp_path: Path) -> None:
    lab = sim_lab(hosts=1)
    text = lab.settings.source.read_text() + "\n" + config_text(listeners, tmp_path).split("\n\n", 1)[1]
    config = tmp_path / "mixed.ini"
    config.write_text(text)
    services = build_services(config, f"sqlite:///{tmp_path / 'mixed.db'}", intervals=QUIET, event_timeout=1.0)
    services.start()
    try:
        hosts = {h.section_prefix for h in services.settings.hosts}
        assert hosts == {"xenhost", "static"}
        static_room = 3
        assert services.engine.available_count("centos") > static_room  # both kinds count for os=centos
        leases = services.engine.acquire(request("mixed", count=services.engine.available_count("centos")))
        assert {lease.host_ref for lease in leases} == {"1", "5"}
    finally:
        services.stop()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("centos.machines=a@127.0.0.1\nubuntu.machines=b@127.0.0.2", "one OS a section"),
        ("centos.machines=a@127.0.0.1, a@127.0.0.2", "lists a twice"),
        ("centos.machines=justaname", "is not name@address"),
        ("centos.machines=a@127.0.0.1\nprobe.port=99999", "must be a TCP port"),
    ],
)
def test_a_static_section_written_wrong_says_what_is_wrong(tmp_path: Path, section: str, message: str) -> None:
    config = tmp_path / "bad.ini"
    config.write_text(f"[static2]\n{section}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(config)


def request(username: str, count: int = 1):  # type: ignore[no-untyped-def]
    from dynvm.model import LeaseRequest

    return LeaseRequest(username=username, os="centos", count=count)


def host(services: Services):  # type: ignore[no-untyped-def]
    [found] = [h for h in services.settings.hosts if h.section_prefix == "static"]
    return found
