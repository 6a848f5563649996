"""PowerNV (bare-metal POWER8/9): PHB3/PHB4 in IODA2 mode, tables in host memory.

The host kernel owns the TCE tables and programs them into the PHB's TVT
(one TVE per window) through OPAL.  Window rules and table geometry follow
arch/powerpc/platforms/powernv/pci-ioda.c (pnv_pci_ioda2_get_table_size,
pnv_pci_ioda2_create_table, pnv_pci_ioda2_set_window,
pnv_pci_ioda2_setup_default_config, pnv_ioda2_take/release_ownership) and
pci-ioda-tce.c (pnv_pci_ioda2_table_alloc_pages, pnv_tce_xchg).

A DMA through an invalid TCE, or one without the permission its direction
needs, makes the PHB freeze the PE (EEH).
"""

from __future__ import annotations

from errno import EINVAL, ENOMEM
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import KernelBug, fail
from ..faults import OPAL_HARDWARE
from ..dma import DmaFault, Pieces, Translation
from ..iommu.table_group import TableGroup
from ..iommu.tce import TCE_PCI_READ, TCE_PCI_WRITE, IommuTable, TableOps, TceStorage, XchgResult, direction_to_perm
from ..mm import PhysicalMemory
from ..progression import U64Values
from .base import IommuMapping, Platform
from .pe import Pe, TceLookup, tce_mappings

if TYPE_CHECKING:
    from ..iommu.iommu import IommuGroup
from .eeh import EehPe

POWERNV_IOMMU_MAX_LEVELS = 5
POWERNV_IOMMU_DEFAULT_LEVELS = 2
TCE_BYPASS_BASE = 1 << 59               # TVE#1 is selected by PCI address bit 59


def ilog2(x: int) -> int:
    return x.bit_length() - 1


def is_power_of_2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class PnvTableOps(TableOps):
    """pnv_ioda2_iommu_ops on a table held in host memory."""

    overrun_corrupts = True

    def perm(self, direction: int) -> int:
        """pnv_tce_xchg(): a write permission implies read."""
        p = direction_to_perm(direction)
        return p | TCE_PCI_READ if p & TCE_PCI_WRITE else p

    def xchg_range(self, tbl: IommuTable, entry: int, tces: U64Values) -> XchgResult:
        """pnv_tce_xchg() over a range (permissions already as perm() gives)."""
        idx = entry - tbl.it_offset
        n = len(tces)
        if idx < 0 or idx + n > tbl.it_size:
            # The driver checks this before calling: writing here would be
            # the out-of-bounds store the real kernel makes (see deviations).
            raise KernelBug(f"TCE exchange at {idx}+{n} outside table of {tbl.it_size}")
        pos, old = tbl.entries.xchg_range(idx, tces)
        return XchgResult(n, 0, pos, old)

    def xchg_one(self, tbl: IommuTable, entry: int, tce: int) -> int | None:
        idx = entry - tbl.it_offset
        if not 0 <= idx < tbl.it_size:
            raise KernelBug(f"TCE exchange at {idx} outside table of {tbl.it_size}")
        return tbl.entries.xchg_one(idx, tce)

    def clear_range(self, tbl: IommuTable, entry: int, n: int) -> list[np.ndarray]:
        lo = max(entry, tbl.it_offset)
        hi = min(entry + n, tbl.it_offset + tbl.it_size)
        return tbl.entries.clear_range(lo - tbl.it_offset, hi - lo) if hi > lo else []

    def clear_one(self, tbl: IommuTable, entry: int) -> int:
        idx = entry - tbl.it_offset
        return tbl.entries.clear_one(idx) if 0 <= idx < tbl.it_size else 0

    def used(self, tbl: IommuTable, entry: int, n: int) -> np.ndarray:
        lo = max(entry, tbl.it_offset)
        hi = min(entry + n, tbl.it_offset + tbl.it_size)
        if hi <= lo:
            return np.zeros(0, dtype=np.int64)
        return tbl.entries.used_indices(lo - tbl.it_offset, hi - lo) + tbl.it_offset

    def clear(self, tbl: IommuTable, entries: np.ndarray) -> np.ndarray:
        return tbl.entries.clear_indices(entries - tbl.it_offset)

    def count_used(self, tbl: IommuTable) -> int:
        return tbl.entries.count_used()

    def get(self, tbl: IommuTable, entry: int) -> int:
        return tbl.entries.get(entry - tbl.it_offset)

    # -- indirect levels, allocated on first use (pnv_tce(..., alloc=true)) ---------------

    @staticmethod
    def _levels(tbl: IommuTable, user: bool) -> set[tuple[int, int]]:
        if user:
            if tbl.userspace_levels_present is None:
                tbl.userspace_levels_present = set()
            return tbl.userspace_levels_present
        if tbl.levels_present is None:
            tbl.levels_present = set()
        return tbl.levels_present

    def missing_levels(self, tbl: IommuTable, user: bool, entry: int, n: int) -> list[tuple[int, int, int]]:
        """The indirect levels pnv_tce() would allocate walking entries
        [entry, entry+n) in order: (offset of the entry that needs it, level,
        block), highest level first for each entry.  Empty for one-level tables."""
        depth = tbl.it_indirect_levels
        if not depth or n <= 0:
            return []
        have = self._levels(tbl, user)
        shift = tbl.it_level_size.bit_length() - 1
        idx = entry - tbl.it_offset
        out = []
        for level in range(depth, 0, -1):
            s = shift * level
            for block in range(idx >> s, ((idx + n - 1) >> s) + 1):
                if (level, block) not in have:
                    out.append((max(idx, block << s) - idx, level, block))
        out.sort(key=lambda e: (e[0], -e[1]))
        return out

    def mark_levels(self, tbl: IommuTable, user: bool, levels: list[tuple[int, int, int]]) -> None:
        self._levels(tbl, user).update((lv, b) for _, lv, b in levels)


