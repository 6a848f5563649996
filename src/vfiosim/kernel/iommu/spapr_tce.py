"""The sPAPR TCE IOMMU driver for VFIO (drivers/vfio/vfio_iommu_spapr_tce.c).

This is the modern (Linux 6.x) driver.  A container owns up to two DMA
windows (``tables``), shared by every group attached to it.  With
VFIO_SPAPR_TCE_IOMMU (v1) the window is the PE's default 32-bit window,
created on first use, and the whole window is charged to RTLIMIT_MEMLOCK at
VFIO_IOMMU_ENABLE because mapping happens too often to account page by
page.  Each function names the upstream function it follows; checks happen
in the same order, so the same bad input gets the same errno.

Where upstream writes outside a TCE table (a MAP_DMA or UNMAP_DMA running
past the end of a PowerNV window, because only the first page is range
checked), this driver refuses with EINVAL and logs why instead; see
docs/deviations.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from errno import EBUSY, EFAULT, EINVAL, ENODEV, ENOENT, ENOMEM, ENOSPC, ENOTTY, ENXIO, EPERM
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ...uapi import vfio as uapi
from ..deviations import deviation
from ..errors import KernelError, fail
from ..faults import H_HARDWARE
from ..mm import AddressSpace, account_locked_vm
from ..platform.eeh import (EEH_OPT_DISABLE, EEH_OPT_ENABLE, EEH_OPT_THAW_DMA, EEH_OPT_THAW_MMIO,
                            EEH_RESET_DEACTIVATE, EEH_RESET_FUNDAMENTAL, EEH_RESET_HOT, EehPe)
from ..progression import Progression, as_progression
from ..uaccess import copy_struct_from_user, copy_struct_to_user, struct_layout
from ..vfio.iommu_driver import VfioIommuDriver
from . import prereg
from .prereg import (MmIommuMem, mm_iommu_get, mm_iommu_lookup, mm_iommu_new, mm_iommu_put,
                     mm_iommu_ua_to_hpa)
from .table_group import TableGroup, table_group_of
from .tce import (DMA_BIDIRECTIONAL, DMA_FROM_DEVICE, DMA_TO_DEVICE, IOMMU_PAGE_SHIFT_4K,
                  IOMMU_TABLE_GROUP_MAX_TABLES, TCE_PERM_MASK, IommuTable, direction_to_perm)

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..task import Task
    from .iommu import IommuGroup

# Pages pinned per step of a bulk map: bounds memory for huge requests.
BATCH = 1 << 18
# MAP_DMA and UNMAP_DMA's arguments up to ``size`` (minsz), unpacked without ctypes objects.
_DMA_MAP = struct_layout(uapi.vfio_iommu_type1_dma_map, "size")
_DMA_UNMAP = struct_layout(uapi.vfio_iommu_type1_dma_unmap, "size")
_DMA_MAP_RW = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE
_NO_HPAS = np.zeros(0, dtype=np.uint64)
_NO_HPAS.flags.writeable = False


@dataclass
class TceContainer:
    """``struct tce_container``"""

    v2: bool
    enabled: bool = False
    def_window_pending: bool = False
    locked_pages: int = 0
    mm: AddressSpace | None = None
    tables: list[IommuTable | None] = field(default_factory=lambda: [None] * IOMMU_TABLE_GROUP_MAX_TABLES)
    # group_list: newest first, as list_add() leaves it; "the first group"
    # (list_first_entry) is therefore the most recently attached one.
    groups: list["IommuGroup"] = field(default_factory=list)
    # prereg_list: the preregistered regions this container references (v2).
    prereg: list[MmIommuMem] = field(default_factory=list)


# A preregistered region a run of IOMMU pages translates through: (region,
# index of the first page, number of pages).
RegionUse = tuple[MmIommuMem, int, int]


def _tg(group: "IommuGroup") -> TableGroup:
    """The table group of a group this driver attached (it checked it had one)."""
    tg = table_group_of(group)
    assert tg is not None, f"IOMMU group {group.id} lost its table group"
    return tg


def iommu_tce_check_ioba(page_shift: int, offset: int, size: int, ioba: int, npages: int) -> bool:
    """iommu_tce_check_ioba(): True when the IOBA fails the check.

    Note that ``npages`` is not used: only the first page is checked.
    """
    if ioba & ((1 << page_shift) - 1):
        return True
    ioba >>= page_shift
    return ioba < offset or ioba + 1 > offset + size


def iommu_tce_put_param_check(tbl: IommuTable, ioba: int, gpa: int) -> int:
    """The macro in asm/iommu.h ORs two -EINVALs with ``||``: it yields 1, not
    -EINVAL, so a misaligned IOVA makes MAP_DMA/UNMAP_DMA *return 1*."""
    bad = iommu_tce_check_ioba(tbl.it_page_shift, tbl.it_offset, tbl.it_size, ioba, 1) or \
        bool(gpa & ((1 << tbl.it_page_shift) - 1))
    return 1 if bad else 0


def iommu_tce_clear_param_check(tbl: IommuTable, ioba: int, tce_value: int, npages: int) -> int:
    bad = iommu_tce_check_ioba(tbl.it_page_shift, tbl.it_offset, tbl.it_size, ioba, npages) or bool(tce_value)
    return 1 if bad else 0


def _table_at(c: TceContainer, ioba: int) -> IommuTable | None:
    """The window of ``c`` that bus address ``ioba`` falls in, or None: the
    lookup of tce_iommu_find_table() for the fast paths, which leave a miss
    to the general path to report."""
    for tbl in c.tables:
        if tbl is not None and tbl.it_offset <= ioba >> tbl.it_page_shift < tbl.it_offset + tbl.it_size:
            return tbl
    return None


class SpaprTceIommuDriver(VfioIommuDriver):
    """tce_iommu_driver_ops ("iommu-vfio-powerpc")."""

    name = "iommu-vfio-powerpc"
    module = "vfio_iommu_spapr_tce"

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.log = kernel.log
        self.page_shift = kernel.page_shift
        self._handlers: dict[int, Callable[[TceContainer, int, "Task"], int]] = {
            uapi.VFIO_IOMMU_MAP_DMA: self._map_dma,
            uapi.VFIO_IOMMU_UNMAP_DMA: self._unmap_dma,
            uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO: self._get_info,
            uapi.VFIO_IOMMU_ENABLE: self._enable_ioctl,
            uapi.VFIO_IOMMU_DISABLE: self._disable_ioctl,
            uapi.VFIO_EEH_PE_OP: self._eeh_pe_op,
        }
        # What the v1 fast path consults of fault injection: the page's pin.
        self._use_page_event = kernel.faults.bundle(("pin_user_pages:tce_iommu_use_page", 1))

    # -- vfio_iommu_driver_ops ------------------------------------------------------------

    def open(self, arg: int, current: "Task") -> TceContainer:
        """tce_iommu_open()"""
        if arg not in (uapi.VFIO_SPAPR_TCE_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU):
            self.log.err("tce_vfio: Wrong IOMMU type")
            raise fail(EINVAL, f"IOMMU type {arg} is not sPAPR TCE (2) or v2 (7)")
        if self.kernel.faults.should_fail("kmalloc:tce_iommu_open"):
            raise fail(ENOMEM, "kzalloc of the container failed (fault injection)")
        return TceContainer(v2=arg == uapi.VFIO_SPAPR_TCE_v2_IOMMU)

    def release(self, c: TceContainer, current: "Task") -> None:
        """tce_iommu_release(): detach every group, free the tables, refund."""
        while c.groups:
            self.detach_group(c, c.groups[0], current)
        for tbl in c.tables:
            if tbl is not None:
                self._free_table(c, tbl)
        c.tables = [None] * IOMMU_TABLE_GROUP_MAX_TABLES
        for mem in list(c.prereg):
            try:
                self._prereg_free(c, mem)
            except KernelError as exc:
                self.log.warn(f"WARNING: tce_iommu_release: preregistered region {mem.ua:#x} not freed: {exc}")
        self._disable(c)
        mm, c.mm = c.mm, None
        if mm is not None:
            mm.mmdrop()

    def attach_group(self, c: TceContainer, group: "IommuGroup", current: "Task") -> None:
        """tce_iommu_attach_group()"""
        table_group = table_group_of(group)
        if table_group is None:
            raise fail(ENODEV, f"IOMMU group {group.id} has no TCE table group")
        if c.v2 and table_group.max_dynamic_windows_supported == 0:
            raise fail(EINVAL, f"IOMMU group {group.id} supports no dynamic windows, which v2 requires")
        if not c.v2 and c.groups:
            raise fail(EBUSY, f"a VFIO_SPAPR_TCE_IOMMU (v1) container takes one group; it has group "
                              f"{c.groups[0].id}, cannot add group {group.id} (use v2 to share windows)")
        for other in c.groups:
            if other is group:
                self.log.warn(f"tce_vfio: Group {group.id} is already attached")
                raise fail(EBUSY, f"IOMMU group {group.id} is already attached")
            if _tg(other).ops_identity() != table_group.ops_identity():
                self.log.warn(f"tce_vfio: Group {group.id} is incompatible with group {other.id}")
                raise fail(EPERM, f"IOMMU group {group.id} is incompatible with group {other.id}")
        if self.kernel.faults.should_fail("kmalloc:tce_iommu_attach_group"):
            raise fail(ENOMEM, "kzalloc of the group's list entry failed (fault injection)")
        error: KernelError | None = None
        try:
            self._take_ownership(c, table_group)
        except KernelError as exc:
            error = exc
        if not c.groups and c.tables[0] is None:
            c.def_window_pending = True
        if error is not None:
            raise error
        c.groups.insert(0, group)

    def detach_group(self, c: TceContainer, group: "IommuGroup", current: "Task") -> None:
        """tce_iommu_detach_group(): the group's windows are cleared and unset;
        the tables and their accounting stay with the container."""
        if group not in c.groups:
            self.log.warn(f"tce_vfio: detaching unattached group #{group.id}")
            return
        c.groups.remove(group)
        self._release_ownership(c, _tg(group))

    def _take_ownership(self, c: TceContainer, table_group: TableGroup) -> None:
        """tce_iommu_take_ownership(): program every container window into the PE."""
        for num, tbl in enumerate(c.tables):
            if tbl is None:
                continue
            try:
                table_group.set_window(num, tbl)
            except KernelError:
                for i in range(IOMMU_TABLE_GROUP_MAX_TABLES):
                    table_group.unset_window(i)
                raise

    def _release_ownership(self, c: TceContainer, table_group: TableGroup) -> None:
        """tce_iommu_release_ownership()"""
        for num, tbl in enumerate(c.tables):
            if tbl is not None:
                self._clear(c, tbl, tbl.it_offset, tbl.it_size)
                table_group.unset_window(num)

    # -- ioctl ---------------------------------------------------------------------------

    def ioctl(self, c: TceContainer | None, cmd: int, arg: int, current: "Task") -> int:
        """tce_iommu_ioctl()"""
        if cmd == uapi.VFIO_CHECK_EXTENSION:
            if arg in (uapi.VFIO_SPAPR_TCE_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU):
                return 1
            if arg == uapi.VFIO_EEH:
                return 1 if self.kernel.eeh_enabled() else 0
            return 0
        assert c is not None
        if c.mm is not None and c.mm is not current.mm:
            raise fail(EPERM, "this container belongs to another address space (another process's, or this "
                              "process's before exec())")
        handler = self._handlers.get(cmd)
        if handler is not None:
            return handler(c, arg, current)
        if cmd in (uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY, uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY,
                   uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE) and c.v2:
            return self._v2_ioctl(c, cmd, arg, current)
        name = uapi.ioctl_name_for(cmd, "vfio-container")
        why = "only for VFIO_SPAPR_TCE_v2_IOMMU containers" if cmd in (
            uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY, uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY,
            uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE) else "unknown to the sPAPR TCE IOMMU"
        raise fail(ENOTTY, f"{name or hex(cmd)}: {why}")

    def _v2_ioctl(self, c: TceContainer, cmd: int, arg: int, current: "Task") -> int:
        if cmd == uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY:
            self._mm_set(c, current)
            param = self._copy_reg(current, arg, "VFIO_IOMMU_SPAPR_REGISTER_MEMORY")
            return self._register_pages(c, param.vaddr, param.size, current)
        if cmd == uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY:
            if c.mm is None:
                raise fail(EPERM, "nothing was registered through this container yet")
            param = self._copy_reg(current, arg, "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY")
            self._unregister_pages(c, param.vaddr, param.size)
            return 0
        if cmd == uapi.VFIO_IOMMU_SPAPR_TCE_CREATE:
            self._mm_set(c, current)
            if not c.groups:
                raise fail(ENXIO, "no group is attached")
            cls = uapi.vfio_iommu_spapr_tce_create
            minsz = uapi.offsetofend(cls, "start_addr")
            create = copy_struct_from_user(current, arg, cls, minsz)
            if create.argsz < minsz:
                raise fail(EINVAL, f"VFIO_IOMMU_SPAPR_TCE_CREATE: argsz {create.argsz} < {minsz}")
            if create.flags:
                raise fail(EINVAL, f"VFIO_IOMMU_SPAPR_TCE_CREATE: flags {create.flags:#x}: none are supported")
            self._create_default_window(c, current)
            create.start_addr = self._create_window(c, create.page_shift, create.window_size, create.levels, current)
            copy_struct_to_user(current, arg, create, minsz)
            return 0
        # VFIO_IOMMU_SPAPR_TCE_REMOVE
        self._mm_set(c, current)
        if not c.groups:
            raise fail(ENXIO, "no group is attached")
        minsz = uapi.offsetofend(uapi.vfio_iommu_spapr_tce_remove, "start_addr")
        remove = copy_struct_from_user(current, arg, uapi.vfio_iommu_spapr_tce_remove, minsz)
        if remove.argsz < minsz:
            raise fail(EINVAL, f"VFIO_IOMMU_SPAPR_TCE_REMOVE: argsz {remove.argsz} < {minsz}")
        if remove.flags:
            raise fail(EINVAL, f"VFIO_IOMMU_SPAPR_TCE_REMOVE: flags {remove.flags:#x}: none are supported")
        if c.def_window_pending and not remove.start_addr:
            # The default window was never created: removing it just cancels it.
            c.def_window_pending = False
            return 0
        self._remove_window(c, remove.start_addr)
        return 0

    @staticmethod
    def _copy_reg(current: "Task", arg: int, name: str) -> uapi.vfio_iommu_spapr_register_memory:
        cls = uapi.vfio_iommu_spapr_register_memory
        minsz = uapi.offsetofend(cls, "size")
        param = copy_struct_from_user(current, arg, cls, minsz)
        if param.argsz < minsz:
            raise fail(EINVAL, f"{name}: argsz {param.argsz} < {minsz}")
        if param.flags:
            raise fail(EINVAL, f"{name}: flags {param.flags:#x}: none are supported")
        return param

    # -- preregistration (tce_iommu_register_pages, tce_iommu_unregister_pages) --------------

    def _register_pages(self, c: TceContainer, vaddr: int, size: int, current: "Task") -> int:
        """tce_iommu_register_pages(); returns what the ioctl returns (0, or the
        positive count mm_iommu_new() can leave, docs/deviations.md)."""
        mm = c.mm
        assert mm is not None
        mask = mm.page_size - 1
        if vaddr & mask or size & mask or vaddr + size > (1 << 64) - 1:
            raise fail(EINVAL, f"VFIO_IOMMU_SPAPR_REGISTER_MEMORY: vaddr {vaddr:#x} and size {size:#x} must be "
                               f"multiples of PAGE_SIZE {mm.page_size:#x} and must not wrap")
        entries = size >> mm.page_shift
        mem = mm_iommu_get(mm, vaddr, entries)
        if mem is not None:
            if any(m is mem for m in c.prereg):
                mm_iommu_put(mm, mem)
                raise fail(EBUSY, f"{vaddr:#x}+{size:#x} is already registered through this container")
        else:
            try:
                new = mm_iommu_new(mm, vaddr, entries, current)
            except KernelError as exc:
                if exc.errno == ENOMEM and entries and "RLIMIT_MEMLOCK" in exc.reason:
                    raise fail(ENOMEM, f"VFIO_IOMMU_SPAPR_REGISTER_MEMORY: {exc.reason}; raise RLIMIT_MEMLOCK "
                                       f"(ulimit -l) or run with CAP_IPC_LOCK") from None
                raise
            if isinstance(new, int):
                return new
            mem = new
        if self.kernel.faults.should_fail("kmalloc:tce_iommu_register_pages"):
            mm_iommu_put(mm, mem)                        # put_exit
            raise fail(ENOMEM, "kzalloc of the container's region entry failed (fault injection)")
        c.prereg.insert(0, mem)
        c.enabled = True
        return 0

    def _prereg_free(self, c: TceContainer, mem: MmIommuMem) -> None:
        """tce_iommu_prereg_free()"""
        assert c.mm is not None
        mm_iommu_put(c.mm, mem)
        c.prereg.remove(mem)

    def _unregister_pages(self, c: TceContainer, vaddr: int, size: int) -> None:
        """tce_iommu_unregister_pages().

        Upstream drops the container's reference first and only then sees, in
        the final put, that TCEs still use the region; that EBUSY is ignored
        and 0 returned.  The region stays registered (and charged) in the mm,
        forgotten by the container.  Reproduced, with a dmesg line.
        """
        mm = c.mm
        assert mm is not None
        mask = mm.page_size - 1
        if vaddr & mask or size & mask:
            raise fail(EINVAL, f"VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY: vaddr {vaddr:#x} and size {size:#x} must be "
                               f"multiples of PAGE_SIZE {mm.page_size:#x}")
        mem = mm_iommu_get(mm, vaddr, size >> mm.page_shift)
        if mem is None:
            raise fail(ENOENT, f"{vaddr:#x}+{size:#x} is not registered (unregister needs the exact vaddr and size)")
        error: KernelError | None = None
        if not any(m is mem for m in c.prereg):
            error = fail(ENOENT, f"{vaddr:#x}+{size:#x} was not registered through this container")
        else:
            try:
                self._prereg_free(c, mem)
            except KernelError as exc:
                error = exc
        try:
            mm_iommu_put(mm, mem)
        except KernelError as exc:
            if exc.errno == EBUSY:
                self.log.warn(deviation("3b", vaddr=vaddr, size=size))
        if error is not None:
            raise error

    # -- windows (tce_iommu_remove_window) ------------------------------------------------------

    def _remove_window(self, c: TceContainer, start_addr: int) -> None:
        found = None
        for num, tbl in enumerate(c.tables):
            if tbl is not None and tbl.contains_entry(start_addr >> tbl.it_page_shift):
                found = num, tbl
                break
        if found is None:
            raise fail(EINVAL, f"VFIO_IOMMU_SPAPR_TCE_REMOVE: {start_addr:#x} is in no window "
                               f"({self._windows_text(c) or 'there are none'})")
        num, tbl = found
        self._clear(c, tbl, tbl.it_offset, tbl.it_size)
        for g in c.groups:
            _tg(g).unset_window(num)
        self._free_table(c, tbl)
        c.tables[num] = None

    # -- VFIO_IOMMU_SPAPR_TCE_GET_INFO --------------------------------------------------

    def _get_info(self, c: TceContainer, arg: int, current: "Task") -> int:
        tg = table_group_of(c.groups[0]) if c.groups else None
        if tg is None:
            raise fail(ENXIO, "no group is attached")
        cls = uapi.vfio_iommu_spapr_tce_info
        minsz = uapi.offsetofend(cls, "dma32_window_size")
        info = copy_struct_from_user(current, arg, cls, minsz)
        if info.argsz < minsz:
            raise fail(EINVAL, f"VFIO_IOMMU_SPAPR_TCE_GET_INFO: argsz {info.argsz} < {minsz}")
        info.dma32_window_start = tg.tce32_start & 0xFFFFFFFF
        info.dma32_window_size = tg.tce32_size & 0xFFFFFFFF
        info.flags = 0
        info.ddw.pgsizes = info.ddw.max_dynamic_windows_supported = info.ddw.levels = 0
        if tg.max_dynamic_windows_supported and c.v2:
            info.flags |= uapi.VFIO_IOMMU_SPAPR_INFO_DDW
            info.ddw.pgsizes = tg.pgsizes
            info.ddw.max_dynamic_windows_supported = tg.max_dynamic_windows_supported
            info.ddw.levels = tg.max_levels
        ddwsz = uapi.offsetofend(cls, "ddw")
        copy_struct_to_user(current, arg, info, ddwsz if info.argsz >= ddwsz else minsz)
        return 0

    # -- ENABLE / DISABLE (v1) -------------------------------------------------------------

    def _enable_ioctl(self, c: TceContainer, arg: int, current: "Task") -> int:
        if c.v2:
            raise fail(ENOTTY, "VFIO_IOMMU_ENABLE is for v1 containers; v2 is enabled by REGISTER_MEMORY")
        self._enable(c, current)
        return 0

    def _disable_ioctl(self, c: TceContainer, arg: int, current: "Task") -> int:
        if c.v2:
            raise fail(ENOTTY, "VFIO_IOMMU_DISABLE is for v1 containers")
        self._disable(c)
        return 0

    def _mm_set(self, c: TceContainer, current: "Task") -> None:
        """tce_iommu_mm_set(): the first user's mm is the container's for good."""
        if c.mm is not None:
            if c.mm is not current.mm:
                raise fail(EPERM, "this container belongs to another process's address space")
            return
        c.mm = current.mm
        c.mm.mmgrab()

    def _enable(self, c: TceContainer, current: "Task") -> None:
        """tce_iommu_enable(): charge the whole 32-bit window to locked_vm."""
        if c.enabled:
            raise fail(EBUSY, "the container is already enabled")
        if not c.groups:
            raise fail(ENODEV, "no group is attached")
        tg = table_group_of(c.groups[0])
        if tg is None:
            raise fail(ENODEV, "the group has no TCE table group")
        if not tg.tce32_size:
            raise fail(EPERM, "the PE has no 32-bit DMA window")
        self._mm_set(c, current)
        locked = tg.tce32_size >> self.page_shift
        try:
            account_locked_vm(c.mm, locked, True, current, site="account_locked_vm:tce_iommu_enable")
        except KernelError as exc:
            raise fail(exc.errno, f"VFIO_IOMMU_ENABLE must lock the whole {tg.tce32_size:#x}-byte DMA window: "
                                  f"{exc.reason}; raise RLIMIT_MEMLOCK (ulimit -l) or run with CAP_IPC_LOCK") from None
        c.locked_pages = locked
        c.enabled = True

    def _disable(self, c: TceContainer) -> None:
        """tce_iommu_disable()"""
        if not c.enabled:
            return
        c.enabled = False
        assert c.mm is not None
        account_locked_vm(c.mm, c.locked_pages, False, None)

    # -- windows -------------------------------------------------------------------------------

    def _find_table(self, c: TceContainer, ioba: int) -> tuple[int, IommuTable]:
        """tce_iommu_find_table()"""
        for num, tbl in enumerate(c.tables):
            if tbl is not None and tbl.contains_entry(ioba >> tbl.it_page_shift):
                return num, tbl
        raise fail(ENXIO, f"bus address {ioba:#x} is in no DMA window of this container "
                          f"({self._windows_text(c) or 'there are none'})")

    @staticmethod
    def _windows_text(c: TceContainer) -> str:
        return ", ".join(f"#{n} {t.bus_start:#x}..{t.bus_end - 1:#x}" for n, t in enumerate(c.tables) if t)

    def _create_default_window(self, c: TceContainer, current: "Task") -> None:
        """tce_iommu_create_default_window(): the lazily created 32-bit window."""
        if not c.def_window_pending:
            return
        tg = table_group_of(c.groups[0]) if c.groups else None
        if tg is None:
            raise fail(ENODEV, "no group is attached")
        self._create_window(c, IOMMU_PAGE_SHIFT_4K, tg.tce32_size, 1, current)
        c.def_window_pending = False

    def _create_window(self, c: TceContainer, page_shift: int, window_size: int, levels: int,
                       current: "Task") -> int:
        """tce_iommu_create_window(); returns the window's bus address."""
        try:
            num = c.tables.index(None)
        except ValueError:
            raise fail(ENOSPC, f"the container already has {IOMMU_TABLE_GROUP_MAX_TABLES} windows") from None
        tg = table_group_of(c.groups[0]) if c.groups else None
        if tg is None:
            raise fail(EFAULT, "no table group")
        if page_shift >= 64 or not (tg.pgsizes >> page_shift) & 1:
            raise fail(EINVAL, f"IOMMU page size 2^{page_shift} is not in the PE's page sizes {tg.pgsizes:#x}")
        tbl = self._create_table(c, tg, num, page_shift, window_size, levels, current)
        try:
            for g in c.groups:
                _tg(g).set_window(num, tbl)
        except KernelError:
            for g in c.groups:
                _tg(g).unset_window(num)
            self._free_table(c, tbl)
            raise
        c.tables[num] = tbl
        return tbl.bus_start

    def _create_table(self, c: TceContainer, tg: TableGroup, num: int, page_shift: int, window_size: int,
                      levels: int, current: "Task") -> IommuTable:
        """tce_iommu_create_table(): account, then let the platform build it.

        A platform failure after accounting is not refunded: a leak upstream
        has (Linux 6.12), reproduced because VmLck shows it.
        """
        table_size = tg.get_table_size(page_shift, window_size, levels)
        if not table_size:
            raise fail(EINVAL, f"the platform refuses a {window_size:#x}-byte window of 2^{page_shift}-byte pages "
                               f"with {levels} levels")
        account_locked_vm(c.mm, table_size >> self.page_shift, True, current,
                          site="account_locked_vm:tce_iommu_create_table")
        try:
            return tg.create_table(num, page_shift, window_size, levels)
        except KernelError as exc:
            if table_size >> self.page_shift:
                self.log.warn(deviation("3", error=exc, pages=table_size >> self.page_shift))
            raise

    def _free_table(self, c: TceContainer, tbl: IommuTable) -> None:
        """tce_iommu_free_table(): refund it_allocated_size."""
        pages = tbl.it_allocated_size >> self.page_shift
        tbl.put()
        account_locked_vm(c.mm, pages, False, None)

    # -- MAP_DMA --------------------------------------------------------------------------------

    def _map_dma(self, c: TceContainer, arg: int, current: "Task") -> int:
        if not c.enabled:
            raise fail(EPERM, "the container is not enabled (VFIO_IOMMU_ENABLE for v1, "
                              "VFIO_IOMMU_SPAPR_REGISTER_MEMORY for v2)")
        # copy_from_user(&param, arg, minsz) (uaccess.copy_from_user_unpack(), without its frame)
        argsz, flags, vaddr, iova, size = current.mm.read_unpack(arg, _DMA_MAP)
        minsz = _DMA_MAP.size
        if argsz < minsz:
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: argsz {argsz} < {minsz}")
        if flags & ~_DMA_MAP_RW:
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: flags {flags:#x} has bits other than READ|WRITE")
        if self.kernel.fast_paths and self._map_fast(c, flags, vaddr, iova, size):
            return 0
        self._create_default_window(c, current)
        _, tbl = self._find_table(c, iova)
        mask = tbl.page_size - 1
        if size & mask or vaddr & mask:
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: vaddr {vaddr:#x} and size {size:#x} must be "
                               f"multiples of the window's IOMMU page size {tbl.page_size:#x}")
        if flags & uapi.VFIO_DMA_MAP_FLAG_READ:
            direction = DMA_BIDIRECTIONAL if flags & uapi.VFIO_DMA_MAP_FLAG_WRITE else DMA_TO_DEVICE
        elif flags & uapi.VFIO_DMA_MAP_FLAG_WRITE:
            direction = DMA_FROM_DEVICE
        else:
            raise fail(EINVAL, "VFIO_IOMMU_MAP_DMA: flags must include READ and/or WRITE")
        if iommu_tce_put_param_check(tbl, iova, vaddr):
            self._log_return_1("VFIO_IOMMU_MAP_DMA", iova, tbl)
            return 1
        entry = iova >> tbl.it_page_shift
        npages = size >> tbl.it_page_shift
        if c.v2:
            self._build_v2(c, tbl, entry, vaddr, npages, direction, current)
        else:
            self._build(c, tbl, entry, vaddr, npages, direction, current)
        return 0

    def _map_fast(self, c: TceContainer, flags: int, vaddr: int, iova: int, size: int) -> bool:
        """The rest of _map_dma() for one IOMMU page, in straight-line code;
        True when done, False (nothing changed) for the general path to run.

        It takes a READ and/or WRITE map of exactly one IOMMU page, aligned,
        in a window of the container that exists (no default window still
        to create), with no fault injection armed; then _map_dma()'s checks
        pass and tce_iommu_build() or tce_iommu_build_v2() is one entry
        (_build_fast(), _build_v2_fast()).  Everything else -- errors, the
        return of 1, several pages, the deviations -- is the general path's."""
        if c.def_window_pending or self.kernel.faults.armed or not flags & _DMA_MAP_RW:
            return False
        tbl = _table_at(c, iova)                        # tce_iommu_find_table()
        if tbl is None:
            return False
        mask = (1 << tbl.it_page_shift) - 1
        if size != mask + 1 or (vaddr | iova) & mask:
            return False
        if flags & uapi.VFIO_DMA_MAP_FLAG_READ:
            direction = DMA_BIDIRECTIONAL if flags & uapi.VFIO_DMA_MAP_FLAG_WRITE else DMA_TO_DEVICE
        else:
            direction = DMA_FROM_DEVICE
        entry = iova >> tbl.it_page_shift
        if c.v2:
            return self._build_v2_fast(c, tbl, entry, vaddr, direction)
        return self._build_fast(c, tbl, entry, vaddr, direction)

    def _build_fast(self, c: TceContainer, tbl: IommuTable, entry: int, vaddr: int, direction: int) -> bool:
        """tce_iommu_build() of one entry whose IOMMU page is (inside) a kernel
        page pinned without a fault that could fail (AddressSpace.pin_fast),
        that the platform exchanges: the pin counted for fault injection, the
        TCE exchanged, the page of the TCE it replaced unpinned.  A kernel
        page is never too small for such an IOMMU page, and no batch,
        unwinding or deviation is needed.  If the platform refuses the
        exchange the pin is dropped again (the page's presence is what the
        general path's own pin gives it) and the general path reports it."""
        mm = c.mm
        if tbl.it_page_shift > self.page_shift or mm is None:
            return False
        page_mask = (1 << self.page_shift) - 1
        pinned = mm.pin_fast(vaddr & ~page_mask, 1, direction != DMA_TO_DEVICE, False)
        if pinned is None:
            return False
        hpa = pinned[0]
        old = tbl.it_ops.xchg_one(tbl, entry, hpa | (vaddr & page_mask) | tbl.it_ops.perm(direction))
        if old is None:
            mm.phys.unpin_range(hpa, 1)
            return False
        self._use_page_event.times += 1
        if old & TCE_PERM_MASK:                         # _unpin_old()
            mm.phys.unpin_range(old & ~TCE_PERM_MASK, 1)
        return True

    def _build_v2_fast(self, c: TceContainer, tbl: IommuTable, entry: int, vaddr: int, direction: int) -> bool:
        """tce_iommu_build_v2() of one entry that translates through a
        preregistered region (the region's page large enough), in a table
        with a userspace view and every indirect level it needs present:
        the region counts one more mapping, the TCE and its userspace
        address are exchanged, the entry's old region (if it mapped
        something) counts one fewer, in that order, as the general path
        does.  Nothing is pinned."""
        mm = c.mm
        if tbl.it_userspace is None or mm is None:
            return False
        shift = tbl.it_page_shift
        mem = mm_iommu_lookup(mm, vaddr, 1 << shift)
        hpa = None if mem is None else mm_iommu_ua_to_hpa(mm, mem, vaddr, shift)
        if mem is None or hpa is None or mem.cshifts[(vaddr - mem.ua) >> mm.page_shift] < shift:
            return False
        ops = tbl.it_ops
        if tbl.it_indirect_levels and (ops.missing_levels(tbl, True, entry, 1) or
                                       ops.missing_levels(tbl, False, entry, 1)):
            return False
        mem.mapped += 1                                 # mm_iommu_mapped_inc()
        old = ops.xchg_one(tbl, entry, hpa | direction_to_perm(direction))
        if old is None:
            mem.mapped -= 1
            return False
        if old & TCE_PERM_MASK:
            self._unuse_pages_v2(c, tbl, np.array([entry], dtype=np.int64))
        tbl.it_userspace.xchg_one(entry - tbl.it_offset, vaddr)
        return True

    def _pin_addresses(self, tbl: IommuTable, vaddr: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """User addresses of IOMMU pages [first, first+count) and of the kernel pages holding them."""
        shift = tbl.it_page_shift
        tces = np.uint64(vaddr) + (np.arange(first, first + count, dtype=np.uint64) << np.uint64(shift))
        pages = tces & ~np.uint64((1 << self.page_shift) - 1)
        return tces, pages

    def _first_failure(self, c: TceContainer, tbl: IommuTable, vaddr: int, npages: int, write: bool) -> int | None:
        """Where tce_iommu_build() would stop on pinning or containment, without
        pinning anything; None if all ``npages`` pages would pass."""
        pos = 0
        while pos < npages:
            n = min(BATCH, npages - pos)
            _, pages = self._pin_addresses(tbl, vaddr, pos, n)
            res = c.mm.pin_pages(pages, write, dry_run=True) if c.mm else None
            assert res is not None
            bad = np.flatnonzero(res.compound_shifts < tbl.it_page_shift)
            if bad.size:
                return pos + int(bad[0])
            if res.count < n:
                return pos + res.count
            pos += n
        return None

    def _build(self, c: TceContainer, tbl: IommuTable, entry: int, vaddr: int, npages: int, direction: int,
               current: "Task") -> None:
        """tce_iommu_build() (v1): pin each page, check it holds the whole IOMMU
        page, exchange the TCE; on any failure undo this call's entries."""
        if npages == 0:
            return
        mm = c.mm
        assert mm is not None
        write = direction != DMA_TO_DEVICE
        room = tbl.it_offset + tbl.it_size - entry
        if npages > room and tbl.it_ops.overrun_corrupts:
            stop = self._first_failure(c, tbl, vaddr, room, write)
            if stop is None:
                self._log_overrun("VFIO_IOMMU_MAP_DMA", tbl, entry, npages)
                raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: {npages} pages from bus address "
                                   f"{entry << tbl.it_page_shift:#x} run past the end of the window "
                                   f"{tbl.bus_start:#x}..{tbl.bus_end - 1:#x}")
        perm = tbl.it_ops.perm(direction)
        # When IOMMU pages are kernel pages, the pages pinned are consecutive:
        # pin them as a range and build the TCEs (hpa | perm) in one pass.
        consecutive = tbl.it_page_shift == self.page_shift
        done = 0
        error: KernelError | None = None
        while done < npages and error is None:
            n = min(BATCH, npages - done)
            if consecutive:
                first = vaddr + (done << tbl.it_page_shift)
                res = mm.pin_range(first, n, write, tag=perm)
                failed_at = first + (res.count << self.page_shift)
            else:
                tces, pages = self._pin_addresses(tbl, vaddr, done, n)
                res = mm.pin_pages(pages, write)
                failed_at = int(pages[res.count]) if res.count < n else 0
            ok = res.count
            # Upstream pins page by page (tce_iommu_use_page), checking each
            # against the IOMMU page size before the next: a page too small
            # stops the loop before later pins are attempted.
            bad = None
            if res.min_compound_shift() < tbl.it_page_shift:
                bad = int(np.flatnonzero(res.compound_shifts < tbl.it_page_shift)[0])
            tried = ok if bad is None else bad + 1
            passed = self.kernel.faults.take("pin_user_pages:tce_iommu_use_page", tried)
            if passed < tried:
                # An injected failure: pin_user_pages_fast() != 1 is -EFAULT.
                mm.phys.unpin(res.hpa_values()[passed:ok])
                ok = passed
                error = fail(EFAULT, f"VFIO_IOMMU_MAP_DMA: cannot pin user page "
                                     f"{vaddr + ((done + ok) << tbl.it_page_shift):#x} (fault injection)")
            elif bad is not None:
                # Upstream leaks the pin of the failing page here (invisible to
                # userspace); the model releases it.
                mm.phys.unpin(res.hpas[bad:ok])
                ok = bad
                error = fail(EPERM, f"VFIO_IOMMU_MAP_DMA: a user page at {vaddr + (done + ok << tbl.it_page_shift):#x} "
                                    f"is smaller than the {tbl.page_size:#x}-byte IOMMU page (needs huge pages)")
            elif res.errno is not None:
                # tce_iommu_use_page(): any pin failure is -EFAULT, out of memory included.
                why = "no free page of RAM: pin_user_pages_fast() failed with ENOMEM" if res.errno == ENOMEM else \
                    "unmapped, or not writable" if write else "unmapped, or never populated and read-only"
                error = fail(EFAULT, f"VFIO_IOMMU_MAP_DMA: cannot pin user page {failed_at:#x} ({why})")
            values: np.ndarray | Progression
            if consecutive:
                values = res.hpa_values()[:ok]
            else:
                sub_mask = np.uint64(((1 << self.page_shift) - 1) & ~((1 << tbl.it_page_shift) - 1))
                values = res.hpas[:ok] | (tces[:ok] & sub_mask) | np.uint64(perm)
            xr = tbl.it_ops.xchg_range(tbl, entry + done, values)
            if xr.done < ok:
                # tce_iommu_unuse_page(hpa): the failed entry's new page, and
                # those this batch pinned past it, lose their pins.
                mm.phys.unpin(values[xr.done:ok])
                addr = vaddr + ((done + xr.done) << tbl.it_page_shift)
                self.log.err(f"iommu_tce: tce_iommu_build failed ioba={entry << tbl.it_page_shift:#x}, "
                             f"tce={addr:#x}, ret={xr.rc}")
                error = self._hcall_error(tbl, entry + done + xr.done, xr.rc)
            self._unpin_old(mm, xr.old)
            done += xr.done
            if xr.done < n and error is None:
                raise AssertionError("TCE exchange stopped without a reason")
        if error is not None:
            self._clear(c, tbl, entry, done)
            raise error

    def _hcall_error(self, tbl: IommuTable, entry: int, rc: int) -> KernelError:
        """The hcall status tce_iommu_build(_v2) returns as its errno (pseries):
        H_PARAMETER (-4) past the end of a window is EINTR; an injected
        H_HARDWARE (-1) is EPERM (docs/deviations.md 2, 2b)."""
        if rc == H_HARDWARE:
            self.log.warn(deviation("2b", ioba=entry << tbl.it_page_shift, rc=rc))
            return fail(-rc, f"VFIO_IOMMU_MAP_DMA: the hypervisor failed TCE {entry:#x} (H_HARDWARE, fault "
                             f"injection); Linux passes the hcall status through as an errno")
        self.log.warn(deviation("2", rc=rc, errno=-rc, name="EINTR" if rc == -4 else "unexpected"))
        return fail(-rc, f"VFIO_IOMMU_MAP_DMA: the hypervisor refused TCE {entry:#x} "
                         f"(H_PUT_TCE returned {rc}); the range runs past the window end, which "
                         f"Linux 6.12 does not check, and passes the hcall status through as an errno")

    def _unpin_old(self, mm: AddressSpace, old: np.ndarray) -> None:
        """Entries a map replaced: their pages lose the pin the old TCE held."""
        if not old.size:
            return
        first = int(old[0])
        if old.size == 1:
            if first & TCE_PERM_MASK:
                mm.phys.unpin_range(first & ~TCE_PERM_MASK, 1)
            return
        # The usual case: the entries of one earlier map of consecutive pages.
        if first & TCE_PERM_MASK and old.size > 1:
            step = int(old[1]) - first
            # (a step with no permission bits: every entry has the first's)
            run = as_progression(old, step) if step > 0 and not step & TCE_PERM_MASK else None
            if run is not None:
                mm.phys.unpin(Progression(first & ~TCE_PERM_MASK, run.step, run.size))
                return
        used = old[(old & np.uint64(TCE_PERM_MASK)) != 0]
        if used.size:
            mm.phys.unpin(used & ~np.uint64(TCE_PERM_MASK))

    @staticmethod
    def _prereg_translate_one(mm: AddressSpace, ua: int,
                              shift: int) -> tuple["np.ndarray | Progression", list[RegionUse], int, int | None]:
        """_prereg_translate() of one IOMMU page, in scalar operations."""
        mem = mm_iommu_lookup(mm, ua, 1 << shift)
        hpa = None if mem is None else mm_iommu_ua_to_hpa(mm, mem, ua, shift)
        if mem is None or hpa is None:
            return _NO_HPAS, [], 0, EINVAL
        if mem.cshifts[(ua - mem.ua) >> mm.page_shift] < shift:          # tce_page_is_contained()
            return _NO_HPAS, [(mem, 0, 0)], 0, EPERM
        return Progression(hpa, 1 << shift, 1), [(mem, 0, 1)], 1, None

    def _prereg_translate(self, c: TceContainer, tbl: IommuTable, vaddr: int, first: int,
                          count: int) -> tuple["np.ndarray | Progression", list[RegionUse], int, int | None]:
        """tce_iommu_prereg_ua_to_hpa() for IOMMU pages [first, first+count).

        Returns (hpas, compound shifts, regions, ok, errno): the first ``ok``
        pages translate; ``errno`` is why page ``ok`` does not (EINVAL: not
        inside one registered region, or the region's pages are smaller than
        the IOMMU page; EPERM: the backing page is smaller than the IOMMU page).
        """
        mm = c.mm
        assert mm is not None
        shift = tbl.it_page_shift
        psize = 1 << shift
        if count == 1:
            return self._prereg_translate_one(mm, vaddr + (first << shift), shift)
        uas = np.uint64(vaddr) + (np.arange(first, first + count, dtype=np.uint64) << np.uint64(shift))
        hpas = np.zeros(count, dtype=np.uint64)
        regions: list[tuple[MmIommuMem, int, int]] = []
        pos = 0
        err: int | None = None
        while pos < count:
            ua = int(uas[pos])
            mem = mm_iommu_lookup(mm, ua, psize)
            if mem is None or mm_iommu_ua_to_hpa(mm, mem, ua, shift) is None:
                err = EINVAL
                break
            end = mem.end(mm.page_shift)
            n = int(np.searchsorted(uas[pos:] + np.uint64(psize), np.uint64(end), side="right"))
            seg = uas[pos:pos + n]
            idx = ((seg - np.uint64(mem.ua)) >> np.uint64(mm.page_shift)).astype(np.int64)
            hpas[pos:pos + n] = mem.hpas[idx] | (seg & np.uint64(mm.page_size - 1))
            small = np.flatnonzero(mem.cshifts[idx] < shift)        # tce_page_is_contained()
            if small.size:
                n = int(small[0])
                err = EPERM
            regions.append((mem, pos, n))
            pos += n
            if err is not None:
                break
        return hpas[:pos], regions, pos, err

    def _build_v2(self, c: TceContainer, tbl: IommuTable, entry: int, vaddr: int, npages: int, direction: int,
                  current: "Task") -> None:
        """tce_iommu_build_v2(): translate through preregistered memory; nothing
        is pinned here, the regions count their mappings instead."""
        if npages == 0:
            return
        room = tbl.it_offset + tbl.it_size - entry
        if npages > room:
            # Whether the loop reaches the end of the window before failing.
            pos, reached_end = 0, True
            while pos < room:
                n = min(BATCH, room - pos)
                _, _, ok, err = self._prereg_translate(c, tbl, vaddr, pos, n)
                if err is not None:
                    reached_end = False
                    break
                pos += n
            if reached_end:
                self._log_overrun_v2(tbl, entry, npages)
                raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: {npages} pages from bus address "
                                   f"{entry << tbl.it_page_shift:#x} run past the end of the window "
                                   f"{tbl.bus_start:#x}..{tbl.bus_end - 1:#x}")
        perm = direction_to_perm(direction)
        shift = np.uint64(tbl.it_page_shift)
        done = 0
        error: KernelError | None = None
        if tbl.it_userspace is None:
            # A pseries table whose userspace view could not be allocated
            # (spapr_tce_create_table() ignores it): IOMMU_TABLE_USERSPACE_ENTRY()
            # is NULL and the first entry that translates is written through it.
            _, _, first_ok, _ = self._prereg_translate(c, tbl, vaddr, 0, 1)
            if first_ok:
                self.log.warn(deviation("6d", start=tbl.bus_start, end=tbl.bus_end - 1))
                raise fail(ENOMEM, "VFIO_IOMMU_MAP_DMA: the window has no userspace-address view (its allocation "
                                   "failed when the window was created, fault injection); Linux oopses here")
        while done < npages and error is None:
            n = min(BATCH, npages - done)
            hpas, regions, ok, err = self._prereg_translate(c, tbl, vaddr, done, n)
            if err == EINVAL:
                error = fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: user page {vaddr + ((done + ok) << int(shift)):#x} is "
                                     f"not inside one preregistered region backed by pages of at least "
                                     f"{tbl.page_size:#x} bytes (VFIO_IOMMU_SPAPR_REGISTER_MEMORY it first)")
            elif err == EPERM:
                error = fail(EPERM, f"VFIO_IOMMU_MAP_DMA: the page behind user address "
                                    f"{vaddr + ((done + ok) << int(shift)):#x} is smaller than the IOMMU page")
            if tbl.it_indirect_levels:
                cut = self._alloc_levels_v2(c, tbl, entry + done, vaddr + (done << int(shift)), ok, err, regions)
                if cut is not None:
                    ok = cut
                    hpas = hpas[:cut]
                    regions = [(mem, pos, min(cnt, cut - pos)) for mem, pos, cnt in regions if pos < cut]
                    error = fail(ENOMEM, f"VFIO_IOMMU_MAP_DMA: allocating a TCE table level for bus address "
                                         f"{(entry + done + cut) << int(shift):#x} failed (fault injection)")
            for mem, _, count in regions:
                mem.mapped += count                      # mm_iommu_mapped_inc()
            xr = tbl.it_ops.xchg_range(tbl, entry + done, hpas | perm)
            if xr.done < ok:
                if xr.rc != H_HARDWARE:
                    raise AssertionError("a v2 TCE exchange inside the window failed")
                error = self._hcall_failed_v2(c, tbl, entry, vaddr, done, xr.done, ok, xr.rc, regions)
                ok = xr.done
            if xr.old.size:
                old_valid = xr.old_pos[(xr.old & np.uint64(TCE_PERM_MASK)) != 0]
                if old_valid.size:
                    self._unuse_pages_v2(c, tbl, entry + done + old_valid)
            if ok:
                assert tbl.it_userspace is not None
                uas = Progression(vaddr + (done << int(shift)), 1 << int(shift), ok)
                tbl.it_userspace.xchg_range(entry + done - tbl.it_offset, uas)
            done += ok
        if error is not None:
            self._clear(c, tbl, entry, done)
            raise error

    def _hcall_failed_v2(self, c: TceContainer, tbl: IommuTable, first: int, vaddr: int, done: int, k: int, ok: int,
                         rc: int, regions: list[RegionUse]) -> KernelError:
        """tce_iommu_build_v2() (a map from entry ``first`` and user address
        ``vaddr``) when the exchange of entry ``first + done + k`` fails
        (pseries: an hcall).  Upstream incremented that entry's region
        (mm_iommu_mapped_inc) but not those of the entries after it, which
        this batch counted already: they are taken back.  Its error path
        calls tce_iommu_unuse_page_v2() for the failed entry, which finds the
        region through the entry's userspace address:

        * a fresh entry has none (0): the increment is never undone, so the
          region keeps one mapping for good, as in 3d (reproduced);
        * an entry that maps something already has the old address: Linux
          drops a mapping of the *old* region and zeroes the address while the
          TCE, which the failed hcall left in place, still maps the old page --
          the old region can then be unregistered and unpinned under a live
          TCE.  That part is refused: the entry keeps its address and its
          region its count (the new region's extra mapping stays)."""
        for used, pos, count in regions:
            lo, hi = max(pos, k + 1), min(pos + count, ok)
            if hi > lo:
                used.mapped -= hi - lo
        shift = tbl.it_page_shift
        entry = first + done                     # this batch's first entry
        bad_ua = vaddr + ((done + k) << shift)
        self.log.err(f"iommu_tce: tce_iommu_build_v2 failed ioba={first << shift:#x}, tce={bad_ua:#x}, ret={rc}")
        mem = next((m for m, pos, cnt in regions if pos <= k < pos + cnt), None)
        assert tbl.it_userspace is not None
        old_ua = tbl.it_userspace.get(entry + k - tbl.it_offset)
        if mem is not None:
            self.log.warn(deviation("3d.hcall", ioba=(entry + k) << shift, old_ua=old_ua, ua=mem.ua,
                                    size=mem.entries << self.page_shift))
        if old_ua:
            self.log.warn(deviation("6e", old_ua=old_ua))
        return self._hcall_error(tbl, entry + k, rc)

    def _alloc_levels_v2(self, c: TceContainer, tbl: IommuTable, entry: int, ua: int, ok: int, err: int | None,
                         regions: list[RegionUse]) -> int | None:
        """The indirect levels tce_iommu_build_v2() allocates for entries
        [entry, entry+ok) of a multi-level PowerNV table, in its order: for
        each entry, IOMMU_TABLE_USERSPACE_ENTRY() first (the userspace copy;
        also for the entry whose translation then fails), the TCE level in
        the exchange after mm_iommu_mapped_inc().  Returns None, or the entry
        offset at which an allocation failed (fault injection):

        * the TCE level: the exchange fails with -ENOMEM and
          tce_iommu_unuse_page_v2() finds no userspace address for that
          entry, so its mm_iommu_mapped_inc() is never undone: the region
          keeps one mapping for good (reproduced, docs/deviations.md);
        * the userspace level: pua is NULL and Linux 6.12 writes through it
          (*pua = tce), an oops; answered as ENOMEM, nothing changed.
        """
        ops = tbl.it_ops
        shift = tbl.it_page_shift
        events = [(o, 0, lv, b) for o, lv, b in ops.missing_levels(tbl, True, entry, ok + (err is not None))]
        events += [(o, 1, lv, b) for o, lv, b in ops.missing_levels(tbl, False, entry, ok)]
        events.sort(key=lambda e: (e[0], e[1], -e[2]))
        faults = self.kernel.faults
        got: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}
        cut = None
        for o, hw, lv, b in events:
            user = not hw
            if faults.should_fail("alloc_pages:pnv_tce.uas" if user else "alloc_pages:pnv_tce"):
                if user and o == ok:
                    break            # that entry's translation fails first: pua is never used
                cut = o
                bad_ua = ua + (o << shift)
                self.log.err(f"Failed to allocate a TCE memory, level shift={tbl.it_level_size.bit_length() + 2}")
                if user:
                    self.log.warn(deviation("6c", ioba=(entry + o) << shift))
                else:
                    self.log.err(f"iommu_tce: tce_iommu_build_v2 failed ioba={entry << shift:#x}, "
                                 f"tce={bad_ua:#x}, ret=-{ENOMEM}")
                    mem = next((m for m, pos, cnt in regions if pos <= o < pos + cnt), None)
                    if mem is not None:
                        mem.mapped += 1      # the failed entry's mm_iommu_mapped_inc(), never undone
                        self.log.warn(deviation("3d.level", ioba=(entry + o) << shift, ua=mem.ua,
                                                size=mem.entries << self.page_shift))
                break
            got[user].append((o, lv, b))
        ops.mark_levels(tbl, True, got[True])
        ops.mark_levels(tbl, False, got[False])
        return cut

    def _log_overrun_v2(self, tbl: IommuTable, entry: int, npages: int) -> None:
        what = ("writes TCEs past the end of the table (memory corruption)" if tbl.it_ops.overrun_corrupts
                else "gets H_PARAMETER from the hypervisor and then reads past it_userspace in "
                            "tce_iommu_unuse_page_v2(): a kernel oops")
        self.log.warn(deviation("6b", npages=npages, ioba=entry << tbl.it_page_shift, start=tbl.bus_start,
                                end=tbl.bus_end - 1, what=what))

    def _log_return_1(self, call: str, iova: int, tbl: IommuTable) -> None:
        self.log.warn(deviation("1", call=call, iova=iova, page=tbl.page_size))

    def _log_overrun(self, call: str, tbl: IommuTable, entry: int, npages: int) -> None:
        self.log.warn(deviation("6", call=call, npages=npages, ioba=entry << tbl.it_page_shift, start=tbl.bus_start,
                                end=tbl.bus_end - 1))

    # -- UNMAP_DMA ------------------------------------------------------------------------------

    def _unmap_dma(self, c: TceContainer, arg: int, current: "Task") -> int:
        if not c.enabled:
            raise fail(EPERM, "the container is not enabled")
        # copy_from_user(&param, arg, minsz) (uaccess.copy_from_user_unpack(), without its frame)
        argsz, flags, iova, size = current.mm.read_unpack(arg, _DMA_UNMAP)
        minsz = _DMA_UNMAP.size
        if argsz < minsz:
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: argsz {argsz} < {minsz}")
        if flags:
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: flags {flags:#x}: the sPAPR IOMMU supports none")
        if self.kernel.fast_paths and self._unmap_fast(c, iova, size):
            return 0
        self._create_default_window(c, current)
        _, tbl = self._find_table(c, iova)
        if size & (tbl.page_size - 1):
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: size {size:#x} is not a multiple of the window's "
                               f"IOMMU page size {tbl.page_size:#x}")
        npages = size >> tbl.it_page_shift
        if iommu_tce_clear_param_check(tbl, iova, 0, npages):
            self._log_return_1("VFIO_IOMMU_UNMAP_DMA", iova, tbl)
            return 1
        entry = iova >> tbl.it_page_shift
        room = tbl.it_offset + tbl.it_size - entry
        if npages > room and tbl.it_ops.overrun_corrupts:
            self._log_overrun("VFIO_IOMMU_UNMAP_DMA", tbl, entry, npages)
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: the range runs past the end of the window "
                               f"{tbl.bus_start:#x}..{tbl.bus_end - 1:#x}")
        self._clear(c, tbl, entry, npages)
        return 0

    def _unmap_fast(self, c: TceContainer, iova: int, size: int) -> bool:
        """The rest of _unmap_dma() for one IOMMU page, aligned, in a window
        of the container that exists: _unmap_dma()'s checks pass, and
        tce_iommu_clear() is one entry, emptied in scalar operations, with
        what it held dropped as _clear() drops it (v1: the page's pin; v2:
        the mapping its region counted, found from the entry's userspace
        address).  Anything else is the general path's (False: nothing
        changed)."""
        if c.def_window_pending:
            return False
        tbl = _table_at(c, iova)                        # tce_iommu_find_table()
        if tbl is None:
            return False
        mask = (1 << tbl.it_page_shift) - 1
        if size != mask + 1 or iova & mask:
            return False
        entry = iova >> tbl.it_page_shift
        old = tbl.it_ops.clear_one(tbl, entry)
        if not old:
            return True
        if c.v2:
            if tbl.it_userspace is not None:
                ua = tbl.it_userspace.clear_one(entry - tbl.it_offset)
                if ua:
                    self._unuse_ua_v2(c, tbl, ua)
        elif c.mm is not None and old & TCE_PERM_MASK:     # _unpin_old()
            c.mm.phys.unpin_range(old & ~TCE_PERM_MASK, 1)
        return True

    def _clear(self, c: TceContainer, tbl: IommuTable, entry: int, pages: int) -> None:
        """tce_iommu_clear(): empty entries, unpinning what they held.

        Entries that are already empty, or that the platform refuses (past
        the end of a pseries window), are skipped as upstream does.
        """
        # Old entries come back a storage chunk at a time: temporaries stay
        # small enough for the allocator to recycle instead of faulting in.
        parts = tbl.it_ops.clear_range(tbl, entry, pages)
        if not parts:
            return
        if c.v2:
            if tbl.it_userspace is None:
                return               # tce_iommu_unuse_page_v2(): no pua, nothing to drop
            lo = max(entry, tbl.it_offset) - tbl.it_offset
            hi = min(entry + pages, tbl.it_offset + tbl.it_size) - tbl.it_offset
            for uas in tbl.it_userspace.clear_range(lo, hi - lo):
                self._unuse_uas_v2(c, tbl, uas)
        elif c.mm is not None:
            for old in parts:
                self._unpin_old(c.mm, old)

    def _unuse_pages_v2(self, c: TceContainer, tbl: IommuTable, entries: np.ndarray) -> None:
        """tce_iommu_unuse_page_v2() for some entries: drop what it_userspace says they used."""
        if tbl.it_userspace is None:
            return
        uas = tbl.it_userspace.clear_indices(entries - tbl.it_offset)
        self._unuse_uas_v2(c, tbl, uas[uas != 0])

    def _unuse_uas_v2(self, c: TceContainer, tbl: IommuTable, uas: np.ndarray) -> None:
        """The regions the given userspace addresses were mapped from each lose
        a mapping (mm_iommu_mapped_dec), found from the address as upstream does."""
        assert c.mm is not None
        mm = c.mm
        psize = tbl.page_size
        if uas.size == 1:
            self._unuse_ua_v2(c, tbl, int(uas[0]))
            return
        for mem in prereg.regions(mm):
            inside = int(np.count_nonzero((uas >= np.uint64(mem.ua)) &
                                          (uas + np.uint64(psize) <= np.uint64(mem.end(mm.page_shift)))))
            if inside and mem.pageshift >= tbl.it_page_shift:
                mem.mapped = max(1, mem.mapped - inside)

    @staticmethod
    def _unuse_ua_v2(c: TceContainer, tbl: IommuTable, ua: int) -> None:
        """_unuse_uas_v2() of one address: upstream walks every region for the
        one that holds the IOMMU page; regions never overlap, so the address
        index finds the same one."""
        assert c.mm is not None
        mem = mm_iommu_lookup(c.mm, ua, tbl.page_size)
        if mem is not None and mem.pageshift >= tbl.it_page_shift:
            mem.mapped = max(1, mem.mapped - 1)

    # -- VFIO_EEH_PE_OP ---------------------------------------------------------------------------

    def _eeh_pe_op(self, c: TceContainer, arg: int, current: "Task") -> int:
        """tce_iommu_ioctl(VFIO_EEH_PE_OP): the op for each group, until one returns non-zero."""
        ret = 0
        for group in list(c.groups):
            ret = self._eeh_pe_op_group(group, arg, current)
            if ret:
                return ret
        return ret

    def _eeh_pe_op_group(self, group: "IommuGroup", arg: int, current: "Task") -> int:
        """vfio_spapr_ioctl_eeh_pe_op() (in this file since Linux 6.7; vfio_spapr_eeh.c before)."""
        pe = self.kernel.platform.eeh_pe(group)        # eeh_iommu_group_to_pe()
        if pe is None or not self.kernel.eeh_enabled():
            raise fail(ENODEV, f"IOMMU group {group.id} has no EEH PE (EEH is not available on this machine)")
        cls = uapi.vfio_eeh_pe_op
        minsz = uapi.offsetofend(cls, "op")
        op = copy_struct_from_user(current, arg, cls, minsz)
        if op.argsz < minsz or op.flags:
            raise fail(EINVAL, f"VFIO_EEH_PE_OP: argsz {op.argsz} < {minsz} or flags {op.flags:#x} != 0")
        if op.op == uapi.VFIO_EEH_PE_INJECT_ERR:
            full = uapi.offsetofend(cls, "err.mask")
            if op.argsz < full:
                raise fail(EINVAL, f"VFIO_EEH_PE_INJECT_ERR: argsz {op.argsz} < {full}")
            op = copy_struct_from_user(current, arg, cls, full)
            return pe.inject_err(op.err.type, op.err.func, op.err.addr, op.err.mask)
        action = _EEH_PE_OPS.get(op.op)
        if action is None:
            raise fail(EINVAL, f"VFIO_EEH_PE_OP: unknown op {op.op}")
        return action(pe)

    def describe(self, c: TceContainer) -> dict[str, Any]:
        return {"v2": c.v2, "enabled": c.enabled, "locked_pages": c.locked_pages,
                "windows": [None if t is None else {"start": t.bus_start, "size": t.bus_size,
                                                     "page_size": t.page_size, "mapped": t.mapped_count()}
                            for t in c.tables]}


