"""``dynvm token create / list / revoke`` on a real SQLite file."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from dynvm.auth import TokenStore
from dynvm.cli import build_cli
from dynvm.progress_log import ProgressLog
from dynvm.store.db import Database


def dynvm(*args: str, columns: int = 200):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(build_cli(), list(args), env={"COLUMNS": str(columns)})


def test_a_token_is_shown_once_listed_without_itself_and_revoked(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    created = dynvm("token", "create", "alice", "--admin", "--db", url)
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    store = TokenStore(Database(url))
    caller = store.verify(token)
    assert caller is not None
    assert (caller.user, caller.admin) == ("alice", True)

    listed = dynvm("token", "list", "--db", url, columns=80)  # a common terminal width
    assert listed.exit_code == 0, listed.output
    assert token not in listed.stdout  # only its id, never the token
    [info] = store.list()
    assert info.id in listed.stdout  # whole, so that it can be pasted into revoke
    assert "alice" in listed.stdout
    assert "…" not in listed.stdout  # nothing cut short

    revoked = dynvm("token", "revoke", info.id, "--db", url)
    assert revoked.exit_code == 0
    assert store.verify(token) is None
    again = dynvm("token", "revoke", info.id, "--db", url)
    assert again.exit_code == 1
    assert f"no token with id {info.id}" in again.output


def test_a_user_name_is_checked(tmp_path: Path):
    bad = dynvm("token", "create", "bad name!", "--db", f"sqlite:///{tmp_path / 'd.db'}")
    assert bad.exit_code == 2
    assert "a user name is 1 to 64 letters" in bad.output


def test_doctor_follows_a_pool_member_to_its_master_and_names_the_members(sim_lab):
    lab = sim_lab(pool_size=3)
    text = lab.settings.source.read_text().replace(lab.lab.nodes[0].url, lab.lab.members[1][0].url)
    lab.settings.source.write_text(text)
    run = CliRunner().invoke(build_cli(), ["doctor", "--config", str(lab.settings.source)], env={"COLUMNS": "200"})
    assert run.exit_code == 0, run.output
    output = " ".join(run.output.split())
    assert "3 hosts, master sim-xen-01; members sim-xen-01-h2, sim-xen-01-h3" in output
    assert "(shared by the pool)" in output


def test_doctor_checks_every_host_and_exits_1_on_a_problem(sim_lab):
    lab = sim_lab(hosts=3)
    good = CliRunner().invoke(build_cli(), ["doctor", "--config", str(lab.settings.source)], env={"COLUMNS": "200"})
    assert good.exit_code == 0, good.output
    assert "all 3 host(s) fine" in good.output
    assert "'tmpl-cnt7.7'" in good.output
    text = lab.settings.source.read_text()
    sections = text.split("[xenhost")
    sections[2] = sections[2].replace("centos8.template=tmpl-cnt8.0", "centos8.template=tmpl-rhel")  # xenhost2
    sections[3] = re.sub(r"host.password=\S+", "host.password=wrong", sections[3])  # xenhost3
    sections[1] = sections[1].replace("oel8.template=tmpl-oel8", "oel8.template=tmpl-")  # xenhost1: ambiguous
    lab.settings.source.write_text("[xenhost".join(sections))
    bad = CliRunner().invoke(build_cli(), ["doctor", "--config", str(lab.settings.source)], env={"COLUMNS": "200"})
    assert bad.exit_code == 1
    output = " ".join(bad.output.split())
    assert "no template named 'tmpl-rhel' (or starting with it): fix centos8.template" in output
    assert "refused the login of user 'root'" in output
    assert "templates start with 'tmpl-'" in output
    assert "give the whole name: fix oel8.template" in output
    assert "problems on xenhost1, xenhost2, xenhost3" in output
    assert "wrong" not in output  # never a password
    both = CliRunner().invoke(
        build_cli(), ["check-config", "--connect", "--config", str(lab.settings.source)], env={"COLUMNS": "200"}
    )
    assert both.exit_code == 1
    assert "OS keys:" in both.output  # the config's table first ...
    assert "problems on xenhost1, xenhost2, xenhost3" in " ".join(both.output.split())  # ... then the hosts


def test_an_ini_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "broken.ini"
    bad.write_text("[common]\nvm.expiry.minutes=720\nthis line has no equals sign secret-ish\n")
    result = CliRunner().invoke(build_cli(), ["check-config", "--config", str(bad)])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert f"{bad}: not a valid ini file" in output
    assert "line 3" in output
    assert "secret-ish" not in output  # the line's content may hold a password


def test_a_database_command_without_a_config_refuses_instead_of_making_one(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DYNVM_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    for args in (
        ["token", "list"],
        ["token", "create", "alice"],
        ["token", "revoke", "abc"],
        ["installation", "show"],
        ["history", "export", "--trace", str(tmp_path / "t.csv")],
    ):
        run = dynvm(*args)
        assert run.exit_code == 2, (args, run.output)
        assert "no configuration found" in run.stderr
        assert "--db URL" in run.stderr
        assert run.stdout == ""  # nothing a script could take for an answer
    assert not list(tmp_path.rglob("*.db"))  # nothing made in the home folder, nor here
    doctor = dynvm("doctor")
    assert doctor.exit_code == 2
    assert "no configuration found" in doctor.output


def test_config_and_server_work_before_the_command_too(tmp_path: Path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    config = tmp_path / "dynvm.ini"
    config.write_text(f"[common]\ndb.url={url}\n")
    assert dynvm("token", "create", "alice", "--db", url).exit_code == 0
    for args in (["--config", str(config), "token", "list"], ["token", "list", "--config", str(config)]):
        listed = dynvm(*args)
        assert listed.exit_code == 0, listed.output
        assert "alice" in listed.stdout
    monkeypatch.setenv("DYNVM_SERVER", "http://127.0.0.1:9")  # the option beats the variable
    before = dynvm("--server", "http://127.0.0.1:1", "ls")
    assert "cannot reach dynvm at http://127.0.0.1:1" in before.output
    after = dynvm("--server", "http://127.0.0.1:1", "ls", "--server", "http://127.0.0.1:2")  # after wins
    assert "cannot reach dynvm at http://127.0.0.1:2" in after.output


def test_config_works_between_a_group_and_its_command(tmp_path: Path):
    """``dynvm history --config X export`` is where people put it too: the group takes the
    options its commands have, as the root does, and one given after the command wins."""
    url = f"sqlite:///{tmp_path / 'd.db'}"
    config = tmp_path / "dynvm.ini"
    config.write_text(f"[common]\ndb.url={url}\n")
    assert dynvm("token", "create", "alice", "--db", url).exit_code == 0
    listed = dynvm("token", "--config", str(config), "list")
    assert listed.exit_code == 0, listed.output
    assert "alice" in listed.stdout
    trace = tmp_path / "trace.csv"
    exported = dynvm("history", "--config", str(config), "export", "--trace", str(trace))
    assert exported.exit_code == 0, exported.output
    assert trace.read_text().startswith("arrival_s,user,os,count,hold_s")
    elsewhere = tmp_path / "other.ini"
    elsewhere.write_text(f"[common]\ndb.url=sqlite:///{tmp_path / 'other.db'}\n")
    after = dynvm("token", "--config", str(elsewhere), "list", "--config", str(config))  # after wins
    assert "alice" in after.stdout


def test_a_log_gets_a_line_when_the_request_moves_and_once_a_minute_else():
    now = [0.0]
    log = ProgressLog(clock=lambda: now[0])
    said = []
    base = {"id": "12345678", "vms": [], "eta": "t"}
    for second in range(130):  # its ETA ticks down every second; its place changes once
        now[0] = float(second)
        status = {**base, "state": "queued", "position": 2 if second < 10 else 1, "eta_seconds": 130.0 - second}
        said.append(log.line(status))
    now[0] = 131.0
    said.append(log.line({**base, "state": "creating"}))
    said.append(log.line({**base, "state": "creating"}))
    lines = [(at, line) for at, line in enumerate(said) if line is not None]
    assert [at for at, _ in lines] == [0, 10, 70, 130]
    assert lines[1][1] == "request 12345678: queued, number 1 in the queue, ready in about 120 s (t)"
    assert lines[-1][1] == "request 12345678: creating"


def _wide_lines(text: str, columns: int = 80) -> list[str]:
    return [line for line in text.splitlines() if len(line) > columns]


def test_the_help_reads_whole_at_80_columns():
    app = build_cli()
    groups = [[], ["token"], ["history"], ["installation"], ["image"]]
    commands = [
        [name]
        for name in ("sim", "check-config", "doctor", "serve", "lab", "replay", "get", "release", "ls", "capacity")
    ] + [["token", "create"], ["token", "list"], ["history", "export"], ["installation", "new"]]
    for args in groups + commands:
        shown = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert shown.exit_code == 0, (args, shown.output)
        assert _wide_lines(shown.output) == [], args
        cut = [line for line in shown.output.splitlines() if line.rstrip().endswith("...") and "Usage:" not in line]
        assert cut == [], args  # click cuts a summary that does not fit with "..."


def test_check_config_shows_a_long_address_whole_at_80_columns(tmp_path: Path):
    address = "https://xenserver-prod-01.example.internal:443"
    config = tmp_path / "dynvm.ini"
    config.write_text(
        f"[xenhost1]\nhost.name={address}\nhost.user=root\nhost.password=pw\n"
        "host.storage.name=Local storage\ncentos.template=tmpl-cnt7.7\n"
    )
    shown = dynvm("check-config", "--config", str(config), columns=80)
    assert shown.exit_code == 0, shown.output
    assert _wide_lines(shown.output) == []
    assert "…" not in shown.output
    rows = [line.split("│") for line in shown.output.splitlines() if line.startswith("│")]
    column = "".join(row[3].strip() for row in rows)  # the address column, its folded lines joined
    assert column == address
