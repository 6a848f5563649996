"""VFIO device fds (drivers/vfio/vfio_main.c) and the bus driver interface.

A bus driver (vfio-pci) implements :class:`VfioDeviceOps` for each device
it binds; the core turns GROUP_GET_DEVICE_FD -- or an open of the device's
cdev, /dev/vfio/devices/vfioN (device_cdev.py) -- into a :class:`DeviceFile`
and forwards ioctl, read and write to the ops.

A device is opened (the driver's open_device) with its IOMMU set up one of
three ways: through its group's VFIO container (the group's container user
count), through its group's iommufd (bound to it and attached to the
context's compat IOAS), or through its cdev (bound with
VFIO_DEVICE_BIND_IOMMUFD; until then the fd refuses everything else with
EINVAL, and VFIO_DEVICE_ATTACH_IOMMUFD_PT picks the address space).
"""

from __future__ import annotations

from errno import EINVAL, ENOTTY
from typing import TYPE_CHECKING, Any, Callable

from ...uapi import vfio as uapi
from ..errors import KernelError, fail
from ..fs import File
from ..uaccess import copy_struct_from_user

if TYPE_CHECKING:
    from ..eventfd import EventFd
    from ..iommufd.device import IommufdDevice
    from ..iommufd.main import IommufdCtx
    from ..pci.device import PciDevice
    from ..mm import PhysicalPages
    from ..task import Task
    from .group import VfioGroup


