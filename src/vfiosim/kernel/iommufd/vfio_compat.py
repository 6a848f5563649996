"""VFIO's container ioctls served by iommufd (drivers/iommu/iommufd/vfio_compat.c).

With CONFIG_IOMMUFD_VFIO_CONTAINER, /dev/vfio/vfio is an iommufd: a group
joins it with VFIO_GROUP_SET_CONTAINER, which creates the context's
*compat IOAS*, and the Type1 ioctls act on that IOAS.  Any iommufd answers
them, /dev/iommu too (the container ioctls' numbers are below 0x80).

The emulation differs from VFIO's Type1 driver in ways a program can see
(upstream names the gaps in iommufd_vfio_check_extension() and the Kconfig
help of IOMMUFD_VFIO_CONTAINER; the code decides; docs/iommufd.md):

* VFIO_SET_IOMMU takes Type1 and Type1v2 only, needs a group (ENODEV), and
  for Type1 disables huge pages in the IOAS so any range can be unmapped;
  it can be called again (no "already set" EINVAL).
* Devices attach to the compat IOAS when they are opened, not at
  VFIO_SET_IOMMU: until then a MAP_DMA pins nothing.
* Pages are charged to mm->locked_vm (the /dev/vfio/vfio context's default)
  *and* counted in mm->pinned_vm; a page mapped twice is charged twice.
* UNMAP of a range that cuts a mapping is ENOENT (Type1v2: EINVAL), and the
  struct is written back (size = bytes unmapped) even when it fails.
* No VFIO_DMA_MAP_FLAG_VADDR, no dirty tracking (DIRTY_PAGES is ENOTTY,
  UNMAP's GET_DIRTY_BITMAP EINVAL), DMA_AVAIL is U32_MAX, and GET_INFO has
  no migration capability.
"""

from __future__ import annotations

import ctypes
import struct
from errno import EINVAL, ENODEV, ENOTTY, EOPNOTSUPP
from typing import TYPE_CHECKING

from ...uapi import iommufd as iu
from ...uapi import vfio as uapi
from ..errors import KernelError, fail
from ..uaccess import copy_struct_from_user, copy_struct_to_user, copy_to_user
from ..iommu.iommu import IOMMU_CACHE, IOMMU_READ, IOMMU_WRITE
from .io_pagetable import ULONG_MAX
from .ioas import Ioas, get_ioas, ioas_alloc
from .main import IommufdCtx, Ucmd

if TYPE_CHECKING:
    from ..task import Task

U32_MAX = 0xFFFFFFFF


def get_compat_ioas(ictx: IommufdCtx) -> Ioas:
    """get_compat_ioas(): ENODEV until a group joined (or IOMMU_VFIO_IOAS set one)."""
    ioas = ictx.vfio_ioas
    if ioas is None:
        raise fail(ENODEV, "the container has no group yet (no compat IOAS; VFIO_GROUP_SET_CONTAINER first)")
    ioas.users += 1
    return ioas


def compat_ioas_get_id(ictx: IommufdCtx) -> int:
    """iommufd_vfio_compat_ioas_get_id()"""
    ioas = get_compat_ioas(ictx)
    ictx.put_object(ioas)
    return ioas.id


def compat_ioas_create(ictx: IommufdCtx) -> None:
    """iommufd_vfio_compat_ioas_create(): nothing if one exists already."""
    ioas = ioas_alloc(ictx)
    if ictx.no_iommu_mode:
        ictx.abort(ioas)
        raise fail(EINVAL, "the iommufd is in no-IOMMU mode")
    if ictx.vfio_ioas is not None:
        ictx.abort(ioas)
        return
    ictx.vfio_ioas = ioas
    ictx.finalize(ioas)


def iommufd_vfio_ioas(ucmd: Ucmd) -> int:
    """IOMMU_VFIO_IOAS: get, set or clear the compat IOAS."""
    cmd = ucmd.cmd
    ictx = ucmd.ictx
    if getattr(cmd, "__reserved"):
        raise fail(EOPNOTSUPP, "IOMMU_VFIO_IOAS: __reserved must be 0")
    if cmd.op == iu.IOMMU_VFIO_IOAS_GET:
        ioas = get_compat_ioas(ictx)
        cmd.ioas_id = ioas.id
        ictx.put_object(ioas)
        ucmd.respond()
        return 0
    if cmd.op == iu.IOMMU_VFIO_IOAS_SET:
        ioas = get_ioas(ictx, cmd.ioas_id)
        ictx.vfio_ioas = ioas
        ictx.put_object(ioas)
        return 0
    if cmd.op == iu.IOMMU_VFIO_IOAS_CLEAR:
        ictx.vfio_ioas = None
        return 0
    raise fail(EOPNOTSUPP, f"IOMMU_VFIO_IOAS: op {cmd.op} is not GET, SET or CLEAR")


# -- the Type1 ioctls ------------------------------------------------------------------------------------------


