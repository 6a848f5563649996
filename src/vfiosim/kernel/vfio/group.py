"""VFIO groups, ``/dev/vfio/<N>`` (drivers/vfio/group.c, Linux 6.12).

A group file is the user's handle on an IOMMU group: it joins a container,
and hands out device fds once the container has an IOMMU.  One open file
per group at a time.  Device fds keep the group file alive, so the group
leaves its container only when the group file and all its devices are
closed.  The 3.10 core counted differently: vfio_310.py.

Linux 6.2+ with CONFIG_IOMMUFD also takes an iommufd where a container fd
goes (VFIO_GROUP_SET_CONTAINER): the group then has an iommufd context
instead of a container, its devices are bound to the context when they are
opened and attached to its compat IOAS, and they do not keep the group file
alive.  While any device of the group is bound through its cdev the group
cannot be opened (EBUSY), and while the group is open no cdev can be bound.
"""

from __future__ import annotations

from errno import EBADFD, EBUSY, EINVAL, ENODEV
from typing import TYPE_CHECKING

from ...uapi import vfio as uapi
from ..errors import KernelError, fail
from ..fs import File
from ..uaccess import copy_struct_from_user, copy_struct_to_user, get_user_s32, strndup_user
from .container import ContainerFile, VfioContainer

if TYPE_CHECKING:
    from ..iommu.iommu import IommuGroup
    from ..iommufd.main import IommufdCtx
    from ..task import Task
    from .device import VfioDevice
    from .vfio import Vfio

VFIO_IOMMU = 0          # enum vfio_group_type


class VfioGroup:
    """``struct vfio_group``"""

    def __init__(self, vfio: "Vfio", iommu_group: "IommuGroup") -> None:
        self.vfio = vfio
        self.iommu_group = iommu_group
        self.devices: list["VfioDevice"] = []
        self.opened_file: "GroupFile | None" = None
        self.container: VfioContainer | None = None
        self.container_users = 0
        self.type = VFIO_IOMMU
        self.iommufd: "IommufdCtx | None" = None
        self.cdev_device_open_cnt = 0

    @property
    def id(self) -> int:
        return self.iommu_group.id

    def has_iommu(self) -> bool:
        """vfio_group_has_iommu()"""
        return self.container is not None or self.iommufd is not None

    def viable(self) -> bool:
        return not self.iommu_group.host_driver_owned()

    def device_by_name(self, name: str) -> "VfioDevice":
        for dev in self.devices:
            if dev.name == name:
                return dev
        raise fail(ENODEV, f"VFIO_GROUP_GET_DEVICE_FD: no device {name!r} in group {self.id} "
                           f"(it has {', '.join(d.name for d in self.devices) or 'none'})")

    # -- container use by devices (vfio_group_use_container / unuse) ---------------

    def use_container(self) -> None:
        """vfio_group_use_container(): an open device pins the group file."""
        if self.container is None or self.container.iommu_driver is None:
            raise fail(EINVAL, f"group {self.id}: the container has no IOMMU driver (VFIO_SET_IOMMU first)")
        self.container_users += 1
        assert self.opened_file is not None
        self.opened_file.get()

    def unuse_container(self, current: "Task") -> None:
        self.container_users -= 1
        assert self.opened_file is not None
        self.opened_file.put(current)

    def detach(self, current: "Task") -> None:
        assert self.container is not None
        self.container.detach_group(self, current)


