"""A tiny guest that behaves like a CI VM, built from this machine's Debian packages only
(never downloaded): the Debian kernel, busybox-static as init and tools, dropbear as sshd,
and the kernel's own NIC modules. ``dynvm image build`` makes it; the libvirt tests and
``dynvm lab --provider libvirt`` boot it.

What a build leaves in its directory:

- ``tiny.qcow2``: a bootable disk (MBR, one FAT partition, syslinux, the kernel and the
  initramfs): the base volume every VM of the OS is a copy-on-write clone of;
- ``vmlinux`` and ``initrd.img``: the same kernel, uncompressed, and the same initramfs,
  for direct kernel boot (PVH skips the kernel's decompressor, which under TCG halves the
  boot: ``<os>.kernel=`` and ``<os>.initrd=`` in a ``[libvirthostN]`` section);
- ``id_ed25519`` (and ``.pub``): the key the guest's root accepts;
- ``manifest.json``: what it was built from. A build whose inputs have not changed is
  reused (``build`` returns at once), so tests and labs can call it every time.

The guest: busybox ``init``; ``udhcpc`` asks the network for an address; dropbear
listens on port 22; busybox ``acpid`` obeys an ACPI shutdown. Its root is the initramfs,
so a guest starts the same every time and its disk is its own scratch space.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUILD_VERSION = 1  # bump when what a build makes changes: older builds are made again
OS_NAME = "tiny"
MODULES = (  # loaded in this order (measured: the virtio NIC needs all of these before it)
    "failover",
    "net_failover",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "e1000",
    "virtio_rng",
    "button",
    "evdev",
)
PACKAGES = ("linux-image-amd64", "busybox-static", "dropbear-bin", "syslinux", "mtools", "qemu-utils", "cpio")
DISK_BYTES = 32 * 1024 * 1024
PARTITION_OFFSET = 1024 * 1024
MBR = "/usr/lib/syslinux/mbr/mbr.bin"  # syslinux-common: the boot code that starts the active partition

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
for module in {modules}; do insmod /lib/modules/$module.ko 2>/dev/null; done
exec /bin/init
"""

INITTAB = """::sysinit:/etc/rc
::respawn:/bin/udhcpc -f -i eth0 -s /etc/udhcpc.script -t 60 -T 1 -A 1
::respawn:/sbin/dropbear -F -E -s -p 22
::respawn:/bin/acpid -f -c /etc/acpi
::shutdown:/bin/umount -a -r
"""

RC = """#!/bin/sh
hostname dynvm-guest
ip link set lo up
ip link set eth0 up
"""

UDHCPC = """#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : ;;
esac
exit 0
"""

SYSLINUX_CFG = """DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND console=ttyS0 quiet
"""


class ImageError(Exception):
    """The guest image could not be built; the message says what is missing."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: where its files are."""

    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / f"{OS_NAME}.qcow2"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def key(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def manifest(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((self.directory / "manifest.json").read_text())
        return loaded


def kernel_release() -> str:
    """The newest Debian kernel installed for guests (``linux-image-amd64``)."""
    found = sorted(p.name.removeprefix("vmlinuz-") for p in Path("/boot").glob("vmlinuz-*"))
    if not found:
        raise ImageError("no kernel in /boot: install Debian's linux-image-amd64 (apt-get install linux-image-amd64)")
    return found[-1]


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if Path(p).exists()), None)
    if path is None:
        raise ImageError(f"{name} is missing: install Debian's {' '.join(PACKAGES)}")
    return path


