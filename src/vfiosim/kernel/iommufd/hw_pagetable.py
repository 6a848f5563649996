"""HWPTs: IOMMU domains as iommufd objects (drivers/iommu/iommufd/hw_pagetable.c),
dirty tracking, and the fault queue object (fault.c).

A paging HWPT wraps an IOMMU domain allocated for a device and mirrors its
IOAS: every area of the IOAS is mapped into the domain, and the domain's
aperture edges become reserved IOVA of the IOAS.  HWPTs are either made by
IOMMU_HWPT_ALLOC ("manual", destroyed with IOMMU_DESTROY) or automatically
when a device attaches to an IOAS with no compatible automatic HWPT ("auto",
destroyed with its last device).  Nested HWPTs (a stage-1 table over a
nesting-parent HWPT) need IOMMU nesting, which no simulated IOMMU has:
IOMMU_HWPT_ALLOC answers for them as Linux 6.12 does on such hardware.
"""

from __future__ import annotations

import ctypes
import struct
from errno import EINVAL, EOPNOTSUPP, EOVERFLOW, ESPIPE
from typing import TYPE_CHECKING, Any

from ...uapi import iommufd as iu
from ..errors import KernelError, fail
from ..fs import File
from ..iommu.iommu import (IOMMU_CAP_DIRTY_TRACKING, IommuDomain, dev_iommu_ops, device_iommu_capable,
                           iommu_domain_free, iommu_paging_domain_alloc, iommu_read_and_clear_dirty,
                           iommu_set_dirty_tracking)
from .main import (IOMMUFD_OBJ_ANY, IOMMUFD_OBJ_FAULT, IOMMUFD_OBJ_HWPT_NESTED, IOMMUFD_OBJ_HWPT_PAGING,
                   IOMMUFD_OBJ_IOAS, IommufdCtx, IommufdObject, Ucmd, iommufd_ctx_put)

if TYPE_CHECKING:
    from ..task import Task
    from .device import IommufdDevice
    from .ioas import Ioas

ULONG_MAX = (1 << 64) - 1


class HwptPaging(IommufdObject):
    """``struct iommufd_hwpt_paging``"""

    obj_type = IOMMUFD_OBJ_HWPT_PAGING

    def __init__(self, ictx: IommufdCtx, ioas: "Ioas") -> None:
        super().__init__(ictx)
        self.ioas = ioas
        self.domain: IommuDomain | None = None
        self.auto_domain = False
        self.enforce_cache_coherency = False
        self.msi_cookie = False
        self.nest_parent = False
        self.in_hwpt_list = False

    def destroy(self) -> None:
        """iommufd_hwpt_paging_destroy()"""
        if self.in_hwpt_list:
            self.ioas.hwpt_list.remove(self)
            self.in_hwpt_list = False
            assert self.domain is not None
            self.ioas.iopt.remove_domain(self.domain)
        if self.domain is not None:
            iommu_domain_free(self.domain)
            self.domain = None
        self.ioas.users -= 1

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        d = self.domain
        out.update({"ioas": self.ioas.id, "auto": self.auto_domain, "nest_parent": self.nest_parent,
                    "enforce_cache_coherency": self.enforce_cache_coherency,
                    "domain": d.id if d is not None else None,
                    "dirty_tracking": bool(getattr(d, "dirty_tracking", False)),
                    "dirty_capable": bool(d is not None and d.dirty_tracking_supported),
                    "mapped_bytes": d.mapped_bytes() if d is not None else 0})
        return out


def _enforce_cc(hwpt: HwptPaging) -> None:
    """iommufd_hwpt_paging_enforce_cc()"""
    if hwpt.enforce_cache_coherency:
        return
    assert hwpt.domain is not None
    hwpt.enforce_cache_coherency = hwpt.domain.enforce_cache_coherency()
    if not hwpt.enforce_cache_coherency:
        raise fail(EINVAL, "the domain cannot enforce cache coherency (no snoop control)")


