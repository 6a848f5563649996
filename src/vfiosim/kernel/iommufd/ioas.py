"""IOAS objects and their ioctls (drivers/iommu/iommufd/ioas.c).

An I/O address space is what userspace maps memory into; the HWPTs (IOMMU
domains) created for it, or automatically when a device attaches, mirror it.
"""

from __future__ import annotations

import struct
from errno import EINVAL, EMSGSIZE, ENOENT, ENOMEM, EOPNOTSUPP, EOVERFLOW
from typing import TYPE_CHECKING, Any

from ...uapi import iommufd as iu
from ..errors import KernelError, fail
from ..uaccess import copy_from_user, copy_to_user
from ..iommu.iommu import IOMMU_CACHE, IOMMU_READ, IOMMU_WRITE
from .io_pagetable import IOPT_ALLOC_IOVA, ULONG_MAX, IoPagetable, free_pages_list
from .main import IOMMUFD_OBJ_IOAS, IommufdCtx, IommufdObject, Ucmd
from .spans import overlaps

if TYPE_CHECKING:
    from .hw_pagetable import HwptPaging

_RANGE = struct.Struct("<QQ")       # struct iommu_iova_range


class Ioas(IommufdObject):
    """``struct iommufd_ioas``"""

    obj_type = IOMMUFD_OBJ_IOAS

    def __init__(self, ictx: IommufdCtx) -> None:
        super().__init__(ictx)
        self.iopt = IoPagetable(ictx.kernel)
        self.hwpt_list: list["HwptPaging"] = []

    def destroy(self) -> None:
        """iommufd_ioas_destroy()"""
        _unmapped, err = self.iopt.unmap_all()
        if err is not None and err.errno != ENOENT:
            self.ictx.kernel.log.warn(f"WARNING: iommufd_ioas_destroy: {err}")
        self.iopt.destroy()

    def describe(self) -> dict[str, Any]:
        iopt = self.iopt
        out = super().describe()
        out.update({
            "iova_alignment": iopt.iova_alignment, "huge_pages": not iopt.disable_large_pages,
            "iova_ranges": iopt.iova_ranges(), "allowed": list(iopt.allowed),
            "hwpts": [h.id for h in self.hwpt_list],
            "areas": [{"iova": a.start, "length": a.length, "prot": a.iommu_prot,
                       "user_va": a.pages.uptr + a.start_byte(a.start)
                       if a.pages is not None else None,
                       "pinned": a.storage_domain is not None} for a in iopt.areas()],
        })
        return out


def ioas_alloc(ictx: IommufdCtx) -> Ioas:
    """iommufd_ioas_alloc(): reserved, not yet finalized."""
    ioas = Ioas(ictx)
    ictx.object_alloc(ioas)
    return ioas


def get_ioas(ictx: IommufdCtx, oid: int) -> Ioas:
    obj = ictx.get_object(oid, IOMMUFD_OBJ_IOAS)
    assert isinstance(obj, Ioas)
    return obj


