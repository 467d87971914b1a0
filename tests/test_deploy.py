"""Running dynvm for real: the sample config names every key and loads as is, and the wheel
the project builds installs in a fresh venv and serves a lab from there."""

from __future__ import annotations

import re
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest
from bench.processes import free_port, wait_healthy

from dynvm import config, hosts

from .conftest import REPO

DEPLOY = REPO / "deploy"


def test_the_sample_config_loads_and_names_every_key(tmp_path: Path):
    settings = config.load_settings(DEPLOY / "dynvmservice.ini.sample")
    assert list(settings.warnings) == []
    text = (DEPLOY / "dynvmservice.ini.sample").read_text()
    sections = dict(re.findall(r"^\[([^\]]+)\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S))
    missing = []
    for section, keys in config.SECTION_KEYS.items():
        body = sections.get(section, "")
        missing += [f"[{section}] {key}" for key in sorted(keys) if not re.search(rf"^{re.escape(key)}=", body, re.M)]
        missing += [
            f"[{section}] <os>{suffix}"
            for suffix in config.SECTION_OS_SUFFIXES.get(section, ())
            if not re.search(rf"^[a-z0-9_-]+{re.escape(suffix)}=", body, re.M)
        ]
    # one section of every kind of host dynvm has, with every key of that kind
    for prefix in hosts.prefixes():
        kind = hosts.kind(prefix)
        assert kind is not None
        [body] = [body for section, body in sections.items() if re.fullmatch(rf"{prefix}[1-9][0-9]*", section)] or [""]
        missing += [
            f"[{prefix}N] {key}" for key in sorted(kind.known_keys) if not re.search(rf"^{re.escape(key)}=", body, re.M)
        ]
        for suffix in (kind.os_key_suffix, *kind.os_key_extras):
            if not re.search(rf"^[a-z0-9_-]+{re.escape(suffix)}=", body, re.M):
                missing.append(f"[{prefix}N] <os>{suffix}")
    assert missing == [], f"the sample does not show {missing}"
    assert {host.section for host in settings.hosts} == {s for s in sections if hosts.match(s)}


def test_the_unit_and_the_image_run_dynvm_serve_as_a_non_root_user():
    unit = (DEPLOY / "dynvm.service").read_text()
    assert "\nUser=dynvm\n" in unit
    assert "ExecStart=/opt/dynvm/bin/dynvm serve --config /etc/dynvm/dynvmservice.ini" in unit
    image = (DEPLOY / "Dockerfile").read_text()
    assert "\nUSER dynvm\n" in image
    assert 'VOLUME ["/etc/dynvm", "/var/lib/dynvm"]' in image
    assert '"--db", "sqlite:////var/lib/dynvm/dynvm.db"' in image


@pytest.mark.slow
def test_the_wheel_installs_in_a_fresh_venv_and_serves(tmp_path: Path, make_lab):
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = wheels.glob("dynvm-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)], capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, installed.stderr
    dynvm = env_dir / "bin" / "dynvm"
    lab = make_lab()
    ini = tmp_path / "lab.ini"
    lab.write_config(ini)
    assert subprocess.run([str(dynvm), "check-config", "--config", str(ini)], capture_output=True).returncode == 0
    port = free_port()
    db = f"sqlite:///{tmp_path / 'dynvm.db'}"
    serve = subprocess.Popen(
        [str(dynvm), "serve", "--config", str(ini), "--db", db, "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, serve, timeout=60)
        assert httpx.get(f"{base}/getavailablecount/centos", timeout=10).text == "8"
        assert httpx.get(f"{base}/docs/assets/swagger-ui.css", timeout=10).status_code == 200  # package data
        [ip] = httpx.get(f"{base}/getservers/fromwheel", timeout=60).json()
        assert ip.startswith("127.77.")
        assert httpx.get(f"{base}/releaseservers/fromwheel", timeout=60).json() == ["fromwheel"]
    finally:
        serve.terminate()
        output, _ = serve.communicate(timeout=60)
    assert serve.returncode == 0, output
    assert "Traceback" not in output