def hwpt_paging_alloc(ictx: IommufdCtx, ioas: "Ioas", idev: "IommufdDevice", flags: int, immediate_attach: bool,
                      user_data: bool, current: "Task") -> HwptPaging:
    """iommufd_hwpt_paging_alloc(): a paging domain for the device, filled
    with the IOAS (pinning what no other domain pinned yet)."""
    from .device import hw_pagetable_attach, hw_pagetable_detach
    dev = idev.dev
    ops = dev_iommu_ops(dev)
    assert ops is not None
    valid = iu.IOMMU_HWPT_ALLOC_NEST_PARENT | iu.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    if (flags or user_data) and not ops.has_domain_alloc_user:
        raise fail(EOPNOTSUPP, f"{dev.bdf}: {ops.name} has no domain_alloc_user: no HWPT flags or driver data")
    if flags & ~valid:
        raise fail(EOPNOTSUPP, f"flags {flags:#x} have bits a paging HWPT does not know")
    if flags & iu.IOMMU_HWPT_ALLOC_DIRTY_TRACKING and \
            not device_iommu_capable(dev, IOMMU_CAP_DIRTY_TRACKING):
        raise fail(EOPNOTSUPP, f"{dev.bdf}: its IOMMU cannot track dirty pages (IOMMU_HW_CAP_DIRTY_TRACKING is "
                               f"not in IOMMU_GET_HW_INFO's out_capabilities)")
    hwpt = HwptPaging(ictx, ioas)
    ictx.object_alloc(hwpt)
    ioas.users += 1
    hwpt.nest_parent = bool(flags & iu.IOMMU_HWPT_ALLOC_NEST_PARENT)
    try:
        if user_data:
            # intel_iommu_domain_alloc_user(): no user data for a paging domain.
            raise fail(EOPNOTSUPP, "a paging HWPT takes no driver data (data_type must be IOMMU_HWPT_DATA_NONE)")
        if ops.has_domain_alloc_user:
            hwpt.domain = ops.domain_alloc_user(dev, nest_parent=hwpt.nest_parent,
                                                dirty_tracking=bool(flags & iu.IOMMU_HWPT_ALLOC_DIRTY_TRACKING))
        else:
            # POWER: spapr_tce_iommu_ops allocates no paging domain (EOPNOTSUPP).
            hwpt.domain = iommu_paging_domain_alloc(dev)
        if idev.enforce_cache_coherency:
            try:
                _enforce_cc(hwpt)
            except KernelError:
                ictx.kernel.log.warn("WARNING: iommufd_hwpt_paging_alloc: enforce_cache_coherency failed")
                raise
        if immediate_attach:
            hw_pagetable_attach(hwpt, idev)
    except KernelError:
        ictx.abort_and_destroy(hwpt)
        raise
    try:
        ioas.iopt.add_domain(hwpt.domain, current)
    except KernelError:
        if immediate_attach:
            hw_pagetable_detach(idev)
            hwpt.users -= 1
        ictx.abort_and_destroy(hwpt)
        raise
    ioas.hwpt_list.append(hwpt)
    hwpt.in_hwpt_list = True
    return hwpt


