"""The simulator's object model: the xapi classes it serves and their fields.

Each class lists its fields as ``<name> <access> <xapi type>``, one per line, where
access is ``w`` (read-write: xapi generates ``set_<field>``, and ``add_to_``/``remove_from_``
for maps or ``add_``/``remove_`` for sets), ``c`` (read-only, given at construction) or ``r``
(read-only, kept by the server). Types use xapi's own notation (``int``, ``VM ref``,
``(string -> string) map``, ``enum vm_power_state``, ``string set`` ...).

The tables follow xapi's published data model for the classes the simulator serves;
``tests/sim/test_schema.py`` checks them, field by field and type by type, against
``../shared/xapi/xenapi.json`` so that a drift shows up as a failing test rather than as a
surprise against a real host.
"""

from __future__ import annotations

import functools
import xmlrpc.client
from dataclasses import dataclass

NULL_REF = "OpaqueRef:NULL"
EPOCH = xmlrpc.client.DateTime("19700101T00:00:00Z")


@dataclass(frozen=True, slots=True)
class FieldType:
    """A parsed xapi type such as ``(string -> VM ref) map``."""

    kind: str  # string, int, float, bool, datetime, ref, enum, set, map, record
    name: str = ""  # class of a ref, enum name
    key: FieldType | None = None  # map key type
    item: FieldType | None = None  # set item or map value type

    @classmethod
    def parse(cls, text: str) -> FieldType:
        text = text.strip()
        if text.endswith(" set"):
            return cls("set", item=cls.parse(text[: -len(" set")]))
        if text.endswith(" map") and text.startswith("("):
            inner = text[1 : -len(" map")].rstrip(")")
            key, _, value = inner.partition(" -> ")
            return cls("map", key=cls.parse(key), item=cls.parse(value))
        if text.endswith(" ref"):
            return cls("ref", name=text[: -len(" ref")])
        if text.endswith(" record"):
            return cls("record", name=text[: -len(" record")])
        if text.startswith("enum "):
            return cls("enum", name=text[len("enum ") :])
        if text in ("string", "int", "float", "bool", "datetime"):
            return cls(text)
        raise ValueError(f"unknown xapi type {text!r}")

    def default(self) -> object:
        """The wire value of a field of this type that nobody has set."""
        match self.kind:
            case "string" | "enum":
                return ""
            case "int":
                return "0"
            case "float":
                return 0.0
            case "bool":
                return False
            case "datetime":
                return EPOCH
            case "ref":
                return NULL_REF
            case "set":
                return []
            case "map" | "record":
                return {}
        raise AssertionError(self.kind)

    def to_wire(self, value: object) -> object:
        """Normalise a value received from a client to its wire form.

        xapi sends int64 values as decimal strings and accepts them either way; keys of
        maps are always strings. Raises ``ValueError`` / ``TypeError`` on a value that
        does not fit, which the dispatcher turns into ``FIELD_TYPE_ERROR``.
        """
        match self.kind:
            case "int":
                if isinstance(value, bool):
                    raise TypeError("expected an int")
                return str(int(value))  # type: ignore[call-overload]  # any client value: int() is the check
            case "float":
                return float(value)  # type: ignore[arg-type]  # the value passed the type check of xenapi.json's float just above
            case "bool":
                if not isinstance(value, bool):
                    raise TypeError("expected a bool")
                return value
            case "string" | "enum" | "ref":
                if not isinstance(value, str):
                    raise TypeError("expected a string")
                return value
            case "datetime":
                if isinstance(value, xmlrpc.client.DateTime):
                    return value
                return xmlrpc.client.DateTime(str(value))
            case "set":
                if not isinstance(value, list | tuple):
                    raise TypeError("expected an array")
                assert self.item is not None
                return [self.item.to_wire(v) for v in value]
            case "map":
                if not isinstance(value, dict):
                    raise TypeError("expected a struct")
                assert self.item is not None
                return {str(k): self.item.to_wire(v) for k, v in value.items()}
        raise TypeError(f"cannot set a {self.kind}")


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    access: str  # "w", "c" or "r"
    type: FieldType

    @property
    def writable(self) -> bool:
        return self.access == "w"


