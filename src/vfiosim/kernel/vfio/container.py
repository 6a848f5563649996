"""The VFIO container, ``/dev/vfio/vfio`` (drivers/vfio/container.c).

A container is an IOMMU context: groups join it with
VFIO_GROUP_SET_CONTAINER, then VFIO_SET_IOMMU picks a backend, which
attaches every group.  Container ioctls the core does not know are passed
to the backend.  The container outlives its file while groups hold it; when
its last group leaves, the backend is released and the container returns
to having no IOMMU.
"""

from __future__ import annotations

from errno import EINVAL, ENODEV
from typing import TYPE_CHECKING, Any

from ...uapi import vfio as uapi
from ..errors import KernelError, fail
from ..fs import File
from .iommu_driver import VfioIommuDriver

# What vfio_fops_unl_ioctl() answers itself; every other command goes to the driver.
_CONTAINER_IOCTLS = frozenset((uapi.VFIO_GET_API_VERSION, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_SET_IOMMU))

if TYPE_CHECKING:
    from ..task import Task
    from .group import VfioGroup
    from .vfio import Vfio


class VfioContainer:
    """``struct vfio_container``: refcounted by its file and by each group."""

    _next_id = 0

    def __init__(self, vfio: "Vfio") -> None:
        self.vfio = vfio
        self.group_list: list["VfioGroup"] = []
        self.iommu_driver: VfioIommuDriver | None = None
        self.iommu_data: Any = None
        self._refs = 1
        VfioContainer._next_id += 1
        self.id = VfioContainer._next_id

    def get(self) -> None:
        self._refs += 1

    def put(self) -> None:
        self._refs -= 1

    # -- VFIO_CHECK_EXTENSION -----------------------------------------------------

    def check_extension(self, arg: int, current: "Task") -> int:
        """vfio_container_ioctl_check_extension(): no driver set, first positive
        answer of any registered driver; with a driver, only its answer."""
        if self.iommu_driver is not None:
            return self.iommu_driver.ioctl(self.iommu_data, uapi.VFIO_CHECK_EXTENSION, arg, current)
        ret = 0
        for driver in self.vfio.iommu_drivers:
            ret = driver.ioctl(None, uapi.VFIO_CHECK_EXTENSION, arg, current)
            if ret > 0:
                break
        return ret

    # -- VFIO_SET_IOMMU -----------------------------------------------------------

    def set_iommu(self, arg: int, current: "Task") -> int:
        """vfio_ioctl_set_iommu(): try each driver that claims the type."""
        if not self.group_list:
            raise fail(EINVAL, "VFIO_SET_IOMMU: the container has no group yet (VFIO_GROUP_SET_CONTAINER first)")
        if self.iommu_driver is not None:
            raise fail(EINVAL, f"VFIO_SET_IOMMU: the container already uses {self.iommu_driver.name}")
        error = fail(ENODEV, f"VFIO_SET_IOMMU: no IOMMU driver in this kernel supports type {arg}")
        for driver in self.vfio.iommu_drivers:
            if driver.ioctl(None, uapi.VFIO_CHECK_EXTENSION, arg, current) <= 0:
                continue
            try:
                data = driver.open(arg, current)
            except KernelError as exc:
                error = exc
                continue
            try:
                self._attach_groups(driver, data, current)
            except KernelError as exc:
                driver.release(data, current)
                error = exc
                continue
            self.iommu_driver = driver
            self.iommu_data = data
            return 0
        raise error

    def _attach_groups(self, driver: VfioIommuDriver, data: Any, current: "Task") -> None:
        """__vfio_container_attach_groups(): all or nothing."""
        done: list["VfioGroup"] = []
        try:
            for group in self.group_list:
                driver.attach_group(data, group.iommu_group, current)
                done.append(group)
        except KernelError:
            for group in reversed(done):
                driver.detach_group(data, group.iommu_group, current)
            raise

    # -- groups joining and leaving ---------------------------------------------------

    def attach_group(self, group: "VfioGroup", current: "Task") -> None:
        """vfio_container_attach_group(): claim DMA ownership, then let the
        backend (if one is set) take the group."""
        group.iommu_group.claim_dma_owner(group)
        if self.iommu_driver is not None:
            try:
                self.iommu_driver.attach_group(self.iommu_data, group.iommu_group, current)
            except KernelError:
                group.iommu_group.release_dma_owner()
                raise
        group.container = self
        group.container_users = 1
        self.group_list.append(group)
        self.get()

    def detach_group(self, group: "VfioGroup", current: "Task") -> None:
        """vfio_group_detach_container(): the last group out releases the backend."""
        driver = self.iommu_driver
        if driver is not None:
            driver.detach_group(self.iommu_data, group.iommu_group, current)
        group.iommu_group.release_dma_owner()
        group.container = None
        group.container_users = 0
        self.group_list.remove(group)
        if driver is not None and not self.group_list:
            driver.release(self.iommu_data, current)
            self.iommu_driver = None
            self.iommu_data = None
        self.put()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "groups": [g.iommu_group.id for g in self.group_list],
                               "iommu": self.iommu_driver.name if self.iommu_driver else None}
        if self.iommu_driver is not None:
            out.update(self.iommu_driver.describe(self.iommu_data))
        return out


class ContainerFile(File):
    """An open /dev/vfio/vfio: each open is a new container (vfio_fops_open)."""

    kind = "vfio-container"

    def __init__(self, vfio: "Vfio", f_flags: int) -> None:
        super().__init__("/dev/vfio/vfio", f_flags)
        self.container = VfioContainer(vfio)

    def ioctl(self, current: "Task", cmd: int, arg: int) -> int:
        """vfio_fops_unl_ioctl()"""
        c = self.container
        if cmd in _CONTAINER_IOCTLS:            # one test for the usual call, which is the driver's
            if cmd == uapi.VFIO_GET_API_VERSION:
                return uapi.VFIO_API_VERSION
            if cmd == uapi.VFIO_CHECK_EXTENSION:
                return c.check_extension(arg, current)
            return c.set_iommu(arg, current)
        driver = c.iommu_driver
        if driver is None:
            name = uapi.ioctl_name_for(cmd, "vfio-container") or f"{cmd:#x}"
            raise fail(EINVAL, f"{name}: the container has no IOMMU driver (VFIO_SET_IOMMU first)")
        return driver.ioctl(c.iommu_data, cmd, arg, current)

    def release(self, current: "Task") -> None:
        self.container.put()
