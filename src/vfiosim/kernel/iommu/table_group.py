"""``struct iommu_table_group``: a PE's DMA windows as the sPAPR driver sees them.

A platform (PowerNV, pseries) subclasses :class:`TableGroup` and implements
the ``iommu_table_group_ops`` methods.  The VFIO sPAPR driver only ever
talks to a PE through this interface, as in arch/powerpc/include/asm/iommu.h.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tce import IOMMU_TABLE_GROUP_MAX_TABLES, IommuTable

if TYPE_CHECKING:
    from .iommu_group import IommuGroup


class TableGroup:
    """A Partitionable Endpoint's window parameters and tables."""

    def __init__(self, *, tce32_start: int, tce32_size: int, pgsizes: int,
                 max_dynamic_windows_supported: int, max_levels: int) -> None:
        self.tce32_start = tce32_start
        self.tce32_size = tce32_size
        self.pgsizes = pgsizes
        self.max_dynamic_windows_supported = max_dynamic_windows_supported
        self.max_levels = max_levels
        self.tables: list[IommuTable | None] = [None] * IOMMU_TABLE_GROUP_MAX_TABLES
        self.group: "IommuGroup | None" = None

    # -- iommu_table_group_ops; platforms override -----------------------------

    def get_table_size(self, page_shift: int, window_size: int, levels: int) -> int:
        """Bytes of kernel memory a table for this window needs; 0 = invalid."""
        raise NotImplementedError

    def create_table(self, num: int, page_shift: int, window_size: int, levels: int) -> IommuTable:
        raise NotImplementedError

    def set_window(self, num: int, tbl: IommuTable) -> None:
        raise NotImplementedError

    def unset_window(self, num: int) -> None:
        raise NotImplementedError

    def take_ownership(self) -> None:
        """The PE leaves the host kernel's DMA API for a user (VFIO)."""

    def release_ownership(self) -> None:
        """The PE returns to the host kernel, which restores its default window."""

    # Whether two groups may share windows: the kernel compares the
    # create_table function pointers (tce_iommu_attach_group).
    def ops_identity(self) -> object:
        return type(self).create_table
