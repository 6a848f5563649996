"""What the vfio-pci files share (drivers/vfio/pci/vfio_pci_priv.h,
include/linux/vfio_pci_core.h): where each region sits in the device fd."""

from __future__ import annotations

VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1
VFIO_PCI_IOEVENTFD_MAX = 1000


def region_offset(index: int) -> int:
    """VFIO_PCI_INDEX_TO_OFFSET()"""
    return index << VFIO_PCI_OFFSET_SHIFT
