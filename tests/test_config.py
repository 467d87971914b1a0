"""``.dynvmservice.ini`` loading, validation and hot reload."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynvm.cli import build_cli
from dynvm.config import ConfigError, ConfigWatcher, Secret, Settings, load_settings, locate_config

SEED_FILE = """\
[couchbase]
couchbase.server=cb.example.invalid
couchbase.bucket=QE-dynserver-pool
couchbase.username=Administrator
couchbase.userpassword=cb-secret-123

[common]
vm.expiry.minutes=720          ; default and maximum lifetime
vm.network.timeout.secs=400    ; how long to wait for a VM's IP

[xenhost1]
host.name=172.23.0.10
host.user=root
host.password=xen%pass#1;x
host.storage.name=Local Storage 01
centos.template=tmpl-cnt7.7
centos7.template=tmpl-cnt7.7
windows.template=tmpl-win16dc - PATCHED (1)
centos8.template=tmpl-cnt8.0
oel8.template=tmpl-oel8
debian10.template=tmpl-deb10-too
ubuntu18.template=tmpl-ubu18-4cgb
suse15.template=tmpl-suse15

[xenhost2]
host.name=http://127.0.0.1:9001
host.user=root
host.password=other-secret
host.storage.name=Local Storage 02
centos.template=tmpl-cnt7.7
"""

PASSWORDS = ("xen%pass#1;x", "other-secret", "cb-secret-123")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_seed_file_loads_as_is(tmp_path: Path):
    settings = load_settings(write(tmp_path / "seed.ini", SEED_FILE))
    assert settings.common.expiry_minutes == 720
    assert settings.common.network_timeout_secs == 400
    assert settings.couchbase.enabled
    assert settings.couchbase.password.reveal() == "cb-secret-123"
    one, two = settings.hosts
    assert (one.ref, one.section) == ("1", "xenhost1")
    assert one.url == "https://172.23.0.10"  # a bare address means xapi's HTTPS
    assert one.password.reveal() == "xen%pass#1;x"  # '%', '#' and ';' survive in a password
    assert one.templates["windows"] == "tmpl-win16dc - PATCHED (1)"
    assert one.templates["centos"] == one.templates["centos7"] == "tmpl-cnt7.7"
    assert len(one.templates) == 8
    assert two.url == "http://127.0.0.1:9001"
    assert two.templates == {"centos": "tmpl-cnt7.7"}  # hosts may carry different subsets
    assert one.tls_verify is True
    assert settings.warnings == ()
    assert settings.os_keys == sorted(one.templates)


def test_passwords_never_show_in_reprs(tmp_path: Path):
    settings = load_settings(write(tmp_path / "seed.ini", SEED_FILE))
    text = repr(settings) + str(settings) + repr(settings.hosts) + str(settings.couchbase)
    for password in PASSWORDS:
        assert password not in text
    assert repr(Secret("x")) == "Secret('********')"


@pytest.mark.parametrize(
    ("edit", "where", "what"),
    [
        (("host.name=172.23.0.10\n", ""), "[xenhost1] host.name", "is missing"),
        (("host.storage.name=Local Storage 01\n", ""), "[xenhost1] host.storage.name", "is missing"),
        (("host.password=xen%pass#1;x\n", ""), "[xenhost1] host.password", "is missing"),
        (("vm.expiry.minutes=720", "vm.expiry.minutes=soon"), "[common] vm.expiry.minutes", "must be a number"),
        (("vm.network.timeout.secs=400", "vm.network.timeout.secs=-1"), "[common] vm.network.timeout.secs", "positive"),
        (("host.name=172.23.0.10", "host.name=ftp://x"), "[xenhost1] host.name", "http(s) URL"),
        (("host.name=172.23.0.10", "host.name=https://root:pw@x"), "[xenhost1] host.name", "credentials"),
        (
            ("host.user=root\nhost.password=xen", "host.tls.verify=maybe\nhost.user=root\nhost.password=xen"),
            "[xenhost1] host.tls.verify",
            "true or false",
        ),
        (
            ("host.user=root\nhost.password=xen", "host.tls.ca_file=missing.pem\nhost.user=root\nhost.password=xen"),
            "[xenhost1] host.tls.ca_file",
            "does not exist",
        ),
        (("couchbase.bucket=QE-dynserver-pool\n", ""), "[couchbase] couchbase.bucket", "is needed too"),
        (("centos8.template", "CentOS 8.template"), "[xenhost1] centos 8.template", "OS key"),
    ],
)
def test_invalid_files_name_file_section_key_and_problem(tmp_path: Path, edit, where, what):
    old, new = edit
    assert old in SEED_FILE
    path = write(tmp_path / "bad.ini", SEED_FILE.replace(old, new, 1))
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {where}: ")
    assert what in message
    for password in PASSWORDS:
        assert password not in message


def test_a_host_without_templates_is_an_error(tmp_path: Path):
    path = write(tmp_path / "x.ini", "[xenhost3]\nhost.name=h\nhost.user=root\nhost.password=p\nhost.storage.name=s\n")
    with pytest.raises(ConfigError, match=r"\[xenhost3\]: has no <os>.template line"):
        load_settings(path)


def test_parse_errors_give_the_line_but_not_its_content(tmp_path: Path):
    path = write(tmp_path / "dup.ini", SEED_FILE.replace("host.user=root\n", "host.user=root\nhost.password=leak\n", 1))
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert "line" in str(error.value)
    assert "leak" not in str(error.value)


def test_unknown_keys_and_sections_are_warnings(tmp_path: Path):
    text = SEED_FILE.replace("[common]\n", "[common]\nvm.colour=blue\n") + "\n[mystery]\na=b\n"
    settings = load_settings(write(tmp_path / "extra.ini", text))
    assert any("[common] vm.colour: unknown key" in w for w in settings.warnings)
    assert any("[mystery]: unknown section" in w for w in settings.warnings)


def test_dynvm_keys_beyond_the_seeds(tmp_path: Path):
    text = SEED_FILE.replace("[common]\n", "[common]\ncpu.overcommit=2.5\ndb.url=postgresql://db/dynvm\n").replace(
        "host.storage.name=Local Storage 02\n",
        "host.storage.name=Local Storage 02\nhost.network=CI net\nhost.tls.verify=false\n",
    )
    settings = load_settings(write(tmp_path / "extra.ini", text))
    assert settings.common.cpu_overcommit == 2.5
    assert settings.common.db_url == "postgresql://db/dynvm"
    assert settings.hosts[1].network == "CI net"
    assert settings.hosts[1].tls_verify is False


def test_a_relative_ca_file_is_read_beside_the_config(tmp_path: Path):
    (tmp_path / "xapi-ca.pem").write_text("not checked here")
    text = SEED_FILE.replace("host.user=root\n", "host.tls.ca_file=xapi-ca.pem\nhost.user=root\n", 1)
    settings = load_settings(write(tmp_path / "tls.ini", text))
    assert settings.hosts[0].tls_ca_file == tmp_path / "xapi-ca.pem"


def test_locate_config_order(tmp_path: Path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    explicit = tmp_path / "explicit.ini"
    assert locate_config(explicit, {"DYNVM_CONFIG": "/env.ini"}, home, cwd) == explicit
    assert locate_config(None, {"DYNVM_CONFIG": "/env.ini"}, home, cwd) == Path("/env.ini")
    (cwd / ".dynvmservice.ini").write_text("")
    assert locate_config(None, {}, home, cwd) == cwd / ".dynvmservice.ini"
    (home / ".dynvmservice.ini").write_text("")
    assert locate_config(None, {}, home, cwd) == home / ".dynvmservice.ini"
    with pytest.raises(ConfigError, match="no configuration found"):
        locate_config(None, {}, tmp_path / "nohome", tmp_path / "nocwd")


def test_check_config_exits_2_with_the_message(tmp_path: Path):
    bad = write(tmp_path / "bad.ini", SEED_FILE.replace("vm.expiry.minutes=720", "vm.expiry.minutes=x"))
    result = CliRunner().invoke(build_cli(), ["check-config", "--config", str(bad)])
    assert result.exit_code == 2
    assert f"Error: {bad}: [common] vm.expiry.minutes: must be a number" in " ".join(result.output.split())
    good = write(tmp_path / "good.ini", SEED_FILE)
    result = CliRunner().invoke(build_cli(), ["check-config", "--config", str(good)])
    assert result.exit_code == 0
    for password in PASSWORDS:
        assert password not in result.output


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Settings] = []
        self.changed = threading.Event()

    def __call__(self, settings: Settings) -> None:
        self.seen.append(settings)
        self.changed.set()

    def wait(self, timeout: float = 5.0) -> Settings:
        assert self.changed.wait(timeout), "no reload within the time limit"
        self.changed.clear()
        return self.seen[-1]


@pytest.fixture
def watched(tmp_path: Path):
    path = write(tmp_path / "watched.ini", SEED_FILE)
    recorder = Recorder()
    watcher = ConfigWatcher(path, load_settings(path), recorder)
    watcher.start()
    yield path, watcher, recorder
    watcher.stop()


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_reload_sees_an_added_host_a_changed_one_and_a_removed_one(watched):
    path, watcher, recorder = watched
    added = (
        SEED_FILE + "\n[xenhost3]\nhost.name=10.9.9.9\nhost.user=root\nhost.password=p3\n"
        "host.storage.name=SR3\ncentos.template=tmpl-cnt7.7\n"
    )
    path.write_text(added)
    assert [h.ref for h in recorder.wait(2.5).hosts] == ["1", "2", "3"]
    changed = added.replace("host.storage.name=SR3", "host.storage.name=SR3b")
    replace_atomically(path, changed)  # editors that write a new file and rename it
    assert recorder.wait(2.5).host("3").storage_name == "SR3b"
    removed = changed.replace("[xenhost2]", "[ignored-now]")
    path.write_text(removed)
    assert [h.ref for h in recorder.wait(2.5).hosts] == ["1", "3"]
    assert watcher.current.host("2") is None


def test_an_invalid_edit_keeps_the_last_good_config(watched, caplog):
    path, watcher, recorder = watched
    good = watcher.current
    path.write_text(SEED_FILE.replace("vm.expiry.minutes=720", "vm.expiry.minutes=never"))
    assert not watcher.reload()  # loading it now, rather than waiting, shows the same outcome
    assert watcher.current == good
    assert "keeping the last good one" in caplog.text
    assert "vm.expiry.minutes" in caplog.text
    path.write_text(SEED_FILE.replace("vm.expiry.minutes=720", "vm.expiry.minutes=60"))
    assert recorder.wait(2.5).common.expiry_minutes == 60


@pytest.mark.parametrize(
    "name", ["http://root:s3cr3t-in-url@xen1:notaport", "ftp://root:s3cr3t-in-url@xen1", "http://:s3cr3t-in-url@"]
)
def test_a_password_written_into_host_name_is_never_echoed(tmp_path: Path, name: str):
    path = write(tmp_path / "c.ini", SEED_FILE.replace("host.name=172.23.0.10", f"host.name={name}"))
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert "[xenhost1] host.name" in str(error.value)
    assert "s3cr3t-in-url" not in str(error.value)


def test_orphan_quarantine_hours(tmp_path: Path):
    assert load_settings(write(tmp_path / "a.ini", SEED_FILE)).common.quarantine_hours == 24
    text = SEED_FILE.replace("[common]\n", "[common]\norphan.quarantine.hours=0\n")
    assert load_settings(write(tmp_path / "b.ini", text)).common.quarantine_hours == 0


def test_the_readiness_probe_is_sshd_or_winrm_unless_the_config_says_otherwise(tmp_path: Path):
    seed = load_settings(write(tmp_path / "seed.ini", SEED_FILE)).probe
    assert (seed.port_for("centos"), seed.port_for("windows"), seed.port_for("win2019")) == (22, 5985, 5985)
    text = SEED_FILE + "\n[probe]\nport=2222\nwindows.port=15985\nsuse15.port=0\n"
    probe = load_settings(write(tmp_path / "probe.ini", text)).probe
    assert probe.port_for("centos") == 2222
    assert probe.port_for("windows") == 15985
    assert probe.port_for("suse15") is None  # 0 turns it off for that OS
    off = load_settings(write(tmp_path / "off.ini", SEED_FILE + "\n[probe]\nenabled=false\n")).probe
    assert off.port_for("centos") is None


@pytest.mark.parametrize("line", ["port=ssh", "port=70000", "cent os.port=22"])
def test_a_bad_probe_line_is_an_error_naming_it(tmp_path: Path, line: str):
    with pytest.raises(ConfigError, match=r"\[probe\]"):
        load_settings(write(tmp_path / "bad.ini", SEED_FILE + f"\n[probe]\n{line}\n"))


def test_learned_sizings_ceiling_is_a_line_or_a_quarter_of_the_lab_and_never_under_ten():
    from dynvm.config import ReadyPoolSettings

    pools = ReadyPoolSettings(maxima={"windows": 3})
    assert pools.maximum("windows", slots=1000) == 3  # an <os>.max line is the ceiling, whatever the lab
    assert pools.maximum("centos", slots=16) == 10  # a small lab keeps the old ceiling
    assert pools.maximum("centos", slots=1120) == 280  # 140 hosts: a nightly wave is not capped at 10


def test_a_host_is_found_by_its_ref_in_the_settings_it_belongs_to(tmp_path: Path) -> None:
    path = tmp_path / ".dynvmservice.ini"
    path.write_text(SEED_FILE)
    settings = load_settings(path)
    for host in settings.hosts:
        assert settings.host(host.ref) is host
    assert settings.host("999") is None
    fewer = dataclasses.replace(settings, hosts=settings.hosts[1:])  # as providers.py narrows them to one kind
    assert fewer.host(settings.hosts[0].ref) is None
    assert fewer.host(settings.hosts[1].ref) is settings.hosts[1]
