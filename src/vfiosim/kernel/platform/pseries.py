"""pseries (a PAPR guest): TCE tables live in the hypervisor.

The guest kernel never touches a TCE table: it asks the hypervisor with
hcalls (H_PUT_TCE, H_GET_TCE) naming a window by its LIOBN, and manages
windows with RTAS calls (ibm,query-pe-dma-window, ibm,create-pe-dma-window,
ibm,remove-pe-dma-window, ibm,reset-pe-dma-windows).  Two halves:

* :class:`SpaprPhb` is the hypervisor's side, as QEMU's sPAPR PHB implements
  it (hw/ppc/spapr_iommu.c, spapr_rtas_ddw.c): TCE tables per LIOBN, and the
  hcall checks, e.g. an IOBA past the window answers H_PARAMETER (-4).
* :class:`PseriesTableGroup` is the guest kernel's iommu_table_group_ops,
  per arch/powerpc/platforms/pseries/iommu.c (spapr_tce_get_table_size,
  spapr_tce_create_table, spapr_tce_set_window, spapr_tce_unset_window,
  spapr_tce_take_ownership, spapr_tce_release_ownership).

There is no EEH on this machine (as in the reference traces): a DMA the
IOMMU refuses fails without freezing anything.

Fault injection (kernel/faults.py) reaches the guest kernel's calls to the
hypervisor and its allocations on the way to a new window, each failing as
spapr_tce_create_table() handles it (read from arch/powerpc/platforms/
pseries/iommu.c as the 6.10 rework left it, "powerpc/iommu: Reimplement the
iommu_table_group_ops for pSeries"; the stored copy read is a later one,
with the 6.13 kmemleak fix's ``.free`` op, whose create path is the same):

* a failed kzalloc of the iommu_table returns the -ENODEV that ``ret``
  already holds, not -ENOMEM;
* once ibm,query-pe-dma-window, ibm,create-pe-dma-window or an allocation
  after it fails, the PE goes on ``failed_ddw_pdn_list`` (out_failed) and
  every later create_table() for it is -ENODEV, also for the default
  window; nothing takes a PE off that list (docs/deviations.md);
* query_ddw()'s RTAS status is returned as the errno (-1: EPERM), while a
  failed create is -ENODEV, after the RTAS remove of what was created;
* a failed vzalloc of the bitmap in iommu_init_table(), a failed H_STUFF_TCE
  clearing the new table, and a failed vzalloc of the userspace view are
  ignored (the last makes a v2 MAP_DMA into the window oops: refused here,
  docs/deviations.md), as is a failed RTAS reset;
* copy_property() failing to restore "ibm,dma-window" makes
  of_parse_dma_window() dereference NULL: refused here with ENOMEM;
* in MAP_DMA, tce_exchange_pseries() returns the hcall status of a failed
  H_GET_TCE/H_PUT_TCE (H_HARDWARE -1: EPERM).
"""

from __future__ import annotations

from errno import EINVAL, ENODEV, ENOMEM, EPERM
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..deviations import deviation
from ..errors import fail
from ..faults import H_HARDWARE, RTAS_HARDWARE_ERROR
from ..dma import DmaFault, Pieces, Translation
from ..iommu.table_group import TableGroup
from ..iommu.tce import IOMMU_PAGE_SHIFT_4K, IommuTable, TableOps, TceStorage, XchgResult, direction_to_perm
from ..mm import PhysicalMemory
from ..progression import U64Values
from .base import IommuMapping, Platform
from .pe import Pe, TceLookup, tce_mappings

if TYPE_CHECKING:
    from ..faults import FaultInjector

H_SUCCESS = 0
H_PARAMETER = -4
H_STUFF_TCE_MAX = 512          # entries per H_STUFF_TCE in tce_freemulti_pSeriesLP()

SPAPR_DMA64_WIN_ADDR = 0x800000000000000      # QEMU's default 64-bit window address (1 << 59)


