"""Build a simulated host with what a freshly installed XenServer / XCP-ng host has, plus
dynvm's OS templates and, on request, VMs that dynvm did not create.

Values are modelled on the real records in ``../shared/xapi/real-records`` (XenServer 7.2
and 8): int64 fields as decimal strings, realistic ``cpu_info``, ``software_version``,
``platform`` and ``other_config`` maps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import lifecycle
from .catalogue import BUILTIN_TEMPLATES, TEMPLATE_SNAPSHOTS, TEMPLATES, OsTemplate
from .host import SimHost, host_memory_overhead, member_address
from .scheduler import Scheduler
from .settings import HostSpec, Timing

GUEST_PLATFORM = {
    "acpi": "1",
    "apic": "true",
    "cores-per-socket": "2",
    "device-model": "qemu-upstream-compat",
    "device_id": "0001",
    "hpet": "true",
    "nx": "true",
    "pae": "true",
    "timeoffset": "0",
    "vga": "std",
    "videoram": "8",
    "viridian": "false",
}

# What a real built-in template's platform holds (real-records/fog-xenserver,
# builtin_templates.yml: {nx, acpi, apic, pae, viridian}; XenServer 8 adds the device
# model): no cores-per-socket, so a VM made from one boots with any number of vCPUs.
BUILTIN_PLATFORM = {
    "nx": "true",
    "acpi": "1",
    "apic": "true",
    "pae": "true",
    "viridian": "false",
    "device-model": "qemu-upstream-compat",
}

BIOS_STRINGS = {
    "bios-vendor": "Xen",
    "bios-version": "",
    "system-manufacturer": "Xen",
    "system-product-name": "HVM domU",
    "system-version": "",
    "system-serial-number": "",
    "baseboard-manufacturer": "",
    "baseboard-product-name": "",
    "hp-rombios": "",
    "oem-1": "Xen",
    "oem-2": "MS_VM_CERT/SHA1/bdbeb6e0a816d43fa6d3fe8aaef04c2bad9d3e3d",
}

FOREIGN_NAMES = ("jenkins-agent", "perf-runner", "build-cache", "sdk-tester", "qe-static")


def build_host(
    spec: HostSpec,
    timing: Timing | None = None,
    scheduler: Scheduler | None = None,
    wallclock: Callable[[], float] = time.time,
    seed: int | None = None,
) -> SimHost:
    host = SimHost(spec, timing, scheduler, wallclock, seed)
    _populate(host)
    return host


def _populate(host: SimHost) -> None:
    store, spec, refs = host.store, host.spec, host.refs
    with store.lock:
        pool_name = f"sim-pool-{spec.index:02d}" if spec.pool_size > 1 else ""  # a one-host pool has no name
        refs.pool = store.create("pool", {"name_label": pool_name, "other_config": {"memory-ratio-hvm": "0.25"}})
        for position in range(spec.pool_size):
            _member(host, position)
        refs.host, refs.metrics = refs.members[0], refs.member_metrics[refs.members[0]]
        _storage(host)
        _network(host)
        store.update(
            "pool",
            refs.pool,
            master=refs.host,
            default_SR=refs.sr,
            suspend_image_SR=refs.sr,
            crash_dump_SR=refs.sr,
        )
        for member in refs.members:
            own = refs.local_srs.get(member, refs.sr)
            store.update("host", member, suspend_image_sr=own, crash_dump_sr=own)
            dom0 = _dom0(host, member)
            if member == refs.host:
                refs.dom0 = dom0
        for template in TEMPLATES:
            refs.templates[template.name_label] = _template(host, template)
        for name, vcpus, memory, windows in BUILTIN_TEMPLATES:
            _builtin_template(host, name, vcpus, memory, windows)
        for parent, name in TEMPLATE_SNAPSHOTS:
            _snapshot(host, refs.templates[parent], name)
        host.refresh_memory_free()
    for n in range(spec.foreign_vms):
        template = TEMPLATES[n % (len(TEMPLATES) - 1)]  # Linux ones: they boot quickly
        name = f"{FOREIGN_NAMES[n % len(FOREIGN_NAMES)]}-{spec.index:02d}-{n + 1:03d}"
        add_foreign_vm(host, name, template)


def _member(host: SimHost, position: int) -> str:
    """One host of the pool (``position`` 0 is the master): its record, metrics and CPUs.
    Every member has the spec's CPUs and memory; real pools are alike (xapi's pool-join
    asserts the members' CPUs are compatible)."""
    store, spec, refs = host.store, host.spec, host.refs
    now = host.now()
    name = spec.member_name(position)
    metrics = store.create(
        "host_metrics",
        {"memory_total": str(spec.memory), "memory_free": str(spec.memory), "live": True, "last_updated": now},
    )
    member = store.create(
        "host",
        {
            "name_label": name,
            "name_description": "Default install",
            "hostname": name,
            "address": member_address(position),
            "enabled": True,
            "memory_overhead": str(host_memory_overhead(spec.memory)),
            "API_version_major": "2",
            "API_version_minor": "21",
            "API_version_vendor": "XenSource",
            "software_version": {
                "product_version": "{}.{}.1".format(*spec.xenserver_version),
                "product_version_text": "{}.{}".format(*spec.xenserver_version),
                "product_version_text_short": "{}.{}".format(*spec.xenserver_version),
                "platform_name": "XCP",
                "platform_version": "3.2.1",
                "product_brand": "XCP-ng",
                "build_number": "release/yangtze/master/58",
                "hostname": "localhost",
                "date": "2024-04-02",
                "xapi": "1.20",
                "xen": "4.13.5-9.40",
                "linux": "4.19.0+1",
                "xencenter_min": "2.16",
                "xencenter_max": "2.16",
                "network_backend": "openvswitch",
                "db_schema": "5.602",
            },
            "cpu_info": {
                "cpu_count": str(spec.cpus),
                "socket_count": "2",
                "vendor": "GenuineIntel",
                "speed": "2597.070",
                "modelname": "Intel(R) Xeon(R) CPU E5-2660 v3 @ 2.60GHz",
                "family": "6",
                "model": "63",
                "stepping": "2",
                "flags": "fpu de tsc msr pae mce cx8 apic sep mca cmov pat clflush acpi mmx fxsr sse sse2 ht "
                "syscall nx lm constant_tsc rep_good nopl nonstop_tsc pni pclmulqdq monitor est ssse3 fma "
                "cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm",
                "features_pv": "17c9cbf5-f6f83203-2191cbf5-00000023-00000001-00000329-00000000-00000000",
                "features_hvm": "17cbfbff-f7fa3223-2d93fbff-00000023-00000001-000007ab-00000000-00000000",
            },
            "capabilities": ["xen-3.0-x86_64", "hvm-3.0-x86_32", "hvm-3.0-x86_32p", "hvm-3.0-x86_64", ""],
            "sched_policy": "credit",
            "supported_bootloaders": ["pygrub", "eliloader"],
            "metrics": metrics,
            "edition": "xcp-ng",
            "license_params": {"sku_type": "free", "restrict_vswitch_controller": "false"},
            "license_server": {"address": "localhost", "port": "27000"},
            "chipset_info": {"iommu": "true"},
            "display": "enabled",
            "virtual_hardware_platform_versions": ["0", "1", "2"],
            "allowed_operations": ["vm_migrate", "provision", "vm_resume", "evacuate", "vm_start"],
            "other_config": {"agent_start_time": f"{host.wallclock():.0f}.", "iscsi_iqn": ""},
            "ssl_legacy": False,
            "latest_synced_updates_applied": "unknown",
            "numa_affinity_policy": "default_policy",
            "ntp_mode": "Factory",
            "timezone": "UTC",
            "ssh_enabled": True,
            "last_software_update": now,
        },
    )
    for n in range(spec.cpus):
        store.create(
            "host_cpu",
            {
                "host": member,
                "number": str(n),
                "vendor": "GenuineIntel",
                "speed": "2597",
                "modelname": "Intel(R) Xeon(R) CPU E5-2660 v3 @ 2.60GHz",
                "family": "6",
                "model": "63",
                "stepping": "2",
                "utilisation": 0.0,
            },
        )
    refs.members.append(member)
    refs.member_metrics[member] = metrics
    return member