def _inputs(release: str) -> dict[str, object]:
    """What a build is made of: a build with the same inputs is the same guest."""
    files = [Path(f"/boot/vmlinuz-{release}"), Path("/bin/busybox"), Path(_tool("dropbear"))]
    return {
        "build": BUILD_VERSION,
        "kernel": release,
        "machine": platform.machine(),
        "files": {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
    }


def build(directory: Path, progress: Callable[[str], None] = lambda _: None) -> GuestImage:
    """The guest image in ``directory``: reused when one built from the same inputs is
    there, else built anew (in a temporary folder beside it, moved in place at the end, so
    an interrupted build leaves nothing half made)."""
    release = kernel_release()
    inputs = _inputs(release)
    image = GuestImage(directory)
    manifest = directory / "manifest.json"
    if manifest.exists() and all(p.exists() for p in (image.disk, image.kernel, image.initrd, image.key)):
        try:
            if json.loads(manifest.read_text()).get("inputs") == inputs:
                progress(f"reusing the guest image in {directory}")
                return image
        except ValueError:
            pass
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".building-", dir=directory.parent) as scratch:
        work = Path(scratch)
        built = GuestImage(work / "out")
        built.directory.mkdir()
        progress("a key for the guest's root")
        _run(_tool("dropbearkey"), "-t", "ed25519", "-f", str(work / "key.dropbear"))
        private = subprocess.run(
            [_tool("dropbearconvert"), "dropbear", "openssh", str(work / "key.dropbear"), str(built.key)],
            capture_output=True,
            text=True,
        )
        if private.returncode != 0:
            raise ImageError(f"dropbearconvert failed: {private.stderr.strip()}")
        public = _run(_tool("dropbearkey"), "-y", "-f", str(work / "key.dropbear"))
        public_line = next(line for line in public.splitlines() if line.startswith("ssh-"))
        built.key.with_suffix(".pub").write_text(public_line + "\n")
        progress("the initramfs: busybox, dropbear, the NIC modules")
        _initramfs(work / "root", release, public_line, built.initrd)
        progress("the uncompressed kernel, for direct boot")
        built.kernel.write_bytes(extract_vmlinux(Path(f"/boot/vmlinuz-{release}").read_bytes()))
        progress("the bootable disk (syslinux on FAT)")
        _disk(work, Path(f"/boot/vmlinuz-{release}"), built.initrd, built.disk)
        (built.directory / "manifest.json").write_text(
            json.dumps({"os": OS_NAME, "inputs": inputs, "ssh_user": "root"}, indent=2) + "\n"
        )
        for path in (built.directory, *built.directory.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)  # qemu runs as another user
        built.key.chmod(0o600)
        if directory.exists():
            shutil.rmtree(directory)
        built.directory.rename(directory)
    progress(f"guest image built in {directory}")
    return GuestImage(directory)


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ImageError(f"{Path(command[0]).name} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _libraries(binary: str) -> list[str]:
    """The shared libraries ``binary`` loads (and the loader), as ``ldd`` lists them."""
    found = []
    for line in _run("ldd", binary).splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            found.append(path)
    return found


def _initramfs(root: Path, release: str, authorized_key: str, output: Path) -> None:
    for folder in ("bin", "sbin", "etc/dropbear", "etc/acpi/PWRF", "proc", "sys", "dev", "tmp", "root/.ssh", "var/run"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "lib/modules").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    dropbear = _tool("dropbear")
    shutil.copy2(dropbear, root / "sbin/dropbear")
    for library in _libraries(dropbear):
        target = root / library.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(library).resolve(), target)
    modules = Path(f"/lib/modules/{release}/kernel")
    for name in MODULES:
        found = [p for p in modules.rglob("*.ko*") if p.name.split(".ko")[0].replace("-", "_") == name]
        if not found:
            raise ImageError(f"kernel module {name} not found under {modules}")
        data = found[0].read_bytes()
        if found[0].name.endswith(".xz"):
            data = lzma.decompress(data)
        (root / f"lib/modules/{name}.ko").write_bytes(data)
    files = {
        "init": INIT.format(modules=" ".join(MODULES)),
        "etc/inittab": INITTAB,
        "etc/rc": RC,
        "etc/udhcpc.script": UDHCPC,
        "etc/acpi/PWRF/00000080": "#!/bin/sh\npoweroff\n",
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
        "etc/group": "root:x:0:\n",
        "etc/shells": "/bin/sh\n",
        "root/.ssh/authorized_keys": authorized_key + "\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    for name in ("init", "etc/rc", "etc/udhcpc.script", "etc/acpi/PWRF/00000080"):
        (root / name).chmod(0o755)
    (root / "root").chmod(0o700)
    (root / "root/.ssh").chmod(0o700)
    (root / "root/.ssh/authorized_keys").chmod(0o600)
    for link in ("bin/init", "bin/sh"):
        (root / link).symlink_to("busybox")
    _run(_tool("dropbearkey"), "-t", "ed25519", "-f", str(root / "etc/dropbear/dropbear_ed25519_host_key"))
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = subprocess.run(
        [_tool("cpio"), "-o", "-H", "newc", "--quiet", "-R", "0:0"],
        input="\n".join(names).encode(),
        cwd=root,
        capture_output=True,
    )
    if archive.returncode != 0:
        raise ImageError(f"cpio failed: {archive.stderr.decode().strip()}")
    output.write_bytes(gzip.compress(archive.stdout, compresslevel=6))


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed kernel inside a bzImage (Debian's are xz): what QEMU boots by PVH."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise ImageError("the kernel is not xz-compressed: cannot extract vmlinux")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    kernel = decompressor.decompress(bzimage[start:])
    if not kernel.startswith(b"\x7fELF"):
        raise ImageError("what the bzImage holds is not an ELF kernel")
    return kernel


def _partition_entry(first: int, sectors: int) -> bytes:
    """One MBR partition table entry: bootable, FAT16 (LBA addressing; the CHS fields
    say "beyond CHS", as every tool writes them for disks past 8 GB)."""
    beyond_chs = b"\xfe\xff\xff"
    return b"\x80" + beyond_chs + b"\x06" + beyond_chs + first.to_bytes(4, "little") + sectors.to_bytes(4, "little")


def _disk(work: Path, bzimage: Path, initrd: Path, output: Path) -> None:
    """MBR + one FAT partition at 1 MiB with syslinux, the kernel and the initramfs; all
    written into a plain file with mtools and sfdisk (no loop device), then made qcow2."""
    raw = work / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(DISK_BYTES)
    with raw.open("r+b") as f:
        f.seek(446)
        f.write(_partition_entry(PARTITION_OFFSET // 512, (DISK_BYTES - PARTITION_OFFSET) // 512))
        f.seek(510)
        f.write(b"\x55\xaa")
    part = f"{raw}@@{PARTITION_OFFSET}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for command in (
        [_tool("mformat"), "-i", part, "-v", "DYNVM", "::"],
        [_tool("syslinux"), "--offset", str(PARTITION_OFFSET), "--install", str(raw)],
        [_tool("mcopy"), "-i", part, str(bzimage), "::vmlinuz"],
        [_tool("mcopy"), "-i", part, str(initrd), "::initrd.img"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise ImageError(f"{Path(command[0]).name} failed: {(done.stderr or done.stdout).strip()}")
    config = work / "syslinux.cfg"
    config.write_text(SYSLINUX_CFG)
    _run(_tool("mcopy"), "-i", part, str(config), "::syslinux.cfg")
    mbr = Path(MBR).read_bytes()
    with raw.open("r+b") as f:
        f.write(mbr[:440])  # the boot code only: the partition table after it stays
    _run(_tool("qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(output))
