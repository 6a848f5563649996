"""The dmesg lines that announce where vfiosim departs from a plain model of
upstream: a defect reproduced, or a corruption refused.

Each entry is keyed by its ID in docs/deviations.md (1, 2b, 3d, ...), which
explains it with its upstream source and tests; the code that reaches one
calls :func:`deviation` with the ID and the details of the case.  Every
line starts with ``vfiosim:`` and ends with its citation, so a user can
find the explanation from dmesg alone.  tests/test_deviations.py checks
that every ID here is a heading of docs/deviations.md.
"""

from __future__ import annotations

from typing import Any

DEVIATIONS: dict[str, str] = {
    # -- reproduced -------------------------------------------------------------------------
    "1": "{call}: iova {iova:#x} is not aligned to the {page:#x}-byte IOMMU page; Linux returns 1 (not -EINVAL: "
         "iommu_tce_put/clear_param_check ORs two errors into a boolean) and does nothing",
    "2": "the map ran past the end of the window (Linux checks only its first page); the hypervisor's H_PARAMETER "
         "({rc}) becomes errno {errno} ({name}) as on Linux 6.12",
    "2b": "H_PUT_TCE for bus address {ioba:#x} failed with H_HARDWARE ({rc}); Linux 6.12 returns the hcall status "
          "as the errno: EPERM",
    "3": "tce_iommu_create_table: the platform failed ({error}) after {pages} pages were charged to locked_vm; "
         "Linux does not refund them (leak reproduced)",
    "3b": "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY of {vaddr:#x}+{size:#x} while TCEs map it: Linux 6.12 returns 0, "
          "the region stays registered and charged to locked_vm, and this container forgets it",
    "3d.hcall": "tce_iommu_build_v2: the exchange for bus address {ioba:#x} failed after mm_iommu_mapped_inc(); "
                "tce_iommu_unuse_page_v2() looks the region up through the entry's userspace address ({old_ua:#x}), "
                "not the new one, so the preregistered region {ua:#x}+{size:#x} keeps one mapping for good: "
                "UNREGISTER_MEMORY will return 0 and leave it registered, pinned and charged until the process "
                "exits, as on Linux 6.12",
    "3d.level": "tce_iommu_build_v2: the exchange for bus address {ioba:#x} failed after mm_iommu_mapped_inc(); "
                "tce_iommu_unuse_page_v2() finds no userspace address for the entry, so the preregistered region "
                "{ua:#x}+{size:#x} keeps one mapping for good: UNREGISTER_MEMORY will return 0 and leave it "
                "registered, pinned and charged until the process exits, as on Linux 6.12",
    "3e": "VFIO_IOMMU_SPAPR_REGISTER_MEMORY {ua:#x}+{size:#x}: pin_user_pages() pinned {pinned} of {asked} pages "
          "and stopped at {stop:#x}; mm_iommu_do_alloc() undoes everything but returns that count, so the ioctl "
          "returns {pinned} as Linux 6.12 does",
    "4": "the seed patch leaves the group attached here; the review asked for a forced disable, which 3.10 merged",
    # -- refused where upstream corrupts memory or oopses -----------------------------------------
    "6": "{call} of {npages} pages from bus address {ioba:#x} runs past the end of the window {start:#x}..{end:#x}: "
         "Linux 6.12 checks only the first page and would write TCEs past the end of the table (memory corruption "
         "on PowerNV); refused with EINVAL, nothing changed",
    "6b": "VFIO_IOMMU_MAP_DMA (v2) of {npages} pages from bus address {ioba:#x} runs past the end of the window "
          "{start:#x}..{end:#x}: Linux 6.12 checks only the first page and {what}; refused with EINVAL, nothing "
          "changed",
    "6c": "tce_iommu_build_v2: IOMMU_TABLE_USERSPACE_ENTRY() for bus address {ioba:#x} is NULL (a level of the "
          "userspace copy could not be allocated) and Linux 6.12 writes through it (*pua = tce): a kernel oops; "
          "refused with ENOMEM, nothing changed",
    "6d": "tce_iommu_build_v2: the window {start:#x}..{end:#x} has no userspace view (its vzalloc failed and "
          "spapr_tce_create_table() ignored that); Linux 6.12 exchanges the first TCE and then writes through the "
          "NULL IOMMU_TABLE_USERSPACE_ENTRY() (*pua = tce): a kernel oops; refused with ENOMEM, nothing changed",
    "6e": "tce_iommu_build_v2: Linux 6.12 would also drop a mapping of the region of {old_ua:#x} and forget that "
          "address while the TCE still maps its page (the region could then be unpinned under a live TCE); not "
          "done here: the entry keeps its old mapping",
    "6f": 'restore_default_dma_window: copy_property() could not allocate the "ibm,dma-window" property and '
          'returned quietly; spapr_tce_create_table() then passes the missing property to of_parse_dma_window(), '
          'which dereferences NULL: a kernel oops in Linux 6.12; refused with ENOMEM instead, as a failed '
          'create_table(), before the reset',
    # -- x86 ---------------------------------------------------------------------------------------
    "8": "update_user_bitmap: {stale} bit(s) past the mapping {iova:#x}+{size:#x} were reported dirty: bits an "
         "earlier unaligned copy shifted past its end were never cleared; Linux 6.12 reports them too",
    "9": "VFIO_IOMMU_MAP_DMA {iova:#x}+{size:#x}: {mlocked} page(s) already mlock'ed and {pinned} already pinned "
         "by another mapping are charged to locked_vm again, as Linux 6.12 does (vfio_pin_pages_remote)",
    # -- simplified --------------------------------------------------------------------------------
    "10": "vfio-pci {bdf}: low power entry; the device stays in D0 (Linux would let it suspend)",
    # -- iommufd -----------------------------------------------------------------------------------
    "11": "IOMMU_HWPT_GET_DIRTY_BITMAP: {lost} dirty bit(s) were not recorded: the bitmap at {data:#x} could not be "
          "pinned for writing; Linux 6.12's iova_bitmap_set() drops them and the ioctl succeeds",
    "12": "{what}: no free page of RAM ({used} of {total} pages in use); the fault fails without the OOM killer "
          "(Linux's page allocator would first kill the task with the most memory, perhaps this one)",
}


def deviation_id(key: str) -> str:
    """The docs/deviations.md heading of a table key ("3d.level" is one case of 3d)."""
    return key.partition(".")[0]


def deviation(key: str, **details: Any) -> str:
    """The dmesg line announcing deviation ``key`` with the details of this case."""
    return f"vfiosim: {DEVIATIONS[key].format(**details)} (docs/deviations.md {deviation_id(key)})"