def _map_dma(ictx: IommufdCtx, current: "Task", arg: int) -> int:
    """iommufd_vfio_map_dma(): READ/WRITE only (no VADDR); at the IOVA given."""
    cls = uapi.vfio_iommu_type1_dma_map
    minsz = uapi.offsetofend(cls, "size")
    m = copy_struct_from_user(current, arg, cls, minsz)
    supported = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE
    if m.argsz < minsz or m.flags & ~supported:
        raise fail(EINVAL, f"VFIO_IOMMU_MAP_DMA: argsz {m.argsz} < {minsz}, or flags {m.flags:#x} has bits other "
                           f"than READ|WRITE (iommufd has no VFIO_DMA_MAP_FLAG_VADDR)")
    prot = IOMMU_CACHE
    if m.flags & uapi.VFIO_DMA_MAP_FLAG_READ:
        prot |= IOMMU_READ
    if m.flags & uapi.VFIO_DMA_MAP_FLAG_WRITE:
        prot |= IOMMU_WRITE
    ioas = get_compat_ioas(ictx)
    try:
        ioas.iopt.map_user_pages(ictx.account_mode, m.vaddr, m.size, prot, 0, m.iova, current)
    finally:
        ictx.put_object(ioas)
    return 0


def _unmap_dma(ictx: IommufdCtx, current: "Task", arg: int) -> int:
    """iommufd_vfio_unmap_dma(): whole mappings (cut first under Type1, whose
    IOAS has no huge pages); the size unmapped is written back even when the
    unmap fails part way."""
    cls = uapi.vfio_iommu_type1_dma_unmap
    minsz = uapi.offsetofend(cls, "size")
    unmap = copy_struct_from_user(current, arg, cls, minsz)
    if unmap.argsz < minsz or unmap.flags & ~uapi.VFIO_DMA_UNMAP_FLAG_ALL:
        raise fail(EINVAL, f"VFIO_IOMMU_UNMAP_DMA: argsz {unmap.argsz} < {minsz}, or flags {unmap.flags:#x} has bits "
                           f"other than ALL (iommufd has no dirty bitmap and no VADDR)")
    ioas = get_compat_ioas(ictx)
    try:
        err: KernelError | None
        if unmap.flags & uapi.VFIO_DMA_UNMAP_FLAG_ALL:
            if unmap.iova or unmap.size:
                raise fail(EINVAL, "VFIO_IOMMU_UNMAP_DMA: VFIO_DMA_UNMAP_FLAG_ALL needs iova 0 and size 0")
            unmapped, err = ioas.iopt.unmap_all()
        else:
            if ioas.iopt.disable_large_pages:
                # Cut at the start and the last byte of the range (no cut before 0).
                iovas = [(unmap.iova + unmap.size - 1) & ULONG_MAX, (unmap.iova - 1) & ULONG_MAX]
                ioas.iopt.cut_iova(iovas if unmap.iova else iovas[:1])
            unmapped, err = ioas.iopt.unmap_iova(unmap.iova, unmap.size)
        unmap.size = unmapped
        copy_struct_to_user(current, arg, unmap, minsz)
        if err is not None:
            raise err
    finally:
        ictx.put_object(ioas)
    return 0


def _cc_iommu(ictx: IommufdCtx) -> int:
    """iommufd_vfio_cc_iommu(): 1 when every HWPT of the IOAS enforces coherency."""
    ioas = get_compat_ioas(ictx)
    try:
        return 0 if any(not h.enforce_cache_coherency for h in ioas.hwpt_list) else 1
    finally:
        ictx.put_object(ioas)


def _check_extension(ictx: IommufdCtx, arg: int) -> int:
    """iommufd_vfio_check_extension()"""
    if arg in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_UNMAP_ALL):
        return int(not ictx.no_iommu_mode)
    if arg == uapi.VFIO_NOIOMMU_IOMMU:
        return 0                        # CONFIG_VFIO_NOIOMMU: vfiosim models no no-IOMMU mode
    if arg == uapi.VFIO_DMA_CC_IOMMU:
        return _cc_iommu(ictx)
    # VFIO_TYPE1_NESTING_IOMMU (obsolete) and VFIO_UPDATE_VADDR (unsafe) among others.
    return 0


def _set_iommu(ictx: IommufdCtx, arg: int) -> int:
    """iommufd_vfio_set_iommu()"""
    if arg not in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU) or ictx.no_iommu_mode:
        raise fail(EINVAL, f"VFIO_SET_IOMMU: iommufd emulates Type1 (1) and Type1v2 (3), not type {arg}")
    ioas = get_compat_ioas(ictx)
    try:
        if arg == uapi.VFIO_TYPE1_IOMMU:
            # Type1 may unmap inside a mapping: no huge IOPTEs, which could not be split.
            ioas.iopt.disable_large_pages_()
    finally:
        ictx.put_object(ioas)
    return 0


