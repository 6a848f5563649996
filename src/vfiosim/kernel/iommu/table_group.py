"""``struct iommu_table_group``: a PE's DMA windows as the sPAPR driver sees them,
and the IOMMU API's view of a PE (``spapr_tce_iommu_ops``).

A platform (PowerNV, pseries) subclasses :class:`TableGroup` and implements
the ``iommu_table_group_ops`` methods.  The VFIO sPAPR driver only ever
talks to a PE through this interface, as in arch/powerpc/include/asm/iommu.h;
it finds the table group as the IOMMU group's ``iommu_data``
(iommu_group_get_iommudata()).

Since Linux 6.x a POWER PE also takes part in the IOMMU API, so that the
generic DMA ownership works (arch/powerpc/kernel/iommu.c): the group's
default domain is the *platform* domain, where the host kernel's own windows
are programmed, and its blocking domain hands the PE to the user.  Claiming
DMA ownership therefore is ``take_ownership()`` of the table group, and
giving it back ``release_ownership()``.  The 3.10 kernel had none of this
(its sPAPR driver takes the PE's table itself); its PEs are probed by no
IOMMU driver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from errno import ENODEV
from typing import TYPE_CHECKING

from ..errors import fail
from .iommu import (IOMMU_CAP_CACHE_COHERENCY, IOMMU_DOMAIN_BLOCKED, IOMMU_DOMAIN_PLATFORM, IommuDomain, IommuOps,
                    iommu_group_get_iommudata)
from .tce import IOMMU_TABLE_GROUP_MAX_TABLES, IommuTable

if TYPE_CHECKING:
    from ..pci.device import PciDevice
    from .iommu import IommuGroup


class TableGroup(ABC):
    """A Partitionable Endpoint's window parameters and tables."""

    def __init__(self, *, tce32_start: int, tce32_size: int, pgsizes: int,
                 max_dynamic_windows_supported: int, max_levels: int) -> None:
        self.tce32_start = tce32_start
        self.tce32_size = tce32_size
        self.pgsizes = pgsizes
        self.max_dynamic_windows_supported = max_dynamic_windows_supported
        self.max_levels = max_levels
        self.tables: list[IommuTable | None] = [None] * IOMMU_TABLE_GROUP_MAX_TABLES

    # -- iommu_table_group_ops ----------------------------------------------------------------

    @abstractmethod
    def get_table_size(self, page_shift: int, window_size: int, levels: int) -> int:
        """Bytes of kernel memory a table for this window needs; 0 = invalid."""

    @abstractmethod
    def create_table(self, num: int, page_shift: int, window_size: int, levels: int) -> IommuTable:
        """A new table for window ``num``, for a user (with its userspace view)."""

    @abstractmethod
    def set_window(self, num: int, tbl: IommuTable) -> None: ...

    @abstractmethod
    def unset_window(self, num: int) -> None: ...

    @abstractmethod
    def take_ownership(self) -> None:
        """The PE leaves the host kernel's DMA API for a user (VFIO)."""

    @abstractmethod
    def release_ownership(self) -> None:
        """The PE returns to the host kernel, which restores its default window."""

    # Whether two groups may share windows: the kernel compares the
    # create_table function pointers (tce_iommu_attach_group).
    def ops_identity(self) -> object:
        return type(self).create_table


def table_group_of(group: "IommuGroup") -> TableGroup | None:
    """iommu_group_get_iommudata() where a POWER platform put the PE's table group."""
    data = iommu_group_get_iommudata(group)
    return data if isinstance(data, TableGroup) else None


class _SpaprDomain(IommuDomain):
    def attach_dev(self, dev: "PciDevice") -> None:
        group = dev.iommu_group
        tg = table_group_of(group) if group is not None else None
        if tg is None:
            raise fail(ENODEV, f"{dev.bdf} has no TCE table group")
        if self.type == IOMMU_DOMAIN_BLOCKED:
            # spapr_tce_blocking_iommu_attach_dev(): the blocked domain also
            # takes the PE's windows away from the host kernel.
            tg.take_ownership()
        else:
            # spapr_tce_platform_iommu_attach_dev()
            tg.release_ownership()

    def __repr__(self) -> str:
        return f"<spapr_tce {self.type} domain>"


class SpaprTceIommuOps(IommuOps):
    """``spapr_tce_iommu_ops``: no paging domains; the platform domain is the
    host's DMA, the blocked one the user's (arch/powerpc/kernel/iommu.c)."""

    name = "spapr_tce"

    def __init__(self) -> None:
        self.platform_domain = _SpaprDomain(self, IOMMU_DOMAIN_PLATFORM)
        self.blocked_domain = _SpaprDomain(self, IOMMU_DOMAIN_BLOCKED)

    def default_domain(self, dev: "PciDevice") -> IommuDomain:
        return self.platform_domain

    def capable(self, dev: "PciDevice", cap: int) -> bool:
        """spapr_tce_iommu_capable(): DMA is cache coherent, nothing else."""
        return cap == IOMMU_CAP_CACHE_COHERENCY
