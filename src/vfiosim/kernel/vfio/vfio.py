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

    def container_node(self) -> DeviceNode:
        """/dev/vfio/vfio: mode 0666, anybody may open a container."""
        return DeviceNode("/dev/vfio/vfio", lambda current, flags: ContainerFile(self, flags), mode=0o666)

    def register_device(self, name: str, iommu_group: "IommuGroup", ops: VfioDeviceOps,
                        mode: int = 0o600, uid: int = 0, gid: int = 0) -> VfioDevice:
        """vfio_register_group_dev(): the group and its /dev/vfio/<N> node appear."""
        group = self.groups.get(iommu_group.id)
        if group is None:
            group = self.groups[iommu_group.id] = VfioGroup(self, iommu_group)
            path = f"/dev/vfio/{iommu_group.id}"
            self.kernel.dev_nodes[path] = DeviceNode(path, self._group_opener(group), mode=mode, uid=uid, gid=gid)
        return VfioDevice(name, group, ops)

    def _group_opener(self, group: VfioGroup):
        def opener(current: "Task", flags: int) -> File:
            if not group.devices:
                raise fail(ENODEV, f"group {group.id} has no devices any more")
            return GroupFile.open(group, flags)
        return opener