@dataclass(frozen=True, slots=True)
class ClassSchema:
    name: str
    fields: dict[str, Field]

    def blank_record(self) -> dict[str, object]:
        """A record of a new object: xapi's documented default where it has one (every
        enum has a valid value), otherwise the empty value of the field's type."""
        defaults = DEFAULTS.get(self.name, {})
        record = {f.name: f.type.default() for f in self.fields.values()}
        for name, value in defaults.items():
            record[name] = value.copy() if isinstance(value, list | dict) else value
        return record


@functools.cache
def schema() -> dict[str, ClassSchema]:
    """Every class the simulator serves, by its xapi name (``VM``, ``host`` ...)."""
    result = {}
    for cls_name, table in _FIELD_TABLES.items():
        fields = {}
        for line in table.strip().splitlines():
            name, access, type_text = line.split(maxsplit=2)
            fields[name] = Field(name, access, FieldType.parse(type_text))
        result[cls_name] = ClassSchema(cls_name, fields)
    return result


# xapi's defaults for fields a constructor does not set (enums above all: an empty string
# is never a valid enum value on the wire).
DEFAULTS: dict[str, dict[str, object]] = {
    "session": {"validation_time": EPOCH, "last_active": EPOCH},
    "task": {"status": "pending", "backtrace": "()", "created": EPOCH, "finished": EPOCH},
    "pool": {
        "telemetry_frequency": "weekly",
        "update_sync_frequency": "weekly",
        "telemetry_next_collection": EPOCH,
        "last_update_sync": EPOCH,
        "coordinator_bias": True,
        "local_auth_max_threads": "8",
        "ext_auth_max_threads": "1",
        "ext_auth_cache_enabled": True,
        "ext_auth_cache_size": "50",
        "ext_auth_cache_expiry": "300",
        "ha_reboot_vm_on_internal_shutdown": True,
    },
    "host": {
        "display": "enabled",
        "latest_synced_updates_applied": "unknown",
        "numa_affinity_policy": "default_policy",
        "ntp_mode": "Factory",
        "timezone": "UTC",
        "ssh_enabled": True,
        "ssl_legacy": True,
        "license_server": {"address": "localhost", "port": "27000"},
        "virtual_hardware_platform_versions": ["0"],
        "last_software_update": EPOCH,
        "ssh_expiry": EPOCH,
    },
    "host_metrics": {"last_updated": EPOCH},
    "VM": {
        "power_state": "Halted",
        "actions_after_softreboot": "soft_reboot",
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "domain_type": "unspecified",
        "secureboot_certificates_state": "ok",
        "HVM_shadow_multiplier": 1.0,
        "generation_id": "0:0",
        "has_vendor_device": True,
        "domid": "-1",
        "snapshot_time": EPOCH,
    },
    "VM_metrics": {
        "current_domain_type": "unspecified",
        "start_time": EPOCH,
        "install_time": EPOCH,
        "last_updated": EPOCH,
    },
    "VM_guest_metrics": {
        "can_use_hotplug_vbd": "unspecified",
        "can_use_hotplug_vif": "unspecified",
        "last_updated": EPOCH,
    },
    "VBD": {"mode": "RW", "type": "Disk", "unpluggable": True},
    "VDI": {"type": "user", "on_boot": "persist", "snapshot_time": EPOCH},
    "VIF": {
        "locking_mode": "network_default",
        "ipv4_configuration_mode": "None",
        "ipv6_configuration_mode": "None",
        "MTU": "1500",
    },
    "network": {"default_locking_mode": "unlocked", "MTU": "1500", "managed": True},
    "PIF": {
        "ip_configuration_mode": "None",
        "ipv6_configuration_mode": "None",
        "primary_address_type": "IPv4",
        "igmp_snooping_status": "unknown",
        "currently_attached": True,
        "managed": True,
    },
}

