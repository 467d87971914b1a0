"""``dynvm serve`` and ``dynvm lab`` as processes: start-up errors, SIGTERM, kill -9."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from bench.processes import free_port, serve_argv, start_serve

from dynvm.model import LeaseRequest
from dynvm.sim.settings import Timing
from dynvm.states import Actor, LeaseState
from dynvm.xen.provision import MARKER_KEY

from .sim.simtools import wait_for


class ServeProcess:
    """A ``dynvm serve`` process; ``db`` is a SQLite file or a database URL."""

    def __init__(self, config: Path, db: Path | str, *extra: str, port: int | None = None) -> None:
        try:
            self.process, self.port = start_serve(
                config, db, *extra, port=port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        except RuntimeError as e:
            pytest.fail(f"dynvm serve did not start: {e}")
        self.url = f"http://127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        """A metric without labels, read from the process's ``/metrics``."""
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.process.send_signal(sig)
        self.process.communicate(timeout=timeout)
        return self.process.returncode


def marked_vms(lab) -> list[str]:  # type: ignore[no-untyped-def]
    return [r["name_label"] for r in lab.xapi().VM.get_all_records().values() if MARKER_KEY in r["other_config"]]


def test_an_invalid_config_stops_start_up_with_code_2(tmp_path: Path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[xenhost1]\nhost.name=h\nhost.user=root\nhost.password=pw\ncentos.template=t\n")
    result = subprocess.run(
        [sys.executable, "-m", "dynvm", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"Error: {bad}: [xenhost1] host.storage.name: is missing or empty" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_sigterm_rolls_back_creates_in_flight_and_exits_0(sim_lab, tmp_path: Path):
    lab = sim_lab(timing=Timing(boot_seconds=3600))
    serve = ServeProcess(lab.settings.source, tmp_path / "d.db", "--shutdown-grace", "0.5")
    with httpx.Client(timeout=120) as client:
        import threading

        answers: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answers.append(client.get(f"{serve.url}/getservers/inflight")))
        waiting.start()
        wait_for(lambda: marked_vms(lab) == ["inflight"], timeout=30)
        assert serve.stop() == 0
        waiting.join(30)
    assert marked_vms(lab) == []  # nothing half-built is left behind
    if answers:  # the client may see an error answer or a closed connection; both are honest
        assert answers[0].status_code >= 500


KILL_POINTS = {
    # where the create is when dynvm dies -> the simulator's timing that holds it there
    "during boot": Timing(boot_seconds=3600),
    "while waiting for the IP": Timing(boot_seconds=0.05, ip_seconds=3600),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_mid_create_is_cleaned_up_by_the_next_start(sim_lab, tmp_path: Path, point: str):
    lab = sim_lab(timing=KILL_POINTS[point])
    db = tmp_path / "d.db"
    first = ServeProcess(lab.settings.source, db)
    with httpx.Client(timeout=5) as client, contextlib.suppress(httpx.ReadTimeout):  # a VM that will not be ready
        client.get(f"{first.url}/getservers/killed", timeout=0.5)
    wait_for(lambda: marked_vms(lab) == ["killed"] and _running(lab, "killed"), timeout=30)
    first.stop(signal.SIGKILL)
    assert marked_vms(lab) == ["killed"]  # the crash left a VM behind ...
    second = ServeProcess(lab.settings.source, db, port=first.port)  # the same replica, restarted
    try:
        assert marked_vms(lab) == []  # ... which the next start removes before serving
        assert httpx.get(f"{second.url}/getavailablecount/centos").text == "8"  # reservation given back
        assert httpx.get(f"{second.url}/releaseservers/killed").status_code == 404
    finally:
        assert second.stop() == 0


def _running(lab, name: str) -> bool:  # type: ignore[no-untyped-def]
    return any(
        r["name_label"] == name and r["power_state"] == "Running" for r in lab.xapi().VM.get_all_records().values()
    )


def test_kill_9_during_a_release_is_finished_by_the_next_start(sim_lab, tmp_path: Path):
    lab = sim_lab(timing=Timing(clone_seconds=0.02, boot_seconds=0.05, ip_seconds=0.05))
    db = tmp_path / "d.db"
    first = ServeProcess(lab.settings.source, db)
    assert httpx.get(f"{first.url}/getservers/leaving", timeout=30).status_code == 200
    lab.control().set_timing({"latency_ms": 400})  # a slow host: the release takes seconds
    with httpx.Client(timeout=5) as client, contextlib.suppress(httpx.ReadTimeout):
        client.get(f"{first.url}/releaseservers/leaving", timeout=0.8)
    first.stop(signal.SIGKILL)  # mid-release
    lab.control().set_timing({"latency_ms": 0})
    second = ServeProcess(lab.settings.source, db, port=first.port)
    try:
        wait_for(lambda: marked_vms(lab) == [], timeout=30)
        assert httpx.get(f"{second.url}/getavailablecount/centos").text == "8"
        assert httpx.get(f"{second.url}/api/v1/leases").json() == []
        history = httpx.get(f"{second.url}/api/v1/history", params={"state": "deleted"}).json()
        assert [item["name"] for item in history["items"]] == ["leaving"]
    finally:
        assert second.stop() == 0


def lab_banner(process: subprocess.Popen) -> str:
    """What ``dynvm lab`` printed up to the line that says it serves (90 s at most)."""
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while not any("Ctrl-C stops both" in line for line in lines):
        line = process.stdout.readline()  # type: ignore[union-attr]
        if not line and process.poll() is not None:
            pytest.fail("dynvm lab exited:\n" + "".join(lines))
        lines.append(line)
        assert time.monotonic() < deadline, "".join(lines)
    return "".join(lines)


def test_dynvm_lab_serves_a_simulated_lab_until_interrupted(tmp_path: Path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dynvm", "lab", "--hosts", "2", "--port", str(port), "--directory", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        text = lab_banner(process)
        assert f"curl http://127.0.0.1:{port}/getavailablecount/centos" in text
        base = f"http://127.0.0.1:{port}"
        # the SPEC's example session: count, get 3, count - 3, release, count again
        assert httpx.get(f"{base}/getavailablecount/centos", timeout=10).text == "12"  # 2 hosts x (8 - 2 foreign)
        got = httpx.get(f"{base}/getservers/demoserver", params={"os": "centos", "count": 3}, timeout=60)
        assert len(got.json()) == 3
        wait_for(lambda: httpx.get(f"{base}/getavailablecount/centos", timeout=10).text == "9", timeout=10)
        released = httpx.get(f"{base}/releaseservers/demoserver", params={"os": "centos", "count": 3}, timeout=60)
        assert released.json() == ["demoserver1", "demoserver2", "demoserver3"]
        wait_for(lambda: httpx.get(f"{base}/getavailablecount/centos", timeout=10).text == "12", timeout=10)
        # the banner's token command writes where the lab's dynvm looks
        config = tmp_path / "dynvmservice.ini"
        assert f"dynvm token create $USER --config {config}" in " ".join(text.split())
        assert "once [auth] required=true is set" in " ".join(text.split())  # rich must not eat [auth]
        made = subprocess.run(
            [sys.executable, "-m", "dynvm", "token", "create", "alice", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        mine = httpx.get(f"{base}/api/v1/leases", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert mine.status_code == 200, mine.text
        bogus = httpx.get(f"{base}/api/v1/leases", headers={"Authorization": "Bearer dvm_not-a-token"}, timeout=10)
        assert bogus.status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output
    assert "lab stopped." in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_dynvm_lab_with_pools_serves_a_pool_of_members(tmp_path: Path):
    port = free_port()
    argv = ["lab", "--hosts", "1", "--pool-size", "3", "--port", str(port), "--directory", str(tmp_path)]
    process = subprocess.Popen(
        [sys.executable, "-m", "dynvm", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        lab_banner(process)
        base = f"http://127.0.0.1:{port}"
        [host] = httpx.get(f"{base}/api/v1/hosts", timeout=10).json()
        assert [m["name"] for m in host["members"]] == ["sim-xen-01", "sim-xen-01-h2", "sim-xen-01-h3"]
        got = httpx.get(f"{base}/getservers/spread", params={"os": "centos", "count": 3}, timeout=60)
        assert len(got.json()) == 3
        vms = httpx.get(f"{base}/api/v1/vms", timeout=10).json()
        assert {vm["member"] for vm in vms if vm["name"].startswith("spread")} == {m["name"] for m in host["members"]}
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output


def test_kill_9_during_a_clone_leaves_nothing_once_the_clone_ends(sim_lab, tmp_path: Path):
    """The clone goes on on the host after dynvm dies and ends without dynvm's marker; the
    next start finds it through the clone's task (remembered in the lease) and removes it."""
    lab = sim_lab(timing=Timing(clone_seconds=4.0, boot_seconds=0.05, ip_seconds=0.05))
    db = tmp_path / "d.db"
    first = ServeProcess(lab.settings.source, db)
    with httpx.Client(timeout=5) as client, contextlib.suppress(httpx.ReadTimeout):
        client.get(f"{first.url}/getservers/cloning", timeout=1.0)  # dies mid-clone
    first.stop(signal.SIGKILL)
    second = ServeProcess(lab.settings.source, db, port=first.port)
    try:
        names = {r["name_label"] for r in lab.xapi().VM.get_all_records().values()}
        assert "cloning" not in names  # waited for the clone, marked it, destroyed it
        assert httpx.get(f"{second.url}/getavailablecount/centos").text == "8"
    finally:
        assert second.stop() == 0


def test_a_second_serve_on_a_taken_port_fails_before_touching_any_host(sim_lab, tmp_path: Path, make_services):
    """Before: start-up reconcile ran before uvicorn found its port taken, and destroyed
    VMs on the way out. Now the port is bound first."""
    lab = sim_lab()
    db = tmp_path / "d.db"
    services, _ = make_services(lab=lab, db=str(f"sqlite:///{db}"))
    [lease] = services.engine.acquire(LeaseRequest("leftover", "centos"))
    services.engine.lease_store.finish(
        [lease.id], LeaseState.RELEASED, time.time(), by=Actor.RECONCILE
    )  # a leftover reconcile would destroy
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(serve_argv(lab.settings.source, db, port), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"Error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert marked_vms(lab) == ["leftover"]  # nothing destructive ran


def test_a_half_sent_request_is_cut_off(sim_lab, tmp_path: Path):
    lab = sim_lab()
    serve = ServeProcess(lab.settings.source, tmp_path / "d.db", "--request-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", serve.port), timeout=15) as slow:
            slow.sendall(b"GET /getavailablecount HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            slow.settimeout(15)
            started = time.monotonic()
            assert slow.recv(1024) == b""  # closed by dynvm, not by the socket's time-out
            assert time.monotonic() - started < 10
        with socket.create_connection(("127.0.0.1", serve.port), timeout=15) as silent:
            assert silent.recv(1024) == b""  # a connection that sends nothing is closed too
        assert httpx.get(f"{serve.url}/getavailablecount/centos", timeout=10).text == "8"  # others are served
    finally:
        assert serve.stop() == 0


def test_dynvm_lab_on_a_taken_port_fails_loudly_and_starts_nothing(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "dynvm", "lab", "--port", str(port), "--directory", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout
    assert not (tmp_path / "dynvmservice.ini").exists()  # no simulator was started


def test_kill_9_keeps_queued_requests_queued_and_the_next_start_serves_them(sim_lab, tmp_path: Path):
    lab = sim_lab(host_cpus=8)  # room for two CentOS VMs
    db = tmp_path / "d.db"
    first = ServeProcess(lab.settings.source, db)
    assert httpx.get(f"{first.url}/getservers/holder?count=2", timeout=60).status_code == 200
    answer = httpx.post(f"{first.url}/api/v1/leases", json={"os": "centos", "name": "kept", "wait_minutes": 30})
    location = answer.headers["location"]
    wait_for(lambda: httpx.get(f"{first.url}{location}").json()["position"] == 1, timeout=10)
    before = httpx.get(f"{first.url}{location}").json()
    first.stop(signal.SIGKILL)
    second = ServeProcess(lab.settings.source, db, port=first.port)
    try:
        after = httpx.get(f"{second.url}{location}").json()
        assert (after["state"], after["position"], after["created_at"]) == ("queued", 1, before["created_at"])
        assert httpx.get(f"{second.url}/releaseservers/holder?count=2", timeout=60).status_code == 200
        done = httpx.get(f"{second.url}{location}", params={"wait": "true", "timeout": 60}, timeout=90).json()
        assert done["state"] == "ready"
        assert marked_vms(lab) == ["kept"]
    finally:
        assert second.stop() == 0