def spapr_liobn(phb_index: int, window: int) -> int:
    """QEMU's SPAPR_PCI_LIOBN(): one LIOBN per PHB window."""
    return 0x80000000 | (phb_index << 8) | window


def is_power_of_2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


class SpaprTceTable:
    """The hypervisor's TCE table for one LIOBN (QEMU's SpaprTceTable)."""

    def __init__(self, liobn: int) -> None:
        self.liobn = liobn
        self.bus_offset = 0
        self.page_shift = IOMMU_PAGE_SHIFT_4K
        self.nb_table = 0
        self.entries = TceStorage(0)

    @property
    def enabled(self) -> bool:
        return self.nb_table > 0

    def enable(self, page_shift: int, bus_offset: int, nb_table: int) -> None:
        self.page_shift, self.bus_offset, self.nb_table = page_shift, bus_offset, nb_table
        self.entries = TceStorage(nb_table)

    def disable(self) -> None:
        self.nb_table = 0
        self.entries = TceStorage(0)

    def index_of(self, ioba: int) -> int:
        """Entry index of ``ioba``, as an unsigned offset from the window start."""
        return ((ioba - self.bus_offset) % (1 << 64)) >> self.page_shift


class SpaprPhb:
    """The hypervisor side of one sPAPR PHB: DMA windows, hcalls and RTAS."""

    def __init__(self, index: int, *, dma32_start: int, dma32_size: int, pgsizes: int, windows_supported: int,
                 dma64_addr: int, largest_block: int, log: Callable[[str], None]) -> None:
        self.index = index
        self.dma32_start = dma32_start
        self.dma32_size = dma32_size
        self.pgsizes = pgsizes
        self.windows_supported = windows_supported
        self.dma64_addr = dma64_addr
        self.largest_block = largest_block
        self.log = log
        self.tables = [SpaprTceTable(spapr_liobn(index, n)) for n in range(windows_supported)]
        # Every hcall names its window by LIOBN: one lookup, not a scan (the set is fixed).
        self.by_liobn = {t.liobn: t for t in self.tables}
        self.reset_dma()

    def table(self, liobn: int) -> SpaprTceTable | None:
        return self.by_liobn.get(liobn)

    # -- hcalls (hw/ppc/spapr_iommu.c: h_put_tce, h_get_tce) -------------------------

    def h_put_tce_range(self, liobn: int, first_index: int, tces: U64Values) -> XchgResult:
        """H_GET_TCE then H_PUT_TCE for consecutive entries, as the guest's
        tce_exchange_pseries() does one by one, stopping at the first refusal."""
        t = self.table(liobn)
        if t is None or not t.enabled:
            return XchgResult(0, H_PARAMETER)
        rel0 = first_index - (t.bus_offset >> t.page_shift)
        n = len(tces)
        if rel0 < 0:
            return XchgResult(0, H_PARAMETER)
        done = max(0, min(n, t.nb_table - rel0))
        if not done:
            return XchgResult(0, H_PARAMETER if n else H_SUCCESS)
        pos, old = t.entries.xchg_range(rel0, tces[:done])
        return XchgResult(done, H_SUCCESS if done == n else H_PARAMETER, pos, old)

    def accepts(self, liobn: int, first_index: int, n: int) -> int:
        """How many of ``n`` consecutive entries from ``first_index`` H_PUT_TCE
        would accept before its first H_PARAMETER."""
        t = self.table(liobn)
        if t is None or not t.enabled:
            return 0
        rel0 = first_index - (t.bus_offset >> t.page_shift)
        return 0 if rel0 < 0 else max(0, min(n, t.nb_table - rel0))

    def h_stuff_tce(self, liobn: int, first_index: int, n: int) -> int:
        """H_STUFF_TCE with a zero TCE: clears ``n`` entries."""
        t = self.table(liobn)
        if t is None or not t.enabled:
            return H_PARAMETER
        rel0 = first_index - (t.bus_offset >> t.page_shift)
        if rel0 < 0 or rel0 + n > t.nb_table:
            return H_PARAMETER
        t.entries.clear_range(rel0, n)
        return H_SUCCESS

    def h_get_tce(self, liobn: int, ioba: int) -> tuple[int, int]:
        t = self.table(liobn)
        if t is None or not t.enabled:
            return H_PARAMETER, 0
        idx = t.index_of(ioba)
        if idx >= t.nb_table:
            return H_PARAMETER, 0
        return H_SUCCESS, t.entries.get(idx)

    # -- RTAS dynamic DMA windows (hw/ppc/spapr_rtas_ddw.c) ------------------------------

    def active_windows(self) -> int:
        return sum(1 for t in self.tables if t.enabled)

    def reset_dma(self) -> None:
        """ibm,reset-pe-dma-windows: every window goes, the default one returns."""
        for t in self.tables:
            t.disable()
        self.tables[0].enable(IOMMU_PAGE_SHIFT_4K, self.dma32_start, self.dma32_size >> IOMMU_PAGE_SHIFT_4K)

    def query(self) -> tuple[int, int, int]:
        """ibm,query-pe-dma-window: (windows available, largest block, page size mask)."""
        return self.windows_supported - self.active_windows(), self.largest_block, self.pgsizes

    def create_window(self, page_shift: int, window_shift: int) -> tuple[int, int] | None:
        """ibm,create-pe-dma-window: returns (liobn, bus address) or None on failure."""
        if not (self.pgsizes >> page_shift) & 1 or window_shift < page_shift:
            return None
        free = [t for t in self.tables if not t.enabled]
        if not free:
            return None
        addr = self.dma32_start if self.active_windows() == 0 else self.dma64_addr
        t = free[0]
        t.enable(page_shift, addr, 1 << (window_shift - page_shift))
        return t.liobn, addr

    def remove_window(self, liobn: int) -> bool:
        """ibm,remove-pe-dma-window"""
        t = self.table(liobn)
        if t is None or not t.enabled:
            return False
        t.disable()
        return True

    def lookup(self, iova: int) -> SpaprTceTable | None:
        for t in self.tables:
            # (A disabled window has nb_table 0: an empty range, so no `enabled` test; every DMA asks.)
            if t.bus_offset <= iova < t.bus_offset + (t.nb_table << t.page_shift):
                return t
        return None


