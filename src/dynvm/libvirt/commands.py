"""The command-line side of the libvirt provider: ``dynvm image build`` and the lab that
``dynvm lab --provider libvirt`` serves (``cli.py`` wires them)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from ..running_lab import RunningLab

LAB_NAME = "dynvm-lab"


def image_dir() -> Path:
    """Where guest images are kept between runs: ``$DYNVM_IMAGE_DIR``, else a folder that
    QEMU's own user can read."""
    return Path(os.environ.get("DYNVM_IMAGE_DIR", "/var/cache/dynvm/images"))


def build_image(directory: Path) -> None:
    """``dynvm image build``: build the image, or say it is reused, and where its parts are."""
    from .image import ImageError, build

    console = Console()
    try:
        image = build(directory, lambda step: console.print(f"  {step}", markup=False, highlight=False))
    except ImageError as e:
        console.print(f"Error: {e}", style="red", markup=False)
        raise typer.Exit(1) from None
    console.print(f"base volume: {image.disk}", markup=False, highlight=False)
    console.print(f"direct boot: {image.kernel} {image.initrd}", markup=False, highlight=False)
    console.print(f"ssh key:     {image.key}", markup=False, highlight=False)


def own_network_namespace() -> bool:
    """Whether this process runs in a named network namespace (``ip netns add``)."""
    try:
        ours = os.stat("/proc/self/ns/net").st_ino
        return any(os.stat(named).st_ino == ours for named in Path("/run/netns").iterdir())
    except OSError:
        return False


def libvirtd_elsewhere() -> int | None:
    """The pid of a libvirtd that runs in another network namespace than this process
    (its guests' network would be out of this process's reach), or None."""
    from .lab import daemon_pid

    pid = daemon_pid("libvirtd")
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net").st_ino if pid is not None else None
    except OSError:
        return None
    return pid if theirs is not None and theirs != os.stat("/proc/self/ns/net").st_ino else None


@contextlib.contextmanager
def libvirt_lab(directory: Path, config_path: Path, console: Console) -> Iterator[RunningLab]:
    """libvirtd (started where none runs), the guest image (built or reused), the lab's
    network and pool, and a config naming them; all torn down at the end."""
    from . import lab
    from .image import ImageError, build

    if not own_network_namespace():
        console.print(
            "Note: this runs in the machine's own network namespace. On machines that allow traffic only to "
            "loopback, run it in one of its own: ip netns add dynvm && ip netns exec dynvm ip link set lo up && "
            "ip netns exec dynvm dynvm lab --provider libvirt",
            style="yellow",
            markup=False,
        )
    elsewhere = libvirtd_elsewhere()
    if elsewhere is not None:
        console.print(
            f"Error: libvirtd (pid {elsewhere}) runs in another network namespace: its guests would be out of "
            "reach from here. Stop it, or run the lab in its namespace.",
            style="red",
            markup=False,
        )
        raise typer.Exit(1)
    try:
        console.print("Building (or reusing) the guest image...", markup=False)
        image = build(image_dir())
        console.print("Starting libvirt: daemons, network, storage pool...", markup=False)
        made = lab.start(LAB_NAME, directory / "libvirt", image)
    except (ImageError, lab.LabError) as e:
        console.print(f"Error: {e}", style="red", markup=False)
        raise typer.Exit(1) from None
    try:
        config_path.write_text(
            "[common]\ncpu.overcommit=4\nvm.network.timeout.secs=120\nvm.expiry.minutes=60\n\n" + made.section(1, image)
        )
        yield RunningLab(
            "real guests under libvirt (QEMU, software emulation)",
            "tiny",
            lambda: True,
            (f"ssh -i {image.key} -o StrictHostKeyChecking=no root@<an address getservers gave>",),
        )
    finally:
        console.print("Removing the lab's guests, network and pool...", markup=False)
        lab.stop(made)
