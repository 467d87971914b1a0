"""``[libvirthostN]`` sections as people write them, and the guest image's build (both
without libvirt running: the real guests are in tests/libvirt)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from dynvm.config import ConfigError, load_settings
from dynvm.libvirt import image
from dynvm.libvirt.settings import LibvirtHostSettings

GOOD = """[libvirthost3]
uri=qemu+ssh://root@kvm3.example.com/system?keyfile=/etc/dynvm/id_ed25519
storage.pool=images
network=ci
domain.type=QEMU
centos.image=centos7.qcow2
centos.cpus=2
centos.memory.mib=2048
tiny.image=tiny.qcow2
tiny.kernel=boot/vmlinux
tiny.initrd=boot/initrd.img
"""


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    config = tmp_path / "dynvmservice.ini"
    config.write_text(text)
    return load_settings(config)


def test_a_libvirt_host_reads_its_uri_pool_network_and_each_oss_image(tmp_path: Path) -> None:
    settings = load(tmp_path, GOOD)
    [host] = settings.hosts
    assert isinstance(host, LibvirtHostSettings)
    assert host.ref == "3"
    assert (host.storage_pool, host.network, host.domain_type) == ("images", "ci", "qemu")
    assert host.templates == {"centos": "centos7.qcow2", "tiny": "tiny.qcow2"}
    assert (host.images["centos"].cpus, host.images["centos"].memory_mib) == (2, 2048)
    assert host.images["tiny"].kernel == (tmp_path / "boot/vmlinux").resolve()  # relative to the config
    assert host.origin == "kvm3.example.com"
    assert list(settings.warnings) == []


def test_mixed_with_xen_one_os_key_is_served_by_both_kinds(tmp_path: Path) -> None:
    xen = (
        "[xenhost1]\nhost.name=127.0.0.1\nhost.user=root\nhost.password=x\nhost.storage.name=sr\n"
        "centos.template=CentOS 7\n"
    )
    settings = load(tmp_path, xen + "\n" + GOOD)
    assert {h.section for h in settings.hosts} == {"xenhost1", "libvirthost3"}
    assert all("centos" in h.templates for h in settings.hosts)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("uri=qemu+ssh://root@kvm3.example.com/system?keyfile=/etc/dynvm/id_ed25519\n", ""), "uri.*is missing"),
        (("domain.type=QEMU", "domain.type=xen"), "must be kvm or qemu"),
        (("uri=qemu+ssh://root@", "uri=qemu+ssh://root:hunter2@"), "must not hold a password"),
        (("tiny.kernel=boot/vmlinux\n", ""), "needs tiny.kernel too"),
        (("centos.cpus=2", "centos.cpus=two"), "centos.cpus.*whole number"),
        (("centos.cpus=2", "ubuntu.cpus=2"), "names OS 'ubuntu', which has no ubuntu.image line"),
        (("[libvirthost3]", "[libvirthost3]\n[libvirthost3]"), "."),
    ],
)
def test_a_libvirt_section_written_wrong_says_what_is_wrong(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        load(tmp_path, GOOD.replace(*change, 1))
    assert "hunter2" not in str(raised.value)


def test_the_host_is_shown_without_credentials(tmp_path: Path) -> None:
    [host] = load(tmp_path, GOOD).hosts
    assert host.display == "libvirthost3 (qemu+ssh://root@kvm3.example.com/system?keyfile=/etc/dynvm/id_ed25519)"


def kernel_or_skip() -> None:
    try:
        image.kernel_release()
    except image.ImageError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs Debian's linux-image-amd64: {e}")
        pytest.skip(str(e))


def test_the_guest_image_is_built_from_this_machines_packages_and_reused(tmp_path: Path) -> None:
    kernel_or_skip()
    steps: list[str] = []
    built = image.build(tmp_path / "image", steps.append)
    assert built.kernel.read_bytes()[:4] == b"\x7fELF"  # uncompressed, for PVH direct boot
    assert built.disk.read_bytes()[:4] == b"QFI\xfb"  # qcow2
    assert built.key.with_suffix(".pub").read_text().startswith("ssh-ed25519 ")
    assert built.manifest["os"] == "tiny"
    assert any("bootable disk" in step for step in steps)
    again: list[str] = []
    image.build(tmp_path / "image", again.append)
    assert again == [f"reusing the guest image in {tmp_path / 'image'}"]


def test_a_lab_in_a_folder_qemus_user_cannot_reach_keeps_its_pool_where_it_can(tmp_path: Path) -> None:
    from dynvm.libvirt.lab import pool_folder

    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    assert pool_folder("dynvm-lab", private / ".lab") == Path("/var/lib/libvirt/images/dynvm-lab")
    shared = Path(tempfile.mkdtemp(dir="/var/tmp"))  # /var/tmp: every user may pass through
    try:
        shared.chmod(0o755)
        assert pool_folder("dynvm-lab", shared) == shared / "pool"
    finally:
        shared.rmdir()