class PseriesTableOps(TableOps):
    """iommu_table_lpar_multi_ops: every entry change is an hcall."""

    overrun_corrupts = False        # the hypervisor answers H_PARAMETER instead

    def __init__(self, hv: SpaprPhb, faults: "FaultInjector | None" = None) -> None:
        self.hv = hv
        self.faults = faults
        # What xchg_one() consults of fault injection: the entry's hcall.
        self._hcall_event = faults.bundle(("hcall:tce_exchange_pseries", 1)) if faults is not None else None

    def _window(self, tbl: IommuTable) -> SpaprTceTable | None:
        t = self.hv.by_liobn.get(tbl.it_index)
        return t if t is not None and t.nb_table > 0 else None      # (t.enabled, without the property's frame)

    def used(self, tbl: IommuTable, entry: int, n: int) -> np.ndarray:
        """Entries past the window end are skipped: their hcalls fail and
        tce_iommu_clear() ignores the failure."""
        t = self._window(tbl)
        if t is None:
            return np.zeros(0, dtype=np.int64)
        base = t.bus_offset >> t.page_shift
        lo = max(entry, tbl.it_offset, base)
        hi = min(entry + n, tbl.it_offset + tbl.it_size, base + t.nb_table)
        if hi <= lo:
            return np.zeros(0, dtype=np.int64)
        return t.entries.used_indices(lo - base, hi - lo) + base

    def clear(self, tbl: IommuTable, entries: np.ndarray) -> np.ndarray:
        t = self._window(tbl)
        assert t is not None
        return t.entries.clear_indices(entries - (t.bus_offset >> t.page_shift))

    def clear_range(self, tbl: IommuTable, entry: int, n: int) -> list[np.ndarray]:
        t = self._window(tbl)
        if t is None:
            return []
        base = t.bus_offset >> t.page_shift
        lo = max(entry, tbl.it_offset, base)
        hi = min(entry + n, tbl.it_offset + tbl.it_size, base + t.nb_table)
        return t.entries.clear_range(lo - base, hi - lo) if hi > lo else []

    def clear_one(self, tbl: IommuTable, entry: int) -> int:
        t = self._window(tbl)
        if t is None:
            return 0
        base = t.bus_offset >> t.page_shift
        if max(tbl.it_offset, base) <= entry < min(tbl.it_offset + tbl.it_size, base + t.nb_table):
            return t.entries.clear_one(entry - base)
        return 0

    def perm(self, direction: int) -> int:
        """tce_exchange_pseries(): the bits as iommu_direction_to_tce_perm() gives them."""
        return direction_to_perm(direction)

    def count_used(self, tbl: IommuTable) -> int:
        t = self._window(tbl)
        return 0 if t is None else t.entries.count_used()

    def xchg_range(self, tbl: IommuTable, entry: int, tces: U64Values) -> XchgResult:
        """tce_exchange_pseries() for each entry: H_GET_TCE then H_PUT_TCE.
        An injected failure of either (hcall:tce_exchange_pseries) stops the
        run at that entry, unchanged, with H_HARDWARE."""
        n = len(tces)
        if self.faults is None or not n:
            return self.hv.h_put_tce_range(tbl.it_index, entry, tces)
        # One event per entry tried: those the hypervisor accepts, and the
        # one it would refuse with H_PARAMETER (the loop stops there).
        tried = min(n, self.hv.accepts(tbl.it_index, entry, n) + 1)
        ok = self.faults.take("hcall:tce_exchange_pseries", tried)
        if ok == tried:
            return self.hv.h_put_tce_range(tbl.it_index, entry, tces)
        xr = self.hv.h_put_tce_range(tbl.it_index, entry, tces[:ok])
        assert xr.rc == H_SUCCESS and xr.done == ok
        return XchgResult(ok, H_HARDWARE, xr.old_pos, xr.old)

    def xchg_one(self, tbl: IommuTable, entry: int, tce: int) -> int | None:
        """xchg_range() of one entry the hypervisor accepts, with nothing armed:
        the hcall event counted, the entry exchanged."""
        if self.faults is not None and self.faults.armed:
            return None
        t = self.hv.by_liobn.get(tbl.it_index)
        if t is None or t.nb_table <= 0:                # not t.enabled
            return None
        rel = entry - (t.bus_offset >> t.page_shift)
        if not 0 <= rel < t.nb_table:
            return None
        if self._hcall_event is not None:
            self._hcall_event.times += 1
        return t.entries.xchg_one(rel, tce)

    def get(self, tbl: IommuTable, entry: int) -> int:
        rc, tce = self.hv.h_get_tce(tbl.it_index, entry << tbl.it_page_shift)
        return tce if rc == H_SUCCESS else 0

    def missing_levels(self, tbl: IommuTable, user: bool, entry: int, n: int) -> list[tuple[int, int, int]]:
        """The hypervisor's tables have no levels the guest allocates."""
        return []

    def mark_levels(self, tbl: IommuTable, user: bool, levels: list[tuple[int, int, int]]) -> None:
        pass


