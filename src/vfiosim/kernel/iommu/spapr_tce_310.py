"""The sPAPR TCE driver as the seed patch posted it (March 2013, Linux 3.10 era).

"vfio powerpc: implement IOMMU driver for VFIO" (../shared/seed/): one
group per container, the PE's own 32-bit table with 4 KiB IOMMU pages,
exactly one page per MAP_DMA, a busy entry refused with EBUSY, the window
charged to the *current* process at ENABLE, and GET_INFO of 16 bytes.  The
helpers it calls are the 3.10 ones from arch/powerpc/kernel/iommu.c
(iommu_tce_put_param_check, iommu_put_tce_user_mode, iommu_tce_build,
iommu_clear_tces_and_put_pages, iommu_take/release_ownership).

As in the seed (and unlike the merged 3.10 driver, which took the review's
advice), detaching a group from an enabled container only logs an error and
leaves the group attached; when it was the last group the core then
releases the container, which disables it and detaches the group.

Fault injection (kernel/faults.py) reaches the seed where it allocates or
charges: the container's kzalloc in tce_iommu_open (ENOMEM), the
RLIMIT_MEMLOCK check of tce_iommu_enable (ENOMEM, with its warning) and the
get_user_pages_fast() of iommu_put_tce_user_mode (EFAULT).  Each error path
of the seed undoes everything before it: the 3.10 PowerNV tce_build
(pnv_tce_build) cannot fail, and nothing is charged per page.
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EBUSY, EFAULT, EINVAL, ENOMEM, ENOTTY, ENXIO
from typing import TYPE_CHECKING, Any

import numpy as np

from ...uapi import vfio as uapi
from ..cred import CAP_IPC_LOCK
from ..deviations import deviation
from ..errors import fail
from ..uaccess import copy_struct_from_user, copy_struct_to_user
from ..vfio.iommu_driver import VfioIommuDriver
from .table_group import table_group_of
from .tce import DMA_TO_DEVICE, TCE_PCI_READ, TCE_PCI_WRITE, TCE_PERM_MASK, IommuTable, perm_to_direction

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..task import Task
    from .iommu import IommuGroup

IOMMU_PAGE_SHIFT = 12
IOMMU_PAGE_SIZE = 1 << IOMMU_PAGE_SHIFT
IOMMU_PAGE_MASK = ~(IOMMU_PAGE_SIZE - 1) & ((1 << 64) - 1)


@dataclass
class Tce310Container:
    tbl: IommuTable | None = None
    group: "IommuGroup | None" = None
    enabled: bool = False


class SpaprTce310IommuDriver(VfioIommuDriver):
    name = "iommu-vfio-powerpc"
    module = "vfio_iommu_spapr_tce"

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.log = kernel.log

    # -- ops ------------------------------------------------------------------------------

    def open(self, arg: int, current: "Task") -> Tce310Container:
        """tce_iommu_open() of the seed"""
        if arg != uapi.VFIO_SPAPR_TCE_IOMMU:
            self.log.err("tce_vfio: Wrong IOMMU type")
            raise fail(EINVAL, f"IOMMU type {arg} is not VFIO_SPAPR_TCE_IOMMU (2)")
        if self.kernel.faults.should_fail("kmalloc:tce_iommu_open"):
            raise fail(ENOMEM, "kzalloc of the container failed (fault injection)")
        return Tce310Container()

    def release(self, c: Tce310Container, current: "Task") -> None:
        self._disable(c, current)
        if c.tbl is not None and c.group is not None:
            self.detach_group(c, c.group, current)

    def attach_group(self, c: Tce310Container, group: "IommuGroup", current: "Task") -> None:
        tbl = self._group_table(group)
        if c.tbl is not None:
            assert c.group is not None
            self.log.warn(f"tce_vfio: Only one group per IOMMU container is allowed, existing id={c.group.id}, "
                          f"attaching id={group.id}")
            raise fail(EBUSY, f"one group per container: group {c.group.id} is attached, cannot add {group.id}")
        self._take_ownership(tbl)
        c.tbl = tbl
        c.group = group

    def detach_group(self, c: Tce310Container, group: "IommuGroup", current: "Task") -> None:
        tbl = self._group_table(group)
        if tbl is not c.tbl:
            expected = c.group.id if c.group is not None else -1
            self.log.warn(f"tce_vfio: detaching group #{group.id}, expected group is #{expected}")
        elif c.enabled:
            self.log.err(f"tce_vfio: detaching group #{group.id} from enabled container")
            self.log.warn(deviation("4"))
        else:
            c.tbl = None
            c.group = None
            self._release_ownership(tbl)

    @staticmethod
    def _group_table(group: "IommuGroup") -> IommuTable:
        tg = table_group_of(group)
        tbl = tg.tables[0] if tg is not None else None
        if tbl is None:
            raise AssertionError(f"BUG_ON(!tbl): IOMMU group {group.id} has no table")
        return tbl

    def _take_ownership(self, tbl: IommuTable) -> None:
        """iommu_take_ownership(): the table must hold no host mappings."""
        if tbl.it_ops.count_used(tbl):
            self.log.err("iommu_tce: it_map is not empty")
            raise fail(EBUSY, "the host kernel still has DMA mappings in this PE's table")
        self._clear(tbl, tbl.it_offset, tbl.it_size)

    def _release_ownership(self, tbl: IommuTable) -> None:
        self._clear(tbl, tbl.it_offset, tbl.it_size)

    # -- ioctl ------------------------------------------------------------------------------

    def ioctl(self, c: Tce310Container | None, cmd: int, arg: int, current: "Task") -> int:
        if cmd == uapi.VFIO_CHECK_EXTENSION:
            return 1 if arg == uapi.VFIO_SPAPR_TCE_IOMMU else 0
        assert c is not None
        if cmd == uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO:
            return self._get_info(c, arg, current)
        if cmd == uapi.VFIO_IOMMU_MAP_DMA:
            return self._map(c, arg, current)
        if cmd == uapi.VFIO_IOMMU_UNMAP_DMA:
            return self._unmap(c, arg, current)
        if cmd == uapi.VFIO_IOMMU_ENABLE:
            return self._enable(c, current)
        if cmd == uapi.VFIO_IOMMU_DISABLE:
            self._disable(c, current)
            return 0
        raise fail(ENOTTY, f"{uapi.ioctl_name_for(cmd, 'vfio-container') or hex(cmd)}: unknown to the 3.10 sPAPR TCE driver")

    def _table(self, c: Tce310Container) -> IommuTable:
        if c.tbl is None:
            self.log.warn("WARNING: tce_iommu_ioctl: container has no table")
            raise fail(ENXIO, "the container has no table")
        return c.tbl

    def _get_info(self, c: Tce310Container, arg: int, current: "Task") -> int:
        tbl = self._table(c)
        cls = uapi.vfio_iommu_spapr_tce_info
        minsz = uapi.offsetofend(cls, "dma32_window_size")
        info = copy_struct_from_user(current, arg, cls, minsz)
        if info.argsz < minsz:
            raise fail(EINVAL, f"VFIO_IOMMU_SPAPR_TCE_GET_INFO: argsz {info.argsz} < {minsz}")
        info.dma32_window_start = (tbl.it_offset << IOMMU_PAGE_SHIFT) & 0xFFFFFFFF
        info.dma32_window_size = (tbl.it_size << IOMMU_PAGE_SHIFT) & 0xFFFFFFFF
        info.flags = 0
        copy_struct_to_user(current, arg, info, minsz)
        return 0

    def _enable(self, c: Tce310Container, current: "Task") -> int:
        """tce_iommu_enable() of the seed: an open-coded RLIMIT_MEMLOCK check
        (no account_locked_vm() in 2013); its only error path changes nothing."""
        tbl = self._table(c)
        if c.enabled:
            raise fail(EBUSY, "the container is already enabled")
        mm = current.mm
        npages = (tbl.it_size << IOMMU_PAGE_SHIFT) >> mm.page_shift
        limit = current.rlimit_memlock_soft()
        injected = self.kernel.faults.should_fail("account_locked_vm:tce_iommu_enable")
        if injected or mm.locked_vm + npages > limit >> mm.page_shift and not current.capable(CAP_IPC_LOCK):
            self.log.warn(f"RLIMIT_MEMLOCK ({limit}) exceeded")
            raise fail(ENOMEM, f"VFIO_IOMMU_ENABLE must lock {npages << mm.page_shift:#x} bytes (the whole window); "
                               + ("the charge failed (fault injection)" if injected
                                  else f"RLIMIT_MEMLOCK is {limit:#x} bytes"))
        mm.locked_vm += npages
        c.enabled = True
        return 0

    def _disable(self, c: Tce310Container, current: "Task") -> None:
        """Refunds the *current* process, as the seed did (no mm reference)."""
        if c.enabled and c.tbl is not None:
            mm = current.mm
            if not mm.dead:
                mm.locked_vm -= (c.tbl.it_size << IOMMU_PAGE_SHIFT) >> mm.page_shift
            c.enabled = False

    def _map(self, c: Tce310Container, arg: int, current: "Task") -> int:
        tbl = self._table(c)
        cls = uapi.vfio_iommu_type1_dma_map
        minsz = uapi.offsetofend(cls, "size")
        param = copy_struct_from_user(current, arg, cls, minsz)
        if param.argsz < minsz:
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: argsz {param.argsz} < {minsz}")
        if param.flags & ~(uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE):
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: unknown flags {param.flags:#x}")
        if param.size & ~IOMMU_PAGE_MASK or param.vaddr & ~IOMMU_PAGE_MASK:
            raise fail(EINVAL, "VFIO_IOMMU_MAP_DMA: vaddr and size must be 4 KiB aligned")
        if param.size != IOMMU_PAGE_SIZE:
            self.log.err(f"VFIO map on POWER supports only {IOMMU_PAGE_SIZE} page size")
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: the 3.10 driver maps exactly one {IOMMU_PAGE_SIZE}-byte "
                               f"page per call (size {param.size:#x})")
        tce = param.vaddr
        if param.flags & uapi.VFIO_DMA_MAP_FLAG_READ:
            tce |= TCE_PCI_READ
        if param.flags & uapi.VFIO_DMA_MAP_FLAG_WRITE:
            tce |= TCE_PCI_WRITE
        self._put_param_check(tbl, param.iova, tce)
        self._put_tce_user_mode(c, tbl, param.iova >> IOMMU_PAGE_SHIFT, tce, current)
        return 0

    @staticmethod
    def _put_param_check(tbl: IommuTable, ioba: int, tce: int) -> None:
        """iommu_tce_put_param_check() of 3.10"""
        if not tce & TCE_PERM_MASK:
            raise fail(EINVAL, "VFIO_IOMMU_MAP_DMA: flags must include READ and/or WRITE")
        if tce & ~(IOMMU_PAGE_MASK | TCE_PERM_MASK):
            raise fail(EINVAL, "VFIO_IOMMU_MAP_DMA: vaddr is not page aligned")
        if ioba & ~IOMMU_PAGE_MASK:
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: iova {ioba:#x} is not 4 KiB aligned")
        page = ioba >> IOMMU_PAGE_SHIFT
        if page < tbl.it_offset or page + 1 > tbl.it_offset + tbl.it_size:
            raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: iova {ioba:#x} is outside the window "
                               f"{tbl.bus_start:#x}..{tbl.bus_end - 1:#x}")

    def _put_tce_user_mode(self, c: Tce310Container, tbl: IommuTable, entry: int, tce: int,
                           current: "Task") -> None:
        """iommu_put_tce_user_mode() + iommu_tce_build() of 3.10.

        get_user_pages_fast() of the one page: anything but 1 is -EFAULT, with
        nothing to undo (the seed's pr_err there is commented out).  The 3.10
        PowerNV tce_build (pnv_tce_build) cannot fail, so a pinned page is
        only released again when the entry is busy."""
        mm = current.mm
        direction = perm_to_direction(tce)
        addr = tce & ~((1 << mm.page_shift) - 1)
        res = mm.pin_pages(np.array([addr], dtype=np.uint64), write=direction != DMA_TO_DEVICE)
        if res.count == 1 and self.kernel.faults.should_fail("pin_user_pages:iommu_put_tce_user_mode"):
            mm.phys.unpin(res.hpas)
            raise fail(EFAULT, f"VFIO_IOMMU_MAP_DMA: cannot pin user page {addr:#x} (fault injection)")
        if res.count != 1:
            raise fail(EFAULT, f"VFIO_IOMMU_MAP_DMA: cannot pin user page {addr:#x}")
        hpa = int(res.hpas[0]) | (tce & IOMMU_PAGE_MASK & ((1 << mm.page_shift) - 1))
        if tbl.it_ops.get(tbl, entry) & TCE_PERM_MASK:
            mm.phys.unpin(res.hpas)
            self.log.err(f"iommu_tce: iommu_put_tce_user_mode failed ioba={entry << IOMMU_PAGE_SHIFT:#x}, "
                         f"tce={tce:#x}, ret={-EBUSY}")
            raise fail(EBUSY, f"VFIO_IOMMU_MAP_DMA: bus address {entry << IOMMU_PAGE_SHIFT:#x} is already mapped "
                              f"(the 3.10 driver does not replace entries; unmap first)")
        perm = tbl.it_ops.perm(perm_to_direction(tce))
        tbl.it_ops.xchg_range(tbl, entry, np.array([hpa | perm], dtype=np.uint64))

    def _unmap(self, c: Tce310Container, arg: int, current: "Task") -> int:
        tbl = self._table(c)
        cls = uapi.vfio_iommu_type1_dma_unmap
        minsz = uapi.offsetofend(cls, "size")
        param = copy_struct_from_user(current, arg, cls, minsz)
        if param.argsz < minsz:
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: argsz {param.argsz} < {minsz}")
        if param.flags:
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: flags {param.flags:#x}: none are supported")
        if param.size & ~IOMMU_PAGE_MASK:
            raise fail(EINVAL, "VFIO_IOMMU_UNMAP_DMA: size must be 4 KiB aligned")
        npages = param.size >> IOMMU_PAGE_SHIFT
        # iommu_tce_clear_param_check() of 3.10 checks the whole range.
        if param.iova & ~IOMMU_PAGE_MASK:
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: iova {param.iova:#x} is not 4 KiB aligned")
        page = param.iova >> IOMMU_PAGE_SHIFT
        if page < tbl.it_offset or page + npages > tbl.it_offset + tbl.it_size:
            raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: range is not inside the window "
                               f"{tbl.bus_start:#x}..{tbl.bus_end - 1:#x}")
        self._clear(tbl, page, npages)
        return 0

    def _clear(self, tbl: IommuTable, entry: int, pages: int) -> None:
        """iommu_clear_tces_and_put_pages()"""
        for old in tbl.it_ops.clear_range(tbl, entry, pages):
            old = old[(old & np.uint64(TCE_PERM_MASK)) != 0]
            if old.size:
                self.kernel.phys.unpin(old & ~np.uint64(TCE_PERM_MASK))

    def describe(self, c: Tce310Container) -> dict[str, Any]:
        tbl = c.tbl
        return {"profile": "3.10 (seed patch)", "enabled": c.enabled,
                "windows": [] if tbl is None else [{"start": tbl.bus_start, "size": tbl.bus_size,
                                                      "page_size": tbl.page_size, "mapped": tbl.mapped_count()}]}
