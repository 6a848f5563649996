"""Preregistered memory for sPAPR TCE v2 (arch/powerpc/mm/book3s64/iommu_api.c).

A v2 container maps only memory the process registered beforehand with
VFIO_IOMMU_SPAPR_REGISTER_MEMORY: the pages are pinned (long term, for
write) and charged to locked_vm once, at registration, so that later
mapping can be cheap.  Regions belong to the *mm*, not to a container: a
region registered through one container is found by every container of the
process, and the same (vaddr, size) registered twice is one region with a
use count.  MAP_DMA translates a user address to a host physical address
through the region that contains it.
"""

from __future__ import annotations

from errno import EFAULT, EINVAL, EBUSY, ENOENT, ENOMEM
from typing import TYPE_CHECKING

import numpy as np

from ..errors import KernelError, fail
from ..mm import MM, account_locked_vm

if TYPE_CHECKING:
    from ..task import Task


class MmIommuMem:
    """``struct mm_iommu_table_group_mem_t``: one registered region."""

    def __init__(self, ua: int, entries: int, pageshift: int, hpas: np.ndarray, cshifts: np.ndarray) -> None:
        self.ua = ua
        self.entries = entries          # in kernel pages
        self.pageshift = pageshift      # the largest IOMMU page the region can back
        self.hpas = hpas                # host physical address of each kernel page
        self.cshifts = cshifts          # size (log2) of the compound page holding each
        self.used = 1                   # references (containers, lookups in flight)
        self.mapped = 1                 # 1 + the TCEs pointing into the region

    def end(self, page_shift: int) -> int:
        return self.ua + (self.entries << page_shift)

    def __repr__(self) -> str:
        return f"<MmIommuMem ua={self.ua:#x} entries={self.entries} used={self.used} mapped={self.mapped - 1}>"


def _mem_list(mm: MM) -> list[MmIommuMem]:
    """mm->context.iommu_group_mem_list, newest first (list_add_rcu)."""
    lst = getattr(mm, "iommu_group_mem_list", None)
    if lst is None:
        lst = mm.iommu_group_mem_list = []  # type: ignore[attr-defined]
    return lst


def mm_iommu_get(mm: MM, ua: int, entries: int) -> MmIommuMem | None:
    """The region registered with exactly (ua, entries); takes a reference."""
    for mem in _mem_list(mm):
        if mem.ua == ua and mem.entries == entries:
            mem.used += 1
            return mem
    return None


def mm_iommu_new(mm: MM, ua: int, entries: int, current: "Task") -> MmIommuMem:
    """mm_iommu_do_alloc(): charge, pin every page for write, check overlap.

    Order matters for the errno: the charge (ENOMEM) comes first, then the
    allocation of the page array (zero entries: ENOMEM), then pinning
    (EFAULT), then the overlap check (EINVAL), each failure undoing the
    previous steps.
    """
    account_locked_vm(mm, entries, True, current)
    try:
        if entries == 0:
            # vzalloc(0) returns NULL (and the kernel WARNs).
            raise fail(ENOMEM, "registering 0 bytes: the kernel's allocation of 0 entries fails")
        shift = mm.page_shift
        # Natural alignment of the start and size bounds the IOMMU page size.
        pageshift = _ffs(ua | (entries << shift))
        addrs = np.uint64(ua) + (np.arange(entries, dtype=np.uint64) << np.uint64(shift))
        res = mm.pin_pages(addrs, write=True)
        if res.errno is not None:
            mm.phys.unpin(res.hpas)
            raise fail(EFAULT, f"cannot pin page {ua + (res.count << shift):#x} of the region for writing "
                               f"(unmapped or read-only)")
        # IOMMU pages larger than PAGE_SIZE only over huge (hugetlb) pages:
        # the upstream loop lowers pageshift to PAGE_SHIFT at the first
        # ordinary page, or to the smallest huge page size.
        huge = res.compound_shifts > shift
        if not huge[0]:
            pageshift = shift
        elif pageshift > shift:
            pageshift = min(pageshift, int(res.compound_shifts[huge].min()))
        mem = MmIommuMem(ua, entries, pageshift, res.hpas.copy(), res.compound_shifts.copy())
        end = ua + (entries << shift)
        for other in _mem_list(mm):
            if other.ua < end and ua < other.end(shift):
                mm.phys.unpin(mem.hpas)
                raise fail(EINVAL, f"the region {ua:#x}+{entries << shift:#x} overlaps the registered region "
                                   f"{other.ua:#x}+{other.entries << shift:#x}")
    except KernelError:
        account_locked_vm(mm, entries, False, None)
        raise
    _mem_list(mm).insert(0, mem)
    return mem


def mm_iommu_put(mm: MM, mem: MmIommuMem) -> None:
    """Drop a reference; the last one frees the region unless TCEs still use it."""
    if mem.used == 0:
        raise fail(ENOENT, "region already released")
    mem.used -= 1
    if mem.used:
        return
    if mem.mapped != 1:
        mem.used += 1
        raise fail(EBUSY, f"{mem.mapped - 1} TCE(s) still map the region")
    mem.mapped = 0
    _mem_list(mm).remove(mem)
    mm.phys.unpin(mem.hpas)
    account_locked_vm(mm, mem.entries, False, None)


def mm_iommu_lookup(mm: MM, ua: int, size: int) -> MmIommuMem | None:
    """The region containing [ua, ua+size)."""
    for mem in _mem_list(mm):
        if mem.ua <= ua and ua + size <= mem.end(mm.page_shift):
            return mem
    return None


def mm_iommu_ua_to_hpa(mm: MM, mem: MmIommuMem, ua: int, pageshift: int) -> int | None:
    """Host physical address of ``ua``, or None (upstream's -EFAULT)."""
    entry = (ua - mem.ua) >> mm.page_shift
    if entry >= mem.entries or pageshift > mem.pageshift:
        return None
    return int(mem.hpas[entry]) | (ua & (mm.page_size - 1))


def regions(mm: MM) -> list[MmIommuMem]:
    return list(_mem_list(mm))


def release_all(mm: MM) -> None:
    """At mm teardown: regions nobody released (mm_iommu_cleanup)."""
    for mem in list(_mem_list(mm)):
        mm.phys.unpin(mem.hpas)
        _mem_list(mm).remove(mem)


def _ffs(x: int) -> int:
    """__ffs(): index of the lowest set bit."""
    return (x & -x).bit_length() - 1 if x else 64
