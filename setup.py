"""The wheel carries the dashboard's front-end files (``web/vendor.py``): a wheel built from a
clean checkout, where ``make install`` never ran, draws its plots too. Everything else about
the package is in ``pyproject.toml``."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

VENDOR = Path("dynvm", "dashboard", "static", "vendor")


class BuildWithDashboard(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the source tree, which make install fills
        vendor = runpy.run_path(str(Path(__file__).parent / "web" / "vendor.py"))["vendor"]
        vendor(Path(self.build_lib) / VENDOR)


setup(cmdclass={"build_py": BuildWithDashboard})
