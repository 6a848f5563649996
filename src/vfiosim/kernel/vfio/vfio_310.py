"""The VFIO core of Linux 3.10 (drivers/vfio/vfio.c), where it differs from 6.12.

The 3.10 core counted users differently: a device fd does not pin the group
file but counts as a user of the container (every open calls the bus
driver's open), the group leaves its container when the last of them goes
(vfio_group_try_dissolve_container()), a group whose container is still set
cannot be reopened, GET_STATUS reports viability from the drivers bound,
SET_CONTAINER and GET_DEVICE_FD check in another order, and there is no
VFIO_DEVICE_FEATURE.  Each class overrides only what 3.10 did otherwise.
"""

from __future__ import annotations

from errno import EBUSY, EINVAL
from typing import TYPE_CHECKING

from ...uapi import vfio as uapi
from ..errors import fail
from ..uaccess import get_user_s32
from .container import ContainerFile
from .device import DeviceFile, VfioDevice
from .group import GroupFile, VfioGroup

if TYPE_CHECKING:
    from ..task import Task


class VfioGroup310(VfioGroup):
    def use_container(self) -> None:
        if self.container is None or self.container.iommu_driver is None:
            raise fail(EINVAL, f"group {self.id}: the container has no IOMMU driver (VFIO_SET_IOMMU first)")
        self.container_users += 1

    def unuse_container(self, current: "Task") -> None:
        self.container_users -= 1
        if self.container_users == 0:
            # vfio_group_try_dissolve_container() from the device release.
            self.detach(current)


class GroupFile310(GroupFile):
    @classmethod
    def open(cls, group: VfioGroup, f_flags: int) -> "GroupFile":
        if group.opened_file is None and group.container is not None:
            raise fail(EBUSY, f"/dev/vfio/{group.id}: devices of the previous open still use the container")
        return super().open(group, f_flags)

    def release(self, current: "Task") -> None:
        g = self.group
        g.opened_file = None
        if g.container is not None:
            g.container_users -= 1
            if g.container_users == 0:
                g.detach(current)

    def _status_flags(self) -> int:
        g = self.group
        return ((uapi.VFIO_GROUP_FLAGS_VIABLE if g.viable() else 0)
                | (uapi.VFIO_GROUP_FLAGS_CONTAINER_SET if g.container is not None else 0))

    def _set_container(self, current: "Task", arg: int) -> int:
        """3.10 vfio_group_set_container(): EINVAL for everything."""
        g = self.group
        fd = get_user_s32(current, arg)
        if g.container_users:
            raise fail(EINVAL, f"group {g.id} is already in a container")
        if fd < 0:
            raise fail(EINVAL, f"VFIO_GROUP_SET_CONTAINER: fd {fd} is negative")
        file = current.files.get(fd)
        if not isinstance(file, ContainerFile):
            raise fail(EINVAL, f"VFIO_GROUP_SET_CONTAINER: fd {fd} is a {file.kind}, not a VFIO container")
        file.container.attach_group(g, current)
        return 0

    def _device_for_fd(self, current: "Task", name: str) -> VfioDevice:
        """3.10 checked the container and its IOMMU before the name."""
        g = self.group
        if g.container_users == 0 or g.container is None or g.container.iommu_driver is None or not g.viable():
            raise fail(EINVAL, f"group {g.id}: set a container and its IOMMU before asking for devices")
        return g.device_by_name(name)


class DeviceFile310(DeviceFile):
    @classmethod
    def open(cls, device: VfioDevice, group: VfioGroup, current: "Task") -> "DeviceFile":
        """Every open calls the bus driver's open; each fd is a container user."""
        device.ops.open_device(current)
        device.open_count += 1
        group.container_users += 1
        return cls(device, group)

    def release(self, current: "Task") -> None:
        dev = self.device
        dev.open_count -= 1
        if dev.open_count == 0:
            dev.ops.close_device(current)
        assert self.group is not None              # 3.10 has no cdev: every fd came through its group
        self.group.unuse_container(current)

    def ioctl(self, current: "Task", cmd: int, arg: int) -> int:
        """No VFIO_DEVICE_FEATURE in the core: every ioctl is the driver's."""
        return self.device.ops.ioctl(current, cmd, arg)