class PseriesTableGroup(TableGroup):
    """The guest kernel's view of one PE (a PHB here) and its DMA windows."""

    def __init__(self, hv: SpaprPhb, log: Callable[[str], None], faults: "FaultInjector | None" = None) -> None:
        windows_available = hv.query()[0]
        super().__init__(tce32_start=hv.dma32_start, tce32_size=hv.dma32_size,
                         pgsizes=(1 << IOMMU_PAGE_SHIFT_4K) | hv.pgsizes,
                         max_dynamic_windows_supported=2 if windows_available else 1, max_levels=1)
        self.hv = hv
        self.ops = PseriesTableOps(hv, faults)
        self.log = log
        self.faults = faults
        # This PE's node is on failed_ddw_pdn_list: a window creation failed
        # after the query, and spapr_tce_create_table() never tries again.
        self.ddw_failed = False
        # Device tree state of the PE node: "ibm,dma-window" (the default
        # window) and the DMA64 property of a dynamic window.
        self.default_window_prop = True
        self.ddw: tuple[int, int, int, int] | None = None     # (liobn, addr, page_shift, window_shift)
        self.tables[0] = self._default_table(hv.dma32_size)

    def _default_table(self, size: int) -> IommuTable:
        return IommuTable(it_offset=self.hv.dma32_start >> IOMMU_PAGE_SHIFT_4K, it_size=size >> IOMMU_PAGE_SHIFT_4K,
                          it_page_shift=IOMMU_PAGE_SHIFT_4K, ops=self.ops, index=self.hv.tables[0].liobn)

    def _restore_default_window(self, faults: bool = False) -> None:
        """restore_default_dma_window(): RTAS reset, then the saved property back.

        With ``faults`` (the create_table() path): a failed reset is only
        logged; copy_property() failing to allocate the property returns
        quietly, and spapr_tce_create_table() then parses the missing
        "ibm,dma-window" (of_parse_dma_window(NULL)): a kernel oops, refused
        here with ENOMEM before anything changed."""
        reset_failed = faults and self._fails("rtas:reset_dma_window")
        if faults:
            for _ in ("property", "name", "value"):
                if self._fails("kmalloc:copy_property"):
                    self.log(deviation("6f"))
                    raise fail(ENOMEM, 'the default window\'s "ibm,dma-window" property could not be restored '
                                       '(fault injection); Linux oopses here')
        if reset_failed:
            # The hypervisor's windows stay as they are; the default one is
            # normally still enabled (its RTAS remove is never made, 3c).
            self.log(f"pci: ibm,reset-pe-dma-windows returned {RTAS_HARDWARE_ERROR}")
        else:
            self.hv.reset_dma()
        self.ddw = None
        self.default_window_prop = True

    def _remove_window_prop(self, default: bool) -> None:
        """remove_dma_window_named(): the property goes; the hypervisor window
        goes only if the property is as long as a DDW property.

        The default window's "ibm,dma-window" is 5 cells (20 bytes) while
        struct dynamic_dma_window_prop is 24 bytes (its __be64 is aligned), so
        for the default window the RTAS remove is never made: the hypervisor
        keeps it enabled (which is why a later DDW lands at the 64-bit
        address, as the v2 trace shows).
        """
        if default:
            self.default_window_prop = False
        elif self.ddw is not None:
            self.hv.remove_window(self.ddw[0])
            self.ddw = None

    # -- iommu_table_group_ops -----------------------------------------------------------

    def get_table_size(self, page_shift: int, window_size: int, levels: int) -> int:
        """spapr_tce_get_table_size(): no multilevel tables; ~0U for levels > 1."""
        if levels > 1:
            return 0xFFFFFFFF
        return window_size >> (page_shift - 3)

    def _fails(self, site: str) -> bool:
        return self.faults is not None and self.faults.should_fail(site)

    def create_table(self, num: int, page_shift: int, window_size: int, levels: int) -> IommuTable:
        """spapr_tce_create_table()"""
        if not is_power_of_2(window_size) or levels > 1:
            raise fail(EINVAL, f"pseries windows need a power-of-two size and one level "
                               f"(got size {window_size:#x}, {levels} levels)")
        window_shift = (window_size - 1).bit_length()
        # ret = -ENODEV from here on, until the query.
        if self.ddw_failed:
            self.log(f"pci: {self.node} in failed DDW device list")
            raise fail(ENODEV, "an earlier dynamic DMA window creation failed for this PE, and Linux never "
                               "tries again (failed_ddw_pdn_list)")
        if self._fails("kmalloc:iommu_pseries_alloc_table"):
            raise fail(ENODEV, "kzalloc_node of the iommu_table failed (fault injection); Linux returns the "
                               "-ENODEV it had set before the allocation")
        if num == 0:
            default_request = window_size <= self.tce32_size and page_shift == IOMMU_PAGE_SHIFT_4K
            if not default_request:
                if self.ddw is not None:
                    self.log("pci: 64-bit window already present.")
                    raise fail(EPERM, "a 64-bit DMA window already exists")
            elif not self.default_window_prop:
                if self.ddw is not None:
                    self.log("pci: Attempt to create window#0 when 64-bit window is present. "
                             "Preventing the attempt as that would destroy the 64-bit window")
                    raise fail(EPERM, "window 0 cannot be restored while the 64-bit window exists")
                self._restore_default_window(faults=True)
                tbl = self._default_table(1 << window_shift)
                self._init_table(tbl)
                return self._finish(0, tbl, page_shift, window_size, levels)
        self.log(f"spapr_tce_create_table: Calling query {self.node}")
        if self._fails("rtas:query_ddw"):
            self.log(f"pci: ibm,query-pe-dma-windows returned {RTAS_HARDWARE_ERROR}")
            self._out_failed()
            raise fail(-RTAS_HARDWARE_ERROR, f"ibm,query-pe-dma-window failed with RTAS status {RTAS_HARDWARE_ERROR} "
                                             f"(fault injection), which Linux returns as the errno")
        windows_available, largest_block, _ = self.hv.query()
        if largest_block < 1 << (window_shift - page_shift):
            raise fail(EINVAL, f"the hypervisor cannot map {1 << window_shift:#x} bytes with "
                               f"{1 << page_shift:#x} pages (largest block {largest_block} pages)")
        injected = self._fails("rtas:create_ddw")
        created = None if injected else self.hv.create_window(page_shift, window_shift)
        if created is None:
            self.log(f"pci: ibm,create-pe-dma-window returned {RTAS_HARDWARE_ERROR}")
            self.log(f"spapr_tce_create_table: Create ddw failed {self.node}")
            self._out_failed()
            raise fail(ENODEV, "ibm,create-pe-dma-window failed" + (" (fault injection)" if injected else ""))
        liobn, addr = created
        # ddw_property_create(): the property, its name, its value; then
        # of_add_property() and ddw_list_new_entry().  Each failure removes
        # the window again (out_remove_win) and ends in out_failed.
        for what in ("property", "name", "value"):
            if self._fails("kmalloc:ddw_property_create"):
                return self._undo_ddw(liobn, f"the DMA window {what} could not be allocated")
        if self._fails("kmalloc:ddw_list_new_entry"):
            return self._undo_ddw(liobn, "the dma_win list entry could not be allocated")
        self.ddw = (liobn, addr, page_shift, window_shift)
        tbl = IommuTable(it_offset=addr >> page_shift, it_size=1 << (window_shift - page_shift),
                         it_page_shift=page_shift, ops=self.ops, index=liobn)
        self._init_table(tbl)
        return self._finish(num, tbl, page_shift, window_size, levels)

    @property
    def node(self) -> str:
        return f"/pci@{0x800000020000000 + self.hv.index:x}"

    def _out_failed(self) -> None:
        """out_failed: the PE goes on failed_ddw_pdn_list, unless that
        kzalloc fails too."""
        if not self._fails("kmalloc:spapr_tce_create_table"):
            self.ddw_failed = True

    def _undo_ddw(self, liobn: int, why: str) -> IommuTable:
        """remove_window: __remove_dma_window() (the RTAS remove), then out_failed."""
        self.hv.remove_window(liobn)
        self._out_failed()
        raise fail(ENODEV, f"{why} (fault injection); the new window was removed again and this PE is now "
                           f"on failed_ddw_pdn_list")

    def _init_table(self, tbl: IommuTable) -> None:
        """iommu_init_table(): the allocation bitmap, then iommu_table_clear()
        -> tce_freemulti_pSeriesLP(): H_STUFF_TCE over the whole window, 512
        entries a call, stopping at the first failure, which is only printed."""
        if self._fails("kmalloc:iommu_init_table"):
            self.log(f"iommu_init_table: Can't allocate {((tbl.it_size + 63) // 64) * 8} bytes")
            return                   # ignored by spapr_tce_create_table()
        done = 0
        while done < tbl.it_size:
            limit = min(H_STUFF_TCE_MAX, tbl.it_size - done)
            rc = H_HARDWARE if self._fails("hcall:tce_freemulti_pSeriesLP") else \
                self.hv.h_stuff_tce(tbl.it_index, tbl.it_offset + done, limit)
            done += limit
            if rc != H_SUCCESS:
                self.log("tce_freemulti_pSeriesLP: plpar_tce_stuff failed")
                self.log(f"\trc      = {rc}")
                self.log(f"\tindex   = {tbl.it_index:#x}")
                self.log(f"\tnpages  = {tbl.it_size:#x}")
                break

    def _finish(self, num: int, tbl: IommuTable, page_shift: int, window_size: int, levels: int) -> IommuTable:
        """exit: pseries_tce_iommu_userspace_view_alloc(), whose -ENOMEM
        spapr_tce_create_table() ignores: the table then has no userspace
        view (a v2 MAP_DMA into it is refused, docs/deviations.md)."""
        if self._fails("kmalloc:pseries_tce_iommu_userspace_view_alloc"):
            tbl.it_userspace = None
        else:
            tbl.it_userspace = TceStorage(tbl.it_size)
        tbl.it_allocated_size = self.get_table_size(page_shift, window_size, levels)
        self.tables[num] = tbl
        return tbl.get()

    def _is_default_window_table(self, tbl: IommuTable) -> bool:
        return tbl.bus_size <= self.tce32_size and tbl.it_page_shift == IOMMU_PAGE_SHIFT_4K

    def set_window(self, num: int, tbl: IommuTable) -> None:
        """spapr_tce_set_window(): only the table this PE created is accepted."""
        if tbl is not self.tables[num]:
            raise fail(EPERM, "pseries PEs accept only their own TCE tables (no sharing between groups)")
        tbl.groups.append(self)

    def unset_window(self, num: int) -> None:
        """spapr_tce_unset_window(): the window is removed from the hypervisor."""
        tbl = self.tables[num]
        if tbl is None:
            return
        self._remove_window_prop(default=num == 0 and self._is_default_window_table(tbl))
        if self in tbl.groups:
            tbl.groups.remove(self)
        tbl.put()
        self.tables[num] = None

    def take_ownership(self) -> None:
        """spapr_tce_take_ownership(): all windows go; the user creates its own."""
        if self.tables[0] is None and self.max_dynamic_windows_supported != 1:
            return
        if self.ddw is not None:
            self._remove_window_prop(default=False)
            if self.tables[1] is not None:
                self.tables[1].put()
                self.tables[1] = None
            elif self.tables[0] is not None:
                self.tables[0].put()        # only the DDW was left, in slot 0
                self.tables[0] = None
        if self.tables[0] is not None:
            self._remove_window_prop(default=True)
            self.tables[0].put()
            self.tables[0] = None

    def release_ownership(self) -> None:
        """spapr_tce_release_ownership(): restore the default window for the kernel."""
        if self.tables[0] is not None:
            return
        self._restore_default_window()
        self.tables[0] = self._default_table(self.hv.dma32_size)