PNV_TABLE_OPS = PnvTableOps()


class PnvPhb:
    """One PHB4 (or PHB3): its 32-bit MMIO window base bounds the DMA32 window."""

    def __init__(self, index: int, *, model: str, m32_pci_base: int, pgsizes: int, page_shift: int,
                 max_order: int, eeh: bool) -> None:
        self.index = index
        self.model = model
        self.m32_pci_base = m32_pci_base
        self.pgsizes = pgsizes
        self.page_shift = page_shift
        self.max_order = max_order          # MAX_PAGE_ORDER: largest contiguous allocation
        self.eeh = eeh
        self.pes: list["PnvPe"] = []

    def alloc_ok(self, shift: int) -> bool:
        """alloc_pages_node(): an allocation of 1 << shift bytes fits MAX_ORDER."""
        return shift - self.page_shift <= self.max_order


class PnvTableGroup(TableGroup):
    """A PE's iommu_table_group with pnv_pci_ioda2_ops."""

    def __init__(self, pe: "PnvPe") -> None:
        phb = pe.phb
        super().__init__(tce32_start=0, tce32_size=phb.m32_pci_base, pgsizes=phb.pgsizes,
                         max_dynamic_windows_supported=2, max_levels=POWERNV_IOMMU_MAX_LEVELS)
        self.pe = pe

    def get_table_size(self, page_shift: int, window_size: int, levels: int) -> int:
        """pnv_pci_ioda2_get_table_size(): TCE levels plus the userspace copy."""
        page_shift_k = self.pe.phb.page_shift
        if not levels or levels > POWERNV_IOMMU_MAX_LEVELS or not is_power_of_2(window_size):
            return 0
        entries_shift = ilog2(window_size) - page_shift
        if entries_shift < 0:
            # The C code computes a negative shift here (undefined behaviour);
            # a window smaller than one IOMMU page is answered as invalid.
            return 0
        tce_table_size = max(0x1000, 1 << (entries_shift + 3))
        entries_shift = (entries_shift + levels - 1) // levels
        direct_table_size = 1 << max(entries_shift + 3, page_shift_k)
        total = 0
        for _ in range(levels):
            total += _align(tce_table_size, direct_table_size)
            tce_table_size //= direct_table_size
            tce_table_size <<= 3
            tce_table_size = max(tce_table_size, direct_table_size)
        return total + total        # one for the HW table, one for the userspace copy

    def create_table(self, num: int, page_shift: int, window_size: int, levels: int) -> IommuTable:
        """pnv_pci_ioda2_create_table_userspace(): a table with its userspace copy."""
        return self._create_table(num, page_shift, window_size, levels, userspace=True)

    def create_host_table(self, num: int, page_shift: int, window_size: int, levels: int) -> IommuTable:
        """The host kernel's own table (no userspace copy, no fault injection)."""
        return self._create_table(num, page_shift, window_size, levels, userspace=False)

    def _create_table(self, num: int, page_shift: int, window_size: int, levels: int,
                      userspace: bool) -> IommuTable:
        """pnv_pci_ioda2_create_table(); ``it_allocated_size`` as create_table_userspace sets it."""
        phb = self.pe.phb
        bus_offset = TCE_BYPASS_BASE if num else self.tce32_start
        faults = self.pe.phys.faults if userspace else None     # VFIO's tables, not the host's own
        if faults is not None and faults.should_fail("kmalloc:pnv_pci_table_alloc"):
            raise fail(ENOMEM, "kzalloc of the iommu_table failed (fault injection)")
        # pnv_pci_ioda2_table_alloc_pages()
        if not levels or levels > POWERNV_IOMMU_MAX_LEVELS:
            raise fail(EINVAL, f"{levels} TCE levels: PowerNV supports 1..{POWERNV_IOMMU_MAX_LEVELS}")
        if not is_power_of_2(window_size):
            raise fail(EINVAL, f"window size {window_size:#x} is not a power of two")
        entries_shift = ilog2(window_size) - page_shift
        if entries_shift < 0:
            raise fail(EINVAL, f"window size {window_size:#x} is smaller than one {1 << page_shift:#x} page")
        table_shift = max(entries_shift + 3, phb.page_shift)
        tce_table_size = 1 << table_shift
        level_entries_shift = (entries_shift + levels - 1) // levels
        level_shift = max(level_entries_shift + 3, phb.page_shift)
        if (level_shift - 3) * levels + page_shift >= 55:
            raise fail(EINVAL, f"{levels} level(s) of {1 << (level_shift - 3)} entries of {1 << page_shift:#x} "
                               f"pages exceed the PHB's 55-bit TCE address space")
        copies = 2 if userspace else 1
        if not phb.alloc_ok(level_shift):
            raise fail(ENOMEM, f"a TCE level of {1 << level_shift:#x} bytes is larger than the largest "
                               f"contiguous allocation ({1 << (phb.page_shift + phb.max_order):#x}); use more levels")
        if faults is not None:
            for site in ("alloc_pages:pnv_pci_ioda2_table_alloc_pages", "alloc_pages:pnv_pci_ioda2_table_alloc_pages.uas"):
                if faults.should_fail(site):
                    self.pe.log(f"Failed to allocate a TCE memory, level shift={level_shift}")
                    raise fail(ENOMEM, f"allocating the first TCE level ({1 << level_shift:#x} bytes) failed "
                                       f"(fault injection)")
        tbl = IommuTable(it_offset=bus_offset >> page_shift, it_size=tce_table_size >> 3, it_page_shift=page_shift,
                         ops=PNV_TABLE_OPS, levels=levels, level_size=1 << (level_shift - 3),
                         allocated_size=self.get_table_size(page_shift, window_size, levels) if userspace else
                         (1 << level_shift) * copies, userspace=userspace,
                         index=(phb.index << 16) | self.pe.pe_number)
        return tbl

    def set_window(self, num: int, tbl: IommuTable) -> None:
        """pnv_pci_ioda2_set_window(): program TVE#num through OPAL and link the table."""
        pe = self.pe
        pe.log(f"pci {pe.name}: Setting up window#{num} {tbl.bus_start:#x}..{tbl.bus_end - 1:#x} pg={tbl.page_size:#x}")
        faults = pe.phys.faults
        if tbl.it_userspace is not None and faults is not None and faults.should_fail("opal:opal_pci_map_pe_dma_window"):
            pe.log(f"pci {pe.name}: Failed to configure TCE table, err {OPAL_HARDWARE}")
            # pnv_pci_ioda2_set_window() returns the OPAL status, which the
            # driver passes up as an errno: OPAL_HARDWARE (-6) is ENXIO.
            raise fail(-OPAL_HARDWARE, f"OPAL refused to program TVE#{num} (OPAL_HARDWARE, fault injection)")
        pe.tve[num] = tbl
        tbl.groups.append(self)
        self.tables[num] = tbl.get()

    def unset_window(self, num: int) -> None:
        """pnv_pci_ioda2_unset_window()"""
        pe = self.pe
        pe.log(f"pci {pe.name}: Removing DMA window #{num}")
        pe.tve[num] = None
        tbl = self.tables[num]
        if tbl is not None:
            if self in tbl.groups:
                tbl.groups.remove(self)
            tbl.put()
            self.tables[num] = None

    def take_ownership(self) -> None:
        """pnv_ioda2_take_ownership(): the host's default window and bypass go."""
        if self.tables[0] is None:
            return
        self.pe.bypass = False
        kernel_tbl = self.tables[0]
        self.unset_window(0)
        kernel_tbl.put()

    def release_ownership(self) -> None:
        """pnv_ioda2_release_ownership(): the host's default window comes back."""
        if self.tables[0] is not None:
            return
        self.pe.setup_default_config()


