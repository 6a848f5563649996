"""iommufd (drivers/iommu/iommufd/): /dev/iommu, and /dev/vfio/vfio with
CONFIG_IOMMUFD_VFIO_CONTAINER.  See docs/iommufd.md.

=====================  =============================================================
main.py                the context, its object table, ioctl dispatch, IOMMU_OPTION
ioas.py                IOAS objects: ALLOC, IOVA_RANGES, ALLOW_IOVAS, MAP, COPY, UNMAP
io_pagetable.py        an IOAS's areas, allowed and reserved IOVA, its domains
pages.py               pinned user pages shared by areas, and their accounting
hw_pagetable.py        HWPTs (IOMMU domains), dirty tracking, the fault queue
device.py              bound devices, attach/replace/detach, IOMMU_GET_HW_INFO
vfio_compat.py         the VFIO Type1 container ioctls on an iommufd
dirty_bitmap.py        IOMMU_HWPT_GET_DIRTY_BITMAP's user bitmap (iova_bitmap.c)
=====================  =============================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..fs import DeviceNode
from .main import IommufdCtx, IommufdFile

if TYPE_CHECKING:
    from ..kernel import Kernel

__all__ = ["IommufdCtx", "IommufdFile", "iommu_node", "vfio_container_node"]


def iommu_node(kernel: "Kernel") -> DeviceNode:
    """/dev/iommu: misc device "iommu", mode 0660 (iommu_misc_dev)."""
    return DeviceNode("/dev/iommu", lambda current, flags: IommufdFile(kernel, "/dev/iommu", flags, False),
                      mode=0o660)


def vfio_container_node(kernel: "Kernel") -> DeviceNode:
    """/dev/vfio/vfio served by iommufd (vfio_misc_dev, VFIO_MINOR), mode 0666."""
    return DeviceNode("/dev/vfio/vfio", lambda current, flags: IommufdFile(kernel, "/dev/vfio/vfio", flags, True),
                      mode=0o666)
