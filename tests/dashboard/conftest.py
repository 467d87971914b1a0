"""A real ``dynvm serve`` process on a simulated lab, and Debian's Chromium driven by
Playwright (``make browser`` installs it; never a downloaded browser)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from dynvm.auth import TokenStore
from dynvm.store.db import Database

from ..conftest import SimLab
from ..test_serve import ServeProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class Dashboard:
    """The service, its lab, and a page of the dashboard on it (console errors collected)."""

    lab: SimLab
    serve: ServeProcess
    page: Page
    db: Path
    errors: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.serve.url

    def lease(self, name: str, token: str | None = None, minutes: float | None = None) -> dict:  # type: ignore[type-arg]
        """A lease made through the API, as a job would; ``minutes``: its lifetime."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        body = {"os": "centos", "name": name} | ({"expires_in_minutes": minutes} if minutes else {})
        answer = httpx.post(
            f"{self.url}/api/v1/leases",
            params={"wait": "true"},
            json=body,
            headers=headers,
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    def token(self, user: str, admin: bool = False) -> str:
        db = Database(f"sqlite:///{self.db}")
        try:
            return TokenStore(db).create(user, admin)
        finally:
            db.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Debian's chromium is not installed at {CHROMIUM}: run `make browser`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def dashboard(sim_lab: Callable[..., SimLab], browser: Browser, tmp_path: Path) -> Iterator[Callable[..., Dashboard]]:
    made: list[tuple[ServeProcess, Page]] = []

    def make(hosts: int = 2, auth: bool = False, viewport: tuple[int, int] = (1280, 800), pools: str = "") -> Dashboard:
        """``pools``: the ``[pools]`` section's lines, e.g. ``centos.ready=1``."""
        lab = sim_lab(hosts=hosts)
        config = tmp_path / f"dashboard{len(made)}.ini"
        extra = ("\n[auth]\nrequired=true\n" if auth else "") + (f"\n[pools]\n{pools}\n" if pools else "")
        config.write_text(newest_lab_config(tmp_path) + extra)
        db = tmp_path / f"dynvm{len(made)}.db"
        serve = ServeProcess(config, db)
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        made.append((serve, page))
        found = Dashboard(lab, serve, page, db)

        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                found.errors.append(message.text)

        page.on("console", console)
        page.on("pageerror", lambda error: found.errors.append(str(error)))
        page.on("dialog", lambda dialog: dialog.accept())  # the release button's confirm()
        return found

    yield make
    for serve, page in made:
        page.close()
        if serve.process.poll() is None:
            serve.stop()


def newest_lab_config(directory: Path) -> str:
    """The config ``sim_lab`` wrote last (``lab<N>.ini``)."""
    return max(directory.glob("lab*.ini"), key=lambda p: int(p.stem[3:])).read_text()
