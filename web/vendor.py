"""The dashboard's front-end files, from the npm registry as ``package-lock.json`` pins them,
copied into a folder of the Python package: ``make install`` puts them in the source tree
(``src/dynvm/dashboard/static/vendor``), and the wheel's build (``setup.py``) into the wheel,
so that a wheel built from a clean checkout draws its plots. Node is needed at build time
only, never at run time.

Usage: ``python web/vendor.py [--fresh] TARGET`` (``--fresh``: ``npm ci`` and copy again,
as after a change to ``package-lock.json``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

WEB = Path(__file__).resolve().parent
FILES = {  # in the package -> in node_modules
    "uPlot.iife.min.js": "uplot/dist/uPlot.iife.min.js",
    "uPlot.min.css": "uplot/dist/uPlot.min.css",
    "uPlot.LICENSE": "uplot/LICENSE",
}


def vendor(target: Path, fresh: bool = False) -> None:
    """Fill ``target`` with the front-end files; ``npm ci`` only when they are not at hand."""
    if not fresh and all((target / name).is_file() for name in FILES):
        return
    modules = WEB / "node_modules"
    if fresh or not all((modules / source).is_file() for source in FILES.values()):
        npm = shutil.which("npm")
        if npm is None:
            sys.exit("the dashboard's front-end files need npm at build time (Debian: apt-get install nodejs npm)")
        command = [npm, "ci", "--prefix", str(WEB), "--ignore-scripts", "--no-audit", "--no-fund", "--no-update-notifier", "--loglevel=error"]
        subprocess.run(command, check=True)
    target.mkdir(parents=True, exist_ok=True)
    for name, source in FILES.items():
        shutil.copyfile(modules / source, target / name)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    fresh = "--fresh" in arguments
    paths = [a for a in arguments if a != "--fresh"]
    if len(paths) != 1:
        sys.exit("usage: python web/vendor.py [--fresh] TARGET")
    vendor(Path(paths[0]), fresh=fresh)