_FIELD_TABLES = {
    "session": """
        uuid r string
        this_host r host ref
        this_user r user ref
        last_active r datetime
        pool r bool
        other_config w (string -> string) map
        is_local_superuser r bool
        subject r subject ref
        validation_time r datetime
        auth_user_sid r string
        auth_user_name r string
        rbac_permissions c string set
        tasks r task ref set
        parent c session ref
        originator r string
        client_certificate r bool
    """,
    "task": """
        uuid r string
        name_label r string
        name_description r string
        allowed_operations r enum task_allowed_operations set
        current_operations r (string -> enum task_allowed_operations) map
        created r datetime
        finished r datetime
        status r enum task_status_type
        resident_on r host ref
        progress r float
        type r string
        result r string
        error_info r string set
        other_config r (string -> string) map
        subtask_of r task ref
        subtasks r task ref set
        backtrace r string
    """,
    "pool": """
        uuid r string
        name_label w string
        name_description w string
        master r host ref
        default_SR w SR ref
        suspend_image_SR w SR ref
        crash_dump_SR w SR ref
        other_config w (string -> string) map
        ha_enabled r bool
        ha_configuration r (string -> string) map
        ha_statefiles r string set
        ha_host_failures_to_tolerate r int
        ha_plan_exists_for r int
        ha_allow_overcommit w bool
        ha_overcommitted r bool
        blobs r (string -> blob ref) map
        tags w string set
        gui_config w (string -> string) map
        health_check_config w (string -> string) map
        wlb_url r string
        wlb_username r string
        wlb_enabled w bool
        wlb_verify_cert w bool
        redo_log_enabled r bool
        redo_log_vdi r VDI ref
        vswitch_controller r string
        restrictions r (string -> string) map
        metadata_VDIs r VDI ref set
        ha_cluster_stack r string
        allowed_operations r enum pool_allowed_operations set
        current_operations r (string -> enum pool_allowed_operations) map
        guest_agent_config r (string -> string) map
        cpu_info r (string -> string) map
        policy_no_vendor_device w bool
        live_patching_disabled w bool
        igmp_snooping_enabled r bool
        uefi_certificates c string
        custom_uefi_certificates c string
        is_psr_pending w bool
        tls_verification_enabled r bool
        repositories r Repository ref set
        client_certificate_auth_enabled r bool
        client_certificate_auth_name r string
        repository_proxy_url r string
        repository_proxy_username r string
        repository_proxy_password r secret ref
        migration_compression w bool
        coordinator_bias w bool
        local_auth_max_threads c int
        ext_auth_max_threads c int
        ext_auth_cache_enabled r bool
        ext_auth_cache_size r int
        ext_auth_cache_expiry r int
        telemetry_uuid r secret ref
        telemetry_frequency r enum telemetry_frequency
        telemetry_next_collection r datetime
        last_update_sync r datetime
        update_sync_frequency r enum update_sync_frequency
        update_sync_day r int
        update_sync_enabled r bool
        recommendations r (string -> string) map
        license_server w (string -> string) map
        ha_reboot_vm_on_internal_shutdown w bool
        limit_console_sessions w bool
        vm_console_idle_timeout w int
        auto_update_vm_secureboot_certificates w bool
    """,
    "host": """
        uuid r string
        name_label w string
        name_description w string
        memory_overhead r int
        allowed_operations r enum host_allowed_operations set
        current_operations r (string -> enum host_allowed_operations) map
        API_version_major r int
        API_version_minor r int
        API_version_vendor r string
        API_version_vendor_implementation r (string -> string) map
        enabled r bool
        software_version c (string -> string) map
        other_config w (string -> string) map
        capabilities c string set
        cpu_configuration r (string -> string) map
        sched_policy r string
        supported_bootloaders r string set
        resident_VMs r VM ref set
        logging w (string -> string) map
        PIFs r PIF ref set
        suspend_image_sr w SR ref
        crash_dump_sr w SR ref
        crashdumps r host_crashdump ref set
        patches r host_patch ref set
        updates r pool_update ref set
        PBDs r PBD ref set
        host_CPUs r host_cpu ref set
        cpu_info r (string -> string) map
        hostname w string
        address w string
        metrics r host_metrics ref
        license_params r (string -> string) map
        ha_statefiles r string set
        ha_network_peers r string set
        blobs r (string -> blob ref) map
        tags w string set
        external_auth_type r string
        external_auth_service_name r string
        external_auth_configuration r (string -> string) map
        edition r string
        license_server w (string -> string) map
        bios_strings r (string -> string) map
        power_on_mode r string
        power_on_config r (string -> string) map
        local_cache_sr c SR ref
        chipset_info r (string -> string) map
        PCIs r PCI ref set
        PGPUs r PGPU ref set
        PUSBs r PUSB ref set
        ssl_legacy c bool
        guest_VCPUs_params w (string -> string) map
        display w enum host_display
        virtual_hardware_platform_versions r int set
        control_domain r VM ref
        updates_requiring_reboot r pool_update ref set
        features r Feature ref set
        iscsi_iqn c string
        multipathing c bool
        uefi_certificates c string
        certificates r Certificate ref set
        editions r string set
        pending_guidances r enum update_guidances set
        tls_verification_enabled r bool
        last_software_update r datetime
        https_only r bool
        latest_synced_updates_applied r enum latest_synced_updates_applied_state
        numa_affinity_policy r enum host_numa_affinity_policy
        pending_guidances_recommended r enum update_guidances set
        pending_guidances_full r enum update_guidances set
        last_update_hash r string
        ssh_enabled r bool
        ssh_enabled_timeout r int
        ssh_expiry r datetime
        console_idle_timeout r int
        ssh_auto_mode r bool
        max_cstate r string
        secure_boot r bool
        ntp_mode r enum host_ntp_mode
        ntp_custom_servers r string set
        timezone r string
    """,
    "host_cpu": """
        uuid r string
        host r host ref
        number r int
        vendor r string
        speed r int
        modelname r string
        family r int
        model r int
        stepping r string
        flags r string
        features r string
        utilisation r float
        other_config w (string -> string) map
    """,
    "host_metrics": """
        uuid r string
        memory_total r int
        memory_free r int
        live r bool
        last_updated r datetime
        other_config w (string -> string) map
    """,
    "VM": """
        uuid r string
        allowed_operations r enum vm_operations set
        current_operations r (string -> enum vm_operations) map
        name_label w string
        name_description w string
        power_state c enum vm_power_state
        user_version w int
        is_a_template w bool
        is_default_template r bool
        suspend_VDI c VDI ref
        resident_on r host ref
        scheduled_to_be_resident_on r host ref
        affinity w host ref
        memory_overhead r int
        memory_target c int
        memory_static_max c int
        memory_dynamic_max c int
        memory_dynamic_min c int
        memory_static_min c int
        VCPUs_params w (string -> string) map
        VCPUs_max c int
        VCPUs_at_startup c int
        actions_after_softreboot w enum on_softreboot_behavior
        actions_after_shutdown w enum on_normal_exit
        actions_after_reboot w enum on_normal_exit
        actions_after_crash c enum on_crash_behaviour
        consoles r console ref set
        VIFs r VIF ref set
        VBDs r VBD ref set
        VUSBs r VUSB ref set
        crash_dumps r crashdump ref set
        VTPMs r VTPM ref set
        PV_bootloader w string
        PV_kernel w string
        PV_ramdisk w string
        PV_args w string
        PV_bootloader_args w string
        PV_legacy_args w string
        HVM_boot_policy c string
        HVM_boot_params w (string -> string) map
        HVM_shadow_multiplier c float
        platform c (string -> string) map
        PCI_bus w string
        other_config c (string -> string) map
        domid r int
        domarch r string
        last_boot_CPU_flags c (string -> string) map
        is_control_domain r bool
        metrics r VM_metrics ref
        guest_metrics r VM_guest_metrics ref
        last_booted_record c string
        recommendations w string
        xenstore_data w (string -> string) map
        ha_always_run c bool
        ha_restart_priority c string
        is_a_snapshot r bool
        snapshot_of r VM ref
        snapshots r VM ref set
        snapshot_time r datetime
        transportable_snapshot_id r string
        blobs r (string -> blob ref) map
        tags w string set
        blocked_operations c (enum vm_operations -> string) map
        snapshot_info r (string -> string) map
        snapshot_metadata r string
        parent r VM ref
        children r VM ref set
        bios_strings r (string -> string) map
        protection_policy c VMPP ref
        is_snapshot_from_vmpp c bool
        snapshot_schedule c VMSS ref
        is_vmss_snapshot c bool
        appliance c VM_appliance ref
        start_delay c int
        shutdown_delay c int
        order c int
        VGPUs r VGPU ref set
        attached_PCIs r PCI ref set
        suspend_SR w SR ref
        version c int
        generation_id c string
        hardware_platform_version w int
        has_vendor_device c bool
        requires_reboot r bool
        reference_label c string
        domain_type c enum domain_type
        NVRAM c (string -> string) map
        pending_guidances r enum update_guidances set
        pending_guidances_recommended r enum update_guidances set
        pending_guidances_full r enum update_guidances set
        groups r VM_group ref set
        secureboot_certificates_state r enum vm_secureboot_certificates_state
    """,
    "VM_metrics": """
        uuid r string
        memory_actual r int
        VCPUs_number r int
        VCPUs_utilisation r (int -> float) map
        VCPUs_CPU r (int -> int) map
        VCPUs_params r (string -> string) map
        VCPUs_flags r (int -> string set) map
        state r string set
        start_time r datetime
        install_time r datetime
        last_updated r datetime
        other_config w (string -> string) map
        hvm r bool
        nested_virt r bool
        nomigrate r bool
        current_domain_type r enum domain_type
        numa_optimised c bool
        numa_nodes c int
        numa_node_memory r (int -> int) map
    """,
    "VM_guest_metrics": """
        uuid r string
        os_version r (string -> string) map
        netbios_name r (string -> string) map
        PV_drivers_version r (string -> string) map
        PV_drivers_up_to_date r bool
        memory r (string -> string) map
        disks r (string -> string) map
        networks r (string -> string) map
        other r (string -> string) map
        last_updated r datetime
        other_config w (string -> string) map
        live r bool
        can_use_hotplug_vbd r enum tristate_type
        can_use_hotplug_vif r enum tristate_type
        PV_drivers_detected r bool
        services r (string -> string) map
    """,
    "VBD": """
        uuid r string
        allowed_operations r enum vbd_operations set
        current_operations r (string -> enum vbd_operations) map
        VM c VM ref
        VDI c VDI ref
        device c string
        userdevice w string
        bootable w bool
        mode c enum vbd_mode
        type w enum vbd_type
        unpluggable w bool
        storage_lock r bool
        empty c bool
        other_config w (string -> string) map
        currently_attached c bool
        status_code r int
        status_detail r string
        runtime_properties r (string -> string) map
        qos_algorithm_type w string
        qos_algorithm_params w (string -> string) map
        qos_supported_algorithms r string set
        metrics r VBD_metrics ref
    """,
    "VDI": """
        uuid r string
        name_label c string
        name_description c string
        allowed_operations r enum vdi_operations set
        current_operations r (string -> enum vdi_operations) map
        SR c SR ref
        VBDs r VBD ref set
        crash_dumps r crashdump ref set
        virtual_size c int
        physical_utilisation r int
        type c enum vdi_type
        sharable c bool
        read_only c bool
        other_config w (string -> string) map
        storage_lock r bool
        location r string
        managed r bool
        missing r bool
        parent r VDI ref
        xenstore_data w (string -> string) map
        sm_config w (string -> string) map
        is_a_snapshot r bool
        snapshot_of r VDI ref
        snapshots r VDI ref set
        snapshot_time r datetime
        tags w string set
        allow_caching r bool
        on_boot r enum on_boot
        metadata_of_pool r pool ref
        metadata_latest r bool
        is_tools_iso r bool
        cbt_enabled r bool
    """,
    "SR": """
        uuid r string
        name_label c string
        name_description c string
        allowed_operations r enum storage_operations set
        current_operations r (string -> enum storage_operations) map
        VDIs r VDI ref set
        PBDs r PBD ref set
        virtual_allocation r int
        physical_utilisation r int
        physical_size c int
        type c string
        content_type c string
        shared r bool
        other_config w (string -> string) map
        tags w string set
        sm_config w (string -> string) map
        blobs r (string -> blob ref) map
        local_cache_enabled r bool
        introduced_by r DR_task ref
        clustered r bool
        is_tools_sr r bool
    """,
    "PBD": """
        uuid r string
        host c host ref
        SR c SR ref
        device_config c (string -> string) map
        currently_attached r bool
        other_config w (string -> string) map
    """,
    "VIF": """
        uuid r string
        allowed_operations r enum vif_operations set
        current_operations r (string -> enum vif_operations) map
        device c string
        network c network ref
        VM c VM ref
        MAC c string
        MTU c int
        other_config w (string -> string) map
        currently_attached c bool
        status_code r int
        status_detail r string
        runtime_properties r (string -> string) map
        qos_algorithm_type w string
        qos_algorithm_params w (string -> string) map
        qos_supported_algorithms r string set
        metrics r VIF_metrics ref
        MAC_autogenerated r bool
        locking_mode c enum vif_locking_mode
        ipv4_allowed c string set
        ipv6_allowed c string set
        ipv4_configuration_mode r enum vif_ipv4_configuration_mode
        ipv4_addresses r string set
        ipv4_gateway r string
        ipv6_configuration_mode r enum vif_ipv6_configuration_mode
        ipv6_addresses r string set
        ipv6_gateway r string
        trunks c int set
    """,
    "network": """
        uuid r string
        name_label w string
        name_description w string
        allowed_operations r enum network_operations set
        current_operations r (string -> enum network_operations) map
        VIFs r VIF ref set
        PIFs r PIF ref set
        MTU w int
        other_config w (string -> string) map
        bridge c string
        managed c bool
        blobs r (string -> blob ref) map
        tags w string set
        default_locking_mode r enum network_default_locking_mode
        assigned_ips r (VIF ref -> string) map
        purpose r enum network_purpose set
    """,
    "PIF": """
        uuid r string
        device c string
        network c network ref
        host c host ref
        MAC c string
        MTU c int
        VLAN c int
        metrics r PIF_metrics ref
        physical r bool
        currently_attached r bool
        ip_configuration_mode r enum ip_configuration_mode
        IP r string
        netmask r string
        gateway r string
        DNS r string
        bond_slave_of r Bond ref
        bond_master_of r Bond ref set
        VLAN_master_of r VLAN ref
        VLAN_slave_of r VLAN ref set
        management r bool
        other_config w (string -> string) map
        disallow_unplug r bool
        tunnel_access_PIF_of r tunnel ref set
        tunnel_transport_PIF_of r tunnel ref set
        ipv6_configuration_mode r enum ipv6_configuration_mode
        IPv6 r string set
        ipv6_gateway r string
        primary_address_type r enum primary_address_type
        managed c bool
        properties r (string -> string) map
        capabilities r string set
        igmp_snooping_status r enum pif_igmp_status
        sriov_physical_PIF_of r network_sriov ref set
        sriov_logical_PIF_of r network_sriov ref set
        PCI r PCI ref
    """,
}
