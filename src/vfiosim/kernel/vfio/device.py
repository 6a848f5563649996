"""VFIO device fds (drivers/vfio/vfio_main.c) and the bus driver interface.

A bus driver (vfio-pci) implements :class:`VfioDeviceOps` for each device
it binds; the core turns GROUP_GET_DEVICE_FD into a :class:`DeviceFile`
and forwards ioctl, read and write to the ops.
"""

from __future__ import annotations

from errno import EINVAL, ENOTTY
from typing import TYPE_CHECKING

from ...uapi import vfio as uapi
from ..errors import fail
from ..fs import File
from ..uaccess import copy_struct_from_user

if TYPE_CHECKING:
    from ..mm import PhysicalPages
    from ..task import Task
    from .group import VfioGroup


class VfioDeviceOps:
    """``struct vfio_device_ops``: what a VFIO bus driver implements."""

    name = "vfio-device"

    def open_device(self, current: "Task") -> None:
        """First open of the device: enable it."""

    def close_device(self, current: "Task") -> None:
        """Last close: disable it, tear down interrupts."""

    def ioctl(self, current: "Task", cmd: int, arg: int) -> int:
        raise fail(ENOTTY, f"device has no ioctl {cmd:#x}")

    def read(self, current: "Task", count: int, pos: int) -> bytes:
        raise fail(EINVAL, "device does not support read")

    def write(self, current: "Task", data: bytes, pos: int) -> int:
        raise fail(EINVAL, "device does not support write")

    def device_feature(self, current: "Task", flags: int, arg: int, argsz: int) -> int:
        raise fail(ENOTTY, f"device feature {flags & uapi.VFIO_DEVICE_FEATURE_MASK} is not supported")

    def mmap_check(self, current: "Task", offset: int, length: int, prot: int, shared: bool) -> None:
        raise fail(EINVAL, "the device cannot be mmapped")

    def mmio(self, current: "Task", offset: int, size: int, value: int | None) -> int:
        raise fail(EINVAL, "the device has no mmapped region")

    def mmap_pages(self, offset: int) -> "tuple[PhysicalPages, int]":
        raise fail(EINVAL, "the device cannot be mmapped")

    def mmap_fault(self, current: "Task", offset: int, write: bool) -> None:
        """The fault handler of a mapping of the device."""


class VfioDevice:
    """``struct vfio_device``: a device registered with VFIO in a group.

    ``index`` is the number vfio_init_device() allocates from vfio's device
    ida: the ``N`` of sysfs's ``vfio-dev/vfioN`` (and of the cdev
    ``/dev/vfio/devices/vfioN`` where one is configured)."""

    def __init__(self, name: str, group: "VfioGroup", ops: VfioDeviceOps, index: int = 0) -> None:
        self.name = name
        self.group = group
        self.ops = ops
        self.index = index
        self.open_count = 0
        group.devices.append(self)


class DeviceFile(File):
    """An open VFIO device fd."""

    kind = "vfio-device"

    def __init__(self, device: VfioDevice, group: "VfioGroup") -> None:
        super().__init__(f"vfio-device:{device.name}")
        self.device = device
        self.group = group

    @classmethod
    def open(cls, device: VfioDevice, group: "VfioGroup", current: "Task") -> "DeviceFile":
        """vfio_df_group_open() + vfio_df_open()"""
        if group.container is None:
            raise fail(EINVAL, f"group {group.id} is not in a container")
        if device.open_count == 0:
            group.use_container()
            try:
                device.ops.open_device(current)
            except Exception:
                group.unuse_container(current)
                raise
        device.open_count += 1
        return cls(device, group)

    def release(self, current: "Task") -> None:
        """vfio_device_fops_release()"""
        dev, group = self.device, self.group
        if dev.open_count == 1:
            dev.ops.close_device(current)
            dev.open_count = 0
            group.unuse_container(current)
        else:
            dev.open_count -= 1

    def ioctl(self, current: "Task", cmd: int, arg: int) -> int:
        """vfio_device_fops_unl_ioctl(): features are the core's, the rest the driver's."""
        if cmd == uapi.VFIO_DEVICE_FEATURE:
            return self._device_feature(current, arg)
        return self.device.ops.ioctl(current, cmd, arg)

    def _device_feature(self, current: "Task", arg: int) -> int:
        """vfio_ioctl_device_feature()"""
        minsz = uapi.offsetofend(uapi.vfio_device_feature, "flags")
        feature = copy_struct_from_user(current, arg, uapi.vfio_device_feature, minsz)
        if feature.argsz < minsz:
            raise fail(EINVAL, f"VFIO_DEVICE_FEATURE: argsz {feature.argsz} < {minsz}")
        known = (uapi.VFIO_DEVICE_FEATURE_MASK | uapi.VFIO_DEVICE_FEATURE_SET | uapi.VFIO_DEVICE_FEATURE_GET
                 | uapi.VFIO_DEVICE_FEATURE_PROBE)
        if feature.flags & ~known:
            raise fail(EINVAL, f"VFIO_DEVICE_FEATURE: unknown flags {feature.flags & ~known:#x}")
        if (not feature.flags & uapi.VFIO_DEVICE_FEATURE_PROBE
                and feature.flags & uapi.VFIO_DEVICE_FEATURE_SET and feature.flags & uapi.VFIO_DEVICE_FEATURE_GET):
            raise fail(EINVAL, "VFIO_DEVICE_FEATURE: GET and SET together need PROBE")
        which = feature.flags & uapi.VFIO_DEVICE_FEATURE_MASK
        if which in (uapi.VFIO_DEVICE_FEATURE_MIGRATION, uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE):
            raise fail(ENOTTY, "the device does not support migration")
        if which in (uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
                     uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT):
            raise fail(ENOTTY, "the device does not support DMA logging")
        return self.device.ops.device_feature(current, feature.flags, arg + minsz, feature.argsz - minsz)

    def mmap_check(self, current: "Task", offset: int, length: int, prot: int, shared: bool) -> None:
        self.device.ops.mmap_check(current, offset, length, prot, shared)

    def mmio(self, current: "Task", offset: int, size: int, value: int | None) -> int:
        return self.device.ops.mmio(current, offset, size, value)

    def mmap_pages(self, offset: int) -> "tuple[PhysicalPages, int]":
        return self.device.ops.mmap_pages(offset)

    def mmap_fault(self, current: "Task", offset: int, write: bool) -> None:
        self.device.ops.mmap_fault(current, offset, write)

    def read(self, current: "Task", count: int, pos: int) -> bytes:
        return self.device.ops.read(current, count, pos)

    def write(self, current: "Task", data: bytes, pos: int) -> int:
        return self.device.ops.write(current, data, pos)
