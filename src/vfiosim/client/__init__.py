"""vfiosim.client: a Python VFIO library for userspace drivers.

The same code runs on a simulated machine (CI, laptops) and on the host's
real ``/dev/vfio`` (production); the backend is one argument or the
``VFIOSIM_BACKEND`` environment variable (``sim`` or ``real``).  The IOMMU
interface is chosen the same way: automatically (iommufd's ``/dev/iommu``
where the kernel has it, else ``/dev/vfio/vfio``), or ``iommu=`` /
:func:`use_iommu` / ``VFIOSIM_IOMMU`` (``iommufd``, ``type1v2``, ...)::

    from vfiosim import client

    with client.open_device("1234:11e8") as dev:        # by vendor:device or PCI address
        bar0 = dev.bar(0)
        bar0.write32(0x04, 0x12345678)
        assert bar0.read32(0x04) == 0xEDCBA987          # edu's liveness check
        with dev.container.dma_alloc(4096, max_iova=0x0FFFFFFF) as buf:
            buf.array()[:] = 7                          # a NumPy view of the DMA buffer
            ...                                         # program the device with buf.iova

Objects are context managers and release in the kernel's order.  Failing
calls raise :class:`VfioError` (an ``OSError``) with the errno, the object,
the call, the likely cause and the fix.  See docs/client.md and
docs/tutorial.md.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ..uapi import vfio as uapi
from .backend import (BACKEND_ENV, MACHINE_ENV, Backend, HostMemory, HostOs, RealBackend, SimBackend, get_backend,
                      set_default_backend, use_backend)
from .caps import (Capability, DmaAvailCap, IovaRangeCap, MigrationCap, MsixMappableCap, RegionTypeCap,
                   SparseMmapCap, parse_caps)
from .container import (AUTO_ORDER, IOMMU_ENV, IOMMU_TYPES, IOMMUFD, Container, DdwInfo, Group, IommuInfo,
                        default_iommu, iommu_name, set_default_iommu, use_iommu)
from .device import IRQ_KINDS, Device, IoEventFd, Irq, IrqInfo, Region
from .dma import DmaBuffer, DmaMapping
from .errors import VfioError, VfioUsageError
from .iova import IovaAllocator, IovaRange
from .sysfs import PciDeviceInfo, normalize_bdf, select_devices

if TYPE_CHECKING:
    from ..machine import Machine, Process

__all__ = [
    "Backend", "SimBackend", "RealBackend", "HostOs", "HostMemory", "get_backend", "use_backend",
    "set_default_backend", "BACKEND_ENV", "MACHINE_ENV",
    "Container", "Group", "Device", "Region", "Irq", "IrqInfo", "IoEventFd", "DmaBuffer", "DmaMapping", "IommuInfo",
    "DdwInfo",
    "IovaRange", "IovaAllocator", "PciDeviceInfo", "VfioError", "VfioUsageError",
    "Capability", "SparseMmapCap", "RegionTypeCap", "MsixMappableCap", "IovaRangeCap", "MigrationCap", "DmaAvailCap",
    "parse_caps", "IOMMU_TYPES", "AUTO_ORDER", "IRQ_KINDS", "iommu_name", "IOMMUFD", "IOMMU_ENV", "use_iommu",
    "set_default_iommu", "default_iommu",
    "pci_devices", "find_devices", "find_device", "open_device", "uapi",
]


def pci_devices(backend: "Backend | str | Process | Machine | None" = None) -> list[PciDeviceInfo]:
    """Every PCI device of the backend's sysfs view."""
    return get_backend(backend).pci_devices()


def find_devices(backend: "Backend | str | Process | Machine | None" = None, *, bdf: str | None = None,
                 ids: str | None = None, vendor: int | None = None, device: int | None = None,
                 group: int | None = None, driver: str | None = None) -> list[PciDeviceInfo]:
    """Devices matching all the criteria: PCI address, ``"vendor:device"``,
    vendor, device, IOMMU group, bound driver."""
    return select_devices(get_backend(backend).pci_devices(), bdf=bdf, ids=ids, vendor=vendor, device=device,
                          group=group, driver=driver)


def find_device(backend: "Backend | str | Process | Machine | None" = None, **criteria: object) -> PciDeviceInfo:
    """The one device matching ``criteria`` (as :func:`find_devices`)."""
    b = get_backend(backend)
    found = find_devices(b, **criteria)  # type: ignore[arg-type]
    if len(found) != 1:
        what = ", ".join(f"{k}={v!r}" for k, v in criteria.items()) or "no criteria"
        listing = "; ".join(str(d) for d in b.pci_devices()) or "none"
        raise VfioUsageError(errno.ENODEV if not found else errno.EINVAL, "find_device()", f"find_device({what})",
                             detail=f"{len(found)} devices match" + (f": {', '.join(d.bdf for d in found)}" if found
                                                                     else ""),
                             cause=f"the {b.name} backend has: {listing}",
                             fix="narrow the criteria (a PCI address names exactly one device)")
    return found[0]


def open_device(name: str, backend: "Backend | str | Process | Machine | None" = None, *,
                iommu: str | int | None = None, auto: bool = True, mmap: bool = True) -> Device:
    """Open one device in a container of its own: ``name`` is a PCI address
    or ``vendor:device``.  ``dev.container`` maps its DMA; closing the
    device closes the container too."""
    c = Container(backend, iommu=iommu, auto=auto)
    try:
        dev = c.open_device(name)
    except BaseException:
        c.close()
        raise
    dev.mmap = mmap
    dev._owned_container = c
    return dev