def iommufd_hwpt_alloc(ucmd: Ucmd) -> int:
    """iommufd_hwpt_alloc()"""
    from .device import get_device
    cmd = ucmd.cmd
    ictx = ucmd.ictx
    if getattr(cmd, "__reserved"):
        raise fail(EOPNOTSUPP, "IOMMU_HWPT_ALLOC: __reserved must be 0")
    if (cmd.data_type == iu.IOMMU_HWPT_DATA_NONE and cmd.data_len) or \
            (cmd.data_type != iu.IOMMU_HWPT_DATA_NONE and not cmd.data_len):
        raise fail(EINVAL, f"IOMMU_HWPT_ALLOC: data_type {cmd.data_type} does not go with data_len {cmd.data_len}")
    idev = get_device(ictx, cmd.dev_id)
    try:
        try:
            pt_obj = ictx.get_object(cmd.pt_id, IOMMUFD_OBJ_ANY)
        except KernelError:
            raise fail(EINVAL, f"IOMMU_HWPT_ALLOC: pt_id {cmd.pt_id} names no object") from None
        try:
            if pt_obj.obj_type == IOMMUFD_OBJ_IOAS:
                hwpt = hwpt_paging_alloc(ictx, pt_obj, idev, cmd.flags, False, bool(cmd.data_len),  # type: ignore[arg-type]
                                         ucmd.current)
            elif pt_obj.obj_type == IOMMUFD_OBJ_HWPT_PAGING:
                _hwpt_nested_alloc(pt_obj, idev, cmd.flags, cmd.data_len)  # type: ignore[arg-type]
                raise AssertionError("unreachable")
            else:
                raise fail(EINVAL, f"IOMMU_HWPT_ALLOC: pt_id {cmd.pt_id} is a {pt_obj.type_name}, not an IOAS or "
                                   f"a paging HWPT")
            cmd.out_hwpt_id = hwpt.id
            try:
                ucmd.respond()
            except KernelError:
                ictx.abort_and_destroy(hwpt)
                raise
            ictx.finalize(hwpt)
        finally:
            ictx.put_object(pt_obj)
    finally:
        ictx.put_object(idev)
    return 0


def _hwpt_nested_alloc(parent: HwptPaging, idev: "IommufdDevice", flags: int, data_len: int) -> None:
    """iommufd_hwpt_nested_alloc(): a stage-1 HWPT needs a nesting parent,
    which only an IOMMU with nesting can allocate -- none here."""
    dev = idev.dev
    ops = dev_iommu_ops(dev)
    if flags & ~iu.IOMMU_HWPT_FAULT_ID_VALID or not data_len or ops is None or not ops.has_domain_alloc_user:
        raise fail(EOPNOTSUPP, "a nested HWPT takes only IOMMU_HWPT_FAULT_ID_VALID and needs driver data")
    if parent.auto_domain or not parent.nest_parent:
        raise fail(EINVAL, f"HWPT {parent.id} is not a nesting parent (IOMMU_HWPT_ALLOC_NEST_PARENT)")
    raise fail(EOPNOTSUPP, f"{dev.bdf}: the IOMMU cannot nest translation")


def get_hwpt_paging(ictx: IommufdCtx, oid: int) -> HwptPaging:
    obj = ictx.get_object(oid, IOMMUFD_OBJ_HWPT_PAGING)
    assert isinstance(obj, HwptPaging)
    return obj


def iommufd_hwpt_set_dirty_tracking(ucmd: Ucmd) -> int:
    """iommufd_hwpt_set_dirty_tracking() -> iopt_set_dirty_tracking(): enabling
    first clears the D bits (a clean snapshot), then turns tracking on."""
    cmd = ucmd.cmd
    if cmd.flags & ~iu.IOMMU_HWPT_DIRTY_TRACKING_ENABLE:
        raise fail(EOPNOTSUPP, f"IOMMU_HWPT_SET_DIRTY_TRACKING: flags {cmd.flags:#x} has unknown bits")
    hwpt = get_hwpt_paging(ucmd.ictx, cmd.hwpt_id)
    try:
        enable = bool(cmd.flags & iu.IOMMU_HWPT_DIRTY_TRACKING_ENABLE)
        domain = hwpt.domain
        assert domain is not None
        if not domain.dirty_tracking_supported:
            raise fail(EOPNOTSUPP, f"HWPT {hwpt.id} was not allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING")
        if enable:
            # iopt_clear_dirty_data(): a clean snapshot to start from.
            for area in hwpt.ioas.iopt.areas():
                if area.pages is not None:
                    iommu_read_and_clear_dirty(domain, area.start, area.length, 0, bitmap=False)
        iommu_set_dirty_tracking(domain, enable)
    finally:
        ucmd.ictx.put_object(hwpt)
    return 0


