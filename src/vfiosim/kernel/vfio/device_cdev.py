"""The VFIO device cdev, /dev/vfio/devices/vfioN (drivers/vfio/device_cdev.c).

Any number of opens of the cdev succeed, but an fd grants nothing until
VFIO_DEVICE_BIND_IOMMUFD binds it to an iommufd (every other ioctl, read,
write and mmap is EINVAL until then); only one fd can bind the device, and
not while the device's group is open.  Bound, the device is attached to an
IOAS or HWPT with VFIO_DEVICE_ATTACH_IOMMUFD_PT (again to replace it) and
detached with VFIO_DEVICE_DETACH_IOMMUFD_PT, after which its DMA is blocked.
Closing the fd detaches, unbinds and lets the group be opened again.
"""

from __future__ import annotations

from errno import EBUSY, EINVAL
from typing import TYPE_CHECKING

from ...uapi import vfio as uapi
from ..errors import KernelError, fail
from ..iommufd.main import iommufd_ctx_from_fd, iommufd_ctx_put
from ..uaccess import copy_struct_from_user, copy_to_user
from .device import DeviceFile
from .iommufd import vfio_iommufd_physical_attach_ioas, vfio_iommufd_physical_detach_ioas

if TYPE_CHECKING:
    from ..task import Task
    from .device import VfioDevice


def vfio_device_fops_cdev_open(device: "VfioDevice") -> DeviceFile:
    """vfio_device_fops_cdev_open(): an fd with no access yet."""
    return DeviceFile(device, None, f"/dev/vfio/devices/{device.cdev_name}")


def _block_group(device: "VfioDevice") -> None:
    """vfio_device_block_group()"""
    group = device.group
    if group.opened_file is not None:
        raise fail(EBUSY, f"{device.name}: its group /dev/vfio/{group.id} is open; a device is used through its "
                          f"group or its cdev, not both")
    group.cdev_device_open_cnt += 1


def _unblock_group(device: "VfioDevice") -> None:
    device.group.cdev_device_open_cnt -= 1


def vfio_df_ioctl_bind_iommufd(df: DeviceFile, current: "Task", arg: int) -> int:
    """vfio_df_ioctl_bind_iommufd()"""
    device = df.device
    cls = uapi.vfio_device_bind_iommufd
    minsz = uapi.offsetofend(cls, "out_devid")
    bind = copy_struct_from_user(current, arg, cls, minsz)
    if bind.argsz < minsz or bind.flags or bind.iommufd < 0:
        raise fail(EINVAL, f"VFIO_DEVICE_BIND_IOMMUFD: argsz {bind.argsz} < {minsz}, flags {bind.flags:#x} != 0 or "
                           f"iommufd {bind.iommufd} < 0")
    if df.group is not None:
        raise fail(EINVAL, "VFIO_DEVICE_BIND_IOMMUFD: only a cdev fd can be bound (this fd came from its group)")
    _block_group(device)
    try:
        if df.access_granted:
            raise fail(EINVAL, "VFIO_DEVICE_BIND_IOMMUFD: this fd is already bound")
        df.iommufd = iommufd_ctx_from_fd(current, bind.iommufd)
        try:
            df.df_open(current)
            try:
                copy_to_user(current, arg + cls.out_devid.offset, int(df.devid).to_bytes(4, "little"))
            except KernelError:
                df.df_close(current)
                raise
        except KernelError:
            iommufd_ctx_put(df.iommufd, current)
            df.iommufd = None
            raise
    except KernelError:
        _unblock_group(device)
        raise
    device.cdev_opened = True
    df.access_granted = True
    return 0


def vfio_df_unbind_iommufd(df: DeviceFile, current: "Task") -> None:
    """vfio_df_unbind_iommufd(): when a bound cdev fd is closed."""
    if not df.access_granted:
        return
    device = df.device
    df.df_close(current)
    assert df.iommufd is not None
    iommufd_ctx_put(df.iommufd, current)
    device.cdev_opened = False
    _unblock_group(device)


def vfio_df_ioctl_attach_pt(df: DeviceFile, current: "Task", arg: int) -> int:
    """vfio_df_ioctl_attach_pt(): pt_id comes back as the HWPT attached."""
    cls = uapi.vfio_device_attach_iommufd_pt
    minsz = uapi.offsetofend(cls, "pt_id")
    attach = copy_struct_from_user(current, arg, cls, minsz)
    if attach.argsz < minsz or attach.flags:
        raise fail(EINVAL, f"VFIO_DEVICE_ATTACH_IOMMUFD_PT: argsz {attach.argsz} < {minsz} or flags "
                           f"{attach.flags:#x} != 0")
    pt_id = vfio_iommufd_physical_attach_ioas(df.device, attach.pt_id, current)
    try:
        copy_to_user(current, arg + cls.pt_id.offset, pt_id.to_bytes(4, "little"))
    except KernelError:
        vfio_iommufd_physical_detach_ioas(df.device)
        raise
    return 0


def vfio_df_ioctl_detach_pt(df: DeviceFile, current: "Task", arg: int) -> int:
    """vfio_df_ioctl_detach_pt()"""
    cls = uapi.vfio_device_detach_iommufd_pt
    minsz = uapi.offsetofend(cls, "flags")
    detach = copy_struct_from_user(current, arg, cls, minsz)
    if detach.argsz < minsz or detach.flags:
        raise fail(EINVAL, f"VFIO_DEVICE_DETACH_IOMMUFD_PT: argsz {detach.argsz} < {minsz} or flags "
                           f"{detach.flags:#x} != 0")
    vfio_iommufd_physical_detach_ioas(df.device)
    return 0