# VFIO_EEH_PE_OP's operations on the PE (arch/powerpc/kernel/eeh.c); INJECT_ERR,
# which reads more of the argument, is handled apart.
_EEH_PE_OPS: dict[int, Callable[[EehPe], int]] = {
    uapi.VFIO_EEH_PE_DISABLE: lambda pe: pe.set_option(EEH_OPT_DISABLE),
    uapi.VFIO_EEH_PE_ENABLE: lambda pe: pe.set_option(EEH_OPT_ENABLE),
    uapi.VFIO_EEH_PE_UNFREEZE_IO: lambda pe: pe.set_option(EEH_OPT_THAW_MMIO),
    uapi.VFIO_EEH_PE_UNFREEZE_DMA: lambda pe: pe.set_option(EEH_OPT_THAW_DMA),
    uapi.VFIO_EEH_PE_GET_STATE: lambda pe: pe.get_state(),
    uapi.VFIO_EEH_PE_RESET_DEACTIVATE: lambda pe: pe.reset(EEH_RESET_DEACTIVATE),
    uapi.VFIO_EEH_PE_RESET_HOT: lambda pe: pe.reset(EEH_RESET_HOT),
    uapi.VFIO_EEH_PE_RESET_FUNDAMENTAL: lambda pe: pe.reset(EEH_RESET_FUNDAMENTAL),
    uapi.VFIO_EEH_PE_CONFIGURE: lambda pe: pe.configure(),
}
