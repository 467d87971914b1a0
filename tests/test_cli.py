"""``dynvm token create / list / revoke`` on a real SQLite file."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from dynvm.auth import TokenStore
from dynvm.cli import build_cli
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
