"""Running dynvm for real: the sample config names every key and loads as is, and the wheel
the project builds installs in a fresh venv and serves a lab from there."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import httpx
import pytest
from bench.processes import free_port, wait_healthy
from playwright.sync_api import expect, sync_playwright

from dynvm import config, hosts

from .conftest import REPO

DEPLOY = REPO / "deploy"
VENDOR = Path("src/dynvm/dashboard/static/vendor")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


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


def _clean_checkout(into: Path) -> Path:
    """The files git would put in a clone of this tree (tracked, or new and not ignored):
    no .venv, no node_modules, none of the front-end files make install copies."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def _docker_ignores(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns keep ``path`` out of the build context (its rules as
    this file uses them: a pattern matches from the root, ``**/`` at any depth, and a
    folder it matches takes what is under it)."""
    parts = path.split("/")
    for pattern in patterns:
        anywhere = pattern.startswith("**/")
        pattern = pattern.removeprefix("**/")
        depth = pattern.count("/") + 1
        starts = range(len(parts) - depth + 1) if anywhere else range(1)
        for start in starts:
            for end in range(start + depth, len(parts) + 1):
                if end - start == depth and fnmatch.fnmatchcase("/".join(parts[start:end]), pattern):
                    return True
    return False


def test_the_image_is_built_in_stages_from_a_context_without_local_state():
    image = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", image, re.M)
    assert [name for _, name in stages] == ["frontend", "wheel", ""]
    assert stages[0][0].startswith("node:")
    assert "npm ci" in image
    assert "COPY --from=wheel /wheels /wheels" in image
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    for local in (".venv/bin/python", ".lab/dynvmservice.ini", ".git/HEAD", "web/node_modules/uplot/LICENSE"):
        assert _docker_ignores(local, patterns), f"{local} would be sent to the image's build"
    needed = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "web/vendor.py", "web/package-lock.json"]
    needed += [str(path.relative_to(REPO)) for path in (REPO / "src").rglob("*.py")]
    assert [name for name in needed if _docker_ignores(name, patterns)] == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_wheel_built_from_a_clean_checkout_installs_in_a_fresh_venv_serves_and_draws_its_plots(
    tmp_path: Path, make_lab
):
    checkout = _clean_checkout(tmp_path / "checkout")
    assert not (checkout / VENDOR).exists()
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(wheels), str(checkout)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [wheel] = wheels.glob("dynvm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        inside = set(archive.namelist())
    assert {f"{VENDOR.relative_to('src')}/{name}" for name in ("uPlot.iife.min.js", "uPlot.min.css")} <= inside
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
        _the_dashboard_draws_its_plots(base)
    finally:
        serve.terminate()
        output, _ = serve.communicate(timeout=60)
    assert serve.returncode == 0, output
    assert "Traceback" not in output


def _the_dashboard_draws_its_plots(base: str) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Debian's chromium is not installed at {CHROMIUM}: run `make browser`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(base)
            for plot in ("#usage-plot", "#ttv-plot"):
                expect(page.locator(f"{plot} canvas")).to_have_count(1, timeout=20_000)
            expect(page.get_by_text("The plot library is missing")).to_have_count(0)
        finally:
            browser.close()
