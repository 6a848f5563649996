"""IOMMU groups (``struct iommu_group``) and DMA ownership.

A group is the unit of isolation: every device in it must belong to the
same owner.  A host driver bound to any of its devices owns its DMA; VFIO
claims ownership when a group joins a container, which on POWER moves the
PE's windows from the host kernel to the user (take_ownership).
"""

from __future__ import annotations

from errno import EBUSY, EPERM
from typing import TYPE_CHECKING

from ..errors import fail

if TYPE_CHECKING:
    from ..pci.device import PciDevice
    from ..platform.x86 import VtdGroup
    from .table_group import TableGroup


class IommuGroup:
    def __init__(self, group_id: int) -> None:
        self.id = group_id
        self.devices: list["PciDevice"] = []
        self.iommudata: "TableGroup | None" = None     # iommu_group_get_iommudata()
        self.dma_owner: object | None = None
        self.owner_cnt = 0
        # Modern kernels move a PE's windows to the user when VFIO claims the
        # group (a blocking domain, then take_ownership); 3.10 had no such
        # hand-off: the sPAPR driver took the PE's own table itself.
        self.platform_handoff = True
        # On IOMMU-API platforms (x86 VT-d) the group's domains: default,
        # blocking and current (kernel/platform/x86.py: VtdGroup); None on POWER.
        self.domains: "VtdGroup | None" = None

    def add_device(self, dev: "PciDevice") -> None:
        self.devices.append(dev)
        dev.iommu_group = self

    def host_driver_owned(self) -> bool:
        """A device bound to a DMA-using host driver owns the group's DMA."""
        return any(d.driver not in (None, "vfio-pci", "pcieport") for d in self.devices)

    def dma_owner_claimed(self) -> bool:
        """iommu_group_dma_owner_claimed()"""
        return self.owner_cnt > 0 or self.host_driver_owned()

    def claim_dma_owner(self, owner: object) -> None:
        """iommu_group_claim_dma_owner(): EBUSY if anybody else owns it."""
        if self.owner_cnt or self.host_driver_owned():
            raise fail(EBUSY, f"IOMMU group {self.id} is owned by another user or a host driver")
        if self.domains is not None:
            # __iommu_take_dma_ownership(): DMA is blocked until a driver attaches a domain.
            self.domains.take_ownership()
        self.dma_owner = owner
        self.owner_cnt = 1
        if self.iommudata is not None and self.platform_handoff:
            self.iommudata.take_ownership()

    def claim_device_dma_owner(self, owner: object) -> None:
        """iommu_device_claim_dma_owner(): per device, as iommufd binds them.
        Devices of one group may share an owner (owner_cnt counts them); any
        other owner, or a host driver using the default domain, is EPERM."""
        if self.owner_cnt or self.host_driver_owned():
            if self.host_driver_owned() or self.dma_owner is not owner:
                raise fail(EPERM, f"IOMMU group {self.id} is owned by another user or a host driver")
            self.owner_cnt += 1
            return
        self.claim_dma_owner(owner)

    def release_device_dma_owner(self) -> None:
        """iommu_device_release_dma_owner()"""
        if self.owner_cnt > 1:
            self.owner_cnt -= 1
            return
        self.release_dma_owner()

    def release_dma_owner(self) -> None:
        if self.iommudata is not None and self.platform_handoff:
            self.iommudata.release_ownership()
        if self.domains is not None:
            self.domains.release_ownership()
        self.dma_owner = None
        self.owner_cnt = 0

    def __repr__(self) -> str:
        return f"<IommuGroup {self.id} devices={[d.bdf for d in self.devices]}>"