def _pagesizes(ioas: Ioas) -> int:
    """iommufd_get_pagesizes()"""
    iopt = ioas.iopt
    psz = iopt.page_size
    bitmap = ULONG_MAX
    for d in iopt.domains:
        bitmap &= d.pgsize_bitmap
    page_mask = ~(psz - 1) & ULONG_MAX
    if bitmap & ~page_mask:
        bitmap = (bitmap & page_mask) | psz
    return max(bitmap, iopt.iova_alignment)


def _get_info(ictx: IommufdCtx, current: "Task", arg: int) -> int:
    """iommufd_vfio_iommu_get_info(): the capabilities (DMA_AVAIL, then the
    IOVA ranges) are written straight after the struct while argsz has room
    for each; argsz always comes back as the size of the whole chain."""
    cls = uapi.vfio_iommu_type1_info
    minsz = uapi.offsetofend(cls, "iova_pgsizes")
    info = copy_struct_from_user(current, arg, cls, minsz)
    if info.argsz < minsz:
        raise fail(EINVAL, f"VFIO_IOMMU_GET_INFO: argsz {info.argsz} < {minsz}")
    info_size = ctypes.sizeof(cls)
    minsz = min(info.argsz, info_size)
    ioas = get_compat_ioas(ictx)
    try:
        out = cls(argsz=info.argsz, flags=uapi.VFIO_IOMMU_INFO_PGSIZES, iova_pgsizes=_pagesizes(ioas))
        total = info_size
        last_cap: int | None = None
        for fill in (_fill_cap_dma_avail, _fill_cap_iova):
            if info.argsz > total:
                cap_size = fill(ioas, current, arg + total, info.argsz - total)
            else:
                cap_size = fill(ioas, current, None, 0)
            cap_size = (cap_size + 7) & ~7
            if last_cap is not None and info.argsz >= total:
                copy_to_user(current, last_cap + 4, struct.pack("<I", total))
            last_cap = arg + total
            total += cap_size
        if info.argsz >= total:
            out.cap_offset = info_size
        out.argsz = total
        out.flags |= uapi.VFIO_IOMMU_INFO_CAPS
        copy_struct_to_user(current, arg, out, minsz)
    finally:
        ictx.put_object(ioas)
    return 0


def _fill_cap_dma_avail(ioas: Ioas, current: "Task", cur: int | None, avail: int) -> int:
    """iommufd_fill_cap_dma_avail(): iommufd's limit is memory, so U32_MAX."""
    cap = uapi.vfio_iommu_type1_info_dma_avail(avail=U32_MAX)
    cap.header.id = uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL
    cap.header.version = 1
    if cur is not None and avail >= ctypes.sizeof(cap):
        copy_to_user(current, cur, bytes(cap))
    return ctypes.sizeof(cap)


def _fill_cap_iova(ioas: Ioas, current: "Task", cur: int | None, avail: int) -> int:
    """iommufd_fill_cap_iova(): each range written while it fits, the header
    last, if the whole cap fits."""
    head = uapi.vfio_iommu_type1_info_cap_iova_range()
    head.header.id = uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
    head.header.version = 1
    hsize = ctypes.sizeof(head)
    rsize = ctypes.sizeof(uapi.vfio_iova_range)
    for start, last in ioas.iopt.iova_ranges():
        if cur is not None and avail >= hsize + rsize * (head.nr_iovas + 1):
            copy_to_user(current, cur + hsize + rsize * head.nr_iovas, struct.pack("<QQ", start, last))
        head.nr_iovas += 1
    if cur is not None and avail >= hsize + rsize * head.nr_iovas:
        copy_to_user(current, cur, bytes(head))
    return int(hsize + rsize * head.nr_iovas)


def iommufd_vfio_ioctl(ictx: IommufdCtx, current: "Task", cmd: int, arg: int) -> int:
    """iommufd_vfio_ioctl(); -ENOIOCTLCMD (ENOTTY) for everything else."""
    if cmd == uapi.VFIO_GET_API_VERSION:
        return uapi.VFIO_API_VERSION
    if cmd == uapi.VFIO_SET_IOMMU:
        return _set_iommu(ictx, arg)
    if cmd == uapi.VFIO_CHECK_EXTENSION:
        return _check_extension(ictx, arg)
    if cmd == uapi.VFIO_IOMMU_GET_INFO:
        return _get_info(ictx, current, arg)
    if cmd == uapi.VFIO_IOMMU_MAP_DMA:
        return _map_dma(ictx, current, arg)
    if cmd == uapi.VFIO_IOMMU_UNMAP_DMA:
        return _unmap_dma(ictx, current, arg)
    name = uapi.ioctl_name_for(cmd, "vfio-container") or iu.ioctl_name(cmd) or hex(cmd)
    raise fail(ENOTTY, f"{name}: iommufd does not emulate it (VFIO_IOMMU_DIRTY_PAGES, sPAPR and EEH ioctls are "
                       f"VFIO's own)")