def _storage(host: SimHost) -> None:
    """The SR dynvm's disks go on, with a PBD per member that reaches it: a one-host pool's
    local LVM SR, or a pool's shared one (modelled on the shared ``lvmohba`` SR in
    real-records/ansible-test-vm-1-params.json: ``shared``, no content type, multipathed),
    plus the tools ISO SR every member mounts."""
    store, spec, refs = host.store, host.spec, host.refs
    if spec.shared_storage:
        sr_fields: dict[str, object] = {
            "type": "lvmohba",
            "content_type": "",
            "shared": True,
            "other_config": {"auto-scan": "false"},
            "sm_config": {
                "allocation": "thick",
                "devserial": "scsi-3600a098038302d353624495242443848",
                "multipathable": "true",
                "use_vhd": "true",
            },
        }
        device_config = {"SCSIid": "3600a098038302d353624495242443848"}
    else:
        sr_fields = {
            "type": "lvm",
            "content_type": "user",
            "shared": False,
            "other_config": {"i18n-key": "local-storage", "i18n-original-value-name_label": "Local storage"},
            "sm_config": {"allocation": "thick", "use_vhd": "true", "devserial": "scsi-3600508b1001c5e6f"},
        }
        device_config = {"device": "/dev/disk/by-id/scsi-3600508b1001c5e6f-part3"}

    def make_sr(description: str) -> str:
        return store.create(
            "SR",
            {
                "name_label": spec.storage_name,
                "name_description": description,
                "physical_size": str(spec.sr_size),
                "physical_utilisation": "0",
                "virtual_allocation": "0",
                "allowed_operations": ["vdi_create", "vdi_destroy", "vdi_clone", "vdi_snapshot", "vdi_resize", "scan"],
                **sr_fields,
            },
        )

    if spec.shared_storage:
        refs.sr = make_sr("")
        for member in refs.members:
            store.create(
                "PBD", {"host": member, "SR": refs.sr, "device_config": dict(device_config), "currently_attached": True}
            )
    else:
        # each member's own disk, all named alike (xapi makes "Local storage" on every host
        # of a pool; an admin renames them the same way); the pool's default is the master's
        for position, member in enumerate(refs.members):
            sr = make_sr(f"on {spec.member_name(position)}" if spec.pool_size > 1 else "")
            store.create(
                "PBD", {"host": member, "SR": sr, "device_config": dict(device_config), "currently_attached": True}
            )
            refs.local_srs[member] = sr
        refs.sr = refs.local_srs[refs.members[0]]
    refs.iso_sr = store.create(
        "SR",
        {
            "name_label": "XCP-ng Tools",
            "name_description": "XCP-ng Tools ISOs",
            "type": "iso",
            "content_type": "iso",
            "shared": True,
            "is_tools_sr": True,
            "physical_size": "-1",
            "physical_utilisation": "-1",
            "virtual_allocation": "0",
            "other_config": {"xensource_internal": "true", "xenserver_tools_sr": "true"},
            "sm_config": {},
        },
    )
    for member in refs.members:
        store.create(
            "PBD",
            {
                "host": member,
                "SR": refs.iso_sr,
                "device_config": {"location": "/opt/xensource/packages/iso", "legacy_mode": "true"},
                "currently_attached": True,
            },
        )
    refs.tools_iso = store.create(
        "VDI",
        {
            "name_label": "guest-tools.iso",
            "name_description": "",
            "SR": refs.iso_sr,
            "virtual_size": "61652992",
            "physical_utilisation": "61652992",
            "type": "user",
            "sharable": True,
            "read_only": True,
            "location": "guest-tools.iso",
            "managed": True,
            "is_tools_iso": True,
        },
    )