class PnvPe(Pe):
    """A PE of a PowerNV PHB: its TVEs select the tables the host kernel programmed."""

    table_group: PnvTableGroup

    def __init__(self, phb: PnvPhb, pe_number: int, phys: PhysicalMemory, log: Callable[[str], None],
                 ram_size: int) -> None:
        name = f"PHB#{phb.index:x}-PE#{pe_number:x}"
        self.phb = phb
        self.pe_number = pe_number
        self.tve: list[IommuTable | None] = [None, None]
        self.bypass = False
        self.ram_size = ram_size
        eeh = EehPe(name, log) if phb.eeh else None
        super().__init__(name, PnvTableGroup(self), phys, log, eeh)
        phb.pes.append(self)

    def setup_default_config(self) -> None:
        """pnv_pci_ioda2_setup_default_config(): the host kernel's DMA window.

        As large as the biggest allocation allows (multilevel, filled on
        demand) and no larger than RAM, with the host's page size, plus the
        64-bit bypass window.
        """
        phb = self.phb
        max_memory = 1 << ilog2(self.ram_size)
        maxblock = 1 << (phb.page_shift + phb.max_order)
        window_size = min((maxblock * 8) << phb.page_shift, max_memory)
        tces_order = ilog2(window_size >> phb.page_shift)
        tcelevel_order = ilog2(maxblock >> 3)
        levels = tces_order // tcelevel_order + (1 if tces_order % tcelevel_order else 0)
        levels = max(levels, POWERNV_IOMMU_DEFAULT_LEVELS)
        tbl = self.table_group.create_host_table(0, phb.page_shift, window_size, levels)
        self.table_group.set_window(0, tbl)
        self.bypass = True

    def translate(self, iova: int, length: int, write: bool) -> Translation:
        """Translation through the PHB's TCE cache: the last translation is
        reused while its table is unchanged (any TCE update invalidates it)."""
        tbl = self.tve[1 if iova & TCE_BYPASS_BASE else 0]
        if tbl is None:
            return super().translate(iova, length, write)
        return self.tce_cache.translate(tbl.entries, iova, length, write, super().translate, tbl.it_page_shift)

    def native_tables(self) -> list[TceStorage]:
        """The tables a native DMA path may cache translations of (virtio_native.py):
        those of the windows programmed now; a cached translation holds while
        its table's generation is unchanged and the table is still here."""
        return [tbl.entries for tbl in self.tve if tbl is not None]

    def native_table(self, iova: int) -> TceStorage | None:
        """The table the device's DMA at ``iova`` goes through."""
        tbl = self.tve[1 if iova & TCE_BYPASS_BASE else 0]
        return None if tbl is None else tbl.entries

    def translate_burst(self, iovas: Sequence[int], lens: Sequence[int], write: bool) -> Pieces | None:
        """translate() of a burst, through the PHB's TCE cache."""
        tbl = self.tve[1 if iovas[0] & TCE_BYPASS_BASE else 0]
        if tbl is None:
            return None
        return self.translate_in_window(tbl.entries, tbl.bus_start, tbl.bus_end, tbl.it_page_shift, iovas, lens,
                                        write)

    def lookup_tces(self, iova: int, length: int) -> TceLookup | DmaFault:
        num = 1 if iova & TCE_BYPASS_BASE else 0
        tbl = self.tve[num]
        if tbl is None:
            if num == 1 and self.bypass:
                return DmaFault(iova, "the host kernel's 64-bit bypass window is not for user DMA")
            return DmaFault(iova, f"no DMA window is programmed in TVE#{num}")
        if not (tbl.bus_start <= iova and iova + length <= tbl.bus_end):
            bad = iova if iova < tbl.bus_start else max(iova, tbl.bus_end)
            return DmaFault(bad, f"bus address {bad:#x} is outside window #{num} "
                                 f"{tbl.bus_start:#x}..{tbl.bus_end - 1:#x}")
        shift = tbl.it_page_shift
        first = (iova >> shift) - tbl.it_offset
        last = ((iova + length - 1) >> shift) - tbl.it_offset
        return tbl.entries.get_range(first, last - first + 1), shift

    def dma_fault(self, fault: DmaFault, write: bool) -> None:
        super().dma_fault(fault, write)
        what = "write to" if write else "read from"
        if self.eeh is not None:
            self.eeh.freeze(f"DMA {what} {fault.iova:#x}: {fault.reason}")
        else:
            self.log(f"pci {self.name}: DMA {what} {fault.iova:#x} refused: {fault.reason}")

    def windows(self) -> list[dict[str, Any]]:
        out = []
        for num, tbl in enumerate(self.tve):
            if tbl is not None:
                owner = "user" if tbl.it_userspace is not None else "host kernel"
                out.append({"tve": num, "start": tbl.bus_start, "size": tbl.bus_size, "page_size": tbl.page_size,
                            "levels": tbl.it_indirect_levels + 1, "owner": owner, "mapped": tbl.mapped_count()})
        if self.bypass:
            out.append({"tve": 1, "start": TCE_BYPASS_BASE, "size": 1 << ilog2(max(self.ram_size, 1)) if
                        self.ram_size else 0, "page_size": None, "levels": 0, "owner": "host kernel (bypass)",
                        "mapped": None})
        return out

    def describe_phb(self) -> dict[str, Any]:
        return {"index": self.phb.index, "model": self.phb.model}

    def mappings(self, limit: int | None = None) -> Iterator[IommuMapping]:
        for num, tbl in enumerate(self.tve):
            if tbl is not None:
                yield from tce_mappings(f"{self.name} TVE#{num}", tbl.entries, tbl.it_offset, tbl.it_size,
                                        tbl.it_page_shift, limit)

    def state(self) -> Any:
        return ("pnv", self.bypass, tuple(None if t is None else t.state() for t in self.tve))


class PowerNVPlatform(Platform):
    """Bare-metal POWER: PHBs in IODA2 mode, their PEs, EEH where the PHBs have it."""

    name = "powernv"

    def __init__(self, phbs: list[PnvPhb], eeh: bool) -> None:
        super().__init__()
        self.phbs = phbs
        self.eeh = eeh

    @property
    def eeh_enabled(self) -> bool:
        return self.eeh

    def eeh_pe(self, group: "IommuGroup") -> EehPe | None:
        pe = next((p for p in self.pes if p.iommu_group is group), None)
        return pe.eeh if pe is not None else None

