"""``dynvm token create / list / revoke`` on a real SQLite file."""

from __future__ import annotations

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