def _network(host: SimHost) -> None:
    store, refs = host.store, host.refs
    refs.network = store.create(
        "network",
        {
            "name_label": "Pool-wide network associated with eth0",
            "name_description": "",
            "bridge": "xenbr0",
            "MTU": "1500",
            "managed": True,
            "other_config": {},
            "allowed_operations": [],
            "purpose": [],
        },
    )
    for position, member in enumerate(refs.members):
        pif = _pif(host, member, position)
        if member == refs.host:
            refs.pif = pif


def _pif(host: SimHost, member: str, position: int) -> str:
    """A member's management interface on the pool-wide network."""
    return host.store.create(
        "PIF",
        {
            "device": "eth0",
            "network": host.refs.network,
            "host": member,
            "MAC": f"98:4b:e1:6a:10:{0x21 + position:02x}",
            "MTU": "1500",
            "VLAN": "-1",
            "physical": True,
            "currently_attached": True,
            "ip_configuration_mode": "Static",
            "IP": member_address(position),
            "netmask": "255.0.0.0",
            "gateway": "",
            "DNS": "",
            "management": True,
            "primary_address_type": "IPv4",
            "ipv6_configuration_mode": "None",
            "properties": {"gro": "on"},
            "capabilities": ["fcoe"],
            "igmp_snooping_status": "unknown",
        },
    )


