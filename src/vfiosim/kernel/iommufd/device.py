"""Devices bound to an iommufd, and attaching them to HWPTs
(drivers/iommu/iommufd/device.c).

A VFIO driver binds a device (VFIO_DEVICE_BIND_IOMMUFD on the cdev, or
opening it through a group that was given an iommufd): the device's DMA
ownership goes to the iommufd context, and an :class:`IommufdDevice` object
with an id (the ``devid``) appears.  Attaching it to an IOAS finds or makes
an automatic HWPT for it; attaching it to an HWPT uses that one.  The IOMMU
group follows the first device of the group that is attached; every device
of a group must be attached to the same HWPT, and the device's reserved
regions become reserved IOVA of the IOAS.
"""

from __future__ import annotations

from errno import EINVAL, ENODEV, ENOENT, EOPNOTSUPP, EPERM
from typing import TYPE_CHECKING, Any, Callable

from ...uapi import iommufd as iu
from ..errors import KernelBug, KernelError, fail
from ..uaccess import clear_user, copy_to_user
from ..iommu.iommu import (IOMMU_CAP_CACHE_COHERENCY, IOMMU_CAP_DIRTY_TRACKING, IOMMU_CAP_ENFORCE_CACHE_COHERENCY,
                           dev_iommu_ops, device_iommu_capable, iommu_attach_group, iommu_detach_group,
                           iommu_group_has_isolated_msi, iommu_replace_group)
from .hw_pagetable import HwptPaging, hwpt_paging_alloc
from .main import IOMMUFD_OBJ_ANY, IOMMUFD_OBJ_DEVICE, IOMMUFD_OBJ_IOAS, IommufdCtx, IommufdObject, Ucmd

if TYPE_CHECKING:
    from ..iommu.iommu import IommuGroup
    from ..pci.device import PciDevice
    from ..task import Task
    from .ioas import Ioas


class IommufdGroup:
    """``struct iommufd_group``: per context and IOMMU group, the HWPT the
    group is attached to and the bound devices attached through it."""

    def __init__(self, ictx: IommufdCtx, group: "IommuGroup") -> None:
        self.ictx = ictx
        self.group = group
        self.refs = 1
        self.hwpt: HwptPaging | None = None
        self.device_list: list[IommufdDevice] = []
        self.sw_msi_start: int | None = None

    def put(self) -> None:
        """iommufd_put_group(); iommufd_group_release() at the last reference."""
        self.refs -= 1
        if self.refs == 0:
            if self.hwpt is not None or self.device_list:
                raise KernelBug(f"iommufd group {self.group.id} released while attached")
            if self.ictx.groups.get(self.group.id) is self:
                del self.ictx.groups[self.group.id]


def get_group(ictx: IommufdCtx, dev: "PciDevice") -> IommufdGroup:
    """iommufd_get_group()"""
    group = dev.iommu_group
    if group is None:
        raise fail(ENODEV, f"{dev.bdf} is in no IOMMU group")
    igroup = ictx.groups.get(group.id)
    if igroup is not None:
        igroup.refs += 1
        return igroup
    igroup = ictx.groups[group.id] = IommufdGroup(ictx, group)
    return igroup


class IommufdDevice(IommufdObject):
    """``struct iommufd_device``"""

    obj_type = IOMMUFD_OBJ_DEVICE

    def __init__(self, ictx: IommufdCtx, dev: "PciDevice", igroup: IommufdGroup) -> None:
        super().__init__(ictx)
        self.dev = dev
        self.igroup = igroup
        self.enforce_cache_coherency = False
        self.unbind_task: "Task | None" = None

    def destroy(self) -> None:
        """iommufd_device_destroy(): DMA ownership back, the context put."""
        from .main import iommufd_ctx_put
        assert self.dev.iommu_group is not None
        self.dev.iommu_group.release_device_dma_owner()
        self.igroup.put()
        # Only iommufd_device_unbind() destroys a device (it holds the context's file).
        assert self.unbind_task is not None
        iommufd_ctx_put(self.ictx, self.unbind_task)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        hwpt = self.igroup.hwpt if self in self.igroup.device_list else None
        out.update({"dev": self.dev.bdf, "group": self.igroup.group.id, "hwpt": hwpt.id if hwpt else None})
        return out