class VfioDeviceOps:
    """``struct vfio_device_ops``: what a VFIO bus driver implements."""

    name = "vfio-device"
    #: the VfioDevice registered for these ops (set at registration)
    vdev: "VfioDevice | None" = None

    def physical_device(self) -> "PciDevice | None":
        """The device an iommufd binds (vfio_iommufd_physical_bind()); None
        for a driver without one (an emulated device)."""
        return None

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

    def mmio_store_fn(self, offset: int, size: int) -> Callable[[int], bool] | None:
        """A shortcut for stores at ``offset`` through a mapping (Kernel.mmap_store_fn); None by default."""
        return None

    def mmio_load_fn(self, offset: int, size: int) -> Callable[[], int | None] | None:
        """A shortcut for loads at ``offset`` through a mapping (Kernel.mmap_load_fn); None by default."""
        return None

    def mmap_posted_writes(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, side effect), from the start of a mapping at
        ``offset``, of what a CPU may store to without waiting for the device
        (posted writes); a store with a side effect is to be performed at once."""
        return []

    def mmap_live(self) -> bool:
        """Stores through a mapping reach the device now (decoding is on)."""
        return False

    def mmap_live_check(self) -> Callable[[], bool]:
        """mmap_live() as a callable to keep: what a transport asks after
        every call of a program with the device mapped (the same answer,
        with as few frames as the device can)."""
        return self.mmap_live

    def eventfds(self) -> list["EventFd"]:
        """The eventfds the driver signals (interrupt triggers): a transport
        keeps its handles on them open while they are here."""
        return []

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
        # The iommufd side (drivers/vfio/iommufd.c): the bound iommufd_device
        # and whether it is attached; cdev_opened while a cdev fd has it bound.
        self.iommufd_device: "IommufdDevice | None" = None
        self.iommufd_attached = False
        self.cdev_opened = False
        ops.vdev = self
        group.devices.append(self)

    @property
    def cdev_name(self) -> str:
        return f"vfio{self.index}"


class DeviceFile(File):
    """An open VFIO device fd (``struct vfio_device_file``): ``group`` is the
    group it was opened through, None for a cdev fd."""

    kind = "vfio-device"

    def __init__(self, device: VfioDevice, group: "VfioGroup | None", name: str | None = None) -> None:
        super().__init__(name or f"vfio-device:{device.name}")
        self.device = device
        self.group = group
        # A group-opened fd exists only once the device is open; a cdev fd
        # gets access at VFIO_DEVICE_BIND_IOMMUFD.
        self.access_granted = group is not None
        self.iommufd: "IommufdCtx | None" = None
        self.devid = 0

    # -- opening and closing (vfio_df_open, vfio_df_close) --------------------------------------------

    def df_open(self, current: "Task") -> None:
        """vfio_df_open(): only the group path may open a device twice."""
        device = self.device
        if device.open_count != 0 and self.group is None:
            raise fail(EINVAL, f"{device.name} is already open (the cdev cannot share a device)")
        device.open_count += 1
        if device.open_count == 1:
            try:
                self._first_open(current)
            except KernelError:
                device.open_count -= 1
                raise

    def _first_open(self, current: "Task") -> None:
        """vfio_df_device_first_open(): bind to the iommufd, or use the group's
        container; then the driver's open_device."""
        from .iommufd import vfio_df_iommufd_bind, vfio_df_iommufd_unbind
        device = self.device
        if self.iommufd is not None:
            vfio_df_iommufd_bind(self, current)
        else:
            assert self.group is not None
            self.group.use_container()
        try:
            device.ops.open_device(current)
        except Exception:
            if self.iommufd is not None:
                vfio_df_iommufd_unbind(self, current)
            else:
                assert self.group is not None
                self.group.unuse_container(current)
            raise

    def df_close(self, current: "Task") -> None:
        """vfio_df_close(); the last close is vfio_df_device_last_close()."""
        from .iommufd import vfio_df_iommufd_unbind
        device = self.device
        if device.open_count == 1:
            device.ops.close_device(current)
            if self.iommufd is not None:
                vfio_df_iommufd_unbind(self, current)
            else:
                assert self.group is not None
                self.group.unuse_container(current)
        device.open_count -= 1

    @classmethod
    def open(cls, device: VfioDevice, group: "VfioGroup", current: "Task") -> "DeviceFile":
        """vfio_device_open_file() -> vfio_df_group_open()"""
        if not group.has_iommu():
            raise fail(EINVAL, f"group {group.id} is not in a container or an iommufd")
        df = cls(device, group)
        df.iommufd = group.iommufd
        df.df_open(current)
        if df.iommufd is not None and device.open_count == 1:
            from .iommufd import vfio_iommufd_compat_attach_ioas
            try:
                vfio_iommufd_compat_attach_ioas(device, df.iommufd, current)
            except KernelError:
                df.df_close(current)
                raise
        return df

    def release(self, current: "Task") -> None:
        """vfio_device_fops_release()"""
        group = self.group
        if group is None:
            from .device_cdev import vfio_df_unbind_iommufd
            vfio_df_unbind_iommufd(self, current)
            return
        self.df_close(current)
        self.iommufd = None

    # -- file operations -------------------------------------------------------------------------------

    def _check_access(self) -> None:
        if not self.access_granted:
            raise fail(EINVAL, f"{self.name}: the device is not bound to an iommufd yet (VFIO_DEVICE_BIND_IOMMUFD "
                               f"first)")

    def ioctl(self, current: "Task", cmd: int, arg: int) -> int:
        """vfio_device_fops_unl_ioctl(): BIND_IOMMUFD first, then nothing until
        access is granted; the cdev-only attach/detach, features, the driver."""
        config = self.device.group.vfio.kernel.config
        if cmd == uapi.VFIO_DEVICE_BIND_IOMMUFD:
            if not config.vfio_device_cdev:
                raise fail(ENOTTY, "VFIO_DEVICE_BIND_IOMMUFD: this kernel has no VFIO device cdev "
                                   "(# CONFIG_VFIO_DEVICE_CDEV is not set)")
            from .device_cdev import vfio_df_ioctl_bind_iommufd
            return vfio_df_ioctl_bind_iommufd(self, current, arg)
        self._check_access()
        if config.vfio_device_cdev and self.group is None:
            from .device_cdev import vfio_df_ioctl_attach_pt, vfio_df_ioctl_detach_pt
            if cmd == uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
                return vfio_df_ioctl_attach_pt(self, current, arg)
            if cmd == uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT:
                return vfio_df_ioctl_detach_pt(self, current, arg)
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
        self._check_access()
        self.device.ops.mmap_check(current, offset, length, prot, shared)

    def mmio(self, current: "Task", offset: int, size: int, value: int | None) -> int:
        return self.device.ops.mmio(current, offset, size, value)

    def mmio_store_fn(self, offset: int, size: int) -> Callable[[int], bool] | None:
        return self.device.ops.mmio_store_fn(offset, size)

    def mmio_load_fn(self, offset: int, size: int) -> Callable[[], int | None] | None:
        return self.device.ops.mmio_load_fn(offset, size)

    def mmap_posted_writes(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.device.ops.mmap_posted_writes(offset, length)

    def mmap_live(self) -> bool:
        return self.device.ops.mmap_live()

    def mmap_live_check(self) -> Callable[[], bool]:
        return self.device.ops.mmap_live_check()

    def mmap_pages(self, offset: int) -> "tuple[PhysicalPages, int]":
        return self.device.ops.mmap_pages(offset)

    def mmap_fault(self, current: "Task", offset: int, write: bool) -> None:
        self.device.ops.mmap_fault(current, offset, write)

    def read(self, current: "Task", count: int, pos: int) -> bytes:
        self._check_access()
        return self.device.ops.read(current, count, pos)

    def write(self, current: "Task", data: bytes, pos: int) -> int:
        self._check_access()
        return self.device.ops.write(current, data, pos)

    def describe(self) -> dict[str, Any]:
        return {"device": self.device.name, "via": "group" if self.group is not None else "cdev",
                "bound": self.access_granted, "devid": self.devid or None}