class GroupFile(File):
    """An open /dev/vfio/<N>."""

    kind = "vfio-group"

    def __init__(self, group: VfioGroup, f_flags: int) -> None:
        super().__init__(f"/dev/vfio/{group.id}", f_flags)
        self.group = group

    @classmethod
    def open(cls, group: VfioGroup, f_flags: int) -> "GroupFile":
        """vfio_group_fops_open(): one open file per group."""
        if group.cdev_device_open_cnt:
            raise fail(EBUSY, f"/dev/vfio/{group.id}: {group.cdev_device_open_cnt} of its device(s) are bound to an "
                              f"iommufd through their cdev (/dev/vfio/devices/); a device is used through its group "
                              f"or its cdev, not both")
        if group.opened_file is not None:
            raise fail(EBUSY, f"/dev/vfio/{group.id} is already open (one open file per group)")
        file = cls(group, f_flags)
        group.opened_file = file
        return file

    def release(self, current: "Task") -> None:
        """vfio_group_fops_release()"""
        g = self.group
        if g.container is not None:
            g.detach(current)
        if g.iommufd is not None:
            from ..iommufd.main import iommufd_ctx_put
            iommufd_ctx_put(g.iommufd, current)
            g.iommufd = None
        g.opened_file = None

    def ioctl(self, current: "Task", cmd: int, arg: int) -> int:
        """vfio_group_fops_unl_ioctl()"""
        if cmd == uapi.VFIO_GROUP_GET_DEVICE_FD:
            return self._get_device_fd(current, arg)
        if cmd == uapi.VFIO_GROUP_GET_STATUS:
            return self._get_status(current, arg)
        if cmd == uapi.VFIO_GROUP_SET_CONTAINER:
            return self._set_container(current, arg)
        if cmd == uapi.VFIO_GROUP_UNSET_CONTAINER:
            return self._unset_container(current)
        return super().ioctl(current, cmd, arg)

    # -- VFIO_GROUP_GET_STATUS --------------------------------------------------------

    def _get_status(self, current: "Task", arg: int) -> int:
        minsz = uapi.offsetofend(uapi.vfio_group_status, "flags")
        status = copy_struct_from_user(current, arg, uapi.vfio_group_status, minsz)
        if status.argsz < minsz:
            raise fail(EINVAL, f"VFIO_GROUP_GET_STATUS: argsz {status.argsz} < {minsz}")
        status.flags = self._status_flags()
        copy_struct_to_user(current, arg, status, minsz)
        return 0

    def _status_flags(self) -> int:
        g = self.group
        if g.has_iommu():
            # With an iommufd, DMA ownership is claimed when a device is
            # opened: VIABLE here, yet GET_DEVICE_FD can still fail (EPERM).
            return uapi.VFIO_GROUP_FLAGS_CONTAINER_SET | uapi.VFIO_GROUP_FLAGS_VIABLE
        return 0 if g.iommu_group.dma_owner_claimed() else uapi.VFIO_GROUP_FLAGS_VIABLE

    # -- VFIO_GROUP_SET_CONTAINER / UNSET_CONTAINER -------------------------------------

    def _set_container(self, current: "Task", arg: int) -> int:
        """vfio_group_ioctl_set_container()"""
        g = self.group
        fd = get_user_s32(current, arg)
        file = current.files.get(fd)
        if g.has_iommu():
            raise fail(EINVAL, f"group {g.id} is already in a container or an iommufd "
                               f"(VFIO_GROUP_UNSET_CONTAINER first)")
        if not isinstance(file, ContainerFile):
            # iommufd_ctx_from_file(): an iommufd takes the container's place.
            from ..iommufd.main import IommufdFile, iommufd_ctx_from_file, iommufd_ctx_put
            from ..iommufd.vfio_compat import compat_ioas_create
            if isinstance(file, IommufdFile):
                ictx = iommufd_ctx_from_file(file)
                try:
                    compat_ioas_create(ictx)
                except KernelError:
                    iommufd_ctx_put(ictx, current)
                    raise
                g.iommufd = ictx
                return 0
            raise fail(EBADFD, f"VFIO_GROUP_SET_CONTAINER: fd {fd} is a {file.kind}, not a VFIO container or "
                               f"an iommufd")
        file.container.attach_group(g, current)
        return 0

    def _unset_container(self, current: "Task") -> int:
        """vfio_group_ioctl_unset_container(): an iommufd is let go even with
        devices open (they stay bound to it)."""
        g = self.group
        if not g.has_iommu():
            raise fail(EINVAL, f"group {g.id} is not in a container")
        if g.container is not None:
            if g.container_users != 1:
                raise fail(EBUSY, f"group {g.id}: {g.container_users - 1} device(s) still open; close them first")
            g.detach(current)
        if g.iommufd is not None:
            from ..iommufd.main import iommufd_ctx_put
            iommufd_ctx_put(g.iommufd, current)
            g.iommufd = None
        return 0

    # -- VFIO_GROUP_GET_DEVICE_FD -------------------------------------------------------

    def _get_device_fd(self, current: "Task", arg: int) -> int:
        """vfio_group_ioctl_get_device_fd()"""
        g = self.group
        name = strndup_user(current, arg, current.mm.page_size)
        device = self._device_for_fd(current, name)
        file = g.vfio.rules.device_file.open(device, g, current)
        return current.files.install(file, cloexec=True)

    def _device_for_fd(self, current: "Task", name: str) -> "VfioDevice":
        g = self.group
        device = g.device_by_name(name)
        current.files.check_free()
        if not g.has_iommu():
            raise fail(EINVAL, f"group {g.id} is not in a container (VFIO_GROUP_SET_CONTAINER first)")
        return device