def get_device(ictx: IommufdCtx, oid: int) -> IommufdDevice:
    obj = ictx.get_object(oid, IOMMUFD_OBJ_DEVICE)
    assert isinstance(obj, IommufdDevice)
    return obj


def iommufd_device_bind(ictx: IommufdCtx, dev: "PciDevice", current: "Task") -> IommufdDevice:
    """iommufd_device_bind(): the device's DMA ownership to the context."""
    if not device_iommu_capable(dev, IOMMU_CAP_CACHE_COHERENCY):
        raise fail(EINVAL, f"{dev.bdf}: its IOMMU cannot do cache-coherent DMA")
    igroup = get_group(ictx, dev)
    try:
        if not iommu_group_has_isolated_msi(igroup.group):
            if not ictx.kernel.iommufd_allow_unsafe_interrupts:
                raise fail(EPERM, f"{dev.bdf}: MSIs are not isolated (no interrupt remapping on this platform); "
                                  f"the iommufd module parameter allow_unsafe_interrupts would allow binding")
            ictx.kernel.log.warn(f"{dev.driver or 'vfio-pci'} {dev.bdf}: MSI interrupts are not secure, they cannot "
                                 f"be isolated by the platform. Check that platform features like interrupt "
                                 f"remapping are enabled. Use the \"allow_unsafe_interrupts\" module parameter to "
                                 f"override")
        assert dev.iommu_group is not None
        dev.iommu_group.claim_device_dma_owner(ictx)      # iommu_device_claim_dma_owner()
        try:
            idev = IommufdDevice(ictx, dev, igroup)
            ictx.object_alloc(idev)
        except KernelError:
            dev.iommu_group.release_device_dma_owner()
            raise
    except KernelError:
        igroup.put()
        raise
    ictx.file.get()                 # iommufd_ctx_get()
    idev.enforce_cache_coherency = device_iommu_capable(dev, IOMMU_CAP_ENFORCE_CACHE_COHERENCY)
    idev.users += 1                 # the calling driver is a user until unbind
    ictx.finalize(idev)
    return idev


def iommufd_device_unbind(idev: IommufdDevice, current: "Task") -> None:
    """iommufd_device_unbind()"""
    idev.unbind_task = current
    idev.ictx.destroy_user(idev)


def iommufd_ctx_has_group(ictx: IommufdCtx, group: "IommuGroup") -> bool:
    """iommufd_ctx_has_group(): any device of the group bound to the context."""
    return any(isinstance(o, IommufdDevice) and o.igroup.group is group for o in ictx.objects.values())


# -- reserved IOVA and MSI ----------------------------------------------------------------------------------


def _setup_msi(igroup: IommufdGroup, hwpt: HwptPaging) -> None:
    """iommufd_group_setup_msi(): a software MSI window gets its cookie once
    per domain (iommu_get_msi_cookie())."""
    if igroup.sw_msi_start is not None and not hwpt.msi_cookie:
        hwpt.msi_cookie = True


def _attach_reserved_iova(idev: IommufdDevice, hwpt: HwptPaging) -> None:
    """iommufd_device_attach_reserved_iova()"""
    sw_msi = hwpt.ioas.iopt.enforce_dev_resv_regions(idev.dev, idev.dev)
    if sw_msi is not None:
        idev.igroup.sw_msi_start = sw_msi
    if not idev.igroup.device_list:
        _setup_msi(idev.igroup, hwpt)


# -- attach, replace, detach ----------------------------------------------------------------------------------


def hw_pagetable_attach(hwpt: HwptPaging, idev: IommufdDevice) -> None:
    """iommufd_hw_pagetable_attach(): EINVAL if the group is attached to
    another HWPT; the first device of the group attaches the group."""
    igroup = idev.igroup
    if igroup.hwpt is not None and igroup.hwpt is not hwpt:
        raise fail(EINVAL, f"{idev.dev.bdf}: its IOMMU group {igroup.group.id} is attached to HWPT "
                           f"{igroup.hwpt.id}; every device of a group uses one HWPT")
    _attach_reserved_iova(idev, hwpt)
    if not igroup.device_list:
        try:
            assert hwpt.domain is not None
            iommu_attach_group(hwpt.domain, igroup.group)
        except KernelError:
            hwpt.ioas.iopt.remove_reserved_iova(idev.dev)
            raise
        igroup.hwpt = hwpt
    hwpt.users += 1
    igroup.device_list.append(idev)


