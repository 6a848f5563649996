"""The IOMMU API as iommufd calls it (include/linux/iommu.h, drivers/iommu/iommu.c).

TO BE REPLACED by the platform-neutral IOMMU domain interface of issue 15
(branch ``shape``), which was not committed while iommufd was written.  Until
then this is the one place that knows how the current platforms answer the
generic calls, so that the rest of kernel/iommufd/ is written against the
IOMMU API only (``dev_iommu_ops(dev)``, ``iommu_domain`` ops, the group's
domain), as drivers/iommu/iommufd/ is:

* x86: the device's group has a :class:`~vfiosim.kernel.platform.x86.VtdGroup`
  (``group.domains``); domains are VT-d ``dmar_domain``\\ s.
* POWER: ``arch/powerpc/kernel/iommu.c``'s ``spapr_tce_iommu_ops`` (Linux
  6.12) has a platform and a blocked domain and no way to allocate a paging
  domain: ``iommu_paging_domain_alloc()`` is EOPNOTSUPP, so no IOAS can be
  attached; only IOMMU_CAP_CACHE_COHERENCY is reported, and no MSI domain on
  the path from a POWER device isolates MSIs.
"""

from __future__ import annotations

from errno import EOPNOTSUPP
from typing import TYPE_CHECKING

from ..errors import fail

if TYPE_CHECKING:
    from ..iommu.iommu_group import IommuGroup
    from ..pci.device import PciDevice
    from ..platform.x86 import IntelIommu, ResvRegion, VtdDomain, VtdGroup

# enum iommu_cap (include/linux/iommu.h)
IOMMU_CAP_CACHE_COHERENCY = 0
IOMMU_CAP_NOEXEC = 1
IOMMU_CAP_PRE_BOOT_PROTECTION = 2
IOMMU_CAP_ENFORCE_CACHE_COHERENCY = 3
IOMMU_CAP_DEFERRED_FLUSH = 4
IOMMU_CAP_DIRTY_TRACKING = 5

# IOMMU_* protection flags
IOMMU_READ = 1 << 0
IOMMU_WRITE = 1 << 1
IOMMU_CACHE = 1 << 2


def _vtd(dev: "PciDevice") -> "VtdGroup | None":
    group = dev.iommu_group
    return group.domains if group is not None else None


def _unit(dev: "PciDevice") -> "IntelIommu | None":
    state = _vtd(dev)
    return state.unit if state is not None else None


def owner_name(dev: "PciDevice") -> str:
    """dev_iommu_ops(dev), for messages."""
    unit = _unit(dev)
    return f"intel_iommu_ops ({unit.name})" if unit is not None else "spapr_tce_iommu_ops"


def device_iommu_capable(dev: "PciDevice", cap: int) -> bool:
    """device_iommu_capable(): intel_iommu_capable() or spapr_tce_iommu_capable()."""
    unit = _unit(dev)
    if unit is None:
        return cap == IOMMU_CAP_CACHE_COHERENCY
    if cap in (IOMMU_CAP_CACHE_COHERENCY, IOMMU_CAP_DEFERRED_FLUSH):
        return True
    if cap == IOMMU_CAP_ENFORCE_CACHE_COHERENCY:
        return unit.snoop_control
    if cap == IOMMU_CAP_DIRTY_TRACKING:
        return unit.dirty_tracking
    return False


def iommu_group_has_isolated_msi(group: "IommuGroup") -> bool:
    """msi_device_has_isolated_msi() of every device: VT-d's interrupt
    remapping domain has IRQ_DOMAIN_FLAG_ISOLATED_MSI; POWER's MSI domains do
    not, and powerpc has no arch_is_isolated_msi()."""
    state = group.domains
    return state is not None and state.unit.interrupt_remapping


def get_resv_regions(dev: "PciDevice") -> "list[ResvRegion]":
    """iommu_get_resv_regions(dev)"""
    state = _vtd(dev)
    if state is None:
        return []
    return state.unit.get_resv_regions(state.group)


def domain_alloc_user(dev: "PciDevice", *, nest_parent: bool, dirty_tracking: bool) -> "VtdDomain":
    """iommufd_hwpt_paging_alloc()'s allocation: ops->domain_alloc_user() where
    the driver has one (VT-d), else iommu_paging_domain_alloc(), which the
    sPAPR TCE ops cannot serve (__iommu_domain_alloc(): no domain_alloc,
    no domain_alloc_paging: EOPNOTSUPP)."""
    unit = _unit(dev)
    if unit is None:
        if nest_parent or dirty_tracking:
            raise fail(EOPNOTSUPP, f"{dev.bdf}: spapr_tce_iommu_ops has no domain_alloc_user")
        raise fail(EOPNOTSUPP, f"{dev.bdf}: the POWER sPAPR TCE platform has no paging IOMMU domain "
                               f"(arch/powerpc/kernel/iommu.c: spapr_tce_iommu_ops allocates none); its DMA "
                               f"windows are the sPAPR TCE IOMMU driver's")
    return unit.domain_alloc_user(nest_parent=nest_parent, dirty_tracking=dirty_tracking)


def domain_free(domain: "VtdDomain") -> None:
    """iommu_domain_free()"""
    domain.on_dma_write = None
    domain.unit.domain_free(domain)


def enforce_cache_coherency(domain: "VtdDomain") -> bool:
    return domain.enforce_cache_coherency()


def attach_group(domain: "VtdDomain", group: "IommuGroup") -> None:
    """iommu_attach_group_handle() -> __iommu_attach_group(): EBUSY if the
    group is in another domain than its default or blocking one, EINVAL for a
    domain of another IOMMU (or one whose dirty bits the unit lacks)."""
    state = group.domains
    assert state is not None
    state.attach(domain)


def replace_group(group: "IommuGroup", domain: "VtdDomain") -> None:
    """iommu_replace_group_handle(): straight from one domain to the next."""
    state = group.domains
    assert state is not None
    state.replace(domain)


def detach_group(domain: "VtdDomain", group: "IommuGroup") -> None:
    """iommu_detach_group_handle() -> __iommu_group_set_core_domain()"""
    state = group.domains
    assert state is not None
    state.detach(domain)


def iommu_map(domain: "VtdDomain", iova: int, paddr: int, size: int, prot: int, page_size: int = 0) -> None:
    """iommu_map(); ``page_size`` > 0 is batch_iommu_map_small(): every PTE
    that size, never a super page."""
    domain.map(iova, paddr, size, prot, leaf=page_size)


def iommu_unmap(domain: "VtdDomain", iova: int, size: int) -> int:
    return domain.unmap(iova, size)


def hw_info(dev: "PciDevice") -> tuple[bytes, int] | None:
    """ops->hw_info(): intel_iommu_hw_info() gives struct iommu_hw_info_vtd;
    spapr_tce_iommu_ops has none (None: IOMMU_HW_INFO_TYPE_NONE, no data)."""
    from ...uapi import iommufd as iu
    unit = _unit(dev)
    if unit is None:
        return None
    vtd = iu.iommu_hw_info_vtd(flags=iu.IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17, cap_reg=unit.cap_reg,
                               ecap_reg=unit.ecap_reg)
    return bytes(vtd), iu.IOMMU_HW_INFO_TYPE_INTEL_VTD