class PseriesPe(Pe):
    """A PE of the pseries machine: DMA is translated by the hypervisor."""

    table_group: PseriesTableGroup

    def __init__(self, hv: SpaprPhb, phys: PhysicalMemory, log: Callable[[str], None]) -> None:
        name = f"PHB#{hv.index:x}"
        super().__init__(name, PseriesTableGroup(hv, log, phys.faults), phys, log, eeh=None)
        self.hv = hv

    # The walk behind the TCE cache (Pe's), named once: no super() on a device's every transfer.
    _walk = Pe.translate

    def translate(self, iova: int, length: int, write: bool) -> Translation:
        """As on PowerNV, the last translation is reused while its table is unchanged."""
        t = self.hv.lookup(iova)
        if t is None:
            return self._walk(iova, length, write)
        return self.tce_cache.translate(t.entries, iova, length, write, self._walk, t.page_shift)

    def translate_burst(self, iovas: Sequence[int], lens: Sequence[int], write: bool) -> Pieces | None:
        """translate() of a burst, through the TCE cache."""
        t = self.hv.lookup(iovas[0])
        if t is None:
            return None
        return self.translate_in_window(t.entries, t.bus_offset, t.bus_offset + (t.nb_table << t.page_shift),
                                        t.page_shift, iovas, lens, write)

    def lookup_tces(self, iova: int, length: int) -> TceLookup | DmaFault:
        t = self.hv.lookup(iova)
        if t is None:
            return DmaFault(iova, f"bus address {iova:#x} is in no DMA window")
        end = t.bus_offset + (t.nb_table << t.page_shift)
        if iova + length > end:
            return DmaFault(end, f"bus address {end:#x} is past the end of window LIOBN {t.liobn:#x}")
        first = (iova - t.bus_offset) >> t.page_shift
        last = (iova + length - 1 - t.bus_offset) >> t.page_shift
        return t.entries.get_range(first, last - first + 1), t.page_shift

    def dma_fault(self, fault: DmaFault, write: bool) -> None:
        super().dma_fault(fault, write)
        what = "write to" if write else "read from"
        self.log(f"spapr-pci {self.name}: DMA {what} {fault.iova:#x} blocked by the hypervisor IOMMU: "
                 f"{fault.reason} (no EEH on this machine: nothing is frozen)")

    def windows(self) -> list[dict[str, Any]]:
        out = []
        for n, t in enumerate(self.hv.tables):
            if t.enabled:
                out.append({"window": n, "liobn": t.liobn, "start": t.bus_offset, "size": t.nb_table << t.page_shift,
                            "page_size": 1 << t.page_shift, "mapped": t.entries.count_used()})
        return out

    def describe_phb(self) -> dict[str, Any]:
        return {"index": self.hv.index, "model": "sPAPR", "liobns": [t.liobn for t in self.hv.tables]}

    def mappings(self, limit: int | None = None) -> Iterator[IommuMapping]:
        for t in self.hv.tables:
            if t.enabled:
                yield from tce_mappings(f"{self.name} LIOBN {t.liobn:#x}", t.entries, t.bus_offset >> t.page_shift,
                                        t.nb_table, t.page_shift, limit)

    def state(self) -> Any:
        tg = self.table_group
        # The hypervisor's windows (a disabled one keeps its old geometry, which
        # nothing can see), the guest kernel's tables with their userspace
        # views, its device-tree windows, and whether the PE is on
        # failed_ddw_pdn_list.
        return ("hv", tuple((t.liobn, t.enabled, t.bus_offset, t.page_shift, t.nb_table, t.entries.items(t.nb_table))
                            if t.enabled else (t.liobn, False) for t in self.hv.tables),
                tuple(None if t is None else t.state() for t in tg.tables),
                tg.default_window_prop, tg.ddw, tg.ddw_failed)


class PseriesPlatform(Platform):
    """A PAPR guest: one PE per PHB, tables in the hypervisor, no EEH (as in the reference traces)."""

    name = "pseries"

    def __init__(self, phbs: list[SpaprPhb]) -> None:
        super().__init__()
        self.phbs = phbs
