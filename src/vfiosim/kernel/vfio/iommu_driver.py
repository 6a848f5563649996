"""The interface between the VFIO core and IOMMU backends.

Shaped like the kernel's ``struct vfio_iommu_driver_ops``
(drivers/vfio/vfio.h): ``open``, ``release``, ``ioctl``, ``attach_group``
and ``detach_group``.  The one difference is that the calling task, which
the kernel reads from ``current``, is passed explicitly.

``ioctl(None, VFIO_CHECK_EXTENSION, arg)`` is how the core asks a driver
about an extension before any container uses it; drivers answer it without
iommu data, as in the kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from ..iommu.iommu import IommuGroup
    from ..task import Task


class VfioIommuDriver:
    """Base class of IOMMU backends (vfio_iommu_driver_ops)."""

    name = "vfio-iommu"
    # The module that registers it: /sys/module/<module> (not part of the kernel interface).
    module = ""

    def module_parameters(self) -> dict[str, str]:
        """Its module's parameters as /sys/module/<module>/parameters shows them."""
        return {}

    def open(self, arg: int, current: "Task") -> Any:
        """Create the backend's per-container data for IOMMU type ``arg``."""
        raise NotImplementedError

    def release(self, data: Any, current: "Task") -> None:
        """The container lost its last group: free everything."""
        raise NotImplementedError

    def ioctl(self, data: Any, cmd: int, arg: int, current: "Task") -> int:
        """Container ioctls the core does not handle itself (data may be None
        for VFIO_CHECK_EXTENSION)."""
        raise NotImplementedError

    def attach_group(self, data: Any, group: "IommuGroup", current: "Task") -> None:
        raise NotImplementedError

    def detach_group(self, data: Any, group: "IommuGroup", current: "Task") -> None:
        raise NotImplementedError

    def describe(self, data: Any) -> dict[str, Any]:
        """State for `vfiosim topology` (not part of the kernel interface)."""
        return {}


class IommuDriverRegistry:
    """vfio.iommu_drivers_list: drivers are added at the head, as list_add() does."""

    def __init__(self) -> None:
        self._drivers: list[VfioIommuDriver] = []

    def register(self, driver: VfioIommuDriver) -> None:
        if any(d is driver for d in self._drivers):
            raise ValueError(f"IOMMU driver {driver.name} is already registered")
        self._drivers.insert(0, driver)

    def unregister(self, driver: VfioIommuDriver) -> None:
        self._drivers = [d for d in self._drivers if d is not driver]

    def __iter__(self) -> Iterator[VfioIommuDriver]:
        return iter(list(self._drivers))

    def names(self) -> list[str]:
        return [d.name for d in self._drivers]