def hw_pagetable_detach(idev: IommufdDevice) -> HwptPaging:
    """iommufd_hw_pagetable_detach(): the caller puts the HWPT it returns."""
    igroup = idev.igroup
    hwpt = igroup.hwpt
    assert hwpt is not None
    igroup.device_list.remove(idev)
    if not igroup.device_list:
        assert hwpt.domain is not None
        iommu_detach_group(hwpt.domain, igroup.group)
        igroup.hwpt = None
    hwpt.ioas.iopt.remove_reserved_iova(idev.dev)
    return hwpt


def hw_pagetable_put(ictx: IommufdCtx, hwpt: HwptPaging) -> None:
    """iommufd_hw_pagetable_put(): an automatic HWPT goes with its last user."""
    if hwpt.auto_domain:
        ictx.put_and_try_destroy(hwpt)
    else:
        hwpt.users -= 1


def _do_attach(idev: IommufdDevice, hwpt: HwptPaging) -> HwptPaging | None:
    hw_pagetable_attach(hwpt, idev)
    return None


def _do_replace(idev: IommufdDevice, hwpt: HwptPaging) -> HwptPaging | None:
    """iommufd_device_do_replace(): returns the old HWPT for the caller to put."""
    igroup = idev.igroup
    if igroup.hwpt is None:
        raise fail(EINVAL, f"{idev.dev.bdf} is not attached: nothing to replace")
    if idev not in igroup.device_list:
        raise fail(EINVAL, f"{idev.dev.bdf} is not attached (another device of its group is)")
    if hwpt is igroup.hwpt:
        return None
    old = igroup.hwpt
    iopt = hwpt.ioas.iopt
    same_ioas = old.ioas is hwpt.ioas
    if not same_ioas:
        # iommufd_group_do_replace_reserved_iova()
        try:
            for cur in igroup.device_list:
                iopt.enforce_dev_resv_regions(cur.dev, cur.dev)
        except KernelError:
            for cur in igroup.device_list:
                iopt.remove_reserved_iova(cur.dev)
            raise
    _setup_msi(igroup, hwpt)
    try:
        assert hwpt.domain is not None
        iommu_replace_group(igroup.group, hwpt.domain)
    except KernelError:
        for cur in igroup.device_list:
            iopt.remove_reserved_iova(cur.dev)
        raise
    if not same_ioas:
        for cur in igroup.device_list:
            old.ioas.iopt.remove_reserved_iova(cur.dev)
    igroup.hwpt = hwpt
    num = len(igroup.device_list)
    # The device_list's references move to the new HWPT; one stays on the old
    # one for the caller to put.
    hwpt.users += num
    if num > 1:
        old.users -= num - 1
    return old


AttachFn = Callable[[IommufdDevice, HwptPaging], "HwptPaging | None"]


def _auto_get_domain(idev: IommufdDevice, ioas: "Ioas", do_attach: AttachFn, current: "Task") -> tuple[
        HwptPaging | None, int]:
    """iommufd_device_auto_get_domain(): the first automatic HWPT of the IOAS
    that takes the device (EINVAL means "incompatible, try the next"), else a
    new one; never a manually created HWPT."""
    ictx = idev.ictx
    immediate = do_attach is _do_attach
    for hwpt in list(ioas.hwpt_list):
        if not hwpt.auto_domain:
            continue
        hwpt.users += 1                     # iommufd_lock_obj()
        try:
            destroy = do_attach(idev, hwpt)
        except KernelError as exc:
            ictx.put_object(hwpt)
            if exc.errno == EINVAL:
                continue
            raise
        ictx.put_object(hwpt)
        return destroy, hwpt.id
    hwpt = hwpt_paging_alloc(ictx, ioas, idev, 0, immediate, False, current)
    destroy = None
    if not immediate:
        try:
            destroy = do_attach(idev, hwpt)
        except KernelError:
            ictx.abort_and_destroy(hwpt)
            raise
    hwpt.auto_domain = True
    ictx.finalize(hwpt)
    return destroy, hwpt.id


