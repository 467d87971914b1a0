"""``dynvm sim`` as a process: the command-line contract other tools rely on."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import pytest
import XenAPI

from dynvm.sim.control import SimControlClient

OS_KEYS = ["centos", "centos7", "centos8", "windows", "oel8", "debian10", "ubuntu18", "suse15"]


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65000:
            with socket.socket() as a, socket.socket() as b:
                try:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    pytest.fail("no two free consecutive ports")


def start_sim(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    config = tmp_path / "lab" / "dynvmservice.ini"
    process = subprocess.Popen(
        [sys.executable, "-m", "dynvm", "sim", "--write-config", str(config), "--time-scale", "0.01", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not config.exists():
        if process.poll() is not None:
            pytest.fail(f"dynvm sim exited early:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("dynvm sim wrote no config within 30 s")
        time.sleep(0.05)
    return process, config


def stop_sim(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    return output


def read_config(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return parser


def test_sim_listens_writes_a_complete_config_and_stops_cleanly(tmp_path: Path):
    base = free_port_pair()
    process, path = start_sim(tmp_path, "--hosts", "2", "--base-port", str(base), "--foreign-vms", "1")
    try:
        config = read_config(path)
        assert config.sections() == ["couchbase", "common", "probe", "xenhost1", "xenhost2"]
        assert config["common"]["vm.expiry.minutes"] == "720"
        probe_port = int(config["probe"]["port"])  # where the guests' sshd listens: no root needed
        assert 1024 < probe_port < 65536
        assert int(config["probe"]["windows.port"]) not in (0, probe_port)
        assert config["common"]["vm.network.timeout.secs"] == "400"
        assert (path.stat().st_mode & 0o777) == 0o600  # it holds passwords
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
        passwords = set()
        for index, section in enumerate(["xenhost1", "xenhost2"]):
            host = config[section]
            assert host["host.name"] == f"http://127.0.0.1:{base + index}"
            assert host["host.user"] == "root"
            assert host["host.storage.name"] == f"Local Storage 0{index + 1}"
            passwords.add(host["host.password"])
            session = XenAPI.Session(host["host.name"])
            session.xenapi.login_with_password("root", host["host.password"], "2.21", "test")
            for key in OS_KEYS:
                assert session.xenapi.VM.get_by_name_label(host[f"{key}.template"]), key
            running = session.xenapi.VM.get_all_records_where(
                'field "power_state" = "Running" and field "is_control_domain" = "false"'
            )
            assert len(running) == 1
        assert len(passwords) == 2  # a random password per host
    finally:
        output = stop_sim(process)
    assert "stopped" in output


def test_sim_stops_on_ctrl_c_with_exit_zero(tmp_path: Path):
    process, _ = start_sim(tmp_path, "--hosts", "1")
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=20)
    assert process.returncode == 0


def test_the_control_port_is_named_in_the_config(tmp_path: Path):
    process, path = start_sim(tmp_path, "--hosts", "1")
    try:
        line = next(line for line in path.read_text().splitlines() if line.startswith("; dynvm-sim-control: "))
        url = line.removeprefix("; dynvm-sim-control: ")
        password = read_config(path)["xenhost1"]["host.password"]
        assert SimControlClient(url, password).status()["name"] == "sim-xen-01"
    finally:
        stop_sim(process)


def test_tls_serves_https_trusted_only_with_the_written_certificate(tmp_path: Path):
    process, path = start_sim(tmp_path, "--hosts", "1", "--tls")
    try:
        host = read_config(path)["xenhost1"]
        assert host["host.name"].startswith("https://127.0.0.1:")
        ca_file = Path(host["host.tls.ca_file"])
        assert ca_file.parent == path.parent
        trusted = xmlrpc.client.SafeTransport(context=ssl.create_default_context(cafile=str(ca_file)))
        session = XenAPI.Session(host["host.name"], transport=trusted)
        session.xenapi.login_with_password("root", host["host.password"], "2.21", "test")
        assert session.xenapi.host.get_all()
        untrusting = XenAPI.Session(host["host.name"])
        with pytest.raises(ssl.SSLError):
            untrusting.xenapi.login_with_password("root", host["host.password"], "2.21", "test")
        key = next(path.parent.glob("*.sim-key.pem"))
        assert (key.stat().st_mode & 0o777) == 0o600
    finally:
        stop_sim(process)


def test_a_taken_port_is_a_clear_error(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dynvm",
                "sim",
                "--hosts",
                "1",
                "--base-port",
                str(port),
                "--write-config",
                str(tmp_path / "x.ini"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "COLUMNS": "200"},
        )
    assert result.returncode == 1
    assert "cannot start the lab" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
