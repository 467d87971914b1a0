"""A PostgreSQL database of its own for each test session (each xdist worker), dropped
afterwards. The server is the one CI and developers have at 127.0.0.1:5432; CI must reach
it (the tests fail loudly there), elsewhere they are skipped when it is down."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ADMIN_URL = os.environ.get("DYNVM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_url(worker_id: str) -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed: pip install -e '.[postgres]'")
    name = f"dynvm_test_{worker_id}_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {ADMIN_URL} is not reachable in CI: {e}")
        pytest.skip(f"PostgreSQL at {ADMIN_URL} is not reachable: {e}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture
def fresh_pg(pg_url: str) -> str:
    """The session's database, emptied: every table dropped, so migrations run anew."""
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return pg_url


class Backup:
    """One database, backed up and restored the way its kind is."""

    def __init__(self, url: str, folder: Path) -> None:
        self.url = url
        self.file = folder / "backup.dump"

    @property
    def sqlite_path(self) -> Path:
        return Path(self.url.removeprefix("sqlite:///"))

    @property
    def libpq_url(self) -> str:
        return self.url.replace("postgresql+psycopg://", "postgresql://", 1)

    def take(self) -> None:
        if self.url.startswith("sqlite:///"):
            source, target = sqlite3.connect(self.sqlite_path), sqlite3.connect(self.file)
            with target:
                source.backup(target)
            source.close()
            target.close()
        else:
            subprocess.run(["pg_dump", "-Fc", "-f", str(self.file), self.libpq_url], check=True)

    def restore(self) -> None:
        if self.url.startswith("sqlite:///"):
            for suffix in ("-wal", "-shm"):
                Path(f"{self.sqlite_path}{suffix}").unlink(missing_ok=True)
            shutil.copyfile(self.file, self.sqlite_path)
        else:
            subprocess.run(
                ["pg_restore", "--clean", "--if-exists", "--no-owner", "-d", self.libpq_url, str(self.file)],
                check=True,
            )


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'restored.db'}"
    if shutil.which("pg_dump") is None and not os.environ.get("CI"):
        pytest.skip("pg_dump is not installed")
    return request.getfixturevalue("fresh_pg")
