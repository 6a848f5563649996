"""VFIO devices and iommufd (drivers/vfio/iommufd.c): the "physical" ops
vfio-pci uses to bind its device to an iommufd and attach it to an IOAS or
HWPT, and the group path's attach to the context's compat IOAS."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import KernelBug
from ..iommufd import device as idevice
from ..iommufd.vfio_compat import compat_ioas_get_id

if TYPE_CHECKING:
    from ..iommufd.main import IommufdCtx
    from ..task import Task
    from .device import DeviceFile, VfioDevice


def _pdev(vdev: "VfioDevice"):  # type: ignore[no-untyped-def]
    pdev = vdev.ops.physical_device()
    if pdev is None:
        raise KernelBug(f"{vdev.name}: a VFIO driver without a physical device cannot bind to an iommufd")
    return pdev


def vfio_df_iommufd_bind(df: "DeviceFile", current: "Task") -> None:
    """vfio_df_iommufd_bind() -> vfio_iommufd_physical_bind()"""
    vdev = df.device
    assert df.iommufd is not None
    idev = idevice.iommufd_device_bind(df.iommufd, _pdev(vdev), current)
    vdev.iommufd_device = idev
    df.devid = idev.id


def vfio_df_iommufd_unbind(df: "DeviceFile", current: "Task") -> None:
    """vfio_df_iommufd_unbind() -> vfio_iommufd_physical_unbind()"""
    vdev = df.device
    idev = vdev.iommufd_device
    if idev is None:
        return
    if vdev.iommufd_attached:
        idevice.iommufd_device_detach(idev)
        vdev.iommufd_attached = False
    idevice.iommufd_device_unbind(idev, current)
    vdev.iommufd_device = None


def vfio_iommufd_physical_attach_ioas(vdev: "VfioDevice", pt_id: int, current: "Task") -> int:
    """vfio_iommufd_physical_attach_ioas(): replace when attached; returns the pt_id."""
    idev = vdev.iommufd_device
    if idev is None:
        raise KernelBug(f"{vdev.name}: attach without a bound iommufd_device")
    if vdev.iommufd_attached:
        pt_id = idevice.iommufd_device_replace(idev, pt_id, current)
    else:
        pt_id = idevice.iommufd_device_attach(idev, pt_id, current)
    vdev.iommufd_attached = True
    return pt_id


def vfio_iommufd_physical_detach_ioas(vdev: "VfioDevice") -> None:
    """vfio_iommufd_physical_detach_ioas()"""
    idev = vdev.iommufd_device
    if idev is None or not vdev.iommufd_attached:
        return
    idevice.iommufd_device_detach(idev)
    vdev.iommufd_attached = False


def vfio_iommufd_compat_attach_ioas(vdev: "VfioDevice", ictx: "IommufdCtx", current: "Task") -> None:
    """vfio_iommufd_compat_attach_ioas(): ENODEV without a compat IOAS."""
    ioas_id = compat_ioas_get_id(ictx)
    vfio_iommufd_physical_attach_ioas(vdev, ioas_id, current)


def vfio_iommufd_device_ictx(vdev: "VfioDevice") -> "IommufdCtx | None":
    idev = vdev.iommufd_device
    return idev.ictx if idev is not None else None


def vfio_iommufd_get_dev_id(vdev: "VfioDevice", ictx: "IommufdCtx") -> int:
    """vfio_iommufd_get_dev_id()"""
    return idevice.vfio_iommufd_get_dev_id(vdev.iommufd_device, _pdev(vdev), ictx)