def _vm_fields(name: str, vcpus: int, memory: int) -> dict[str, object]:
    return {
        "memory_overhead": str(lifecycle.hvm_memory_overhead(memory, vcpus, 1.0)),
        "name_label": name,
        "user_version": "1",
        "VCPUs_max": str(vcpus),
        "VCPUs_at_startup": str(vcpus),
        "VCPUs_params": {},
        "memory_static_max": str(memory),
        "memory_dynamic_max": str(memory),
        "memory_dynamic_min": str(memory),
        "memory_static_min": str(min(memory, 1024**3)),
        "memory_target": str(memory),
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "domid": "-1",
        "domarch": "",
        "PCI_bus": "",
        "recommendations": "",
        "affinity": "OpaqueRef:NULL",
        "generation_id": "0:0",
        "hardware_platform_version": "0",
        "domain_type": "hvm",
    }


def _dom0(host: SimHost, member: str) -> str:
    store, spec = host.store, host.spec
    metrics = store.create(
        "VM_metrics",
        {"memory_actual": str(spec.dom0_memory), "VCPUs_number": str(spec.dom0_vcpus), "start_time": host.now()},
    )
    name = str(store.get("host", member)["name_label"])
    fields = _vm_fields(f"Control domain on host: {name}", spec.dom0_vcpus, spec.dom0_memory)
    fields.update(
        name_description="The domain which manages physical devices and manages other domains",
        is_control_domain=True,
        power_state="Running",
        resident_on=member,
        domid="0",
        domain_type="pv",
        memory_overhead="0",  # dom0's memory is what Xen gave it at boot; no admission applies
        metrics=metrics,
        other_config={"storage_driver_domain": "OpaqueRef:NULL", "is_system_domain": "true"},
        allowed_operations=[],
    )
    dom0 = store.create("VM", fields)
    store.update("host", member, control_domain=dom0)
    return dom0