def check_iova_range(iova_alignment: int, cmd: Any) -> None:
    """iommufd_check_iova_range()"""
    if not cmd.length:
        raise fail(EINVAL, "IOMMU_HWPT_GET_DIRTY_BITMAP: length 0")
    last = cmd.iova + cmd.length - 1
    if last > ULONG_MAX:
        raise fail(EOVERFLOW, f"IOMMU_HWPT_GET_DIRTY_BITMAP: iova {cmd.iova:#x} + length {cmd.length:#x} wraps")
    if cmd.iova & (iova_alignment - 1) or (last + 1) & (iova_alignment - 1):
        raise fail(EINVAL, f"IOMMU_HWPT_GET_DIRTY_BITMAP: {cmd.iova:#x}+{cmd.length:#x} is not aligned to the "
                           f"IOAS's IOVA alignment {iova_alignment:#x}")
    if not cmd.page_size:
        raise fail(EINVAL, "IOMMU_HWPT_GET_DIRTY_BITMAP: page_size 0")
    if cmd.iova & (cmd.page_size - 1) or (last + 1) & (cmd.page_size - 1):
        raise fail(EINVAL, f"IOMMU_HWPT_GET_DIRTY_BITMAP: {cmd.iova:#x}+{cmd.length:#x} is not aligned to "
                           f"page_size {cmd.page_size:#x}")


def iommufd_hwpt_get_dirty_bitmap(ucmd: Ucmd) -> int:
    """iommufd_hwpt_get_dirty_bitmap() -> iopt_read_and_clear_dirty_data():
    one bit per page_size of [iova, iova + length), set for each dirty PTE
    the range covers (a super page sets all its bits), cleared in the PTEs
    unless IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR."""
    from .dirty_bitmap import IovaBitmap
    cmd = ucmd.cmd
    ictx = ucmd.ictx
    if cmd.flags & ~iu.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR or getattr(cmd, "__reserved"):
        raise fail(EOPNOTSUPP, f"IOMMU_HWPT_GET_DIRTY_BITMAP: flags {cmd.flags:#x} has unknown bits, or "
                               f"__reserved is not 0")
    hwpt = get_hwpt_paging(ictx, cmd.hwpt_id)
    try:
        iopt = hwpt.ioas.iopt
        check_iova_range(iopt.iova_alignment, cmd)
        domain = hwpt.domain
        assert domain is not None
        if not domain.dirty_tracking_supported:
            raise fail(EOPNOTSUPP, f"HWPT {hwpt.id} was not allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING")
        bitmap = IovaBitmap(ucmd.current, cmd.iova, cmd.length, cmd.page_size, cmd.data)
        last = cmd.iova + cmd.length - 1
        walk, done = iopt.contig_areas(cmd.iova, last)
        for area, cur in walk:
            stop = min(last, area.last)
            for r in iommu_read_and_clear_dirty(domain, cur, stop - cur + 1, cmd.flags):
                bitmap.set(r.iova, r.length)
        if not done:
            raise fail(EINVAL, f"IOMMU_HWPT_GET_DIRTY_BITMAP: {cmd.iova:#x}+{cmd.length:#x} is not mapped without "
                               f"a gap")
        bitmap.finish()
    finally:
        ictx.put_object(hwpt)
    return 0


