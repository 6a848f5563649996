"""The VFIO subsystem: registered IOMMU drivers, groups and their device nodes."""

from __future__ import annotations

from errno import ENODEV
from typing import TYPE_CHECKING

from ..errors import fail
from ..fs import DeviceNode, File
from .container import ContainerFile
from .device import VfioDevice, VfioDeviceOps
from .group import GroupFile, VfioGroup
from .iommu_driver import IommuDriverRegistry

if TYPE_CHECKING:
    from ..iommu.iommu import IommuGroup
    from ..kernel import Kernel
    from ..task import Task


class Vfio:
    """State of drivers/vfio: one instance per simulated kernel.

    ``legacy`` selects the 3.10 core rules (see group.py).
    """

    def __init__(self, kernel: "Kernel", legacy: bool) -> None:
        self.kernel = kernel
        self.legacy = legacy
        self.iommu_drivers = IommuDriverRegistry()
        self.groups: dict[int, VfioGroup] = {}
        # vfio.device_ida: vfio<N>, in the order devices register.
        self.devices: list[VfioDevice] = []

    def container_node(self) -> DeviceNode:
        """/dev/vfio/vfio: mode 0666, anybody may open a container."""
        return DeviceNode("/dev/vfio/vfio", lambda current, flags: ContainerFile(self, flags), mode=0o666)

    def register_device(self, name: str, iommu_group: "IommuGroup", ops: VfioDeviceOps,
                        mode: int = 0o600, uid: int = 0, gid: int = 0) -> VfioDevice:
        """vfio_register_group_dev(): the group and its /dev/vfio/<N> node
        appear (CONFIG_VFIO_GROUP), and the device's cdev
        /dev/vfio/devices/vfio<index> (CONFIG_VFIO_DEVICE_CDEV); both get the
        machine file's owner and mode."""
        config = self.kernel.config
        group = self.groups.get(iommu_group.id)
        if group is None:
            group = self.groups[iommu_group.id] = VfioGroup(self, iommu_group)
            if config.vfio_group:
                path = f"/dev/vfio/{iommu_group.id}"
                self.kernel.dev_nodes[path] = DeviceNode(path, self._group_opener(group), mode=mode, uid=uid,
                                                         gid=gid)
        device = VfioDevice(name, group, ops, index=len(self.devices))
        self.devices.append(device)
        if config.vfio_device_cdev:
            from .device_cdev import vfio_device_fops_cdev_open
            path = f"/dev/vfio/devices/{device.cdev_name}"
            self.kernel.dev_nodes[path] = DeviceNode(path, lambda current, flags, d=device:
                                                     vfio_device_fops_cdev_open(d), mode=mode, uid=uid, gid=gid)
        return device

    def _group_opener(self, group: VfioGroup):
        def opener(current: "Task", flags: int) -> File:
            if not group.devices:
                raise fail(ENODEV, f"group {group.id} has no devices any more")
            return GroupFile.open(group, flags)
        return opener