def _template(host: SimHost, template: OsTemplate) -> str:
    """A custom template as users make them: an empty CD drive (the Windows one holds the
    tools ISO), one VIF on the management network, and its root disk described in
    ``other_config['disks']`` so that ``VM.provision`` creates it on the chosen SR."""
    store, refs = host.store, host.refs
    fields = _vm_fields(template.name_label, template.vcpus, template.memory)
    sr_uuid = store.get("SR", refs.sr)["uuid"]  # an admin's template names the SR its disks go on
    disks = (
        f'<provision><disk device="0" size="{template.disk}" sr="{sr_uuid}" bootable="true" type="system"/></provision>'
    )
    fields.update(
        name_description=f"{template.base_template_name} template for CI",
        is_a_template=True,
        power_state="Halted",
        HVM_boot_policy="BIOS order",
        HVM_boot_params={"order": "cdn" if template.windows else "dc"},
        HVM_shadow_multiplier=1.0,
        platform=dict(GUEST_PLATFORM, viridian="true" if template.windows else "false"),
        bios_strings=dict(BIOS_STRINGS),
        other_config={
            "base_template_name": template.base_template_name,
            "install-methods": "cdrom" if template.windows else "cdrom,nfs,http,ftp",
            "linux_template": "false" if template.windows else "true",
            "mac_seed": "",
            "disks": disks,
        },
        allowed_operations=list(lifecycle.HALTED_OPERATIONS),
        recommendations='<restrictions><restriction field="memory-static-max" max="549755813888" />'
        '<restriction field="vcpus-max" max="32" /><restriction property="number-of-vbds" max="255" />'
        '<restriction property="number-of-vifs" max="7" /></restrictions>',
    )
    metrics = store.create("VM_metrics", {"memory_actual": "0", "VCPUs_number": "0", "install_time": host.now()})
    fields["metrics"] = metrics
    vm = store.create("VM", fields)
    host.guest_os[vm] = template
    lifecycle.create_vbd(
        host,
        {
            "VM": vm,
            "VDI": refs.tools_iso if template.windows else "OpaqueRef:NULL",
            "userdevice": "3",
            "bootable": False,
            "mode": "RO",
            "type": "CD",
            "empty": not template.windows,
            "unpluggable": True,
        },
    )
    lifecycle.create_vif(host, {"VM": vm, "network": refs.network, "device": "0", "MTU": "1500"})
    if template.windows:  # Windows guests in CI labs often have a second NIC: they report both
        lifecycle.create_vif(host, {"VM": vm, "network": refs.network, "device": "1", "MTU": "1500"})
    return vm


def _builtin_template(host: SimHost, name: str, vcpus: int, memory: int, windows: bool) -> str:
    """One of the host's own templates: no devices, a provision spec with sr="", and
    ``is_default_template`` (XenServer 7.2 on; older hosts only have the other_config key)."""
    fields = _vm_fields(name, vcpus, memory)
    disk = 32 * 1024**3 if windows else 10 * 1024**3
    fields.update(
        name_description=f"Template which allows VM installation from install media ({name})",
        is_a_template=True,
        is_default_template=True,
        power_state="Halted",
        HVM_boot_policy="BIOS order",
        HVM_boot_params={"order": "cdn" if windows else "dc"},
        HVM_shadow_multiplier=1.0,
        platform=dict(
            BUILTIN_PLATFORM, viridian="true" if windows else "false", **({"device_id": "0002"} if windows else {})
        ),
        other_config={
            "default_template": "true",
            "linux_template": "false" if windows else "true",
            "install-methods": "cdrom" if windows else "cdrom,nfs,http,ftp",
            "disks": f'<provision><disk device="0" size="{disk}" sr="" bootable="true" type="system"/></provision>',
        },
        allowed_operations=list(lifecycle.HALTED_OPERATIONS),
    )
    return host.store.create("VM", fields)


def _snapshot(host: SimHost, parent: str, name: str) -> str:
    """A snapshot of a template, as VM.snapshot leaves it: a template too, pointing at its
    parent (``snapshot_of``), with copy-on-write disks of its own."""
    store = host.store
    source = store.get("VM", parent)
    fields = {k: v for k, v in source.items() if k not in ("uuid", "VBDs", "VIFs", "snapshots", "children", "metrics")}
    fields.update(
        name_label=name,
        is_a_template=True,
        is_a_snapshot=True,
        snapshot_of=parent,
        snapshot_time=host.now(),
        allowed_operations=["clone", "destroy"],
        other_config={**dict(source["other_config"]), "mac_seed": ""},  # type: ignore[call-overload]  # a record's fields are object-typed; other_config is a map
    )
    return store.create("VM", fields)


def add_foreign_vm(host: SimHost, name: str, template: OsTemplate, running: bool = True) -> str:
    """A VM made by hand on the host, not by dynvm: it carries no dynvm marker. When
    ``running``, it is up with its address at once."""
    vm = lifecycle.clone(host, host.refs.templates[template.name_label], name, instant=True)
    lifecycle.provision(host, vm)
    host.store.update("VM", vm, name_description="created by hand")
    if running:
        lifecycle.start(host, vm, instant=True)
    return vm
