"""What xapi adds to a VM's ``memory_static_max`` before it admits the VM on a host
(``VM.memory_overhead``), for a VM dynvm is about to make with other vCPUs or memory than
its template's (a template-sized VM uses the template's own figure, as xapi reports it).

xapi's model for an HVM guest (xen-api, ``ocaml/xenopsd/lib/memory.ml``, the
``Memory_model`` functor and ``HVM_memory_model_data``; called from
``memory_check.ml: vm_compute_memory_overhead``), in MiB:

    overhead = extra_internal (1) + extra_external (1) + shadow
    shadow   = max(1, floor(multiplier * ceil((256 * vCPUs_max + 2 * static_max_mib) / 256)))

with ``static_max_mib`` rounded up. The real records in ``../shared/xapi/real-records``
agree: 2 GiB and 2 vCPUs → 20 MiB; 1 GiB and 1 vCPU → 11 MiB (ansible-test-vm-1/-2).
"""

from __future__ import annotations

MiB = 1024**2
PAGES_PER_MIB = 256  # 4 KiB pages
EXTRA_MIB = 2  # HVM: extra_internal_mib 1 + extra_external_mib 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def memory_overhead(static_max: int, vcpus: int, shadow_multiplier: float = 1.0) -> int:
    """Bytes xapi holds beside ``static_max`` for an HVM VM with ``vcpus`` (VCPUs_max)."""
    static_max_mib = _ceil_div(static_max, MiB)
    pages = PAGES_PER_MIB * vcpus + 2 * static_max_mib  # vCPU pages, p2m map, shadow-resident pages
    shadow_mib = max(1, int(_ceil_div(pages, PAGES_PER_MIB) * shadow_multiplier))
    return (EXTRA_MIB + shadow_mib) * MiB