def iommufd_ioas_alloc_ioctl(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.flags:
        raise fail(EOPNOTSUPP, f"IOMMU_IOAS_ALLOC: flags {cmd.flags:#x} must be 0")
    ioas = ioas_alloc(ucmd.ictx)
    cmd.out_ioas_id = ioas.id
    try:
        ucmd.respond()
    except KernelError:
        ucmd.ictx.abort_and_destroy(ioas)
        raise
    ucmd.ictx.finalize(ioas)
    return 0


def iommufd_ioas_iova_ranges(ucmd: Ucmd) -> int:
    """iommufd_ioas_iova_ranges(): the holes of the reserved ranges, as many as
    fit; num_iovas says how many there are (EMSGSIZE if they did not fit)."""
    cmd = ucmd.cmd
    if getattr(cmd, "__reserved"):
        raise fail(EOPNOTSUPP, "IOMMU_IOAS_IOVA_RANGES: __reserved must be 0")
    ioas = get_ioas(ucmd.ictx, cmd.ioas_id)
    try:
        max_iovas = cmd.num_iovas
        ranges = cmd.allowed_iovas
        cmd.num_iovas = 0
        cmd.out_iova_alignment = ioas.iopt.iova_alignment
        for start, last in ioas.iopt.iova_ranges():
            if cmd.num_iovas < max_iovas:
                copy_to_user(ucmd.current, ranges + cmd.num_iovas * _RANGE.size, _RANGE.pack(start, last))
            cmd.num_iovas += 1
        ucmd.respond()
        if cmd.num_iovas > max_iovas:
            raise fail(EMSGSIZE, f"IOMMU_IOAS_IOVA_RANGES: {cmd.num_iovas} ranges, room for {max_iovas}; num_iovas "
                                 f"says how many")
    finally:
        ucmd.ictx.put_object(ioas)
    return 0


def _load_iovas(ucmd: Ucmd, uptr: int, num: int) -> list[tuple[int, int]]:
    """iommufd_ioas_load_iovas(): each start < last, no two overlapping."""
    out: list[tuple[int, int]] = []
    for i in range(num):
        start, last = _RANGE.unpack(copy_from_user(ucmd.current, uptr + i * _RANGE.size, _RANGE.size))
        if start >= last:
            raise fail(EINVAL, f"IOMMU_IOAS_ALLOW_IOVAS: range {i}: start {start:#x} >= last {last:#x}")
        if overlaps(out, start, last):
            raise fail(EINVAL, f"IOMMU_IOAS_ALLOW_IOVAS: range {i} ({start:#x}..{last:#x}) overlaps another")
        if ucmd.ictx.kernel.faults.should_fail("kmalloc:iommufd_ioas_load_iovas"):
            raise fail(ENOMEM, "kzalloc(struct iopt_allowed) failed (fault injection)")
        out.append((start, last))
    return out


def iommufd_ioas_allow_iovas(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if getattr(cmd, "__reserved"):
        raise fail(EOPNOTSUPP, "IOMMU_IOAS_ALLOW_IOVAS: __reserved must be 0")
    ioas = get_ioas(ucmd.ictx, cmd.ioas_id)
    try:
        allowed = _load_iovas(ucmd, cmd.allowed_iovas, cmd.num_iovas)
        ioas.iopt.set_allow_iova(allowed)
    finally:
        ucmd.ictx.put_object(ioas)
    return 0


def conv_iommu_prot(map_flags: int) -> int:
    """conv_iommu_prot(): IOMMU_CACHE always (iommufd requires coherent DMA)."""
    prot = IOMMU_CACHE
    if map_flags & iu.IOMMU_IOAS_MAP_WRITEABLE:
        prot |= IOMMU_WRITE
    if map_flags & iu.IOMMU_IOAS_MAP_READABLE:
        prot |= IOMMU_READ
    return prot


_MAP_FLAGS = iu.IOMMU_IOAS_MAP_FIXED_IOVA | iu.IOMMU_IOAS_MAP_WRITEABLE | iu.IOMMU_IOAS_MAP_READABLE


def iommufd_ioas_map(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.flags & ~_MAP_FLAGS or getattr(cmd, "__reserved"):
        raise fail(EOPNOTSUPP, f"IOMMU_IOAS_MAP: flags {cmd.flags:#x} has unknown bits, or __reserved is not 0")
    if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
        raise fail(EOVERFLOW, f"IOMMU_IOAS_MAP: iova {cmd.iova:#x} or length {cmd.length:#x} is ULONG_MAX")
    if not cmd.flags & (iu.IOMMU_IOAS_MAP_WRITEABLE | iu.IOMMU_IOAS_MAP_READABLE):
        raise fail(EINVAL, "IOMMU_IOAS_MAP: flags need READABLE and/or WRITEABLE")
    ioas = get_ioas(ucmd.ictx, cmd.ioas_id)
    try:
        flags = 0 if cmd.flags & iu.IOMMU_IOAS_MAP_FIXED_IOVA else IOPT_ALLOC_IOVA
        iova = ioas.iopt.map_user_pages(ucmd.ictx.account_mode, cmd.user_va, cmd.length,
                                        conv_iommu_prot(cmd.flags), flags, cmd.iova, ucmd.current)
        cmd.iova = iova
        ucmd.respond()
    finally:
        ucmd.ictx.put_object(ioas)
    return 0


def iommufd_ioas_copy(ucmd: Ucmd) -> int:
    """iommufd_ioas_copy(): map the pages behind a source range into another
    (or the same) IOAS; they stay pinned and charged once."""
    cmd = ucmd.cmd
    ictx = ucmd.ictx
    if cmd.flags & ~_MAP_FLAGS:
        raise fail(EOPNOTSUPP, f"IOMMU_IOAS_COPY: flags {cmd.flags:#x} has unknown bits")
    if cmd.length >= ULONG_MAX or cmd.src_iova >= ULONG_MAX or cmd.dst_iova >= ULONG_MAX:
        raise fail(EOVERFLOW, "IOMMU_IOAS_COPY: length, src_iova or dst_iova is ULONG_MAX")
    if not cmd.flags & (iu.IOMMU_IOAS_MAP_WRITEABLE | iu.IOMMU_IOAS_MAP_READABLE):
        raise fail(EINVAL, "IOMMU_IOAS_COPY: flags need READABLE and/or WRITEABLE")
    src = get_ioas(ictx, cmd.src_ioas_id)
    try:
        elms = src.iopt.get_pages(cmd.src_iova, cmd.length)
    finally:
        ictx.put_object(src)
    try:
        dst = get_ioas(ictx, cmd.dst_ioas_id)
        try:
            flags = 0 if cmd.flags & iu.IOMMU_IOAS_MAP_FIXED_IOVA else IOPT_ALLOC_IOVA
            iova = dst.iopt.map_pages(elms, cmd.length, cmd.dst_iova, conv_iommu_prot(cmd.flags), flags,
                                      ucmd.current)
            cmd.dst_iova = iova
            ucmd.respond()
        finally:
            ictx.put_object(dst)
    finally:
        free_pages_list(elms)
    return 0


def iommufd_ioas_unmap(ucmd: Ucmd) -> int:
    """iommufd_ioas_unmap(): iova 0 with length U64_MAX unmaps everything;
    otherwise whole areas inside the range, ENOENT if none was."""
    cmd = ucmd.cmd
    ioas = get_ioas(ucmd.ictx, cmd.ioas_id)
    try:
        if cmd.iova == 0 and cmd.length == ULONG_MAX:
            unmapped, err = ioas.iopt.unmap_all()
            if err is not None:
                raise err
        else:
            if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
                raise fail(EOVERFLOW, f"IOMMU_IOAS_UNMAP: iova {cmd.iova:#x} or length {cmd.length:#x} is "
                                      f"ULONG_MAX")
            unmapped, err = ioas.iopt.unmap_iova(cmd.iova, cmd.length)
            if err is not None:
                raise err
            if not unmapped:
                raise fail(ENOENT, f"IOMMU_IOAS_UNMAP: nothing is mapped in {cmd.iova:#x}+{cmd.length:#x}")
        cmd.length = unmapped
        ucmd.respond()
    finally:
        ucmd.ictx.put_object(ioas)
    return 0


def iommufd_ioas_option(ucmd: Ucmd) -> None:
    """iommufd_ioas_option(): IOMMU_OPTION_HUGE_PAGES of an IOAS."""
    cmd = ucmd.cmd
    if getattr(cmd, "__reserved"):
        raise fail(EOPNOTSUPP, "IOMMU_OPTION: __reserved must be 0")
    ioas = get_ioas(ucmd.ictx, cmd.object_id)
    try:
        if cmd.op == iu.IOMMU_OPTION_OP_GET:
            cmd.val64 = int(not ioas.iopt.disable_large_pages)
        elif cmd.op == iu.IOMMU_OPTION_OP_SET:
            if cmd.val64 == 0:
                ioas.iopt.disable_large_pages_()
            elif cmd.val64 == 1:
                ioas.iopt.enable_large_pages()
            else:
                raise fail(EINVAL, f"IOMMU_OPTION_HUGE_PAGES: {cmd.val64} is neither 0 nor 1")
        else:
            raise fail(EOPNOTSUPP, f"IOMMU_OPTION: op {cmd.op} is neither SET (0) nor GET (1)")
    finally:
        ucmd.ictx.put_object(ioas)