def _change_pt(idev: IommufdDevice, pt_id: int, do_attach: AttachFn, current: "Task") -> int:
    """iommufd_device_change_pt(); returns the pt_id (an IOAS becomes its HWPT)."""
    ictx = idev.ictx
    pt_obj = ictx.get_object(pt_id, IOMMUFD_OBJ_ANY)
    try:
        if isinstance(pt_obj, HwptPaging):
            destroy = do_attach(idev, pt_obj)
        elif pt_obj.obj_type == IOMMUFD_OBJ_IOAS:
            destroy, pt_id = _auto_get_domain(idev, pt_obj, do_attach, current)  # type: ignore[arg-type]
        else:
            raise fail(EINVAL, f"iommufd id {pt_id} is a {pt_obj.type_name}, not an IOAS or a HWPT")
    finally:
        ictx.put_object(pt_obj)
    if destroy is not None:
        hw_pagetable_put(ictx, destroy)
    return pt_id


def iommufd_device_attach(idev: IommufdDevice, pt_id: int, current: "Task") -> int:
    """iommufd_device_attach(): returns the HWPT's id."""
    pt_id = _change_pt(idev, pt_id, _do_attach, current)
    idev.users += 1
    return pt_id


def iommufd_device_replace(idev: IommufdDevice, pt_id: int, current: "Task") -> int:
    """iommufd_device_replace(): detach + attach with no gap in translation."""
    return _change_pt(idev, pt_id, _do_replace, current)


def iommufd_device_detach(idev: IommufdDevice) -> None:
    """iommufd_device_detach(): back to blocked DMA."""
    hwpt = hw_pagetable_detach(idev)
    hw_pagetable_put(idev.ictx, hwpt)
    idev.users -= 1


# -- IOMMU_GET_HW_INFO ------------------------------------------------------------------------------------------


def iommufd_get_hw_info(ucmd: Ucmd) -> int:
    """iommufd_get_hw_info(): the IOMMU's own info struct (VT-d: cap and ecap
    registers) copied into data_len bytes, zero-filled past what the kernel
    has; data_len comes back as the kernel's length."""
    cmd = ucmd.cmd
    reserved = getattr(cmd, "__reserved")
    if cmd.flags or reserved[0] or reserved[1] or reserved[2]:
        raise fail(EOPNOTSUPP, "IOMMU_GET_HW_INFO: flags and __reserved must be 0")
    idev = get_device(ucmd.ictx, cmd.dev_id)
    try:
        ops = dev_iommu_ops(idev.dev)
        info = ops.hw_info(idev.dev) if ops is not None else None
        if info is None:
            data, cmd.out_data_type = b"", iu.IOMMU_HW_INFO_TYPE_NONE
        else:
            data, cmd.out_data_type = info
        copy_len = min(cmd.data_len, len(data))
        copy_to_user(ucmd.current, cmd.data_uptr, data[:copy_len])
        if copy_len < cmd.data_len:
            clear_user(ucmd.current, cmd.data_uptr + copy_len, cmd.data_len - copy_len)
        cmd.data_len = len(data)
        cmd.out_capabilities = 0
        if device_iommu_capable(idev.dev, IOMMU_CAP_DIRTY_TRACKING):
            cmd.out_capabilities |= iu.IOMMU_HW_CAP_DIRTY_TRACKING
        # No simulated device has PASID enabled (dev->iommu->max_pasids 0).
        cmd.out_max_pasid_log2 = 0
        ucmd.respond()
    finally:
        ucmd.ictx.put_object(idev)
    return 0


def vfio_iommufd_get_dev_id(idev_of: "IommufdDevice | None", dev: "PciDevice", ictx: IommufdCtx) -> int:
    """vfio_iommufd_get_dev_id(): the devid when the device is bound to
    ``ictx``; -ENOENT when it is not but its group is (owned without an id);
    -ENODEV otherwise."""
    if idev_of is not None and idev_of.ictx is ictx:
        return idev_of.id
    group = dev.iommu_group
    if group is None:
        return -ENODEV
    return -ENOENT if iommufd_ctx_has_group(ictx, group) else -ENODEV
