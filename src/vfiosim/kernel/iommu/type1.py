"""The Type1 IOMMU driver for VFIO (drivers/vfio/vfio_iommu_type1.c, Linux 6.12).

A container with VFIO_TYPE1_IOMMU or VFIO_TYPE1v2_IOMMU keeps a list of
user mappings (``struct vfio_dma``), each an IOVA range backed by pinned
user pages, and maps every one into each IOMMU domain of the container.
Groups share a domain when the IOMMU allows (same ops, same cache
coherency); otherwise the container gets one more domain and the existing
mappings are replayed into it.  Pinned pages are charged to the mapping
process's ``locked_vm`` page by page, against RLIMIT_MEMLOCK unless it had
CAP_IPC_LOCK when it mapped -- whether or not the page is already mlock'ed
or pinned by another mapping, as upstream charges them (vfio_lock_acct).

Each method names the upstream function it follows; checks happen in the
same order, so the same bad input gets the same errno.  Where upstream's
dirty bitmap keeps stale bits after a shifted copy, the same bits are
reported (docs/deviations.md).

Per-page work is vectorised: pinning is one NumPy slice per VMA, mappings
are stored and mapped as physically contiguous runs, unpinning is one
scatter per memory object, and dirty bitmaps are arrays of 64-bit words.
"""

from __future__ import annotations

import bisect
import ctypes
import struct
from dataclasses import dataclass, field
from errno import EACCES, EBUSY, EEXIST, EFAULT, EINVAL, ENOENT, ENOMEM, ENOSPC, ENOTTY, EPERM, ESRCH
from typing import TYPE_CHECKING, Any

import numpy as np

from ...uapi import vfio as uapi
from ..cred import CAP_IPC_LOCK
from ..deviations import deviation
from ..errors import KernelBug, KernelError, fail
from ..mm import account_locked_vm_task, refund_locked_vm
from ..vfio.info_cap import info_cap_add, info_cap_shift
from ..uaccess import (copy_from_user, copy_struct_from_user, copy_struct_to_user,
                       copy_to_user, struct_layout)
from ..vfio.iommu_driver import VfioIommuDriver
from .iommu import (IOMMU_CACHE, IOMMU_READ, IOMMU_RESV_DIRECT_RELAXABLE, IOMMU_WRITE, IommuDomain, IommuGroup,
                    ResvRegion, iommu_attach_group, iommu_detach_group, iommu_domain_free,
                    iommu_get_group_resv_regions, iommu_group_has_isolated_msi, iommu_group_paging_domain_alloc,
                    iommu_map, iommu_unmap)

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..mm import AddressSpace
    from ..task import Task

U64 = (1 << 64) - 1
_U64_END = 1 << 64           # x + n - 1 > U64 is x + n > _U64_END, one operation less

# Module parameter default (vfio_iommu_type1.dma_entry_limit = U16_MAX).
DMA_ENTRY_LIMIT_DEFAULT = 0xFFFF

# DIRTY_BITMAP_BYTES(n) = ALIGN(n, 64) / 8; at most INT_MAX pages per bitmap.
DIRTY_BITMAP_PAGES_MAX = 0x7FFFFFFF


def dirty_bitmap_bytes(npages: int) -> int:
    return ((npages + 63) & ~63) // 8


DIRTY_BITMAP_SIZE_MAX = dirty_bitmap_bytes(DIRTY_BITMAP_PAGES_MAX)

# x86-64 with 4-level paging: access_ok() accepts [ptr, ptr+size) when the
# sum does not wrap and is at most USER_PTR_MAX = TASK_SIZE_MAX - 1.
TASK_SIZE_MAX = (1 << 47) - 4096
USER_PTR_MAX = TASK_SIZE_MAX - 1

# Pages pinned per step of a large map (bounds the temporary arrays).
BATCH = 1 << 18
# The largest map the fast path takes (_do_map_fast): the pages of one mapping.
FAST_MAP_PAGES = 64
# Pages one vaddr_get_pfns() call pins at most (VFIO_BATCH_MAX_CAPACITY:
# a page of struct page pointers).
VFIO_BATCH_MAX_CAPACITY = 4096 // 8


def _ffs(x: int) -> int:
    """__ffs(); x86 TZCNT answers 64 for 0 (the C result is undefined)."""
    x &= U64
    return (x & -x).bit_length() - 1 if x else 64


def _fls(x: int) -> int:
    """__fls(); for 0 the C result is undefined, answered as 64 like _ffs."""
    x &= U64
    return x.bit_length() - 1 if x else 64


def _shr(x: int, n: int) -> int:
    """A 64-bit x86 shift: the count is taken modulo 64."""
    return (x & U64) >> (n & 63)


def access_ok(addr: int, size: int) -> bool:
    """access_ok() of x86-64: the range must end in user space without wrapping."""
    total = addr + size
    return total <= U64 and total <= USER_PTR_MAX


# -- the dirty bitmaps: arrays of unsigned long, as lib/bitmap.c sees them ---------------

_ONES = np.uint64(U64)


def bitmap_set(words: np.ndarray, start: int, n: int) -> None:
    """bitmap_set(map, start, nbits)"""
    if n <= 0:
        return
    end = start + n
    a, b = start >> 6, (end - 1) >> 6
    lo = np.uint64((U64 << (start & 63)) & U64)
    hi = np.uint64(U64 >> (63 - ((end - 1) & 63)))
    if a == b:
        words[a] |= lo & hi
    else:
        words[a] |= lo
        words[a + 1:b] = _ONES
        words[b] |= hi


def bitmap_clear(words: np.ndarray, start: int, n: int) -> None:
    """bitmap_clear(map, start, nbits)"""
    if n <= 0:
        return
    end = start + n
    a, b = start >> 6, (end - 1) >> 6
    lo = np.uint64((U64 << (start & 63)) & U64)
    hi = np.uint64(U64 >> (63 - ((end - 1) & 63)))
    if a == b:
        words[a] &= ~(lo & hi)
    else:
        words[a] &= ~lo
        words[a + 1:b] = np.uint64(0)
        words[b] &= ~hi


def bitmap_shift_left(words: np.ndarray, shift: int, nbits: int) -> None:
    """__bitmap_shift_left(dst, src, shift, nbits) in place, for 0 < shift < 64.

    As in lib/bitmap.c the last word is not masked to ``nbits``: bits
    shifted past the end stay in the word (this is where the stale dirty
    bits come from, see update_user_bitmap()).
    """
    lim = (nbits + 63) >> 6
    src = words[:lim].copy()
    rem = np.uint64(shift)
    out = src << rem
    if lim > 1:
        out[1:] |= src[:-1] >> np.uint64(64 - shift)
    words[:lim] = out


# -- state ---------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class VfioDma:
    """``struct vfio_dma``: one user mapping."""

    iova: int
    vaddr: int
    prot: int
    task: "Task"
    mm: "AddressSpace"
    lock_cap: bool
    size: int = 0
    iommu_mapped: bool = False
    vaddr_invalid: bool = False
    locked_vm: int = 0
    bitmap: np.ndarray | None = None
    # What is mapped, as physically contiguous runs: (IOVA, host physical
    # address, pages, reserved).  Reserved runs are device memory (a BAR
    # mapped through VM_PFNMAP), neither pinned nor charged.  Upstream reads
    # the same back from the first domain with iommu_iova_to_phys().
    runs: list[tuple[int, int, int, bool]] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.iova + self.size


@dataclass(eq=False)
class VfioIommuGroup:
    """``struct vfio_iommu_group``"""

    iommu_group: IommuGroup
    pinned_page_dirty_scope: bool = False


@dataclass(eq=False)
class VfioDomain:
    """``struct vfio_domain``: an IOMMU domain and the groups attached to it."""

    domain: IommuDomain
    groups: list[VfioIommuGroup] = field(default_factory=list)
    enforce_cache_coherency: bool = False


@dataclass(eq=False)
class VfioIommu:
    """``struct vfio_iommu``: the container's Type1 state."""

    v2: bool
    nesting: bool
    dma_avail: int
    pgsize_bitmap: int
    domain_list: list[VfioDomain] = field(default_factory=list)     # list_add(): newest first
    iova_list: list[list[int]] = field(default_factory=list)         # [start, end] (inclusive)
    dma_starts: list[int] = field(default_factory=list)
    dmas: list[VfioDma] = field(default_factory=list)
    vaddr_invalid_count: int = 0
    num_non_pinned_groups: int = 0
    dirty_page_tracking: bool = False


