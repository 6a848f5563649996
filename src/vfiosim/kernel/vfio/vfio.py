"""The VFIO subsystem: registered IOMMU drivers, groups and their device nodes."""

from __future__ import annotations

from dataclasses import dataclass
from errno import ENODEV
from typing import TYPE_CHECKING, Callable

from ..errors import fail
from ..fs import DeviceNode, File
from .container import ContainerFile
from .device import DeviceFile, VfioDevice, VfioDeviceOps
from .group import GroupFile, VfioGroup
from .vfio_310 import DeviceFile310, GroupFile310, VfioGroup310
from .iommu_driver import IommuDriverRegistry

if TYPE_CHECKING:
    from ..iommu.iommu import IommuGroup
    from ..kernel import Kernel
    from ..task import Task


@dataclass(frozen=True)
class VfioCoreRules:
    """How one kernel version's VFIO core behaves: the classes of its group
    and device objects (6.12: group.py and device.py; 3.10: vfio_310.py)."""

    version: str
    group: type[VfioGroup]
    group_file: type[GroupFile]
    device_file: type[DeviceFile]


VFIO_CORE_6_12 = VfioCoreRules("6.12", VfioGroup, GroupFile, DeviceFile)
VFIO_CORE_3_10 = VfioCoreRules("3.10", VfioGroup310, GroupFile310, DeviceFile310)


class Vfio:
    """State of drivers/vfio: one instance per simulated kernel."""

    def __init__(self, kernel: "Kernel", rules: VfioCoreRules) -> None:
        self.kernel = kernel
        self.rules = rules
        self.iommu_drivers = IommuDriverRegistry()
        self.groups: dict[int, VfioGroup] = {}
        # vfio.device_ida: vfio<N>, in the order devices register (never unregistered here).
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
            group = self.groups[iommu_group.id] = self.rules.group(self, iommu_group)
            if config.vfio_group:
                path = f"/dev/vfio/{iommu_group.id}"
                self.kernel.dev_nodes[path] = DeviceNode(path, self._group_opener(group), mode=mode, uid=uid,
                                                         gid=gid)
        device = VfioDevice(name, group, ops, index=len(self.devices))
        self.devices.append(device)
        if config.vfio_device_cdev:
            from .device_cdev import vfio_device_fops_cdev_open
            path = f"/dev/vfio/devices/{device.cdev_name}"

            def cdev_opener(current: "Task", flags: int, d: VfioDevice = device) -> File:
                return vfio_device_fops_cdev_open(d)
            self.kernel.dev_nodes[path] = DeviceNode(path, cdev_opener, mode=mode, uid=uid, gid=gid)
        return device

    def _group_opener(self, group: VfioGroup) -> Callable[["Task", int], File]:
        def opener(current: "Task", flags: int) -> File:
            if not group.devices:
                raise fail(ENODEV, f"group {group.id} has no devices any more")
            return self.rules.group_file.open(group, flags)
        return opener