def iommufd_hwpt_invalidate(ucmd: Ucmd) -> int:
    """iommufd_hwpt_invalidate(): only nested HWPTs, which cannot exist here;
    entry_num is written back (0 done) whatever happened."""
    cmd = ucmd.cmd
    err: KernelError | None = None
    if getattr(cmd, "__reserved"):
        err = fail(EOPNOTSUPP, "IOMMU_HWPT_INVALIDATE: __reserved must be 0")
    elif cmd.entry_num and (not cmd.data_uptr or not cmd.entry_len or cmd.entry_len > ucmd.ictx.kernel.page_size
                            or cmd.entry_num > 1 << 19):
        err = fail(EINVAL, "IOMMU_HWPT_INVALIDATE: entries need a data pointer, an entry_len of at most PAGE_SIZE "
                           "and at most 2^19 entries")
    else:
        try:
            obj = ucmd.ictx.get_object(cmd.hwpt_id, IOMMUFD_OBJ_HWPT_NESTED)
            ucmd.ictx.put_object(obj)
        except KernelError as exc:
            err = exc
    cmd.entry_num = 0
    ucmd.respond()
    if err is not None:
        raise err
    return 0


# -- the fault queue (drivers/iommu/iommufd/fault.c) ------------------------------------------------------------


class FaultQueue(IommufdObject):
    """``struct iommufd_fault``: where I/O page faults of a fault-capable HWPT
    are read from.  Only nested HWPTs can take one in Linux 6.12, and no
    simulated IOMMU nests, so its queue stays empty."""

    obj_type = IOMMUFD_OBJ_FAULT

    def __init__(self, ictx: IommufdCtx) -> None:
        super().__init__(ictx)
        self.file: FaultFile | None = None

    def destroy(self) -> None:
        pass


class FaultFile(File):
    """The ``[iommufd-pgfault]`` anon file of a fault queue."""

    kind = "iommufd-fault"

    def __init__(self, fault: FaultQueue) -> None:
        super().__init__("anon_inode:[iommufd-pgfault]")
        self.fault = fault

    def read(self, current: "Task", count: int, pos: int) -> bytes:
        """iommufd_fault_fops_read(): whole struct iommu_hwpt_pgfault records."""
        if pos or count % ctypes.sizeof(iu.iommu_hwpt_pgfault):
            raise fail(ESPIPE, "read a whole number of struct iommu_hwpt_pgfault from offset 0")
        return b""

    def write(self, current: "Task", data: bytes, pos: int) -> int:
        """iommufd_fault_fops_write(): page responses to cookies handed out by
        read(); none was, so the first is EINVAL."""
        size = ctypes.sizeof(iu.iommu_hwpt_page_response)
        if pos or len(data) % size:
            raise fail(ESPIPE, "write a whole number of struct iommu_hwpt_page_response from offset 0")
        if not data:
            return 0
        cookie, code = struct.unpack_from("<II", data)
        if code not in (iu.IOMMUFD_PAGE_RESP_SUCCESS, iu.IOMMUFD_PAGE_RESP_INVALID):
            raise fail(EINVAL, f"page response code {code} is neither SUCCESS nor INVALID")
        raise fail(EINVAL, f"no fault group with cookie {cookie} is waiting for a response")

    def release(self, current: "Task") -> None:
        """iommufd_fault_fops_release()"""
        fault = self.fault
        fault.users -= 1
        iommufd_ctx_put(fault.ictx, current)


def iommufd_fault_alloc(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    ictx = ucmd.ictx
    current = ucmd.current
    if cmd.flags:
        raise fail(EOPNOTSUPP, f"IOMMU_FAULT_QUEUE_ALLOC: flags {cmd.flags:#x} must be 0")
    fault = FaultQueue(ictx)
    ictx.object_alloc(fault)
    fault.file = FaultFile(fault)
    fault.users += 1
    ictx.file.get()
    try:
        current.files.check_free()
        cmd.out_fault_id = fault.id
        cmd.out_fault_fd = current.files._lowest_free()
        ucmd.respond()
    except KernelError:
        fault.file.put(current)
        ictx.abort(fault)
        raise
    ictx.finalize(fault)
    current.files.install(fault.file, cloexec=True)
    return 0

