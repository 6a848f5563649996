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

import bisect
from errno import EFAULT, EINVAL, EBUSY, ENOENT, ENOMEM
from typing import TYPE_CHECKING

import numpy as np

from ..deviations import deviation
from ..errors import KernelError, fail
from ..mm import AddressSpace, PinResult, account_locked_vm, pin_with_faults

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


class MmIommuIndex:
    """The registered regions sorted by address.  Upstream walks
    ``iommu_group_mem_list`` for every lookup; regions never overlap
    (mm_iommu_do_alloc() refuses it), so a binary search finds what the walk
    finds, and a process that registers thousands of pages one by one (DPDK
    without hugepages) stays linear.  Kept beside the list on the mm
    (``AddressSpace.iommu_group_mem_index``), created on first use."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.mems: list[MmIommuMem] = []

    def add(self, mem: MmIommuMem) -> None:
        i = bisect.bisect_left(self.starts, mem.ua)
        self.starts.insert(i, mem.ua)
        self.mems.insert(i, mem)

    def remove(self, mem: MmIommuMem) -> None:
        i = bisect.bisect_left(self.starts, mem.ua)
        while self.mems[i] is not mem:
            i += 1
        del self.starts[i]
        del self.mems[i]

    def at(self, ua: int) -> MmIommuMem | None:
        """The region starting at or below ``ua`` closest to it."""
        i = bisect.bisect_right(self.starts, ua) - 1
        return self.mems[i] if i >= 0 else None

    def overlapping(self, ua: int, end: int, page_shift: int) -> list[MmIommuMem]:
        i = bisect.bisect_left(self.starts, end) - 1
        out: list[MmIommuMem] = []
        while i >= 0 and self.mems[i].end(page_shift) > ua:
            out.append(self.mems[i])
            i -= 1
        return out


def _index(mm: AddressSpace) -> MmIommuIndex:
    idx = mm.iommu_group_mem_index
    if idx is None:
        idx = mm.iommu_group_mem_index = MmIommuIndex()
        for mem in mm.iommu_group_mem_list:
            idx.add(mem)
    return idx


def mm_iommu_get(mm: AddressSpace, ua: int, entries: int) -> MmIommuMem | None:
    """The region registered with exactly (ua, entries); takes a reference."""
    mem = _index(mm).at(ua)
    if mem is not None and mem.ua == ua and mem.entries == entries:
        mem.used += 1
        return mem
    return None


# pin_user_pages() is called in chunks of this many entries (mm_iommu_do_alloc():
# (1 << (PAGE_SHIFT + MAX_PAGE_ORDER)) / sizeof(struct vm_area_struct *), with
# ppc64's MAX_PAGE_ORDER of 12 for 4 KiB pages and 8 for 64 KiB pages).
_PIN_CHUNK = {12: (1 << (12 + 12)) // 8, 16: (1 << (16 + 8)) // 8}


def mm_iommu_new(mm: AddressSpace, ua: int, entries: int, current: "Task") -> "MmIommuMem | int":
    """mm_iommu_do_alloc(): charge, pin every page for write, check overlap.

    Order matters for the errno: the charge (ENOMEM) comes first, then the
    allocations (zero entries: ENOMEM), then pinning (EFAULT), then the
    overlap check (EINVAL), each failure undoing the previous steps.

    Pinning goes in chunks; when pin_user_pages() pins only part of a chunk
    (it stops at a page it cannot pin, and returns how many it pinned before
    it), upstream keeps that positive count as its return value: everything
    is undone and the count, not an error, reaches userspace.  That count is
    returned here as an int (docs/deviations.md).
    """
    faults = mm.phys.faults
    account_locked_vm(mm, entries, True, current, site="account_locked_vm:mm_iommu_do_alloc")
    pinned = None
    try:
        if faults is not None and faults.should_fail("kmalloc:mm_iommu_do_alloc"):
            raise fail(ENOMEM, "kzalloc of the region descriptor failed (fault injection)")
        if entries == 0:
            # vzalloc(0) returns NULL (and the kernel WARNs).
            raise fail(ENOMEM, "registering 0 bytes: the kernel's allocation of 0 entries fails")
        if faults is not None and faults.should_fail("kmalloc:mm_iommu_do_alloc.hpas"):
            raise fail(ENOMEM, f"vzalloc of the region's page array ({entries} entries) failed (fault injection)")
        shift = mm.page_shift
        # Natural alignment of the start and size bounds the IOMMU page size.
        pageshift = _ffs(ua | (entries << shift))
        chunk = _PIN_CHUNK.get(shift, entries)
        parts: list[PinResult] = []
        done = 0
        ret = 0
        while done < entries:
            n = min(chunk, entries - done)
            addrs = np.uint64(ua + (done << shift)) + (np.arange(n, dtype=np.uint64) << np.uint64(shift))
            res = mm.pin_pages(addrs, write=True)
            res = pin_with_faults(faults, "pin_user_pages:mm_iommu_do_alloc", mm.phys, res)
            parts.append(res)
            done += res.count
            if res.count != n:
                # pin_user_pages() returns the pages it pinned, or the error
                # if it pinned none: the page that failed and why.
                ret = res.count if res.count else -(res.errno or EFAULT)
                break
        if done != entries:
            for r in parts:
                mm.phys.unpin(r.hpa_values())
            if ret > 0:
                _log(mm, deviation("3e", ua=ua, size=entries << shift, pinned=ret, asked=n,
                                   stop=ua + (done << shift)))
                pinned = ret
                raise _PositiveReturn()
            errno = -ret
            raise fail(errno, f"cannot pin page {ua + (done << shift):#x} of the region for writing "
                              + ("(unmapped or read-only)" if errno == EFAULT else "(out of memory)"))
        if len(parts) == 1:
            hpas, cshifts = parts[0].hpas, parts[0].compound_shifts
        else:
            hpas = np.concatenate([r.hpas for r in parts])
            cshifts = np.concatenate([r.compound_shifts for r in parts])
        # IOMMU pages larger than PAGE_SIZE only over huge (hugetlb) pages:
        # the upstream loop lowers pageshift to PAGE_SHIFT at the first
        # ordinary page, or to the smallest huge page size.
        huge = cshifts > shift
        if not huge[0]:
            pageshift = shift
        elif pageshift > shift:
            pageshift = min(pageshift, int(cshifts[huge].min()))
        mem = MmIommuMem(ua, entries, pageshift, hpas.copy(), cshifts.copy())
        end = ua + (entries << shift)
        overlapping = _index(mm).overlapping(ua, end, shift)
        if overlapping:
            # The list walk meets the newest one first.
            order = {id(m): n for n, m in enumerate(mm.iommu_group_mem_list)}
            other = min(overlapping, key=lambda m: order[id(m)])
            mm.phys.unpin(mem.hpas)
            raise fail(EINVAL, f"the region {ua:#x}+{entries << shift:#x} overlaps the registered region "
                               f"{other.ua:#x}+{other.entries << shift:#x}")
    except (KernelError, _PositiveReturn):
        account_locked_vm(mm, entries, False, None)
        if pinned is not None:
            return pinned
        raise
    mm.iommu_group_mem_list.insert(0, mem)    # list_add_rcu(): newest first
    _index(mm).add(mem)
    return mem


class _PositiveReturn(Exception):
    """mm_iommu_do_alloc() leaving through free_exit with a positive ret."""


def _log(mm: AddressSpace, text: str) -> None:
    if mm.phys.log is not None:
        mm.phys.log(text)


def mm_iommu_put(mm: AddressSpace, mem: MmIommuMem) -> None:
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
    mm.iommu_group_mem_list.remove(mem)
    _index(mm).remove(mem)
    mm.phys.unpin(mem.hpas)
    account_locked_vm(mm, mem.entries, False, None)


def mm_iommu_lookup(mm: AddressSpace, ua: int, size: int) -> MmIommuMem | None:
    """The region containing [ua, ua+size)."""
    idx = mm.iommu_group_mem_index or _index(mm)
    i = bisect.bisect_right(idx.starts, ua) - 1          # idx.at(ua)
    if i >= 0:
        mem = idx.mems[i]
        if ua + size <= mem.ua + (mem.entries << mm.page_shift):
            return mem
    return None


def mm_iommu_ua_to_hpa(mm: AddressSpace, mem: MmIommuMem, ua: int, pageshift: int) -> int | None:
    """Host physical address of ``ua``, or None (upstream's -EFAULT)."""
    entry = (ua - mem.ua) >> mm.page_shift
    if entry >= mem.entries or pageshift > mem.pageshift:
        return None
    hpa: int = mem.hpas.item(entry)
    return hpa | (ua & (mm.page_size - 1))


def regions(mm: AddressSpace) -> list[MmIommuMem]:
    return list(mm.iommu_group_mem_list)


def _ffs(x: int) -> int:
    """__ffs(): index of the lowest set bit."""
    return (x & -x).bit_length() - 1 if x else 64
