"""The dashboard's screenshots in docs/ (``make screenshots``): a ``dynvm sim`` lab and a
``dynvm serve`` on 127.0.0.1, a week of synthetic demand (``bench/demand.py``) written into
its history so the plots have something to show, a ready pool, a few leases made through
the API, and Debian's Chromium (Playwright) at 1280x800 and on a phone-sized viewport.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from bench.demand import WeekShape, generate
from bench.processes import serve_process, sim_process
from dynvm.store.db import Database
from dynvm.store.history import HistoryStore

DOCS = Path(__file__).resolve().parents[1] / "docs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LEASES = [("nightly-regression-", "centos", 4), ("ui-tests", "windows", 1), ("kernel-build-", "ubuntu18", 2)]


def _history(db_path: Path) -> None:
    """A synthetic week ending now, as if this lab had served it (scaled down)."""
    week = generate(WeekShape(scale=0.3), seed=3)
    start = time.time() - 7 * 86400
    past = [dataclasses.replace(d, arrival_s=start + d.arrival_s) for d in week if start + d.arrival_s < time.time()]
    db = Database(f"sqlite:///{db_path}")
    try:
        db.migrate()
        HistoryStore(db).import_demands(past, create_seconds=65)
    finally:
        db.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dynvm-screenshots-") as work:
        config, db = Path(work) / "lab.ini", Path(work) / "dynvm.db"
        with sim_process(config, "--hosts", "3", "--foreign-vms", "2", "--clone-seconds", "0.2"):
            config.write_text(config.read_text() + "\n[pools]\ncentos.ready=2\n")
            _history(db)
            with serve_process(config, db, timeout=120) as url:
                for name, os, count in LEASES:
                    body = {"os": os, "name": name, "count": count, "expires_in_minutes": 90}
                    httpx.post(f"{url}/api/v1/leases", params={"wait": "true"}, json=body, timeout=120)
                time.sleep(8)  # the ready pool fills
                with sync_playwright() as playwright:
                    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                    for file, viewport, full in (
                        ("dashboard.png", {"width": 1280, "height": 800}, True),
                        ("dashboard-phone.png", {"width": 390, "height": 844}, False),
                    ):
                        page = browser.new_page(viewport=viewport)
                        page.goto(url)
                        page.wait_for_selector("#lease-table tbody tr")
                        page.wait_for_timeout(1500)  # the plots
                        page.screenshot(path=DOCS / file, full_page=full)
                        print(f"wrote {DOCS / file}")
                    browser.close()


if __name__ == "__main__":
    main()