class Type1IommuDriver(VfioIommuDriver):
    """vfio_iommu_driver_ops_type1 ("vfio-iommu-type1")."""

    name = "vfio-iommu-type1"
    module = "vfio_iommu_type1"

    def __init__(self, kernel: "Kernel", *, dma_entry_limit: int = DMA_ENTRY_LIMIT_DEFAULT,
                 allow_unsafe_interrupts: bool = False) -> None:
        self.kernel = kernel
        self.log = kernel.log
        self.page_shift = kernel.page_shift
        self.page_size = kernel.page_size
        self.dma_entry_limit = dma_entry_limit
        self.allow_unsafe_interrupts = allow_unsafe_interrupts
        # What _do_map_fast() consults of fault injection for a map into one
        # domain: its kmalloc, the pin of its first page, its charge, its iommu_map.
        self._map_events = kernel.faults.bundle(("kmalloc:vfio_dma_do_map", 1), ("pin_user_pages:vaddr_get_pfns", 1),
                                                ("account_locked_vm:vfio_lock_acct", 1),
                                                ("iommu_map:vfio_iommu_map", 1))

    def module_parameters(self) -> dict[str, str]:
        return {"allow_unsafe_interrupts": "Y" if self.allow_unsafe_interrupts else "N", "disable_hugepages": "N",
                "dma_entry_limit": str(self.dma_entry_limit)}

    # -- vfio_iommu_driver_ops: open / release ------------------------------------------------

    def open(self, arg: int, current: "Task") -> VfioIommu:
        """vfio_iommu_type1_open()"""
        if arg == uapi.VFIO_TYPE1_IOMMU:
            v2, nesting = False, False
        elif arg == uapi.VFIO_TYPE1_NESTING_IOMMU:
            v2, nesting = True, True
        elif arg == uapi.VFIO_TYPE1v2_IOMMU:
            v2, nesting = True, False
        else:
            raise fail(EINVAL, f"IOMMU type {arg} is not Type1 (1), Type1v2 (3) or Type1 nesting (6)")
        if self.kernel.faults.should_fail("kmalloc:vfio_iommu_type1_open"):
            raise fail(ENOMEM, "kzalloc of the vfio_iommu failed (fault injection)")
        # pgsize_bitmap starts as PAGE_MASK until a domain narrows it.
        return VfioIommu(v2=v2, nesting=nesting, dma_avail=self.dma_entry_limit,
                         pgsize_bitmap=~(self.page_size - 1) & U64)

    def release(self, iommu: VfioIommu, current: "Task") -> None:
        """vfio_iommu_type1_release(): every mapping, then every domain."""
        self._unmap_unpin_all(iommu)
        for d in list(iommu.domain_list):
            for g in list(d.groups):
                iommu_detach_group(d.domain, g.iommu_group)
                d.groups.remove(g)
            iommu_domain_free(d.domain)
            iommu.domain_list.remove(d)
        iommu.iova_list.clear()

    # -- attach / detach ------------------------------------------------------------------------------

    def _find_group(self, iommu: VfioIommu, group: IommuGroup) -> tuple[VfioDomain, VfioIommuGroup] | None:
        """vfio_iommu_find_iommu_group()"""
        for d in iommu.domain_list:
            for g in d.groups:
                if g.iommu_group is group:
                    return d, g
        return None

    def attach_group(self, iommu: VfioIommu, group: IommuGroup, current: "Task") -> None:
        """vfio_iommu_type1_attach_group()"""
        if iommu.vaddr_invalid_count:
            raise fail(EBUSY, f"IOMMU group {group.id}: attaching could need pinning, which is not allowed while "
                              f"{iommu.vaddr_invalid_count} mapping(s) have an invalidated vaddr (VFIO_DMA_MAP_FLAG_VADDR)")
        if self._find_group(iommu, group) is not None:
            raise fail(EINVAL, f"IOMMU group {group.id} is already attached to this container")
        if self.kernel.faults.should_fail("kmalloc:vfio_iommu_type1_attach_group"):
            raise fail(ENOMEM, "kzalloc of the vfio_iommu_group failed (fault injection)")
        # The struct vfio_domain, then its IOMMU domain: every attach makes a
        # new one first, and frees it below if an existing domain can be
        # shared.  Either failing frees what was allocated (out_free_domain,
        # out_free_group) and the attach returns the error.
        if self.kernel.faults.should_fail("kmalloc:vfio_iommu_type1_attach_group.domain"):
            raise fail(ENOMEM, "kzalloc of the vfio_domain failed (fault injection)")
        # iommu_paging_domain_alloc(): ENODEV behind no IOMMU, ERR_PTR(-ENOMEM) raised as ENOMEM.
        domain = iommu_group_paging_domain_alloc(group)
        try:
            if iommu.nesting:
                domain.enable_nesting()         # iommu_enable_nesting()
            iommu_attach_group(domain, group)
        except KernelError:
            iommu_domain_free(domain)
            raise
        try:
            iova_copy = self._attach_checks(iommu, group, domain)
        except KernelError:
            iommu_detach_group(domain, group)
            iommu_domain_free(domain)
            raise
        vgroup = VfioIommuGroup(group)
        enforce = domain.enforce_cache_coherency()
        # Try to share an existing compatible domain.
        for d in iommu.domain_list:
            if d.domain.ops == domain.ops and d.enforce_cache_coherency == enforce:
                iommu_detach_group(domain, group)
                try:
                    iommu_attach_group(d.domain, group)
                except KernelError:
                    try:
                        iommu_attach_group(domain, group)
                    except KernelError:
                        iommu_domain_free(domain)
                        raise
                    continue
                d.groups.insert(0, vgroup)
                iommu_domain_free(domain)
                break
        else:
            vdomain = VfioDomain(domain, [vgroup], enforce)
            try:
                self._replay(iommu, vdomain)
            except KernelError:
                iommu_detach_group(domain, group)
                iommu_domain_free(domain)
                raise
            iommu.domain_list.insert(0, vdomain)
            self._update_pgsize_bitmap(iommu)
        iommu.iova_list = iova_copy
        # An IOMMU-backed group can dirty memory directly: it demotes the
        # container's dirty scope to "everything mapped".
        iommu.num_non_pinned_groups += 1

    def _attach_checks(self, iommu: VfioIommu, group: IommuGroup, domain: IommuDomain) -> list[list[int]]:
        """The part of vfio_iommu_type1_attach_group() between attaching to the
        new domain and looking for a domain to share; returns the new IOVA list."""
        start, end = domain.aperture_start, domain.aperture_end
        if self._aper_conflict(iommu, start, end):
            raise fail(EINVAL, f"IOMMU group {group.id}: its aperture {start:#x}..{end:#x} would exclude "
                               f"existing mappings or the current IOVA ranges")
        resv = iommu_get_group_resv_regions(group)
        if self._resv_conflict(iommu, resv):
            raise fail(EINVAL, f"IOMMU group {group.id}: an existing mapping overlaps one of its reserved regions")
        iova_copy = [list(n) for n in iommu.iova_list]
        self._aper_resize(iova_copy, start, end)
        self._resv_exclude(iova_copy, resv)
        if not self.allow_unsafe_interrupts and not iommu_group_has_isolated_msi(group):
            # False without interrupt remapping.
            self.log.warn('vfio_iommu_type1_attach_group: No interrupt remapping support.  Use the module param '
                          '"allow_unsafe_interrupts" to enable VFIO IOMMU support on this platform')
            raise fail(EPERM, "no interrupt remapping: MSIs are not isolated (vfio_iommu_type1."
                              "allow_unsafe_interrupts would allow it)")
        return iova_copy

    def _replay(self, iommu: VfioIommu, vdomain: VfioDomain) -> None:
        """vfio_iommu_replay(): map every existing mapping into a new domain.
        Mappings made while the container had a domain are already pinned;
        their runs are mapped as they are."""
        done: list[tuple[int, int]] = []
        try:
            for dma in iommu.dmas:
                if not dma.iommu_mapped:
                    raise KernelBug("a Type1 mapping without a domain (only emulated groups make those)")
                for iova, hpa, pages, _ in dma.runs:
                    iommu_map(vdomain.domain, iova, hpa, pages << self.page_shift, dma.prot | IOMMU_CACHE)
                    done.append((iova, pages << self.page_shift))
        except KernelError:
            for iova, size in done:
                iommu_unmap(vdomain.domain, iova, size)
            raise

    def detach_group(self, iommu: VfioIommu, group: IommuGroup, current: "Task") -> None:
        """vfio_iommu_type1_detach_group(): the last group of the last domain
        takes every mapping with it (unpinned, locked_vm refunded)."""
        update_dirty_scope = False
        iova_copy = [list(n) for n in iommu.iova_list]
        for d in iommu.domain_list:
            g = next((g for g in d.groups if g.iommu_group is group), None)
            if g is None:
                continue
            iommu_detach_group(d.domain, group)
            update_dirty_scope = not g.pinned_page_dirty_scope
            d.groups.remove(g)
            if not d.groups:
                if len(iommu.domain_list) == 1:
                    self._unmap_unpin_all(iommu)
                else:
                    for dma in iommu.dmas:
                        iommu_unmap(d.domain, dma.iova, dma.size)
                iommu_domain_free(d.domain)
                iommu.domain_list.remove(d)
                self._aper_expand(iommu, iova_copy)
                self._update_pgsize_bitmap(iommu)
            break
        refreshed = self._resv_refresh(iommu, iova_copy)
        if refreshed is not None:
            iommu.iova_list = refreshed
        if update_dirty_scope:
            iommu.num_non_pinned_groups -= 1
            if iommu.dirty_page_tracking:
                # vfio_iommu_populate_bitmap_full()
                shift = _ffs(iommu.pgsize_bitmap)
                for dma in iommu.dmas:
                    if dma.bitmap is not None:
                        bitmap_set(dma.bitmap, 0, dma.size >> shift)

    # -- IOVA ranges ---------------------------------------------------------------------------------

    def _aper_conflict(self, iommu: VfioIommu, start: int, end: int) -> bool:
        """vfio_iommu_aper_conflict()"""
        if not iommu.iova_list:
            return False
        first, last = iommu.iova_list[0], iommu.iova_list[-1]
        if start > last[1] or end < first[0]:
            return True
        if start > first[0] and self._find_dma(iommu, first[0], start - first[0]) is not None:
            return True
        if end < last[1] and self._find_dma(iommu, end + 1, last[1] - end) is not None:
            return True
        return False

    @staticmethod
    def _aper_resize(iova: list[list[int]], start: int, end: int) -> None:
        """vfio_iommu_aper_resize(), including its comparisons: a node whose
        end equals the new start is dropped (``start < node->end``)."""
        if not iova:
            iova.append([start, end])
            return
        while iova:
            node = iova[0]
            if start < node[0]:
                break
            if node[0] <= start < node[1]:
                node[0] = start
                break
            del iova[0]
        kept = []
        for node in iova:
            if end > node[1]:
                kept.append(node)
            elif node[0] < end <= node[1]:
                node[1] = end
                kept.append(node)
        iova[:] = kept

    def _resv_conflict(self, iommu: VfioIommu, resv: list[ResvRegion]) -> bool:
        """vfio_iommu_resv_conflict()"""
        return any(r.type != IOMMU_RESV_DIRECT_RELAXABLE and self._find_dma(iommu, r.start, r.length) is not None
                   for r in resv)

    @staticmethod
    def _resv_exclude(iova: list[list[int]], resv: list[ResvRegion]) -> None:
        """vfio_iommu_resv_exclude(): EINVAL if nothing is left."""
        for r in resv:
            if r.type == IOMMU_RESV_DIRECT_RELAXABLE:
                continue
            start, end = r.start, r.start + r.length - 1
            out: list[list[int]] = []
            for n in iova:
                if start > n[1] or end < n[0]:
                    out.append(n)
                    continue
                if start > n[0]:
                    out.append([n[0], start - 1])
                if end < n[1]:
                    out.append([end + 1, n[1]])
            iova[:] = out
        if not iova:
            raise fail(EINVAL, "the reserved regions leave no usable IOVA range")

    @staticmethod
    def _aper_expand(iommu: VfioIommu, iova_copy: list[list[int]]) -> None:
        """vfio_iommu_aper_expand(): the smallest aperture of the remaining domains."""
        if not iova_copy:
            return
        start, end = 0, U64
        for d in iommu.domain_list:
            start = max(start, d.domain.aperture_start)
            end = min(end, d.domain.aperture_end)
        iova_copy[0][0] = start
        iova_copy[-1][1] = end

    def _resv_refresh(self, iommu: VfioIommu, iova_copy: list[list[int]]) -> list[list[int]] | None:
        """vfio_iommu_resv_refresh(): rebuild the list from the remaining
        groups' reserved regions; None (keep the old list) on failure."""
        if not iova_copy:
            return None
        resv: list[ResvRegion] = []
        for d in iommu.domain_list:
            for g in d.groups:
                resv.extend(iommu_get_group_resv_regions(g.iommu_group))
        fresh: list[list[int]] = []
        self._aper_resize(fresh, iova_copy[0][0], iova_copy[-1][1])
        try:
            self._resv_exclude(fresh, resv)
        except KernelError:
            return None
        return fresh

    @staticmethod
    def _iova_dma_valid(iommu: VfioIommu, start: int, end: int) -> bool:
        """vfio_iommu_iova_dma_valid(); an empty list allows anything."""
        if not iommu.iova_list:
            return True
        for lo, hi in iommu.iova_list:
            if start >= lo and end <= hi:
                return True
        return False

    def _update_pgsize_bitmap(self, iommu: VfioIommu) -> None:
        """vfio_update_pgsize_bitmap(): the intersection of the domains' sizes,
        sizes below PAGE_SIZE replaced by PAGE_SIZE."""
        bitmap = U64
        for d in iommu.domain_list:
            bitmap &= d.domain.pgsize_bitmap
        page_mask = ~(self.page_size - 1) & U64
        if bitmap & ~page_mask:
            bitmap = (bitmap & page_mask) | self.page_size
        iommu.pgsize_bitmap = bitmap

    # -- the mapping tree ---------------------------------------------------------------------------

    @staticmethod
    def _find_dma(iommu: VfioIommu, start: int, size: int) -> VfioDma | None:
        """vfio_find_dma(): a mapping overlapping [start, start+size).  With
        size 0 it is the mapping that contains ``start`` past its first byte,
        as the rb-tree walk's comparisons make it."""
        i = bisect.bisect_left(iommu.dma_starts, start + size) - 1
        if i >= 0:
            dma = iommu.dmas[i]
            if start < dma.end and (size or dma.iova < start):
                return dma
        return None

    @staticmethod
    def _find_dma_first(iommu: VfioIommu, start: int, size: int) -> int | None:
        """vfio_find_dma_first_node(): index of the lowest mapping ending after
        ``start``, or None if it begins at or after start + size."""
        i = bisect.bisect_right(iommu.dma_starts, start) - 1
        if i < 0 or iommu.dmas[i].end <= start:
            i += 1
        if i >= len(iommu.dmas):
            return None
        if size and iommu.dmas[i].iova >= start + size:
            return None
        return i

    @staticmethod
    def _link_dma(iommu: VfioIommu, dma: VfioDma) -> None:
        i = bisect.bisect_left(iommu.dma_starts, dma.iova)
        iommu.dma_starts.insert(i, dma.iova)
        iommu.dmas.insert(i, dma)

    @staticmethod
    def _unlink_dma(iommu: VfioIommu, dma: VfioDma) -> None:
        i = bisect.bisect_left(iommu.dma_starts, dma.iova)
        while iommu.dmas[i] is not dma:
            i += 1
        del iommu.dma_starts[i]
        del iommu.dmas[i]

    # -- accounting -----------------------------------------------------------------------------------

    def _lock_acct(self, dma: VfioDma, npage: int, async_: bool) -> int:
        """vfio_lock_acct(): charge (npage > 0) or refund the mapping's mm.

        ``async_`` callers (unmapping) skip a process that has exited, as
        mmget_not_zero() fails for it: the refund goes with the dead mm.
        """
        if not npage:
            return 0
        if async_ and dma.mm.dead:
            return -ESRCH
        account_locked_vm_task(dma.mm, abs(npage), npage > 0, dma.task, dma.lock_cap)
        dma.locked_vm += npage
        return 0

    def _change_dma_owner(self, dma: VfioDma, current: "Task") -> None:
        """vfio_change_dma_owner(): a VADDR update from another process moves
        the mapping's locked memory to it (charged first, then refunded)."""
        mm = current.mm
        if mm is dma.mm:
            return
        lock_cap = current.capable(CAP_IPC_LOCK)
        account_locked_vm_task(mm, dma.locked_vm, True, current, lock_cap)
        if not dma.mm.dead:
            account_locked_vm_task(dma.mm, dma.locked_vm, False, dma.task, dma.lock_cap)
        dma.task = current
        dma.mm = mm
        dma.lock_cap = lock_cap

    # -- ioctl -----------------------------------------------------------------------------------------

    def ioctl(self, iommu: VfioIommu | None, cmd: int, arg: int, current: "Task") -> int:
        """vfio_iommu_type1_ioctl()"""
        # MAP and UNMAP first: the calls programs make in loops (the
        # commands are distinct, so the order of the tests changes nothing).
        if cmd == _MAP_DMA_CMD:
            assert iommu is not None
            return self._map_dma(iommu, arg, current)
        if cmd == _UNMAP_DMA_CMD:
            assert iommu is not None
            return self._unmap_dma(iommu, arg, current)
        if cmd == _CHECK_EXTENSION:
            return self._check_extension(iommu, arg)
        assert iommu is not None
        if cmd == _GET_INFO:
            return self._get_info(iommu, arg, current)
        if cmd == uapi.VFIO_IOMMU_DIRTY_PAGES:
            return self._dirty_pages(iommu, arg, current)
        name = uapi.ioctl_name(cmd)
        raise fail(ENOTTY, f"{name or hex(cmd)}: not a Type1 IOMMU ioctl")

    def _check_extension(self, iommu: VfioIommu | None, arg: int) -> int:
        """vfio_iommu_type1_check_extension() as of Linux 6.12 (which still
        answers VFIO_TYPE1_NESTING_IOMMU)."""
        if arg in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_TYPE1_NESTING_IOMMU,
                   uapi.VFIO_UNMAP_ALL):
            return 1
        if arg == uapi.VFIO_UPDATE_VADDR:
            # No emulated (mdev) groups in this model.
            return 1 if iommu is not None else 0
        if arg == uapi.VFIO_DMA_CC_IOMMU:
            if iommu is None:
                return 0
            # vfio_domains_have_enforce_cache_coherency()
            return 0 if any(not d.enforce_cache_coherency for d in iommu.domain_list) else 1
        return 0

    # -- VFIO_IOMMU_GET_INFO ---------------------------------------------------------------------------

    def _get_info(self, iommu: VfioIommu, arg: int, current: "Task") -> int:
        """vfio_iommu_type1_get_info(): the capability chain follows the
        struct when argsz leaves room for it; otherwise argsz is raised to the
        size needed and cap_offset stays 0."""
        cls = uapi.vfio_iommu_type1_info
        minsz = uapi.offsetofend(cls, "iova_pgsizes")
        info = copy_struct_from_user(current, arg, cls, minsz)
        if info.argsz < minsz:
            raise fail(EINVAL, f"VFIO_IOMMU_GET_INFO: argsz {info.argsz} < {minsz}")
        info_size = ctypes.sizeof(cls)
        minsz = min(info.argsz, info_size)
        info.flags = uapi.VFIO_IOMMU_INFO_PGSIZES
        info.iova_pgsizes = iommu.pgsize_bitmap
        info.cap_offset = 0
        caps = bytearray()
        self._migration_cap(iommu, caps)
        self._dma_avail_cap(iommu, caps)
        self._iova_cap(iommu, caps)
        if caps:
            info.flags |= uapi.VFIO_IOMMU_INFO_CAPS
            if info.argsz < info_size + len(caps):
                info.argsz = info_size + len(caps)
            else:
                info_cap_shift(caps, info_size)
                copy_to_user(current, arg + info_size, bytes(caps))
                info.cap_offset = info_size
        copy_struct_to_user(current, arg, info, minsz)
        return 0

    def _migration_cap(self, iommu: VfioIommu, caps: bytearray) -> None:
        """vfio_iommu_migration_build_caps()"""
        cap = uapi.vfio_iommu_type1_info_cap_migration()
        cap.flags = 0
        cap.pgsize_bitmap = 1 << _ffs(iommu.pgsize_bitmap)
        cap.max_dirty_bitmap_size = DIRTY_BITMAP_SIZE_MAX
        info_cap_add(caps, bytes(cap), uapi.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 1)

    def _dma_avail_cap(self, iommu: VfioIommu, caps: bytearray) -> None:
        """vfio_iommu_dma_avail_build_caps()"""
        cap = uapi.vfio_iommu_type1_info_dma_avail(avail=iommu.dma_avail)
        info_cap_add(caps, bytes(cap), uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1)

    def _iova_cap(self, iommu: VfioIommu, caps: bytearray) -> None:
        """vfio_iommu_iova_build_caps(): none for an empty list."""
        if not iommu.iova_list:
            return
        head = uapi.vfio_iommu_type1_info_cap_iova_range(nr_iovas=len(iommu.iova_list))
        body = b"".join(struct.pack("<QQ", s, e) for s, e in iommu.iova_list)
        info_cap_add(caps, bytes(head) + body, uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1)

    # -- VFIO_IOMMU_MAP_DMA ----------------------------------------------------------------------------

    def _map_dma(self, iommu: VfioIommu, arg: int, current: "Task") -> int:
        """vfio_iommu_type1_map_dma()"""
        # copy_from_user(&map, arg, minsz) (uaccess.copy_from_user_unpack(), without its frame)
        argsz, flags, vaddr, iova, size = current.mm.read_unpack(arg, _DMA_MAP)
        minsz = _DMA_MAP.size
        if argsz < minsz:
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: argsz {argsz} < {minsz}")
        if flags & ~_DMA_MAP_FLAGS:
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: flags {flags:#x} has bits other than READ|WRITE|VADDR")
        if self.kernel.fast_paths and self._do_map_fast(iommu, flags, vaddr, iova, size, current):
            return 0
        return self._do_map(iommu, flags, vaddr, iova, size, current)

    def _do_map_fast(self, iommu: VfioIommu, flags: int, vaddr: int, iova: int, size: int, current: "Task") -> bool:
        """vfio_dma_do_map() of the usual small map, in straight-line code; True
        when done, False (nothing changed) for the general path to run.

        It takes a READ and/or WRITE map (no VADDR) of at most FAST_MAP_PAGES
        pages that pass _do_map()'s checks, in a container with one domain,
        pages that lie in one mapping of the process and pin without a fault
        that could fail (AddressSpace.pin_fast), within RLIMIT_MEMLOCK (or
        the caller has CAP_IPC_LOCK); no fault injection may be armed, dirty
        tracking must be off.  It changes what _do_map() and _pin_map_dma()
        change, in their order: the fault injection counts (with nothing
        armed, counting is all that consulting a site does), dma_avail, the
        pins, locked_vm, the deviation 9 line, the domain's page table (a
        failure there unwinds as _pin_map_dma() does), the mapping tree.  What
        it skips is only what those need for the cases it leaves to them:
        batches of pins, pins cut short or refused, PFNMAP pages,
        RLIMIT_MEMLOCK refusals, several domains."""
        if self.kernel.faults.armed or iommu.dirty_page_tracking or len(iommu.domain_list) != 1:
            return False
        if flags & _FLAG_VADDR or not flags & _DMA_MAP_RW:
            return False
        # 1 << __ffs(pgsize_bitmap), only PAGE_SIZE here: then the domain's
        # smallest page divides the IOVA, the size and the pages' addresses,
        # and iommu_map()'s checks hold (Type1's domains are paging domains).
        pgsize = self.page_size
        if iommu.pgsize_bitmap & (2 * pgsize - 1) != pgsize:
            return False
        end = iova + size
        if not size or (size | iova | vaddr) & (pgsize - 1) or end > _U64_END or vaddr + size > _U64_END:
            return False
        npages = size >> self.page_shift
        if npages > FAST_MAP_PAGES:
            return False
        starts = iommu.dma_starts
        i = bisect.bisect_left(starts, end)             # vfio_find_dma(): nothing may overlap
        if i:
            prev = iommu.dmas[i - 1]                    # (its end, without the property's frame)
            if iova < prev.iova + prev.size:
                return False
        if not iommu.dma_avail:
            return False
        if iommu.iova_list:                             # _iova_dma_valid(), inline
            last = end - 1
            for lo, hi in iommu.iova_list:
                if iova >= lo and last <= hi:
                    break
            else:
                return False
        mm = current.mm
        lock_cap = current.capable(CAP_IPC_LOCK)
        if not lock_cap and mm.locked_vm + npages > current.rlimit_memlock_soft() >> self.page_shift:
            return False
        write = flags & _FLAG_WRITE
        pinned = mm.pin_fast(vaddr, npages, bool(write), True)
        if pinned is None:
            return False
        hpa, repinned, mlocked = pinned
        self._map_events.times += 1                     # kmalloc, pin (first page), charge, iommu_map
        if npages > 1:
            self.kernel.faults.counts["pin_user_pages:vaddr_get_pfns"] += npages - 1
        iommu.dma_avail -= 1
        prot = (IOMMU_WRITE if write else 0) | (IOMMU_READ if flags & _FLAG_READ else 0)
        runs = [(iova, hpa, npages, False)]
        dma = VfioDma(iova, vaddr, prot, current, mm, lock_cap, size, True, False, npages, None, runs)
        mm.locked_vm += npages                          # _lock_acct(): within the limit, checked above
        if repinned is None or mlocked is None:
            self._note_charged_again(mm, dma, size, runs, repinned)
        elif repinned or mlocked:
            self.log.info(deviation("9", iova=iova, size=size, mlocked=mlocked, pinned=repinned))
        try:
            iommu.domain_list[0].domain.map_pages(iova, hpa, size, prot | IOMMU_CACHE)     # iommu_map()
        except KernelError:
            self._unpin_runs(runs)
            self._lock_acct(dma, -npages, True)
            iommu.dma_avail += 1
            raise
        starts.insert(i, iova)                          # _link_dma()
        iommu.dmas.insert(i, dma)
        return True

    def _do_map(self, iommu: VfioIommu, flags: int, vaddr: int, iova: int, size: int, current: "Task") -> int:
        """vfio_dma_do_map()"""
        set_vaddr = bool(flags & uapi.VFIO_DMA_MAP_FLAG_VADDR)
        prot = (IOMMU_WRITE if flags & uapi.VFIO_DMA_MAP_FLAG_WRITE else 0) | \
            (IOMMU_READ if flags & uapi.VFIO_DMA_MAP_FLAG_READ else 0)
        if prot and set_vaddr:
            raise fail(EINVAL, "VFIO_IOMMU_MAP_DMA: VFIO_DMA_MAP_FLAG_VADDR takes no READ/WRITE "
                               "(it only gives an existing mapping its new vaddr)")
        if not prot and not set_vaddr:
            raise fail(EINVAL, "VFIO_IOMMU_MAP_DMA: flags must include READ and/or WRITE")
        pgsize = 1 << _ffs(iommu.pgsize_bitmap)
        if not size or (size | iova | vaddr) & (pgsize - 1):
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: vaddr {vaddr:#x}, iova {iova:#x} and size {size:#x} must be "
                               f"non-zero multiples of the smallest IOMMU page size {pgsize:#x}")
        if iova + size - 1 > U64 or vaddr + size - 1 > U64:
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: iova {iova:#x} or vaddr {vaddr:#x} + size {size:#x} wraps")
        dma = self._find_dma(iommu, iova, size)
        if set_vaddr:
            if dma is None:
                raise fail(ENOENT, f"VFIO_IOMMU_MAP_DMA (VADDR): no mapping at iova {iova:#x}+{size:#x}")
            if not dma.vaddr_invalid or dma.iova != iova or dma.size != size:
                raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA (VADDR): the mapping {dma.iova:#x}+{dma.size:#x} "
                                   + ("still has a valid vaddr (VFIO_DMA_UNMAP_FLAG_VADDR first)"
                                      if not dma.vaddr_invalid else f"is not exactly {iova:#x}+{size:#x}"))
            self._change_dma_owner(dma, current)
            dma.vaddr = vaddr
            dma.vaddr_invalid = False
            iommu.vaddr_invalid_count -= 1
            return 0
        if dma is not None:
            raise fail(EEXIST, f"VFIO_IOMMU_MAP_DMA: {iova:#x}+{size:#x} overlaps the mapping "
                               f"{dma.iova:#x}+{dma.size:#x}")
        if not iommu.dma_avail:
            raise fail(ENOSPC, f"VFIO_IOMMU_MAP_DMA: the container has {self.dma_entry_limit} mappings, the "
                               f"vfio_iommu_type1.dma_entry_limit")
        if not self._iova_dma_valid(iommu, iova, iova + size - 1):
            ranges = ", ".join(f"{s:#x}..{e:#x}" for s, e in iommu.iova_list)
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: {iova:#x}..{iova + size - 1:#x} is not inside one usable "
                               f"IOVA range ({ranges}; see VFIO_IOMMU_GET_INFO's IOVA_RANGE capability)")
        if self.kernel.faults.should_fail("kmalloc:vfio_dma_do_map"):
            raise fail(ENOMEM, "kzalloc of the vfio_dma failed (fault injection)")
        iommu.dma_avail -= 1
        dma = VfioDma(iova=iova, vaddr=vaddr, prot=prot, task=current, mm=current.mm,
                      lock_cap=current.capable(CAP_IPC_LOCK))
        try:
            self._pin_map_dma(iommu, dma, size, current)
        except KernelError:
            iommu.dma_avail += 1
            raise
        self._link_dma(iommu, dma)
        if iommu.dirty_page_tracking:
            try:
                self._bitmap_alloc(dma, pgsize)
            except KernelError:
                self._remove_dma(iommu, dma)
                raise
        return 0


    def _pin_map_dma(self, iommu: VfioIommu, dma: VfioDma, size: int, current: "Task") -> None:
        """vfio_pin_map_dma() + vfio_pin_pages_remote() + vaddr_get_pfns().

        Pages are pinned in order.  Unless the mapping process had
        CAP_IPC_LOCK, page k fails with ENOMEM when ``locked_vm + k + 1``
        exceeds RLIMIT_MEMLOCK -- pages already mlock'ed or pinned by another
        mapping count again.  A page that cannot be pinned fails with EFAULT
        (ENOMEM when RAM is out) if it comes first.  A page GUP refuses in a
        VM_PFNMAP mapping (a device's BAR) is taken as follow_fault_pfn()
        takes it: the BAR's own page, a reserved pfn, neither pinned nor
        charged (EFAULT for a write mapping of a read-only one, or where the
        mapping's fault handler refuses).  On failure everything this call
        pinned is unpinned and nothing stays charged; on success the pages
        are charged (vfio_lock_acct) and mapped into every domain as
        physically contiguous runs (vfio_iommu_map).
        """
        mm = current.mm
        shift = self.page_shift
        psz = 1 << shift
        npages = size >> shift
        write = bool(dma.prot & IOMMU_WRITE)
        limit = 0 if dma.lock_cap else current.rlimit_memlock_soft() >> shift
        room = None if dma.lock_cap else max(limit - mm.locked_vm, 0)
        faults = self.kernel.faults
        phys = self.kernel.phys
        runs: list[tuple[int, int, int, bool]] = []      # (iova, hpa, pages, reserved)
        charged = 0                  # pages pinned (not reserved)
        repinned: int | None = 0     # of those, pages another pin held already (None: not known)
        pos = 0
        batch = 0                    # where the current run of vaddr_get_pfns() calls began
        err: int | None = None
        while pos < npages:
            want = min(BATCH, npages - pos)
            if room is not None:
                want = min(want, room + 1 - charged)     # the page over the limit is the last one tried
            vaddr = dma.vaddr + (pos << shift)
            res = mm.pin_pages_longterm(vaddr, want, write)
            extents = res.extents(psz)
            count, res_err = res.count, res.errno
            repinned = None if repinned is None or res.repinned is None else repinned + res.repinned
            passed = faults.take("pin_user_pages:vaddr_get_pfns", count)
            if passed < count and (pos + passed - batch) % VFIO_BATCH_MAX_CAPACITY == 0:
                # The first page of a vaddr_get_pfns() call failed: -ENOMEM.
                # (A later page only shortens the call; the next call pins
                # it again, the injected failure spent.)
                extents, tail = _split_extents(extents, passed, psz)
                for hpa, n in tail:
                    phys.unpin_range(hpa, n)
                count, res_err = passed, ENOMEM
            iova = dma.iova + (pos << shift)
            for hpa, n in extents:
                if runs and not runs[-1][3] and runs[-1][1] + (runs[-1][2] << shift) == hpa:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + n, False)
                else:
                    runs.append((iova, hpa, n, False))
                iova += n << shift
            pos += count
            charged += count
            if room is not None and charged > room:
                break
            if res_err == EFAULT:
                pfn = self._follow_pfnmap(mm, dma.vaddr + (pos << shift), npages - pos, write)
                if pfn is not None:
                    hpa, n = pfn
                    if runs and runs[-1][3] and runs[-1][1] + (runs[-1][2] << shift) == hpa:
                        runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + n, True)
                    else:
                        runs.append((dma.iova + (pos << shift), hpa, n, True))
                    pos += n
                    batch = pos
                    continue
            if res_err is not None:
                err = res_err
                break

        if err is not None:
            self._unpin_runs(runs)
            why = "out of memory: no free page of RAM, or fault injection" if err == ENOMEM else \
                "unmapped, or not writable" if write else "unmapped or PROT_NONE"
            raise fail(err, f"VFIO_IOMMU_MAP_DMA: cannot pin user page {dma.vaddr + (pos << shift):#x} ({why}; "
                            f"vaddr_get_pfns)")
        if room is not None and charged > room:
            self._unpin_runs(runs)
            self.log.warn(f"vfio_pin_pages_remote: RLIMIT_MEMLOCK ({limit << shift}) exceeded")
            raise fail(ENOMEM, f"VFIO_IOMMU_MAP_DMA: pinning {npages} pages would make locked memory "
                               f"{(mm.locked_vm + npages) << shift} bytes, over RLIMIT_MEMLOCK "
                               f"{current.rlimit_memlock_soft()} bytes (mlock'ed pages and pages pinned by other "
                               f"mappings count again); raise the limit or run with CAP_IPC_LOCK")
        # vfio_pin_pages_remote() charges each contiguous run of pinned pages it returns.
        pinned_runs = len(runs) - sum(r[3] for r in runs)
        if faults.take("account_locked_vm:vfio_lock_acct", pinned_runs) < pinned_runs:
            self._unpin_runs(runs)
            raise fail(ENOMEM, "VFIO_IOMMU_MAP_DMA: charging the pinned pages to locked_vm failed (fault injection)")
        self._lock_acct(dma, charged, False)
        self._note_charged_again(mm, dma, size, runs, repinned)
        mapped: list[tuple[IommuDomain, int, int]] = []
        try:
            for d in iommu.domain_list:
                for iova, hpa, pages, _ in runs:
                    if faults.should_fail("iommu_map:vfio_iommu_map"):
                        raise fail(ENOMEM, f"VFIO_IOMMU_MAP_DMA: iommu_map() of {iova:#x}+{pages << shift:#x} could "
                                           f"not allocate an IO page table page (fault injection)")
                    iommu_map(d.domain, iova, hpa, pages << shift, dma.prot | IOMMU_CACHE)
                    mapped.append((d.domain, iova, pages << shift))
        except KernelError:
            for dom, iova, length in mapped:
                iommu_unmap(dom, iova, length)
            self._unpin_runs(runs)
            self._lock_acct(dma, -charged, True)
            raise
        dma.runs = runs
        dma.size = size
        dma.iommu_mapped = True

    @staticmethod
    def _follow_pfnmap(mm: "AddressSpace", vaddr: int, npages: int, write: bool) -> tuple[int, int] | None:
        """vaddr_get_pfns() after GUP refused ``vaddr``: a VM_PFNMAP mapping
        (a BAR mapped from a vfio-pci device fd) gives its pfn through
        follow_fault_pfn() -- the fault handler inserts it first, a write
        mapping needs a writable PTE -- and, the pfn being no RAM
        (is_invalid_reserved_pfn()), the run of the mapping's following
        pages: (host physical address, pages).  None for any other mapping
        (GUP's EFAULT stands); EFAULT where follow_fault_pfn() fails."""
        vma = mm.find_vma(vaddr)
        if vma is None or vma.kind != "pfnmap" or vma.ops is None:
            return None
        off = vma.pgoff + (vaddr - vma.start)
        if write and not vma.writable():
            raise fail(EFAULT, f"VFIO_IOMMU_MAP_DMA: {vaddr:#x} is a read-only device mapping; a device-writable "
                               f"map needs a writable PTE (follow_fault_pfn)")
        vma.ops.fault(off, write)
        n = min(npages, (vma.end - vaddr) >> mm.page_shift)
        return vma.obj.phys_base + off, n

    def _unpin_runs(self, runs: list[tuple[int, int, int, bool]]) -> None:
        """Unpin what a failed map pinned (reserved runs hold no pin)."""
        for _, hpa, n, reserved in runs:
            if not reserved:
                self.kernel.phys.unpin_range(hpa, n)

    def _note_charged_again(self, mm: "AddressSpace", dma: VfioDma, size: int,
                            runs: list[tuple[int, int, int, bool]], repinned: int | None) -> None:
        """Announce pages this mapping charged although locked_vm already
        counts them: mlock'ed ones, and ones another mapping had pinned
        (``repinned``, when the pin counted them).  vfio_pin_pages_remote()
        charges every page it pins (only reserved pages and pages in the
        mapping's own external pin list are skipped), so Linux counts them
        twice (docs/deviations.md)."""
        mlocked = mm.count_mlocked_pages(dma.vaddr, size)
        if repinned is not None:
            if mlocked or repinned:
                self.log.info(deviation("9", iova=dma.iova, size=size, mlocked=mlocked, pinned=repinned))
            return
        pinned = 0
        for _, hpa, pages, reserved in runs:
            found = None if reserved else self.kernel.phys.lookup(hpa)
            if found is not None:
                obj, off = found
                first = off >> obj.page_shift
                if pages == 1:
                    pinned += int(obj.pincount[first] > 1)
                else:
                    pinned += int(np.count_nonzero(obj.pincount[first:first + pages] > 1))
        if mlocked or pinned:
            self.log.info(deviation("9", iova=dma.iova, size=size, mlocked=mlocked, pinned=pinned))

    # -- unmapping -------------------------------------------------------------------------------------------

    def _unmap_unpin(self, iommu: VfioIommu, dma: VfioDma, do_accounting: bool) -> int:
        """vfio_unmap_unpin(): out of every domain, then unpin and refund
        (put_pfn() neither unpins nor counts a reserved pfn)."""
        if not dma.size or not iommu.domain_list:
            return 0
        for d in iommu.domain_list:
            iommu_unmap(d.domain, dma.iova, dma.size)
        unlocked = 0
        for _, hpa, pages, reserved in dma.runs:
            if not reserved:
                self.kernel.phys.unpin_range(hpa, pages)
                unlocked += pages
        dma.runs = []
        dma.iommu_mapped = False
        if do_accounting:
            self._lock_acct(dma, -unlocked, True)
            return 0
        return unlocked

    def _remove_dma(self, iommu: VfioIommu, dma: VfioDma) -> None:
        """vfio_remove_dma()"""
        self._unmap_unpin(iommu, dma, True)
        self._unlink_dma(iommu, dma)
        dma.bitmap = None
        if dma.vaddr_invalid:
            iommu.vaddr_invalid_count -= 1
        iommu.dma_avail += 1

    def _unmap_unpin_all(self, iommu: VfioIommu) -> None:
        """vfio_iommu_unmap_unpin_all()"""
        while iommu.dmas:
            self._remove_dma(iommu, iommu.dmas[0])

    def _unmap_dma(self, iommu: VfioIommu, arg: int, current: "Task") -> int:
        """vfio_iommu_type1_unmap_dma(): the struct is written back (with the
        size actually unmapped) only on success."""
        # copy_from_user(&unmap, arg, minsz) (uaccess.copy_from_user_unpack(), without its frame)
        argsz, flags, iova, size = current.mm.read_unpack(arg, _DMA_UNMAP)
        minsz = _DMA_UNMAP.size
        if argsz < minsz:
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: argsz {argsz} < {minsz}")
        if flags & ~_DMA_UNMAP_FLAGS:
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: flags {flags:#x} has unknown bits")
        # (The fast path takes no flags, so the flags' next check cannot fail for it.)
        if not flags and self.kernel.fast_paths:
            unmapped_fast = self._do_unmap_fast(iommu, iova, size)
            if unmapped_fast is not None:
                # copy_to_user(arg, &unmap, minsz), without copy_to_user()'s frame
                current.mm.write(arg, _DMA_UNMAP.pack(argsz, flags, iova, unmapped_fast))
                return 0
        get_bitmap = bool(flags & uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP)
        if get_bitmap and flags & (uapi.VFIO_DMA_UNMAP_FLAG_ALL | uapi.VFIO_DMA_UNMAP_FLAG_VADDR):
            raise fail(EINVAL, "VFIO_IOMMU_UNMAP_DMA: GET_DIRTY_BITMAP cannot be combined with ALL or VADDR")
        bitmap = (0, 0, 0)
        if get_bitmap:
            bsz = _VFIO_BITMAP.size
            if argsz < minsz + bsz:
                raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: argsz {argsz} leaves no room for the "
                                   f"struct vfio_bitmap ({minsz + bsz} needed)")
            bitmap = _VFIO_BITMAP.unpack(copy_from_user(current, arg + minsz, bsz))
            pgsize_b, size_b, data = bitmap
            if not access_ok(data, size_b):
                raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: bitmap {data:#x}+{size_b:#x} is not in user space")
            _verify_bitmap_size(_shr(size, _ffs(pgsize_b)), size_b, "VFIO_IOMMU_UNMAP_DMA")
        unmapped = self._do_unmap(iommu, flags, iova, size, bitmap, current)
        copy_to_user(current, arg, _DMA_UNMAP.pack(argsz, flags, iova, unmapped & U64))
        return 0

    def _do_unmap_fast(self, iommu: VfioIommu, iova: int, size: int) -> int | None:
        """vfio_dma_do_unmap() without flags of exactly one whole mapping, in
        straight-line code: the bytes unmapped, or None (nothing changed) for
        the general path to run.

        The range must pass _do_unmap()'s alignment checks and be one
        mapping (with a valid vaddr, in a container with a domain); then
        Type1v2's bisection checks pass and the walk over the tree meets that
        mapping only, for v1 as for v2.  It is removed as _remove_dma()
        removes it: out of every domain, unpinned, refunded (not to an mm
        that has exited), unlinked.  What it skips is the walk's generality:
        several mappings, partial ranges, dirty bitmaps, VADDR."""
        pgsize = self.page_size                         # 1 << __ffs(pgsize_bitmap), as above
        if iommu.pgsize_bitmap & (2 * pgsize - 1) != pgsize:
            return None
        if iova & (pgsize - 1) or not size or size & (pgsize - 1) or iova + size - 1 > U64:
            return None
        starts = iommu.dma_starts
        i = bisect.bisect_left(starts, iova)
        if i == len(starts) or starts[i] != iova:
            return None
        dma = iommu.dmas[i]
        if dma.size != size or dma.vaddr_invalid or not iommu.domain_list:
            return None
        for d in iommu.domain_list:
            d.domain.unmap_pages(iova, size)            # iommu_unmap() of a paging domain
        unlocked = 0
        unpin_range = self.kernel.phys.unpin_range
        for _, hpa, pages, reserved in dma.runs:
            if not reserved:
                unpin_range(hpa, pages)
                unlocked += pages
        dma.runs = []
        dma.iommu_mapped = False
        mm = dma.mm
        if unlocked and not mm.dead:                    # _lock_acct(): an mm that has exited keeps it
            if unlocked <= mm.locked_vm:                # refund_locked_vm() without its frame
                mm.locked_vm -= unlocked
            else:
                refund_locked_vm(mm, unlocked)
            dma.locked_vm -= unlocked
        del starts[i]                                   # _unlink_dma()
        del iommu.dmas[i]
        dma.bitmap = None
        iommu.dma_avail += 1
        return size

    def _do_unmap(self, iommu: VfioIommu, flags: int, iova: int, size: int, bitmap: tuple[int, int, int],
                  current: "Task") -> int:
        """vfio_dma_do_unmap(); returns the bytes unmapped.

        v1 (VFIO_TYPE1_IOMMU) keeps the old coalescing semantics: a range
        starting inside a mapping unmaps nothing, one covering a mapping's
        first byte unmaps all of it.  v2 refuses ranges that bisect a
        mapping (EINVAL) and returns size 0 only when nothing was mapped.
        """
        unmap_all = bool(flags & uapi.VFIO_DMA_UNMAP_FLAG_ALL)
        invalidate_vaddr = bool(flags & uapi.VFIO_DMA_UNMAP_FLAG_VADDR)
        pgshift = _ffs(iommu.pgsize_bitmap)
        pgsize = 1 << pgshift
        if iova & (pgsize - 1):
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: iova {iova:#x} is not aligned to {pgsize:#x}")
        if unmap_all:
            if iova or size:
                raise fail(EINVAL, "VFIO_IOMMU_UNMAP_DMA: VFIO_DMA_UNMAP_FLAG_ALL needs iova 0 and size 0")
            size = U64
        elif not size or size & (pgsize - 1) or iova + size - 1 > U64:
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: size {size:#x} must be a non-zero multiple of {pgsize:#x} "
                               f"and iova {iova:#x} + size must not wrap")
        if flags & uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP and \
                (not iommu.dirty_page_tracking or bitmap[0] != pgsize):
            raise fail(EINVAL, "VFIO_IOMMU_UNMAP_DMA: GET_DIRTY_BITMAP needs dirty tracking started "
                               f"(VFIO_IOMMU_DIRTY_PAGES) and bitmap pgsize {pgsize:#x}")
        if iommu.v2 and not unmap_all:
            dma = self._find_dma(iommu, iova, 1)
            if dma is not None and dma.iova != iova:
                raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: iova {iova:#x} is inside the mapping "
                                   f"{dma.iova:#x}+{dma.size:#x}; Type1v2 unmaps whole mappings only")
            dma = self._find_dma(iommu, iova + size - 1, 0)
            if dma is not None and dma.end != iova + size:
                raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: the range ends inside the mapping "
                                   f"{dma.iova:#x}+{dma.size:#x}; Type1v2 unmaps whole mappings only")
        unmapped = 0
        first = self._find_dma_first(iommu, iova, size)
        if first is None:
            return 0
        end = iova + size
        if invalidate_vaddr:
            done: list[VfioDma] = []
            for dma in iommu.dmas[first:]:
                if dma.iova >= end or (not iommu.v2 and iova > dma.iova):
                    break
                if dma.vaddr_invalid:
                    for d in done:
                        d.vaddr_invalid = False
                        iommu.vaddr_invalid_count -= 1
                    raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA (VADDR): the vaddr of {dma.iova:#x}+{dma.size:#x} "
                                       f"is already invalid; nothing was changed")
                dma.vaddr_invalid = True
                iommu.vaddr_invalid_count += 1
                unmapped += dma.size
                done.append(dma)
            return unmapped
        i = first
        while i < len(iommu.dmas):
            dma = iommu.dmas[i]
            if dma.iova >= end or (not iommu.v2 and iova > dma.iova):
                break
            if flags & uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
                self._update_user_bitmap(bitmap[2], iommu, dma, iova, pgsize, current)
            unmapped += dma.size
            self._remove_dma(iommu, dma)
        return unmapped

    # -- dirty page tracking ---------------------------------------------------------------------------------

    def _bitmap_alloc(self, dma: VfioDma, pgsize: int) -> None:
        """vfio_dma_bitmap_alloc(): zeroed, one spare word for the shifts."""
        npages = dma.size // pgsize
        if npages > DIRTY_BITMAP_PAGES_MAX:
            raise fail(EINVAL, f"a mapping of {npages} pages is too large for a dirty bitmap "
                               f"({DIRTY_BITMAP_PAGES_MAX} pages at most)")
        if self.kernel.faults.should_fail("kmalloc:vfio_dma_bitmap_alloc"):
            raise fail(ENOMEM, "kvzalloc of a dirty bitmap failed (fault injection)")
        dma.bitmap = np.zeros(dirty_bitmap_bytes(npages) // 8 + 1, dtype=np.uint64)

    def _update_user_bitmap(self, user: int, iommu: VfioIommu, dma: VfioDma, base_iova: int, pgsize: int,
                            current: "Task") -> None:
        """update_user_bitmap(): copy the mapping's bits into the user's bitmap
        at its offset from ``base_iova``.

        When the offset is not a multiple of 64 pages the words are shifted
        left in place and ORed with the user's word already there; the bits
        pushed past the mapping's end stay in its bitmap, and
        vfio_iova_dirty_bitmap() clears only the mapping's own bits
        afterwards, so later reports carry them (upstream defect, reproduced:
        docs/deviations.md).
        """
        assert dma.bitmap is not None
        pgshift = _ffs(pgsize)
        nbits = dma.size >> pgshift
        bit_offset = (dma.iova - base_iova) >> pgshift
        copy_offset = bit_offset // 64
        shift = bit_offset % 64
        if iommu.num_non_pinned_groups and dma.iommu_mapped:
            bitmap_set(dma.bitmap, 0, nbits)
        if shift:
            bitmap_shift_left(dma.bitmap, shift, nbits + shift)
            leftover = struct.unpack("<Q", copy_from_user(current, user + copy_offset * 8, 8))[0]
            dma.bitmap[0] |= np.uint64(leftover)
        nbytes = dirty_bitmap_bytes(nbits + shift)
        words = dma.bitmap[:nbytes // 8]
        copy_to_user(current, user + copy_offset * 8, words.astype("<u8").tobytes())
        stale = _bits_from(words, nbits + shift)
        if stale:
            self.log.info(deviation("8", stale=stale, iova=dma.iova, size=dma.size))

    def _iova_dirty_bitmap(self, user: int, iommu: VfioIommu, iova: int, size: int, pgsize: int,
                           current: "Task") -> None:
        """vfio_iova_dirty_bitmap(): the range must not bisect a mapping."""
        dma = self._find_dma(iommu, iova, 1)
        if dma is not None and dma.iova != iova:
            raise fail(EINVAL, f"VFIO_IOMMU_DIRTY_PAGES: iova {iova:#x} is inside the mapping "
                               f"{dma.iova:#x}+{dma.size:#x}; ask for whole mappings")
        dma = self._find_dma(iommu, iova + size - 1, 0)
        if dma is not None and dma.end != iova + size:
            raise fail(EINVAL, f"VFIO_IOMMU_DIRTY_PAGES: the range ends inside the mapping "
                               f"{dma.iova:#x}+{dma.size:#x}; ask for whole mappings")
        pgshift = _ffs(pgsize)
        last = iova + size - 1
        for dma in list(iommu.dmas):
            if dma.iova < iova:
                continue
            if dma.iova > last:
                break
            self._update_user_bitmap(user, iommu, dma, iova, pgsize, current)
            assert dma.bitmap is not None
            # Re-populated from the external pins (vfio_dma_populate_bitmap): none here.
            bitmap_clear(dma.bitmap, 0, dma.size >> pgshift)

    def _dirty_pages(self, iommu: VfioIommu, arg: int, current: "Task") -> int:
        """vfio_iommu_type1_dirty_pages()"""
        if not iommu.v2:
            raise fail(EACCES, "VFIO_IOMMU_DIRTY_PAGES needs a VFIO_TYPE1v2_IOMMU container")
        cls = uapi.vfio_iommu_type1_dirty_bitmap
        minsz = uapi.offsetofend(cls, "flags")
        dirty = copy_struct_from_user(current, arg, cls, minsz)
        mask = (uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START | uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP |
                uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP)
        if dirty.argsz < minsz or dirty.flags & ~mask:
            raise fail(EINVAL, f"VFIO_IOMMU_DIRTY_PAGES: argsz {dirty.argsz} < {minsz} or unknown flags "
                               f"{dirty.flags:#x}")
        if _ffs(dirty.flags) != _fls(dirty.flags) or not dirty.flags:
            raise fail(EINVAL, f"VFIO_IOMMU_DIRTY_PAGES: flags {dirty.flags:#x} must be exactly one of "
                               f"START, STOP, GET_BITMAP")
        pgsize = 1 << _ffs(iommu.pgsize_bitmap)
        if dirty.flags & uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START:
            if not iommu.dirty_page_tracking:
                # vfio_dma_bitmap_alloc_all()
                done: list[VfioDma] = []
                try:
                    for dma in iommu.dmas:
                        self._bitmap_alloc(dma, pgsize)
                        done.append(dma)
                except KernelError:
                    for dma in done:
                        dma.bitmap = None
                    raise
                iommu.dirty_page_tracking = True
            return 0
        if dirty.flags & uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP:
            if iommu.dirty_page_tracking:
                iommu.dirty_page_tracking = False
                for dma in iommu.dmas:
                    dma.bitmap = None
            return 0
        rcls = uapi.vfio_iommu_type1_dirty_bitmap_get
        data_size = dirty.argsz - minsz
        if not data_size or data_size < ctypes.sizeof(rcls):
            raise fail(EINVAL, f"VFIO_IOMMU_DIRTY_PAGES: argsz {dirty.argsz} leaves no room for the struct "
                               f"vfio_iommu_type1_dirty_bitmap_get ({minsz + ctypes.sizeof(rcls)} needed)")
        r_iova, r_size, b_pgsize, b_size, b_data = _DIRTY_GET.unpack(
            copy_from_user(current, arg + minsz, _DIRTY_GET.size))
        if r_iova + r_size > U64:
            raise fail(EINVAL, f"VFIO_IOMMU_DIRTY_PAGES: iova {r_iova:#x} + size {r_size:#x} wraps")
        if not access_ok(b_data, b_size):
            raise fail(EINVAL, f"VFIO_IOMMU_DIRTY_PAGES: bitmap {b_data:#x}+{b_size:#x} is not in user space")
        _verify_bitmap_size(_shr(r_size, _ffs(b_pgsize)), b_size, "VFIO_IOMMU_DIRTY_PAGES")
        if b_pgsize != pgsize:
            raise fail(EINVAL, f"VFIO_IOMMU_DIRTY_PAGES: bitmap pgsize {b_pgsize:#x} is not the smallest IOMMU "
                               f"page size {pgsize:#x}")
        if r_iova & (pgsize - 1):
            raise fail(EINVAL, f"VFIO_IOMMU_DIRTY_PAGES: iova {r_iova:#x} is not aligned to {pgsize:#x}")
        if not r_size or r_size & (pgsize - 1):
            raise fail(EINVAL, f"VFIO_IOMMU_DIRTY_PAGES: size {r_size:#x} must be a non-zero multiple of "
                               f"{pgsize:#x}")
        if not iommu.dirty_page_tracking:
            raise fail(EINVAL, "VFIO_IOMMU_DIRTY_PAGES: dirty tracking is not started (FLAG_START first)")
        self._iova_dirty_bitmap(b_data, iommu, r_iova, r_size, pgsize, current)
        return 0

    # -- introspection --------------------------------------------------------------------------------------------

    def describe(self, iommu: VfioIommu) -> dict[str, Any]:
        return {
            "type": "Type1v2" if iommu.v2 else "Type1", "nesting": iommu.nesting,
            "page_sizes": iommu.pgsize_bitmap, "dma_avail": iommu.dma_avail,
            "iova_ranges": [list(n) for n in iommu.iova_list],
            "dirty_tracking": iommu.dirty_page_tracking,
            "domains": [{"id": d.domain.id, "groups": [g.iommu_group.id for g in d.groups],
                         "enforce_cache_coherency": d.enforce_cache_coherency} for d in iommu.domain_list],
            "mappings": [{"iova": d.iova, "size": d.size, "vaddr": d.vaddr, "prot": d.prot,
                          "vaddr_invalid": d.vaddr_invalid, "locked_pages": d.locked_vm} for d in iommu.dmas],
        }


# -- helpers -----------------------------------------------------------------------------------------------------

# MAP_DMA and UNMAP_DMA's arguments up to ``size`` (minsz), unpacked without ctypes objects.
_DMA_MAP = struct_layout(uapi.vfio_iommu_type1_dma_map, "size")
_DMA_UNMAP = struct_layout(uapi.vfio_iommu_type1_dma_unmap, "size")
_DMA_MAP_RW = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE
# What the ioctl switch and the fast paths test at every call, as module globals.
_CHECK_EXTENSION, _GET_INFO = uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_IOMMU_GET_INFO
_MAP_DMA_CMD, _UNMAP_DMA_CMD = uapi.VFIO_IOMMU_MAP_DMA, uapi.VFIO_IOMMU_UNMAP_DMA
_FLAG_READ, _FLAG_WRITE, _FLAG_VADDR = (uapi.VFIO_DMA_MAP_FLAG_READ, uapi.VFIO_DMA_MAP_FLAG_WRITE,
                                        uapi.VFIO_DMA_MAP_FLAG_VADDR)
_DMA_MAP_FLAGS = _DMA_MAP_RW | uapi.VFIO_DMA_MAP_FLAG_VADDR
_DMA_UNMAP_FLAGS = (uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | uapi.VFIO_DMA_UNMAP_FLAG_VADDR |
                    uapi.VFIO_DMA_UNMAP_FLAG_ALL)
# struct vfio_bitmap as a 64-bit program passes it: pgsize, size, data pointer.
_VFIO_BITMAP = struct.Struct("<QQQ")
# struct vfio_iommu_type1_dirty_bitmap_get: iova, size, then struct vfio_bitmap.
_DIRTY_GET = struct.Struct("<QQQQQ")


def _bits_from(words: np.ndarray, start: int) -> int:
    """How many bits at or after ``start`` are set in ``words``."""
    w = start >> 6
    if w >= words.size:
        return 0
    tail = words[w:].copy()
    tail[0] &= np.uint64((U64 << (start & 63)) & U64)
    return int(sum(bin(int(v)).count("1") for v in tail[tail != 0]))


def _verify_bitmap_size(npages: int, bitmap_size: int, call: str) -> None:
    """verify_bitmap_size()"""
    if not npages or not bitmap_size or bitmap_size > DIRTY_BITMAP_SIZE_MAX or \
            bitmap_size < dirty_bitmap_bytes(npages):
        raise fail(EINVAL, f"{call}: a bitmap of {bitmap_size} bytes does not fit {npages} pages "
                           f"({dirty_bitmap_bytes(npages)} bytes needed, {DIRTY_BITMAP_SIZE_MAX} at most)")


def _split_extents(extents: list[tuple[int, int]], k: int,
                   step: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Extents (first address, pages ``step`` apart) cut after their first ``k`` pages."""
    head: list[tuple[int, int]] = []
    for i, (first, n) in enumerate(extents):
        if k >= n:
            head.append((first, n))
            k -= n
            continue
        if k:
            head.append((first, k))
        return head, [(first + k * step, n - k), *extents[i + 1:]]
    return head, []
