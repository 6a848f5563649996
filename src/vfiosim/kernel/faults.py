"""Fault injection: make the Nth internal allocation, pin or charge fail.

Linux's ``/proc/<pid>/fail-nth`` makes the Nth call to a fault-injection
point fail once.  :class:`FaultInjector` does the same for the simulated
kernel: code that allocates, pins or charges asks it at a named *site*, and
the armed one answers "fail" exactly once, after which the kernel takes the
error path upstream takes (rolling back, or leaking where upstream leaks).

Sites are named ``kind:function``, the kind saying how the failure looks to
the caller, the function where upstream makes the call:

================  =====================================================================
kind              what fails, and what the caller sees
================  =====================================================================
pin_user_pages    One page of a pin_user_pages*() / get_user_pages*() call cannot be
                  faulted in (as a failed page allocation in handle_mm_fault:
                  VM_FAULT_OOM).  The call returns the pages before it (fewer than
                  asked), or -ENOMEM if it is the call's first page.  One event per
                  page.
account_locked_vm account_locked_vm() / __account_locked_vm() fails with -ENOMEM, as if
                  RLIMIT_MEMLOCK were exceeded (the 3.10 profile: its open-coded check).
kmalloc           kzalloc() / kmalloc() / vzalloc() of a kernel structure returns NULL.
alloc_pages       A page of an IOMMU table cannot be allocated: alloc_pages_node() of a
                  TCE table level (PowerNV), the top page directory of a VT-d domain.
iommu_map         iommu_map() cannot allocate an IO page-table page: -ENOMEM (VT-d).
opal              An OPAL call programming the PHB fails with OPAL_HARDWARE (-6),
                  which the PowerNV code passes up as the errno (ENXIO).
hcall             A pseries hcall (H_GET_TCE/H_PUT_TCE, H_STUFF_TCE) fails with
                  H_HARDWARE (-1).  Where the guest kernel returns the status
                  (tce_exchange_pseries) userspace sees it as an errno, EPERM; where it
                  only prints it (tce_freemulti_pSeriesLP) nothing fails.
rtas              A pseries RTAS call returns -1 (hardware error).  What the caller
                  sees is the caller's choice: spapr_tce_create_table() returns
                  ibm,query-pe-dma-window's status as the errno (EPERM) but ENODEV
                  for ibm,create-pe-dma-window; a failed reset is only logged.
================  =====================================================================

``SITES`` lists every site the kernel consults.  Use it from Python::

    m.inject_fault(3, sites="pin_user_pages")     # the 3rd page pinned from now fails
    m.faults.fired                                 # ["pin_user_pages:tce_iommu_use_page"]

Counting never stops (``counts``), so a test can run an operation once to
learn how many events of a kind it consults, then walk N over all of them.
A fired fault is logged in dmesg as Linux's ``FAULT_INJECTION: forcing a
failure.`` line is.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

KINDS = ("pin_user_pages", "account_locked_vm", "kmalloc", "alloc_pages", "iommu_map", "opal", "hcall", "rtas")

# Every site consulted somewhere in the kernel, with the upstream call it stands for.
SITES: dict[str, str] = {
    # sPAPR TCE (drivers/vfio/vfio_iommu_spapr_tce.c) and preregistration (iommu_api.c)
    # (the 3.10 profile's tce_iommu_open and tce_iommu_enable make the same calls)
    "kmalloc:tce_iommu_open": "kzalloc(struct tce_container) in VFIO_SET_IOMMU",
    "kmalloc:tce_iommu_attach_group": "kzalloc(struct tce_iommu_group) when a group joins",
    "account_locked_vm:tce_iommu_enable": "VFIO_IOMMU_ENABLE charges the 32-bit window (3.10 profile: its "
                                          "open-coded RLIMIT_MEMLOCK check)",
    "account_locked_vm:tce_iommu_create_table": "a new TCE table is charged before it is built",
    "pin_user_pages:tce_iommu_use_page": "v1 MAP_DMA pins each page with pin_user_pages_fast(1)",
    "kmalloc:tce_iommu_register_pages": "kzalloc(struct tce_iommu_prereg) after mm_iommu_new()",
    "account_locked_vm:mm_iommu_do_alloc": "REGISTER_MEMORY charges the region",
    "kmalloc:mm_iommu_do_alloc": "kzalloc(struct mm_iommu_table_group_mem_t)",
    "kmalloc:mm_iommu_do_alloc.hpas": "vzalloc() of the region's page array",
    "pin_user_pages:mm_iommu_do_alloc": "pin_user_pages(FOLL_WRITE | FOLL_LONGTERM) of the region",
    # The 3.10 profile (kernel="3.10"): arch/powerpc/kernel/iommu.c of 3.10
    "pin_user_pages:iommu_put_tce_user_mode": "v1 MAP_DMA pins its one page with get_user_pages_fast(1)",
    # PowerNV (arch/powerpc/platforms/powernv/pci-ioda.c, pci-ioda-tce.c)
    "kmalloc:pnv_pci_table_alloc": "kzalloc_node(struct iommu_table)",
    "alloc_pages:pnv_pci_ioda2_table_alloc_pages": "the first level of a new TCE table",
    "alloc_pages:pnv_pci_ioda2_table_alloc_pages.uas": "the first level of its userspace copy",
    "alloc_pages:pnv_tce": "an indirect TCE level allocated on first use (multi-level tables)",
    "alloc_pages:pnv_tce.uas": "the same level of the userspace copy (v2 MAP_DMA)",
    "opal:opal_pci_map_pe_dma_window": "programming a TVE in pnv_pci_ioda2_set_window()",
    # pseries (arch/powerpc/platforms/pseries/iommu.c): spapr_tce_create_table() and the
    # TCE hcalls of VFIO's tables
    "kmalloc:iommu_pseries_alloc_table": "kzalloc_node(struct iommu_table) of a new window",
    "rtas:query_ddw": "ibm,query-pe-dma-window before a dynamic window is created",
    "rtas:create_ddw": "ibm,create-pe-dma-window",
    "kmalloc:ddw_property_create": "the new window's device-tree property (3 allocations)",
    "kmalloc:ddw_list_new_entry": "kzalloc(struct dma_win) for dma_win_list",
    "rtas:reset_dma_window": "ibm,reset-pe-dma-windows, restoring the default window",
    "kmalloc:copy_property": "\"ibm,dma-window\" copied back from its saved copy (3 allocations)",
    "kmalloc:iommu_init_table": "vzalloc_node() of the table's allocation bitmap",
    "hcall:tce_freemulti_pSeriesLP": "H_STUFF_TCE clearing a new table, 512 entries a call",
    "kmalloc:pseries_tce_iommu_userspace_view_alloc": "vzalloc() of the table's userspace-address view",
    "hcall:tce_exchange_pseries": "H_GET_TCE + H_PUT_TCE of one entry in MAP_DMA (v1 and v2)",
    # Type1 (drivers/vfio/vfio_iommu_type1.c) on VT-d
    "kmalloc:vfio_iommu_type1_open": "kzalloc(struct vfio_iommu) in VFIO_SET_IOMMU",
    "kmalloc:vfio_iommu_type1_attach_group": "kzalloc(struct vfio_iommu_group) when a group joins",
    "kmalloc:vfio_iommu_type1_attach_group.domain": "kzalloc(struct vfio_domain) for the group's new domain",
    "kmalloc:alloc_domain": "kzalloc(struct dmar_domain): iommu_paging_domain_alloc() on VT-d",
    "alloc_pages:md_domain_init": "the new VT-d domain's top page directory (pgd)",
    "kmalloc:vfio_dma_do_map": "kzalloc(struct vfio_dma) in MAP_DMA",
    "pin_user_pages:vaddr_get_pfns": "pin_user_pages_remote(FOLL_LONGTERM) of a batch",
    "account_locked_vm:vfio_lock_acct": "MAP_DMA charges a contiguous run of pinned pages",
    "iommu_map:vfio_iommu_map": "mapping a contiguous run into a domain",
    "kmalloc:vfio_dma_bitmap_alloc": "kvzalloc() of a mapping's dirty bitmap (DIRTY_PAGES start)",
    # iommufd (drivers/iommu/iommufd/) on VT-d
    "kmalloc:_iommufd_object_alloc": "kzalloc of any iommufd object (IOAS, HWPT, device, fault) before its id",
    "kmalloc:iopt_alloc_pages": "kzalloc(struct iopt_pages) for the user memory of IOAS_MAP",
    "kmalloc:iopt_area_alloc": "kzalloc(struct iopt_area) for each new mapping (IOAS_MAP, IOAS_COPY)",
    "kmalloc:iopt_get_pages": "kzalloc of the iopt_pages_list element IOAS_COPY takes from its source",
    "kmalloc:iopt_reserve_iova": "kzalloc(struct iopt_reserved) for a device's reserved region",
    "kmalloc:iommufd_ioas_load_iovas": "kzalloc(struct iopt_allowed) for each range of IOAS_ALLOW_IOVAS",
    "kmalloc:iopt_area_split": "kzalloc(struct iopt_area) of the halves when the Type1-compat UNMAP_DMA "
                               "cuts an area (iopt_cut_iova(), with huge pages off)",
    "kmalloc:paging_domain_alloc": "kzalloc(struct dmar_domain) in intel_iommu_domain_alloc_user() (HWPT_ALLOC)",
    "pin_user_pages:pfn_reader_user_pin": "pin_user_pages_fast(FOLL_LONGTERM) of a batch of an iopt_pages",
    "account_locked_vm:incr_user_locked_vm": "the per-user charge (IOPT_PAGES_ACCOUNT_USER) of newly pinned pages",
    "account_locked_vm:update_mm_locked_vm": "the per-mm charge (IOPT_PAGES_ACCOUNT_MM) of newly pinned pages",
    "iommu_map:batch_to_domain": "iommu_map() of a run of an area's pages into a domain (one call a run)",
}

OPAL_HARDWARE = -6
H_HARDWARE = -1            # PAPR hcall status (arch/powerpc/include/asm/hvcall.h)
RTAS_HARDWARE_ERROR = -1  # RTAS status word


class EventBundle:
    """Events a fast path consults together each time it runs, when nothing is
    armed (so that consulting them is only counting): (site, events) pairs,
    counted with one increment of ``times``.  FaultInjector.counts adds them
    in when it is read, so the counts are what consulting each would give."""

    __slots__ = ("events", "times")

    def __init__(self, events: tuple[tuple[str, int], ...]) -> None:
        self.events = events
        self.times = 0


class FaultInjector:
    """``fail_nth`` for the simulated kernel (``kernel.faults``, ``machine.faults``)."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self._log = log
        self._left: int | None = None         # events to let pass, plus one (the failing one)
        self._filter: tuple[str, ...] | None = None
        self.armed = False                     # a failure is pending (_left is set)
        self._counts: Counter[str] = Counter()  # events consulted per site, since reset_counts()
        self._bundles: list[EventBundle] = []
        self.fired: list[str] = []             # sites that failed, in order

    @property
    def counts(self) -> Counter[str]:
        """Events consulted per site, since reset_counts()."""
        for b in self._bundles:
            if b.times:
                for site, events in b.events:
                    self._counts[site] += events * b.times
                b.times = 0
        return self._counts

    def bundle(self, *events: tuple[str, int]) -> EventBundle:
        """An EventBundle of (site, events) pairs, for a fast path of this kernel."""
        b = EventBundle(events)
        self._bundles.append(b)
        return b

    # -- arming ------------------------------------------------------------------------

    def fail_nth(self, n: int, sites: str | Iterable[str] | None = None) -> None:
        """Arm: the ``n``-th event (1-based, counted from now) at a site matching
        ``sites`` fails, once.  ``sites`` names kinds (``"pin_user_pages"``) or
        sites (``"kmalloc:mm_iommu_do_alloc"``); None matches every site."""
        if n < 1:
            raise ValueError(f"fail_nth counts from 1, not {n}")
        names = (sites,) if isinstance(sites, str) else tuple(sites) if sites is not None else None
        if names is not None:
            for s in names:
                if s not in KINDS and s not in SITES:
                    raise ValueError(f"unknown fault site {s!r}; kinds: {', '.join(KINDS)}; "
                                     f"sites: vfiosim.kernel.faults.SITES")
        self._left = n
        self._filter = names
        self.armed = True

    def disarm(self) -> None:
        self._left = None
        self._filter = None
        self.armed = False

    def reset_counts(self) -> None:
        self._counts.clear()
        for b in self._bundles:
            b.times = 0

    def count(self, sites: str | Iterable[str] | None = None) -> int:
        """Events consulted (since reset_counts()) at sites matching ``sites``."""
        names = (sites,) if isinstance(sites, str) else tuple(sites) if sites is not None else None
        return sum(c for s, c in self.counts.items() if self._match(s, names))

    @staticmethod
    def _match(site: str, names: tuple[str, ...] | None) -> bool:
        return names is None or site in names or site.split(":", 1)[0] in names

    # -- consulted by the kernel --------------------------------------------------------

    def take(self, site: str, events: int = 1) -> int:
        """Consult ``events`` consecutive events at ``site``; returns how many
        pass before the one that fails (``events`` if none does)."""
        if events <= 0:
            return 0
        left = self._left
        if left is None or not self._match(site, self._filter):
            self._counts[site] += events
            return events
        if left > events:
            self._left = left - events
            self._counts[site] += events
            return events
        self._counts[site] += left
        self._left = None
        self._filter = None
        self.armed = False
        self.fired.append(site)
        if self._log is not None:
            self._log(f"FAULT_INJECTION: forcing a failure. ({site}: {SITES.get(site, '')})")
        return left - 1

    def should_fail(self, site: str) -> bool:
        """One event at ``site``: True if it must fail."""
        return self.take(site, 1) == 0
